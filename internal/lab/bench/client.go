package bench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// Kinds of generator runs.
const (
	KindConn = "conn" // short connections: connect, one exchange, close
	KindRR   = "rr"   // request/response on persistent connections
	KindBulk = "bulk" // one stream per worker, as fast as it goes
)

// RunSpec is one run of the load generator.
type RunSpec struct {
	Kind       string `json:"kind"`
	Target     string `json:"target"` // IPv4 ip:port
	Workers    int    `json:"workers"`
	DurationMS int    `json:"duration_ms"`
	Size       int    `json:"size"`       // conn, rr: bytes each way per exchange; bulk: bytes per write
	TimeoutMS  int    `json:"timeout_ms"` // bounds every connect and read
	Pin        bool   `json:"pin"`        // pin worker i to allowed CPU i mod n
}

// RunResult is what the generator measured.
type RunResult struct {
	Ops       int64            `json:"ops"`   // conn: connections; rr: exchanges; bulk: streams
	Bytes     int64            `json:"bytes"` // bulk: bytes the server counted
	Errors    map[string]int64 `json:"errors,omitempty"`
	ElapsedNS int64            `json:"elapsed_ns"`
	// Lat is the latency of one connection (conn) or one exchange (rr), in ns.
	Lat Percentiles `json:"lat"`
	// Slow counts connections that took longer than a second (a lost SYN).
	Slow int64 `json:"slow"`
	// The workers' own CPU (their threads only), user and system.
	GenUserUS int64 `json:"gen_user_us"`
	GenSysUS  int64 `json:"gen_sys_us"`
}

// Percentiles of a latency sample, in ns.
type Percentiles struct {
	N    int   `json:"n"`
	P50  int64 `json:"p50"`
	P99  int64 `json:"p99"`
	P999 int64 `json:"p999"`
	Max  int64 `json:"max"`
}

// percentiles sorts s in place.
func percentiles(s []int64) Percentiles {
	if len(s) == 0 {
		return Percentiles{}
	}
	slices.Sort(s)
	at := func(q float64) int64 {
		i := int(q*float64(len(s))+0.5) - 1
		return s[max(0, min(i, len(s)-1))]
	}
	return Percentiles{N: len(s), P50: at(0.50), P99: at(0.99), P999: at(0.999), Max: s[len(s)-1]}
}

// worker is one generator thread's tally.
type worker struct {
	ops, bytes, slow int64
	errs             map[string]int64
	lat              []int64
	userUS, sysUS    int64
}

func (w *worker) fail(err error) {
	if w.errs == nil {
		w.errs = map[string]int64{}
	}
	w.errs[errName(err)]++
}

func errName(err error) string {
	var errno unix.Errno
	switch {
	case errors.Is(err, unix.EAGAIN), errors.Is(err, unix.EINPROGRESS), errors.Is(err, unix.ETIMEDOUT):
		return "timeout"
	case errors.Is(err, errShort):
		return "short-reply"
	case errors.As(err, &errno):
		return unix.ErrnoName(errno)
	}
	return err.Error()
}

var errShort = errors.New("connection closed before the reply")

// runGenerator runs the workers: each is a goroutine locked to its own OS thread
// (optionally pinned to a CPU) making blocking system calls, so the generator costs
// little more than the system calls themselves, and its CPU is read per thread.
func runGenerator(s RunSpec) (*RunResult, error) {
	ap, err := netip.ParseAddrPort(s.Target)
	if err != nil {
		return nil, fmt.Errorf("target %q: want ip:port: %w", s.Target, err)
	}
	if s.Workers <= 0 || s.DurationMS <= 0 || s.Size < 0 || s.Size > maxSize {
		return nil, fmt.Errorf("bad run spec %+v", s)
	}
	switch s.Kind {
	case KindConn, KindRR, KindBulk:
	default:
		return nil, fmt.Errorf("unknown kind %q", s.Kind)
	}
	if s.TimeoutMS <= 0 {
		s.TimeoutMS = 3000
	}
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ap.Addr().As16()}
	if ap.Addr().Is4() {
		sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}
	}
	var cpus []int
	if s.Pin {
		var set unix.CPUSet
		if err := unix.SchedGetaffinity(0, &set); err == nil {
			for i := 0; i < 1024 && len(cpus) < set.Count(); i++ {
				if set.IsSet(i) {
					cpus = append(cpus, i)
				}
			}
		}
	}
	// A blocked worker holds no P, but one returning from a system call wants one
	// at once: give every worker its own.
	prev := runtime.GOMAXPROCS(0)
	if prev < s.Workers+2 {
		runtime.GOMAXPROCS(s.Workers + 2)
		defer runtime.GOMAXPROCS(prev)
	}

	ws := make([]*worker, s.Workers)
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	var deadline time.Time
	for i := range ws {
		w := &worker{}
		ws[i] = w
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			// Never unlocked: the thread (pinned, maybe) dies with the goroutine.
			runtime.LockOSThread()
			if len(cpus) > 0 {
				var set unix.CPUSet
				set.Set(cpus[i%len(cpus)])
				_ = unix.SchedSetaffinity(0, &set)
			}
			var ru0, ru1 unix.Rusage
			_ = unix.Getrusage(unix.RUSAGE_THREAD, &ru0)
			ready.Done()
			<-start
			switch s.Kind {
			case KindConn:
				w.lat = make([]int64, 0, 64<<10)
				connLoop(w, sa, s, deadline)
			case KindRR:
				w.lat = make([]int64, 0, 256<<10)
				rrLoop(w, sa, s, deadline)
			case KindBulk:
				bulkLoop(w, sa, s, deadline)
			}
			_ = unix.Getrusage(unix.RUSAGE_THREAD, &ru1)
			w.userUS = tvUS(ru1.Utime) - tvUS(ru0.Utime)
			w.sysUS = tvUS(ru1.Stime) - tvUS(ru0.Stime)
		}()
	}
	ready.Wait()
	t0 := time.Now()
	deadline = t0.Add(time.Duration(s.DurationMS) * time.Millisecond)
	close(start)
	done.Wait()
	res := &RunResult{ElapsedNS: int64(time.Since(t0))}
	var lat []int64
	for _, w := range ws {
		res.Ops += w.ops
		res.Bytes += w.bytes
		res.Slow += w.slow
		res.GenUserUS += w.userUS
		res.GenSysUS += w.sysUS
		lat = append(lat, w.lat...)
		for k, v := range w.errs {
			if res.Errors == nil {
				res.Errors = map[string]int64{}
			}
			res.Errors[k] += v
		}
	}
	res.Lat = percentiles(lat)
	return res, nil
}

// dial makes a blocking socket with timeouts and connects it.
func dial(sa unix.Sockaddr, timeoutMS int, nodelay bool) (int, error) {
	family := unix.AF_INET
	if _, v6 := sa.(*unix.SockaddrInet6); v6 {
		family = unix.AF_INET6
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	tv := unix.NsecToTimeval(int64(timeoutMS) * int64(time.Millisecond))
	if err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv); err == nil {
		err = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	}
	if err == nil && nodelay {
		err = unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	}
	if err == nil {
		err = connect(fd, sa, timeoutMS)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// connect is a blocking connect that survives a signal: an interrupted connect goes
// on in the background, so wait for it.
func connect(fd int, sa unix.Sockaddr, timeoutMS int) error {
	err := unix.Connect(fd, sa)
	if errors.Is(err, unix.EINTR) {
		err = standin.WaitConnected(fd, time.Duration(timeoutMS)*time.Millisecond)
	}
	return err
}

// full repeats a blocking read or write until all of b is done.
func full(op func(int, []byte) (int, error), fd int, b []byte) error {
	for len(b) > 0 {
		n, err := op(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return errShort
		}
		b = b[n:]
	}
	return nil
}

func writeAll(fd int, b []byte) error { return full(unix.Write, fd, b) }
func readFull(fd int, b []byte) error { return full(unix.Read, fd, b) }

// connLoop: connect, send the header and one request in one write, read the reply,
// close; again until the deadline.
func connLoop(w *worker, sa unix.Sockaddr, s RunSpec, deadline time.Time) {
	msg := append(header(modeRR, s.Size), make([]byte, s.Size)...)
	reply := make([]byte, max(s.Size, 1))[:s.Size]
	for {
		t0 := time.Now()
		if !t0.Before(deadline) {
			return
		}
		fd, err := dial(sa, s.TimeoutMS, false)
		if err == nil {
			err = writeAll(fd, msg)
			if err == nil {
				err = readFull(fd, reply)
			}
			unix.Close(fd)
		}
		if err != nil {
			w.fail(err)
			continue
		}
		d := int64(time.Since(t0))
		w.ops++
		w.lat = append(w.lat, d)
		if d > int64(time.Second) {
			w.slow++
		}
	}
}

// rrLoop: one connection, exchanges back to back until the deadline.
func rrLoop(w *worker, sa unix.Sockaddr, s RunSpec, deadline time.Time) {
	msg := make([]byte, max(s.Size, 1))[:s.Size]
	reply := make([]byte, max(s.Size, 1))[:s.Size]
	for time.Now().Before(deadline) {
		fd, err := dial(sa, s.TimeoutMS, true)
		if err == nil {
			err = writeAll(fd, header(modeRR, s.Size))
		}
		if err != nil {
			w.fail(err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		for {
			t0 := time.Now()
			if !t0.Before(deadline) {
				unix.Close(fd)
				return
			}
			if err = writeAll(fd, msg); err == nil {
				err = readFull(fd, reply)
			}
			if err != nil {
				w.fail(err)
				break
			}
			w.ops++
			w.lat = append(w.lat, int64(time.Since(t0)))
		}
		unix.Close(fd)
	}
}

// bulkLoop: stream writes until the deadline, half-close, read the server's count.
func bulkLoop(w *worker, sa unix.Sockaddr, s RunSpec, deadline time.Time) {
	fd, err := dial(sa, s.TimeoutMS, false)
	if err != nil {
		w.fail(err)
		return
	}
	defer unix.Close(fd)
	if err := writeAll(fd, header(modeBulk, 0)); err != nil {
		w.fail(err)
		return
	}
	buf := make([]byte, max(s.Size, 1))
	for time.Now().Before(deadline) {
		if err := writeAll(fd, buf); err != nil {
			w.fail(err)
			return
		}
	}
	if err := unix.Shutdown(fd, unix.SHUT_WR); err != nil {
		w.fail(err)
		return
	}
	var cnt [8]byte
	if err := readFull(fd, cnt[:]); err != nil {
		w.fail(err)
		return
	}
	w.ops++
	w.bytes += int64(binary.BigEndian.Uint64(cnt[:]))
}
