package engine

import (
	"fmt"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"h3infer/infer"
	"h3infer/internal/onnxgen"
	"h3infer/transport"
)

// TestRingWorkerServesEmbeddings: a worker process's loop, over a real
// ring, announces its encoder in Ready and answers an embedding request
// with its vectors and then Done.
func TestRingWorkerServesEmbeddings(t *testing.T) {
	needModel(t)
	dir := t.TempDir()
	if err := onnxgen.WriteEncoder(dir, onnxgen.EncoderOptions{Hidden: 32}); err != nil {
		t.Fatal(err)
	}
	rw := startRingWorkerWith(t, 4, dir, 0)
	m := rw.hello.Models[0]
	if !m.Encoder || m.EmbeddingSize != 32 || !m.Matryoshka || m.ContextLength != onnxgen.DefaultEncoderContext {
		t.Fatalf("Ready says %+v, want a Matryoshka encoder of 32 values", m)
	}
	call, err := rw.end.Open(1, &infer.Request{Model: "demo", Embed: &infer.EmbedRequest{Texts: []string{"one", "two"}, Dimensions: 4}})
	if err != nil {
		t.Fatal(err)
	}
	var vecs [][]float32
	var done *infer.Done
	for ev := range call.Events() {
		switch {
		case ev.Err != nil:
			t.Fatalf("error %+v", ev.Err)
		case ev.Embedding != nil:
			vecs = append(vecs, ev.Embedding.Vectors...)
		case ev.Done != nil:
			done = ev.Done
		}
	}
	if len(vecs) != 2 || len(vecs[0]) != 4 || done == nil || done.PromptTokens != 6 || reflect.DeepEqual(vecs[0], vecs[1]) {
		t.Errorf("got %v and %+v, want two different vectors of 4 values and 6 prompt tokens", vecs, done)
	}
}

// BenchmarkEmbeddings loads one worker, over a real ring, with 1, 8 and
// 32 clients that each send one-input embedding requests back to back: the
// loop batches the inputs waiting at each round into one run, so c
// clients make batches of up to c, and c=1 is one request at a time. It
// reports requests/s at each batch size on one line, side by side, and
// batches 8 and 32 as multiples of one at a time (x08, x32), for the demo
// repository's encoder (hidden 64, 2 layers) and one of a MiniLM's shape
// (hidden 384, 6 layers). The three loads take turns in short slices of
// the window, so that a machine whose other load comes and goes weighs on
// each alike.
//
//	go test -run '^$' -bench Embeddings -benchtime 1x ./engine/
func BenchmarkEmbeddings(b *testing.B) {
	needModel(b)
	window := benchWindow(b)
	const slices = 8
	batches := []int{1, 8, 32}
	for _, enc := range []struct {
		name string
		o    onnxgen.EncoderOptions
	}{
		{"encoder", onnxgen.EncoderOptions{}},
		{"h384l6", onnxgen.EncoderOptions{Hidden: 384, Layers: 6, Heads: 6}},
	} {
		b.Run("model="+enc.name, func(b *testing.B) {
			dir := filepath.Join(b.TempDir(), enc.name)
			if err := onnxgen.WriteEncoder(dir, enc.o); err != nil {
				b.Fatal(err)
			}
			rw := startRingWorkerWith(b, 64, dir, 0)
			var ids atomic.Uint64
			rps := make([]float64, len(batches))
			for b.Loop() {
				n := make([]int, len(batches))
				took := make([]time.Duration, len(batches))
				for range slices {
					for i, c := range batches {
						k, d := runEmbedLoad(b, rw.end, &ids, c, window/slices)
						n[i] += k
						took[i] += d
					}
				}
				for i := range batches {
					rps[i] = float64(n[i]) / took[i].Seconds()
				}
			}
			// Units sort by name where they are printed: b01, b08, b32.
			for i, c := range batches {
				b.ReportMetric(rps[i], fmt.Sprintf("req/s_b%02d", c))
			}
			b.ReportMetric(rps[1]/rps[0], "x08")
			b.ReportMetric(rps[2]/rps[0], "x32")
		})
	}
}

// embedText is a benchmark input: 56 bytes, so 56 tokens of the byte
// tokenizer, about a sentence.
const embedText = "The gateway hands each request to a worker over a ring."

// runEmbedLoad runs c clients for window, each sending a one-input
// embedding request as soon as its previous one ends, and returns how many
// requests ended and in how long.
func runEmbedLoad(b *testing.B, end *transport.GatewayEnd, ids *atomic.Uint64, c int, window time.Duration) (int, time.Duration) {
	var done atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	stop := start.Add(window)
	for client := range c {
		wg.Go(func() {
			req := &infer.Request{Model: "demo", Embed: &infer.EmbedRequest{Texts: []string{embedText[:40+client%16]}}}
			for time.Now().Before(stop) {
				call, err := end.Open(ids.Add(1), req)
				if err != nil {
					b.Error(err)
					return
				}
				for ev := range call.Events() {
					if ev.Err != nil {
						b.Errorf("request failed: %+v", ev.Err)
						return
					}
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	return int(done.Load()), time.Since(start)
}
