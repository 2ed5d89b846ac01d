// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Outbound capture on the pod's cgroup: nat OUTPUT of inpod-rules.v4 and .v6,
 * and what the application sees of it. Included by redirect.c (one object, so
 * every program shares the maps). */
#include "redirect.h"

/* connect(0.0.0.0) and connect(::) are routed as the family's loopback. */
static __always_inline void routed_dst(__u32 *out, const __u32 *dst)
{
	addr_copy(out, dst);
	if (addr_is_any(dst))
		out[3] = addr_is_v4(dst) ? LOCALHOST : bpf_htonl(1);
}

/* Rule 3, "-o lo": the destination is the namespace's own (127/8, ::1, or an
 * address of one of its interfaces, IPv6 link-local ones included), or the
 * socket is bound to lo (SO_BINDTODEVICE), which routes every destination out
 * through lo. */
static __always_inline int routed_via_lo(__u64 netns, const __u32 *dst, __u32 bound_dev_if)
{
	if (bound_dev_if == LOOPBACK_IFINDEX || addr_is_v6_loopback(dst))
		return 1;
	if (addr_is_v4(dst) && IS_LOOPBACK_NET(dst[3]))
		return 1;
	struct local_key k = { .netns = netns };
	addr_copy(k.addr, dst);
	return bpf_map_lookup_elem(&local_addrs, &k) != NULL;
}

/* nat OUTPUT for a new TCP connection to dst (as routed_dst gives it) from a
 * socket carrying mark and bound to bound_dev_if (0: none); first match wins.
 * The family is dst's: an IPv4-mapped destination is IPv4 on the wire and the
 * IPv4 rules decide it. Shared with explain.c. */
static __always_inline enum rule outbound_rule(__u64 netns, const __u32 *dst, __u32 mark,
					       __u32 bound_dev_if)
{
	if (addr_is_probe(dst))
		return RULE_OUT_PROBE;
	if (has_mark(mark, cfg.conn_mark))
		return RULE_OUT_CONNMARK;
	if (!addr_is_localhost(dst) && routed_via_lo(netns, dst, bound_dev_if))
		return RULE_OUT_LOCAL;
	if (!addr_is_localhost(dst) && !has_mark(mark, cfg.proxy_mark))
		return RULE_OUT_REDIRECT;
	return RULE_OUT_UNTOUCHED;
}

/* REDIRECT keeps the source the route to the original destination would
 * have picked (the pod's address); a plain rewrite to the loopback would make
 * the kernel pick the loopback. bpf_bind only works on an unbound socket (one
 * bound already keeps its address, as under REDIRECT). A link-local
 * destination binds the pod's link-local address in its scope, as the
 * application's connect would have: the redirected SYN then leaves through
 * that interface, as under ip6tables. */
static __always_inline void bind_source(struct bpf_sock_addr *ctx, struct pod_info *pod, const __u32 *dst)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 port, fam, s4, s0, s1, s2, s3;

	CTX_READ(port, sk->src_port);
	CTX_READ(fam, ctx->family);
	CTX_READ(s4, sk->src_ip4);
	CTX_READ(s0, sk->src_ip6[0]);
	CTX_READ(s1, sk->src_ip6[1]);
	CTX_READ(s2, sk->src_ip6[2]);
	CTX_READ(s3, sk->src_ip6[3]);
	if (port != 0)
		return;
	if (fam == AF_INET) {
		if (s4 == 0 && pod->ip4) {
			struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = pod->ip4 };

			bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
		}
		return;
	}
	if (s0 | s1 | s2 | s3)
		return;
	struct sockaddr_in6 sa6 = { .sin6_family = AF_INET6 };
	__u32 *a = sa6.sin6_addr.in6_u.u6_addr32;

	if (addr_is_v4(dst)) {
		if (!pod->ip4)
			return;
		addr_set_v4(a, pod->ip4);
	} else if (addr_is_linklocal6(dst)) {
		if (addr_is_zero(pod->ll6))
			return;
		addr_copy(a, pod->ll6);
		sa6.sin6_scope_id = pod->ll_ifindex;
	} else {
		if (addr_is_zero(pod->ip6))
			return;
		addr_copy(a, pod->ip6);
	}
	bpf_bind(ctx, (struct sockaddr *)&sa6, sizeof(sa6));
}

/* The decision for a new TCP connection to dst:port_be; on redirect, records
 * the original destination on the socket and binds its source. Returns the
 * rule, or RULE_FAIL_CLOSED to refuse the connect. */
static __always_inline enum rule outbound(struct bpf_sock_addr *ctx, const __u32 *dst, __u16 port_be)
{
	struct bpf_sock *sk = ctx->sk;
	__u8 family = addr_family(dst);
	__u32 routed[4];
	__u64 netns;
	enum rule rule;

	if (!sk)
		return RULE_FAIL_CLOSED;
	netns = bpf_get_netns_cookie(ctx);
	struct pod_info *pod = bpf_map_lookup_elem(&pods, &netns);
	if (!pod) {
		/* Attached to this cgroup but no state for this namespace:
		 * refuse rather than let the connection bypass the proxy. */
		count(netns, RULE_FAIL_CLOSED, family);
		return RULE_FAIL_CLOSED;
	}

	routed_dst(routed, dst);
	rule = outbound_rule(netns, routed, sk->mark, sk->bound_dev_if);
	if (rule != RULE_OUT_REDIRECT) {
		/* A socket reused for a second connect must not keep a stale
		 * original destination. */
		bpf_sk_storage_delete(&sk_orig, sk);
		count(netns, rule, family);
		return rule;
	}

	struct orig_dst *o = bpf_sk_storage_get(&sk_orig, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!o) {
		count(netns, RULE_FAIL_CLOSED, family);
		return RULE_FAIL_CLOSED;
	}
	addr_copy(o->addr, dst);
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
	bind_source(ctx, pod, dst);
	count(netns, RULE_OUT_REDIRECT, family);
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
	__u32 dst[4];

	if (!is_tcp(ctx))
		return 1;
	addr_set_v4(dst, ctx->user_ip4);
	switch (outbound(ctx, dst, ctx->user_port)) {
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

/* An AF_INET6 socket: an IPv6 destination (decided by the IPv6 rules, when
 * IPv6 is captured), or an IPv4 peer through ::ffff:a.b.c.d, which is IPv4 on
 * the wire (decided by the IPv4 rules); connect4 does not run for it. */
SEC("cgroup/connect6")
int pod_connect6(struct bpf_sock_addr *ctx)
{
	__u32 dst[4] = { ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3] };
	int v4 = addr_is_v4(dst);

	if (!is_tcp(ctx) || (!v4 && !cfg.ipv6))
		return 1; /* IPv6 capture off: as with no ip6tables rules */
	switch (outbound(ctx, dst, ctx->user_port)) {
	case RULE_FAIL_CLOSED:
		return 0;
	case RULE_OUT_REDIRECT:
		if (v4) {
			ctx->user_ip6[3] = LOCALHOST; /* still ::ffff:127.0.0.1 */
		} else {
			ctx->user_ip6[0] = 0;
			ctx->user_ip6[1] = 0;
			ctx->user_ip6[2] = 0;
			ctx->user_ip6[3] = bpf_htonl(1);
		}
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
		ctx->user_ip4 = o->addr[3];
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
		ctx->user_ip6[0] = o->addr[0];
		ctx->user_ip6[1] = o->addr[1];
		ctx->user_ip6[2] = o->addr[2];
		ctx->user_ip6[3] = o->addr[3];
		ctx->user_port = bpf_htons(o->port);
	}
	return 1;
}

/* The local address of a socket (sockops), 16 bytes. */
static __always_inline void skops_local(struct bpf_sock_ops *skops, __u32 *a)
{
	__u32 fam, v4, w0, w1, w2, w3;

	CTX_READ(fam, skops->family);
	CTX_READ(v4, skops->local_ip4);
	CTX_READ(w0, skops->local_ip6[0]);
	CTX_READ(w1, skops->local_ip6[1]);
	CTX_READ(w2, skops->local_ip6[2]);
	CTX_READ(w3, skops->local_ip6[3]);
	if (fam == AF_INET) {
		addr_set_v4(a, v4);
		return;
	}
	a[0] = w0;
	a[1] = w1;
	a[2] = w2;
	a[3] = w3;
}

/* Once the source port is chosen (just before the SYN leaves), publish
 * "pod ip:port -> original destination" for the proxy's SO_ORIGINAL_DST, and
 * withdraw it when the socket closes. An accepted socket that took the
 * capture's connection mark (returnpath.c) is noted, so that the pod's
 * getsockopt hides the mark. */
SEC("sockops")
int pod_sockops(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct orig_dst *o, *cur;
	__u32 op = skops->op;

	if (!sk)
		return 1;
	if (op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB) {
		__u32 mark = sk->mark;

		if (mark == cfg.conn_mark) {
			__u32 *m = bpf_sk_storage_get(&sk_capture_mark, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
			if (m)
				*m = mark;
		}
		return 1;
	}
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && !(op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE))
		return 1;

	o = bpf_sk_storage_get(&sk_orig, sk, 0, 0);
	if (!o)
		return 1; /* not a redirected socket */

	struct flow_key k = { .netns = bpf_get_netns_cookie(skops), .port = (__u16)skops->local_port };
	skops_local(skops, k.addr);

	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		/* If this fails the proxy finds no original destination and
		 * refuses the connection (a self call): still fail closed. */
		if (bpf_map_update_elem(&out_flows, &k, o, BPF_ANY))
			count(k.netns, RULE_FAIL_CLOSED, addr_family(o->addr));
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return 1;
	}

	/* Closing: remove our entry, not one a newer socket may have written. */
	cur = bpf_map_lookup_elem(&out_flows, &k);
	if (cur && addr_eq(cur->addr, o->addr) && cur->port == o->port)
		bpf_map_delete_elem(&out_flows, &k);
	return 1;
}
