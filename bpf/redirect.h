/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shared by every ebpf-redirect program: the load-time config, the maps, the
 * rule numbers and the address helpers. The programs are loaded once per node;
 * everything that differs between pods lives in maps keyed by the pod's netns
 * cookie. Addresses of both families are kept as 16 bytes, network order: an
 * IPv4 address as IPv4-mapped IPv6 (::ffff:a.b.c.d), so that one key, one rule
 * function and one record serve both (what is IPv4 on the wire is decided by
 * the IPv4 rules, whatever the socket's family). */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Everything the reference rulesets hard-code. Written by the Go loader
 * (internal/config) before load; the zero values here are never used.
 * Addresses are network order, ports host order. */
struct config {
	__u32 probe_addr;     /* 169.254.7.127: kubelet probes, never redirected */
	__u32 probe_addr6[4]; /* fd16:9254:7127:1337:ffff:ffff:ffff:ffff, its IPv6 twin */
	__u32 proxy_mark;     /* 0x539: the proxy's own sockets */
	__u32 conn_mark;      /* 0x111: marks replies to the proxy */
	__u32 mark_mask;      /* 0xfff: marks compare under this mask */
	__u16 outbound_port;  /* 15001 */
	__u16 inbound_port;   /* 15006 */
	__u16 hbone_port;     /* 15008 */
	__u8 ipv6;            /* 1: capture IPv6 too (the ip6tables twin is in place) */
	__u8 _pad;
	/* Not read by the programs, but part of the node's config: kept here so
	 * that the pinned constants say everything the node was set up with. */
	__u32 route_table;   /* 100: policy route table of the conn mark */
	__u32 rule_priority; /* 32764: its ip rule preference */
};

volatile const struct config cfg = {};

/* Which rule of the reference decided a connection. The Go side names them
 * (internal/rules) for counters, stats and explain. */
enum rule {
	RULE_NONE = 0,         /* no rule applies: not TCP, or IPv6 with IPv6 capture off */
	RULE_OUT_PROBE,        /* nat OUTPUT 1: -d 169.254.7.127 ACCEPT */
	RULE_OUT_CONNMARK,     /* nat OUTPUT 2: --mark 0x111/0xfff ACCEPT */
	RULE_OUT_LOCAL,        /* nat OUTPUT 3: ! -d 127.0.0.1 -o lo ACCEPT */
	RULE_OUT_REDIRECT,     /* nat OUTPUT 4: REDIRECT --to-ports 15001 */
	RULE_OUT_UNTOUCHED,    /* nat OUTPUT: fell through (127.0.0.1 or proxy mark) */
	RULE_IN_PROBE,         /* nat PREROUTING 1: -s 169.254.7.127 ACCEPT */
	RULE_IN_REDIRECT,      /* nat PREROUTING 2: REDIRECT --to-ports 15006 */
	RULE_IN_UNTOUCHED,     /* nat PREROUTING: fell through (127.0.0.1, 15008, mark) */
	RULE_CONNMARK_RESTORE, /* mangle: a connection of the proxy's to the pod gets 0x111 */
	RULE_FAIL_CLOSED,      /* no state for this pod, or a map update failed */
	RULE_MAX,
};

/* The families counters and explain tell apart (the two rulesets). */
#define FAMILY_V4 4
#define FAMILY_V6 6

/* Reads a context field as it is, here: clang may otherwise turn reads of two
 * fields (in two branches) into one read at a computed offset, which the
 * verifier refuses on context and socket pointers. */
#define CTX_READ(dst, field)                      \
	do {                                      \
		dst = (field);                    \
		asm volatile("" : "+r"(dst));     \
	} while (0)

/* ---- Addresses: 16 bytes, network order, IPv4 mapped. ---- */

static __always_inline int addr_is_v4(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0xffff);
}

static __always_inline void addr_set_v4(__u32 *a, __u32 ip)
{
	a[0] = 0;
	a[1] = 0;
	a[2] = bpf_htonl(0xffff);
	a[3] = ip;
}

static __always_inline void addr_copy(__u32 *dst, const __u32 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
}

static __always_inline int addr_eq(const __u32 *a, const __u32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

static __always_inline int addr_is_zero(const __u32 *a)
{
	return (a[0] | a[1] | a[2] | a[3]) == 0;
}

#define LOCALHOST bpf_htonl(0x7f000001)
#define IS_LOOPBACK_NET(a) ((bpf_ntohl(a) >> 24) == 127)

static __always_inline int addr_is_v6_loopback(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

/* 127.0.0.1 or ::1: the address the rules' "! -d 127.0.0.1/32" (or ::1/128)
 * tests. */
static __always_inline int addr_is_localhost(const __u32 *a)
{
	return addr_is_v4(a) ? a[3] == LOCALHOST : addr_is_v6_loopback(a);
}

/* The unspecified address (0.0.0.0 or ::): what connect() routes as the
 * family's loopback. */
static __always_inline int addr_is_any(const __u32 *a)
{
	return addr_is_v4(a) ? a[3] == 0 : addr_is_zero(a);
}

/* fe80::/10 */
static __always_inline int addr_is_linklocal6(const __u32 *a)
{
	return (bpf_ntohl(a[0]) & 0xffc00000) == 0xfe800000;
}

/* The probe address of the address's family. */
static __always_inline int addr_is_probe(const __u32 *a)
{
	if (addr_is_v4(a))
		return a[3] == cfg.probe_addr;
	return a[0] == cfg.probe_addr6[0] && a[1] == cfg.probe_addr6[1] &&
	       a[2] == cfg.probe_addr6[2] && a[3] == cfg.probe_addr6[3];
}

static __always_inline __u8 addr_family(const __u32 *a)
{
	return addr_is_v4(a) ? FAMILY_V4 : FAMILY_V6;
}

/* ---- Maps. ---- */

/* Per-pod state, keyed by the pod's network namespace cookie. */
struct pod_info {
	__u32 ip4;       /* network order: source a redirected IPv4 socket binds */
	__u32 ip6[4];    /* source a redirected socket to a global IPv6 destination binds (0: none) */
	__u32 ll6[4];    /* link-local source, bound with ll_ifindex as its scope, for a link-local destination */
	__u32 ll_ifindex;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* written by the loader only: pay per entry */
	__uint(max_entries, 16384); /* pods per node */
	__type(key, __u64);
	__type(value, struct pod_info);
} pods SEC(".maps");

/* The addresses the pod's namespace owns, of both families (IPv6 link-local
 * ones included): a connect to one is "routed through lo" (rule 3). A
 * sock_addr program cannot ask the FIB, so the loader mirrors the namespace's
 * addresses here. */
struct local_key {
	__u64 netns;
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* written by the loader only: pay per entry */
	__uint(max_entries, 131072);
	__type(key, struct local_key);
	__type(value, __u8);
} local_addrs SEC(".maps");

/* An interface the tc programs are attached to. REDIRECT in PREROUTING sends a
 * packet to the first address of the interface it came in on (for IPv6: the
 * first of the destination's scope). Zero: no such address, REDIRECT drops. */
struct iface_key {
	__u64 netns;
	__u32 ifindex;
	__u32 _pad;
};

struct iface_info {
	__u32 primary4;    /* network order */
	__u32 primary6[4]; /* first global IPv6 address */
	__u32 ll6[4];      /* first link-local IPv6 address */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* written by the loader only: pay per entry */
	__uint(max_entries, 65536);
	__type(key, struct iface_key);
	__type(value, struct iface_info);
} ifaces SEC(".maps");

/* An original destination. */
struct orig_dst {
	__u32 addr[4];
	__u16 port; /* host order */
	__u16 _pad;
};

/* Outbound: the application socket's original destination, owned by the
 * socket (freed with it). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct orig_dst);
} sk_orig SEC(".maps");

/* The connection mark an application socket got from the capture (the
 * proxy's SYN was given it, and the accepted socket inherited it): the pod's
 * getsockopt hides it, as SO_MARK reads 0 under iptables. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} sk_capture_mark SEC(".maps");

/* A connection's remote (or local) address and port, in one pod. */
struct flow_key {
	__u64 netns;
	__u32 addr[4];
	__u16 port; /* host order */
	__u16 _pad;
	__u32 _pad2;
};

/* Outbound: the application's source ip:port -> original destination, for the
 * proxy's SO_ORIGINAL_DST on the accepted socket at 15001. Sizes: LRU maps are
 * preallocated, so these are paid up front, once per node (docs/scale.md); the
 * loader sizes them (--max-flows). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct orig_dst);
} out_flows SEC(".maps");

/* Inbound: the remote ip:port of a redirected connection -> what it was sent
 * to and what it was rewritten to, and how far the connection has closed: the
 * entry is removed once both FINs are acknowledged (or on a reset), so the map
 * holds live connections only. Each close-tracking byte has one writer, the
 * ingress or the egress program; sequence numbers are host order. */
struct in_flow {
	__u32 orig[4];      /* what the remote sent to */
	__u32 new[4];       /* what it was rewritten to: the interface's address */
	__u16 orig_port;
	__u8 in_fin;        /* ingress: the remote sent its FIN (ending at in_fin_end) */
	__u8 out_fin_acked; /* ingress: the remote acknowledged the proxy's FIN */
	__u8 out_fin;       /* egress: the proxy sent its FIN (ending at out_fin_end) */
	__u8 in_fin_acked;  /* egress: the proxy acknowledged the remote's FIN */
	__u8 rcv_known;     /* egress: rcv_nxt is set */
	__u8 _pad;
	__u32 in_fin_end;
	__u32 out_fin_end;
	__u32 rcv_nxt;      /* egress: the last acknowledgement the proxy sent */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct in_flow);
} in_flows SEC(".maps");

/* How many connections each rule took, per pod (netns cookie), rule and
 * family: the eBPF twin of iptables-save -c and ip6tables-save -c. */
struct counter_key {
	__u64 netns;
	enum rule rule;
	__u8 family; /* FAMILY_V4 or FAMILY_V6 */
	__u8 _pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* entries of detached pods are deleted */
	__uint(max_entries, 16384 * RULE_MAX * 2);
	__type(key, struct counter_key);
	__type(value, __u64);
} counters SEC(".maps");

/* A question for explain.c, answered in place (to, to_port, rule). Addresses
 * are 16 bytes as everywhere, ports host order. */
struct explain_query {
	__u64 netns;    /* the pod's netns cookie */
	__u32 src[4];   /* inbound: the remote peer */
	__u32 dst[4];
	__u16 dport;
	__u8 inbound;   /* 0: a connection the pod makes; 1: one it receives */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 mark;     /* outbound: the socket's; inbound: the packet's */
	__u32 ifindex;  /* outbound: SO_BINDTODEVICE (0: none); inbound: where it arrives */
	/* The answer. */
	__u32 rule;     /* enum rule */
	__u32 to[4];    /* where the connection goes */
	__u16 to_port;
	__u8 family;    /* FAMILY_V4 or FAMILY_V6: the ruleset that decided */
	__u8 _pad;
};

static __always_inline void count(__u64 netns, enum rule rule, __u8 family)
{
	struct counter_key k = { .netns = netns, .rule = rule, .family = family };
	__u64 one = 1, *v = bpf_map_lookup_elem(&counters, &k);

	if (v)
		*v += 1; /* per-CPU value: no atomics needed */
	else
		bpf_map_update_elem(&counters, &k, &one, BPF_NOEXIST);
}

static __always_inline int has_mark(__u32 mark, __u32 want)
{
	return (mark & cfg.mark_mask) == want;
}

/* TCP flags in byte 13 of the header. */
#define TCP_FLAG_SYN_BYTE 0x02
#define TCP_FLAG_ACK_BYTE 0x10

/* The loopback device is always ifindex 1 in every network namespace. */
#define LOOPBACK_IFINDEX 1

/* tcx verdicts (uapi since 6.6; the packaged headers are older). */
#define TCX_NEXT -1
#define TCX_PASS 0
#define TCX_DROP 2
#define TCX_REDIRECT 7

#define SO_ORIGINAL_DST 80      /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */
#ifndef SOL_IP
#define SOL_IP 0
#endif
#ifndef SOL_IPV6
#define SOL_IPV6 41
#endif
#ifndef SOL_SOCKET
#define SOL_SOCKET 1
#endif
#ifndef SO_MARK
#define SO_MARK 36
#endif
#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef IPPROTO_MPTCP
#define IPPROTO_MPTCP 262
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif
