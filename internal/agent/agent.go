// Package agent is `ebpf-redirect serve`: a long-running node agent around a
// manager.Manager, with an HTTP API to attach and detach pods, Prometheus
// metrics (per-pod per-rule counters, attach latency, errors), a health
// endpoint, a periodic reconcile (pods whose netns or cgroup is gone), and a
// watch of every pod's links and addresses (new interfaces are captured at
// once).
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ebpf-redirect/ebpf-redirect/manager"
)

// Agent serves one Manager.
type Agent struct {
	m   *manager.Manager
	log *slog.Logger
	reg *prometheus.Registry

	attachSeconds *prometheus.HistogramVec
	errors        *prometheus.CounterVec
	pruned        prometheus.Counter
	refreshed     prometheus.Counter
	watched       prometheus.Gauge
	// podsChanged wakes Watch after an attach or detach through the API.
	podsChanged chan struct{}
}

// New builds the agent and registers its metrics.
func New(m *manager.Manager, log *slog.Logger) *Agent {
	a := &Agent{m: m, log: log, reg: prometheus.NewRegistry(), podsChanged: make(chan struct{}, 1)}
	a.attachSeconds = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "ebpf_redirect_operation_seconds",
		Help:    "Time to attach or detach one pod.",
		Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
	}, []string{"op"})
	a.errors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "ebpf_redirect_operation_errors_total",
		Help: "Failed operations, by operation.",
	}, []string{"op"})
	a.pruned = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "ebpf_redirect_pruned_pods_total",
		Help: "Pods detached by the periodic prune (netns or cgroup gone, attach never finished).",
	})
	a.refreshed = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "ebpf_redirect_refreshed_pods_total",
		Help: "Pods whose new interfaces or addresses were taken in after a change in their namespace.",
	})
	a.watched = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "ebpf_redirect_watched_pods",
		Help: "Pods whose namespace is watched for new interfaces and addresses.",
	})
	a.reg.MustRegister(a.attachSeconds, a.errors, a.pruned, a.refreshed, a.watched, &collector{a: a},
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	return a
}

var (
	connDesc = prometheus.NewDesc("ebpf_redirect_connections_total",
		"Connections taken by each rule of the reference ruleset (of each family), per pod.", []string{"pod", "family", "rule", "chain"}, nil)
	podsDesc = prometheus.NewDesc("ebpf_redirect_pods",
		"Attached pods by state.", []string{"state"}, nil)
)

// collector reads the counters from the maps at scrape time.
type collector struct{ a *Agent }

func (c *collector) Describe(ch chan<- *prometheus.Desc) { ch <- connDesc; ch <- podsDesc }

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	pods, err := c.a.m.Pods()
	if err != nil {
		c.a.errors.WithLabelValues("scrape").Inc()
		return
	}
	states := map[string]float64{"healthy": 0, "defunct": 0, "attaching": 0}
	for _, p := range pods {
		states[p.Health]++
	}
	for s, n := range states {
		ch <- prometheus.MustNewConstMetric(podsDesc, prometheus.GaugeValue, n, s)
	}
	all, err := c.a.m.StatsAll()
	if err != nil {
		c.a.errors.WithLabelValues("scrape").Inc()
		return
	}
	for pod, rcs := range all {
		for _, rc := range rcs {
			ch <- prometheus.MustNewConstMetric(connDesc, prometheus.CounterValue, float64(rc.Connections), pod, rc.Family, rc.Rule, rc.Chain)
		}
	}
}

// Handler serves /metrics, /healthz and the pod API:
//
//	GET    /pods        the attached pods and their state
//	POST   /pods        attach (body: {"ID","Netns","Cgroup","ProxyCgroup"})
//	DELETE /pods/{id}   detach
func (a *Agent) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if _, err := a.m.Pods(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /pods", func(w http.ResponseWriter, _ *http.Request) {
		pods, err := a.m.Pods()
		reply(w, pods, err)
	})
	mux.HandleFunc("POST /pods", func(w http.ResponseWriter, r *http.Request) {
		var p manager.Pod
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<16)).Decode(&p); err != nil {
			http.Error(w, "bad pod: "+err.Error(), http.StatusBadRequest)
			return
		}
		start := time.Now()
		res, err := a.m.AttachPod(r.Context(), p)
		a.observe("attach", start, err)
		reply(w, res, err)
	})
	mux.HandleFunc("DELETE /pods/{id}", func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		err := a.m.DetachPod(r.Context(), r.PathValue("id"))
		a.observe("detach", start, err)
		reply(w, map[string]bool{"detached": err == nil}, err)
	})
	return mux
}

func (a *Agent) observe(op string, start time.Time, err error) {
	a.attachSeconds.WithLabelValues(op).Observe(time.Since(start).Seconds())
	select {
	case a.podsChanged <- struct{}{}:
	default:
	}
	if err != nil {
		a.errors.WithLabelValues(op).Inc()
		a.log.Warn(op+" failed", "err", err)
	}
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, manager.ErrNotAttached):
			code = http.StatusNotFound
		case errors.Is(err, manager.ErrAlreadyAttached):
			code = http.StatusConflict
		default:
			code = http.StatusUnprocessableEntity
		}
		w.WriteHeader(code)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": err.Error()})
		return
	}
	_ = json.NewEncoder(w).Encode(v)
}

// Prune runs Reconcile(nil) every interval until ctx ends.
func (a *Agent) Prune(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		rep, err := a.m.Reconcile(ctx, nil)
		if err != nil && ctx.Err() == nil {
			a.errors.WithLabelValues("prune").Inc()
			a.log.Warn("prune", "err", err, "failed", rep.Failed)
		}
		if n := len(rep.Detached); n > 0 {
			a.pruned.Add(float64(n))
			a.log.Info("pruned gone pods", "pods", rep.Detached)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
