package ort

/*
#cgo LDFLAGS: -ldl
#include <dlfcn.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

// The ONNX Runtime C API is a table of function pointers that never
// reorders: a release only appends. onnxruntime_go wraps most of it but not
// the calls that keep a tensor in device memory (BindOutputToDevice, the
// raw values GetBoundOutputValues returns), so this file reaches them by
// their index in the table of API version 24, the version onnxruntime_go
// asks for. The signatures are the C API's.
enum {
	h3_GetErrorMessage = 2,
	h3_GetTensorMutableData = 51,
	h3_GetDimensionsCount = 61,
	h3_GetDimensions = 62,
	h3_GetTensorTypeAndShape = 65,
	h3_CreateMemoryInfo = 68,
	h3_AllocatorFree = 76,
	h3_GetAllocatorWithDefaultOptions = 78,
	h3_ReleaseStatus = 93,
	h3_ReleaseMemoryInfo = 94,
	h3_ReleaseValue = 96,
	h3_ReleaseTensorTypeAndShapeInfo = 99,
	h3_BindInput = 136,
	h3_BindOutputToDevice = 138,
	h3_GetBoundOutputValues = 140,
	h3_CreateEnv = 3,
	h3_ReleaseEnv = 92,
	h3_GetEpDevices = 303,
	h3_SessionOptionsAppendExecutionProvider_V2 = 304,
	h3_EpDevice_EpName = 312,
};

typedef void *h3_status;
typedef struct { const void *(*GetApi)(uint32_t); const char *(*GetVersionString)(void); } h3_api_base;

// h3_dlopen_error opens path and returns NULL, or dlerror's message, which
// names the library the loader could not find. Both in one C call, because
// dlerror is per thread.
static const char *h3_dlopen_error(const char *path, int noload, void **handle) {
	*handle = dlopen(path, RTLD_NOW | RTLD_LOCAL | (noload ? RTLD_NOLOAD : 0));
	if (*handle == NULL) {
		const char *e = dlerror();
		return e ? e : "dlopen failed";
	}
	return NULL;
}

static void *h3_dlsym(void *handle, const char *name) { return dlsym(handle, name); }
static void h3_dlclose(void *handle) { dlclose(handle); }

static const void *const *h3_ort_api(void *lib, uint32_t version, const char **why) {
	const h3_api_base *(*base)(void) = (const h3_api_base *(*)(void))dlsym(lib, "OrtGetApiBase");
	if (base == NULL) { *why = "no OrtGetApiBase symbol"; return NULL; }
	const void *const *api = (const void *const *)base()->GetApi(version);
	if (api == NULL) { *why = "the library does not offer this API version"; return NULL; }
	return api;
}

static const char *h3_ort_version(void *lib) {
	const h3_api_base *(*base)(void) = (const h3_api_base *(*)(void))dlsym(lib, "OrtGetApiBase");
	return base ? base()->GetVersionString() : "";
}

// h3_status_text copies a failed status's message into a malloc'd string
// and releases the status.
static char *h3_status_text(const void *const *api, h3_status s) {
	if (s == NULL) return NULL;
	const char *m = ((const char *(*)(h3_status))api[h3_GetErrorMessage])(s);
	char *out = strdup(m ? m : "unknown ONNX Runtime error");
	((void (*)(h3_status))api[h3_ReleaseStatus])(s);
	return out;
}

static char *h3_create_memory_info(const void *const *api, const char *name, int device, void **out) {
	return h3_status_text(api, ((h3_status (*)(const char *, int, int, int, void **))api[h3_CreateMemoryInfo])(name, 0, device, 0, out));
}

static void h3_release_memory_info(const void *const *api, void *info) {
	((void (*)(void *))api[h3_ReleaseMemoryInfo])(info);
}

static char *h3_bind_input(const void *const *api, void *binding, const char *name, void *value) {
	return h3_status_text(api, ((h3_status (*)(void *, const char *, const void *))api[h3_BindInput])(binding, name, value));
}

static char *h3_bind_output_to_device(const void *const *api, void *binding, const char *name, void *info) {
	return h3_status_text(api, ((h3_status (*)(void *, const char *, const void *))api[h3_BindOutputToDevice])(binding, name, info));
}

// h3_bound_outputs copies the run's output values into out (count at most
// max) and frees the runtime's array; the values are the caller's to
// release.
static char *h3_bound_outputs(const void *const *api, void *binding, void **out, size_t max, size_t *count) {
	void *alloc = NULL;
	char *e = h3_status_text(api, ((h3_status (*)(void **))api[h3_GetAllocatorWithDefaultOptions])(&alloc));
	if (e) return e;
	void **vals = NULL;
	e = h3_status_text(api, ((h3_status (*)(const void *, void *, void ***, size_t *))api[h3_GetBoundOutputValues])(binding, alloc, &vals, count));
	if (e) return e;
	size_t n = *count < max ? *count : max;
	for (size_t i = 0; i < *count; i++) {
		if (i < n) out[i] = vals[i];
		else ((void (*)(void *))api[h3_ReleaseValue])(vals[i]);
	}
	if (vals) ((h3_status (*)(void *, void *))api[h3_AllocatorFree])(alloc, vals);
	return NULL;
}

static void h3_release_value(const void *const *api, void *v) {
	((void (*)(void *))api[h3_ReleaseValue])(v);
}

// h3_tensor reads a tensor's data pointer and up to 8 dimensions.
static char *h3_tensor(const void *const *api, void *v, void **data, int64_t *dims, size_t *ndims) {
	char *e = h3_status_text(api, ((h3_status (*)(void *, void **))api[h3_GetTensorMutableData])(v, data));
	if (e) return e;
	void *info = NULL;
	e = h3_status_text(api, ((h3_status (*)(const void *, void **))api[h3_GetTensorTypeAndShape])(v, &info));
	if (e) return e;
	e = h3_status_text(api, ((h3_status (*)(const void *, size_t *))api[h3_GetDimensionsCount])(info, ndims));
	if (!e && *ndims > 8) e = strdup("tensor has more than 8 dimensions");
	if (!e) e = h3_status_text(api, ((h3_status (*)(const void *, int64_t *, size_t))api[h3_GetDimensions])(info, dims, *ndims));
	((void (*)(void *))api[h3_ReleaseTensorTypeAndShapeInfo])(info);
	return e;
}

// h3_ep_devices counts the devices the environment offers for the
// execution provider ep_name and, when so is set and the ordinal-th one
// exists, appends that device's provider to the session options. CreateEnv
// returns the process's one environment, which onnxruntime_go made, with
// one more reference that ReleaseEnv drops again.
static char *h3_ep_devices(const void *const *api, const char *ep_name, void *so, int ordinal,
		const char *const *keys, const char *const *vals, size_t nopts, size_t *count) {
	void *env = NULL;
	char *e = h3_status_text(api, ((h3_status (*)(int, const char *, void **))api[h3_CreateEnv])(3, "h3infer", &env));
	if (e) return e;
	const void *const *devs = NULL;
	size_t n = 0;
	*count = 0;
	e = h3_status_text(api, ((h3_status (*)(const void *, const void *const **, size_t *))api[h3_GetEpDevices])(env, &devs, &n));
	const void *pick = NULL;
	for (size_t i = 0; !e && i < n; i++) {
		const char *name = ((const char *(*)(const void *))api[h3_EpDevice_EpName])(devs[i]);
		if (name != NULL && strcmp(name, ep_name) == 0) {
			if ((int)*count == ordinal) pick = devs[i];
			(*count)++;
		}
	}
	if (!e && so != NULL && pick != NULL) {
		e = h3_status_text(api, ((h3_status (*)(void *, void *, const void *const *, size_t, const char *const *, const char *const *, size_t))
			api[h3_SessionOptionsAppendExecutionProvider_V2])(so, env, &pick, 1, keys, vals, nopts));
	}
	((void (*)(void *))api[h3_ReleaseEnv])(env);
	return e;
}

// h3_trim hands memory malloc holds free back to the system.
static void h3_trim(void) { malloc_trim(0); }

// The CUDA runtime calls a worker needs to move a device-resident KV cache
// to the host when its batch changes shape; reached through dlopen so that
// the binary runs where no CUDA is installed.
typedef int (*h3_cuda_memcpy)(void *, const void *, size_t, int);

static int h3_call_memcpy(void *fn, void *dst, const void *src, size_t n) {
	return ((h3_cuda_memcpy)fn)(dst, src, n, 4); // cudaMemcpyDefault: the pointers say the direction
}
*/
import "C"

import (
	"errors"
	"fmt"
	"path/filepath"
	"unsafe"

	onnxrt "github.com/yalue/onnxruntime_go"
)

// ortAPIVersion is the C API version onnxruntime_go v1.27 asks for; the
// indices in the table above are those of this version.
const ortAPIVersion = 24

// dlopenError opens path with the dynamic loader and closes it again; the
// error is the loader's own message, which names the first library it
// could not find (libcublasLt.so.13: cannot open shared object file...).
func dlopenError(path string) error {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var h unsafe.Pointer
	if e := C.h3_dlopen_error(cpath, 0, &h); e != nil {
		return errors.New(C.GoString(e))
	}
	C.h3_dlclose(h)
	return nil
}

// ortAPI is the C API table of the ONNX Runtime library onnxruntime_go has
// loaded in this process.
type ortAPI struct {
	api     *unsafe.Pointer
	version string
}

// loadORTAPI finds the table of the already loaded library libPath
// (InitRuntime must have succeeded with the same path).
func loadORTAPI(libPath string) (*ortAPI, error) {
	abs, err := filepath.Abs(libPath)
	if err != nil {
		return nil, err
	}
	cpath := C.CString(abs)
	defer C.free(unsafe.Pointer(cpath))
	var h unsafe.Pointer
	if e := C.h3_dlopen_error(cpath, 1, &h); e != nil {
		return nil, fmt.Errorf("onnxruntime: %s is not loaded: %s", abs, C.GoString(e))
	}
	// The handle stays open: the library stays loaded for the process
	// anyway, and the table lives in it.
	var why *C.char
	api := C.h3_ort_api(h, ortAPIVersion, &why)
	if api == nil {
		return nil, fmt.Errorf("onnxruntime: API version %d: %s", ortAPIVersion, C.GoString(why))
	}
	return &ortAPI{api: (*unsafe.Pointer)(unsafe.Pointer(api)), version: C.GoString(C.h3_ort_version(h))}, nil
}

func cErr(e *C.char) error {
	if e == nil {
		return nil
	}
	defer C.free(unsafe.Pointer(e))
	return errors.New(C.GoString(e))
}

// memoryInfo is an OrtMemoryInfo: where the runtime puts a bound output.
type memoryInfo struct{ p unsafe.Pointer }

// newMemoryInfo describes device memory of the named kind: "Cpu", "Cuda",
// "CudaPinned" (page-locked host memory the GPU copies to by DMA).
func (a *ortAPI) newMemoryInfo(name string, device int) (memoryInfo, error) {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	var p unsafe.Pointer
	if err := cErr(C.h3_create_memory_info(a.tab(), cname, C.int(device), &p)); err != nil {
		return memoryInfo{}, fmt.Errorf("memory info %s:%d: %w", name, device, err)
	}
	return memoryInfo{p}, nil
}

func (a *ortAPI) releaseMemoryInfo(m memoryInfo) {
	if m.p != nil {
		C.h3_release_memory_info(a.tab(), m.p)
	}
}

// tab is the table as the C helpers take it.
func (a *ortAPI) tab() *unsafe.Pointer { return a.api }

// epDevices counts the devices registered for the execution provider
// named ep (such as "CUDAExecutionProvider").
func (a *ortAPI) epDevices(ep string) (int, error) {
	cname := C.CString(ep)
	defer C.free(unsafe.Pointer(cname))
	var n C.size_t
	if err := cErr(C.h3_ep_devices(a.tab(), cname, nil, 0, nil, nil, 0, &n)); err != nil {
		return 0, err
	}
	return int(n), nil
}

// appendEPDevice appends provider ep on its ordinal-th device to so, with
// the provider's options; it reports how many devices ep has, so that a
// missing ordinal can be told apart from a failure.
func (a *ortAPI) appendEPDevice(so *onnxrt.SessionOptions, ep string, ordinal int, opts map[string]string) (int, error) {
	cname := C.CString(ep)
	defer C.free(unsafe.Pointer(cname))
	// The option strings live in C memory: C reads arrays of them.
	keys := C.malloc(C.size_t(len(opts)+1) * C.size_t(unsafe.Sizeof(uintptr(0))))
	vals := C.malloc(C.size_t(len(opts)+1) * C.size_t(unsafe.Sizeof(uintptr(0))))
	defer C.free(keys)
	defer C.free(vals)
	ks := unsafe.Slice((**C.char)(keys), len(opts)+1)
	vs := unsafe.Slice((**C.char)(vals), len(opts)+1)
	i := 0
	for k, v := range opts {
		ks[i], vs[i] = C.CString(k), C.CString(v)
		defer C.free(unsafe.Pointer(ks[i]))
		defer C.free(unsafe.Pointer(vs[i]))
		i++
	}
	// The OrtSessionOptions under onnxruntime_go's SessionOptions, its one
	// field in v1.27.
	cso := *(*unsafe.Pointer)(unsafe.Pointer(so))
	var n C.size_t
	err := cErr(C.h3_ep_devices(a.tab(), cname, cso, C.int(ordinal), (**C.char)(keys), (**C.char)(vals), C.size_t(len(opts)), &n))
	return int(n), err
}

// rawValue is an OrtValue the runtime allocated, possibly in device
// memory; release it exactly once.
type rawValue struct{ p unsafe.Pointer }

// bindingPtr is the OrtIoBinding under onnxruntime_go's IoBinding, a
// struct of that one pointer in v1.27.
func bindingPtr(b *onnxrt.IoBinding) unsafe.Pointer { return *(*unsafe.Pointer)(unsafe.Pointer(b)) }

func (a *ortAPI) bindInput(b *onnxrt.IoBinding, name string, v rawValue) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return cErr(C.h3_bind_input(a.tab(), bindingPtr(b), cname, v.p))
}

func (a *ortAPI) bindOutputTo(b *onnxrt.IoBinding, name string, m memoryInfo) error {
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return cErr(C.h3_bind_output_to_device(a.tab(), bindingPtr(b), cname, m.p))
}

// boundOutputs returns the values of the last RunWithBinding in the order
// the outputs were bound, without copying them out of their memory.
func (a *ortAPI) boundOutputs(b *onnxrt.IoBinding, want int) ([]rawValue, error) {
	ptrs := make([]unsafe.Pointer, want)
	var n C.size_t
	// ptrs holds no Go pointers, so C may write into it.
	if err := cErr(C.h3_bound_outputs(a.tab(), bindingPtr(b), (*unsafe.Pointer)(unsafe.Pointer(&ptrs[0])), C.size_t(want), &n)); err != nil {
		return nil, err
	}
	vals := make([]rawValue, 0, want)
	for i := 0; i < min(int(n), want); i++ {
		vals = append(vals, rawValue{ptrs[i]})
	}
	if int(n) != want {
		a.release(vals...)
		return nil, fmt.Errorf("binding returned %d outputs, want %d", n, want)
	}
	return vals, nil
}

func (a *ortAPI) release(vs ...rawValue) {
	for _, v := range vs {
		if v.p != nil {
			C.h3_release_value(a.tab(), v.p)
		}
	}
}

// tensor returns v's data pointer and shape.
func (a *ortAPI) tensor(v rawValue) (unsafe.Pointer, []int64, error) {
	var data unsafe.Pointer
	var dims [8]C.int64_t
	var n C.size_t
	if err := cErr(C.h3_tensor(a.tab(), v.p, &data, &dims[0], &n)); err != nil {
		return nil, nil, err
	}
	shape := make([]int64, int(n))
	for i := range shape {
		shape[i] = int64(dims[i])
	}
	return data, shape, nil
}

// cudaRuntime is libcudart, opened at run time for the copies that move a
// device-resident cache to the host.
type cudaRuntime struct{ memcpy unsafe.Pointer }

// loadCUDARuntime opens libcudart from the loader's search path; the name
// is the soname the CUDA provider links against.
func loadCUDARuntime(soname string) (*cudaRuntime, error) {
	cname := C.CString(soname)
	defer C.free(unsafe.Pointer(cname))
	var h unsafe.Pointer
	if e := C.h3_dlopen_error(cname, 0, &h); e != nil {
		return nil, errors.New(C.GoString(e))
	}
	sym := C.CString("cudaMemcpy")
	defer C.free(unsafe.Pointer(sym))
	fn := C.h3_dlsym(h, sym)
	if fn == nil {
		return nil, fmt.Errorf("%s has no cudaMemcpy", soname)
	}
	return &cudaRuntime{memcpy: fn}, nil
}

// toHost copies len(dst) bytes from src, in memory the runtime allocated
// (on the device when cuda is set), to dst.
func toHost(cuda *cudaRuntime, dst []byte, src unsafe.Pointer) error {
	if len(dst) == 0 {
		return nil
	}
	if cuda == nil {
		copy(dst, unsafe.Slice((*byte)(src), len(dst)))
		return nil
	}
	if rc := C.h3_call_memcpy(cuda.memcpy, unsafe.Pointer(&dst[0]), src, C.size_t(len(dst))); rc != 0 {
		return fmt.Errorf("cudaMemcpy to host: CUDA error %d", int(rc))
	}
	return nil
}

// releaseFreeMemory hands the memory the C allocator holds free, such as
// what a destroyed session's weights took, back to the system, which
// free alone does only for its largest blocks.
func releaseFreeMemory() { C.h3_trim() }
