package redirect

import (
	"context"
	"errors"
	"fmt"
	"sort"
)

// Report says what Reconcile did, by pod id.
type Report struct {
	Attached []string `json:"attached,omitempty"`
	Repaired []string `json:"repaired,omitempty"`
	Detached []string `json:"detached,omitempty"`
	Kept     []string `json:"kept,omitempty"`
	// Refreshed pods (kept) had new interfaces or addresses taken in.
	Refreshed []string          `json:"refreshed,omitempty"`
	Failed    map[string]string `json:"failed,omitempty"`
}

// Reconcile makes the attached pods be exactly live: pods not in live are
// detached, pods in live are attached (or repaired if half attached or
// broken). With live nil it only prunes: pods whose netns or cgroup is gone,
// and attaches that never finished, are detached; healthy pods are kept.
// One pod's failure does not stop the others; they are all in the report.
func Reconcile(ctx context.Context, o Options, live []Pod) (Report, error) {
	rep := Report{Failed: map[string]string{}}
	want := map[string]Pod{}
	for _, p := range live {
		if err := ValidatePodID(p.ID); err != nil {
			return rep, err
		}
		if _, dup := want[p.ID]; dup {
			return rep, fmt.Errorf("pod %s is listed twice", p.ID)
		}
		want[p.ID] = p
	}
	s, err := openStore(o, false)
	if err != nil {
		return rep, err
	}
	defer s.Close()
	recs, err := s.all()
	if err != nil {
		return rep, err
	}
	sort.Slice(recs, func(i, j int) bool { return recs[i].ID < recs[j].ID })
	for _, r := range recs {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		p, isLive := want[r.ID]
		st := statusOf(s, r)
		switch {
		case live == nil && st.Health == StateHealthy, isLive && st.Health == StateHealthy && samePaths(p, r):
			rep.Kept = append(rep.Kept, r.ID)
			delete(want, r.ID)
			// New interfaces or addresses since attach.
			if changed, err := refreshLocked(o, s, r); err != nil {
				rep.Failed[r.ID] = "refresh: " + err.Error()
			} else if changed {
				rep.Refreshed = append(rep.Refreshed, r.ID)
			}
			continue
		case isLive:
			// Broken, half attached, or moved: attach afresh below.
		default:
			o.log().Info("reconcile: detaching", "pod", r.ID, "health", st.Health, "problem", st.Problem)
		}
		if err := detachLocked(o, s, r); err != nil {
			rep.Failed[r.ID] = err.Error()
			delete(want, r.ID)
			continue
		}
		if isLive {
			rep.Repaired = append(rep.Repaired, r.ID)
		} else {
			rep.Detached = append(rep.Detached, r.ID)
		}
	}
	ids := make([]string, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	for _, id := range ids {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		rp, err := resolve(want[id])
		if err != nil {
			rep.Failed[id] = err.Error()
			continue
		}
		_, err = attachLocked(ctx, o, s, rp)
		rp.ns.Close()
		if err != nil {
			rep.Failed[id] = err.Error()
			continue
		}
		if !contains(rep.Repaired, id) {
			rep.Attached = append(rep.Attached, id)
		}
	}
	var err2 error
	if len(rep.Failed) > 0 {
		err2 = errors.New("some pods could not be reconciled")
	}
	return rep, errors.Join(err2, s.pruneIfEmpty(o.log()))
}

func samePaths(p Pod, r *Record) bool {
	return p.Netns == r.Netns && p.Cgroup == r.Cgroup && p.ProxyCgroup == r.ProxyCgroup
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if x == y {
			return true
		}
	}
	return false
}
