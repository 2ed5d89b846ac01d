// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The pod's sockets' ingress (cgroup_skb at the pod's cgroup: it sees only
 * packets delivered to the pod's own sockets, never the proxy's), for new
 * TCP connections. Included by redirect.c.
 *
 * Marks: with net.ipv4.tcp_fwmark_accept (set by attach; IPv4 and IPv6
 * alike) a request socket, and the socket accepted from it, take the SYN's
 * mark. That carries the capture's connection mark (given to the proxy's SYNs
 * on lo, returnpath.c) to the application's socket; every other SYN is given
 * no mark here, so that accepted sockets carry what they carry under iptables
 * (their listener's mark).
 *
 * The interface guard: the inbound capture lives at tc on the interfaces the
 * pod had at attach. A new connection that arrives on any other interface (one
 * added later) was never offered to the redirect: it is refused rather than
 * let it bypass the proxy. */
#include "redirect.h"
#include "packet.h"

SEC("cgroup_skb/ingress")
int pod_sock_ingress(struct __sk_buff *skb)
{
	struct pkt p;

	/* cgroup_skb sees the packet from its network header. Malformed TCP is
	 * the kernel's to drop. */
	if (parse(skb, 0, &p) <= 0)
		return 1;
	if (!(p.tcp.syn && !p.tcp.ack))
		return 1; /* only new connections are decided here */

	if (skb->mark != cfg.conn_mark)
		skb->mark = 0;
	/* Loopback carries the pod's own traffic and the proxy's. */
	if (skb->ifindex == LOOPBACK_IFINDEX)
		return 1;
	__u64 netns = dev_netns_cookie(skb);
	struct iface_key k = { .netns = netns, .ifindex = skb->ifindex };
	if (bpf_map_lookup_elem(&ifaces, &k))
		return 1; /* an interface with the tc programs: it was offered to them */
	count(netns, RULE_FAIL_CLOSED, pkt_family(&p));
	return 0;
}
