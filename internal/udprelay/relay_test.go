package udprelay

import "testing"

// longPacket is a QUIC v1 long-header packet of type typ with 8-byte
// connection IDs and a payload of n bytes (an Initial gets an empty token).
func longPacket(typ byte, n int) []byte {
	b := []byte{0xc0 | typ<<4, 0, 0, 0, 1, 8}
	b = append(b, make([]byte, 8)...)
	b = append(b, 8)
	b = append(b, make([]byte, 8)...)
	if typ == 0 {
		b = append(b, 0) // token length
	}
	b = append(b, 0x40|byte(n>>8), byte(n)) // two-byte Length
	return append(b, make([]byte, n)...)
}

func TestIsHandshake(t *testing.T) {
	initial, zeroRTT, handshake := longPacket(0, 40), longPacket(1, 300), longPacket(2, 60)
	cat := func(ps ...[]byte) []byte {
		var b []byte
		for _, p := range ps {
			b = append(b, p...)
		}
		return b
	}
	for name, tt := range map[string]struct {
		datagram []byte
		want     bool
	}{
		"handshake alone":              {handshake, true},
		"initial, then handshake":      {cat(initial, handshake), true},
		"initial alone":                {initial, false},
		"initial, then 0-RTT":          {cat(initial, zeroRTT), false},
		"initial, 0-RTT, handshake":    {cat(initial, zeroRTT, handshake), true},
		"short header":                 {[]byte{0x40, 1, 2, 3}, false},
		"initial, then a short header": {cat(initial, []byte{0x40, 1, 2, 3}), false},
		"truncated initial":            {initial[:20], false},
		"empty":                        {nil, false},
	} {
		if got := isHandshake(tt.datagram); got != tt.want {
			t.Errorf("%s: %v, want %v", name, got, tt.want)
		}
	}
}
