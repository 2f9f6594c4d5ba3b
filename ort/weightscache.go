package ort

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	onnxrt "github.com/yalue/onnxruntime_go"
)

// The prepacked weights cache.
//
// A cache entry is the model as ONNX Runtime itself writes it once it has
// optimized the graph and prepacked the weights: model.onnx and one data
// file, weights.data, which holds every initializer of at least
// entryMinExternal bytes in its original layout and, after them, the
// prepacked form of each weight a kernel repacked
// (session.save_external_prepacked_constant_initializers). A session made
// from the entry with prepacking on maps the prepacked blobs from that
// file instead of allocating them, so the workers of a model share the
// packed weights in the page cache as they share the plain ones, and
// decode at the speed of the packed layout.
//
// The packed layout is MLAS's for the CPU it ran on and the graph is
// ONNX Runtime's for its version, so an entry is good only on the host
// and runtime that built it: its name is a hash of everything that
// decides its bytes (cacheKey). The first worker that misses builds it
// while holding a lock on <key>.lock, so workers of one model that start
// together build it once and the others wait for it and then map it; the
// build goes into a temporary directory that is renamed into place only
// once its files are on disk, so an entry that exists is complete. A
// build first removes the entries no model will load again (prune), so
// that a model updated in place, or removed, does not leave twice its
// weights on disk for good.
//
// Nothing here fails a load: a cache that cannot be used, an entry that
// is damaged or a build that fails is logged, and the model is loaded
// from its own files, mapped without prepacking, as without a cache.
//
// An entry is a model ONNX Runtime will parse and run, as trusted as the
// model directories the operator configures. The cache directory is made
// 0700, and a directory or entry that is not the worker user's own, or
// that group or others may write, is refused (docs/SECURITY.md). An
// entry is checked and loaded through one open descriptor, since the
// directories above the cache may be writable by others.

// Session config entries that make a session write the optimized model
// beside its prepacked weights (onnxruntime_session_options_config_keys.h).
const (
	configOptimizedDataFile   = "session.optimized_model_external_initializers_file_name"
	configOptimizedMinExtSize = "session.optimized_model_external_initializers_min_size_in_bytes"
	configSavePrepacked       = "session.save_external_prepacked_constant_initializers"
)

// Files of a cache entry.
const (
	entryModel    = "model.onnx"
	entryData     = "weights.data"
	entryManifest = "manifest.json"
	// entryMinExternal: smaller initializers (norms, biases) stay inside
	// model.onnx, as exporters leave them.
	entryMinExternal = 1024
)

// cacheRecipe names how an entry is made and loaded: the options of
// writeEntry and newSessionOptions that shape the saved graph (the CPU
// provider, ONNX Runtime's default optimization level) and the entry's
// layout. Change it when they change, so that old entries stop matching.
// The intra-op thread count is not part of it: it does not change the
// graph or the packed layout.
const cacheRecipe = "h3infer prepacked weights v1: cpu, default optimization level"

// weightsCache is a directory of prepacked entries.
type weightsCache struct {
	dir string
	log *slog.Logger
}

// errCacheUnsafe is a cache directory or entry the worker refuses to
// trust.
var errCacheUnsafe = errors.New("not safe to load")

// manifest is what an entry records about itself: the sizes its files
// were written with, checked on every load so that a truncated or
// replaced file is noticed before ONNX Runtime maps it, and, for whoever
// looks into the directory, what it was built from.
type manifest struct {
	Source    string           `json:"source"`
	Runtime   string           `json:"onnxruntime"`
	CPU       string           `json:"cpu"`
	BuiltAt   time.Time        `json:"built_at"`
	BuildTime string           `json:"build_time"`
	Files     map[string]int64 `json:"files"`
}

// session returns a session of the model in dir with its weights
// prepacked and mapped from the cache, building the entry when missing.
// newOptions makes the session options the model runs with (provider,
// threads); this adds the rest. built reports whether this call built
// the entry.
func (c weightsCache) session(dir string, newOptions func() (*onnxrt.SessionOptions, error), inNames, outNames []string) (s *onnxrt.DynamicAdvancedSession, built bool, err error) {
	if err := c.ensureDir(); err != nil {
		return nil, false, err
	}
	key, cpu, abs, err := cacheKey(dir)
	if err != nil {
		return nil, false, err
	}
	entry := filepath.Join(c.dir, key)
	d, seen, err := openEntry(entry)
	if errors.Is(err, os.ErrNotExist) {
		if built, err = c.build(abs, entry, cpu, newOptions, inNames, outNames); err != nil {
			return nil, false, err
		}
		d, seen, err = openEntry(entry)
	}
	if err != nil {
		return nil, built, c.discard(entry, seen, err)
	}
	defer d.Close()
	so, err := newOptions()
	if err != nil {
		return nil, built, err
	}
	defer so.Destroy()
	// Loading still runs each kernel's packing into a temporary buffer,
	// which it drops for the mapped blob; an arena would keep the
	// largest of those buffers for the session's life, and decodes no
	// faster for it (docs/BENCHMARKS.md).
	if err := so.SetCpuMemArena(false); err != nil {
		return nil, built, fmt.Errorf("cpu arena: %w", err)
	}
	s, err = onnxrt.NewDynamicAdvancedSession(filepath.Join(fdPath(d), entryModel), inNames, outNames, so)
	releaseFreeMemory()
	if err != nil {
		return nil, built, c.discard(entry, seen, fmt.Errorf("entry %s: %w", entry, err))
	}
	return s, built, nil
}

// ensureDir makes the cache directory, 0700, and refuses one that is
// not the worker user's own or that group or others may write: whoever
// can write there can plant a model.
func (c weightsCache) ensureDir() error {
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return err
	}
	info, err := os.Stat(c.dir)
	if err != nil {
		return err
	}
	if !info.IsDir() {
		return fmt.Errorf("%s: not a directory", c.dir)
	}
	return ownedAndPrivate(c.dir, info)
}

// ownedAndPrivate refuses a file or directory that is not the worker
// user's own or that group or others may write.
func ownedAndPrivate(path string, info os.FileInfo) error {
	st, ok := info.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("%s: no owner to check: %w", path, errCacheUnsafe)
	}
	if int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%s: owned by uid %d, not this worker's %d: %w", path, st.Uid, os.Geteuid(), errCacheUnsafe)
	}
	if info.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%s: mode %v lets group or others write: %w", path, info.Mode().Perm(), errCacheUnsafe)
	}
	return nil
}

// openEntry opens the entry at path (os.ErrNotExist if there is none)
// and checks that it is the worker user's own and private, and that its
// files have the sizes its manifest recorded. It returns the open
// directory, through which (fdPath) the caller has ONNX Runtime load the
// entry: the checks and the load then see the same directory, whatever
// is renamed over path or over the directories above it meanwhile. It
// also returns what it found at path, if anything, so that discard can
// tell the entry from a later one.
func openEntry(path string) (*os.File, os.FileInfo, error) {
	info, err := os.Lstat(path)
	if err != nil {
		return nil, nil, err
	}
	if !info.IsDir() {
		return nil, info, fmt.Errorf("entry %s: not a directory: %w", path, errCacheUnsafe)
	}
	d, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		// Not os.ErrNotExist, which is for a missing entry: removed
		// since the Lstat, it is for discard to tell apart.
		return nil, info, fmt.Errorf("entry %s: %v", path, err)
	}
	opened, err := d.Stat()
	if err == nil && !os.SameFile(info, opened) {
		err = fmt.Errorf("entry %s: replaced while it was opened: %w", path, errCacheUnsafe)
	}
	if err == nil {
		err = checkEntry(path, d, opened)
	}
	if err != nil {
		d.Close()
		return nil, info, err
	}
	return d, info, nil
}

// checkEntry checks the entry at path, open as d and found to be info.
func checkEntry(path string, d *os.File, info os.FileInfo) error {
	if err := ownedAndPrivate(path, info); err != nil {
		return err
	}
	at := fdPath(d)
	sizes := map[string]int64{}
	for _, name := range []string{entryModel, entryData, entryManifest} {
		f := filepath.Join(path, name)
		fi, err := os.Lstat(filepath.Join(at, name))
		if err != nil {
			return fmt.Errorf("entry %s: %s: %v", path, name, err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("%s: not a regular file: %w", f, errCacheUnsafe)
		}
		if err := ownedAndPrivate(f, fi); err != nil {
			return err
		}
		sizes[name] = fi.Size()
	}
	mf, err := os.ReadFile(filepath.Join(at, entryManifest))
	if err != nil {
		return fmt.Errorf("entry %s: %s: %v", path, entryManifest, err)
	}
	var m manifest
	if err := json.Unmarshal(mf, &m); err != nil {
		return fmt.Errorf("entry %s: %s: %w", path, entryManifest, err)
	}
	for _, name := range []string{entryModel, entryData} {
		if want, ok := m.Files[name]; !ok || want != sizes[name] {
			return fmt.Errorf("%s: %d bytes, the manifest says %d", filepath.Join(path, name), sizes[name], want)
		}
	}
	return nil
}

// fdPath names the directory open as d, whatever its name is now; a
// path under it resolves within that directory.
func fdPath(d *os.File) string { return "/proc/self/fd/" + strconv.Itoa(int(d.Fd())) }

// discard removes a damaged entry, the one openEntry saw as seen, so
// that the next worker to start builds it again, and returns why. An
// entry that is not safe to load is left alone: it is someone else's to
// look into. The removal holds the entry's lock and removes only the
// entry that was seen, never a fresh one another worker has put in its
// place meanwhile.
func (c weightsCache) discard(entry string, seen os.FileInfo, why error) error {
	if seen == nil || errors.Is(why, errCacheUnsafe) {
		return why
	}
	unlock, err := lockFile(entry + ".lock")
	if err != nil {
		return errors.Join(why, err)
	}
	defer unlock()
	if now, err := os.Lstat(entry); err != nil || !os.SameFile(now, seen) {
		return why
	}
	if err := os.RemoveAll(entry); err != nil {
		return errors.Join(why, fmt.Errorf("remove the damaged entry: %w", err))
	}
	return fmt.Errorf("%w (entry removed; the next load builds it again)", why)
}

// prune removes the entries that no model will load again: those built
// from the model directory dir (a resolved path) before its files
// changed, or by another ONNX Runtime or CPU, and those whose model
// directory is gone. Each takes about twice its model's weights on disk,
// and nothing else would ever remove them. It runs before a build, so
// the space they held counts for it. An entry is removed only under its
// lock, taken without waiting, so never while a worker builds it; a
// worker that has mapped one keeps its pages. Entries it cannot read
// are left alone.
func (c weightsCache) prune(dir, keep string) {
	names, err := os.ReadDir(c.dir)
	if err != nil {
		return
	}
	for _, e := range names {
		name := e.Name()
		if name == keep || !e.IsDir() || !isEntryName(name) {
			continue
		}
		entry := filepath.Join(c.dir, name)
		source, ok := entrySource(entry)
		if !ok {
			continue
		}
		if _, err := os.Stat(source); source != dir && !errors.Is(err, os.ErrNotExist) {
			continue
		}
		unlock, err := tryLockFile(entry + ".lock")
		if err != nil {
			continue
		}
		if err := os.RemoveAll(entry); err == nil {
			c.log.Info("prepacked weights cache: removed an entry no model will load", "entry", entry, "model_dir", source)
		}
		unlock()
	}
}

// isEntryName reports whether name is one cacheKey makes: 32 lowercase
// hex digits.
func isEntryName(name string) bool {
	if len(name) != 32 {
		return false
	}
	_, err := hex.DecodeString(name)
	return err == nil && strings.ToLower(name) == name
}

// entrySource reads the model directory an entry was built from out of
// its manifest, if the entry is the worker user's own and private.
func entrySource(entry string) (string, bool) {
	d, info, err := openEntry(entry)
	if err != nil || info == nil {
		return "", false
	}
	defer d.Close()
	mf, err := os.ReadFile(filepath.Join(fdPath(d), entryManifest))
	if err != nil {
		return "", false
	}
	var m manifest
	if json.Unmarshal(mf, &m) != nil || !filepath.IsAbs(m.Source) {
		return "", false
	}
	return m.Source, true
}

// resolvedDir is dir as an absolute path with no symbolic links.
func resolvedDir(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", err
	}
	return filepath.EvalSymlinks(abs)
}

// build writes the entry for the model in dir (a resolved path), unless
// another worker did while this one waited for the lock; built reports
// whether this one did.
func (c weightsCache) build(dir, entry, cpu string, newOptions func() (*onnxrt.SessionOptions, error), inNames, outNames []string) (built bool, err error) {
	unlock, err := lockFile(entry + ".lock")
	if err != nil {
		return false, err
	}
	defer unlock()
	if _, err := os.Lstat(entry); err == nil {
		// Built by another worker while this one waited; the caller
		// checks it.
		return false, nil
	}
	// What a worker that died while building left behind: nobody else
	// builds this entry while the lock is held.
	stale, _ := filepath.Glob(filepath.Join(c.dir, ".build-"+filepath.Base(entry)+"-*"))
	for _, s := range stale {
		os.RemoveAll(s)
	}
	c.prune(dir, filepath.Base(entry))
	if err := checkDiskSpace(c.dir, dir); err != nil {
		return false, err
	}
	tmp, err := os.MkdirTemp(c.dir, ".build-"+filepath.Base(entry)+"-")
	if err != nil {
		return false, err
	}
	defer os.RemoveAll(tmp) // a no-op once renamed
	start := time.Now()
	if err := writeEntry(dir, tmp, newOptions, inNames, outNames); err != nil {
		return false, fmt.Errorf("build: %w", err)
	}
	took := time.Since(start)
	m := manifest{Source: dir, Runtime: onnxrt.GetVersion(), CPU: cpu, BuiltAt: start.UTC(), BuildTime: took.Round(time.Millisecond).String(), Files: map[string]int64{}}
	for _, name := range []string{entryModel, entryData} {
		info, err := os.Stat(filepath.Join(tmp, name))
		if err != nil {
			// A graph with nothing large enough to keep outside model.onnx
			// writes no data file: such a model has nothing to share.
			return false, fmt.Errorf("build: %w", err)
		}
		m.Files[name] = info.Size()
	}
	mf, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return false, err
	}
	if err := os.WriteFile(filepath.Join(tmp, entryManifest), mf, 0o600); err != nil {
		return false, err
	}
	for _, name := range []string{entryModel, entryData, entryManifest, ""} {
		if err := syncPath(filepath.Join(tmp, name)); err != nil {
			return false, fmt.Errorf("build: %w", err)
		}
	}
	if err := os.Rename(tmp, entry); err != nil {
		return false, err
	}
	if err := syncPath(c.dir); err != nil {
		return false, err
	}
	c.log.Info("prepacked weights cache: built an entry", "model_dir", dir, "entry", entry,
		"bytes", m.Files[entryModel]+m.Files[entryData], "build_ms", took.Milliseconds())
	return true, nil
}

// writeEntry has ONNX Runtime optimize the model in dir, prepack its
// weights and write both into out. The session it takes for that holds
// the packed weights in memory of its own until it is destroyed, as a
// session without the cache would; the memory goes back once it is.
func writeEntry(dir, out string, newOptions func() (*onnxrt.SessionOptions, error), inNames, outNames []string) error {
	so, err := newOptions()
	if err != nil {
		return err
	}
	defer so.Destroy()
	if err := so.SetOptimizedModelFilePath(filepath.Join(out, entryModel)); err != nil {
		return fmt.Errorf("optimized model path: %w", err)
	}
	for k, v := range map[string]string{
		configOptimizedDataFile:   entryData,
		configOptimizedMinExtSize: strconv.Itoa(entryMinExternal),
		configSavePrepacked:       "1",
	} {
		if err := so.AddSessionConfigEntry(k, v); err != nil {
			return fmt.Errorf("session config %s: %w", k, err)
		}
	}
	s, err := onnxrt.NewDynamicAdvancedSession(filepath.Join(dir, modelFile), inNames, outNames, so)
	if err != nil {
		return err
	}
	err = s.Destroy()
	releaseFreeMemory()
	return err
}

// cacheKey names the entry of the model in dir: a hash of the recipe,
// ONNX Runtime's version, the CPU, the model directory's resolved path,
// the content of model.onnx and the name, size and modification time of
// each external data file. The path keeps two models apart whose graph
// and data sizes are one (a fine-tune and its base) and whose data files'
// times are too, as copies, archives and image builds that carry or
// normalize times leave them. The data files are not hashed: reading a
// model's gigabytes at every worker start would cost more than the load
// it speeds up (docs/BENCHMARKS.md), and a file rewritten in place keeps
// its size and modification time only if the writer sets them back. It
// also returns the CPU's description and the resolved path.
func cacheKey(dir string) (key, cpu, abs string, err error) {
	cpu, err = cpuIdentity()
	if err != nil {
		return "", "", "", err
	}
	if abs, err = resolvedDir(dir); err != nil {
		return "", "", "", err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\nonnxruntime %s\ncpu %s\ndir %q\n", cacheRecipe, onnxrt.GetVersion(), cpu, abs)
	f, err := os.Open(filepath.Join(dir, modelFile))
	if err != nil {
		return "", "", "", err
	}
	defer f.Close()
	fmt.Fprintf(h, "%s ", modelFile)
	if _, err := io.Copy(h, f); err != nil {
		return "", "", "", err
	}
	files := externalDataFiles(dir)
	slices.Sort(files)
	for _, name := range files {
		info, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return "", "", "", err
		}
		fmt.Fprintf(h, "\n%s %d %d", name, info.Size(), info.ModTime().UnixNano())
	}
	return hex.EncodeToString(h.Sum(nil)[:16]), cpu, abs, nil
}

// cpuIdentity describes the CPU as the kernels MLAS picks see it: the
// architecture and, from the first processor in /proc/cpuinfo, its
// vendor, family, model and feature flags (on x86 flags, on arm64
// Features and the part numbers).
func cpuIdentity() (string, error) {
	data, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "", fmt.Errorf("cpu: %w", err)
	}
	first, _, _ := bytes.Cut(data, []byte("\n\n"))
	var parts []string
	sc := bufio.NewScanner(bytes.NewReader(first))
	sc.Buffer(nil, len(first)+1)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch k {
		case "vendor_id", "cpu family", "model", "model name", "flags",
			"Features", "CPU implementer", "CPU architecture", "CPU variant", "CPU part":
			parts = append(parts, k+"="+v)
		}
	}
	if len(parts) == 0 {
		return "", errors.New("cpu: /proc/cpuinfo names no model or features")
	}
	return runtime.GOARCH + " " + strings.Join(parts, "; "), nil
}

// checkDiskSpace refuses a build that would leave the cache's file
// system with less than 1 GiB or 5% of it free, whichever is less: an
// entry takes about twice the model's weights (the originals and the
// packed copies).
func checkDiskSpace(cacheDir, modelDir string) error {
	var need int64
	for _, name := range append(externalDataFiles(modelDir), modelFile) {
		if info, err := os.Stat(filepath.Join(modelDir, name)); err == nil {
			need += 2 * info.Size()
		}
	}
	var st syscall.Statfs_t
	if err := syscall.Statfs(cacheDir, &st); err != nil {
		return err
	}
	free := int64(st.Bavail) * st.Bsize
	keep := min(int64(st.Blocks)*st.Bsize/20, 1<<30)
	if free-need < keep {
		return fmt.Errorf("build: an entry needs about %d bytes, and %s has %d free", need, cacheDir, free)
	}
	return nil
}

// lockFile takes an exclusive flock on path, creating it, and returns
// its release. The kernel releases it too when the process dies, so a
// worker killed mid-build leaves no lock behind.
func lockFile(path string) (func(), error) { return flockFile(path, syscall.LOCK_EX) }

// tryLockFile is lockFile without waiting: it fails at once if another
// holds the lock.
func tryLockFile(path string) (func(), error) {
	return flockFile(path, syscall.LOCK_EX|syscall.LOCK_NB)
}

func flockFile(path string, how int) (func(), error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return func() { f.Close() }, nil
}

// syncPath flushes a file or directory to disk.
func syncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}
