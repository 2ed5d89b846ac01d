// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* The inbound capture lives at tc on the interfaces the pod had at attach. A
 * new TCP connection that reaches a socket of the pod's cgroup through any
 * other interface (one added later) was never offered to the redirect: refuse
 * it rather than let it bypass the proxy. Attached at the pod's cgroup, so it
 * sees only packets delivered to the pod's own sockets, never the proxy's.
 * Included by redirect.c, after inbound.c (dev_netns_cookie). */
#include "redirect.h"

SEC("cgroup_skb/ingress")
int pod_sock_ingress(struct __sk_buff *skb)
{
	struct iphdr ip;
	__u8 flags;

	/* Loopback carries the pod's own traffic and our 0x111 return path. */
	if (skb->protocol != bpf_htons(ETH_P_IP) || skb->ifindex == LOOPBACK_IFINDEX)
		return 1;
	/* cgroup_skb sees the packet from its network header. */
	if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) || ip.protocol != IPPROTO_TCP)
		return 1;
	if (bpf_skb_load_bytes(skb, ip.ihl * 4 + 13, &flags, sizeof(flags)))
		return 1;
	if ((flags & (TCP_FLAG_SYN_BYTE | TCP_FLAG_ACK_BYTE)) != TCP_FLAG_SYN_BYTE)
		return 1; /* only new connections are decided here */

	struct iface_key k = { .netns = dev_netns_cookie(skb), .ifindex = skb->ifindex };
	if (bpf_map_lookup_elem(&ifaces, &k))
		return 1; /* an interface with the tc programs: it was offered to them */
	count(k.netns, RULE_FAIL_CLOSED);
	return 0;
}
