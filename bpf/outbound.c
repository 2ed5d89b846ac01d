// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Outbound capture on the pod's cgroup: nat OUTPUT of inpod-rules.v4.
 * Included by redirect.c (one object, so every program shares the maps). */
#include "redirect.h"

/* connect(0.0.0.0) is routed as 127.0.0.1. */
static __always_inline __u32 routed_dst(__u32 dst)
{
	return dst ? dst : LOCALHOST;
}

/* Rule 3, "-o lo": the destination is the namespace's own (127/8 or an address
 * of one of its interfaces), or the socket is bound to lo (SO_BINDTODEVICE),
 * which routes every destination out through lo. */
static __always_inline int routed_via_lo(__u64 netns, __u32 dst, __u32 bound_dev_if)
{
	struct local_key k = { .netns = netns, .addr = dst };

	return bound_dev_if == LOOPBACK_IFINDEX || IS_LOOPBACK_NET(dst) ||
	       bpf_map_lookup_elem(&local_addrs, &k) != NULL;
}

/* nat OUTPUT for a new TCP connection to dst (network order) from a socket
 * carrying mark and bound to bound_dev_if (0: none); first match wins.
 * connect(0.0.0.0) is routed as 127.0.0.1, which is what netfilter sees: the
 * caller passes that. Shared with explain.c. */
static __always_inline enum rule outbound_rule(__u64 netns, __u32 dst, __u32 mark,
					       __u32 bound_dev_if)
{
	if (dst == cfg.probe_addr)
		return RULE_OUT_PROBE;
	if (has_mark(mark, cfg.conn_mark))
		return RULE_OUT_CONNMARK;
	if (dst != LOCALHOST && routed_via_lo(netns, dst, bound_dev_if))
		return RULE_OUT_LOCAL;
	if (dst != LOCALHOST && !has_mark(mark, cfg.proxy_mark))
		return RULE_OUT_REDIRECT;
	return RULE_OUT_UNTOUCHED;
}

/* The decision for a new TCP connection to dst (network order); on redirect,
 * records the original destination on the socket and binds the socket to the
 * pod's address. Returns the rule, or RULE_FAIL_CLOSED to refuse the connect. */
static __always_inline enum rule outbound(struct bpf_sock_addr *ctx, __u32 dst, __u16 port_be,
					  int v6)
{
	struct bpf_sock *sk = ctx->sk;
	__u64 netns;
	enum rule rule;

	if (!sk)
		return RULE_FAIL_CLOSED;
	netns = bpf_get_netns_cookie(ctx);
	struct pod_info *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod) {
		/* Attached to this cgroup but no state for this namespace:
		 * refuse rather than let the connection bypass the proxy. */
		count(netns, RULE_FAIL_CLOSED);
		return RULE_FAIL_CLOSED;
	}

	rule = outbound_rule(netns, routed_dst(dst), sk->mark, sk->bound_dev_if);
	if (rule != RULE_OUT_REDIRECT) {
		/* A socket reused for a second connect must not keep a stale
		 * original destination. */
		bpf_sk_storage_delete(&sk_orig, sk);
		count(netns, rule);
		return rule;
	}

	struct orig_dst *o = bpf_sk_storage_get(&sk_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		count(netns, RULE_FAIL_CLOSED);
		return RULE_FAIL_CLOSED;
	}
	o->ip = dst;
	o->port = bpf_ntohs(port_be);

	/* An MPTCP socket connects through its first subflow: this hook runs
	 * for the subflow (whose storage sockops reads), while the application
	 * asks getpeername of the MPTCP socket. Give that one the original
	 * destination too. */
	struct mptcp_sock *msk = bpf_skc_to_mptcp_sock(sk);
	if (msk) {
		struct orig_dst *mo = bpf_sk_storage_get(&sk_orig, msk, 0, BPF_SK_STORAGE_GET_F_CREATE);
		if (mo)
			*mo = *o;
	}

	/* REDIRECT keeps the source the route to the original destination would
	 * have picked (the pod's address); a plain rewrite to 127.0.0.1 would make
	 * the kernel pick 127.0.0.1. bpf_bind only works on an unbound socket. */
	if (sk->src_port == 0 && pod->pod_ip) {
		if (!v6 && sk->src_ip4 == 0) {
			struct sockaddr_in sa = {
				.sin_family = AF_INET,
				.sin_addr.s_addr = pod->pod_ip,
			};
			bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
		} else if (v6 && !sk->src_ip6[0] && !sk->src_ip6[1] && !sk->src_ip6[2] && !sk->src_ip6[3]) {
			struct sockaddr_in6 sa6 = {
				.sin6_family = AF_INET6,
				.sin6_addr.in6_u.u6_addr32 = { 0, 0, bpf_htonl(0xffff), pod->pod_ip },
			};
			bpf_bind(ctx, (struct sockaddr *)&sa6, sizeof(sa6));
		}
	}
	count(netns, RULE_OUT_REDIRECT);
	return RULE_OUT_REDIRECT;
}

static __always_inline int is_tcp(struct bpf_sock_addr *ctx)
{
	/* MPTCP subflows are TCP on the wire, and netfilter redirects them. */
	return ctx->type == SOCK_STREAM &&
	       (ctx->protocol == IPPROTO_TCP || ctx->protocol == IPPROTO_MPTCP);
}

SEC("cgroup/connect4")
int pod_connect4(struct bpf_sock_addr *ctx)
{
	if (!is_tcp(ctx))
		return 1;
	switch (outbound(ctx, ctx->user_ip4, ctx->user_port, 0)) {
	case RULE_FAIL_CLOSED:
		return 0;
	case RULE_OUT_REDIRECT:
		ctx->user_ip4 = LOCALHOST;
		ctx->user_port = bpf_htons(cfg.outbound_port);
		return 1;
	default:
		return 1;
	}
}

static __always_inline int v4_mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0xffff);
}

/* An AF_INET6 socket reaching an IPv4 peer through ::ffff:a.b.c.d is IPv4 on
 * the wire, and the reference redirects it; connect4 does not run for it. */
SEC("cgroup/connect6")
int pod_connect6(struct bpf_sock_addr *ctx)
{
	if (!is_tcp(ctx) || !v4_mapped(ctx))
		return 1; /* real IPv6: the reference (IPv4 rules) leaves it alone */
	switch (outbound(ctx, ctx->user_ip6[3], ctx->user_port, 1)) {
	case RULE_FAIL_CLOSED:
		return 0;
	case RULE_OUT_REDIRECT:
		ctx->user_ip6[3] = LOCALHOST;
		ctx->user_port = bpf_htons(cfg.outbound_port);
		return 1;
	default:
		return 1;
	}
}

/* The application keeps seeing the original destination as its peer. */
SEC("cgroup/getpeername4")
int pod_getpeername4(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return 1;
	struct orig_dst *o = bpf_sk_storage_get(&sk_orig, sk, 0, 0);
	if (o) {
		ctx->user_ip4 = o->ip;
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

SEC("cgroup/getpeername6")
int pod_getpeername6(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;

	if (!sk)
		return 1;
	struct orig_dst *o = bpf_sk_storage_get(&sk_orig, sk, 0, 0);
	if (o) {
		ctx->user_ip6[3] = o->ip; /* still ::ffff:a.b.c.d */
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

/* Once the source port is chosen (just before the SYN leaves), publish
 * "pod ip:port -> original destination" for the proxy's SO_ORIGINAL_DST, and
 * withdraw it when the socket closes. */
SEC("sockops")
int pod_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct orig_dst *o, *cur;

	/* AF_INET, or AF_INET6 with a v4-mapped peer (only those get sk_orig). */
	if (!sk)
		return 1;
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB &&
	    !(skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE))
		return 1;

	o = bpf_sk_storage_get(&sk_orig, sk, 0, 0);
	if (!o)
		return 1;

	struct flow_key k = {
		.netns = bpf_get_netns_cookie(skops),
		.ip = skops->local_ip4,
		.port = (__u16)skops->local_port,
	};

	if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		/* If this fails the proxy finds no original destination and
		 * refuses the connection (a self call): still fail closed. */
		if (bpf_map_update_elem(&out_flows, &k, o, BPF_ANY))
			count(k.netns, RULE_FAIL_CLOSED);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}

	/* Closing: remove our entry, not one a newer socket may have written. */
	cur = bpf_map_lookup_elem(&out_flows, &k);
	if (cur && cur->ip == o->ip && cur->port == o->port)
		bpf_map_delete_elem(&out_flows, &k);
	return 1;
}
