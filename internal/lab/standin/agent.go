package standin

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// MaybeRunRole runs the agent role named by EBPF_REDIRECT_ROLE, if it is set, and exits
// the process when the harness closes the agent's stdin. Call it first thing in main()
// (and in TestMain) of every binary the harness re-executes.
func MaybeRunRole() {
	role := os.Getenv(RoleEnv)
	if role == "" {
		return
	}
	if role == RoleDialer {
		os.Exit(runDialer(os.Stdin, os.Stdout))
	}
	os.Exit(runAgent(role, os.Stdin, os.Stdout))
}

// Handler serves the commands of one role. The built-in roles are one; RegisterRole
// adds others.
type Handler interface {
	// Handle answers one command; commands are handled concurrently.
	Handle(cmd Command) Response
	// Close is called once the harness has closed the agent's stdin.
	Close()
}

var (
	rolesMu sync.Mutex
	roles   = map[string]func() Handler{}
)

// RegisterRole adds a role defined outside this package: MaybeRunRole runs it when
// EBPF_REDIRECT_ROLE names it, Start launches it like a built-in one, and Agent.Call
// talks to it (Command.Args and Response.Result carry the role's own payloads). Call
// it from an init function of a package linked into the re-executed binary.
func RegisterRole(name string, newHandler func() Handler) {
	rolesMu.Lock()
	defer rolesMu.Unlock()
	switch name {
	case RoleProxy, RoleApp, RolePeer:
		panic("standin: role " + name + " is built in")
	}
	if _, dup := roles[name]; dup {
		panic("standin: role " + name + " registered twice")
	}
	roles[name] = newHandler
}

// agent is one running built-in role.
type agent struct {
	role string
	log  *slog.Logger

	mu          sync.Mutex
	proxyEvs    []ProxyEvent
	serverEvs   []ServerEvent
	counts      map[string]int // quiet listeners
	wire        []WireEvent
	wireSeen    map[WireEvent]bool
	inFlight    int
	maxInFlight int // since the last OpEvents
	listeners   []io.Closer
}

func runAgent(role string, in io.Reader, out io.Writer) int {
	var h Handler
	switch role {
	case RoleProxy, RoleApp, RolePeer:
		h = &agent{
			role:   role,
			log:    slog.New(slog.NewTextHandler(os.Stderr, nil)).With("role", role, "pid", os.Getpid()),
			counts: map[string]int{},
		}
		raiseFileLimit()
	default:
		rolesMu.Lock()
		newHandler := roles[role]
		rolesMu.Unlock()
		if newHandler == nil {
			fmt.Fprintf(os.Stderr, "unknown %s %q\n", RoleEnv, role)
			return 2
		}
		h = newHandler()
	}
	serve(h, in, out)
	return 0
}

// serve greets the harness, answers every command line until stdin closes, then
// closes the handler.
func serve(h Handler, in io.Reader, out io.Writer) {
	var outMu sync.Mutex
	enc := json.NewEncoder(out)
	reply := func(r Response) {
		outMu.Lock()
		defer outMu.Unlock()
		if err := enc.Encode(r); err != nil {
			fmt.Fprintln(os.Stderr, "writing response:", err)
		}
	}
	reply(Response{ID: 0, Ready: true, Pid: os.Getpid()})
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	var wg sync.WaitGroup
	for sc.Scan() {
		var cmd Command
		if err := json.Unmarshal(sc.Bytes(), &cmd); err != nil {
			reply(Response{ID: -1, Error: "bad command: " + err.Error()})
			continue
		}
		// Commands run concurrently: a slow dial must not hold up an events poll.
		wg.Add(1)
		go func() {
			defer wg.Done()
			reply(h.Handle(cmd))
		}()
	}
	// stdin closed: the harness is done with us (or gone).
	h.Close()
}

// Close closes the agent's listeners.
func (a *agent) Close() {
	a.mu.Lock()
	for _, l := range a.listeners {
		l.Close()
	}
	a.mu.Unlock()
}

// Handle runs one command of a built-in role.
func (a *agent) Handle(cmd Command) Response {
	r := Response{ID: cmd.ID}
	switch {
	case cmd.Op == OpListen && cmd.Listen != nil:
		addr, err := a.listen(*cmd.Listen)
		if err != nil {
			r.Error = err.Error()
		}
		r.Addr = addr
	case cmd.Op == OpProxy && cmd.Proxy != nil && a.role == RoleProxy:
		if err := a.startProxy(*cmd.Proxy); err != nil {
			r.Error = err.Error()
		}
	case cmd.Op == OpDial && cmd.Dial != nil:
		spec := *cmd.Dial
		if a.role == RoleProxy && spec.Mark == 0 {
			spec.Mark = ProxyMark // the proxy marks every socket it creates
		}
		res := dialFrom(spec)
		r.Dial = &res
	case cmd.Op == OpGate && cmd.Gate != nil:
		if cmd.Gate.Release {
			gates.release(cmd.Gate.Name)
			break
		}
		timeout := time.Duration(cmd.Gate.TimeoutMS) * time.Millisecond
		if timeout <= 0 {
			timeout = 10 * time.Second
		}
		if err := gates.waitReached(cmd.Gate.Name, timeout); err != nil {
			r.Error = err.Error()
		}
	case cmd.Op == OpSniff && cmd.Sniff != nil:
		if err := a.sniff(cmd.Sniff.Iface); err != nil {
			r.Error = err.Error()
		}
	case cmd.Op == OpLoad && cmd.Load != nil:
		res := runLoad(*cmd.Load)
		r.Load = &res
	case cmd.Op == OpInFlight:
		a.mu.Lock()
		r.Events = &Events{InFlight: a.inFlight}
		a.mu.Unlock()
	case cmd.Op == OpEvents:
		a.mu.Lock()
		r.Events = &Events{Proxy: a.proxyEvs, Server: a.serverEvs, InFlight: a.inFlight, MaxInFlight: a.maxInFlight, Wire: a.wire}
		a.wire = nil
		if len(a.counts) > 0 {
			r.Events.Counts = a.counts
			a.counts = map[string]int{}
		}
		a.proxyEvs, a.serverEvs = nil, nil
		a.maxInFlight = a.inFlight
		a.mu.Unlock()
	default:
		r.Error = fmt.Sprintf("role %s cannot do %q", a.role, cmd.Op)
	}
	return r
}

func (a *agent) begin() {
	a.mu.Lock()
	a.inFlight++
	a.maxInFlight = max(a.maxInFlight, a.inFlight)
	a.mu.Unlock()
}

func (a *agent) count(key string) {
	a.mu.Lock()
	a.counts[key]++
	a.mu.Unlock()
}

// raiseFileLimit lifts the open-file limit as far as the kernel allows (load
// tests hold tens of thousands of sockets); best effort.
func raiseFileLimit() {
	lim := unix.Rlimit{Cur: 1 << 20, Max: 1 << 20}
	if b, err := os.ReadFile("/proc/sys/fs/nr_open"); err == nil {
		if n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64); err == nil {
			lim = unix.Rlimit{Cur: n, Max: n}
		}
	}
	if unix.Setrlimit(unix.RLIMIT_NOFILE, &lim) != nil {
		var cur unix.Rlimit
		if unix.Getrlimit(unix.RLIMIT_NOFILE, &cur) == nil {
			cur.Cur = cur.Max
			_ = unix.Setrlimit(unix.RLIMIT_NOFILE, &cur)
		}
	}
}

func (a *agent) end() {
	a.mu.Lock()
	a.inFlight--
	a.mu.Unlock()
}

func (a *agent) addServerEvent(e ServerEvent) {
	a.mu.Lock()
	a.serverEvs = append(a.serverEvs, e)
	a.mu.Unlock()
}

func (a *agent) addProxyEvent(e ProxyEvent) {
	a.mu.Lock()
	a.proxyEvs = append(a.proxyEvs, e)
	a.mu.Unlock()
}

func (a *agent) keep(l io.Closer) {
	a.mu.Lock()
	a.listeners = append(a.listeners, l)
	a.mu.Unlock()
}

// listen starts a server; it answers each request and records an event for it.
func (a *agent) listen(spec ListenSpec) (string, error) {
	ap, err := netip.ParseAddrPort(spec.Addr)
	if err != nil {
		return "", err
	}
	name := spec.Name
	if name == "" {
		name = a.role + ":" + strconv.Itoa(int(ap.Port()))
		if spec.Proto == "udp" {
			name += "/udp"
		}
	}
	switch spec.Proto {
	case "tcp", "":
		// An IPv4 address gets an AF_INET socket; "[::]:p" Go makes
		// dual-stack, "tcp6" IPv6 only.
		network := "tcp"
		switch {
		case ap.Addr().Is4():
			network = "tcp4"
		case spec.V6Only || !ap.Addr().IsUnspecified():
			network = "tcp6"
		}
		l, err := net.Listen(network, spec.Addr)
		if err != nil {
			return "", err
		}
		a.keep(l)
		timeout := time.Duration(spec.TimeoutMS) * time.Millisecond
		if timeout <= 0 {
			timeout = 10 * time.Second
		}
		go a.acceptLoop(l.(*net.TCPListener), func(c *net.TCPConn) { a.serveTCP(c, name, spec.Quiet, timeout) })
		return l.Addr().String(), nil
	case "udp":
		return a.serveUDP(spec.Addr, name)
	default:
		return "", fmt.Errorf("unknown proto %q", spec.Proto)
	}
}

// acceptLoop accepts until the listener closes; a connection counts as in flight from
// the moment it is accepted until its handler returns. Running out of descriptors or
// memory only pauses it, as in a real server.
func (a *agent) acceptLoop(l *net.TCPListener, handle func(*net.TCPConn)) {
	for {
		c, err := l.AcceptTCP()
		if errors.Is(err, unix.EMFILE) || errors.Is(err, unix.ENFILE) || errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.ENOMEM) {
			a.log.Warn("accept", "err", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err != nil {
			return // closed
		}
		a.begin()
		go func() {
			defer a.end()
			handle(c)
		}()
	}
}

// serveTCP answers one request as server `name`.
func (a *agent) serveTCP(c *net.TCPConn, name string, quiet bool, timeout time.Duration) {
	defer c.Close()
	if quiet {
		_, reply := readRequest(c, name, timeout)
		a.count(name)
		if reply != nil {
			_ = reply()
		}
		return
	}
	ev := ServerEvent{Name: name, Proto: "tcp"}
	_ = withFD(c, func(fd int) {
		ev.Local, ev.Peer = names(fd)
		ev.Mark = soMark(fd)
	})
	req, reply := readRequest(c, name, timeout)
	ev.Request = req
	// Recorded before the reply leaves: whoever sees the reply can also see the event.
	a.addServerEvent(ev)
	if reply != nil {
		_ = reply()
	}
}

// readRequest reads "REQ <token> <size>" and the payload, within timeout; it returns
// a description of the request and, when it was well formed, a function that sends
// the reply.
func readRequest(c *net.TCPConn, name string, timeout time.Duration) (string, func() error) {
	_ = c.SetDeadline(time.Now().Add(timeout))
	br := bufio.NewReader(io.LimitReader(c, 64<<20))
	line, err := br.ReadString('\n')
	if err != nil {
		return "no-request:" + classify(err), nil
	}
	var token string
	var size int
	if _, err := fmt.Sscanf(line, requestLinePrefix+" %s %d\n", &token, &size); err != nil || size < 0 || size > 32<<20 {
		return fmt.Sprintf("bad-request:%q", line), nil
	}
	got, intact, _ := checkPayload(br, upSeed(token), size)
	state := "intact"
	if !intact {
		state = fmt.Sprintf("corrupt(got=%d)", got)
	}
	desc := fmt.Sprintf("%s %s %d %s", requestLinePrefix, token, size, state)
	return desc, func() error {
		bw := bufio.NewWriter(c)
		fmt.Fprintf(bw, "%s %s %s %d\n", replyLinePrefix, name, token, size)
		if _, err := io.CopyN(bw, payloadStream(downSeed(token)), int64(size)); err != nil {
			return err
		}
		return bw.Flush()
	}
}
