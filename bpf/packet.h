/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packets, for the programs that see them (tc on the pod's interfaces, and
 * cgroup_skb on the pod's sockets): the device's namespace, parsing IPv4 and
 * IPv6 TCP (extension headers skipped), and rewriting addresses and ports
 * with their checksums. */
#pragma once

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
	__u32 saddr[4]; /* both families as 16 bytes (IPv4 mapped) */
	__u32 daddr[4];
	struct tcphdr tcp;
	__u32 l3;      /* offset of the IP header */
	__u32 l4;      /* offset of the TCP header */
	__u32 payload; /* TCP payload bytes, from the IP length */
	__u8 v6;
};

/* The headers and lengths of a TCP packet: 1 if they add up (the payload
 * length set), -1 if not (the kernel would drop it; we drop it first). */
static __always_inline int tcp_lengths(struct __sk_buff *skb, struct pkt *p, __u32 tot)
{
	if (bpf_skb_load_bytes(skb, p->l4, &p->tcp, sizeof(p->tcp)))
		return -1; /* claims TCP, too short for a header */
	if (p->tcp.doff < 5)
		return -1;
	__u32 avail = skb->len - p->l3;
	if (tot == 0 && skb->gso_size)
		tot = avail; /* BIG TCP: a GSO packet over 64 KiB has no IP length */
	__u32 hdrs = p->l4 - p->l3 + p->tcp.doff * 4;
	if (tot > avail || tot < hdrs)
		return -1; /* truncated, or the headers overrun the IP length */
	p->payload = tot - hdrs;
	return 1;
}

static __always_inline int parse4(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, p->l3, &ip, sizeof(ip)))
		return 0;
	if (ip.version != 4 || ip.ihl < 5 || ip.protocol != IPPROTO_TCP)
		return 0;
	if (ip.frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return -1; /* a fragment: its ports cannot be seen */
	p->v6 = 0;
	addr_set_v4(p->saddr, ip.saddr);
	addr_set_v4(p->daddr, ip.daddr);
	p->l4 = p->l3 + ip.ihl * 4;
	return tcp_lengths(skb, p, bpf_ntohs(ip.tot_len));
}

/* Extension headers a TCP packet may carry before its TCP header: more than
 * this many is dropped (fail closed: a TCP header hidden deeper must not pass
 * uncaptured), which no real packet has. */
#define MAX_EXT_HDRS 8

struct frag_hdr6 {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

static __always_inline int parse6(struct __sk_buff *skb, struct pkt *p)
{
	struct ipv6hdr ip;

	if (!cfg.ipv6)
		return 0; /* IPv6 capture off: as with no ip6tables rules */
	if (bpf_skb_load_bytes(skb, p->l3, &ip, sizeof(ip)) || ip.version != 6)
		return 0;
	__u8 next = ip.nexthdr;
	__u32 off = p->l3 + sizeof(ip);

	for (int i = 0; i < MAX_EXT_HDRS; i++) {
		struct ipv6_opt_hdr h;
		struct frag_hdr6 f;

		switch (next) {
		case IPPROTO_TCP:
			p->v6 = 1;
			__builtin_memcpy(p->saddr, &ip.saddr, 16);
			__builtin_memcpy(p->daddr, &ip.daddr, 16);
			p->l4 = off;
			return tcp_lengths(skb, p, sizeof(ip) + bpf_ntohs(ip.payload_len));
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			/* A truncated chain is the kernel's to drop, as netfilter does
			 * not match it as TCP either. */
			if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)))
				return 0;
			next = h.nexthdr;
			off += (h.hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if (bpf_skb_load_bytes(skb, off, &h, sizeof(h)))
				return 0;
			next = h.nexthdr;
			off += (h.hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, &f, sizeof(f)))
				return 0;
			/* A fragment of TCP: its ports cannot be seen (as for IPv4). */
			return f.nexthdr == IPPROTO_TCP ? -1 : 0;
		default:
			return 0; /* not TCP: UDP, ICMPv6, ESP, no next header... */
		}
	}
	return -1;
}

/* 1: a TCP packet with its headers in p; 0: not ours; -1: TCP we must not
 * touch: a fragment, whose ports we cannot see, or headers and lengths that
 * do not add up (the kernel would drop it; we drop it first: fail closed). l3
 * is where the IP header starts (after the Ethernet header at tc, 0 at
 * cgroup_skb). */
static __always_inline int parse(struct __sk_buff *skb, __u32 l3, struct pkt *p)
{
	p->l3 = l3;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		return parse4(skb, p);
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return parse6(skb, p);
	return 0;
}

static __always_inline __u8 pkt_family(const struct pkt *p)
{
	return p->v6 ? FAMILY_V6 : FAMILY_V4;
}

#define IP_CSUM_OFF(p) ((p)->l3 + offsetof(struct iphdr, check))
#define TCP_CSUM_OFF(p) ((p)->l4 + offsetof(struct tcphdr, check))

/* Rewrites the source (dst == 0) or destination address from -> to, with the
 * checksums. */
static __always_inline int set_addr(struct __sk_buff *skb, struct pkt *p, int dst,
				    const __u32 *from, const __u32 *to)
{
	if (addr_eq(from, to))
		return 0;
	if (!p->v6) {
		__u32 off = dst ? offsetof(struct iphdr, daddr) : offsetof(struct iphdr, saddr);

		if (bpf_l4_csum_replace(skb, TCP_CSUM_OFF(p), from[3], to[3], BPF_F_PSEUDO_HDR | sizeof(__u32)))
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF(p), from[3], to[3], sizeof(__u32)))
			return -1;
		return bpf_skb_store_bytes(skb, p->l3 + off, &to[3], sizeof(__u32), 0);
	}
	/* IPv6 has no header checksum; the TCP one covers the addresses. */
	__u32 off = dst ? offsetof(struct ipv6hdr, daddr) : offsetof(struct ipv6hdr, saddr);
	__u32 f[4], t[4];

	addr_copy(f, from);
	addr_copy(t, to);
	__s64 diff = bpf_csum_diff(f, sizeof(f), t, sizeof(t), 0);
	if (diff < 0)
		return -1;
	if (bpf_l4_csum_replace(skb, TCP_CSUM_OFF(p), 0, diff, BPF_F_PSEUDO_HDR))
		return -1;
	return bpf_skb_store_bytes(skb, p->l3 + off, t, sizeof(t), 0);
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
