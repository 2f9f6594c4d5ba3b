package ort

import (
	"encoding/binary"
	"math"
)

// Half-precision conversions. Exports in float16 or bfloat16 keep their KV
// cache in that type, which this package only moves as bytes; logits are
// read into float32 for sampling. The float32 to half directions round to
// nearest, ties to even, as hardware and ONNX Runtime's Cast do.

// f16ToF32 widens an IEEE 754 binary16 value; every one is exact in
// float32, subnormals, infinities and NaN payloads included.
func f16ToF32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	frac := uint32(h & 0x3ff)
	switch exp {
	case 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | frac<<13)
	case 0:
		// Zero or subnormal: frac·2^-24, exact in float32.
		v := float32(frac) * (1.0 / (1 << 24))
		if sign != 0 {
			v = -v
		}
		return v
	}
	return math.Float32frombits(sign | (exp+127-15)<<23 | frac<<13)
}

// f32ToF16 narrows to binary16, rounding to nearest even; values beyond
// the largest half round to infinity, tiny ones to subnormals or zero, and
// NaN stays NaN (quiet).
func f32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int(b>>23) & 0xff
	frac := b & 0x7fffff
	if exp == 0xff {
		if frac == 0 {
			return sign | 0x7c00
		}
		return sign | 0x7e00 | uint16(frac>>13)
	}
	e := exp - 127 + 15
	if e >= 0x1f {
		return sign | 0x7c00
	}
	if e <= 0 {
		if e < -10 {
			return sign // below half the smallest subnormal
		}
		m := frac | 0x800000
		shift := uint(14 - e)
		h := m >> shift
		rem, half := m&(1<<shift-1), uint32(1)<<(shift-1)
		if rem > half || (rem == half && h&1 == 1) {
			h++ // may carry into the smallest normal, which is right
		}
		return sign | uint16(h)
	}
	h := uint32(e)<<10 | frac>>13
	if rem := frac & 0x1fff; rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++ // may carry into infinity, which is right
	}
	return sign | uint16(h)
}

// bf16ToF32 widens a bfloat16, the upper half of a float32.
func bf16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// f32ToBF16 narrows to bfloat16, rounding to nearest even; NaN stays NaN
// (quiet) rather than rounding into infinity.
func f32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 {
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// widen decodes n little-endian 16-bit values of src into dst, as float16
// or bfloat16.
func widen(dst []float32, src []byte, bfloat bool) {
	for i := range dst {
		h := binary.LittleEndian.Uint16(src[2*i:])
		if bfloat {
			dst[i] = bf16ToF32(h)
		} else {
			dst[i] = f16ToF32(h)
		}
	}
}
