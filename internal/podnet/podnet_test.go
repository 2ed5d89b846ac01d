package podnet

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestOpenRejects(t *testing.T) {
	file := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, want string }{
		{"", "no netns path"},
		{"/run/netns/does-not-exist-erd", "no such file"},
		{file, "not a network namespace"},
		{"/proc/self/ns/uts", "not a network namespace"},
	} {
		if h, err := Open(tc.path); err == nil || !strings.Contains(err.Error(), tc.want) {
			h.Close()
			t.Errorf("Open(%q) = %v, want error containing %q", tc.path, err, tc.want)
		}
	}
}

// The namespace this test runs in is one: it opens, has a cookie, and lists lo.
func TestOpenInspectOwnNamespace(t *testing.T) {
	h, err := Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	c, err := Cookie(h)
	if err != nil || c == 0 {
		t.Fatalf("Cookie = %d, %v", c, err)
	}
	info, err := Inspect(h)
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, a := range info.Local {
		found = found || a.String() == "127.0.0.1"
	}
	if !found {
		t.Fatalf("127.0.0.1 not among local addresses %v", info.Local)
	}
}
