// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Inbound capture at tcx ingress/egress of the pod's interfaces: nat
 * PREROUTING of inpod-rules.v4 and .v6. Included by redirect.c. */
#include "redirect.h"
#include "packet.h"

/* Close tracking of a redirected inbound connection (see struct in_flow).
 * Only what the proxy's own TCP stack confirms counts, so that a forged FIN
 * or reset cannot remove the entry of a live connection: the remote's FIN
 * counts once the proxy acknowledges exactly its end, and a reset only at
 * exactly the sequence number the proxy last acknowledged (what the stack
 * itself accepts, RFC 5961). Both run after the packet was rewritten. */
static __always_inline void track_in(struct flow_key *k, struct in_flow *f, struct pkt *p)
{
	__u32 seq = bpf_ntohl(p->tcp.seq);

	if (p->tcp.rst) {
		if (f->rcv_known && seq == f->rcv_nxt)
			bpf_map_delete_elem(&in_flows, k);
		return;
	}
	if (p->tcp.fin) {
		f->in_fin_end = seq + p->payload + 1;
		f->in_fin = 1;
	}
	if (p->tcp.ack && f->out_fin && bpf_ntohl(p->tcp.ack_seq) == f->out_fin_end) {
		f->out_fin_acked = 1;
		if (f->in_fin_acked)
			bpf_map_delete_elem(&in_flows, k); /* the last ACK of the connection */
	}
}

static __always_inline void track_out(struct flow_key *k, struct in_flow *f, struct pkt *p)
{
	__u32 ack = bpf_ntohl(p->tcp.ack_seq);

	if (p->tcp.rst) {
		bpf_map_delete_elem(&in_flows, k); /* our own stack resets it */
		return;
	}
	if (p->tcp.ack) {
		f->rcv_nxt = ack;
		f->rcv_known = 1;
		if (f->in_fin && ack == f->in_fin_end)
			f->in_fin_acked = 1;
	}
	if (p->tcp.fin) {
		f->out_fin_end = bpf_ntohl(p->tcp.seq) + p->payload + 1;
		f->out_fin = 1;
	}
	if (f->in_fin_acked && f->out_fin_acked)
		bpf_map_delete_elem(&in_flows, k);
}

/* Whether the redirected connection recorded in f, from the packet's remote
 * ip:port, still has a socket that is not closing for good: a full or
 * request socket at its rewritten address (new:15006). A listener (no
 * connection) or one in TIME_WAIT does not count. */
static __always_inline int redirected_conn_open(struct __sk_buff *skb, struct pkt *p, struct in_flow *f)
{
	struct bpf_sock_tuple t = {};
	__u32 size = sizeof(t.ipv4);
	struct bpf_sock *sk;
	int open;

	if (p->v6) {
		__builtin_memcpy(t.ipv6.saddr, p->saddr, 16);
		__builtin_memcpy(t.ipv6.daddr, f->new, 16);
		t.ipv6.sport = p->tcp.source;
		t.ipv6.dport = bpf_htons(cfg.inbound_port);
		size = sizeof(t.ipv6);
	} else {
		t.ipv4.saddr = p->saddr[3];
		t.ipv4.daddr = f->new[3];
		t.ipv4.sport = p->tcp.source;
		t.ipv4.dport = bpf_htons(cfg.inbound_port);
	}
	sk = bpf_skc_lookup_tcp(skb, &t, size, BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	open = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT && sk->state != BPF_TCP_CLOSE;
	bpf_sk_release(sk);
	return open;
}

/* nat PREROUTING for a new TCP connection from saddr to daddr:dport (network
 * order) carrying mark, first match wins; the family is the addresses'.
 * Shared with explain.c. */
static __always_inline enum rule inbound_rule(const __u32 *saddr, const __u32 *daddr, __u16 dport_be, __u32 mark)
{
	if (addr_is_probe(saddr))
		return RULE_IN_PROBE;
	if (!addr_is_localhost(daddr) && dport_be != bpf_htons(cfg.hbone_port) && !has_mark(mark, cfg.proxy_mark))
		return RULE_IN_REDIRECT;
	return RULE_IN_UNTOUCHED;
}

/* Where REDIRECT sends a connection to dst arriving on ifindex: the
 * interface's first address of dst's family (and, for IPv6, of its scope:
 * link-local or global). Zero if it has none, or we hold no state for it:
 * then the redirect fails closed. Shared with explain.c. */
static __always_inline void inbound_target(__u64 netns, __u32 ifindex, const __u32 *dst, __u32 *to)
{
	struct iface_key ik = { .netns = netns, .ifindex = ifindex };
	struct iface_info *ifc = bpf_map_lookup_elem(&ifaces, &ik);

	to[0] = to[1] = to[2] = to[3] = 0;
	if (!ifc)
		return;
	if (addr_is_v4(dst)) {
		if (ifc->primary4)
			addr_set_v4(to, ifc->primary4);
	} else if (addr_is_linklocal6(dst)) {
		addr_copy(to, ifc->ll6);
	} else {
		addr_copy(to, ifc->primary6);
	}
}

/* A new inbound connection's destination port becomes 15006 on the interface's
 * address (what REDIRECT does), and every later packet of it follows;
 * pod_egress undoes it on the way back. */
SEC("tcx/ingress")
int pod_ingress(struct __sk_buff *skb)
{
	struct pkt p;
	int r = parse(skb, sizeof(struct ethhdr), &p);

	if (r <= 0)
		return r < 0 ? TCX_DROP : TCX_NEXT;

	struct flow_key k = { .netns = dev_netns_cookie(skb), .port = bpf_ntohs(p.tcp.source) };
	struct in_flow *f;

	addr_copy(k.addr, p.saddr);
	if (!(p.tcp.syn && !p.tcp.ack)) {
		/* Not a new connection: follow the decision made for its SYN. */
		f = bpf_map_lookup_elem(&in_flows, &k);
		if (!f || !addr_eq(p.daddr, f->orig) || p.tcp.dest != bpf_htons(f->orig_port))
			return TCX_NEXT;
		if (set_addr(skb, &p, 1, f->orig, f->new) ||
		    set_port(skb, &p, offsetof(struct tcphdr, dest), p.tcp.dest, bpf_htons(cfg.inbound_port)))
			return TCX_DROP;
		track_in(&k, f, &p);
		return TCX_NEXT;
	}

	__u8 family = pkt_family(&p);
	enum rule rule = inbound_rule(p.saddr, p.daddr, p.tcp.dest, skb->mark);
	f = bpf_map_lookup_elem(&in_flows, &k);
	/* The remote port already carries a redirected connection, to another
	 * destination, that is still open: after the rewrite both would be
	 * remote -> primary:15006. REDIRECT's conntrack drops such a clashing SYN
	 * (the client retries); so do we, rather than hijack the open one. */
	int clash = f && (!addr_eq(f->orig, p.daddr) || f->orig_port != bpf_ntohs(p.tcp.dest)) &&
		    redirected_conn_open(skb, &p, f);
	if (rule != RULE_IN_REDIRECT) {
		/* Not redirected: a record of an earlier connection from this
		 * remote port is stale unless that connection is still open (the
		 * new one's packets do not match it either way). */
		if (f && !clash)
			bpf_map_delete_elem(&in_flows, &k);
		count(k.netns, rule, family);
		return TCX_NEXT;
	}
	if (clash) {
		count(k.netns, RULE_FAIL_CLOSED, family);
		return TCX_DROP;
	}

	struct in_flow nf = { .orig_port = bpf_ntohs(p.tcp.dest) };
	addr_copy(nf.orig, p.daddr);
	inbound_target(k.netns, skb->ifindex, p.daddr, nf.new);
	if (addr_is_zero(nf.new)) {
		/* No state for this interface, or (as REDIRECT) no address. */
		count(k.netns, RULE_FAIL_CLOSED, family);
		return TCX_DROP;
	}
	if (bpf_map_update_elem(&in_flows, &k, &nf, BPF_ANY)) {
		count(k.netns, RULE_FAIL_CLOSED, family);
		return TCX_DROP;
	}
	if (set_addr(skb, &p, 1, nf.orig, nf.new) ||
	    set_port(skb, &p, offsetof(struct tcphdr, dest), p.tcp.dest, bpf_htons(cfg.inbound_port))) {
		count(k.netns, RULE_FAIL_CLOSED, family);
		return TCX_DROP;
	}
	count(k.netns, RULE_IN_REDIRECT, family);
	return TCX_NEXT;
}

/* A TCP segment to ::1 leaving through the pod's interface belongs to lo
 * (but a SYN: a socket bound to that interface sends its SYNs there, as under
 * ip6tables, where they are lost).
 * The kernel routes a reply it makes itself (a reset, the ACK of a socket in
 * TIME_WAIT) to a loopback address strictly through the interface the
 * answered segment came in on, and the proxy's segments to the pod's address
 * count as coming in on that address's interface: without this, the
 * application's resets and last ACKs to its redirected peer [::1]:15001 would
 * leave the pod and be lost (the proxy's sockets then linger, and a reused
 * port meets them). Under ip6tables the application's peer is the original
 * destination, so its replies are routed normally and then translated. */
static __always_inline int to_lo(struct __sk_buff *skb)
{
	static const __u8 zero_mac[ETH_ALEN] = {};

	/* lo drops frames not addressed to its (all-zero) MAC. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), zero_mac, ETH_ALEN, 0))
		return TCX_DROP;
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

/* The proxy's replies on a redirected inbound connection get back the source
 * the remote sent to. */
SEC("tcx/egress")
int pod_egress(struct __sk_buff *skb)
{
	struct pkt p;

	if (parse(skb, sizeof(struct ethhdr), &p) <= 0)
		return TCX_NEXT; /* our own stack's packets: nothing to undo */
	if (p.v6 && addr_is_v6_loopback(p.daddr) && !p.tcp.syn)
		return to_lo(skb);
	if (p.tcp.source != bpf_htons(cfg.inbound_port))
		return TCX_NEXT;

	struct flow_key k = { .netns = dev_netns_cookie(skb), .port = bpf_ntohs(p.tcp.dest) };
	addr_copy(k.addr, p.daddr);
	struct in_flow *f = bpf_map_lookup_elem(&in_flows, &k);

	if (!f || !addr_eq(p.saddr, f->new))
		return TCX_NEXT;
	if (set_addr(skb, &p, 0, f->new, f->orig) ||
	    set_port(skb, &p, offsetof(struct tcphdr, source), p.tcp.source, bpf_htons(f->orig_port)))
		return TCX_DROP;
	track_out(&k, f, &p);
	return TCX_NEXT;
}
