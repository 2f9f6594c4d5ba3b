package onnxgen

import (
	"encoding/binary"
	"math"
	"strconv"

	"google.golang.org/protobuf/encoding/protowire"
)

// Field numbers and enum values below are those of the public ONNX IR
// specification (onnx.proto). Only the subset a plain inference graph needs
// is covered; every message is written by hand so the project carries no
// generated code.

const (
	irVersion    = 8  // the IR version that goes with opset 17
	opsetVersion = 17 // every op used here is stable at this opset
)

// ModelProto fields.
const (
	fieldModelIRVersion     protowire.Number = 1
	fieldModelProducerName  protowire.Number = 2
	fieldModelProducerVer   protowire.Number = 3
	fieldModelDocString     protowire.Number = 6
	fieldModelGraph         protowire.Number = 7
	fieldModelOpsetImport   protowire.Number = 8
	fieldModelMetadataProps protowire.Number = 14
)

// OperatorSetIdProto and StringStringEntryProto fields.
const (
	fieldOpsetDomain  protowire.Number = 1
	fieldOpsetVersion protowire.Number = 2
	fieldEntryKey     protowire.Number = 1
	fieldEntryValue   protowire.Number = 2
)

// GraphProto fields.
const (
	fieldGraphNode        protowire.Number = 1
	fieldGraphName        protowire.Number = 2
	fieldGraphInitializer protowire.Number = 5
	fieldGraphInput       protowire.Number = 11
	fieldGraphOutput      protowire.Number = 12
)

// NodeProto fields.
const (
	fieldNodeInput     protowire.Number = 1
	fieldNodeOutput    protowire.Number = 2
	fieldNodeName      protowire.Number = 3
	fieldNodeOpType    protowire.Number = 4
	fieldNodeAttribute protowire.Number = 5
)

// AttributeProto fields and AttributeType values.
const (
	fieldAttrName  protowire.Number = 1
	fieldAttrF     protowire.Number = 2
	fieldAttrI     protowire.Number = 3
	fieldAttrT     protowire.Number = 5
	fieldAttrInts  protowire.Number = 8
	fieldAttrType  protowire.Number = 20
	attrTypeFloat                   = 1
	attrTypeInt                     = 2
	attrTypeTensor                  = 4
	attrTypeInts                    = 7
)

// ValueInfoProto, TypeProto, TypeProto.Tensor, TensorShapeProto and
// TensorShapeProto.Dimension fields.
const (
	fieldValueInfoName   protowire.Number = 1
	fieldValueInfoType   protowire.Number = 2
	fieldTypeTensor      protowire.Number = 1
	fieldTensorTypeElem  protowire.Number = 1
	fieldTensorTypeShape protowire.Number = 2
	fieldShapeDim        protowire.Number = 1
	fieldDimValue        protowire.Number = 1
	fieldDimParam        protowire.Number = 2
)

// TensorProto fields.
const (
	fieldTensorDims     protowire.Number = 1
	fieldTensorDataType protowire.Number = 2
	fieldTensorName     protowire.Number = 8
	fieldTensorRawData  protowire.Number = 9
	fieldTensorExternal protowire.Number = 13
	fieldTensorLocation protowire.Number = 14
	dataLocationExtern                   = 1 // TensorProto.DataLocation EXTERNAL
)

// TensorProto.DataType values.
const (
	dtypeFloat    int32 = 1
	dtypeInt64    int32 = 7
	dtypeBool     int32 = 9
	dtypeFloat16  int32 = 10
	dtypeBFloat16 int32 = 16
)

// tensor is a dense initializer or constant. raw holds the little-endian
// element bytes, the layout ONNX defines for raw_data.
type tensor struct {
	name  string
	dims  []int64
	dtype int32
	raw   []byte
	// ext, when set, places raw in an external data file instead of the
	// protobuf: the tensor then records where (ONNX external data).
	ext *externalRef
}

// externalRef is where a tensor's raw bytes lie in an external data file,
// relative to the model file's directory.
type externalRef struct {
	location       string
	offset, length int64
}

func floatTensor(name string, dims []int64, data []float32) tensor {
	raw := make([]byte, 4*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	return tensor{name: name, dims: dims, dtype: dtypeFloat, raw: raw}
}

func int64Tensor(name string, dims []int64, data []int64) tensor {
	raw := make([]byte, 8*len(data))
	for i, v := range data {
		binary.LittleEndian.PutUint64(raw[8*i:], uint64(v))
	}
	return tensor{name: name, dims: dims, dtype: dtypeInt64, raw: raw}
}

// attribute is one node attribute; kind selects which value field is set.
type attribute struct {
	name string
	kind int
	i    int64
	f    float32
	ints []int64
	t    *tensor
}

func intAttr(name string, v int64) attribute { return attribute{name: name, kind: attrTypeInt, i: v} }

func floatAttr(name string, v float32) attribute {
	return attribute{name: name, kind: attrTypeFloat, f: v}
}

func intsAttr(name string, v ...int64) attribute {
	return attribute{name: name, kind: attrTypeInts, ints: v}
}

func tensorAttr(name string, t tensor) attribute {
	return attribute{name: name, kind: attrTypeTensor, t: &t}
}

type node struct {
	name    string
	opType  string
	inputs  []string
	outputs []string
	attrs   []attribute
}

// dim is one dimension of a declared shape: a fixed size, or a symbolic name
// when param is set.
type dim struct {
	value int64
	param string
}

type valueInfo struct {
	name  string
	dtype int32
	shape []dim
}

type graph struct {
	name    string
	nodes   []node
	inits   []tensor
	inputs  []valueInfo
	outputs []valueInfo
}

type model struct {
	producer string
	version  string
	doc      string
	metadata [][2]string
	graph    graph
}

// appendMessage writes a length-delimited submessage built by fn.
func appendMessage(b []byte, num protowire.Number, fn func([]byte) []byte) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, fn(nil))
}

func appendString(b []byte, num protowire.Number, s string) []byte {
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendString(b, s)
}

func appendVarint(b []byte, num protowire.Number, v uint64) []byte {
	b = protowire.AppendTag(b, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

// appendPackedInt64 writes a repeated int64 field in packed form, the proto3
// default encoding for repeated scalars.
func appendPackedInt64(b []byte, num protowire.Number, vs []int64) []byte {
	if len(vs) == 0 {
		return b
	}
	var packed []byte
	for _, v := range vs {
		packed = protowire.AppendVarint(packed, uint64(v))
	}
	b = protowire.AppendTag(b, num, protowire.BytesType)
	return protowire.AppendBytes(b, packed)
}

func (t *tensor) appendTo(b []byte) []byte {
	b = appendPackedInt64(b, fieldTensorDims, t.dims)
	b = appendVarint(b, fieldTensorDataType, uint64(t.dtype))
	b = appendString(b, fieldTensorName, t.name)
	if t.ext != nil {
		for _, kv := range [][2]string{
			{"location", t.ext.location},
			{"offset", strconv.FormatInt(t.ext.offset, 10)},
			{"length", strconv.FormatInt(t.ext.length, 10)},
		} {
			b = appendMessage(b, fieldTensorExternal, func(b []byte) []byte {
				b = appendString(b, fieldEntryKey, kv[0])
				return appendString(b, fieldEntryValue, kv[1])
			})
		}
		return appendVarint(b, fieldTensorLocation, dataLocationExtern)
	}
	b = protowire.AppendTag(b, fieldTensorRawData, protowire.BytesType)
	return protowire.AppendBytes(b, t.raw)
}

func (a *attribute) appendTo(b []byte) []byte {
	b = appendString(b, fieldAttrName, a.name)
	switch a.kind {
	case attrTypeFloat:
		b = protowire.AppendTag(b, fieldAttrF, protowire.Fixed32Type)
		b = protowire.AppendFixed32(b, math.Float32bits(a.f))
	case attrTypeInt:
		b = appendVarint(b, fieldAttrI, uint64(a.i))
	case attrTypeInts:
		b = appendPackedInt64(b, fieldAttrInts, a.ints)
	case attrTypeTensor:
		b = appendMessage(b, fieldAttrT, a.t.appendTo)
	}
	return appendVarint(b, fieldAttrType, uint64(a.kind))
}

func (n *node) appendTo(b []byte) []byte {
	for _, in := range n.inputs {
		b = appendString(b, fieldNodeInput, in)
	}
	for _, out := range n.outputs {
		b = appendString(b, fieldNodeOutput, out)
	}
	b = appendString(b, fieldNodeName, n.name)
	b = appendString(b, fieldNodeOpType, n.opType)
	for i := range n.attrs {
		b = appendMessage(b, fieldNodeAttribute, n.attrs[i].appendTo)
	}
	return b
}

func (v *valueInfo) appendTo(b []byte) []byte {
	b = appendString(b, fieldValueInfoName, v.name)
	return appendMessage(b, fieldValueInfoType, func(b []byte) []byte {
		return appendMessage(b, fieldTypeTensor, func(b []byte) []byte {
			b = appendVarint(b, fieldTensorTypeElem, uint64(v.dtype))
			return appendMessage(b, fieldTensorTypeShape, func(b []byte) []byte {
				for _, d := range v.shape {
					b = appendMessage(b, fieldShapeDim, func(b []byte) []byte {
						if d.param != "" {
							return appendString(b, fieldDimParam, d.param)
						}
						return appendVarint(b, fieldDimValue, uint64(d.value))
					})
				}
				return b
			})
		})
	})
}

func (g *graph) appendTo(b []byte) []byte {
	for i := range g.nodes {
		b = appendMessage(b, fieldGraphNode, g.nodes[i].appendTo)
	}
	b = appendString(b, fieldGraphName, g.name)
	for i := range g.inits {
		b = appendMessage(b, fieldGraphInitializer, g.inits[i].appendTo)
	}
	for i := range g.inputs {
		b = appendMessage(b, fieldGraphInput, g.inputs[i].appendTo)
	}
	for i := range g.outputs {
		b = appendMessage(b, fieldGraphOutput, g.outputs[i].appendTo)
	}
	return b
}

// marshal encodes the model as an ONNX ModelProto.
func (m *model) marshal() []byte {
	var b []byte
	b = appendVarint(b, fieldModelIRVersion, irVersion)
	b = appendString(b, fieldModelProducerName, m.producer)
	b = appendString(b, fieldModelProducerVer, m.version)
	if m.doc != "" {
		b = appendString(b, fieldModelDocString, m.doc)
	}
	b = appendMessage(b, fieldModelGraph, m.graph.appendTo)
	b = appendMessage(b, fieldModelOpsetImport, func(b []byte) []byte {
		// The empty domain is the default "ai.onnx" operator set.
		b = appendString(b, fieldOpsetDomain, "")
		return appendVarint(b, fieldOpsetVersion, opsetVersion)
	})
	for _, kv := range m.metadata {
		b = appendMessage(b, fieldModelMetadataProps, func(b []byte) []byte {
			b = appendString(b, fieldEntryKey, kv[0])
			return appendString(b, fieldEntryValue, kv[1])
		})
	}
	return b
}
