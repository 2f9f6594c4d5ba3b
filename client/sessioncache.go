package client

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// DefaultSessionEntries bounds a SessionCache when OpenSessionCache is given
// no bound: one entry per server name, and a user talks to few gateways.
const DefaultSessionEntries = 32

// sessionMaxAge drops entries saved longer ago than any TLS 1.3 ticket may
// live (RFC 8446 section 4.6.1), so a file never keeps dead tickets forever.
const sessionMaxAge = 7 * 24 * time.Hour

// sessionFileVersion is written into the file; another version is ignored
// rather than misread.
const sessionFileVersion = 1

// SessionCache is a tls.ClientSessionCache kept in a file, so that a new
// process resumes the sessions an earlier one held and can send its first
// request in 0-RTT. Set it as Config.TLS.ClientSessionCache.
//
// Each state is stored as crypto/tls serialises it (SessionState.Bytes),
// extra data included: quic-go keeps the server's transport parameters
// there, and 0-RTT needs them.
//
// A ticket may carry 0-RTT once (the gateway refuses a second early use), so
// once Get has handed a ticket out its stored copy no longer offers early
// data; it can still resume. The server's next ticket replaces it.
//
// The file is written with mode 0600 through a temporary file and a rename,
// so a reader sees the old or the new file, never half of one. Processes
// sharing a file do not merge: the last to write wins, which costs at most
// a full handshake.
type SessionCache struct {
	path string
	max  int
	log  *slog.Logger

	mu      sync.Mutex
	entries []sessionEntry // most recently used last
	gen     uint64         // counts tickets Put
	changed chan struct{}  // closed and replaced by every Put of a ticket
}

type sessionEntry struct {
	Key    string    `json:"key"`
	Ticket []byte    `json:"ticket"`
	State  []byte    `json:"state"`
	Saved  time.Time `json:"saved"`
}

type sessionFile struct {
	Version int            `json:"version"`
	Entries []sessionEntry `json:"entries"`
}

// OpenSessionCache reads the cache at path, if there is one. A file that
// cannot be read or parsed is logged and ignored, not an error: it only
// costs a full handshake, and the next ticket overwrites it. max <= 0 means
// DefaultSessionEntries.
func OpenSessionCache(path string, max int, log *slog.Logger) *SessionCache {
	if max <= 0 {
		max = DefaultSessionEntries
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &SessionCache{path: path, max: max, log: log, changed: make(chan struct{})}
	s.entries = s.load()
	return s
}

func (s *SessionCache) load() []sessionEntry {
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		s.log.Warn("session cache unreadable; starting without resumption", "path", s.path, "err", err)
		return nil
	}
	var f sessionFile
	if err := json.Unmarshal(b, &f); err != nil {
		s.log.Warn("session cache corrupt; ignoring it, the next ticket replaces it", "path", s.path, "err", err)
		return nil
	}
	if f.Version != sessionFileVersion {
		s.log.Warn("session cache has an unknown version; ignoring it", "path", s.path, "version", f.Version)
		return nil
	}
	var keep []sessionEntry
	for _, e := range f.Entries {
		if e.Key == "" || time.Since(e.Saved) > sessionMaxAge {
			continue
		}
		if _, err := tls.ParseSessionState(e.State); err != nil {
			s.log.Warn("session cache entry corrupt; dropped", "path", s.path, "key", e.Key, "err", err)
			continue
		}
		keep = append(keep, e)
	}
	if len(keep) > s.max {
		keep = keep[len(keep)-s.max:]
	}
	return keep
}

// Get returns the session stored for key. A state that allowed 0-RTT is
// handed out as it is, and kept without early data, since the ticket is
// spent once offered.
func (s *SessionCache) Get(key string) (*tls.ClientSessionState, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i := s.find(key)
	if i < 0 {
		return nil, false
	}
	e := s.entries[i]
	state, err := tls.ParseSessionState(e.State)
	if err != nil {
		s.log.Warn("session cache entry corrupt; dropped", "key", key, "err", err)
		s.remove(i)
		s.save()
		return nil, false
	}
	cs, err := tls.NewResumptionState(e.Ticket, state)
	if err != nil {
		s.log.Warn("session cache entry unusable; dropped", "key", key, "err", err)
		s.remove(i)
		s.save()
		return nil, false
	}
	s.remove(i)
	if state.EarlyData {
		// A second state, so the one crypto/tls is about to read is not
		// changed under it.
		spent, err := tls.ParseSessionState(e.State)
		if err == nil {
			spent.EarlyData = false
			if b, err := spent.Bytes(); err == nil {
				e.State = b
			}
		}
	}
	s.entries = append(s.entries, e)
	s.save()
	return cs, true
}

// Put stores the session for key; a nil cs removes it.
func (s *SessionCache) Put(key string, cs *tls.ClientSessionState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if i := s.find(key); i >= 0 {
		s.remove(i)
	}
	if cs != nil {
		ticket, state, err := cs.ResumptionState()
		if err != nil || state == nil {
			s.log.Warn("session ticket not stored", "key", key, "err", err)
		} else if b, err := state.Bytes(); err != nil {
			s.log.Warn("session ticket not stored", "key", key, "err", err)
		} else {
			s.entries = append(s.entries, sessionEntry{Key: key, Ticket: ticket, State: b, Saved: time.Now()})
			if len(s.entries) > s.max {
				s.entries = s.entries[len(s.entries)-s.max:]
			}
			s.gen++
			close(s.changed)
			s.changed = make(chan struct{})
		}
	}
	s.save()
}

// Generation counts the tickets stored so far; pass it to WaitNewer.
func (s *SessionCache) Generation() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.gen
}

// WaitNewer waits, at most d, for a ticket stored after Generation returned
// gen, and reports whether one was. A server sends its next ticket once the
// handshake is confirmed, which for a short answer can be after the last
// token: a process about to exit waits here so the next one can resume.
func (s *SessionCache) WaitNewer(ctx context.Context, gen uint64, d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		s.mu.Lock()
		now, ch := s.gen, s.changed
		s.mu.Unlock()
		if now > gen {
			return true
		}
		select {
		case <-ch:
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

func (s *SessionCache) find(key string) int {
	for i, e := range s.entries {
		if e.Key == key {
			return i
		}
	}
	return -1
}

func (s *SessionCache) remove(i int) {
	s.entries = append(s.entries[:i], s.entries[i+1:]...)
}

// save writes the entries; a failure is logged, since it costs only the
// next process's resumption. Called with s.mu held.
func (s *SessionCache) save() {
	if err := s.write(); err != nil {
		s.log.Warn("session cache not saved", "path", s.path, "err", err)
	}
}

func (s *SessionCache) write() error {
	b, err := json.Marshal(sessionFile{Version: sessionFileVersion, Entries: s.entries})
	if err != nil {
		return err
	}
	dir := filepath.Dir(s.path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	tmp, err := os.CreateTemp(dir, filepath.Base(s.path)+".tmp*")
	if err != nil {
		return err
	}
	// CreateTemp makes the file 0600 already; Chmod says so whatever the
	// platform does.
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		os.Remove(tmp.Name())
		return err
	}
	if err := tmp.Close(); err != nil {
		os.Remove(tmp.Name())
		return err
	}
	if err := os.Rename(tmp.Name(), s.path); err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("renaming into %s: %w", s.path, err)
	}
	return nil
}
