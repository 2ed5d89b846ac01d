package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

const (
	conntrackMaxPath = "/proc/sys/net/netfilter/nf_conntrack_max"
	stateDir         = "/run/ebpf-redirect-bench"
)

// conntrackMax is a hold on the machine-wide nf_conntrack_max. The original value
// is saved to a file under an exclusive flock before it is changed: a later bench
// that finds the file with the lock free knows its owner died mid-run and puts the
// value back, so even a SIGKILL leaves the setting restored by the next run.
type conntrackMax struct {
	lock     *os.File
	saved    string
	original string
}

// recoverConntrackMax restores what a dead bench left changed, unless another bench
// holds the lock now (it is then that bench's to restore).
func recoverConntrackMax() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // do not wait
	c, err := holdConntrackMax(ctx)
	if err != nil {
		if errors.Is(err, context.Canceled) {
			return nil
		}
		return err
	}
	c.release()
	return nil
}

// holdConntrackMax takes the lock (waiting for a concurrent bench, bounded by ctx)
// and restores what a dead bench left changed.
func holdConntrackMax(ctx context.Context) (*conntrackMax, error) {
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(stateDir, "conntrack.lock"), os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, err
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("waiting for another bench to release nf_conntrack_max: %w", ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
	c := &conntrackMax{lock: f, saved: filepath.Join(stateDir, "nf_conntrack_max.saved")}
	if b, err := os.ReadFile(c.saved); err == nil {
		// A bench died with the value changed: put it back.
		if err := os.WriteFile(conntrackMaxPath, []byte(strings.TrimSpace(string(b))), 0o644); err != nil {
			c.release()
			return nil, fmt.Errorf("restoring nf_conntrack_max left by a dead bench: %w", err)
		}
		os.Remove(c.saved)
	}
	return c, nil
}

// set changes nf_conntrack_max, first saving the original value.
func (c *conntrackMax) set(v int) error {
	if c.original == "" {
		b, err := os.ReadFile(conntrackMaxPath)
		if err != nil {
			return err
		}
		c.original = strings.TrimSpace(string(b))
		if err := os.WriteFile(c.saved, []byte(c.original+"\n"), 0o600); err != nil {
			return err
		}
	}
	return os.WriteFile(conntrackMaxPath, []byte(strconv.Itoa(v)), 0o644)
}

// restore puts the original value back (if it was changed) and releases the lock.
func (c *conntrackMax) restore() error {
	var err error
	if c.original != "" {
		if err = os.WriteFile(conntrackMaxPath, []byte(c.original), 0o644); err == nil {
			os.Remove(c.saved)
			c.original = ""
		}
	}
	c.release()
	return err
}

func (c *conntrackMax) release() {
	if c.lock != nil {
		c.lock.Close()
		c.lock = nil
	}
}

// ctStats are a namespace's conntrack counters (/proc/PID/net/stat/nf_conntrack of a
// process in it): the entries now, and drops summed over the CPUs.
type ctStats struct {
	Entries      int64 `json:"entries"`
	Drop         int64 `json:"drop"`
	EarlyDrop    int64 `json:"early_drop"`
	InsertFailed int64 `json:"insert_failed"`
}

func readCtStats(pid int) ctStats {
	var st ctStats
	f, err := os.Open(fmt.Sprintf("/proc/%d/net/stat/nf_conntrack", pid))
	if err != nil {
		return st
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return st
	}
	cols := strings.Fields(sc.Text())
	first := true
	for sc.Scan() {
		vals := strings.Fields(sc.Text())
		for i, name := range cols {
			if i >= len(vals) {
				break
			}
			v, err := strconv.ParseInt(vals[i], 16, 64)
			if err != nil {
				continue
			}
			switch name {
			case "entries":
				if first {
					st.Entries = v // the namespace's count, repeated on every line
				}
			case "drop":
				st.Drop += v
			case "early_drop":
				st.EarlyDrop += v
			case "insert_failed":
				st.InsertFailed += v
			}
		}
		first = false
	}
	return st
}

func (a ctStats) sub(b ctStats) ctStats {
	return ctStats{Entries: a.Entries, Drop: a.Drop - b.Drop, EarlyDrop: a.EarlyDrop - b.EarlyDrop, InsertFailed: a.InsertFailed - b.InsertFailed}
}

// flushConntrack empties a namespace's conntrack table, so that every run under
// iptables starts from the same (empty) table.
func flushConntrack(nsPath string) error {
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		return err
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_NETFILTER)
	if err != nil {
		return err
	}
	defer h.Close()
	return h.ConntrackTableFlush(netlink.ConntrackTable)
}
