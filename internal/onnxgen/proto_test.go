package onnxgen

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	ort "github.com/yalue/onnxruntime_go"
	"google.golang.org/protobuf/encoding/protowire"
)

func TestTensorEncoding(t *testing.T) {
	tn := floatTensor("w", []int64{2}, []float32{1, -2})
	got := tn.appendTo(nil)
	want := []byte{
		0x0a, 0x01, 0x02, // dims (1), packed: [2]
		0x10, 0x01, // data_type (2): FLOAT
		0x42, 0x01, 'w', // name (8)
		0x4a, 0x08, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0xc0, // raw_data (9): 1.0, -2.0
	}
	if !bytes.Equal(got, want) {
		t.Errorf("got % x\nwant % x", got, want)
	}
}

func TestModelEncodingHeader(t *testing.T) {
	m := model{producer: "p", version: "v", graph: graph{name: "g"}}
	b := m.marshal()
	fields := map[protowire.Number][]byte{}
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			t.Fatalf("bad tag: %v", protowire.ParseError(n))
		}
		b = b[n:]
		switch typ {
		case protowire.VarintType:
			v, n := protowire.ConsumeVarint(b)
			fields[num] = protowire.AppendVarint(nil, v)
			b = b[n:]
		case protowire.BytesType:
			v, n := protowire.ConsumeBytes(b)
			fields[num] = v
			b = b[n:]
		default:
			t.Fatalf("unexpected wire type %v for field %d", typ, num)
		}
	}
	if v, _ := protowire.ConsumeVarint(fields[1]); v != irVersion {
		t.Errorf("ir_version = %d, want %d", v, irVersion)
	}
	if string(fields[2]) != "p" || string(fields[3]) != "v" {
		t.Errorf("producer %q version %q", fields[2], fields[3])
	}
	if want := []byte{0x12, 0x01, 'g'}; !bytes.Equal(fields[7], want) {
		t.Errorf("graph = % x, want % x", fields[7], want)
	}
	if want := []byte{0x0a, 0x00, 0x10, opsetVersion}; !bytes.Equal(fields[8], want) {
		t.Errorf("opset_import = % x, want % x", fields[8], want)
	}
}

// TestHandBuiltModelRuns encodes a one-node graph, y = x + c with c an
// initializer and a symbolic batch dim, and runs it in ONNX Runtime.
func TestHandBuiltModelRuns(t *testing.T) {
	requireORT(t)
	m := model{producer: "test", version: "1", graph: graph{
		name:    "add",
		nodes:   []node{{name: "add", opType: "Add", inputs: []string{"x", "c"}, outputs: []string{"y"}}},
		inits:   []tensor{floatTensor("c", []int64{3}, []float32{10, 20, 30})},
		inputs:  []valueInfo{{name: "x", dtype: dtypeFloat, shape: []dim{{param: "n"}, {value: 3}}}},
		outputs: []valueInfo{{name: "y", dtype: dtypeFloat, shape: []dim{{param: "n"}, {value: 3}}}},
	}}
	path := filepath.Join(t.TempDir(), "add.onnx")
	if err := os.WriteFile(path, m.marshal(), 0o644); err != nil {
		t.Fatal(err)
	}
	sess, err := ort.NewDynamicAdvancedSession(path, []string{"x"}, []string{"y"}, nil)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	defer sess.Destroy()
	x, err := ort.NewTensor(ort.NewShape(2, 3), []float32{1, 2, 3, 4, 5, 6})
	if err != nil {
		t.Fatal(err)
	}
	defer x.Destroy()
	out := []ort.Value{nil}
	if err := sess.Run([]ort.Value{x}, out); err != nil {
		t.Fatalf("run: %v", err)
	}
	defer out[0].Destroy()
	got := out[0].(*ort.Tensor[float32]).GetData()
	want := []float32{11, 22, 33, 14, 25, 36}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("got %v, want %v", got, want)
		}
	}
}
