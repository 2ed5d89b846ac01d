package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/ebpf-redirect/ebpf-redirect/internal/agent"
	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

func serveCmd(g *globals) *cobra.Command {
	var addr string
	var every time.Duration
	var upgrade bool
	var n *node
	c := &cobra.Command{
		Use:   "serve [--listen ADDR] [--prune-every D] [--upgrade]",
		Short: "Run as a node agent: HTTP API for pods, /metrics (Prometheus), /healthz, periodic prune",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := g.manager(cmd, n)
			if err != nil {
				return err
			}
			defer m.Close()
			if upgrade {
				rep, err := m.Upgrade(cmd.Context(), false)
				if err != nil && !errors.Is(err, manager.ErrNothingPinned) {
					return err
				}
				g.log.Info("upgrade at start", "from", rep.From, "to", rep.To, "pods", rep.Pods, "unchanged", rep.Unchanged)
			}
			a := agent.New(m, g.log)
			ln, err := net.Listen("tcp", addr)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			srv := &http.Server{Handler: a.Handler(), ReadHeaderTimeout: 10 * time.Second}
			go a.Prune(ctx, every)
			go a.Watch(ctx, every)
			go func() {
				<-ctx.Done()
				sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				_ = srv.Shutdown(sctx)
			}()
			g.log.Info("serving", "addr", ln.Addr().String(), "bpffs", g.root)
			if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		},
	}
	c.Flags().StringVar(&addr, "listen", "127.0.0.1:9095", "address for the API, /metrics and /healthz")
	c.Flags().DurationVar(&every, "prune-every", 10*time.Second, "how often to reconcile: detach pods whose netns or cgroup is gone, capture new interfaces and addresses")
	c.Flags().BoolVar(&upgrade, "upgrade", false, "at start, swap this binary's programs into every attached pod (see upgrade)")
	n = nodeFlags(c.Flags())
	return c
}
