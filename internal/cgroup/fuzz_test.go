package cgroup

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// Open only accepts a directory on cgroup v2 that is not the root, whatever
// the path looks like. The fuzzed paths stay inside a sandbox (a temp dir with
// a file, a directory, and links to both and to a real cgroup if the machine
// has one), so the fuzzer never opens arbitrary files of the machine.
func FuzzOpen(f *testing.F) {
	sandbox := f.TempDir()
	for _, p := range []string{"dir", "file"} {
		if p == "dir" {
			_ = os.Mkdir(filepath.Join(sandbox, p), 0o755)
		} else {
			_ = os.WriteFile(filepath.Join(sandbox, p), nil, 0o600)
		}
	}
	_ = os.Symlink(filepath.Join(sandbox, "dir"), filepath.Join(sandbox, "link-dir"))
	_ = os.Symlink(filepath.Join(sandbox, "file"), filepath.Join(sandbox, "link-file"))
	var fs unix.Statfs_t
	if unix.Statfs("/sys/fs/cgroup", &fs) == nil && fs.Type == unix.CGROUP2_SUPER_MAGIC {
		_ = os.Symlink("/sys/fs/cgroup", filepath.Join(sandbox, "link-cgroup-root"))
	}
	for _, s := range []string{"", "dir", "file", "link-dir", "link-file", "link-cgroup-root", "dir/../file", "nope", "dir\x00x", "./dir/", "link-cgroup-root/."} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, rel string) {
		path := filepath.Join(sandbox, rel)
		if !strings.HasPrefix(filepath.Clean(path), sandbox) || strings.Contains(rel, "..") {
			return // only the sandbox
		}
		cg, err := Open(path)
		if err != nil {
			return
		}
		var st unix.Statfs_t
		var s unix.Stat_t
		if unix.Statfs(path, &st) != nil || st.Type != unix.CGROUP2_SUPER_MAGIC || unix.Stat(path, &s) != nil ||
			s.Mode&unix.S_IFMT != unix.S_IFDIR || s.Ino == rootID || cg.ID != s.Ino {
			t.Fatalf("Open(%q) accepted %+v", path, cg)
		}
	})
}
