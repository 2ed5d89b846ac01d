package standin

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// StartOptions says where an agent runs.
type StartOptions struct {
	Role      string
	NetNSPath string // e.g. /run/netns/NAME
	CgroupDir string // cgroup v2 directory the process is cloned into; "" keeps ours
	Exe       string // binary to re-execute; default os.Executable()
}

// Agent is the harness's handle on a running agent process.
type Agent struct {
	Role string
	Pid  int

	cmd   *exec.Cmd
	stdin io.WriteCloser

	mu      sync.Mutex
	nextID  int
	pending map[int]chan Response
	dead    chan struct{} // closed when the agent's stdout ends
	stderr  lockedBuffer
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.buf.Len() > 1<<20 {
		return len(p), nil // keep memory bounded; the start is what explains a failure
	}
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Start launches an agent with nsenter in the given netns, cloned directly into the
// cgroup (CLONE_INTO_CGROUP): the process, and so every socket it creates, belongs to
// that cgroup from its first instruction. The agent is SIGKILLed if the harness dies.
func Start(ctx context.Context, o StartOptions) (*Agent, error) {
	exe := o.Exe
	if exe == "" {
		var err error
		if exe, err = os.Executable(); err != nil {
			return nil, err
		}
	}
	cmd := exec.Command("nsenter", "--net="+o.NetNSPath, "--", exe)
	cmd.Env = append(os.Environ(), RoleEnv+"="+o.Role)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if o.CgroupDir != "" {
		cg, err := os.Open(o.CgroupDir)
		if err != nil {
			return nil, fmt.Errorf("open cgroup: %w", err)
		}
		defer cg.Close() // the child has its own reference once started
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = int(cg.Fd())
	}
	a := &Agent{Role: o.Role, cmd: cmd, pending: map[int]chan Response{}, dead: make(chan struct{})}
	cmd.Stderr = &a.stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	a.stdin = stdin
	ready := make(chan Response, 1)
	a.pending[0] = ready
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s agent: %w", o.Role, err)
	}
	go a.readLoop(stdout)

	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	select {
	case r := <-ready:
		a.Pid = r.Pid
		return a, nil
	case <-a.dead:
		err = errors.New("exited before it was ready")
	case <-ctx.Done():
		err = ctx.Err()
	}
	a.Close()
	return nil, fmt.Errorf("%s agent: %w; stderr: %s", o.Role, err, a.stderr.String())
}

func (a *Agent) readLoop(r io.Reader) {
	defer close(a.dead)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 16<<20)
	for sc.Scan() {
		var resp Response
		if err := json.Unmarshal(sc.Bytes(), &resp); err != nil {
			continue
		}
		a.mu.Lock()
		ch := a.pending[resp.ID]
		delete(a.pending, resp.ID)
		a.mu.Unlock()
		if ch != nil {
			ch <- resp
		}
	}
}

// Call sends one command and waits for its response (bounded by ctx).
func (a *Agent) Call(ctx context.Context, cmd Command) (Response, error) {
	ch := make(chan Response, 1)
	a.mu.Lock()
	a.nextID++
	cmd.ID = a.nextID
	a.pending[cmd.ID] = ch
	line, err := json.Marshal(cmd)
	if err == nil {
		_, err = a.stdin.Write(append(line, '\n'))
	}
	a.mu.Unlock()
	if err != nil {
		return Response{}, fmt.Errorf("%s agent: send: %w", a.Role, err)
	}
	select {
	case r := <-ch:
		if r.Error != "" {
			return r, fmt.Errorf("%s agent: %s: %s", a.Role, cmd.Op, r.Error)
		}
		return r, nil
	case <-a.dead:
		return Response{}, fmt.Errorf("%s agent died; stderr: %s", a.Role, a.stderr.String())
	case <-ctx.Done():
		a.mu.Lock()
		delete(a.pending, cmd.ID)
		a.mu.Unlock()
		return Response{}, fmt.Errorf("%s agent: %s: %w", a.Role, cmd.Op, ctx.Err())
	}
}

// TB is what MustStart needs of a testing.TB.
type TB interface {
	Helper()
	Fatal(args ...any)
	Cleanup(func())
}

// MustStart starts an agent for a test, which fails if it cannot, and closes it
// when the test ends.
func MustStart(t TB, ctx context.Context, o StartOptions) *Agent {
	t.Helper()
	a, err := Start(ctx, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = a.Close() })
	return a
}

// Listen starts a server in the agent and returns its bound address.
func (a *Agent) Listen(ctx context.Context, spec ListenSpec) (string, error) {
	r, err := a.Call(ctx, Command{Op: OpListen, Listen: &spec})
	return r.Addr, err
}

// StartProxy opens the proxy's listeners (proxy role only).
func (a *Agent) StartProxy(ctx context.Context, spec ProxySpec) error {
	_, err := a.Call(ctx, Command{Op: OpProxy, Proxy: &spec})
	return err
}

// Dial makes the agent connect out and exchange one request.
func (a *Agent) Dial(ctx context.Context, spec DialSpec) (DialResult, error) {
	r, err := a.Call(ctx, Command{Op: OpDial, Dial: &spec})
	if err != nil {
		return DialResult{}, err
	}
	if r.Dial == nil {
		return DialResult{}, fmt.Errorf("%s agent: dial: empty answer", a.Role)
	}
	return *r.Dial, nil
}

// WaitGate returns once a dial of this agent holds at the named gate.
func (a *Agent) WaitGate(ctx context.Context, name string) error {
	_, err := a.Call(ctx, Command{Op: OpGate, Gate: &GateSpec{Name: name}})
	return err
}

// ReleaseGate lets the dials holding at the named gate go on.
func (a *Agent) ReleaseGate(ctx context.Context, name string) error {
	_, err := a.Call(ctx, Command{Op: OpGate, Gate: &GateSpec{Name: name, Release: true}})
	return err
}

// Sniff makes the agent record the connection attempts crossing an interface
// of its netns (Events.Wire).
func (a *Agent) Sniff(ctx context.Context, iface string) error {
	_, err := a.Call(ctx, Command{Op: OpSniff, Sniff: &SniffSpec{Iface: iface}})
	return err
}

// Load runs a load of many connections from the agent (see LoadSpec).
func (a *Agent) Load(ctx context.Context, spec LoadSpec) (LoadResult, error) {
	r, err := a.Call(ctx, Command{Op: OpLoad, Load: &spec})
	if err != nil {
		return LoadResult{}, err
	}
	if r.Load == nil {
		return LoadResult{}, fmt.Errorf("%s agent: load: empty answer", a.Role)
	}
	return *r.Load, nil
}

// WaitInFlight returns once the agent's listeners hold at least n accepted
// connections open, leaving its events to Events.
func (a *Agent) WaitInFlight(ctx context.Context, n int) error {
	for {
		r, err := a.Call(ctx, Command{Op: OpInFlight})
		if err != nil {
			return err
		}
		if r.Events != nil && r.Events.InFlight >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s agent: waiting for %d connections in flight: %w", a.Role, n, ctx.Err())
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Events returns and clears the agent's events.
func (a *Agent) Events(ctx context.Context) (Events, error) {
	r, err := a.Call(ctx, Command{Op: OpEvents})
	if err != nil {
		return Events{}, err
	}
	if r.Events == nil {
		return Events{}, fmt.Errorf("%s agent: events: empty answer", a.Role)
	}
	return *r.Events, nil
}

// Stderr is what the agent logged so far.
func (a *Agent) Stderr() string { return a.stderr.String() }

// Close asks the agent to exit (closing its stdin), and kills it if it has not within
// a second.
func (a *Agent) Close() error {
	_ = a.stdin.Close()
	done := make(chan error, 1)
	go func() { done <- a.cmd.Wait() }()
	select {
	case err := <-done:
		return exitErr(err)
	case <-time.After(time.Second):
		_ = a.cmd.Process.Kill()
		return exitErr(<-done)
	}
}

func exitErr(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return nil // killed or failed at the end: nothing the harness can act on
	}
	return err
}

// Collect polls the agents until none has a connection in flight (bounded by ctx) and
// returns everything they recorded.
func Collect(ctx context.Context, agents ...*Agent) (map[*Agent]Events, error) {
	all := map[*Agent]Events{}
	for {
		busy := 0
		for _, a := range agents {
			ev, err := a.Events(ctx)
			if err != nil {
				return all, err
			}
			acc := all[a]
			acc.Proxy = append(acc.Proxy, ev.Proxy...)
			acc.Server = append(acc.Server, ev.Server...)
			acc.InFlight = ev.InFlight
			acc.MaxInFlight = max(acc.MaxInFlight, ev.MaxInFlight)
			acc.Wire = append(acc.Wire, ev.Wire...)
			for k, n := range ev.Counts {
				if acc.Counts == nil {
					acc.Counts = map[string]int{}
				}
				acc.Counts[k] += n
			}
			all[a] = acc
			busy += ev.InFlight
		}
		if busy == 0 {
			return all, nil
		}
		select {
		case <-ctx.Done():
			return all, fmt.Errorf("connections still in flight: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}
