package main

// Runs stand-in servers on loopback (this test binary re-executed as the program) and checks
// the behaviour dkron-ha relies on. `go test` in this directory; about a minute.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/serf/serf"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"
)

func TestMain(m *testing.M) {
	if os.Getenv("STANDIN_RUN_MAIN") == "1" {
		os.Args = append([]string{"dkron"}, os.Args[1:]...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type node struct {
	name                 string
	serf, http, rpc      int
	cmd                  *exec.Cmd
	stdout, stderr       bytes.Buffer
	dir                  string
	extraEnv, extraFlags []string
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func newNodes(t *testing.T, n int) []*node {
	dir := t.TempDir()
	var out []*node
	for i := 0; i < n; i++ {
		out = append(out, &node{name: fmt.Sprintf("s%d", i), serf: freePort(t), http: freePort(t), rpc: freePort(t), dir: fmt.Sprintf("%s/d%d", dir, i)})
	}
	return out
}

func (nd *node) start(t *testing.T, peers []*node, args ...string) {
	a := []string{"agent", "--server", fmt.Sprintf("--bind-addr=127.0.0.1:%d", nd.serf),
		fmt.Sprintf("--advertise-addr=127.0.0.1:%d", nd.serf), fmt.Sprintf("--http-addr=127.0.0.1:%d", nd.http),
		fmt.Sprintf("--rpc-port=%d", nd.rpc), "--data-dir=" + nd.dir}
	if nd.name != "" {
		a = append(a, "--node-name="+nd.name)
	}
	for _, p := range peers {
		if p != nd {
			a = append(a, fmt.Sprintf("--retry-join=127.0.0.1:%d", p.serf))
		}
	}
	nd.stdout.Reset()
	nd.stderr.Reset()
	nd.cmd = exec.Command(os.Args[0], append(a, args...)...)
	nd.cmd.Env = append(append(os.Environ(), "STANDIN_RUN_MAIN=1"), nd.extraEnv...)
	nd.cmd.Stdout, nd.cmd.Stderr = &nd.stdout, &nd.stderr
	if err := nd.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = nd.cmd.Process.Kill(); _ = nd.cmd.Wait() })
}

func (nd *node) get(path string) (int, string) {
	return nd.req("GET", path, "")
}

func (nd *node) req(method, path, body string) (int, string) {
	r, _ := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", nd.http, path), strings.NewReader(body))
	resp, err := (&http.Client{Timeout: 15 * time.Second}).Do(r)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func (nd *node) rpcAddr() string { return fmt.Sprintf("127.0.0.1:%d", nd.rpc) }

func eventually(t *testing.T, what string, limit time.Duration, f func() bool) {
	t.Helper()
	for end := time.Now().Add(limit); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if f() {
			return
		}
	}
	t.Fatalf("not within %s: %s", limit, what)
}

func memberStatus(t *testing.T, from *node, name string) int {
	_, body := from.get("/v1/members")
	var ms []struct {
		Name   string
		Status int
		Tags   map[string]string
	}
	_ = json.Unmarshal([]byte(body), &ms)
	for _, m := range ms {
		if m.Name == name {
			return m.Status
		}
	}
	return 0
}

// startCluster starts 3 servers as dkron-ha's wrap does on a cold start: s1 and s2 first,
// s0 once they answer HTTP, so s0 sees their joins whole and bootstraps.
func startCluster(t *testing.T) ([]*node, *node) {
	ns := newNodes(t, 3)
	for _, nd := range ns[1:] {
		nd.start(t, ns, "--bootstrap-expect=3", "--retry-interval=1s")
	}
	for _, nd := range ns[1:] {
		eventually(t, nd.name+" answers HTTP", 20*time.Second, func() bool { c, _ := nd.get("/health"); return c == 200 })
	}
	ns[0].start(t, ns, "--bootstrap-expect=3", "--retry-interval=1s")
	var leader *node
	eventually(t, "one leader", 30*time.Second, func() bool {
		leader = nil
		for _, nd := range ns {
			if c, _ := nd.get("/v1/isleader"); c == 200 {
				leader = nd
			}
		}
		return leader != nil
	})
	return ns, leader
}

func TestCluster(t *testing.T) {
	ns, leader := startCluster(t)
	var followers []*node
	for _, nd := range ns {
		if nd != leader {
			followers = append(followers, nd)
		}
	}
	if !strings.Contains(ns[0].stdout.String(), `dkron stand-in started with ["agent" "--server" "--bind-addr=127.0.0.1:`) {
		t.Errorf("start line: %q", ns[0].stdout.String())
	}
	// /v1/isleader bodies; /v1/leader names the leader; /v1/members 3 alive.
	if c, b := followers[0].get("/v1/isleader"); c != 404 || b != `"I am a follower"` {
		t.Errorf("follower isleader: %d %s", c, b)
	}
	if c, b := leader.get("/v1/isleader"); c != 200 || b != `"I am a leader"` {
		t.Errorf("leader isleader: %d %s", c, b)
	}
	eventually(t, "every server knows the leader", 10*time.Second, func() bool {
		for _, nd := range ns {
			if c, b := nd.get("/v1/leader"); c != 200 || !strings.Contains(b, `"Name":"`+leader.name+`"`) {
				return false
			}
		}
		return true
	})
	for _, nd := range ns {
		if s := memberStatus(t, leader, nd.name); s != 1 {
			t.Errorf("%s status %d, want 1", nd.name, s)
		}
	}
	// gRPC: 3 voters, the leader flagged; remove-peer refused on a follower.
	servers, _, err := rpcGetConfiguration(followers[0].rpcAddr())
	if err != nil || len(servers) != 3 {
		t.Fatalf("configuration from a follower: %v %v", servers, err)
	}
	for _, s := range servers {
		if !s.Voter || s.Leader != (s.ID == leader.name) || s.Node != s.ID || s.Address != fmt.Sprintf("127.0.0.1:%d", map[string]*node{ns[0].name: ns[0], ns[1].name: ns[1], ns[2].name: ns[2]}[s.ID].rpc) {
			t.Errorf("raft server %+v", s)
		}
	}
	if err := rpcRemovePeer(followers[0].rpcAddr(), followers[1].name); err == nil || !strings.Contains(err.Error(), "desc = node is not the leader") {
		t.Errorf("remove-peer on a follower: %v", err)
	}
	if err := rpcRemovePeer(leader.rpcAddr(), "nobody"); err == nil || !strings.Contains(err.Error(), `id "nobody" was not found in the Raft configuration`) {
		t.Errorf("remove-peer of an unknown id: %v", err)
	}
	// A job posted to a follower goes through the leader's raft to every server.
	if c, b := followers[0].req("POST", "/v1/jobs", `{"name":"job-1","schedule":"@every 1m","executor":"shell"}`); c != 201 || !strings.Contains(b, `"id":"job-1"`) {
		t.Fatalf("POST /v1/jobs on a follower: %d %s", c, b)
	}
	for _, nd := range ns {
		eventually(t, nd.name+" lists the job", 5*time.Second, func() bool {
			c, b := nd.get("/v1/jobs/job-1")
			return c == 200 && strings.Contains(b, `"schedule":"@every 1m"`) && strings.Contains(b, `"concurrency":"allow"`)
		})
	}
	if c, b := leader.req("POST", "/v1/jobs", `{"name":"Bad","schedule":"* * * * *"}`); c != 400 || b != "Job validation failed: name contains illegal character 'B'." {
		t.Errorf("invalid job: %d %q", c, b)
	}
	// remove-peer on the leader works (while raft has its majority).
	if err := rpcRemovePeer(leader.rpcAddr(), followers[0].name); err != nil {
		t.Errorf("remove-peer on the leader: %v", err)
	}
	if servers, _, _ := rpcGetConfiguration(leader.rpcAddr()); len(servers) != 2 {
		t.Errorf("after remove-peer: %v", servers)
	}
	// POST /v1/leave: a real leave, peers see it left (3); the process keeps running.
	if c, _ := followers[1].req("POST", "/v1/leave", ""); c != 200 {
		t.Errorf("leave: %d", c)
	}
	eventually(t, "the leader sees the server that left as left (3)", 5*time.Second, func() bool {
		return memberStatus(t, leader, followers[1].name) == 3
	})
	// SIGTERM: exit 0 before the leave goes out: peers see the server failed (4).
	_ = followers[0].cmd.Process.Signal(syscall.SIGTERM)
	if err := followers[0].cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v", err)
	}
	eventually(t, "the leader sees the SIGTERMed server failed", 15*time.Second, func() bool {
		return memberStatus(t, leader, followers[0].name) == 4
	})
}

func TestSingleServer(t *testing.T) {
	nd := newNodes(t, 1)[0]
	// Env as Dkron's viper binding reads it; a flag beats its env var (DKRON_NODE_NAME).
	nd.extraEnv = []string{"DKRON_BOOTSTRAP_EXPECT=1", "DKRON_NODE_NAME=from-env"}
	nd.start(t, nil)
	eventually(t, "leader", 20*time.Second, func() bool { c, _ := nd.get("/v1/isleader"); return c == 200 })
	if c, b := nd.req("POST", "/v1/jobs", `{"name":"kept","schedule":"0 0 * * * *"}`); c != 201 {
		t.Fatalf("POST: %d %s", c, b)
	}
	_ = nd.cmd.Process.Signal(syscall.SIGTERM)
	_ = nd.cmd.Wait()
	nd.start(t, nil) // same data dir: the raft log and snapshots on disk
	eventually(t, "the job survives the restart", 20*time.Second, func() bool {
		c, b := nd.get("/v1/jobs")
		return c == 200 && strings.Contains(b, `"name":"kept"`)
	})
	if !strings.Contains(nd.stdout.String(), "node-name=s0 ") {
		t.Errorf("config line: %s", nd.stdout.String())
	}
}

func TestGRPCPackageAndCLI(t *testing.T) {
	nd := newNodes(t, 1)[0]
	nd.extraEnv = []string{"DKRON_STANDIN_GRPC_PACKAGE=types", "DKRON_NODE_NAME=from-env"}
	nd.name = ""
	nd.start(t, nil, "--bootstrap-expect=1")
	eventually(t, "leader", 20*time.Second, func() bool { c, _ := nd.get("/v1/isleader"); return c == 200 })
	conn, err := grpc.NewClient(nd.rpcAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	resp := newMsg(msgConfig)
	if err := conn.Invoke(context.Background(), "/types.Dkron/RaftGetConfiguration", &emptypb.Empty{}, resp); err != nil {
		t.Errorf("old path: %v", err)
	}
	if err := conn.Invoke(context.Background(), "/types.v1.Dkron/RaftGetConfiguration", &emptypb.Empty{}, resp); err == nil || !strings.Contains(err.Error(), "Unimplemented") {
		t.Errorf("new path on an old-package server: %v", err)
	}
	if !strings.Contains(nd.stdout.String(), "node-name=from-env ") {
		t.Errorf("DKRON_NODE_NAME not applied: %s", nd.stdout.String())
	}
}

func TestUnknownFlagAndEarlySIGHUP(t *testing.T) {
	cmd := exec.Command(os.Args[0], "agent", "--nope")
	cmd.Env = append(os.Environ(), "STANDIN_RUN_MAIN=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err == nil || cmd.ProcessState.ExitCode() != 1 || !strings.HasPrefix(errb.String(), "Error: unknown flag: --nope\n") || !strings.HasSuffix(out.String(), "unknown flag: --nope\n") {
		t.Errorf("unknown flag: %v stdout %q stderr %q", err, out.String(), errb.String())
	}
	// Still in the retry-join loop (nobody to join): no signal handler yet, SIGHUP kills.
	nd := newNodes(t, 2)
	nd[0].start(t, nd, "--retry-interval=30s")
	eventually(t, "joining", 10*time.Second, func() bool { return strings.Contains(nd[0].stderr.String(), "retrying in 30s") })
	_ = nd[0].cmd.Process.Signal(syscall.SIGHUP)
	err := nd[0].cmd.Wait()
	if ws, ok := nd[0].cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGHUP {
		t.Errorf("early SIGHUP: %v", err)
	}
}

// Dkron v4.1.2 dkron/run.go getTargetNodes: every job tag must match, alive members only, the
// count bounds how many.
func TestTargetsMatchTagsAliveOnlyAndCount(t *testing.T) {
	m := func(name, role string, status serf.MemberStatus) serf.Member {
		return serf.Member{Name: name, Tags: map[string]string{"role": role}, Status: status}
	}
	members := []serf.Member{m("w1", "worker", serf.StatusAlive), m("w2", "worker", serf.StatusAlive),
		m("w3", "worker", serf.StatusFailed), m("s1", "", serf.StatusAlive)}
	if got := targets(members, map[string]string{"role": "worker"}); len(got) != 2 {
		t.Fatalf("all alive workers: %v", got)
	}
	got := targets(members, map[string]string{"role": "worker:1"})
	if len(got) != 1 || (got[0].Name != "w1" && got[0].Name != "w2") {
		t.Fatalf("one alive worker: %v", got)
	}
	if got := targets(members, map[string]string{"role": "db"}); len(got) != 0 {
		t.Fatalf("no match: %v", got)
	}
}
