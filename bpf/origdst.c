// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* SO_ORIGINAL_DST for an unmodified proxy, attached at the proxy's cgroup.
 * Included by redirect.c. */
#include "redirect.h"

/* Runs after the kernel's own getsockopt. Without conntrack in the pod's
 * namespace the kernel fails (ENOENT, or ENOPROTOOPT when nf_conntrack is not
 * loaded); we answer as conntrack would: the pre-REDIRECT destination of a
 * redirected connection, else the socket's own local address (conntrack
 * answers for every tracked connection, NATed or not). */
SEC("cgroup/getsockopt")
int proxy_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct sockaddr_in *sa;
	__u32 ip;
	__u16 port;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return 1;
	if (ctx->retval == 0 || !sk || sk->protocol != IPPROTO_TCP)
		return 1;

	struct flow_key k = {
		.netns = bpf_get_netns_cookie(ctx),
		.ip = sk->dst_ip4, /* the peer; v4-mapped peers of a dual-stack socket too */
		.port = bpf_ntohs(sk->dst_port),
	};
	/* Only namespaces we manage: elsewhere the kernel's answer stands. */
	if (!bpf_map_lookup_elem(&pods, &k.netns))
		return 1;

	ip = sk->src_ip4;
	port = sk->src_port;
	if (port == cfg.outbound_port) {
		struct orig_dst *o = bpf_map_lookup_elem(&out_flows, &k);
		if (o) {
			ip = o->ip;
			port = o->port;
		}
	} else if (port == cfg.inbound_port) {
		struct in_flow *f = bpf_map_lookup_elem(&in_flows, &k);
		if (f && f->new_ip == sk->src_ip4) {
			ip = f->orig_ip;
			port = f->orig_port;
		}
	}
	if (ip == 0)
		return 1;

	sa = ctx->optval;
	if ((void *)(sa + 1) > ctx->optval_end)
		return 1; /* the caller's buffer is too small; keep the error */
	sa->sin_family = AF_INET;
	sa->sin_port = bpf_htons(port);
	sa->sin_addr.s_addr = ip;
	__builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
	/* optlen stays as the caller gave it, as conntrack leaves it. Keep the
	 * store to retval a separate 4-byte store: clang may merge adjacent
	 * context stores into one 8-byte store the verifier rejects. */
	ctx->retval = 0;
	return 1;
}
