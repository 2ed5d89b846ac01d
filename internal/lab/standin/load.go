package standin

import (
	"bufio"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// runLoad opens spec.Count connections, each carrying its own token, and
// checks that each one is answered by the server it was meant for, with its
// own token: a connection handed another's destination, or another's reply,
// counts as misrouted.
func runLoad(spec LoadSpec) LoadResult {
	start := time.Now()
	res := LoadResult{Outcomes: map[string]int{}}
	if len(spec.Dsts) == 0 || len(spec.Expect) != len(spec.Dsts) || spec.Count <= 0 {
		res.Failed = spec.Count
		res.Outcomes[OutcomeErrPrefix+"bad spec"] = spec.Count
		return res
	}
	dsts := make([]netip.AddrPort, len(spec.Dsts))
	for i, d := range spec.Dsts {
		ap, err := netip.ParseAddrPort(d)
		if err != nil {
			res.Failed = spec.Count
			res.Outcomes[OutcomeErrPrefix+"bad dst"] = spec.Count
			return res
		}
		dsts[i] = ap
	}
	parallel := spec.Parallel
	if parallel <= 0 {
		parallel = 256
	}
	timeout := time.Duration(spec.TimeoutMS) * time.Millisecond
	if timeout <= 0 {
		timeout = 5 * time.Second
	}

	var mu sync.Mutex
	var open, maxOpen atomic.Int64
	note := func(outcome, example string, misrouted bool) {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case outcome == OutcomeOK:
			res.OK++
			return
		case misrouted:
			res.Misrouted++
		default:
			res.Failed++
		}
		res.Outcomes[outcome]++
		if len(res.Examples) < 10 {
			res.Examples = append(res.Examples, example)
		}
	}
	connect := func(i int) (*net.TCPConn, error) {
		o := connectOpts{sotype: unix.SOCK_STREAM, dst: dsts[i%len(dsts)], timeout: timeout}
		if spec.SrcPortBase > 0 {
			any := netip.IPv4Unspecified()
			if o.dst.Addr().Is6() {
				any = netip.IPv6Unspecified()
			}
			o.src = netip.AddrPortFrom(any, uint16(spec.SrcPortBase+i))
		}
		c, _, _, err := rawConnect(o)
		if err != nil {
			return nil, err
		}
		n := open.Add(1)
		for m := maxOpen.Load(); n > m && !maxOpen.CompareAndSwap(m, n); m = maxOpen.Load() {
		}
		return c.(*net.TCPConn), nil
	}
	token := func(i int) string { return fmt.Sprintf("%s-%d", spec.TokenPrefix, i) }
	exchange := func(i int, c *net.TCPConn) {
		defer func() { c.Close(); open.Add(-1) }()
		_ = c.SetDeadline(time.Now().Add(4 * timeout))
		tok, want := token(i), spec.Expect[i%len(spec.Expect)]
		if _, err := fmt.Fprintf(c, "%s %s 0\n", requestLinePrefix, tok); err != nil {
			note(classify(err), fmt.Sprintf("%s: write: %v", tok, err), false)
			return
		}
		_ = c.CloseWrite()
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			note(classify(err), fmt.Sprintf("%s: read: %v", tok, err), false)
			return
		}
		var name, got string
		var size int
		if _, err := fmt.Sscanf(line, replyLinePrefix+" %s %s %d\n", &name, &got, &size); err != nil {
			note(OutcomeErrPrefix+"bad reply", fmt.Sprintf("%s: %q", tok, strings.TrimSpace(line)), false)
			return
		}
		if name != want || got != tok {
			note("misrouted", fmt.Sprintf("%s to %s: answered by %s for %s", tok, spec.Dsts[i%len(spec.Dsts)], name, got), true)
			return
		}
		note(OutcomeOK, "", false)
	}

	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	if !spec.Concurrent {
		for i := 0; i < spec.Count; i++ {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				c, err := connect(i)
				if err != nil {
					note(classify(err), fmt.Sprintf("%s: connect: %v", token(i), err), false)
					return
				}
				exchange(i, c)
			}()
		}
		wg.Wait()
	} else {
		// Every connection is established before any exchanges: at the
		// barrier all of them are open end to end at once.
		conns := make([]*net.TCPConn, spec.Count)
		for i := 0; i < spec.Count; i++ {
			sem <- struct{}{}
			wg.Add(1)
			go func() {
				defer func() { <-sem; wg.Done() }()
				c, err := connect(i)
				if err != nil {
					note(classify(err), fmt.Sprintf("%s: connect: %v", token(i), err), false)
					return
				}
				conns[i] = c
			}()
		}
		wg.Wait()
		if spec.Gate != "" {
			if err := gates.hold(spec.Gate); err != nil {
				note(OutcomeErrPrefix+"gate", err.Error(), false)
			}
		}
		for i, c := range conns {
			if c == nil {
				continue
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				exchange(i, c)
			}()
		}
		wg.Wait()
	}
	res.MaxOpen = int(maxOpen.Load())
	res.ElapsedMS = time.Since(start).Milliseconds()
	return res
}
