package topology

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const lockName = "lock"

// lockRunDir takes the run's lock: an exclusive flock that lives as long as the
// process (the kernel drops it when the process dies, however it dies).
func lockRunDir(dir string, create bool) (*os.File, error) {
	flags := os.O_RDONLY
	if create {
		flags = os.O_RDWR | os.O_CREATE
	}
	f, err := os.OpenFile(filepath.Join(dir, lockName), flags|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// SweepStale removes what runs that died without cleaning up left behind: their
// namespaces, cgroups, bpffs mount and directory. A run is stale when nobody holds its
// lock; a run directory without a lock file is stale once it is a minute old (its
// owner died between mkdir and lock). Live runs, including concurrent ones, are left
// alone. Unique names already keep debris from breaking a new run; this only keeps the
// machine tidy.
func SweepStale() error {
	entries, err := os.ReadDir(runRootDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		if !e.IsDir() || !isRunID(e.Name()) {
			continue
		}
		dir := filepath.Join(runRootDir, e.Name())
		lock, err := lockRunDir(dir, false)
		switch {
		case err == nil:
		case errors.Is(err, fs.ErrNotExist):
			if fi, serr := os.Stat(dir); serr != nil || time.Since(fi.ModTime()) < time.Minute {
				continue
			}
		default:
			continue // locked: alive
		}
		errs = append(errs, sweepRun(e.Name(), dir))
		if lock != nil {
			lock.Close()
		}
	}
	return errors.Join(errs...)
}

// isRunID accepts the ids NewRun makes (lowercase hex).
func isRunID(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range s {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
			return false
		}
	}
	return true
}

func sweepRun(id, dir string) error {
	slog.Info("removing debris of a dead test run", "run", id)
	var errs []error
	if cg, err := findCgroup2(); err == nil && cg != "" {
		errs = append(errs, removeCgroupTree(filepath.Join(cg, cgroupBase, id)))
	}
	// Names are erd<id>p<n> and erd<id>r<n>; ids are hex, so p/r cannot be part of one.
	nsFiles, _ := filepath.Glob(filepath.Join("/run/netns", "erd"+id+"[pr]*"))
	for _, f := range nsFiles {
		if out, err := exec.Command("ip", "netns", "del", filepath.Base(f)).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", filepath.Base(f), err, out))
		}
	}
	bpffs := filepath.Join(dir, "bpffs")
	if err := unix.Unmount(bpffs, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return errors.Join(append(errs, fmt.Errorf("unmount %s: %w", bpffs, err))...)
	}
	errs = append(errs, os.RemoveAll(dir))
	return errors.Join(errs...)
}

// removeCgroupTree removes a cgroup and everything below it, deepest first.
func removeCgroupTree(root string) error {
	var dirs []string
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		if strings.HasPrefix(dirs[i], root) {
			errs = append(errs, removeCgroup(dirs[i]))
		}
	}
	return errors.Join(errs...)
}
