# ebpf-redirect. Run as root: the tests and the demo load eBPF programs and
# build network namespaces.
GO      ?= go
CLANG   ?= clang-19
# The product (what a node runs) and the lab (demo, bench, scale), apart.
BIN     := bin/ebpf-redirect
LAB     := bin/ebpf-redirect-lab
# Debian packages the tests and the demo need at run time, and those that
# `make generate` needs (the generated objects are committed, so building
# needs only Go).
RUN_PKGS := iptables iproute2 util-linux kmod
GEN_PKGS := clang-19 llvm-19 libbpf-dev linux-libc-dev

.PHONY: all build generate check-generated deps deps-generate test unit demo bench bench-quick vet clean

all: build

build:
	$(GO) build -o bin/ ./cmd/ebpf-redirect ./cmd/ebpf-redirect-lab

# Installs what is missing (Debian/Ubuntu, as root).
deps:
	@missing=""; for p in $(RUN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

deps-generate:
	@missing=""; for p in $(GEN_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# Rebuilds internal/datapath/redirect_bpfel.{go,o} from bpf/ with the pinned clang.
generate: deps-generate
	cd internal/datapath && $(GO) generate ./...

# Fails when the committed objects differ from what bpf/ compiles to.
check-generated: generate
	@git diff --exit-code --stat -- internal/datapath || { \
		echo "internal/datapath: generated files are stale; run 'make generate' and commit them" >&2; exit 1; }

vet:
	$(GO) vet ./...

# Everything: unit tests, the tc programs through BPF_PROG_TEST_RUN, the CLI,
# and the differential suite against the real iptables ruleset.
test: deps
	$(GO) test -count=1 -timeout 20m ./...

# Unprivileged parts only.
unit:
	$(GO) test -count=1 ./internal/config/ ./internal/redirect/ ./internal/rules/ ./internal/lab/equiv/

# Every traffic case on throwaway pods, under iptables and under eBPF, side by side.
demo: deps build
	./$(LAB) demo

# eBPF against iptables against no capture, on throwaway pods (about 7 minutes);
# rewrites the results in docs/benchmarks.md and the plot docs/benchmarks.svg.
# Run it on a quiet machine. BENCH_FLAGS adds flags, e.g. BENCH_FLAGS='--note "..."'.
BENCH_FLAGS ?=
bench: deps build
	./$(LAB) bench --markdown docs/benchmarks.md --svg docs/benchmarks.svg $(BENCH_FLAGS)

# The same in under a minute, printed only.
bench-quick: deps build
	./$(LAB) bench --quick $(BENCH_FLAGS)

clean:
	rm -rf bin
