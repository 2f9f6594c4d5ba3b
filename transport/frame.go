package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"math"

	"h3infer/infer"
	"h3infer/priority"
)

// FrameType says what a frame's payload holds.
type FrameType uint8

// Frame types. Values are part of the wire format between a gateway and
// worker built from the same source.
const (
	FrameSubmit    FrameType = 1 // gateway → worker: infer.Request
	FrameCancel    FrameType = 2 // gateway → worker: empty payload
	FrameToken     FrameType = 3 // worker → gateway: infer.Token
	FrameDone      FrameType = 4 // worker → gateway: infer.Done
	FrameError     FrameType = 5 // worker → gateway: infer.Error
	FrameHeartbeat FrameType = 6 // either way, ID 0: empty payload
	FrameReady     FrameType = 7 // worker → gateway, ID 0: Ready
	FrameStats     FrameType = 8 // worker → gateway, ID 0: Stats
	// FrameControl asks a worker to load or unload a model; the worker
	// answers on the same ID with FrameDone (FinishReason "ok") or
	// FrameError, so a control request is a Call like any other.
	FrameControl FrameType = 9 // gateway → worker: Control
	// FrameEmbed asks for the vectors of an embedding request (an
	// infer.Request whose Embed is set); the worker answers with
	// FrameEmbedding frames, then FrameDone or FrameError (embed.go).
	FrameEmbed     FrameType = 10 // gateway → worker: infer.Request with Embed
	FrameEmbedding FrameType = 11 // worker → gateway: infer.Embedding

	maxFrameType = FrameEmbedding
)

var frameTypeNames = [...]string{
	FrameSubmit:    "submit",
	FrameCancel:    "cancel",
	FrameToken:     "token",
	FrameDone:      "done",
	FrameError:     "error",
	FrameHeartbeat: "heartbeat",
	FrameReady:     "ready",
	FrameStats:     "stats",
	FrameControl:   "control",
	FrameEmbed:     "embed",
	FrameEmbedding: "embedding",
}

func (t FrameType) String() string {
	if t != 0 && t <= maxFrameType {
		return frameTypeNames[t]
	}
	return fmt.Sprintf("frame(%d)", uint8(t))
}

// Frame is one message on a ring. ID is the request id, 0 for worker-level
// frames (ready, stats, heartbeat).
type Frame struct {
	Type    FrameType
	ID      uint64
	Payload []byte
}

// The frame header, shared by the ring records and AppendFrame:
//
//	0  length   uint32 little-endian, payload bytes
//	4  type     uint8
//	5  magic    uint8, frameMagic: the frame format's version
//	6  reserved 2 bytes, zero
//	8  id       uint64 little-endian
//	16 check    uint32 little-endian, CRC-32C of bytes 0-15 and the payload
//	20 reserved 4 bytes, zero
//
// The ring's shared memory is writable by the worker, so every frame the
// gateway reads is checked as if a stranger wrote it: a crashed or buggy
// worker that leaves half a record, or scribbles over the ring, is caught by
// the magic, the length bounds or the checksum, and the ring is declared
// corrupt instead of being misread. CRC-32C runs in hardware on amd64 and
// arm64 (about 20 ns for a 64-byte frame here), cheap beside the doorbell.
const (
	frameHeaderSize = 24
	frameMagic      = 0xb3
	checkedHeader   = 16 // bytes of the header the check covers
)

// castagnoli is the CRC-32C table; crc32 uses the CPU's instruction with it.
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// ErrMalformed is wrapped by every decoding error.
var ErrMalformed = errors.New("transport: malformed")

// putFrameHeader writes the header without its check; sealFrame adds it once
// the payload follows the header.
func putFrameHeader(b []byte, length uint32, typ FrameType, id uint64) {
	_ = b[frameHeaderSize-1]
	binary.LittleEndian.PutUint32(b, length)
	b[4], b[5], b[6], b[7] = byte(typ), frameMagic, 0, 0
	binary.LittleEndian.PutUint64(b[8:], id)
	binary.LittleEndian.PutUint64(b[16:], 0)
}

// frameCheck is the CRC-32C of a header's first 16 bytes and the payload.
func frameCheck(h, payload []byte) uint32 {
	return crc32.Update(crc32.Checksum(h[:checkedHeader], castagnoli), castagnoli, payload)
}

// sealFrame stores the check of header h and its payload.
func sealFrame(h, payload []byte) {
	binary.LittleEndian.PutUint32(h[checkedHeader:], frameCheck(h, payload))
}

// checkFrameHeader validates everything in header h but the check, which
// needs the payload; length is its payload size.
func checkFrameHeader(h []byte) error {
	typ := FrameType(h[4])
	switch {
	case h[5] != frameMagic:
		return fmt.Errorf("%w frame: magic %#x, want %#x", ErrMalformed, h[5], frameMagic)
	case typ == 0 || typ > maxFrameType:
		return fmt.Errorf("%w frame: unknown type %d", ErrMalformed, h[4])
	case h[6]|h[7]|h[20]|h[21]|h[22]|h[23] != 0:
		return fmt.Errorf("%w frame: reserved header bytes set", ErrMalformed)
	}
	return nil
}

// verifyFrame compares header h's check with its payload's.
func verifyFrame(h, payload []byte) error {
	if got, want := frameCheck(h, payload), binary.LittleEndian.Uint32(h[checkedHeader:]); got != want {
		return fmt.Errorf("%w frame: checksum %#08x, header says %#08x", ErrMalformed, got, want)
	}
	return nil
}

// AppendFrame appends f's header and payload to b, unpadded: the form used on
// byte streams. It returns an error only if the payload is over 4 GiB.
func AppendFrame(b []byte, f Frame) ([]byte, error) {
	if uint64(len(f.Payload)) >= uint64(skipMarker) {
		return b, fmt.Errorf("%w: payload of %d bytes", ErrFrameTooLarge, len(f.Payload))
	}
	var h [frameHeaderSize]byte
	putFrameHeader(h[:], uint32(len(f.Payload)), f.Type, f.ID)
	sealFrame(h[:], f.Payload)
	b = append(b, h[:]...)
	return append(b, f.Payload...), nil
}

// DecodeFrame reads one frame from the front of p and reports how many bytes
// it took. The payload aliases p.
func DecodeFrame(p []byte) (Frame, int, error) {
	if len(p) < frameHeaderSize {
		return Frame{}, 0, fmt.Errorf("%w frame: %d bytes, header needs %d", ErrMalformed, len(p), frameHeaderSize)
	}
	if err := checkFrameHeader(p); err != nil {
		return Frame{}, 0, err
	}
	length := binary.LittleEndian.Uint32(p)
	if uint64(length) > uint64(len(p)-frameHeaderSize) {
		return Frame{}, 0, fmt.Errorf("%w frame: payload of %d bytes, %d present", ErrMalformed, length, len(p)-frameHeaderSize)
	}
	end := frameHeaderSize + int(length)
	if err := verifyFrame(p, p[frameHeaderSize:end]); err != nil {
		return Frame{}, 0, err
	}
	return Frame{
		Type:    FrameType(p[4]),
		ID:      binary.LittleEndian.Uint64(p[8:]),
		Payload: p[frameHeaderSize:end:end],
	}, end, nil
}

// Payload encodings. Integers are unsigned varints except floats (4 bytes,
// IEEE-754 bits, little-endian); strings and lists are a varint count
// followed by their bytes or elements. Decoders bound every count by the
// bytes left, so a hostile length cannot make them allocate more than the
// input's size, and they reject trailing bytes.

func appendString(b []byte, s string) []byte {
	b = binary.AppendUvarint(b, uint64(len(s)))
	return append(b, s...)
}

func appendFloat32(b []byte, f float32) []byte {
	return binary.LittleEndian.AppendUint32(b, math.Float32bits(f))
}

// decoder reads a payload front to back; the first error sticks and later
// reads return zero values, so a decoder function checks once at the end.
type decoder struct {
	p    []byte
	what string
	err  error
}

func (d *decoder) fail(format string, args ...any) {
	if d.err == nil {
		d.err = fmt.Errorf("%w %s: %s", ErrMalformed, d.what, fmt.Sprintf(format, args...))
	}
}

func (d *decoder) uvarint(field string) uint64 {
	if d.err != nil {
		return 0
	}
	v, n := binary.Uvarint(d.p)
	if n <= 0 {
		d.fail("%s: bad varint", field)
		return 0
	}
	d.p = d.p[n:]
	return v
}

func (d *decoder) uint32(field string) uint32 {
	v := d.uvarint(field)
	if v > math.MaxUint32 {
		d.fail("%s: %d overflows 32 bits", field, v)
		return 0
	}
	return uint32(v)
}

func (d *decoder) byte(field string) byte {
	if d.err != nil {
		return 0
	}
	if len(d.p) < 1 {
		d.fail("%s: truncated", field)
		return 0
	}
	v := d.p[0]
	d.p = d.p[1:]
	return v
}

func (d *decoder) float32(field string) float32 {
	if d.err != nil {
		return 0
	}
	if len(d.p) < 4 {
		d.fail("%s: truncated", field)
		return 0
	}
	v := math.Float32frombits(binary.LittleEndian.Uint32(d.p))
	d.p = d.p[4:]
	return v
}

func (d *decoder) string(field string) string {
	n := d.uvarint(field)
	if d.err != nil {
		return ""
	}
	if n > uint64(len(d.p)) {
		d.fail("%s: length %d, %d bytes left", field, n, len(d.p))
		return ""
	}
	s := string(d.p[:n])
	d.p = d.p[n:]
	return s
}

// count reads a list length and checks that the bytes left could hold that
// many elements of at least minSize bytes each.
func (d *decoder) count(field string, minSize int) int {
	n := d.uvarint(field)
	if d.err != nil {
		return 0
	}
	if n > uint64(len(d.p)/minSize) {
		d.fail("%s: %d elements cannot fit in %d bytes", field, n, len(d.p))
		return 0
	}
	return int(n)
}

func (d *decoder) finish() error {
	if d.err == nil && len(d.p) != 0 {
		d.fail("%d trailing bytes", len(d.p))
	}
	return d.err
}

// Submit flag bits.
const (
	submitHasSeed   = 1 << 0
	submitIgnoreEOS = 1 << 1
	submitLogprobs  = 1 << 2
	// submitFormat says a response_format follows the traceparent. A
	// request without one encodes as it did before the field existed;
	// a worker that predates it refuses the flag rather than drop it.
	submitFormat = 1 << 3
	// submitChoices says the number of choices (N > 1) follows, after
	// response_format and before the tools; a request with one choice
	// encodes as it did before.
	submitChoices = 1 << 4
	// submitTools says the request's tools, tool choice and
	// parallel_tool_calls follow (appendTools), and submitToolHistory
	// that its messages' tool calls and tool call ids do
	// (appendToolHistory); a request with neither encodes as before.
	submitTools       = 1 << 5
	submitToolHistory = 1 << 6
	submitFlags       = submitHasSeed | submitIgnoreEOS | submitLogprobs | submitFormat | submitChoices | submitTools | submitToolHistory
)

// AppendSubmit appends the encoding of s to b.
func AppendSubmit(b []byte, s *infer.Request) []byte {
	var flags byte
	if s.HasSeed {
		flags |= submitHasSeed
	}
	if s.IgnoreEOS {
		flags |= submitIgnoreEOS
	}
	if s.Logprobs {
		flags |= submitLogprobs
	}
	if s.ResponseFormat != "" {
		flags |= submitFormat
	}
	if s.N > 1 {
		flags |= submitChoices
	}
	flags |= toolFlags(s)
	b = append(b, flags)
	b = appendString(b, s.Model)
	b = appendString(b, s.Prompt)
	b = binary.AppendUvarint(b, uint64(len(s.Messages)))
	for _, m := range s.Messages {
		b = appendString(b, m.Role)
		b = appendString(b, m.Content)
	}
	b = binary.AppendUvarint(b, uint64(s.MaxTokens))
	b = appendFloat32(b, s.Temperature)
	b = appendFloat32(b, s.TopP)
	b = binary.AppendUvarint(b, uint64(s.TopK))
	b = appendFloat32(b, s.MinP)
	b = appendFloat32(b, s.PresencePenalty)
	b = appendFloat32(b, s.FrequencyPenalty)
	b = appendFloat32(b, s.RepetitionPenalty)
	b = binary.AppendUvarint(b, uint64(len(s.LogitBias)))
	for _, lb := range s.LogitBias {
		b = binary.AppendUvarint(b, uint64(lb.Token))
		b = appendFloat32(b, lb.Bias)
	}
	b = append(b, s.TopLogprobs)
	b = binary.AppendUvarint(b, s.Seed)
	b = binary.AppendUvarint(b, uint64(len(s.Stop)))
	for _, stop := range s.Stop {
		b = appendString(b, stop)
	}
	b = append(b, byte(s.Urgency), byte(s.Class))
	b = appendString(b, s.TraceParent)
	if s.ResponseFormat != "" {
		b = appendString(b, s.ResponseFormat)
	}
	if s.N > 1 {
		b = binary.AppendUvarint(b, uint64(s.N))
	}
	return appendTools(b, s, flags)
}

// DecodeSubmit decodes a FrameSubmit payload.
func DecodeSubmit(p []byte) (infer.Request, error) {
	d := decoder{p: p, what: "submit"}
	var s infer.Request
	flags := d.byte("flags")
	if flags&^submitFlags != 0 {
		d.fail("unknown flags %#x", flags)
	}
	s.HasSeed = flags&submitHasSeed != 0
	s.IgnoreEOS = flags&submitIgnoreEOS != 0
	s.Logprobs = flags&submitLogprobs != 0
	s.Model = d.string("model")
	s.Prompt = d.string("prompt")
	if n := d.count("messages", 2); n > 0 {
		s.Messages = make([]infer.ChatMessage, n)
		for i := range s.Messages {
			s.Messages[i].Role = d.string("message role")
			s.Messages[i].Content = d.string("message content")
		}
	}
	s.MaxTokens = d.uint32("max_tokens")
	s.Temperature = d.float32("temperature")
	s.TopP = d.float32("top_p")
	s.TopK = d.uint32("top_k")
	s.MinP = d.float32("min_p")
	s.PresencePenalty = d.float32("presence_penalty")
	s.FrequencyPenalty = d.float32("frequency_penalty")
	s.RepetitionPenalty = d.float32("repetition_penalty")
	if n := d.count("logit_bias", 5); n > 0 {
		s.LogitBias = make([]infer.LogitBias, n)
		for i := range s.LogitBias {
			s.LogitBias[i] = infer.LogitBias{Token: d.uint32("logit_bias token"), Bias: d.float32("logit_bias bias")}
		}
	}
	s.TopLogprobs = d.byte("top_logprobs")
	if d.err == nil && s.TopLogprobs > infer.MaxTopLogprobs {
		d.fail("top_logprobs %d is over %d", s.TopLogprobs, infer.MaxTopLogprobs)
	}
	if d.err == nil && s.TopLogprobs > 0 && !s.Logprobs {
		d.fail("top_logprobs %d without logprobs", s.TopLogprobs)
	}
	s.Seed = d.uvarint("seed")
	if n := d.count("stop", 1); n > 0 {
		s.Stop = make([]string, n)
		for i := range s.Stop {
			s.Stop[i] = d.string("stop")
		}
	}
	s.Urgency = priority.Urgency(d.byte("urgency"))
	if !s.Urgency.Valid() {
		d.fail("urgency %d out of range", s.Urgency)
	}
	s.Class = priority.Class(d.byte("class"))
	if s.Class > priority.Bulk {
		d.fail("unknown class %d", s.Class)
	}
	s.TraceParent = d.string("traceparent")
	if flags&submitFormat != 0 {
		if s.ResponseFormat = d.string("response_format"); d.err == nil && s.ResponseFormat == "" {
			d.fail("empty response_format")
		}
	}
	if flags&submitChoices != 0 {
		if s.N = d.uint32("n"); d.err == nil && (s.N < 2 || s.N > infer.MaxChoices) {
			d.fail("n %d is not in [2, %d]", s.N, infer.MaxChoices)
		}
	}
	decodeTools(&d, &s, flags)
	if err := d.finish(); err != nil {
		return infer.Request{}, err
	}
	return s, nil
}

// AppendToken appends the encoding of t to b. It does not allocate when b
// has room.
//
// After the count and the text comes the number of logprob entries, 0
// (one byte) when the request did not ask for them, else one per token;
// each is the token's text, its logprob, the number of top entries and
// each top entry's text and logprob. A token of a request with several
// choices ends with its choice's index and finish reason ("" until the
// choice's last); one with neither ends after the logprobs, as before
// choices existed.
func AppendToken(b []byte, t *infer.Token) []byte {
	b = binary.AppendUvarint(b, uint64(t.Count))
	b = appendString(b, t.Text)
	b = binary.AppendUvarint(b, uint64(len(t.Logprobs)))
	for i := range t.Logprobs {
		lp := &t.Logprobs[i]
		b = appendString(b, lp.Token)
		b = appendFloat32(b, lp.Logprob)
		b = binary.AppendUvarint(b, uint64(len(lp.Top)))
		for _, top := range lp.Top {
			b = appendString(b, top.Token)
			b = appendFloat32(b, top.Logprob)
		}
	}
	// The choice's index and end, then the tool calls, each only when
	// there is something to say: the choice section goes whenever tool
	// calls follow it, so that the decoder reads the sections in order.
	if t.Index != 0 || t.FinishReason != "" || len(t.ToolCalls) > 0 {
		b = binary.AppendUvarint(b, uint64(t.Index))
		b = appendString(b, t.FinishReason)
	}
	return appendToolCalls(b, t.ToolCalls)
}

// DecodeToken decodes a FrameToken payload. A token without logprob
// entries has nil Logprobs, an entry without top entries nil Top.
func DecodeToken(p []byte) (infer.Token, error) {
	d := decoder{p: p, what: "token"}
	t := infer.Token{Count: d.uint32("count"), Text: d.string("text")}
	// An entry is at least a text's length, a logprob and a count of
	// top entries; a top entry a length and a logprob.
	if n := d.count("logprobs", 6); n > 0 {
		if uint64(n) != uint64(t.Count) {
			d.fail("%d logprob entries for %d tokens", n, t.Count)
		}
		if d.err == nil {
			t.Logprobs = make([]infer.TokenLogprob, n)
		}
		for i := range t.Logprobs {
			lp := &t.Logprobs[i]
			lp.Token = d.string("logprob token")
			lp.Logprob = d.float32("logprob")
			top := d.count("top_logprobs", 5)
			if top > infer.MaxTopLogprobs {
				d.fail("%d top_logprobs, over %d", top, infer.MaxTopLogprobs)
			}
			if d.err != nil {
				break
			}
			if top > 0 {
				lp.Top = make([]infer.TopLogprob, top)
				for j := range lp.Top {
					lp.Top[j] = infer.TopLogprob{Token: d.string("top_logprobs token"), Logprob: d.float32("top_logprobs logprob")}
				}
			}
		}
	}
	if d.err == nil && len(d.p) > 0 {
		t.Index = d.uint32("index")
		if t.FinishReason = d.string("finish_reason"); d.err == nil && t.Index >= infer.MaxChoices {
			d.fail("choice index %d, over %d", t.Index, infer.MaxChoices-1)
		}
	}
	t.ToolCalls = decodeToolCalls(&d)
	if err := d.finish(); err != nil {
		return infer.Token{}, err
	}
	return t, nil
}

// AppendDone appends the encoding of x to b.
func AppendDone(b []byte, x *infer.Done) []byte {
	b = appendString(b, x.FinishReason)
	b = binary.AppendUvarint(b, uint64(x.PromptTokens))
	return binary.AppendUvarint(b, uint64(x.CompletionTokens))
}

// DecodeDone decodes a FrameDone payload.
func DecodeDone(p []byte) (infer.Done, error) {
	d := decoder{p: p, what: "done"}
	x := infer.Done{
		FinishReason:     d.string("finish_reason"),
		PromptTokens:     d.uint32("prompt_tokens"),
		CompletionTokens: d.uint32("completion_tokens"),
	}
	if err := d.finish(); err != nil {
		return infer.Done{}, err
	}
	return x, nil
}

// AppendError appends the encoding of e to b.
func AppendError(b []byte, e *infer.Error) []byte {
	b = appendString(b, e.Code)
	return appendString(b, e.Message)
}

// DecodeError decodes a FrameError payload.
func DecodeError(p []byte) (infer.Error, error) {
	d := decoder{p: p, what: "error"}
	e := infer.Error{Code: d.string("code"), Message: d.string("message")}
	if err := d.finish(); err != nil {
		return infer.Error{}, err
	}
	return e, nil
}

// AppendReady appends the encoding of r to b.
func AppendReady(b []byte, r *Ready) []byte {
	b = binary.AppendUvarint(b, uint64(r.PID))
	b = binary.AppendUvarint(b, uint64(r.Slots))
	b = binary.AppendUvarint(b, uint64(r.SlotsFit))
	b = binary.AppendUvarint(b, uint64(len(r.Models)))
	for _, m := range r.Models {
		b = appendString(b, m.Name)
		b = binary.AppendUvarint(b, uint64(m.ContextLength))
	}
	return appendEncoders(b, r.Models)
}

// DecodeReady decodes a FrameReady payload.
func DecodeReady(p []byte) (Ready, error) {
	d := decoder{p: p, what: "ready"}
	r := Ready{PID: d.uint32("pid"), Slots: d.uint32("slots"), SlotsFit: d.uint32("slots_fit")}
	if n := d.count("models", 2); n > 0 {
		r.Models = make([]infer.ModelInfo, n)
		for i := range r.Models {
			r.Models[i].Name = d.string("model name")
			r.Models[i].ContextLength = d.uint32("model context_length")
		}
	}
	d.encoders(r.Models)
	if err := d.finish(); err != nil {
		return Ready{}, err
	}
	return r, nil
}

// AppendStats appends the encoding of s to b.
func AppendStats(b []byte, s *Stats) []byte {
	b = binary.AppendUvarint(b, s.TokensGenerated)
	b = binary.AppendUvarint(b, s.SequencesStarted)
	b = binary.AppendUvarint(b, s.SequencesFinished)
	b = binary.AppendUvarint(b, s.SequencesCancelled)
	b = binary.AppendUvarint(b, uint64(s.Active))
	b = binary.AppendUvarint(b, s.Prefills)
	return binary.AppendUvarint(b, s.PrefillTokens)
}

// DecodeStats decodes a FrameStats payload.
func DecodeStats(p []byte) (Stats, error) {
	d := decoder{p: p, what: "stats"}
	s := Stats{
		TokensGenerated:    d.uvarint("tokens_generated"),
		SequencesStarted:   d.uvarint("sequences_started"),
		SequencesFinished:  d.uvarint("sequences_finished"),
		SequencesCancelled: d.uvarint("sequences_cancelled"),
		Active:             d.uint32("active"),
	}
	if d.err == nil && len(d.p) > 0 {
		s.Prefills = d.uvarint("prefills")
		s.PrefillTokens = d.uvarint("prefill_tokens")
	}
	if err := d.finish(); err != nil {
		return Stats{}, err
	}
	return s, nil
}

// AppendControl appends the encoding of c to b.
func AppendControl(b []byte, c *Control) []byte {
	b = append(b, byte(c.Op))
	b = appendString(b, c.Name)
	return appendString(b, c.Dir)
}

// DecodeControl decodes a FrameControl payload.
func DecodeControl(p []byte) (Control, error) {
	d := decoder{p: p, what: "control"}
	c := Control{Op: ControlOp(d.byte("op"))}
	if d.err == nil && (c.Op == 0 || c.Op > maxControlOp) {
		d.fail("unknown op %d", c.Op)
	}
	c.Name = d.string("name")
	c.Dir = d.string("dir")
	if err := d.finish(); err != nil {
		return Control{}, err
	}
	return c, nil
}
