package upstream

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"time"

	"go.opentelemetry.io/otel/propagation"

	"h3infer/infer"
)

// Embeddings upstream: an upstream's model is an encoder when its
// /v1/models says "task": "embed" (as h3infer's does), and an embedding
// request for it goes as OpenAI's POST /v1/embeddings, the vectors asked
// for in base64 (little-endian float32s: a third of the bytes of JSON
// numbers, and exact). The answer is read whole, bounded, and checked
// before a client sees it.

// maxEmbedAnswer bounds the body of an upstream's embeddings answer: the
// most inputs a request may have (infer.MaxEmbedInputs) with vectors of
// 4,096 values in base64 fit, with room to spare. A variable so that a
// test can bound a huge answer without sending 64 MiB.
var maxEmbedAnswer = 64 << 20

// maxEmbedSize bounds the length of a vector an upstream may answer.
const maxEmbedSize = 1 << 16

type embedBody struct {
	Model          string `json:"model"`
	Input          any    `json:"input"`
	Dimensions     uint32 `json:"dimensions,omitempty"`
	EncodingFormat string `json:"encoding_format"`
}

type embedAnswer struct {
	Data []struct {
		Index     *int   `json:"index"`
		Embedding string `json:"embedding"`
	} `json:"data"`
	Usage struct {
		PromptTokens uint32 `json:"prompt_tokens"`
	} `json:"usage"`
}

// exchangeEmbed sends an embedding request and turns the answer into one
// Embedding event, before the result's Done.
func (c *call) exchangeEmbed(ctx context.Context, job *infer.Request, stall *time.Timer, start time.Time) result {
	e := job.Embed
	b := embedBody{Model: modelName(job.Model), Dimensions: e.Dimensions, EncodingFormat: "base64"}
	if e.Tokens != nil {
		b.Input = e.Tokens
	} else {
		b.Input = e.Texts
	}
	body, err := json.Marshal(&b)
	if err != nil {
		return result{err: &infer.Error{Code: infer.CodeInternal, Message: "could not build the upstream request"}, reason: err.Error()}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.h.base+"/v1/embeddings", bytes.NewReader(body))
	if err != nil {
		return result{err: &infer.Error{Code: infer.CodeInternal, Message: "could not build the upstream request"}, reason: err.Error()}
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "h3infer-upstream")
	req.Header.Set("Priority", "u="+strconv.Itoa(int(job.Urgency)))
	c.h.authorize(req)
	traceContext.Inject(ctx, propagation.HeaderCarrier(req.Header))
	resp, err := c.h.client.Do(req)
	if err != nil {
		return c.lost(ctx, err, false)
	}
	defer resp.Body.Close()
	stallFor := time.Duration(c.h.cfg.StallTimeout)
	stall.Reset(stallFor)
	if resp.StatusCode != http.StatusOK {
		return c.refused(resp, modelName(job.Model))
	}
	// A long answer still arriving is not a stall.
	raw, err := io.ReadAll(&progressReader{r: io.LimitReader(resp.Body, int64(maxEmbedAnswer)+1), progress: func() { stall.Reset(stallFor) }})
	if err != nil {
		return c.lost(ctx, err, false)
	}
	stall.Stop() // all has arrived: reading it is no stall
	ttft := time.Since(start)
	emb, tokens, err := readEmbedAnswer(raw, e.Len(), e.Dimensions)
	if err != nil {
		return result{
			err:  &infer.Error{Code: infer.CodeUpstreamLost, Message: "the upstream server sent a malformed answer", Unstarted: true},
			kind: kindMalformed, counts: true, reason: err.Error(), ttft: ttft,
		}
	}
	if !c.deliver(infer.Event{Embedding: emb}) {
		return result{kind: kindOverflow, ttft: ttft} // or cancelled; report tells
	}
	return result{done: &infer.Done{PromptTokens: tokens}, ttft: ttft}
}

// readEmbedAnswer checks an embeddings answer for n inputs: one vector
// for each input index, all of one length (dims when the request asked
// for it), each value a finite number.
func readEmbedAnswer(raw []byte, n int, dims uint32) (*infer.Embedding, uint32, error) {
	if len(raw) > maxEmbedAnswer {
		return nil, 0, fmt.Errorf("answer longer than %d bytes", maxEmbedAnswer)
	}
	var a embedAnswer
	if err := json.Unmarshal(raw, &a); err != nil {
		return nil, 0, err
	}
	if len(a.Data) != n {
		return nil, 0, fmt.Errorf("%d vectors for %d inputs", len(a.Data), n)
	}
	out := &infer.Embedding{Vectors: make([][]float32, n)}
	size := -1
	for i, d := range a.Data {
		switch {
		case d.Index == nil || *d.Index < 0 || *d.Index >= n:
			return nil, 0, fmt.Errorf("data[%d]: no input index in [0, %d)", i, n)
		case out.Vectors[*d.Index] != nil:
			return nil, 0, fmt.Errorf("data[%d]: input %d answered twice", i, *d.Index)
		}
		v, err := base64Floats(d.Embedding)
		switch {
		case err != nil:
			return nil, 0, fmt.Errorf("data[%d].embedding: %w", i, err)
		case len(v) == 0 || len(v) > maxEmbedSize:
			return nil, 0, fmt.Errorf("data[%d]: a vector of %d values", i, len(v))
		case size >= 0 && len(v) != size:
			return nil, 0, fmt.Errorf("data[%d]: %d values, the others %d", i, len(v), size)
		case dims != 0 && len(v) != int(dims):
			return nil, 0, fmt.Errorf("data[%d]: %d values, %d asked for", i, len(v), dims)
		}
		size = len(v)
		out.Vectors[*d.Index] = v
	}
	return out, a.Usage.PromptTokens, nil
}

// base64Floats reads a vector in OpenAI's base64 form: little-endian
// float32s, each a finite number.
func base64Floats(s string) ([]float32, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, err
	}
	if len(b)%4 != 0 {
		return nil, fmt.Errorf("%d bytes are not float32s", len(b))
	}
	v := make([]float32, len(b)/4)
	for j := range v {
		f := math.Float32frombits(binary.LittleEndian.Uint32(b[4*j:]))
		if math.IsInf(float64(f), 0) || math.IsNaN(float64(f)) {
			return nil, fmt.Errorf("value %d is %v", j, f)
		}
		v[j] = f
	}
	return v, nil
}

// progressReader calls progress after every read that returns bytes.
type progressReader struct {
	r        io.Reader
	progress func()
}

func (p *progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.progress()
	}
	return n, err
}

// deliver hands on a non-terminal event without blocking; false when the
// call has ended.
func (c *call) deliver(ev infer.Event) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ended {
		return false
	}
	if len(c.events) >= cap(c.events)-1 {
		c.ended, c.overflowed = true, true
		close(c.events)
		c.cancel(errOverflow)
		return false
	}
	c.events <- ev
	return true
}
