package bench

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime/debug"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
)

// Role is the name of the bench's agent role: the bench binary re-executed (by
// standin.Start, through nsenter, cloned into a cgroup) as the generator, the
// bench proxy or the servers, depending on the commands it is sent.
const Role = "bench"

// Operations of the bench role.
const (
	opServe = "serve" // start a server (serveSpec)
	opProxy = "proxy" // start the bench proxy (proxySpec)
	opRun   = "run"   // run the load generator (RunSpec) and answer RunResult
	opStats = "stats" // answer AgentStats
)

func init() {
	standin.RegisterRole(Role, func() standin.Handler { return newAgent() })
}

// agent is one bench process; what it does is chosen by its commands.
type agent struct {
	log *slog.Logger

	mu      sync.Mutex
	closers []io.Closer
	proxy   *proxy
	servers []*server
}

func newAgent() *agent {
	// Per-connection garbage is small; fewer collections mean less noise.
	debug.SetGCPercent(400)
	return &agent{log: slog.New(slog.NewTextHandler(os.Stderr, nil)).With("role", Role, "pid", os.Getpid())}
}

func (a *agent) Close() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.closers {
		c.Close()
	}
}

func (a *agent) Handle(cmd standin.Command) standin.Response {
	r := standin.Response{ID: cmd.ID}
	result, err := a.dispatch(cmd)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	if result != nil {
		if r.Result, err = json.Marshal(result); err != nil {
			r.Error = err.Error()
		}
	}
	return r
}

func (a *agent) dispatch(cmd standin.Command) (any, error) {
	switch cmd.Op {
	case opServe:
		return nil, startWith(a, cmd.Args, func(s serveSpec) (*server, error) {
			srv, err := startServer(s.Addr, a.log)
			if err == nil {
				a.servers = append(a.servers, srv)
			}
			return srv, err
		})
	case opProxy:
		return nil, startWith(a, cmd.Args, func(s proxySpec) (*proxy, error) {
			p, err := startProxy(s, a.log)
			if err == nil {
				a.proxy = p
			}
			return p, err
		})
	case opRun:
		var s RunSpec
		if err := json.Unmarshal(cmd.Args, &s); err != nil {
			return nil, err
		}
		return runGenerator(s)
	case opStats:
		return a.stats(), nil
	}
	return nil, fmt.Errorf("bench agent cannot do %q", cmd.Op)
}

// startWith decodes a spec and starts what it describes, under the agent's lock; the
// agent closes it when the harness is done.
func startWith[S any, T io.Closer](a *agent, args json.RawMessage, start func(S) (T, error)) error {
	var spec S
	if err := json.Unmarshal(args, &spec); err != nil {
		return err
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	c, err := start(spec)
	if err != nil {
		return err
	}
	a.closers = append(a.closers, c)
	return nil
}

// AgentStats are an agent's counters since it started.
type AgentStats struct {
	CPUUserUS int64      `json:"cpu_user_us"`
	CPUSysUS  int64      `json:"cpu_sys_us"`
	Proxy     ProxyStats `json:"proxy"`
	InFlight  int64      `json:"in_flight"` // connections open in the proxy and the servers
}

func (a *agent) stats() AgentStats {
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_SELF, &ru)
	st := AgentStats{CPUUserUS: tvUS(ru.Utime), CPUSysUS: tvUS(ru.Stime)}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.proxy != nil {
		st.Proxy = a.proxy.stats()
		st.InFlight += st.Proxy.InFlight
	}
	for _, s := range a.servers {
		st.InFlight += s.inFlight.Load()
	}
	return st
}

func tvUS(tv unix.Timeval) int64 { return tv.Sec*1_000_000 + tv.Usec }
