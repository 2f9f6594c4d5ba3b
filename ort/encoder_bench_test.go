package ort

import (
	"fmt"
	"testing"

	"h3infer/internal/onnxgen"
)

// BenchmarkEncoderRun is one ONNX Runtime run of an encoder on 1, 8 and 32
// rows of 50 tokens, for the demo repository's encoder and one of a
// MiniLM's shape: what a row costs as the batch grows, the model's share
// of engine.BenchmarkEmbeddings.
//
//	go test -run '^$' -bench EncoderRun ./ort/
func BenchmarkEncoderRun(b *testing.B) {
	for _, enc := range []struct {
		name string
		o    onnxgen.EncoderOptions
	}{
		{"encoder", onnxgen.EncoderOptions{}},
		{"h384l6", onnxgen.EncoderOptions{Hidden: 384, Layers: 6, Heads: 6}},
	} {
		e := loadEncoder(b, enc.o)
		for _, n := range []int{1, 8, 32} {
			rows := make([][]int, n)
			for i := range rows {
				rows[i] = make([]int, 50)
				for k := range rows[i] {
					rows[i][k] = (i*7 + k) % 200
				}
			}
			b.Run(fmt.Sprintf("model=%s/rows=%d", enc.name, n), func(b *testing.B) {
				for b.Loop() {
					if _, err := e.Embed(rows, nil); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*n), "us/row")
			})
		}
	}
}
