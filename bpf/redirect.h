/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Shared by every ebpf-redirect program: the load-time config, the maps, and
 * the rule numbers. The programs are loaded once per node; everything that
 * differs between pods lives in maps keyed by the pod's netns cookie. */
#pragma once

#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Everything the reference ruleset hard-codes. Written by the Go loader
 * (internal/config) before load; the zero values here are never used. Addresses
 * are network order, ports host order. */
struct config {
	__u32 probe_addr;    /* 169.254.7.127: kubelet probes, never redirected */
	__u32 proxy_mark;    /* 0x539: the proxy's own sockets */
	__u32 conn_mark;     /* 0x111: marks replies to the proxy */
	__u32 mark_mask;     /* 0xfff: marks compare under this mask */
	__u16 outbound_port; /* 15001 */
	__u16 inbound_port;  /* 15006 */
	__u16 hbone_port;    /* 15008 */
	__u16 _pad;
	/* Not read by the programs, but part of the node's config: kept here so
	 * that the pinned constants say everything the node was set up with. */
	__u32 route_table;   /* 100: policy route table of the conn mark */
	__u32 rule_priority; /* 32764: its ip rule preference */
};

volatile const struct config cfg = {};

/* Which rule of inpod-rules.v4 decided a connection. The Go side names them
 * (internal/rules) for counters, stats and explain. */
enum rule {
	RULE_NONE = 0,         /* no rule applies: not TCP */
	RULE_OUT_PROBE,        /* nat OUTPUT 1: -d 169.254.7.127 ACCEPT */
	RULE_OUT_CONNMARK,     /* nat OUTPUT 2: --mark 0x111/0xfff ACCEPT */
	RULE_OUT_LOCAL,        /* nat OUTPUT 3: ! -d 127.0.0.1 -o lo ACCEPT */
	RULE_OUT_REDIRECT,     /* nat OUTPUT 4: REDIRECT --to-ports 15001 */
	RULE_OUT_UNTOUCHED,    /* nat OUTPUT: fell through (127.0.0.1 or proxy mark) */
	RULE_IN_PROBE,         /* nat PREROUTING 1: -s 169.254.7.127 ACCEPT */
	RULE_IN_REDIRECT,      /* nat PREROUTING 2: REDIRECT --to-ports 15006 */
	RULE_IN_UNTOUCHED,     /* nat PREROUTING: fell through (127.0.0.1, 15008, mark) */
	RULE_CONNMARK_RESTORE, /* mangle: reply to a proxy socket gets 0x111 */
	RULE_FAIL_CLOSED,      /* no state for this pod, or a map update failed */
	RULE_MAX,
};

/* Per-pod state, keyed by the pod's network namespace cookie. */
struct pod_info {
	__u32 pod_ip; /* network order: source address a redirected socket binds */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* written by the loader only: pay per entry */
	__uint(max_entries, 16384); /* pods per node */
	__type(key, __u64);
	__type(value, struct pod_info);
} pods SEC(".maps");

/* The addresses the pod's namespace owns: a connect to one is "routed through
 * lo" (rule 3). A sock_addr program cannot ask the FIB, so the loader mirrors
 * the namespace's addresses here. */
struct local_key {
	__u64 netns;
	__u32 addr;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* written by the loader only: pay per entry */
	__uint(max_entries, 65536);
	__type(key, struct local_key);
	__type(value, __u8);
} local_addrs SEC(".maps");

/* An interface the tc programs are attached to. REDIRECT in PREROUTING sends a
 * packet to the first address of the interface it came in on. */
struct iface_key {
	__u64 netns;
	__u32 ifindex;
	__u32 _pad;
};

struct iface_info {
	__u32 primary_ip; /* network order; 0: no address, REDIRECT drops */
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* written by the loader only: pay per entry */
	__uint(max_entries, 65536);
	__type(key, struct iface_key);
	__type(value, struct iface_info);
} ifaces SEC(".maps");

/* An original destination (network-order address, host-order port). */
struct orig_dst {
	__u32 ip;
	__u16 port;
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

/* Outbound: the application's source ip:port -> original destination, for the
 * proxy's SO_ORIGINAL_DST on the accepted socket at 15001. */
struct flow_key {
	__u64 netns;
	__u32 ip;   /* network order */
	__u16 port; /* host order */
	__u16 _pad;
};

/* Sizes: LRU maps are preallocated, so these are paid up front, once per
 * node (docs/scale.md): 65536 concurrent redirected connections each way. */
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
	__u32 orig_ip;  /* network order */
	__u32 new_ip;   /* network order: the interface's primary address */
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

/* How many connections each rule took, per pod (netns cookie) and rule: the
 * eBPF twin of iptables-save -c. */
struct counter_key {
	__u64 netns;
	enum rule rule;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* entries of detached pods are deleted */
	__uint(max_entries, 16384 * RULE_MAX);
	__type(key, struct counter_key);
	__type(value, __u64);
} counters SEC(".maps");

/* A question for explain.c, answered in place (to_*, rule). Addresses are
 * network order, ports host order. */
struct explain_query {
	__u64 netns;    /* the pod's netns cookie */
	__u32 src;      /* inbound: the remote peer */
	__u32 dst;
	__u16 dport;
	__u8 inbound;   /* 0: a connection the pod makes; 1: one it receives */
	__u8 proto;     /* IPPROTO_TCP or IPPROTO_UDP */
	__u32 mark;     /* outbound: the socket's; inbound: the packet's */
	__u32 ifindex;  /* outbound: SO_BINDTODEVICE (0: none); inbound: where it arrives */
	/* The answer. */
	__u32 rule;     /* enum rule */
	__u32 to_ip;    /* where the connection goes */
	__u16 to_port;
	__u16 _pad;
};

static __always_inline void count(__u64 netns, enum rule rule)
{
	struct counter_key k = { .netns = netns, .rule = rule };
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

#define LOCALHOST bpf_htonl(0x7f000001)
#define IS_LOOPBACK_NET(a) ((bpf_ntohl(a) >> 24) == 127)

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

#define SO_ORIGINAL_DST 80
#ifndef SOL_IP
#define SOL_IP 0
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
