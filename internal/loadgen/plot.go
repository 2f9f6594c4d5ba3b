package loadgen

import (
	"cmp"
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"
	"slices"
	"strings"
	"time"
)

// The plots are drawn here with image/png and a 3x5 pixel font rather than
// with a plotting library: two chart kinds with lines, log axes and short
// labels are a few hundred lines, against a dependency tree with fonts,
// PDF and LaTeX back ends the bench would never use.

var palette = []color.RGBA{
	{0x1f, 0x77, 0xb4, 0xff}, {0xd6, 0x27, 0x28, 0xff}, {0x2c, 0xa0, 0x2c, 0xff},
	{0xff, 0x7f, 0x0e, 0xff}, {0x94, 0x67, 0xbd, 0xff}, {0x8c, 0x56, 0x4b, 0xff},
	{0xe3, 0x77, 0xc2, 0xff}, {0x17, 0xbe, 0xcf, 0xff},
}

var (
	black = color.RGBA{0, 0, 0, 0xff}
	grey  = color.RGBA{0xdd, 0xdd, 0xdd, 0xff}
)

// glyphs is a 3x5 font: five rows of three bits, the high bit leftmost.
var glyphs = map[rune][5]uint8{
	'0': {7, 5, 5, 5, 7}, '1': {2, 6, 2, 2, 7}, '2': {7, 1, 7, 4, 7}, '3': {7, 1, 3, 1, 7},
	'4': {5, 5, 7, 1, 1}, '5': {7, 4, 7, 1, 7}, '6': {7, 4, 7, 5, 7}, '7': {7, 1, 1, 2, 2},
	'8': {7, 5, 7, 5, 7}, '9': {7, 5, 7, 1, 7},
	'a': {2, 5, 7, 5, 5}, 'b': {6, 5, 6, 5, 6}, 'c': {3, 4, 4, 4, 3}, 'd': {6, 5, 5, 5, 6},
	'e': {7, 4, 6, 4, 7}, 'f': {7, 4, 6, 4, 4}, 'g': {3, 4, 5, 5, 3}, 'h': {5, 5, 7, 5, 5},
	'i': {7, 2, 2, 2, 7}, 'j': {1, 1, 1, 5, 2}, 'k': {5, 5, 6, 5, 5}, 'l': {4, 4, 4, 4, 7},
	'm': {5, 7, 7, 5, 5}, 'n': {6, 5, 5, 5, 5}, 'o': {2, 5, 5, 5, 2}, 'p': {6, 5, 6, 4, 4},
	'q': {2, 5, 5, 6, 3}, 'r': {6, 5, 6, 5, 5}, 's': {3, 4, 2, 1, 6}, 't': {7, 2, 2, 2, 2},
	'u': {5, 5, 5, 5, 7}, 'v': {5, 5, 5, 5, 2}, 'w': {5, 5, 7, 7, 5}, 'x': {5, 5, 2, 5, 5},
	'y': {5, 5, 2, 2, 2}, 'z': {7, 1, 2, 4, 7},
	'.': {0, 0, 0, 0, 2}, '=': {0, 7, 0, 7, 0}, '-': {0, 0, 7, 0, 0}, '/': {1, 1, 2, 4, 4},
	':': {0, 2, 0, 2, 0}, '(': {1, 2, 2, 2, 1}, ')': {4, 2, 2, 2, 4}, '%': {5, 1, 2, 4, 5},
	',': {0, 0, 0, 2, 4}, '+': {0, 2, 7, 2, 0}, 'µ': {0, 5, 5, 7, 4},
}

const textScale = 2

type canvas struct{ img *image.RGBA }

func newCanvas(w, h int) *canvas {
	img := image.NewRGBA(image.Rect(0, 0, w, h))
	draw.Draw(img, img.Bounds(), image.White, image.Point{}, draw.Src)
	return &canvas{img}
}

func (c *canvas) line(x0, y0, x1, y1 int, col color.RGBA, thick int) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		for i := range thick {
			for j := range thick {
				c.img.SetRGBA(x0+i-thick/2, y0+j-thick/2, col)
			}
		}
		if x0 == x1 && y0 == y1 {
			return
		}
		if e2 := 2 * e; e2 >= dy {
			e += dy
			x0 += sx
		} else {
			e += dx
			y0 += sy
		}
	}
}

// text draws s with its top-left corner at x, y; unknown runes are blank.
func (c *canvas) text(x, y int, s string, col color.RGBA) {
	for _, r := range strings.ToLower(s) {
		g := glyphs[r]
		for row, bits := range g {
			for colIdx := range 3 {
				if bits&(4>>colIdx) == 0 {
					continue
				}
				for i := range textScale {
					for j := range textScale {
						c.img.SetRGBA(x+colIdx*textScale+i, y+row*textScale+j, col)
					}
				}
			}
		}
		x += 4 * textScale
	}
}

func textWidth(s string) int { return len([]rune(s)) * 4 * textScale }

func abs(v int) int { return max(v, -v) }

func sign(v int) int { return cmp.Compare(v, 0) }

// panel is one chart's frame in pixels and its axis ranges.
type panel struct {
	c                      *canvas
	x0, y0, x1, y1         int // plot area
	xmin, xmax, ymin, ymax float64
	logX                   bool
}

func (p *panel) px(x float64) int {
	if p.logX {
		lo, hi := math.Log10(p.xmin), math.Log10(p.xmax)
		return p.x0 + int((math.Log10(x)-lo)/(hi-lo)*float64(p.x1-p.x0))
	}
	return p.x0 + int((x-p.xmin)/(p.xmax-p.xmin)*float64(p.x1-p.x0))
}

func (p *panel) py(y float64) int {
	return p.y1 - int((y-p.ymin)/(p.ymax-p.ymin)*float64(p.y1-p.y0))
}

func (p *panel) frame(title, xlabel string) {
	c := p.c
	c.text(p.x0, p.y0-24, title, black)
	c.text((p.x0+p.x1-textWidth(xlabel))/2, p.y1+24, xlabel, black)
	c.line(p.x0, p.y1, p.x1, p.y1, black, 1)
	c.line(p.x0, p.y0, p.x0, p.y1, black, 1)
}

// durationTicks labels decades (log axis) of a latency range.
func (p *panel) durationTicks() {
	for e := math.Floor(math.Log10(p.xmin)); e <= math.Ceil(math.Log10(p.xmax)); e++ {
		v := math.Pow(10, e)
		if v < p.xmin || v > p.xmax {
			continue
		}
		x := p.px(v)
		p.c.line(x, p.y0, x, p.y1, grey, 1)
		lbl := fmtDur(time.Duration(v))
		p.c.text(x-textWidth(lbl)/2, p.y1+6, lbl, black)
	}
}

func (p *panel) yTicks(n int, format func(float64) string) {
	for i := 0; i <= n; i++ {
		v := p.ymin + (p.ymax-p.ymin)*float64(i)/float64(n)
		y := p.py(v)
		p.c.line(p.x0, y, p.x1, y, grey, 1)
		lbl := format(v)
		if v == 0 {
			lbl = "0"
		}
		p.c.text(p.x0-textWidth(lbl)-6, y-5, lbl, black)
	}
}

func (p *panel) legend(names []string) {
	for i, n := range names {
		// Bottom right, where CDFs and rising curves leave room.
		x := p.x1 - 40 - textWidth(longest(names))
		y := p.y1 - 10 - (len(names)-i)*16
		col := palette[i%len(palette)]
		p.c.line(x, y+5, x+20, y+5, col, 3)
		p.c.text(x+26, y, n, black)
	}
}

func longest(names []string) string {
	var l string
	for _, n := range names {
		if len(n) > len(l) {
			l = n
		}
	}
	return l
}

func seriesName(r *Result) string {
	name := r.Label
	if name == "" {
		name = "run"
	}
	name += " " + r.Proto
	if r.NewConn {
		name += " newconn"
		if r.ZeroRTT {
			name += " 0rtt"
		}
	}
	return fmt.Sprintf("%s c=%d", name, r.Concurrency)
}

// PlotCDF draws the cumulative distributions of time to first token and
// of inter-token latency, one line per run, on log time axes.
func PlotCDF(w io.Writer, results []*Result) error {
	c := newCanvas(1400, 560)
	panels := []struct {
		title string
		data  func(*Result) []time.Duration
		left  int
	}{
		{"time to first token: cdf", func(r *Result) []time.Duration { return r.TTFTs }, 90},
		{"inter-token latency: cdf", func(r *Result) []time.Duration { return r.ITLs }, 790},
	}
	var names []string
	for _, r := range results {
		names = append(names, seriesName(r))
	}
	for _, pn := range panels {
		lo, hi := math.Inf(1), math.Inf(-1)
		for _, r := range results {
			if d := pn.data(r); len(d) > 0 {
				lo, hi = math.Min(lo, float64(d[0])), math.Max(hi, float64(d[len(d)-1]))
			}
		}
		if math.IsInf(lo, 0) {
			continue
		}
		lo = math.Pow(10, math.Floor(math.Log10(math.Max(lo, 1))))
		hi = math.Pow(10, math.Ceil(math.Log10(math.Max(hi, lo*10))))
		p := &panel{c: c, x0: pn.left, y0: 50, x1: pn.left + 560, y1: 490, xmin: lo, xmax: hi, ymin: 0, ymax: 1, logX: true}
		p.durationTicks()
		p.yTicks(4, func(v float64) string { return fmt.Sprintf("%.2f", v) })
		p.frame(pn.title, "latency (log scale)")
		for i, r := range results {
			d := pn.data(r)
			col := palette[i%len(palette)]
			// One point per pixel column is enough for a CDF of any size.
			step := max(1, len(d)/1000)
			prevX, prevY := -1, -1
			for j := 0; j < len(d); j += step {
				x, y := p.px(math.Max(float64(d[j]), lo)), p.py(float64(j+1)/float64(len(d)))
				if prevX >= 0 {
					c.line(prevX, prevY, x, y, col, 2)
				}
				prevX, prevY = x, y
			}
			if prevX >= 0 {
				c.line(prevX, prevY, p.px(float64(d[len(d)-1])), p.py(1), col, 2)
			}
		}
		p.legend(names)
	}
	return png.Encode(w, c.img)
}

// PlotTTFT draws time to first token (p50 solid, p99 thin) against
// concurrency, one line per label and protocol.
func PlotTTFT(w io.Writer, results []*Result) error {
	c := newCanvas(900, 560)
	type point struct {
		conc     int
		p50, p99 time.Duration
	}
	series := map[string][]point{}
	var order []string
	concs := map[int]bool{}
	var ymax float64
	for _, r := range results {
		if r.TTFT.Count == 0 {
			continue
		}
		name := r.Label + " " + r.Proto
		if _, ok := series[name]; !ok {
			order = append(order, name)
		}
		series[name] = append(series[name], point{r.Concurrency, r.TTFT.P50, r.TTFT.P99})
		concs[r.Concurrency] = true
		ymax = math.Max(ymax, float64(r.TTFT.P99))
	}
	if len(order) == 0 {
		return png.Encode(w, c.img)
	}
	levels := make([]int, 0, len(concs))
	for k := range concs {
		levels = append(levels, k)
	}
	slices.Sort(levels)
	xmin, xmax := float64(levels[0]), float64(levels[len(levels)-1])
	if xmax == xmin {
		xmin, xmax = xmin/2, xmax*2
	}
	p := &panel{c: c, x0: 110, y0: 50, x1: 860, y1: 490, xmin: xmin / 1.2, xmax: xmax * 1.2, ymin: 0, ymax: ymax * 1.1, logX: true}
	p.yTicks(5, func(v float64) string { return fmtDur(time.Duration(v)) })
	for _, l := range levels {
		x := p.px(float64(l))
		c.line(x, p.y0, x, p.y1, grey, 1)
		lbl := fmt.Sprint(l)
		c.text(x-textWidth(lbl)/2, p.y1+6, lbl, black)
	}
	p.frame("time to first token against concurrency: p50 thick, p99 thin", "concurrent requests (log scale)")
	for i, name := range order {
		pts := series[name]
		slices.SortFunc(pts, func(a, b point) int { return a.conc - b.conc })
		col := palette[i%len(palette)]
		for j := 1; j < len(pts); j++ {
			c.line(p.px(float64(pts[j-1].conc)), p.py(float64(pts[j-1].p50)), p.px(float64(pts[j].conc)), p.py(float64(pts[j].p50)), col, 3)
			c.line(p.px(float64(pts[j-1].conc)), p.py(float64(pts[j-1].p99)), p.px(float64(pts[j].conc)), p.py(float64(pts[j].p99)), col, 1)
		}
		for _, pt := range pts {
			x, y := p.px(float64(pt.conc)), p.py(float64(pt.p50))
			c.line(x-3, y, x+3, y, col, 3)
		}
	}
	p.legend(order)
	return png.Encode(w, c.img)
}
