// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* One object for every hook, so that they share one set of maps when loaded
 * once per node. Each hook lives in its own file. */
#include "outbound.c"
#include "inbound.c"
#include "sock_ingress.c"
#include "returnpath.c"
#include "origdst.c"
#include "explain.c"

char __license[] SEC("license") = "Dual BSD/GPL";
