package standin

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// dialFrom runs a dial where the spec says: here, on a new thread, or in a
// new child process.
func dialFrom(spec DialSpec) DialResult {
	switch spec.From {
	case "":
		return dial(spec)
	case FromThread:
		return dialOnNewThread(spec)
	case FromChild:
		return dialInChild(spec)
	default:
		return DialResult{Outcome: OutcomeErrPrefix + "bad spec", Detail: fmt.Sprintf("unknown from %q", spec.From)}
	}
}

// threadIDs lists the threads of this process.
func threadIDs() map[int]bool {
	ids := map[int]bool{}
	ents, _ := os.ReadDir("/proc/self/task")
	for _, e := range ents {
		if id, err := strconv.Atoi(e.Name()); err == nil {
			ids[id] = true
		}
	}
	return ids
}

// dialOnNewThread dials from an OS thread that did not exist when the request
// came in. Go picks threads itself, so this locks goroutines to threads until
// one lands on a thread not seen before: every old thread taken is parked
// (locked, so the runtime cannot hand it out again) until the dial is done,
// which forces the runtime to start a new one. The new thread exits with its
// goroutine (it stays locked).
func dialOnNewThread(spec DialSpec) DialResult {
	old := threadIDs()
	done := make(chan struct{})
	defer close(done)
	type attempt struct {
		tid int
		res *DialResult
	}
	ch := make(chan attempt)
	for i := 0; i < 256; i++ {
		go func() {
			runtime.LockOSThread()
			tid := unix.Gettid()
			if old[tid] {
				ch <- attempt{tid: tid}
				<-done
				runtime.UnlockOSThread()
				return
			}
			res := dial(spec)
			res.Detail = fmt.Sprintf("new thread %d; %s", tid, res.Detail)
			ch <- attempt{tid: tid, res: &res}
			// Returning while locked ends the thread.
		}()
		if a := <-ch; a.res != nil {
			return *a.res
		}
	}
	return DialResult{Outcome: OutcomeErrPrefix + "no new thread", Detail: "the runtime kept reusing old threads"}
}

// dialInChild dials from a child process of this agent: the same binary,
// re-executed with RoleDialer. It inherits the agent's namespace and cgroup.
func dialInChild(spec DialSpec) DialResult {
	fail := func(err error) DialResult {
		return DialResult{Outcome: OutcomeErrPrefix + "child", Detail: err.Error()}
	}
	if spec.Gate != "" {
		return fail(fmt.Errorf("a child's dial cannot hold at a gate"))
	}
	exe, err := os.Executable()
	if err != nil {
		return fail(err)
	}
	spec.From = ""
	in, err := json.Marshal(spec)
	if err != nil {
		return fail(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(), RoleEnv+"="+RoleDialer)
	cmd.Stdin = bytes.NewReader(in)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fail(fmt.Errorf("%v: %s", err, stderr.String()))
	}
	var res DialResult
	if err := json.Unmarshal(out, &res); err != nil {
		return fail(fmt.Errorf("child's answer %q: %v", out, err))
	}
	res.Detail = fmt.Sprintf("child pid %d; %s", cmd.Process.Pid, res.Detail)
	return res
}

// runDialer is RoleDialer: one dial from stdin to stdout.
func runDialer(in io.Reader, out io.Writer) int {
	var spec DialSpec
	if err := json.NewDecoder(in).Decode(&spec); err != nil {
		fmt.Fprintln(os.Stderr, "dialer: reading the spec:", err)
		return 2
	}
	if err := json.NewEncoder(out).Encode(dial(spec)); err != nil {
		fmt.Fprintln(os.Stderr, "dialer: writing the result:", err)
		return 2
	}
	return 0
}
