package redirect

import (
	"path/filepath"
	"strings"
	"testing"
)

func TestValidatePodID(t *testing.T) {
	for _, id := range []string{"a", "pod-1", "3f2a9c1e-1b2c-4d5e-8f90-123456789abc", "ns_name.pod", strings.Repeat("x", 63)} {
		if err := ValidatePodID(id); err != nil {
			t.Errorf("ValidatePodID(%q) = %v, want ok", id, err)
		}
	}
	for _, id := range []string{"", ".", "..", "../x", "a/b", "/abs", "a b", "a\x00b", "-lead", ".hidden", "é", "a~b", strings.Repeat("x", 64)} {
		if err := ValidatePodID(id); err == nil {
			t.Errorf("ValidatePodID(%q) accepted", id)
		}
	}
}

// Whatever is accepted stays one path component inside the pods directory.
func FuzzValidatePodID(f *testing.F) {
	for _, s := range []string{"pod", "..", "a/b", "a.b", "x\x00", " "} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, id string) {
		if ValidatePodID(id) != nil {
			return
		}
		s := &store{root: "/sys/fs/bpf/erd"}
		dir := s.podDir(id)
		if filepath.Dir(dir) != "/sys/fs/bpf/erd/pods" || filepath.Clean(dir) != dir {
			t.Fatalf("id %q escapes the pods directory: %s", id, dir)
		}
		if strings.ContainsAny(id, "/\x00 ~") || len(id) > maxPodID || strings.Contains(filepath.Base(dir), ".") {
			t.Fatalf("id %q accepted", id)
		}
	})
}
