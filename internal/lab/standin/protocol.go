// Package standin provides the long-running "agent" processes of the differential test
// harness: a stand-in for the proxy (ztunnel), an application inside the pod and a peer
// R outside it. Each agent is the harness's own binary re-executed (through nsenter, in
// the right network namespace, and cloned straight into the right cgroup) with the
// environment variable EBPF_REDIRECT_ROLE naming its role. The harness talks to it with
// JSON lines over stdin/stdout: one Command per line in, one Response per line out.
package standin

import "encoding/json"

// RoleEnv selects the role of a re-executed binary (see MaybeRunRole).
const RoleEnv = "EBPF_REDIRECT_ROLE"

// Roles.
const (
	RoleProxy = "proxy"
	RoleApp   = "app"
	RolePeer  = "peer"
	// RoleDialer is a one-shot child of an agent (DialSpec.From = FromChild):
	// it reads one DialSpec on stdin, dials, writes the DialResult, exits.
	RoleDialer = "dialer"
)

// ProxyMark is the mark the proxy puts on every socket it creates (1337).
const ProxyMark = 0x539

// The proxy's listener ports.
const (
	PortOutbound = 15001
	PortInbound  = 15006
	PortHBONE    = 15008
)

// Operations of a Command.
const (
	OpListen   = "listen"    // start a server (app, peer)
	OpProxy    = "proxy"     // start the proxy's listeners (proxy)
	OpDial     = "dial"      // connect out and run one request (any role)
	OpEvents   = "events"    // return and clear the accumulated events
	OpInFlight = "in-flight" // how many accepted connections are open (events kept)
	OpGate     = "gate"      // wait until a dial reached a gate, or release it
	OpLoad     = "load"      // open many connections at once (see LoadSpec)
	OpSniff    = "sniff"     // record the TCP SYNs crossing an interface (see SniffSpec)
)

// Command is one request from the harness to an agent.
type Command struct {
	ID     int         `json:"id"`
	Op     string      `json:"op"`
	Listen *ListenSpec `json:"listen,omitempty"`
	Proxy  *ProxySpec  `json:"proxy,omitempty"`
	Dial   *DialSpec   `json:"dial,omitempty"`
	// Args is the payload of a command of a role registered with RegisterRole.
	Args  json.RawMessage `json:"args,omitempty"`
	Gate  *GateSpec       `json:"gate,omitempty"`
	Load  *LoadSpec       `json:"load,omitempty"`
	Sniff *SniffSpec      `json:"sniff,omitempty"`
}

// SniffSpec records, from now on, the connection attempts (TCP SYN without ACK)
// crossing an interface of the agent's netns, in either direction: what went
// on the wire when no party accepted anything.
type SniffSpec struct {
	Iface string `json:"iface"`
}

// WireEvent is one distinct connection attempt seen by a sniffer.
type WireEvent struct {
	Iface string `json:"iface"`
	Src   string `json:"src"`
	Dst   string `json:"dst"`
}

// GateSpec waits until a dial holding at gate Name has reached it (its request
// line is sent), or, with Release, lets it go on.
type GateSpec struct {
	Name      string `json:"name"`
	Release   bool   `json:"release,omitempty"`
	TimeoutMS int    `json:"timeout_ms,omitempty"` // waiting: default 10000
}

// Response answers the Command with the same ID. ID 0 with Ready set is the agent's
// greeting once it is up.
type Response struct {
	ID     int         `json:"id"`
	Ready  bool        `json:"ready,omitempty"`
	Pid    int         `json:"pid,omitempty"`
	Error  string      `json:"error,omitempty"`
	Addr   string      `json:"addr,omitempty"` // listen: the bound address
	Dial   *DialResult `json:"dial,omitempty"`
	Events *Events     `json:"events,omitempty"`
	// Result is the payload of an answer of a role registered with RegisterRole.
	Result json.RawMessage `json:"result,omitempty"`
	Load   *LoadResult     `json:"load,omitempty"`
}

// ListenSpec starts a server. Proto is "tcp" or "udp"; an IPv4 Addr gives an AF_INET
// socket, "[::]:port" a dual-stack one (IPv6 only with V6Only), another IPv6 address an
// AF_INET6 one. Name is how the server introduces itself in replies and events
// (default "<role>:<port>", "/udp" appended for UDP: the same for both families,
// whose addresses tell them apart).
type ListenSpec struct {
	Proto  string `json:"proto"`
	Addr   string `json:"addr"`
	Name   string `json:"name,omitempty"`
	V6Only bool   `json:"v6only,omitempty"`
	// Quiet counts connections by server name (Events.Counts) instead of
	// recording an event for each: for load tests.
	Quiet bool `json:"quiet,omitempty"`
	// TimeoutMS bounds each connection's request (default 10000).
	TimeoutMS int `json:"timeout_ms,omitempty"`
}

// ProxySpec starts the proxy. Each listener can be left out to test failing closed.
type ProxySpec struct {
	Outbound bool `json:"outbound"` // [::]:15001
	Inbound  bool `json:"inbound"`  // [::]:15006
	HBONE    bool `json:"hbone"`    // [::]:15008
	// DialTimeoutMS bounds the proxy's upstream connects (default 1500).
	DialTimeoutMS int `json:"dial_timeout_ms,omitempty"`
	// Quiet counts connections by listener and action (Events.Counts, keys
	// "proxy:<port>:<action>") instead of recording an event for each.
	Quiet bool `json:"quiet,omitempty"`
}

// DialSpec makes the agent connect out and run one request/response exchange.
// A v4-mapped Dst ("[::ffff:a.b.c.d]:p") makes an AF_INET6 socket.
type DialSpec struct {
	Proto     string `json:"proto"` // tcp | udp
	Dst       string `json:"dst"`
	Src       string `json:"src,omitempty"`  // bind before connect, ip:port (port may be 0)
	Mark      uint32 `json:"mark,omitempty"` // SO_MARK before connect
	Token     string `json:"token"`
	Size      int    `json:"size,omitempty"`       // payload bytes after the request line (TCP)
	TimeoutMS int    `json:"timeout_ms,omitempty"` // connect timeout; the exchange gets twice that (default 2000)
	// HoldMS keeps the connection established and idle this long before the
	// exchange: a connection that lives across a detach, restart or upgrade.
	HoldMS int `json:"hold_ms,omitempty"`
	// Method is how the socket connects (Method*); "" is MethodNonblocking.
	Method string `json:"method,omitempty"`
	// Device binds the socket to an interface (SO_BINDTODEVICE) before it connects.
	Device string `json:"device,omitempty"`
	// ReuseAddr sets SO_REUSEADDR before binding Src, so that two connections to
	// different destinations can share a source port.
	ReuseAddr bool `json:"reuse_addr,omitempty"`
	// MPTCP makes the socket IPPROTO_MPTCP.
	MPTCP bool `json:"mptcp,omitempty"`
	// Transparent connects from Src, which need not be local (IP_TRANSPARENT
	// and IP_FREEBIND, or their IPv6 twins), as the proxy delivers inbound
	// connections with the original client's address.
	Transparent bool `json:"transparent,omitempty"`
	// From runs the dial on a new OS thread (FromThread) or in a child process
	// forked for it (FromChild) instead of on the agent's own goroutine.
	From string `json:"from,omitempty"`
	// Gate holds the exchange after the request line until the gate of that
	// name is released (OpGate); TCP only.
	Gate string `json:"gate,omitempty"`
}

// How a DialSpec connects.
const (
	MethodNonblocking = "nonblocking" // connect() on a non-blocking socket, then poll
	MethodBlocking    = "blocking"    // connect() that blocks (bounded by SO_SNDTIMEO)
	MethodTFOSendto   = "tfo-sendto"  // sendto(MSG_FASTOPEN) with the request line
	MethodTFOConnect  = "tfo-connect" // TCP_FASTOPEN_CONNECT, connect(), then write
	MethodIOUring     = "io_uring"    // IORING_OP_CONNECT
)

// Where a DialSpec runs.
const (
	FromThread = "thread" // an OS thread the agent did not have before the dial
	FromChild  = "child"  // a child process started for the dial
)

// Client outcomes.
const (
	OutcomeOK         = "ok"
	OutcomeRefused    = "refused"
	OutcomeReset      = "reset"
	OutcomeTimeout    = "timeout"
	OutcomeEOF        = "eof-without-reply"
	OutcomeTruncated  = "truncated-reply"
	OutcomeUnreach    = "unreachable"
	OutcomeErrPrefix  = "error:"
	ActionRelayed     = "relayed"
	ActionServed      = "served"
	ActionSelfCall    = "self-call-refused"
	ActionDialFailed  = "dial-failed:" // + outcome of the upstream connect
	OrigDstFromCT     = "SO_ORIGINAL_DST"
	OrigDstFromCT6    = "IP6T_SO_ORIGINAL_DST"
	OrigDstFromLocal  = "getsockname"
	requestLinePrefix = "REQ"
	replyLinePrefix   = "RESP"
)

// DialResult is what the dialing side saw.
type DialResult struct {
	Outcome string `json:"outcome"`
	Local   string `json:"local,omitempty"` // getsockname right after connect
	Peer    string `json:"peer,omitempty"`  // getpeername right after connect
	Reply   string `json:"reply,omitempty"`
	Detail  string `json:"detail,omitempty"` // error text, for humans; not compared
}

// Events are what an agent's listeners saw since the last OpEvents.
type Events struct {
	Proxy    []ProxyEvent  `json:"proxy,omitempty"`
	Server   []ServerEvent `json:"server,omitempty"`
	InFlight int           `json:"in_flight"` // connections accepted and not finished yet
	// Counts are the quiet listeners' connections (see ListenSpec.Quiet).
	Counts map[string]int `json:"counts,omitempty"`
	// MaxInFlight is the most connections in flight at once since the last
	// OpEvents.
	MaxInFlight int `json:"max_in_flight"`
	// Wire are the sniffers' connection attempts (OpSniff).
	Wire []WireEvent `json:"wire,omitempty"`
}

// LoadSpec opens Count connections, connection i to Dsts[i % len(Dsts)],
// each with its own token, and checks that each reply comes from server
// Expect[i % len(Dsts)] with that token.
type LoadSpec struct {
	Dsts   []string `json:"dsts"`
	Expect []string `json:"expect"`
	Count  int      `json:"count"`
	// Concurrent holds every connection open until all of them are
	// established, and only then exchanges on them; otherwise each worker
	// connects, exchanges and closes, one connection after the other.
	Concurrent bool `json:"concurrent,omitempty"`
	// Parallel is how many connects (or, not concurrent, connections) are in
	// flight at once (default 256).
	Parallel    int    `json:"parallel,omitempty"`
	TokenPrefix string `json:"token_prefix"`
	TimeoutMS   int    `json:"timeout_ms,omitempty"` // per connect (default 5000)
	// SrcPortBase, if set, binds connection i to source port SrcPortBase+i, so
	// that no two connections share a source port, whatever their destinations.
	SrcPortBase int `json:"src_port_base,omitempty"`
	// Gate (Concurrent only) holds every connection open, once all are
	// established, until the harness releases the gate of that name.
	Gate string `json:"gate,omitempty"`
}

// LoadResult is what a load saw.
type LoadResult struct {
	OK        int            `json:"ok"`        // the expected server answered with the connection's token, intact
	Misrouted int            `json:"misrouted"` // another server, or another connection's token, answered
	Failed    int            `json:"failed"`    // no (intact) answer
	Outcomes  map[string]int `json:"outcomes"`  // outcome of the failed and misrouted ones
	Examples  []string       `json:"examples,omitempty"`
	MaxOpen   int            `json:"max_open"` // the most connections open at once
	ElapsedMS int64          `json:"elapsed_ms"`
}

// ProxyEvent is one connection accepted by the proxy.
type ProxyEvent struct {
	Listener    int    `json:"listener"`
	OrigDst     string `json:"orig_dst"`
	OrigDstFrom string `json:"orig_dst_from"` // SO_ORIGINAL_DST/len=N, IP6T_SO_ORIGINAL_DST/len=N or getsockname
	// OrigDstAnswers is what each option answered: "ip=<addr>/len=N|failed
	// ipv6=...".
	OrigDstAnswers string `json:"orig_dst_answers,omitempty"`
	Local          string `json:"local"`
	Peer           string `json:"peer"`
	Action         string `json:"action"`
	UpLocal        string `json:"up_local,omitempty"`
	UpPeer         string `json:"up_peer,omitempty"`
	BytesUp        int64  `json:"bytes_up"`   // client → upstream
	BytesDown      int64  `json:"bytes_down"` // upstream → client
	Request        string `json:"request,omitempty"`
}

// ServerEvent is one connection (or datagram) accepted by a server.
type ServerEvent struct {
	Name    string `json:"name"`
	Proto   string `json:"proto"`
	Local   string `json:"local"`
	Peer    string `json:"peer"`
	Mark    uint32 `json:"mark"`
	Request string `json:"request"`
}
