package workerpool

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <stdlib.h>

// NVML, the NVIDIA driver's management library, says how much device
// memory each process holds. It comes with the driver, so it is opened at
// run time: a gateway without a GPU never needs it.
typedef struct {
	unsigned int pid;
	unsigned long long usedGpuMemory;
	unsigned int gpuInstanceId;
	unsigned int computeInstanceId;
} h3_nvml_process;

typedef struct {
	int (*init)(void);
	int (*count)(unsigned int *);
	int (*handle)(unsigned int, void **);
	int (*procs)(void *, unsigned int *, h3_nvml_process *);
} h3_nvml;

static const char *h3_nvml_open(const char *soname, h3_nvml *n) {
	void *h = dlopen(soname, RTLD_NOW | RTLD_LOCAL);
	if (h == NULL) {
		const char *e = dlerror();
		return e ? e : "dlopen failed";
	}
	n->init = (int (*)(void))dlsym(h, "nvmlInit_v2");
	n->count = (int (*)(unsigned int *))dlsym(h, "nvmlDeviceGetCount_v2");
	n->handle = (int (*)(unsigned int, void **))dlsym(h, "nvmlDeviceGetHandleByIndex_v2");
	n->procs = (int (*)(void *, unsigned int *, h3_nvml_process *))dlsym(h, "nvmlDeviceGetComputeRunningProcesses_v3");
	if (!n->init || !n->count || !n->handle || !n->procs) return "a symbol is missing (driver older than 510?)";
	if (n->init() != 0) return "nvmlInit failed (no driver loaded?)";
	return NULL;
}

static int h3_nvml_count(h3_nvml *n, unsigned int *c) { return n->count(c); }

// h3_nvml_procs fills out with up to *len processes using device i.
static int h3_nvml_procs(h3_nvml *n, unsigned int i, h3_nvml_process *out, unsigned int *len) {
	void *dev = NULL;
	int rc = n->handle(i, &dev);
	if (rc != 0) return rc;
	return n->procs(dev, len, out);
}
*/
import "C"

import (
	"errors"
	"fmt"
	"unsafe"
)

// libNVML is the soname of NVML as the driver installs it.
const libNVML = "libnvidia-ml.so.1"

// gpuMemory reads per-process device memory through NVML.
type gpuMemory struct{ n *C.h3_nvml }

// openGPUMemory opens NVML; the error names the library when the host has
// no NVIDIA driver.
func openGPUMemory() (*gpuMemory, error) {
	n := (*C.h3_nvml)(C.calloc(1, C.size_t(unsafe.Sizeof(C.h3_nvml{}))))
	cname := C.CString(libNVML)
	defer C.free(unsafe.Pointer(cname))
	if e := C.h3_nvml_open(cname, n); e != nil {
		C.free(unsafe.Pointer(n))
		return nil, fmt.Errorf("gpu memory metrics: %s: %s", libNVML, C.GoString(e))
	}
	return &gpuMemory{n: n}, nil
}

// byProcess returns the device memory each of pids holds, per device
// index; a pid using no GPU is absent.
func (g *gpuMemory) byProcess(pids map[int]bool) (map[int]map[int]uint64, error) {
	var count C.uint
	if rc := C.h3_nvml_count(g.n, &count); rc != 0 {
		return nil, fmt.Errorf("nvmlDeviceGetCount: error %d", int(rc))
	}
	out := map[int]map[int]uint64{}
	var errs []error
	procs := make([]C.h3_nvml_process, 256)
	for dev := range int(count) {
		n := C.uint(len(procs))
		if rc := C.h3_nvml_procs(g.n, C.uint(dev), &procs[0], &n); rc != 0 {
			errs = append(errs, fmt.Errorf("device %d: nvmlDeviceGetComputeRunningProcesses: error %d", dev, int(rc)))
			continue
		}
		for _, p := range procs[:min(int(n), len(procs))] {
			pid := int(p.pid)
			if !pids[pid] {
				continue
			}
			if out[pid] == nil {
				out[pid] = map[int]uint64{}
			}
			out[pid][dev] += uint64(p.usedGpuMemory)
		}
	}
	return out, errors.Join(errs...)
}
