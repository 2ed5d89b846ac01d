// Package reference carries a copy of the reference rulesets (every file of
// the shared reference folder: the in-pod iptables rulesets of each family and
// option, their policy routes, and the nftables form), the oracle ebpf-redirect
// is compared against. docs/reference.md says what every rule means.
//
// The copy lets the lab run on a machine without the shared folder; the test
// suite checks it is byte-identical to the shared original whenever that
// exists.
package reference

import (
	"embed"
	"io/fs"
)

//go:embed inpod-*
var files embed.FS

// Rules is inpod-rules.v4, in iptables-restore format.
var Rules = File("inpod-rules.v4")

// Routes is inpod-routes.sh, the policy route, run with sh inside the pod's netns.
var Routes = File("inpod-routes.sh")

// File returns one reference file by name; it panics on a name the copy does
// not have (a programming error).
func File(name string) []byte {
	b, err := files.ReadFile(name)
	if err != nil {
		panic("reference: " + err.Error())
	}
	return b
}

// Names lists the reference files.
func Names() []string {
	ents, _ := fs.ReadDir(files, ".")
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	return out
}
