package gateway

import (
	"net/http"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// The SSE writer: how a streamed completion's bytes reach the client over
// HTTP/3, with the request's QUIC priority, and over TCP.

// sseOutput returns how the stream writes one flushed chunk and how it
// ends. Over HTTP/3 it takes the stream over from http3's response writer
// (after the header went out) to set the stream's QUIC priority, which the
// ResponseWriter API has no way to do; quic-go keeps applying the client's
// PRIORITY_UPDATE frames to the stream afterwards. Each Write there is one
// DATA frame. Over TCP each chunk is written and flushed.
func sseOutput(w http.ResponseWriter, prio priority) (out func([]byte) error, finish func(clean bool), err error) {
	for rw := w; rw != nil; {
		if hs, ok := rw.(http3.HTTPStreamer); ok {
			str, err := hs.HTTPStream()
			if err != nil {
				return nil, nil, err
			}
			str.SetPriority(int8(prio.urgency), prio.streamIncremental())
			out = func(b []byte) error {
				_, err := str.Write(b)
				return err
			}
			finish = func(clean bool) {
				if clean {
					str.Close()
					return
				}
				str.CancelWrite(quic.StreamErrorCode(http3.ErrCodeRequestCanceled))
			}
			return out, finish, nil
		}
		u, ok := rw.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		rw = u.Unwrap()
	}
	rc := http.NewResponseController(w)
	out = func(b []byte) error {
		if _, err := w.Write(b); err != nil {
			return err
		}
		return rc.Flush()
	}
	return out, func(bool) {}, nil
}
