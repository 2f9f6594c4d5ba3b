package workerpool

import (
	"fmt"
	"os"

	"h3infer/workerconf"
)

// versionBytes estimates the host memory a model version in dir takes in
// workers worker processes. ONNX Runtime reads model.onnx into each
// worker, so it counts once per worker; the other files (model.onnx.data
// above all) are mapped from the page cache and shared by every worker,
// so they count once. A directory that is not one (the synthetic model)
// takes nothing.
func versionBytes(dir string, workers int) int64 {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0
	}
	var n int64
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() {
			continue
		}
		if e.Name() == workerconf.ModelFile {
			n += info.Size() * int64(workers)
		} else {
			n += info.Size()
		}
	}
	return n
}

// memoryNeed is what the workers' models would take with extraDir loaded
// beside every version loaded now, old versions still draining included:
// the estimate of each (versionBytes) and every worker's KV-cache budget.
// r.mu held.
func (r *Registry) memoryNeed(extraDir string) int64 {
	w := max(r.cfg.Workers, 1)
	need := int64(w) * r.cfg.KVCacheBytes
	if extraDir != "" {
		need += versionBytes(extraDir, w)
	}
	for _, f := range r.models {
		for _, v := range f.versions {
			need += versionBytes(v.dir, w)
		}
	}
	return need
}

// checkMemory refuses a load of dir that would take the workers' models
// past RegistryConfig.MemoryLimit; r.mu held.
func (r *Registry) checkMemory(dir string) error {
	if r.cfg.MemoryLimit == 0 {
		return nil
	}
	if need := r.memoryNeed(dir); need > r.cfg.MemoryLimit {
		return fmt.Errorf("needs about %d MiB of memory with the versions loaded now (%d MiB of it this one's), more than model_repository.memory_limit_bytes %d MiB",
			need>>20, versionBytes(dir, max(r.cfg.Workers, 1))>>20, r.cfg.MemoryLimit>>20)
	}
	return nil
}
