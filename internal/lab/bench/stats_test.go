package bench

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestPercentiles(t *testing.T) {
	var s []int64
	for i := 1000; i >= 1; i-- {
		s = append(s, int64(i))
	}
	p := percentiles(s)
	if p.N != 1000 || p.P50 != 500 || p.P99 != 990 || p.P999 != 999 || p.Max != 1000 {
		t.Errorf("%+v", p)
	}
	if (percentiles(nil) != Percentiles{}) {
		t.Error("empty sample")
	}
}

func TestSummarizeIgnoresNonFinite(t *testing.T) {
	s := summarize([]float64{3, math.NaN(), 1, math.Inf(1), 2, 10})
	if s.N != 4 || s.Median != 2.5 || s.Min != 1 || s.Max != 10 {
		t.Errorf("%+v", s)
	}
}

func samples(vals ...float64) []Sample {
	var out []Sample
	for i, v := range vals {
		out = append(out, Sample{Rep: i + 1, Rate: v})
	}
	return out
}

// A ratio is withheld when its spread over the repetitions is larger than its
// distance from 1, and shown otherwise.
func TestRatioRefusedWhenSpreadExceedsDifference(t *testing.T) {
	r, ok := pairedRatio(mConnRate, Iptables, samples(130, 120, 125), samples(100, 100, 100))
	if !ok || !r.Shown || math.Abs(r.Median-1.25) > 1e-9 || math.Abs(r.Spread-0.1) > 1e-9 {
		t.Errorf("clear difference: %+v", r)
	}
	if !strings.Contains(r.String(), "1.25×") {
		t.Errorf("shown ratio prints %q", r.String())
	}
	r, ok = pairedRatio(mConnRate, Iptables, samples(90, 115, 103), samples(100, 100, 100))
	if !ok || r.Shown {
		t.Errorf("noise: %+v", r)
	}
	if !strings.Contains(r.String(), "noise") {
		t.Errorf("withheld ratio prints %q", r.String())
	}
	// Pairs are by repetition; a zero denominator is skipped.
	r, ok = pairedRatio(mConnRate, None, samples(10, 20), []Sample{{Rep: 2, Rate: 10}, {Rep: 1, Rate: 0}})
	if !ok || r.N != 1 || r.Median != 2 {
		t.Errorf("pairing: %+v", r)
	}
}

func TestTargets(t *testing.T) {
	w := &WorkloadResult{Name: "conn-out", Ratios: []Ratio{
		{Metric: "rate", Over: Iptables, Median: 1.3, Min: 1.25, Max: 1.4},
		{Metric: "rate", Over: None, Median: 0.9, Min: 0.85, Max: 0.99},
		{Metric: "cpu_per_unit", Over: Iptables, Median: 0.8, Min: 0.7, Max: 1.1},
	}}
	got := map[string]Target{}
	for _, tg := range evalTargets([]*WorkloadResult{w}) {
		if tg.Workload == "conn-out" {
			got[tg.Metric+"/"+tg.Over] = tg
		}
	}
	if tg := got["rate/iptables"]; tg.Status != "met" || !tg.Clear {
		t.Errorf("rate vs iptables: %+v", tg)
	}
	if tg := got["rate/none"]; tg.Status != "missed" || tg.Clear || !strings.Contains(tg.Detail, "missed by 5.3 %") {
		t.Errorf("rate vs none: %+v", tg)
	}
	if tg := got["cpu_per_unit/iptables"]; tg.Status != "met" || tg.Clear {
		t.Errorf("cpu: %+v", tg)
	}
}

// fakeReport is a complete report with made-up numbers, for the writers.
func fakeReport() *Report {
	rep := &Report{Meta: Meta{Kernel: "Linux 6.18 #1", Arch: "x86_64", CPU: "Test CPU", CPUs: 2, Date: "2025-01-01T00:00:00Z", Go: "go1.26", Command: "ebpf-redirect bench"},
		Settings: Settings{Reps: 3, ConnWorkers: 8, RRWorkers: 1, BulkWorkers: 1, MsgSize: 100, ConntrackMax: 2048, Pinned: true, BPFStats: true}}
	for _, w := range workloads {
		wr := &WorkloadResult{Name: w.Name, Kind: w.Kind, Direction: w.Dir, w: w}
		for k, name := range Backends {
			br := &BackendResult{Backend: name}
			for r := 1; r <= 3; r++ {
				f := float64(10*k + r)
				br.Samples = append(br.Samples, Sample{Rep: r, Ops: 1000, Rate: 1000 + f*50, LatP50US: 40 + f, LatP99US: 90 + f,
					LatP999US: 300 + f, CPUPerUnit: 0.3 - f/100, CPU: CPUSample{TotalS: 1, GenS: 0.2, GenUserS: 0.02}, ElapsedS: 1,
					BPF: map[string]ProgStat{"pod_connect4": {RunCnt: 1000, RunTimeNS: 1e6}}})
			}
			wr.Backends = append(wr.Backends, br)
		}
		finishWorkload(wr)
		rep.Workloads = append(rep.Workloads, wr)
	}
	rep.Generator = &GeneratorCheck{Workers: 8, Samples: samples(5000, 5100, 5200)}
	finishGenerator(rep)
	rep.Targets = evalTargets(rep.Workloads)
	rep.Notes = notes(rep)
	return rep
}

func TestWritersAreWellFormed(t *testing.T) {
	rep := fakeReport()

	var js bytes.Buffer
	if err := WriteJSON(&js, rep); err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	var table bytes.Buffer
	if err := WriteTable(&table, &back); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"conn-out", "conntrack-out", "EBPF/IPTABLES", "TARGETS", "pod_connect4", "Test CPU", "Linux 6.18"} {
		if !strings.Contains(table.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, table.String())
		}
	}

	var svg bytes.Buffer
	if err := WriteSVG(&svg, &back); err != nil {
		t.Fatal(err)
	}
	dec := xml.NewDecoder(&svg)
	rects := 0
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("SVG is not well-formed XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "rect" {
			rects++
		}
	}
	if rects < 10 {
		t.Errorf("SVG has %d rects", rects)
	}
}

func TestMarkdownKeepsTheProse(t *testing.T) {
	path := filepath.Join(t.TempDir(), "b.md")
	if err := os.WriteFile(path, []byte("# Title\n\nprose before\n\n"+mdBegin+"\nold\n"+mdEnd+"\n\nprose after\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteMarkdown(path, fakeReport(), "b.svg", "a shared machine"); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	s := string(b)
	for _, want := range []string{"prose before", "prose after", "| conn-out |", "![", "b.svg", "a shared machine", "Test CPU"} {
		if !strings.Contains(s, want) {
			t.Errorf("markdown lacks %q", want)
		}
	}
	if strings.Contains(s, "\nold\n") || strings.Count(s, mdBegin) != 1 {
		t.Error("the old results were not replaced")
	}
	// Without markers: a new document.
	fresh := filepath.Join(t.TempDir(), "new.md")
	if err := WriteMarkdown(fresh, fakeReport(), "", ""); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(fresh); !strings.Contains(string(b), mdBegin) {
		t.Error("new document lacks the markers")
	}
}
