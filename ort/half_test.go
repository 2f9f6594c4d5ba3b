package ort

import (
	"math"
	"testing"
)

func TestFloat16Bits(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	// Exact values, both ways.
	exact := []struct {
		h uint16
		f float32
	}{
		{0x0000, 0}, {0x3c00, 1}, {0xc000, -2}, {0x3555, 0.333251953125},
		{0x7bff, 65504},                 // largest finite
		{0x0400, 6.103515625e-05},       // smallest normal
		{0x0001, 5.960464477539063e-08}, // smallest subnormal
		{0x03ff, 6.097555160522461e-05}, // largest subnormal
		{0x7c00, inf}, {0xfc00, -inf},
	}
	for _, c := range exact {
		if got := f16ToF32(c.h); got != c.f {
			t.Errorf("f16ToF32(%#04x) = %v, want %v", c.h, got, c.f)
		}
		if got := f32ToF16(c.f); got != c.h {
			t.Errorf("f32ToF16(%v) = %#04x, want %#04x", c.f, got, c.h)
		}
	}
	if got := f16ToF32(0x8000); got != 0 || !math.Signbit(float64(got)) {
		t.Errorf("f16ToF32(0x8000) = %v, want -0", got)
	}
	if got := f32ToF16(float32(math.Copysign(0, -1))); got != 0x8000 {
		t.Errorf("f32ToF16(-0) = %#04x, want 0x8000", got)
	}
	for _, h := range []uint16{0x7e00, 0x7c01, 0xfe00} {
		if got := f16ToF32(h); !math.IsNaN(float64(got)) {
			t.Errorf("f16ToF32(%#04x) = %v, want NaN", h, got)
		}
	}
	if got := f32ToF16(nan); got&0x7c00 != 0x7c00 || got&0x3ff == 0 {
		t.Errorf("f32ToF16(NaN) = %#04x, want a NaN", got)
	}
	// Rounding: to nearest, ties to even.
	rounding := []struct {
		f float32
		h uint16
	}{
		{1 + 1.0/2048, 0x3c00},             // tie between 1 and next: even (1)
		{1 + 3.0/2048, 0x3c02},             // tie: up to even
		{1 + 1.0/2048 + 1.0/65536, 0x3c01}, // above the tie
		{65519, 0x7bff},                    // below the overflow tie
		{65520, 0x7c00},                    // tie at the top rounds to infinity
		{1e6, 0x7c00},                      // overflow
		{2.9802322387695312e-08, 0x0000},   // half the smallest subnormal: tie to even (0)
		{2.9802326e-08, 0x0001},            // just above it
		{8.940696716308594e-08, 0x0002},    // 1.5 subnormals: tie to even (2)
		{6.099e-05, 0x03ff},                // nearest is the largest subnormal
		{6.1005353927612305e-05, 0x0400},   // tie between it and the smallest normal: even
		{6.102025508880615e-05, 0x0400},    // rounds up into the smallest normal
		{1e-10, 0x0000},                    // far below: zero
		{-1 - 3.0/2048, 0xbc02},            // sign kept
	}
	for _, c := range rounding {
		if got := f32ToF16(c.f); got != c.h {
			t.Errorf("f32ToF16(%v) = %#04x, want %#04x", c.f, got, c.h)
		}
	}
}

func TestBFloat16Bits(t *testing.T) {
	cases := []struct {
		f float32
		h uint16
	}{
		{1, 0x3f80}, {-2, 0xc000}, {float32(math.Inf(1)), 0x7f80},
		{math.Float32frombits(0x3f808000), 0x3f80}, // tie: even (down)
		{math.Float32frombits(0x3f818000), 0x3f82}, // tie: even (up)
		{math.Float32frombits(0x3f808001), 0x3f81}, // above the tie
		{math.Float32frombits(0x7f7fffff), 0x7f80}, // largest float32 rounds to infinity
		{math.Float32frombits(0x00010000), 0x0001}, // subnormal kept
	}
	for _, c := range cases {
		if got := f32ToBF16(c.f); got != c.h {
			t.Errorf("f32ToBF16(%#08x) = %#04x, want %#04x", math.Float32bits(c.f), got, c.h)
		}
	}
	if got := f32ToBF16(math.Float32frombits(0x7f800001)); got&0x7f80 != 0x7f80 || got&0x7f == 0 {
		t.Errorf("f32ToBF16(signalling NaN) = %#04x, want a NaN", got)
	}
	if got := bf16ToF32(0x3f80); got != 1 {
		t.Errorf("bf16ToF32(0x3f80) = %v", got)
	}
	if got := bf16ToF32(0x7fc0); !math.IsNaN(float64(got)) {
		t.Errorf("bf16ToF32(0x7fc0) = %v, want NaN", got)
	}
}

// Every half value survives the round trip through float32.
func TestFloat16RoundTrip(t *testing.T) {
	for h := range 1 << 16 {
		f := f16ToF32(uint16(h))
		if math.IsNaN(float64(f)) {
			continue
		}
		if back := f32ToF16(f); back != uint16(h) {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
		if back := f32ToBF16(bf16ToF32(uint16(h))); back != uint16(h) && !math.IsNaN(float64(bf16ToF32(uint16(h)))) {
			t.Fatalf("bfloat16 %#04x -> %#04x", h, back)
		}
	}
}
