package scale

import (
	"context"
	"io"
	"math"
	"strings"
	"testing"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/privtest"
)

// The measurement runs on a tiny node and its output is well-formed (no
// timing is asserted).
func TestRunIsWellFormed(t *testing.T) {
	privtest.Require(t, "iptables-restore")
	res, err := Run(context.Background(), []int{2}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Points) != 2 || res.Points[0].Backend != "iptables" || res.Points[1].Backend != "ebpf" {
		t.Fatalf("points: %+v", res.Points)
	}
	for _, p := range res.Points {
		if p.Pods != 2 || len(p.Each) != 2 || p.TotalS <= 0 || math.IsNaN(p.MedianMS) {
			t.Errorf("point %+v", p)
		}
	}
	if res.Points[1].BPFMemlockKB <= 0 {
		t.Errorf("no BPF memlock measured for ebpf")
	}
	md := res.Markdown()
	for _, want := range []string{res.Kernel, "| iptables | 2 |", "| ebpf | 2 |"} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}
