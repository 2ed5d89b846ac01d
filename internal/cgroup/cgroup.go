// Package cgroup validates cgroup v2 paths and names them by their id.
package cgroup

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Cgroup is a cgroup v2 directory.
type Cgroup struct {
	Path string
	ID   uint64 // the kernel's cgroup id: the directory's inode on cgroup2
}

// rootID is the id of every cgroup2 hierarchy's root.
const rootID = 1

// Open checks that path is a non-root cgroup v2 directory.
func Open(path string) (Cgroup, error) {
	if path == "" {
		return Cgroup{}, fmt.Errorf("no cgroup path given")
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", path, err)
	}
	switch fs.Type {
	case unix.CGROUP2_SUPER_MAGIC:
	case unix.CGROUP_SUPER_MAGIC, unix.TMPFS_MAGIC:
		return Cgroup{}, fmt.Errorf("cgroup %s: is on cgroup v1 (or its tmpfs); eBPF cgroup programs need a cgroup v2 path", path)
	default:
		return Cgroup{}, fmt.Errorf("cgroup %s: not on a cgroup v2 filesystem", path)
	}
	st, err := os.Stat(path)
	if err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if !st.IsDir() {
		return Cgroup{}, fmt.Errorf("cgroup %s: not a directory", path)
	}
	var s unix.Stat_t
	if err := unix.Stat(path, &s); err != nil {
		return Cgroup{}, fmt.Errorf("cgroup %s: %w", path, err)
	}
	if s.Ino == rootID {
		return Cgroup{}, fmt.Errorf("cgroup %s: is the root cgroup; attaching there would capture the whole node", path)
	}
	return Cgroup{Path: path, ID: s.Ino}, nil
}
