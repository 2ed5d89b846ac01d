package test

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/equiv"
	"github.com/ebpf-redirect/ebpf-redirect/internal/lab/standin"
	"github.com/ebpf-redirect/ebpf-redirect/internal/podnet"
)

// With the pod's conntrack table full, the iptables ruleset cannot track (and
// so cannot redirect, nor even pass) a new connection: netfilter drops it.
// ebpf-redirect does not use conntrack: the same pod, its table just as full,
// keeps capturing. The table is filled through ctnetlink with entries marked
// assured (which conntrack never evicts early), in the pod's own netns: the
// limit (nf_conntrack_max, global and not settable from a netns) is counted
// per netns, so nothing outside the pod is affected.
func TestConntrackTableFull(t *testing.T) {
	r := runner(t)
	max, err := readInt("/proc/sys/net/netfilter/nf_conntrack_max")
	if err != nil {
		t.Skipf("no conntrack: %v", err)
	}
	if max > 1<<20 {
		t.Skipf("nf_conntrack_max is %d: too large to fill in a test", max)
	}
	for _, b := range []equiv.Backend{referenceBackend(t), &equiv.Ebpf{Binary: ebpfBinary(t)}} {
		t.Run(b.Name(), func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			pod, err := r.Run.NewPod()
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := pod.Close(); err != nil {
					t.Errorf("pod teardown: %v", err)
				}
			}()
			if err := b.Apply(ctx, r.Run, pod); err != nil {
				t.Fatal(err)
			}
			defer func() {
				if err := b.Remove(context.Background(), r.Run, pod); err != nil {
					t.Errorf("remove: %v", err)
				}
			}()
			start := func(role, ns, cg string) *standin.Agent {
				return standin.MustStart(t, ctx, standin.StartOptions{Role: role, NetNSPath: ns, CgroupDir: cg})
			}
			proxy := start(standin.RoleProxy, pod.NetNSPath(), pod.ProxyCgrp)
			app := start(standin.RoleApp, pod.NetNSPath(), pod.PodCgroup)
			peer := start(standin.RolePeer, pod.PeerNetNSPath(), pod.PeerCgroup)
			if err := proxy.StartProxy(ctx, standin.ProxySpec{Outbound: true, Inbound: true, HBONE: true}); err != nil {
				t.Fatal(err)
			}
			if _, err := peer.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "0.0.0.0:80"}); err != nil {
				t.Fatal(err)
			}
			if _, err := app.Listen(ctx, standin.ListenSpec{Proto: "tcp", Addr: "0.0.0.0:8080"}); err != nil {
				t.Fatal(err)
			}
			dial := func(a *standin.Agent, dst string) standin.DialResult {
				res, err := a.Dial(ctx, standin.DialSpec{Proto: "tcp", Dst: dst, Token: "ct-" + b.Name(), TimeoutMS: 1500})
				if err != nil {
					t.Fatal(err)
				}
				return res
			}
			// Working before.
			for _, c := range []struct {
				a   *standin.Agent
				dst string
			}{{app, "10.77.0.1:80"}, {peer, "10.77.0.2:8080"}} {
				if res := dial(c.a, c.dst); res.Outcome != standin.OutcomeOK {
					t.Fatalf("before filling the table: %s: %+v", c.dst, res)
				}
			}

			added, err := fillConntrack(pod.NetNSPath())
			if err != nil {
				t.Fatal(err)
			}
			count, _ := readIntIn(pod.NetNSPath(), "/proc/sys/net/netfilter/nf_conntrack_count")
			t.Logf("added %d assured entries: the pod's table holds %d of %d", added, count, max)
			if count < max {
				t.Fatalf("the table is not full: %d of %d", count, max)
			}

			out, in := dial(app, "10.77.0.1:80"), dial(peer, "10.77.0.2:8080")
			t.Logf("table full under %s: outbound %s %s; inbound %s %s", b.Name(), out.Outcome, out.Reply, in.Outcome, in.Reply)
			switch b.Name() {
			case "iptables":
				if out.Outcome == standin.OutcomeOK || in.Outcome == standin.OutcomeOK {
					t.Errorf("the reference passed a new connection with its conntrack table full: outbound %+v, inbound %+v", out, in)
				}
			default:
				if out.Reply != "RESP peer:80 ct-ebpf 0 intact" || in.Reply != "RESP app:8080 ct-ebpf 0 intact" {
					t.Errorf("ebpf-redirect depends on conntrack: outbound %+v, inbound %+v", out, in)
				}
				cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
				defer ccancel()
				evs, err := standin.Collect(cctx, proxy, app, peer)
				if err != nil {
					t.Fatal(err)
				}
				if n := len(evs[proxy].Proxy); n != 4 { // two before, two after
					t.Errorf("the proxy relayed %d connections, want 4: %+v", n, evs[proxy].Proxy)
				}
			}
		})
	}
}

func readInt(path string) (int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// readIntIn reads a /proc/sys value as seen from a netns.
func readIntIn(nsPath, path string) (int, error) {
	ns, err := podnet.Open(nsPath)
	if err != nil {
		return 0, err
	}
	defer ns.Close()
	var v int
	err = podnet.Do(ns, func() error {
		var err error
		v, err = readInt(path)
		return err
	})
	return v, err
}

// ctnetlink, as much as filling the table needs.
const (
	nfnlSubsysCtnetlink = 1
	ipctnlMsgCtNew      = 0
	ctaTupleOrig        = 1
	ctaTupleReply       = 2
	ctaStatus           = 3
	ctaTimeout          = 7
	ctaTupleIP          = 1
	ctaTupleProto       = 2
	ctaIPv4Src          = 1
	ctaIPv4Dst          = 2
	ctaProtoNum         = 1
	ctaProtoSrcPort     = 2
	ctaProtoDstPort     = 3
	ipsSeenReply        = 1 << 1
	ipsAssured          = 1 << 2
	ipsConfirmed        = 1 << 3 // the kernel sets it on a created entry; the request must agree
	nlaNested           = 1 << 15
)

func nlAttr(typ uint16, payload []byte) []byte {
	b := make([]byte, 4, 4+len(payload)+3)
	binary.NativeEndian.PutUint16(b[0:], uint16(4+len(payload)))
	binary.NativeEndian.PutUint16(b[2:], typ)
	b = append(b, payload...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

func be16(v uint16) []byte { return binary.BigEndian.AppendUint16(nil, v) }
func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }

func ctTuple(src, dst [4]byte, sport, dport uint16) []byte {
	ip := append(nlAttr(ctaIPv4Src, src[:]), nlAttr(ctaIPv4Dst, dst[:])...)
	proto := append(append(nlAttr(ctaProtoNum, []byte{unix.IPPROTO_UDP}), nlAttr(ctaProtoSrcPort, be16(sport))...), nlAttr(ctaProtoDstPort, be16(dport))...)
	return append(nlAttr(nlaNested|ctaTupleIP, ip), nlAttr(nlaNested|ctaTupleProto, proto)...)
}

// ctNew is a request creating an assured UDP entry, unique for i, living an hour.
func ctNew(seq uint32, i int) []byte {
	src := [4]byte{10, 200, byte(i >> 16), byte(i >> 8)}
	dst := [4]byte{10, 201, 0, 1}
	sport, dport := uint16(1024+i&0xff), uint16(53)
	body := []byte{unix.AF_INET, 0, 0, 0} // nfgenmsg: family, version, res_id
	body = append(body, nlAttr(nlaNested|ctaTupleOrig, ctTuple(src, dst, sport, dport))...)
	body = append(body, nlAttr(nlaNested|ctaTupleReply, ctTuple(dst, src, dport, sport))...)
	body = append(body, nlAttr(ctaStatus, be32(ipsAssured|ipsSeenReply|ipsConfirmed))...)
	body = append(body, nlAttr(ctaTimeout, be32(3600))...)
	h := make([]byte, unix.NLMSG_HDRLEN)
	binary.NativeEndian.PutUint32(h[0:], uint32(len(h)+len(body)))
	binary.NativeEndian.PutUint16(h[4:], nfnlSubsysCtnetlink<<8|ipctnlMsgCtNew)
	binary.NativeEndian.PutUint16(h[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK|unix.NLM_F_CREATE|unix.NLM_F_EXCL)
	binary.NativeEndian.PutUint32(h[8:], seq)
	return append(h, body...)
}

// fillConntrack adds entries to the conntrack table of a netns until it
// refuses one for being full, and returns how many it added.
func fillConntrack(nsPath string) (int, error) {
	ns, err := podnet.Open(nsPath)
	if err != nil {
		return 0, err
	}
	defer ns.Close()
	var fd int
	// The socket belongs to the netns it is created in.
	if err := podnet.Do(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
		return err
	}); err != nil {
		return 0, fmt.Errorf("ctnetlink socket: %w", err)
	}
	defer unix.Close(fd)
	_ = unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1) // short acks
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, err
	}
	const batch = 256
	added, seq, retries := 0, uint32(1), 0
	buf := make([]byte, 1<<16)
	for i := 0; i < 1<<24; i += batch {
		var msg []byte
		for j := 0; j < batch; j++ {
			msg = append(msg, ctNew(seq, i+j)...)
			seq++
		}
		if _, err := unix.Write(fd, msg); err != nil {
			return added, fmt.Errorf("ctnetlink write: %w", err)
		}
		full := false
		for acks := 0; acks < batch; {
			n, err := unix.Read(fd, buf)
			if err != nil {
				return added, fmt.Errorf("ctnetlink read: %w", err)
			}
			msgs, err := syscall.ParseNetlinkMessage(buf[:n])
			if err != nil {
				return added, err
			}
			for _, m := range msgs {
				if m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
					continue
				}
				acks++
				switch errno := -int32(binary.NativeEndian.Uint32(m.Data)); {
				case errno == 0:
					added++
				case unix.Errno(errno) == unix.ENOMEM, unix.Errno(errno) == unix.ENOSPC:
					full = true
				default:
					return added, fmt.Errorf("ctnetlink: creating an entry: %w", unix.Errno(errno))
				}
			}
		}
		if full {
			// Full, or an atomic allocation failed under memory pressure
			// (seen right after another netns's table was filled): only the
			// count tells.
			count, err := readIntIn(nsPath, "/proc/sys/net/netfilter/nf_conntrack_count")
			max, merr := readInt("/proc/sys/net/netfilter/nf_conntrack_max")
			if err != nil || merr != nil {
				return added, errors.Join(err, merr)
			}
			if count >= max {
				return added, nil
			}
			if retries++; retries > 100 {
				return added, fmt.Errorf("the conntrack table stays at %d of %d entries", count, max)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return added, errors.New("the conntrack table never filled up")
}
