# The node agent image: a static ebpf-redirect binary. The eBPF objects are
# generated and committed (make generate, clang-19), so the build needs only Go.
# Run it privileged with the host's /sys/fs/bpf, cgroup2 mount and /run/netns.

# Pinned toolchain: the Go release the project is tested with.
FROM golang:1.26.8-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/ebpf-redirect ./cmd/ebpf-redirect

FROM gcr.io/distroless/static-debian12:nonroot AS agent
COPY --from=build /out/ebpf-redirect /usr/local/bin/ebpf-redirect
# Loading eBPF and entering network namespaces need root (or CAP_BPF,
# CAP_NET_ADMIN, CAP_SYS_ADMIN) in the host's namespaces.
USER 0:0
ENTRYPOINT ["/usr/local/bin/ebpf-redirect"]
