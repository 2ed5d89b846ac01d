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

	q->to_ip = q->dst;
	q->to_port = q->dport;
	if (q->proto != IPPROTO_TCP) {
		q->rule = RULE_NONE; /* both chains match -p tcp only */
		return 0;
	}
	if (q->inbound) {
		q->rule = inbound_rule(q->src, q->dst, bpf_htons(q->dport), q->mark);
		if (q->rule != RULE_IN_REDIRECT)
			return 0;
		q->to_ip = inbound_target(netns, q->ifindex);
		q->to_port = cfg.inbound_port;
		if (!q->to_ip)
			q->rule = RULE_FAIL_CLOSED; /* no address on the interface: dropped */
		return 0;
	}
	if (!bpf_map_lookup_elem(&pods, &netns)) {
		q->rule = RULE_FAIL_CLOSED; /* no state for the pod: connect refused */
		return 0;
	}
	q->rule = outbound_rule(netns, routed_dst(q->dst), q->mark, q->ifindex);
	if (q->rule == RULE_OUT_REDIRECT) {
		q->to_ip = LOCALHOST;
		q->to_port = cfg.outbound_port;
	}
	return 0;
}
