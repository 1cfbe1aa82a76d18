package main

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-sockaddr/template"
	"github.com/hashicorp/memberlist"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb"
	"github.com/hashicorp/serf/serf"
	"github.com/soheilhy/cmux"
)

// Agent is one stand-in agent, laid out like Dkron v4.1.2 dkron/agent.go Agent.
type Agent struct {
	config      *Config
	serf        *serf.Serf
	eventCh     chan serf.Event
	retryJoinCh chan error
	// Dkron v4.1.2 dkron/agent.go declares reconcileCh and shutdownCh and never makes them:
	// both stay nil, so the leader never reconciles on a serf event and never sees a shutdown
	// (ARCHITECTURE.md Dkron facts: the leader reconciles only every 60 s).
	reconcileCh chan serf.Member
	shutdownCh  chan struct{}

	raftMu    sync.RWMutex // the HTTP API runs before raft exists (Dkron reads a.raft unguarded)
	raft      *raft.Raft
	raftStore *raftboltdb.BoltStore
	raftLayer *raftLayer
	leaderCh  <-chan bool
	listener  net.Listener
	fsm       *jobFSM

	lookup *serverLookup

	// skipBootstrap: fault injection, see faultNoFirstBootstrap.
	skipBootstrap bool
}

// faultNoFirstBootstrapEnv is fault injection for tests, not Dkron behaviour: set to 1, the
// first run of a server in a data dir never bootstraps (a marker file in the data dir records
// that run), so a cold start stays without a leader the way real Dkron was seen to (ARCHITECTURE.md
// Dkron facts: no leader for 31-134 s when every server joined before its tags were set, and
// once in 30 cold starts of v4.0.9 for the whole 180 s). A later run in the same data dir
// behaves normally: what tests of dkron-ha's recovery (a restart of one server) need.
const faultNoFirstBootstrapEnv = "DKRON_STANDIN_FAULT_NO_FIRST_BOOTSTRAP"

// faultNoFirstBootstrap reports whether this run must not bootstrap, and marks the data dir.
func faultNoFirstBootstrap(dataDir string) bool {
	if os.Getenv(faultNoFirstBootstrapEnv) != "1" {
		return false
	}
	marker := filepath.Join(dataDir, "standin-fault-no-first-bootstrap")
	if _, err := os.Stat(marker); err == nil {
		return false
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		fatalf("fault injection: %v", err)
	}
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		fatalf("fault injection: %v", err)
	}
	logf(lWarn, "fault injection (%s=1): this first run in %s never bootstraps", faultNoFirstBootstrapEnv, dataDir)
	return true
}

// faultSerfShutdownEnv is fault injection for tests, not Dkron behaviour: set to 1, a server
// that starts with raft state in its data dir (a restart, not a cold start) shuts its serf down
// 3 s after its event loop began, once per data dir (a marker file records it): what a real
// Dkron v4.1.2 was seen to do when its join lost serf's name conflict to its own earlier pod
// still alive at the old address ("Join LAN completed", then 3 s later "Serf shutdown detected,
// quitting"; hashicorp/serf resolveNodeConflict calls Shutdown). The process and its HTTP API
// run on; the serf does not come back.
const faultSerfShutdownEnv = "DKRON_STANDIN_FAULT_SERF_SHUTDOWN"

// faultSerfShutdown reports whether this run must shut its serf down, and marks the data dir.
func faultSerfShutdown(dataDir string, hasState bool) bool {
	if os.Getenv(faultSerfShutdownEnv) != "1" || !hasState {
		return false
	}
	marker := filepath.Join(dataDir, "standin-fault-serf-shutdown")
	if _, err := os.Stat(marker); err == nil {
		return false
	}
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		fatalf("fault injection: %v", err)
	}
	return true
}

func newAgent(cfg *Config) *Agent {
	return &Agent{config: cfg, retryJoinCh: make(chan error), lookup: newServerLookup(),
		skipBootstrap: cfg.Server && faultNoFirstBootstrap(cfg.DataDir)}
}

func (a *Agent) getRaft() *raft.Raft {
	a.raftMu.RLock()
	defer a.raftMu.RUnlock()
	return a.raft
}

// Start mirrors the order of Dkron v4.1.2 dkron/agent.go Start: normalise addresses, create
// serf, join (the retry-join loop blocks here until a join succeeds), listen on the RPC port,
// start the server (HTTP, gRPC, raft), then set the rpc_addr and port tags and only then start
// the serf event loop. So a server that starts before its peers sleeps a whole
// --retry-interval after its first failed join, and the member-join its peers see carries no
// port tag yet (ARCHITECTURE.md Dkron facts: a cold start of 3 took 32 s).
func (a *Agent) Start() error {
	if err := a.config.normalizeAddrs(); err != nil && !errors.Is(err, errResolvingHost) {
		return err
	}
	s, err := a.setupSerf()
	if err != nil {
		return fmt.Errorf("agent: Can not setup serf, %s", err)
	}
	a.serf = s
	if len(a.config.RetryJoin) > 0 {
		a.retryJoinLAN()
	} else if _, err := a.serf.Join(a.config.StartJoin, false); err != nil {
		logf(lWarn, "agent: Can not join %v: %v", a.config.StartJoin, err)
	}
	if a.config.AdvertiseRPCPort <= 0 {
		a.config.AdvertiseRPCPort = a.config.RPCPort
	}
	bindIP, _, _ := addrParts(a.config.BindAddr)
	l, err := net.Listen("tcp", net.JoinHostPort(bindIP, strconv.Itoa(a.config.RPCPort)))
	if err != nil {
		fatalf("%v", err)
	}
	a.listener = l
	if a.config.Server {
		a.startServer()
	} else {
		// A non-server Dkron serves only its AgentService (job runs, run.go); no HTTP API.
		a.serveAgentRuns()
	}
	// Dkron v4.1.2 agent.go Start writes rpc_addr (serf's advertised IP + the advertised RPC
	// port, advertiseRPCAddr) and port INTO the local member's tag map, which serf shares with
	// the member-join event of this node it queued at serf.Create. When that event was flushed
	// before the tag update (the coalescer's 1 s quiescence passed, e.g. while the retry-join
	// slept), the event loop later finds this node's own join carrying a port tag, and
	// maybeBootstrap runs: that is how a plain cold start of 3 forms a leader right after the
	// sleeping server's retry, 30 s in (ARCHITECTURE.md Dkron facts: 32 s). Mirrored by the same
	// in-place write.
	tags := a.serf.LocalMember().Tags
	tags["rpc_addr"] = net.JoinHostPort(a.serf.LocalMember().Addr.String(), strconv.Itoa(a.config.AdvertiseRPCPort))
	tags["port"] = strconv.Itoa(a.config.AdvertiseRPCPort)
	if err := a.serf.SetTags(tags); err != nil {
		return fmt.Errorf("agent: Error setting tags: %w", err)
	}
	go a.eventLoop()
	if a.config.Server {
		index, err := a.raftStore.LastIndex()
		if err == nil && faultSerfShutdown(a.config.DataDir, index > 0) {
			go func() {
				time.Sleep(3 * time.Second)
				logf(lWarn, "fault injection (%s=1): shutting serf down, as a join that lost a name conflict does", faultSerfShutdownEnv)
				_ = a.serf.Shutdown()
			}()
		}
	}
	return nil
}

// startServer: Dkron v4.1.2 agent.go StartServer: the HTTP API first, then one cmux on the
// RPC listener splitting gRPC (an HTTP/2 connection whose headers say content-type
// application/grpc, answered with a SETTINGS frame) from raft (anything else), the gRPC
// server, raft, and only then the mux serving and the leadership monitor.
func (a *Agent) startServer() {
	a.fsm = newFSM()
	a.serveHTTP()
	m := cmux.New(a.listener)
	grpcl := m.MatchWithWriters(cmux.HTTP2MatchHeaderFieldSendSettings("content-type", "application/grpc"))
	raftl := m.Match(cmux.Any())
	go func() { _ = newGRPCServer(a, true).Serve(grpcl) }()
	a.raftLayer = &raftLayer{ln: raftl}
	if err := a.setupRaft(); err != nil {
		fatalf("agent: Raft layer failed to start: %v", err)
	}
	go func() {
		if err := m.Serve(); err != nil {
			fatalf("%v", err)
		}
	}()
	go a.monitorLeadership()
}

// setupSerf: Dkron v4.1.2 agent.go setupSerf: tags role=dkron, dc, region, version,
// server=true (servers), bootstrap=1 (bootstrap mode), expect=N (bootstrap-expect); the
// memberlist profile's defaults (lan); coalesce 3 s / quiescent 1 s for member and user events;
// reconnect timeout from --serf-reconnect-timeout (24h); an event channel of 2048.
func (a *Agent) setupSerf() (*serf.Serf, error) {
	c := a.config
	bindIP, bindPort, err := addrParts(c.BindAddr)
	if err != nil {
		return nil, fmt.Errorf("invalid bind address: %s", err)
	}
	var advIP string
	var advPort int
	if c.AdvertiseAddr != "" {
		if advIP, advPort, err = addrParts(c.AdvertiseAddr); err != nil {
			return nil, fmt.Errorf("invalid advertise address: %s", err)
		}
	}
	key, err := base64.StdEncoding.DecodeString(c.EncryptKey)
	if err != nil {
		return nil, fmt.Errorf("invalid encryption key: %s", err)
	}
	sc := serf.DefaultConfig()
	sc.Init()
	if c.Tags == nil {
		c.Tags = map[string]string{}
	}
	sc.Tags = c.Tags
	sc.Tags["role"] = "dkron"
	sc.Tags["dc"] = c.Datacenter
	sc.Tags["region"] = c.Region
	sc.Tags["version"] = version
	if c.Server {
		sc.Tags["server"] = "true"
	}
	if c.Bootstrap {
		sc.Tags["bootstrap"] = "1"
	}
	if c.BootstrapExpect != 0 {
		sc.Tags["expect"] = strconv.Itoa(c.BootstrapExpect)
	}
	switch c.Profile {
	case "lan":
		sc.MemberlistConfig = memberlist.DefaultLANConfig()
	case "wan":
		sc.MemberlistConfig = memberlist.DefaultWANConfig()
	case "local":
		sc.MemberlistConfig = memberlist.DefaultLocalConfig()
	default:
		return nil, fmt.Errorf("unknown profile: %s", c.Profile)
	}
	sc.MemberlistConfig.BindAddr = bindIP
	sc.MemberlistConfig.BindPort = bindPort
	sc.MemberlistConfig.AdvertiseAddr = advIP
	sc.MemberlistConfig.AdvertisePort = advPort
	sc.MemberlistConfig.SecretKey = key
	sc.NodeName = c.NodeName
	sc.CoalescePeriod = 3 * time.Second
	sc.QuiescentPeriod = time.Second
	sc.UserCoalescePeriod = 3 * time.Second
	sc.UserQuiescentPeriod = time.Second
	if sc.ReconnectTimeout, err = time.ParseDuration(c.SerfReconnectTimeout); err != nil {
		fatalf("%v", err)
	}
	a.eventCh = make(chan serf.Event, 2048)
	sc.EventCh = a.eventCh
	sc.LogOutput, sc.MemberlistConfig.LogOutput = libLog(), libLog()
	logf(lInfo, "agent: Dkron agent starting")
	return serf.Create(sc)
}

// libLog: serf, memberlist and raft log only at debug level (as Dkron wires them).
func libLog() io.Writer {
	if logLevel == lDebug {
		return os.Stderr
	}
	return io.Discard
}

// retryJoinLAN mirrors Dkron v4.1.2 dkron/retry_join.go: join every --retry-join address (a
// go-sockaddr template, or a hostname) until one join succeeds, sleeping --retry-interval
// (30 s by default) after each failure. With --retry-max exhausted Dkron sends the error on an
// unbuffered channel nobody reads yet (Start has not returned), so it hangs: so does this.
func (a *Agent) retryJoinLAN() {
	logf(lInfo, "agent: Joining cluster...")
	for attempt := 0; ; {
		var addrs []string
		for _, addr := range a.config.RetryJoin {
			if strings.Contains(addr, "provider=") {
				// Dkron resolves these with go-discover (cloud APIs): not in the stand-in.
				logf(lError, "agent: Error Joining: cloud auto-join (%s) is not in the stand-in", addr)
				continue
			}
			ip, err := parseSingleIPTemplate(addr)
			if err != nil {
				logf(lError, "agent: Error parsing retry-join ip template %q: %v", addr, err)
				continue
			}
			addrs = append(addrs, ip)
		}
		var err error
		if len(addrs) > 0 {
			var n int
			// Dkron's JoinLAN: serf.Join(addrs, ignoreOld=true).
			if n, err = a.serf.Join(addrs, true); err == nil {
				logf(lInfo, "agent: Join LAN completed. Synced with %d initial agents", n)
				return
			}
		} else {
			err = fmt.Errorf("no servers to join")
		}
		attempt++
		if a.config.RetryMaxAttempts > 0 && attempt > a.config.RetryMaxAttempts {
			a.retryJoinCh <- fmt.Errorf("agent: max join LAN retry exhausted, exiting")
			return
		}
		logf(lWarn, "agent: Join LAN failed: %v, retrying in %v", err, a.config.RetryInterval)
		time.Sleep(a.config.RetryInterval)
	}
}

// setupRaft mirrors Dkron v4.1.2 agent.go setupRaft: raft id = node name; the network
// transport over the RPC port's raft side (pool 3, timeout 30 s) with the server lookup as its
// ServerAddressProvider; raft's default timings times --raft-multiplier; snapshots (3 kept)
// and a BoltDB log/stable store (behind a 512-entry log cache) under DATA_DIR/raft;
// --bootstrap-expect=1 bootstraps alone. (Dkron's peers.json recovery is not mirrored.)
func (a *Agent) setupRaft() error {
	c := a.config
	if c.BootstrapExpect == 1 {
		c.Bootstrap = true
	}
	trans := raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream: a.raftLayer, MaxPool: 3, Timeout: 30 * time.Second, ServerAddressProvider: a.lookup})
	rc := raft.DefaultConfig()
	if c.RaftMultiplier < 1 || c.RaftMultiplier > 10 {
		return fmt.Errorf("raft-multiplier cannot be %d. Must be between 1 and 10", c.RaftMultiplier)
	}
	rc.HeartbeatTimeout *= time.Duration(c.RaftMultiplier)
	rc.ElectionTimeout *= time.Duration(c.RaftMultiplier)
	rc.LeaderLeaseTimeout *= time.Duration(c.RaftMultiplier)
	rc.LogOutput = libLog()
	rc.LocalID = raft.ServerID(c.NodeName)
	dir := filepath.Join(c.DataDir, "raft")
	snaps, err := raft.NewFileSnapshotStore(dir, 3, libLog())
	if err != nil {
		return fmt.Errorf("file snapshot store: %s", err)
	}
	store, err := raftboltdb.NewBoltStore(filepath.Join(dir, "raft.db"))
	if err != nil {
		return fmt.Errorf("error creating new raft store: %s", err)
	}
	a.raftStore = store
	logs, err := raft.NewLogCache(512, store)
	if err != nil {
		store.Close()
		return err
	}
	if c.Bootstrap {
		has, err := raft.HasExistingState(logs, store, snaps)
		if err != nil {
			return err
		}
		if !has {
			conf := raft.Configuration{Servers: []raft.Server{{ID: rc.LocalID, Address: trans.LocalAddr()}}}
			if err := raft.BootstrapCluster(rc, logs, store, snaps, trans, conf); err != nil {
				return err
			}
		}
	}
	r, err := raft.NewRaft(rc, a.fsm, logs, store, snaps, trans)
	if err != nil {
		return fmt.Errorf("new raft: %s", err)
	}
	a.raftMu.Lock()
	a.leaderCh, a.raft = r.LeaderCh(), r
	a.raftMu.Unlock()
	return nil
}

// Stop mirrors Dkron v4.1.2 agent.go Stop: raft shutdown (Dkron drops the future, so raft's
// transport and the RPC listener stay open), the store's shutdown (job reads fail after it),
// then serf leave (it broadcasts the leave and waits for it to spread) and serf shutdown.
// POST /v1/leave runs it synchronously (peers see the server left, status 3); SIGTERM runs it
// in a goroutine and exits first.
func (a *Agent) Stop() error {
	logf(lInfo, "agent: Called member stop, now stopping")
	if a.config.Server {
		if r := a.getRaft(); r != nil {
			_ = r.Shutdown()
		}
		a.fsm.shutdown()
	}
	if err := a.serf.Leave(); err != nil {
		return err
	}
	return a.serf.Shutdown()
}

// eventLoop: Dkron v4.1.2 agent.go eventLoop: member-join -> nodeJoin (server lookup,
// bootstrap-expect); leave/failed -> nodeFailed; update -> lanNodeUpdate; each then
// localMemberEvent (a no-op: its channel is nil).
func (a *Agent) eventLoop() {
	shutdown := a.serf.ShutdownCh()
	logf(lInfo, "agent: Listen for events")
	for {
		select {
		case e := <-a.eventCh:
			logf(lInfo, "agent: Received event: %s", e)
			me, ok := e.(serf.MemberEvent)
			if !ok {
				continue
			}
			switch me.EventType() {
			case serf.EventMemberJoin:
				a.nodeJoin(me)
			case serf.EventMemberLeave, serf.EventMemberFailed:
				a.nodeFailed(me)
			case serf.EventMemberUpdate:
				a.lanNodeUpdate(me)
			}
			a.localMemberEvent(me)
		case <-shutdown:
			logf(lWarn, "agent: Serf shutdown detected, quitting")
			return
		}
	}
}

// nodeJoin: Dkron v4.1.2 dkron/serf.go nodeJoin: a joining server (see isServer: it needs a
// port tag) goes into the server lookup (and Dkron's peer list, see serverLookup.peers); while
// bootstrap-expect is set, maybeBootstrap runs. Only a member-join does this: serf coalesces a join and the rpc_addr/port
// tag update that follows it within its quiescent/coalesce window (1 s/3 s) into one
// member-update, and a join seen before the tags is not a server, so when every server joins
// and sets its tags quickly no server ever bootstraps (ARCHITECTURE.md: 133 s without a leader with
// --retry-interval=1s); see Start for the join that does bootstrap a plain cold start.
func (a *Agent) nodeJoin(me serf.MemberEvent) {
	for _, m := range me.Members {
		ok, parts := isServer(m)
		if !ok {
			logf(lWarn, "non-server in gossip pool: %s", m.Name)
			continue
		}
		logf(lInfo, "Adding LAN adding server %s", parts.Name)
		a.lookup.AddServer(parts)
		if a.config.BootstrapExpect != 0 {
			a.maybeBootstrap()
		}
	}
}

// maybeBootstrap: Dkron v4.1.2 dkron/serf.go maybeBootstrap: only with an empty raft log;
// counts the alive-or-not server members of the region (a conflicting expect tag or a
// bootstrap tag aborts); below the expected count it waits for the next join; asks every one
// of them over gRPC (RaftGetConfiguration, up to 6 tries 1, 2, 4... s apart, blocking the event
// loop) and gives up if any has raft peers; else bootstraps raft with all of them as voters at
// serf IP:port tag. Either way it never tries again.
func (a *Agent) maybeBootstrap() {
	if a.skipBootstrap {
		logf(lWarn, "fault injection: not bootstrapping")
		return
	}
	index, err := a.raftStore.LastIndex()
	if err != nil {
		logf(lError, "failed to read last raft index: %v", err)
		return
	}
	if index != 0 {
		a.config.BootstrapExpect = 0
		return
	}
	var servers []*serverParts
	for _, m := range a.serf.Members() {
		ok, p := isServer(m)
		if !ok || p.Region != a.config.Region {
			continue
		}
		if p.Expect != 0 && p.Expect != a.config.BootstrapExpect {
			logf(lError, "peer %s has a conflicting expect value. All nodes should expect the same number", m.Name)
			return
		}
		if p.Bootstrap {
			logf(lError, "peer %s has bootstrap mode. Expect disabled", m.Name)
			return
		}
		servers = append(servers, p)
	}
	if len(servers) < a.config.BootstrapExpect {
		return
	}
	for _, s := range servers {
		for attempt := uint(0); attempt < 6; attempt++ {
			peers, _, err := rpcGetConfiguration(s.RPCAddr.String())
			if err != nil {
				next := (1 << attempt) * time.Second
				logf(lError, "Failed to confirm peer status for server %s (will retry in %s): %v", s.Name, next, err)
				time.Sleep(next)
				continue
			}
			if len(peers) > 0 {
				logf(lInfo, "Existing Raft peers reported by server %s, disabling bootstrap mode", s.Name)
				a.config.BootstrapExpect = 0
				return
			}
			break
		}
	}
	var conf raft.Configuration
	var addrs []string
	for _, s := range servers {
		addrs = append(addrs, s.Addr.String())
		conf.Servers = append(conf.Servers, raft.Server{ID: raft.ServerID(s.ID), Address: raft.ServerAddress(s.Addr.String()), Suffrage: raft.Voter})
	}
	logf(lInfo, "agent: found expected number of peers, attempting to bootstrap cluster... peers=%s", strings.Join(addrs, ","))
	if err := a.getRaft().BootstrapCluster(conf).Error(); err != nil {
		logf(lError, "agent: failed to bootstrap cluster: %v", err)
	}
	a.config.BootstrapExpect = 0
}

// nodeFailed: Dkron v4.1.2 dkron/serf.go nodeFailed: a failed or left server leaves the peer
// list and the server lookup (raft then dials the address in its configuration).
func (a *Agent) nodeFailed(me serf.MemberEvent) {
	for _, m := range me.Members {
		ok, parts := isServer(m)
		if !ok {
			continue
		}
		logf(lInfo, "removing server %s", parts)
		a.lookup.RemoveServer(parts)
	}
}

// lanNodeUpdate: Dkron v4.1.2 dkron/serf.go: a member-update refreshes the server lookup.
func (a *Agent) lanNodeUpdate(me serf.MemberEvent) {
	for _, m := range me.Members {
		if ok, parts := isServer(m); ok {
			logf(lInfo, "Updating LAN server %s", parts)
			a.lookup.AddServer(parts)
		}
	}
}

// localMemberEvent: Dkron v4.1.2 dkron/serf.go: on the leader, queue the members for
// reconciliation without blocking; the channel is nil, so nothing is ever queued.
func (a *Agent) localMemberEvent(me serf.MemberEvent) {
	if !a.config.Server || !a.IsLeader() {
		return
	}
	for _, m := range me.Members {
		select {
		case a.reconcileCh <- m:
		default:
		}
	}
}

// IsLeader: raft state is Leader (Dkron v4.1.2 agent.go IsLeader).
func (a *Agent) IsLeader() bool {
	r := a.getRaft()
	return r != nil && r.State() == raft.Leader
}

// serverParts: the fields of Dkron v4.1.2 dkron/utils.go ServerParts (its JSON in /v1/leave).
type serverParts struct {
	Name, ID, Region, Datacenter string
	Port                         int
	Bootstrap                    bool
	Expect                       int
	RaftVersion                  int
	BuildVersion                 string
	Addr, RPCAddr                *net.TCPAddr
	Status                       serf.MemberStatus
}

func (s *serverParts) String() string {
	return fmt.Sprintf("%s (Addr: %s) (DC: %s)", s.Name, s.Addr, s.Datacenter)
}

// isServer: Dkron v4.1.2 dkron/utils.go isServer: role=dkron, server=true and a numeric port
// tag (a member without the port tag is not a server); expect=1 means bootstrap. RPCAddr
// parses the rpc_addr tag as a bare IP, which fails on its "IP:port" value, so it is always
// the serf IP + port tag, as Addr is.
func isServer(m serf.Member) (bool, *serverParts) {
	if m.Tags["role"] != "dkron" || m.Tags["server"] != "true" {
		return false, nil
	}
	_, bootstrap := m.Tags["bootstrap"]
	expect := 0
	if s, ok := m.Tags["expect"]; ok {
		var err error
		if expect, err = strconv.Atoi(s); err != nil {
			return false, nil
		}
	}
	if expect == 1 {
		bootstrap = true
	}
	rpcIP := net.ParseIP(m.Tags["rpc_addr"])
	if rpcIP == nil {
		rpcIP = m.Addr
	}
	port, err := strconv.Atoi(m.Tags["port"])
	if err != nil {
		return false, nil
	}
	return true, &serverParts{Name: m.Name, ID: m.Name, Region: m.Tags["region"], Datacenter: m.Tags["dc"],
		Port: port, Bootstrap: bootstrap, Expect: expect, BuildVersion: m.Tags["version"],
		Addr: &net.TCPAddr{IP: m.Addr, Port: port}, RPCAddr: &net.TCPAddr{IP: rpcIP, Port: port}, Status: m.Status}
}

// serverLookup: Dkron v4.1.2 dkron/server_lookup.go: servers by raft id; as raft's
// ServerAddressProvider it gives the id's current serf address, so raft dials a server that
// came back with a new IP as soon as its serf join or update arrives (ARCHITECTURE.md Dkron facts).
type serverLookup struct {
	mu   sync.RWMutex
	byID map[raft.ServerID]*serverParts
}

func newServerLookup() *serverLookup {
	return &serverLookup{byID: map[raft.ServerID]*serverParts{}}
}

func (l *serverLookup) AddServer(s *serverParts) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.byID[raft.ServerID(s.ID)] = s
}

func (l *serverLookup) RemoveServer(s *serverParts) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.byID, raft.ServerID(s.ID))
}

// peers: the servers by region as Dkron v4.1.2 keeps them in Agent.peers (added on a server's
// member-join, removed when it fails or leaves; /v1/leave answers them). The lookup gets the
// same adds and removes, plus member-updates.
func (l *serverLookup) peers() map[string][]*serverParts {
	l.mu.RLock()
	defer l.mu.RUnlock()
	out := map[string][]*serverParts{}
	for _, s := range l.byID {
		out[s.Region] = append(out[s.Region], s)
	}
	return out
}

func (l *serverLookup) ServerAddr(id raft.ServerID) (raft.ServerAddress, error) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	s, ok := l.byID[id]
	if !ok {
		return "", fmt.Errorf("Could not find address for server id %v", id)
	}
	return raft.ServerAddress(s.RPCAddr.String()), nil
}

// raftLayer: Dkron v4.1.2 dkron/raft_grpc.go RaftLayer (plain TCP): raft's stream layer on the
// raft side of the mux.
type raftLayer struct{ ln net.Listener }

func (t *raftLayer) Dial(addr raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return (&net.Dialer{Timeout: timeout}).Dial("tcp", string(addr))
}

func (t *raftLayer) Accept() (net.Conn, error) {
	c, err := t.ln.Accept()
	if err != nil {
		fmt.Println("error accepting: ", err.Error())
	}
	return c, err
}

func (t *raftLayer) Close() error   { return t.ln.Close() }
func (t *raftLayer) Addr() net.Addr { return t.ln.Addr() }

var errResolvingHost = errors.New("error resolving hostname")

// normalizeAddrs: Dkron v4.1.2 dkron/config.go normalizeAddrs: bind and HTTP addresses are
// go-sockaddr templates; the advertise address defaults to the bind IP when it resolves to a
// unicast address, with the DEFAULT serf port 8946 (not the bind port), refuses loopback
// ("unsafe", outside dev mode), else the first private IP; a bind host that does not resolve
// is ignored (errResolvingHost).
func (c *Config) normalizeAddrs() error {
	if c.BindAddr != "" {
		ip, err := parseSingleIPTemplate(c.BindAddr)
		if err != nil {
			return fmt.Errorf("bind address resolution failed: %v", err)
		}
		c.BindAddr = ip
	}
	if c.HTTPAddr != "" {
		ip, err := parseSingleIPTemplate(c.HTTPAddr)
		if err != nil {
			return fmt.Errorf("HTTP address resolution failed: %v", err)
		}
		c.HTTPAddr = ip
	}
	addr, err := normalizeAdvertise(c.AdvertiseAddr, c.BindAddr)
	if err != nil {
		return fmt.Errorf("failed to parse advertise address (%v, %v, 8946, false): %w", c.AdvertiseAddr, c.BindAddr, err)
	}
	c.AdvertiseAddr = addr
	return nil
}

func normalizeAdvertise(addr, bind string) (string, error) {
	const defPort = "8946"
	addr, err := parseSingleIPTemplate(addr)
	if err != nil {
		return "", fmt.Errorf("Error parsing advertise address template: %v", err)
	}
	if addr != "" {
		if _, _, err := net.SplitHostPort(addr); err != nil {
			if !strings.Contains(err.Error(), "missing port in address") && !strings.Contains(err.Error(), "too many colons in address") {
				return "", fmt.Errorf("Error parsing advertise address %q: %v", addr, err)
			}
			return net.JoinHostPort(addr, defPort), nil
		}
		return addr, nil
	}
	host := bind
	if h, _, err := net.SplitHostPort(bind); err == nil {
		host = h
	}
	ips, err := net.LookupIP(host)
	if err != nil {
		return "", errResolvingHost
	}
	for _, ip := range ips {
		if ip.IsLinkLocalUnicast() || ip.IsGlobalUnicast() {
			return net.JoinHostPort(ip.String(), defPort), nil
		}
		if ip.IsLoopback() {
			return "", fmt.Errorf("defaulting advertise to localhost is unsafe, please set advertise manually")
		}
	}
	priv, err := parseSingleIPTemplate("{{ GetPrivateIP }}")
	if err != nil {
		return "", fmt.Errorf("unable to parse default advertise address: %v", err)
	}
	return net.JoinHostPort(priv, defPort), nil
}

// parseSingleIPTemplate: Dkron v4.1.2 dkron/config.go ParseSingleIPTemplate.
func parseSingleIPTemplate(tmpl string) (string, error) {
	out, err := template.Parse(tmpl)
	if err != nil {
		return "", fmt.Errorf("unable to parse address template %q: %v", tmpl, err)
	}
	if ips := strings.Split(out, " "); len(ips) > 1 {
		return "", fmt.Errorf("multiple addresses found (%q), please configure one", out)
	}
	return out, nil
}

// addrParts: Dkron v4.1.2 dkron/config.go AddrParts: IP and port, port 8946 when missing.
func addrParts(address string) (string, int, error) {
	check := address
	if _, _, err := net.SplitHostPort(check); err != nil && strings.Contains(err.Error(), "missing port in address") {
		check = fmt.Sprintf("%s:%d", check, 8946)
	}
	if _, _, err := net.SplitHostPort(check); err != nil {
		return "", 0, err
	}
	addr, err := net.ResolveTCPAddr("tcp", check)
	if err != nil {
		return "", 0, err
	}
	return addr.IP.String(), addr.Port, nil
}
