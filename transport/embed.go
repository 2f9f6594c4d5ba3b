package transport

import (
	"encoding/binary"
	"math"

	"h3infer/infer"
	"h3infer/priority"
)

// The frames of embedding requests. An embedding request travels as its
// own frame type rather than as a submit with a flag, so the submit's
// encoding, which every completion pays for, stays as it was.
//
// FrameEmbed's payload: a flags byte (embedTokens: the inputs are token
// lists, else texts), the model, urgency and class bytes, the
// traceparent, the dimensions asked for, the number of inputs and each
// input: a string, or a count and that many token ids.
//
// FrameEmbedding's payload: the index of its first vector, the number of
// vectors, their length, and the vectors' floats one after another.

const (
	embedTokens = 1 << 0
	embedFlags  = embedTokens
)

// AppendEmbed appends the encoding of s, whose Embed is set, to b.
func AppendEmbed(b []byte, s *infer.Request) []byte {
	e := s.Embed
	var flags byte
	if e.Tokens != nil {
		flags |= embedTokens
	}
	b = append(b, flags)
	b = appendString(b, s.Model)
	b = append(b, byte(s.Urgency), byte(s.Class))
	b = appendString(b, s.TraceParent)
	b = binary.AppendUvarint(b, uint64(e.Dimensions))
	if e.Tokens != nil {
		b = binary.AppendUvarint(b, uint64(len(e.Tokens)))
		for _, ids := range e.Tokens {
			b = binary.AppendUvarint(b, uint64(len(ids)))
			for _, id := range ids {
				b = binary.AppendUvarint(b, uint64(id))
			}
		}
		return b
	}
	b = binary.AppendUvarint(b, uint64(len(e.Texts)))
	for _, t := range e.Texts {
		b = appendString(b, t)
	}
	return b
}

// DecodeEmbed decodes a FrameEmbed payload. It holds the bounds a sound
// gateway keeps: 1 to infer.MaxEmbedInputs inputs, no empty token list,
// at most infer.MaxEmbedTokens token ids in all.
func DecodeEmbed(p []byte) (infer.Request, error) {
	d := decoder{p: p, what: "embed"}
	var s infer.Request
	e := &infer.EmbedRequest{}
	flags := d.byte("flags")
	if flags&^embedFlags != 0 {
		d.fail("unknown flags %#x", flags)
	}
	s.Model = d.string("model")
	s.Urgency = priority.Urgency(d.byte("urgency"))
	if d.err == nil && !s.Urgency.Valid() {
		d.fail("urgency %d out of range", s.Urgency)
	}
	s.Class = priority.Class(d.byte("class"))
	if d.err == nil && s.Class > priority.Bulk {
		d.fail("unknown class %d", s.Class)
	}
	s.TraceParent = d.string("traceparent")
	e.Dimensions = d.uint32("dimensions")
	n := d.count("inputs", 1)
	if d.err == nil && (n == 0 || n > infer.MaxEmbedInputs) {
		d.fail("%d inputs, want 1 to %d", n, infer.MaxEmbedInputs)
	}
	if flags&embedTokens != 0 {
		total := 0
		for i := 0; i < n && d.err == nil; i++ {
			m := d.count("input tokens", 1)
			if total += m; d.err == nil && (m == 0 || total > infer.MaxEmbedTokens) {
				d.fail("input %d: %d tokens (%d so far), want 1 or more and at most %d in all", i, m, total, infer.MaxEmbedTokens)
			}
			ids := make([]uint32, m)
			for j := range ids {
				ids[j] = d.uint32("token id")
			}
			e.Tokens = append(e.Tokens, ids)
		}
	} else {
		for i := 0; i < n && d.err == nil; i++ {
			e.Texts = append(e.Texts, d.string("input text"))
		}
	}
	if err := d.finish(); err != nil {
		return infer.Request{}, err
	}
	s.Embed = e
	return s, nil
}

// AppendEmbedding appends the encoding of e to b; every vector of e has
// the same length.
func AppendEmbedding(b []byte, e *infer.Embedding) []byte {
	b = binary.AppendUvarint(b, uint64(e.Index))
	b = binary.AppendUvarint(b, uint64(len(e.Vectors)))
	dims := 0
	if len(e.Vectors) > 0 {
		dims = len(e.Vectors[0])
	}
	b = binary.AppendUvarint(b, uint64(dims))
	for _, v := range e.Vectors {
		for _, f := range v {
			b = binary.LittleEndian.AppendUint32(b, math.Float32bits(f))
		}
	}
	return b
}

// DecodeEmbedding decodes a FrameEmbedding payload: at least one vector,
// of at least one value, within infer.MaxEmbedInputs, and exactly the
// floats the counts say.
func DecodeEmbedding(p []byte) (infer.Embedding, error) {
	d := decoder{p: p, what: "embedding"}
	e := infer.Embedding{Index: d.uint32("index")}
	n := d.uvarint("vectors")
	dims := d.uvarint("dimensions")
	switch {
	case d.err != nil:
	case n == 0 || dims == 0:
		d.fail("%d vectors of %d values", n, dims)
	case uint64(e.Index)+n > infer.MaxEmbedInputs:
		d.fail("vectors %d to %d, past the %d inputs a request may have", e.Index, uint64(e.Index)+n, infer.MaxEmbedInputs)
	case n > uint64(len(d.p)) || dims > uint64(len(d.p)) || n*dims*4 != uint64(len(d.p)):
		d.fail("%d vectors of %d values in %d bytes", n, dims, len(d.p))
	}
	if d.err != nil {
		return infer.Embedding{}, d.err
	}
	flat := make([]float32, n*dims)
	for i := range flat {
		flat[i] = math.Float32frombits(binary.LittleEndian.Uint32(d.p[4*i:]))
	}
	d.p = d.p[4*len(flat):]
	e.Vectors = make([][]float32, n)
	for i := range e.Vectors {
		e.Vectors[i] = flat[uint64(i)*dims : uint64(i+1)*dims : uint64(i+1)*dims]
	}
	if err := d.finish(); err != nil {
		return infer.Embedding{}, err
	}
	return e, nil
}

// Encoder flag bits of a Ready's models.
const (
	readyEncoder    = 1 << 0
	readyMatryoshka = 1 << 1
	readyFlags      = readyEncoder | readyMatryoshka
)

// appendEncoders appends, when any of models is an encoder, a flags byte
// and the vectors' length for each, after the list: a Ready of decoders
// alone encodes as it did before encoders existed.
func appendEncoders(b []byte, models []infer.ModelInfo) []byte {
	enc := false
	for _, m := range models {
		enc = enc || m.Encoder || m.EmbeddingSize != 0 || m.Matryoshka
	}
	if !enc {
		return b
	}
	for _, m := range models {
		var flags byte
		if m.Encoder {
			flags |= readyEncoder
		}
		if m.Matryoshka {
			flags |= readyMatryoshka
		}
		b = append(b, flags)
		b = binary.AppendUvarint(b, uint64(m.EmbeddingSize))
	}
	return b
}

// encoders reads what appendEncoders wrote into models, when the payload
// goes on past the list.
func (d *decoder) encoders(models []infer.ModelInfo) {
	if d.err != nil || len(d.p) == 0 {
		return
	}
	for i := range models {
		m := &models[i]
		flags := d.byte("model flags")
		m.EmbeddingSize = d.uint32("model embedding size")
		if d.err != nil {
			return
		}
		m.Encoder, m.Matryoshka = flags&readyEncoder != 0, flags&readyMatryoshka != 0
		if flags&^readyFlags != 0 || !m.Encoder && flags != 0 || !m.Encoder && m.EmbeddingSize != 0 {
			d.fail("model %q: flags %#x, embedding size %d", m.Name, flags, m.EmbeddingSize)
			return
		}
	}
}
