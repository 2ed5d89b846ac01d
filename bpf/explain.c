// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* `ebpf-redirect explain`: the datapath's own rule functions, run on a
 * question instead of a packet or a socket. The loader runs it with
 * BPF_PROG_TEST_RUN against the pinned maps and constants, so the answer is
 * what the programs attached to the pod would decide. It changes nothing (no
 * counter, no flow). Included by redirect.c, after outbound.c and inbound.c. */
#include "redirect.h"

SEC("syscall")
int explain(struct explain_query *q)
{
	__u64 netns = q->netns; /* map keys cannot point into the context */
	__u32 src[4], dst[4], to[4];

	addr_copy(src, q->src);
	addr_copy(dst, q->dst);
	q->family = addr_family(dst);
	addr_copy(q->to, dst);
	q->to_port = q->dport;
	if (q->proto != IPPROTO_TCP || (!addr_is_v4(dst) && !cfg.ipv6)) {
		q->rule = RULE_NONE; /* both chains match -p tcp only; no IPv6 rules */
		return 0;
	}
	if (q->inbound) {
		q->rule = inbound_rule(src, dst, bpf_htons(q->dport), q->mark);
		if (q->rule != RULE_IN_REDIRECT)
			return 0;
		inbound_target(netns, q->ifindex, dst, to);
		addr_copy(q->to, to);
		q->to_port = cfg.inbound_port;
		if (addr_is_zero(to))
			q->rule = RULE_FAIL_CLOSED; /* no address on the interface: dropped */
		return 0;
	}
	if (!bpf_map_lookup_elem(&pods, &netns)) {
		q->rule = RULE_FAIL_CLOSED; /* no state for the pod: connect refused */
		return 0;
	}
	routed_dst(to, dst);
	q->rule = outbound_rule(netns, to, q->mark, q->ifindex);
	if (q->rule == RULE_OUT_REDIRECT) {
		to[0] = to[1] = 0;
		if (addr_is_v4(dst)) {
			addr_set_v4(to, LOCALHOST);
		} else {
			to[2] = 0;
			to[3] = bpf_htonl(1);
		}
		addr_copy(q->to, to);
		q->to_port = cfg.outbound_port;
	}
	return 0;
}
