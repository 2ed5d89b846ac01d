package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// The product links none of the lab, and without the faultinject tag it has
// no fault or crash seam.
func TestTheProductCarriesNoHarness(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.Contains(dep, "/internal/lab") {
			t.Errorf("ebpf-redirect links %s", dep)
		}
	}
	out, err = exec.Command(goTool, "list", "-f", "{{.GoFiles}}", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	if strings.Contains(string(out), "faultinject") {
		t.Errorf("the product build has the fault seams: %s", out)
	}
	if seam != nil {
		t.Errorf("a seam is set in the product build")
	}
}
