package main

import (
	"net"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/raft"
	"github.com/hashicorp/serf/serf"
)

// monitorLeadership: Dkron v4.1.2 dkron/leader.go: a leader loop runs while raft says leader.
func (a *Agent) monitorLeadership() {
	var weAreLeader chan struct{}
	var wg sync.WaitGroup
	for {
		select {
		case isLeader := <-a.leaderCh:
			if isLeader {
				if weAreLeader != nil {
					continue
				}
				weAreLeader = make(chan struct{})
				wg.Add(1)
				go func(ch chan struct{}) { defer wg.Done(); a.leaderLoop(ch) }(weAreLeader)
				logf(lInfo, "dkron: cluster leadership acquired")
			} else if weAreLeader != nil {
				close(weAreLeader)
				wg.Wait()
				weAreLeader = nil
				logf(lInfo, "dkron: cluster leadership lost")
			}
		case <-a.shutdownCh:
			return
		}
	}
}

// leaderLoop: Dkron v4.1.2 dkron/leader.go leaderLoop: a barrier (2 min), leadership
// established once, then reconcile all serf members into raft, and again every
// ReconcileInterval (60 s). The event-driven path reads a nil channel (Agent.reconcileCh), so
// a server that joins, leaves or changes address reaches the raft configuration only at the
// next 60 s pass (raft dials a new address earlier, through the server lookup).
func (a *Agent) leaderLoop(stopCh chan struct{}) {
	established := false
	r := a.getRaft()
	for {
		interval := time.After(a.config.ReconcileInterval)
		var reconcileCh chan serf.Member
		if err := r.Barrier(2 * time.Minute).Error(); err != nil {
			logf(lError, "dkron: failed to wait for barrier: %v", err)
		} else {
			if !established {
				a.establishLeadership()
				established = true
			}
			if err := a.reconcile(); err != nil {
				logf(lError, "dkron: failed to reconcile: %v", err)
			} else {
				reconcileCh = a.reconcileCh
			}
		}
	wait:
		for {
			select {
			case <-stopCh:
				return
			case <-a.shutdownCh:
				return
			case <-interval:
				break wait
			case m := <-reconcileCh:
				_ = a.reconcileMember(m)
			}
		}
	}
}

// establishLeadership: Dkron v4.1.2 dkron/leader.go loads the jobs, asks every alive server of
// the region for its active executions over gRPC (each dial may wait 10 s; a failure is only a
// warning) and starts the scheduler. The stand-in has no scheduler.
func (a *Agent) establishLeadership() {
	logf(lInfo, "agent: Starting scheduler (stand-in: jobs are stored, never run; %d jobs)", len(a.fsm.list()))
	for _, m := range a.serf.Members() {
		ok, p := isServer(m)
		if !ok || m.Status != serf.StatusAlive || p.Region != a.config.Region {
			continue
		}
		if err := rpcActiveExecutions(p.RPCAddr.String()); err != nil {
			logf(lWarn, "leader: Failed to query active executions during startup reconciliation: %v", err)
			break
		}
	}
}

// reconcile: Dkron v4.1.2 dkron/leader.go reconcile: every serf member; the first error ends
// the pass.
func (a *Agent) reconcile() error {
	for _, m := range a.serf.Members() {
		if err := a.reconcileMember(m); err != nil {
			return err
		}
	}
	return nil
}

// reconcileMember: Dkron v4.1.2 dkron/leader.go: a server of this region that is alive is
// added (or re-addressed), one that left is removed; a failed one is left as it is (ARCHITECTURE.md
// Dkron facts: dead or failed servers are never removed automatically).
func (a *Agent) reconcileMember(m serf.Member) error {
	ok, parts := isServer(m)
	if !ok || parts.Region != a.config.Region {
		return nil
	}
	var err error
	switch m.Status {
	case serf.StatusAlive:
		err = a.addRaftPeer(m, parts)
	case serf.StatusLeft:
		err = a.removeRaftPeer(m, parts)
	}
	if err != nil {
		logf(lError, "failed to reconcile member %s: %v", m.Name, err)
	}
	return err
}

// addRaftPeer: Dkron v4.1.2 dkron/leader.go addRaftPeer: refuse a second bootstrap-mode
// server; skip itself while the configuration has fewer than 3 servers; nothing to do when id
// and address (serf IP + port tag) match; remove another id holding this address; then
// AddVoter, which for a known id updates its address in place.
func (a *Agent) addRaftPeer(m serf.Member, parts *serverParts) error {
	if parts.Bootstrap {
		for _, o := range a.serf.Members() {
			if ok, p := isServer(o); ok && o.Name != m.Name && p.Bootstrap {
				logf(lError, "dkron: '%v' and '%v' are both in bootstrap mode. Only one node should be in bootstrap mode, not adding Raft peer.", m.Name, o.Name)
				return nil
			}
		}
	}
	r := a.getRaft()
	addr := raft.ServerAddress((&net.TCPAddr{IP: m.Addr, Port: parts.Port}).String())
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return err
	}
	if m.Name == a.config.NodeName && len(f.Configuration().Servers) < 3 {
		return nil
	}
	for _, s := range f.Configuration().Servers {
		if s.Address == addr && s.ID == raft.ServerID(parts.ID) {
			return nil
		}
		if s.Address == addr {
			if err := r.RemoveServer(s.ID, 0, 0).Error(); err != nil {
				return err
			}
			logf(lInfo, "dkron: removed server with duplicate address %s", s.Address)
		}
	}
	if err := r.AddVoter(raft.ServerID(parts.ID), addr, 0, 0).Error(); err != nil {
		logf(lError, "dkron: failed to add raft peer: %v", err)
		return err
	}
	return nil
}

// removeRaftPeer: Dkron v4.1.2 dkron/leader.go removeRaftPeer: never itself; by id if present.
func (a *Agent) removeRaftPeer(m serf.Member, parts *serverParts) error {
	if strings.EqualFold(m.Name, a.config.NodeName) {
		logf(lWarn, "removing self should be done by follower")
		return nil
	}
	r := a.getRaft()
	f := r.GetConfiguration()
	if err := f.Error(); err != nil {
		return err
	}
	for _, s := range f.Configuration().Servers {
		if s.ID == raft.ServerID(parts.ID) {
			logf(lInfo, "dkron: removing server by ID %s", s.ID)
			return r.RemoveServer(s.ID, 0, 0).Error()
		}
	}
	return nil
}
