package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"slices"
	"strings"
)

// plotRow is one (workload, metric) of the plot with its two ratios.
type plotRow struct {
	label string
	bars  []plotBar
}

type plotBar struct {
	over          string
	v, lo, hi     float64 // the advantage: > 1 means eBPF is better
	shown         bool
	target        float64 // the goal as an advantage, 0 if none
	targetReached bool
}

// advantage turns a ratio (eBPF / other) into "how many times better eBPF is", so that
// every bar reads the same way whether higher or lower is better for the metric.
func advantage(r Ratio) (v, lo, hi float64) {
	if r.Higher {
		return r.Median, r.Min, r.Max
	}
	inv := func(x float64) float64 {
		if x == 0 {
			return math.Inf(1)
		}
		return 1 / x
	}
	return inv(r.Median), inv(r.Max), inv(r.Min)
}

func targetAdvantage(workload, metricKey, over string, higher bool) float64 {
	for _, d := range targetDefs {
		if d.metric != metricKey || d.over != over {
			continue
		}
		for _, w := range d.workloads {
			if w == workload {
				if higher {
					return d.threshold
				}
				return 1 / d.threshold
			}
		}
	}
	return 0
}

func plotRows(rep *Report) []plotRow {
	var out []plotRow
	for _, w := range rep.Workloads {
		for _, m := range metricsFor(w.w0()) {
			if !m.Ratio {
				continue
			}
			pr := plotRow{label: w.Name + " · " + m.Label}
			for _, over := range []string{Iptables, None} {
				r, ok := w.ratio(m.Key, over)
				if !ok {
					continue
				}
				v, lo, hi := advantage(r)
				t := targetAdvantage(w.Name, m.Key, over, m.Higher)
				pr.bars = append(pr.bars, plotBar{over: over, v: v, lo: lo, hi: hi, shown: r.Shown, target: t, targetReached: t == 0 || v >= t})
			}
			if len(pr.bars) > 0 {
				out = append(out, pr)
			}
		}
	}
	return out
}

// WriteSVG draws the ratios: one row per workload and metric, a bar for eBPF against
// iptables and one against none, as "times better" (right of 1: eBPF better), with
// the range over the repetitions as a whisker, the goal as a tick, and withheld
// (noise) ratios hollow.
func WriteSVG(out io.Writer, rep *Report) error {
	rows := plotRows(rep)
	const (
		width  = 960
		left   = 250
		right  = 40
		top    = 70
		rowH   = 40
		barH   = 13
		bottom = 60
	)
	height := top + rowH*max(len(rows), 1) + bottom
	// A log scale: 2× better and 2× worse are as far from 1.
	lo, hi := 0.8, 1.25
	for _, r := range rows {
		for _, b := range r.bars {
			for _, x := range []float64{b.lo, b.hi, b.target} {
				if x > 0 && !math.IsInf(x, 0) {
					lo, hi = math.Min(lo, x), math.Max(hi, x)
				}
			}
		}
	}
	lo, hi = lo/1.1, hi*1.1
	plotW := float64(width - left - right)
	x := func(v float64) float64 {
		if !(v > 0) {
			v = lo
		}
		v = math.Max(lo, math.Min(hi, v))
		return float64(left) + (math.Log(v)-math.Log(lo))/(math.Log(hi)-math.Log(lo))*plotW
	}
	colour := map[string]string{Iptables: "#1f77b4", None: "#ff7f0e"}

	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	title := fmt.Sprintf("ebpf-redirect: how many times better eBPF is (right of 1: better) — %s, %s", rep.Meta.CPU, shortKernel(rep.Meta.Kernel))
	fmt.Fprintf(&b, `<text x="%d" y="22" font-size="14" font-weight="bold">%s</text>`+"\n", 10, html.EscapeString(title))
	fmt.Fprintf(&b, `<text x="%d" y="40" fill="#555">%s</text>`+"\n", 10, html.EscapeString(fmt.Sprintf(
		"%s, %d repetitions; log scale; bar: median, whisker: range; hollow: spread larger than the difference (no ratio claimed); tick: goal",
		rep.Meta.Date, rep.Settings.Reps)))
	// Grid: 1 always, other ticks where they do not crowd one already drawn.
	drawn := []float64{x(1)}
	ticks := []float64{1}
	for _, v := range []float64{0.1, 0.2, 0.25, 0.33, 0.5, 0.67, 0.8, 0.9, 1.1, 1.25, 1.5, 2, 3, 4, 6, 10, 15, 20, 30, 50, 100, 200} {
		if v < lo || v > hi || slices.ContainsFunc(drawn, func(d float64) bool { return math.Abs(d-x(v)) < 36 }) {
			continue
		}
		drawn = append(drawn, x(v))
		ticks = append(ticks, v)
	}
	for _, v := range ticks {
		stroke, w := "#e5e5e5", 1.0
		if v == 1 {
			stroke, w = "#333", 1.5
		}
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="%s" stroke-width="%.1f"/>`+"\n", x(v), top-8, x(v), top+rowH*len(rows), stroke, w)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%g×</text>`+"\n", x(v), top+rowH*len(rows)+16, v)
	}
	for i, r := range rows {
		y0 := top + i*rowH
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%s</text>`+"\n", left-8, y0+rowH/2+4, html.EscapeString(r.label))
		for j, bar := range r.bars {
			y := float64(y0) + 5 + float64(j)*(barH+3)
			c := colour[bar.over]
			fill, op := c, "0.85"
			if !bar.shown {
				fill, op = "none", "1"
			}
			x1, x2 := x(1), x(bar.v)
			if x2 < x1 {
				x1, x2 = x2, x1
			}
			fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%d" fill="%s" fill-opacity="%s" stroke="%s"/>`+"\n",
				x1, y, math.Max(x2-x1, 1), barH, fill, op, c)
			ym := y + barH/2
			fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#222"/>`+"\n", x(bar.lo), ym, x(bar.hi), ym)
			for _, e := range []float64{bar.lo, bar.hi} {
				fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#222"/>`+"\n", x(e), ym-3, x(e), ym+3)
			}
			if bar.target > 0 {
				tc := "#2ca02c"
				if !bar.targetReached {
					tc = "#d62728"
				}
				fmt.Fprintf(&b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="%s" stroke-width="3"/>`+"\n", x(bar.target), y-1, x(bar.target), y+barH+1, tc)
			}
			label := fmt.Sprintf("%.2f× vs %s", bar.v, bar.over)
			lx, anchor := x(math.Max(bar.v, bar.hi))+6, "start"
			if lx > width-110 {
				lx, anchor = x(math.Min(1, math.Min(bar.v, bar.lo)))-6, "end"
			}
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="10" fill="#333" text-anchor="%s">%s</text>`+"\n", lx, ym+3, anchor, html.EscapeString(label))
		}
	}
	ly := top + rowH*len(rows) + 38
	lx := left
	for _, over := range []string{Iptables, None} {
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="14" height="10" fill="%s"/><text x="%d" y="%d">eBPF vs %s</text>`+"\n", lx, ly-9, colour[over], lx+20, ly, over)
		lx += 160
	}
	fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#2ca02c" stroke-width="3"/><text x="%d" y="%d">goal (red: not reached)</text>`+"\n", lx, ly-10, lx, ly+1, lx+8, ly)
	b.WriteString("</svg>\n")
	_, err := io.WriteString(out, b.String())
	return err
}

func shortKernel(k string) string {
	f := strings.Fields(k)
	if len(f) >= 2 {
		return f[0] + " " + f[1]
	}
	return k
}
