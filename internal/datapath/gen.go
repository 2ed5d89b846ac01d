// Package datapath holds the eBPF programs (compiled from bpf/ by bpf2go) and
// loads them once, with the configuration written into their constants.
package datapath

// The generated files are committed, so building needs only Go. `make generate`
// rebuilds them with the pinned clang; CI fails when they are stale.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang-19 -strip llvm-strip-19 -target bpfel -type rule -type explain_query -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu" redirect ../../bpf/redirect.c -- -I../../bpf
