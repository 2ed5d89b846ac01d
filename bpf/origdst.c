// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* SO_ORIGINAL_DST (and IP6T_SO_ORIGINAL_DST) for an unmodified proxy,
 * attached at the proxy's cgroup. Included by redirect.c. */
#include "redirect.h"

/* The address of a socket's end (local: src, peer: dst), 16 bytes. Every
 * field is read, whatever the family (see CTX_READ). */
static __always_inline void sk_addr(struct bpf_sock *sk, int local, __u32 *a)
{
	__u32 fam, v4, w0, w1, w2, w3;

	CTX_READ(fam, sk->family);
	if (local) {
		CTX_READ(v4, sk->src_ip4);
		CTX_READ(w0, sk->src_ip6[0]);
		CTX_READ(w1, sk->src_ip6[1]);
		CTX_READ(w2, sk->src_ip6[2]);
		CTX_READ(w3, sk->src_ip6[3]);
	} else {
		CTX_READ(v4, sk->dst_ip4);
		CTX_READ(w0, sk->dst_ip6[0]);
		CTX_READ(w1, sk->dst_ip6[1]);
		CTX_READ(w2, sk->dst_ip6[2]);
		CTX_READ(w3, sk->dst_ip6[3]);
	}
	if (fam == AF_INET) {
		addr_set_v4(a, v4);
		return;
	}
	a[0] = w0;
	a[1] = w1;
	a[2] = w2;
	a[3] = w3;
}

/* Runs after the kernel's own getsockopt. Without conntrack in the pod's
 * namespace the kernel fails (ENOENT, or ENOPROTOOPT when nf_conntrack is not
 * loaded); we answer as conntrack would: the pre-REDIRECT destination of a
 * redirected connection, else the socket's own local address (conntrack
 * answers for every tracked connection, NATed or not). Each family's option
 * answers its own connections only, as conntrack's do: an IPv4 connection
 * (a v4-mapped peer of a dual-stack socket too) SO_ORIGINAL_DST with a
 * sockaddr_in, an IPv6 one IP6T_SO_ORIGINAL_DST with a sockaddr_in6. */
SEC("cgroup/getsockopt")
int proxy_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	__u32 local[4], orig[4];
	__u16 port;

	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	if (ctx->retval == 0 || !sk || sk->protocol != IPPROTO_TCP)
		return 1;

	struct flow_key k = {
		.netns = bpf_get_netns_cookie(ctx),
		.port = bpf_ntohs(sk->dst_port),
	};
	sk_addr(sk, 0, k.addr); /* the peer */
	int v4 = addr_is_v4(k.addr);
	if (v4 != (ctx->level == SOL_IP))
		return 1; /* the other family's option: the kernel's error stands */
	if (!v4 && !cfg.ipv6)
		return 1; /* IPv6 capture off: as with no ip6tables rules */
	/* Only namespaces we manage: elsewhere the kernel's answer stands. */
	if (!bpf_map_lookup_elem(&pods, &k.netns))
		return 1;

	sk_addr(sk, 1, local);
	addr_copy(orig, local);
	port = sk->src_port;
	if (port == cfg.outbound_port) {
		struct orig_dst *o = bpf_map_lookup_elem(&out_flows, &k);
		if (o) {
			addr_copy(orig, o->addr);
			port = o->port;
		}
	} else if (port == cfg.inbound_port) {
		struct in_flow *f = bpf_map_lookup_elem(&in_flows, &k);
		if (f && addr_eq(f->new, local)) {
			addr_copy(orig, f->orig);
			port = f->orig_port;
		}
	}
	if (addr_is_any(orig))
		return 1;

	/* optlen stays as the caller gave it, as conntrack leaves it. Keep the
	 * store to retval a separate 4-byte store: clang may merge adjacent
	 * context stores into one 8-byte store the verifier rejects. */
	if (v4) {
		struct sockaddr_in *sa = ctx->optval;

		if ((void *)(sa + 1) > ctx->optval_end)
			return 1; /* the caller's buffer is too small; keep the error */
		sa->sin_family = AF_INET;
		sa->sin_port = bpf_htons(port);
		sa->sin_addr.s_addr = orig[3];
		__builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
	} else {
		struct sockaddr_in6 *sa6 = ctx->optval;

		if ((void *)(sa6 + 1) > ctx->optval_end)
			return 1;
		sa6->sin6_family = AF_INET6;
		sa6->sin6_port = bpf_htons(port);
		sa6->sin6_flowinfo = 0;
		__builtin_memcpy(sa6->sin6_addr.in6_u.u6_addr32, orig, 16);
		sa6->sin6_scope_id = 0;
	}
	ctx->retval = 0;
	return 1;
}
