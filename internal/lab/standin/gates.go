package standin

import (
	"fmt"
	"sync"
	"time"
)

// gateHoldMax bounds how long a dial waits at its gate.
const gateHoldMax = 30 * time.Second

// gates let the harness act while a connection is open: a dial with a Gate
// sends its request line and holds; the harness waits until the gate is
// reached, does what it needs (detach, say), then releases it.
type gateSet struct {
	mu sync.Mutex
	m  map[string]*gate
}

type gate struct {
	reached, released         chan struct{}
	reachedOnce, releasedOnce sync.Once
}

var gates = &gateSet{m: map[string]*gate{}}

func (s *gateSet) get(name string) *gate {
	s.mu.Lock()
	defer s.mu.Unlock()
	g := s.m[name]
	if g == nil {
		g = &gate{reached: make(chan struct{}), released: make(chan struct{})}
		s.m[name] = g
	}
	return g
}

// hold marks the gate reached and waits for its release.
func (s *gateSet) hold(name string) error {
	g := s.get(name)
	g.reachedOnce.Do(func() { close(g.reached) })
	select {
	case <-g.released:
		return nil
	case <-time.After(gateHoldMax):
		return fmt.Errorf("gate %s: not released within %v", name, gateHoldMax)
	}
}

func (s *gateSet) waitReached(name string, timeout time.Duration) error {
	select {
	case <-s.get(name).reached:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("gate %s: not reached within %v", name, timeout)
	}
}

func (s *gateSet) release(name string) {
	g := s.get(name)
	g.releasedOnce.Do(func() { close(g.released) })
}
