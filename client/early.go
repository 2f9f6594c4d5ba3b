package client

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	"github.com/quic-go/qpack"
	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/quicvarint"
)

// http3's ClientConn sends only GET and HEAD in 0-RTT, and its
// RequestStream cannot announce a body length, so an early POST is written
// here as frames on a raw stream: HEADERS, DATA, FIN (RFC 9114 section 7).
const (
	frameData    = 0x0
	frameHeaders = 0x1
	// maxResponseHeader bounds a response HEADERS frame we will read.
	maxResponseHeader = 64 << 10
)

func writeEarlyRequest(str *quic.Stream, req *http.Request, body []byte) error {
	var hb bytes.Buffer
	enc := qpack.NewEncoder(&hb)
	fields := []qpack.HeaderField{
		{Name: ":method", Value: req.Method},
		{Name: ":scheme", Value: "https"},
		{Name: ":authority", Value: req.URL.Host},
		{Name: ":path", Value: req.URL.RequestURI()},
		{Name: "content-length", Value: strconv.Itoa(len(body))},
	}
	for k, vs := range req.Header {
		for _, v := range vs {
			fields = append(fields, qpack.HeaderField{Name: strings.ToLower(k), Value: v})
		}
	}
	for _, f := range fields {
		if err := enc.WriteField(f); err != nil {
			return err
		}
	}
	var b []byte
	b = quicvarint.Append(b, frameHeaders)
	b = quicvarint.Append(b, uint64(hb.Len()))
	b = append(b, hb.Bytes()...)
	if len(body) > 0 {
		b = quicvarint.Append(b, frameData)
		b = quicvarint.Append(b, uint64(len(body)))
		b = append(b, body...)
	}
	if _, err := str.Write(b); err != nil {
		return err
	}
	return str.Close()
}

// readEarlyResponse reads the response HEADERS and returns a response whose
// body yields the DATA frames' payloads.
func readEarlyResponse(str *quic.Stream) (*http.Response, error) {
	br := bufio.NewReader(str)
	for {
		typ, payload, err := readFrameHeader(br)
		if err != nil {
			return nil, fmt.Errorf("early response: %w", err)
		}
		if typ != frameHeaders {
			// Unknown frame types are skipped (RFC 9114 section 9).
			if _, err := io.CopyN(io.Discard, br, int64(payload)); err != nil {
				return nil, err
			}
			continue
		}
		if payload > maxResponseHeader {
			return nil, errors.New("early response: header too large")
		}
		hb := make([]byte, payload)
		if _, err := io.ReadFull(br, hb); err != nil {
			return nil, err
		}
		resp := &http.Response{Proto: "HTTP/3.0", ProtoMajor: 3, Header: http.Header{}}
		next := qpack.NewDecoder().Decode(hb)
		for {
			f, err := next()
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, fmt.Errorf("early response header: %w", err)
			}
			if f.Name == ":status" {
				resp.StatusCode, _ = strconv.Atoi(f.Value)
				resp.Status = f.Value + " " + http.StatusText(resp.StatusCode)
				continue
			}
			resp.Header.Add(f.Name, f.Value)
		}
		if resp.StatusCode == 0 {
			return nil, errors.New("early response: no :status")
		}
		resp.Body = &dataReader{br: br, str: str}
		return resp, nil
	}
}

func readFrameHeader(br *bufio.Reader) (typ, length uint64, err error) {
	if typ, err = quicvarint.Read(br); err != nil {
		return 0, 0, err
	}
	length, err = quicvarint.Read(br)
	return typ, length, err
}

// dataReader yields DATA payloads until the stream ends.
type dataReader struct {
	br        *bufio.Reader
	str       *quic.Stream
	remaining uint64
}

func (d *dataReader) Read(p []byte) (int, error) {
	for d.remaining == 0 {
		typ, n, err := readFrameHeader(d.br)
		if err != nil {
			return 0, err
		}
		if typ != frameData {
			if _, err := io.CopyN(io.Discard, d.br, int64(n)); err != nil {
				return 0, err
			}
			continue
		}
		d.remaining = n
	}
	if uint64(len(p)) > d.remaining {
		p = p[:d.remaining]
	}
	n, err := d.br.Read(p)
	d.remaining -= uint64(n)
	if err == io.EOF && d.remaining > 0 {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (d *dataReader) Close() error {
	d.str.CancelRead(0x10c) // H3_REQUEST_CANCELLED, harmless after the end
	return nil
}
