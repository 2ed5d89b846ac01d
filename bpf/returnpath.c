// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The return path: mangle of the reference. A packet arriving with the
 * proxy's mark (0x539: from a proxy socket, so on lo) gives its connection
 * the connection mark 0x111; every packet the pod then sends on that
 * connection carries 0x111, which the policy route (fwmark 0x111 lookup 100:
 * local via lo) delivers back to the proxy. That is how the application's
 * replies reach the proxy when the proxy connected with the original client's
 * address as its source. Included by redirect.c.
 *
 * Here, without conntrack, the mark travels with the sockets and packets
 * themselves:
 * - tc ingress on the pod's lo gives every packet carrying the proxy's mark
 *   the connection mark instead, before the kernel looks at it;
 * - the SYN so marked makes the request socket, and the application's socket
 *   accepted from it, take the mark (net.ipv4.tcp_fwmark_accept, set by
 *   attach, IPv4 and IPv6): the SYN-ACK and every later reply are routed by
 *   the policy route at once, before any neighbour lookup (so a spoofed client
 *   on the pod's own subnet needs none);
 * - a reset the kernel sends for no socket (a closed port) takes the mark of
 *   what it answers (net.ipv4/ipv6.fwmark_reflect, set by attach);
 * - under iptables the application's socket has no mark (the packets get it
 *   from the connection): the pod's getsockopt hides ours. */
#include "redirect.h"
#include "packet.h"

SEC("tcx/ingress")
int pod_lo_ingress(struct __sk_buff *skb)
{
	struct pkt p;

	if (!has_mark(skb->mark, cfg.proxy_mark))
		return TCX_NEXT; /* most of lo: the application's own packets */
	skb->mark = cfg.conn_mark;
	/* Counted once per connection: on its SYN. */
	if (parse(skb, sizeof(struct ethhdr), &p) > 0 && p.tcp.syn && !p.tcp.ack)
		count(dev_netns_cookie(skb), RULE_CONNMARK_RESTORE, pkt_family(&p));
	return TCX_NEXT;
}

/* SO_MARK of an application socket that took the capture's connection mark
 * (see pod_sockops) reads what it reads under iptables, which marks packets,
 * not the socket: without ours. */
SEC("cgroup/getsockopt")
int pod_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 *m, *v;

	if (ctx->level != SOL_SOCKET || ctx->optname != SO_MARK || ctx->retval != 0 || !sk)
		return 1;
	m = bpf_sk_storage_get(&sk_capture_mark, sk, 0, 0);
	if (!m)
		return 1;
	v = ctx->optval;
	if ((void *)(v + 1) > ctx->optval_end)
		return 1;
	if (*v == *m)
		*v = 0;
	return 1;
}
