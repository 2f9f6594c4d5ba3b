// Package qlogdir writes quic-go's qlog traces into a directory, one file
// per connection, for `h3infer serve --qlog` and `h3infer bench --qlog`:
// how a slow or stalled run looked to each end's loss recovery, congestion
// controller and flow control (docs/BENCHMARKS.md, scenario 2, reads one).
//
// What a trace holds, and what it does not (docs/SECURITY.md): the value of
// every HTTP/3 header field is redacted except the few named in keep, so
// bearer tokens, binding and early proofs, cookies and whatever else a
// client sends in a header never reach the file, and a path keeps its
// query string out. Packet and frame metadata stay: addresses, connection
// IDs, stateless reset tokens and address-validation tokens, which an
// operator debugging a path needs or which only matter to someone already
// able to read the server's files. Files are created 0600 in a directory
// of mode 0700.
package qlogdir

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/quic-go/quic-go"
	h3qlog "github.com/quic-go/quic-go/http3/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
)

// Tracer is the type of quic.Config.Tracer.
type Tracer = func(ctx context.Context, isClient bool, connID quic.ConnectionID) qlogwriter.Trace

// Redacted replaces a header value the trace does not keep.
const Redacted = "[redacted]"

// keep lists the header fields whose values a trace shows: what a
// transport question needs (the request's shape, its priority, early
// data, the answer's status and pacing) and nothing a client could use
// to carry a secret it did not mean to log.
var keep = map[string]bool{
	":method": true, ":scheme": true, ":status": true, ":protocol": true,
	"Content-Type": true, "Content-Length": true, "Content-Encoding": true,
	"Accept": true, "Accept-Encoding": true, "Cache-Control": true,
	"Priority": true, "Early-Data": true, "Retry-After": true, "Alt-Svc": true,
	"H3infer-Early-Data": true, "H3infer-Model-Version": true,
}

// redact is the header redaction RedactHeaders applies: kept fields keep
// their value, a path loses its query string, everything else is
// Redacted.
func redact(name, value string) string {
	switch {
	case keep[name]:
		return value
	case name == ":path":
		if i := strings.IndexByte(value, '?'); i >= 0 {
			return value[:i] + "?" + Redacted
		}
		return value
	}
	return Redacted
}

// New returns a tracer writing each connection's qlog to dir as
// ODCID_server.sqlog or ODCID_client.sqlog, creating dir if needed. A file
// that cannot be created is logged and the connection goes on untraced.
func New(dir string, log *slog.Logger) (Tracer, error) {
	if dir == "" {
		return nil, errors.New("qlog: no directory")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("qlog: %w", err)
	}
	trace := func(_ context.Context, isClient bool, odcid quic.ConnectionID) qlogwriter.Trace {
		side := "server"
		if isClient {
			side = "client"
		}
		path := filepath.Join(dir, fmt.Sprintf("%s_%s.sqlog", odcid, side))
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
		if err != nil {
			log.Warn("qlog: connection not traced", "err", err)
			return nil
		}
		seq := qlogwriter.NewConnectionFileSeq(&bufferedFile{Writer: bufio.NewWriter(f), f: f}, isClient, odcid)
		go seq.Run()
		return seq
	}
	return h3qlog.RedactHeaders(trace, redact), nil
}

// bufferedFile buffers a trace's writes and flushes them when the trace
// closes with its connection.
type bufferedFile struct {
	*bufio.Writer
	f *os.File
}

func (b *bufferedFile) Close() error {
	return errors.Join(b.Flush(), b.f.Close())
}
