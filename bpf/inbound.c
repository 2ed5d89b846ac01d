// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Inbound capture and the return path, at tcx ingress/egress of the pod's
 * interfaces: nat PREROUTING and mangle of inpod-rules.v4. Included by
 * redirect.c. */
#include "redirect.h"

/* The namespace of the device the packet is on. bpf_get_netns_cookie(skb)
 * follows skb->sk first, and at a veth's ingress that is still the sending
 * socket in the peer's namespace; so read dev->nd_net through the kernel's
 * sk_buff (CO-RE against the running kernel's BTF, kernel >= 6.3). */
struct net {
	__u64 net_cookie;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct net_device {
	possible_net_t nd_net;
} __attribute__((preserve_access_index));

struct sk_buff {
	struct net_device *dev;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *) __ksym;

static __always_inline __u64 dev_netns_cookie(struct __sk_buff *ctx)
{
	struct sk_buff *skb = bpf_cast_to_kern_ctx(ctx);
	struct net_device *dev = skb->dev;

	if (!dev)
		return 0;
	struct net *net = dev->nd_net.net;
	if (!net)
		return 0;
	return net->net_cookie;
}

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

struct pkt {
	struct iphdr ip;
	struct tcphdr tcp;
	__u32 l3;      /* offset of the IP header */
	__u32 l4;      /* offset of the TCP header */
	__u32 payload; /* TCP payload bytes, from the IP total length */
};

/* 1: an IPv4 TCP packet with its headers in p; 0: not ours; -1: TCP we must
 * not touch: a fragment, whose ports we cannot see, or headers and lengths
 * that do not add up (the kernel would drop it; we drop it first: fail
 * closed). */
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 0;
	p->l3 = sizeof(struct ethhdr);
	if (bpf_skb_load_bytes(skb, p->l3, &p->ip, sizeof(p->ip)))
		return 0;
	if (p->ip.version != 4 || p->ip.ihl < 5 || p->ip.protocol != IPPROTO_TCP)
		return 0;
	if (p->ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -1;
	p->l4 = p->l3 + p->ip.ihl * 4;
	if (bpf_skb_load_bytes(skb, p->l4, &p->tcp, sizeof(p->tcp)))
		return -1; /* claims TCP, too short for a header */
	if (p->tcp.doff < 5)
		return -1;
	__u32 avail = skb->len - p->l3;
	__u32 tot = bpf_ntohs(p->ip.tot_len);
	if (tot == 0 && skb->gso_size)
		tot = avail; /* BIG TCP: a GSO packet over 64 KiB has no IP length */
	__u32 hdrs = p->ip.ihl * 4 + p->tcp.doff * 4;
	if (tot > avail || tot < hdrs)
		return -1; /* truncated, or the headers overrun the IP length */
	p->payload = tot - hdrs;
	return 1;
}

#define IP_CSUM_OFF(p) ((p)->l3 + offsetof(struct iphdr, check))
#define TCP_CSUM_OFF(p) ((p)->l4 + offsetof(struct tcphdr, check))

static __always_inline int set_addr(struct __sk_buff *skb, struct pkt *p, __u32 off_in_ip,
				    __u32 from, __u32 to)
{
	if (from == to)
		return 0;
	if (bpf_l4_csum_replace(skb, TCP_CSUM_OFF(p), from, to, BPF_F_PSEUDO_HDR | sizeof(to)))
		return -1;
	if (bpf_l3_csum_replace(skb, IP_CSUM_OFF(p), from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, p->l3 + off_in_ip, &to, sizeof(to), 0);
}

static __always_inline int set_port(struct __sk_buff *skb, struct pkt *p, __u32 off_in_tcp,
				    __u16 from, __u16 to)
{
	if (from == to)
		return 0;
	if (bpf_l4_csum_replace(skb, TCP_CSUM_OFF(p), from, to, sizeof(to)))
		return -1;
	return bpf_skb_store_bytes(skb, p->l4 + off_in_tcp, &to, sizeof(to), 0);
}

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
 * request socket at its rewritten address (new_ip:15006). A listener (no
 * connection) or one in TIME_WAIT does not count. */
static __always_inline int redirected_conn_open(struct __sk_buff *skb, struct pkt *p, struct in_flow *f)
{
	struct bpf_sock_tuple t = {
		.ipv4 = {
			.saddr = p->ip.saddr,
			.daddr = f->new_ip,
			.sport = p->tcp.source,
			.dport = bpf_htons(cfg.inbound_port),
		},
	};
	struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	int open;

	if (!sk)
		return 0;
	open = sk->state != BPF_TCP_LISTEN && sk->state != BPF_TCP_TIME_WAIT && sk->state != BPF_TCP_CLOSE;
	bpf_sk_release(sk);
	return open;
}

/* nat PREROUTING for a new TCP connection from saddr to daddr:dport (network
 * order) carrying mark, first match wins. Shared with explain.c. */
static __always_inline enum rule inbound_rule(__u32 saddr, __u32 daddr, __u16 dport_be, __u32 mark)
{
	if (saddr == cfg.probe_addr)
		return RULE_IN_PROBE;
	if (daddr != LOCALHOST && dport_be != bpf_htons(cfg.hbone_port) && !has_mark(mark, cfg.proxy_mark))
		return RULE_IN_REDIRECT;
	return RULE_IN_UNTOUCHED;
}

/* Where REDIRECT sends a connection arriving on ifindex: the interface's
 * primary address (0 if it has none, or we hold no state for it: then the
 * redirect fails closed). Shared with explain.c. */
static __always_inline __u32 inbound_target(__u64 netns, __u32 ifindex)
{
	struct iface_key ik = { .netns = netns, .ifindex = ifindex };
	struct iface_info *ifc = bpf_map_lookup_elem(&ifaces, &ik);

	return ifc ? ifc->primary_ip : 0;
}

/* A new inbound connection's destination port becomes 15006 on the interface's
 * primary address (what REDIRECT does), and every later packet of it follows;
 * pod_egress undoes it on the way back. */
SEC("tcx/ingress")
int pod_ingress(struct __sk_buff *skb)
{
	struct pkt p;
	int r = parse(skb, &p);

	if (r <= 0)
		return r < 0 ? TCX_DROP : TCX_NEXT;

	struct flow_key k = {
		.netns = dev_netns_cookie(skb),
		.ip = p.ip.saddr,
		.port = bpf_ntohs(p.tcp.source),
	};
	struct in_flow *f;

	if (!(p.tcp.syn && !p.tcp.ack)) {
		/* Not a new connection: follow the decision made for its SYN. */
		f = bpf_map_lookup_elem(&in_flows, &k);
		if (!f || p.ip.daddr != f->orig_ip || p.tcp.dest != bpf_htons(f->orig_port))
			return TCX_NEXT;
		if (set_addr(skb, &p, offsetof(struct iphdr, daddr), f->orig_ip, f->new_ip) ||
		    set_port(skb, &p, offsetof(struct tcphdr, dest), p.tcp.dest,
			     bpf_htons(cfg.inbound_port)))
			return TCX_DROP;
		track_in(&k, f, &p);
		return TCX_NEXT;
	}

	enum rule rule = inbound_rule(p.ip.saddr, p.ip.daddr, p.tcp.dest, skb->mark);
	f = bpf_map_lookup_elem(&in_flows, &k);
	/* The remote port already carries a redirected connection, to another
	 * destination, that is still open: after the rewrite both would be
	 * remote -> primary:15006. REDIRECT's conntrack drops such a clashing SYN
	 * (the client retries); so do we, rather than hijack the open one. */
	int clash = f && (f->orig_ip != p.ip.daddr || f->orig_port != bpf_ntohs(p.tcp.dest)) &&
		    redirected_conn_open(skb, &p, f);
	if (rule != RULE_IN_REDIRECT) {
		/* Not redirected: a record of an earlier connection from this
		 * remote port is stale unless that connection is still open (the
		 * new one's packets do not match it either way). */
		if (f && !clash)
			bpf_map_delete_elem(&in_flows, &k);
		count(k.netns, rule);
		return TCX_NEXT;
	}
	if (clash) {
		count(k.netns, RULE_FAIL_CLOSED);
		return TCX_DROP;
	}

	__u32 target = inbound_target(k.netns, skb->ifindex);
	if (!target) {
		/* No state for this interface, or (as REDIRECT) no address. */
		count(k.netns, RULE_FAIL_CLOSED);
		return TCX_DROP;
	}

	struct in_flow nf = {
		.orig_ip = p.ip.daddr,
		.orig_port = bpf_ntohs(p.tcp.dest),
		.new_ip = target,
	};
	if (bpf_map_update_elem(&in_flows, &k, &nf, BPF_ANY)) {
		count(k.netns, RULE_FAIL_CLOSED);
		return TCX_DROP;
	}
	if (set_addr(skb, &p, offsetof(struct iphdr, daddr), nf.orig_ip, nf.new_ip) ||
	    set_port(skb, &p, offsetof(struct tcphdr, dest), p.tcp.dest,
		     bpf_htons(cfg.inbound_port))) {
		count(k.netns, RULE_FAIL_CLOSED);
		return TCX_DROP;
	}
	count(k.netns, RULE_IN_REDIRECT);
	return TCX_NEXT;
}

/* mangle: the reply to a connection the proxy opened with a spoofed source
 * (its socket is local, marked 0x539) gets the connection mark 0x111 and, as
 * the policy route would send it, goes back in through lo. */
static __always_inline int reply_to_proxy(struct __sk_buff *skb, struct pkt *p, __u64 netns)
{
	struct bpf_sock_tuple t = {
		.ipv4 = {
			.saddr = p->ip.saddr,
			.daddr = p->ip.daddr,
			.sport = p->tcp.source,
			.dport = p->tcp.dest,
		},
	};
	struct bpf_sock *sk = bpf_sk_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	int ours = 0;

	if (!sk)
		return TCX_NEXT;
	/* A listener would match any remote: only a connected local socket
	 * whose local end is this packet's destination counts. */
	if (sk->state != BPF_TCP_LISTEN && has_mark(sk->mark, cfg.proxy_mark))
		ours = 1;
	bpf_sk_release(sk);
	if (!ours)
		return TCX_NEXT;

	static const __u8 zero_mac[ETH_ALEN] = {};
	skb->mark = cfg.conn_mark;
	/* lo drops frames not addressed to its (all-zero) MAC. */
	if (bpf_skb_store_bytes(skb, offsetof(struct ethhdr, h_dest), zero_mac, ETH_ALEN, 0))
		return TCX_DROP;
	/* Counted once per connection: on the reply to the proxy's SYN. */
	if (p->tcp.syn)
		count(netns, RULE_CONNMARK_RESTORE);
	return bpf_redirect(LOOPBACK_IFINDEX, BPF_F_INGRESS);
}

SEC("tcx/egress")
int pod_egress(struct __sk_buff *skb)
{
	struct pkt p;
	int r = parse(skb, &p);

	if (r <= 0)
		return TCX_NEXT; /* our own stack's packets: nothing to undo */

	__u64 netns = dev_netns_cookie(skb);

	if (p.tcp.source == bpf_htons(cfg.inbound_port)) {
		struct flow_key k = {
			.netns = netns,
			.ip = p.ip.daddr,
			.port = bpf_ntohs(p.tcp.dest),
		};
		struct in_flow *f = bpf_map_lookup_elem(&in_flows, &k);

		if (f && p.ip.saddr == f->new_ip) {
			if (set_addr(skb, &p, offsetof(struct iphdr, saddr), f->new_ip, f->orig_ip) ||
			    set_port(skb, &p, offsetof(struct tcphdr, source), p.tcp.source,
				     bpf_htons(f->orig_port)))
				return TCX_DROP;
			track_out(&k, f, &p);
			return TCX_NEXT;
		}
	}
	/* The proxy's own packets (its relays, its listeners' replies) carry its
	 * mark: they are never replies to a spoofed proxy socket, so they skip
	 * the socket lookup (most of the egress traffic of a captured pod). */
	if (has_mark(skb->mark, cfg.proxy_mark))
		return TCX_NEXT;
	return reply_to_proxy(skb, &p, netns);
}
