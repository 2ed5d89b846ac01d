package podnet

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Open only accepts network namespace files. Fuzzed paths stay inside a
// sandbox (a file, a directory, links to this process's net and uts
// namespaces), so the fuzzer never opens arbitrary files of the machine.
func FuzzOpen(f *testing.F) {
	sandbox := f.TempDir()
	_ = os.Mkdir(filepath.Join(sandbox, "dir"), 0o755)
	_ = os.WriteFile(filepath.Join(sandbox, "file"), []byte("x"), 0o600)
	_ = os.Symlink("/proc/self/ns/net", filepath.Join(sandbox, "net"))
	_ = os.Symlink("/proc/self/ns/uts", filepath.Join(sandbox, "uts"))
	for _, s := range []string{"", "dir", "file", "net", "uts", "nope", "net/", "file\x00", "./net"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, rel string) {
		path := filepath.Join(sandbox, rel)
		if !strings.HasPrefix(filepath.Clean(path), sandbox) || strings.Contains(rel, "..") {
			return
		}
		h, err := Open(path)
		if err != nil {
			return
		}
		defer h.Close()
		t2, err := unix.IoctlRetInt(int(h), nsGetNSType)
		if err != nil || t2 != unix.CLONE_NEWNET {
			t.Fatalf("Open(%q) accepted something that is not a network namespace", path)
		}
	})
}
