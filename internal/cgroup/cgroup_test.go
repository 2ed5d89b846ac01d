package cgroup

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
		{"", "no cgroup path"},
		{"/nonexistent/cgroup", "no such file"},
		{t.TempDir(), "not on a cgroup v2"},
		{file, "not on a cgroup v2"},
	} {
		if _, err := Open(tc.path); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Open(%q) = %v, want error containing %q", tc.path, err, tc.want)
		}
	}
}
