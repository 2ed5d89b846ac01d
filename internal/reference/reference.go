// Package reference carries a copy of the in-pod iptables ruleset and policy route
// (../shared/reference), the oracle that ebpf-redirect is compared against.
//
// The copy lets `ebpf-redirect demo` run on a machine without the shared folder; the
// test suite checks it is byte-identical to the shared original whenever that exists.
package reference

import _ "embed"

// Rules is inpod-rules.v4, in iptables-restore format.
//
//go:embed inpod-rules.v4
var Rules []byte

// Routes is inpod-routes.sh, the policy route, run with sh inside the pod's netns.
//
//go:embed inpod-routes.sh
var Routes []byte
