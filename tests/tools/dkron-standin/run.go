package main

// Job runs, reduced to what dkron-ha's tests of worker agents need. Dkron v4.1.2 api.go
// jobRunHandler: `POST /v1/jobs/NAME` asks raft's leader (gRPC RunJob) to run the job now and
// answers 202 with the job; dkron/run.go Run picks the alive serf members whose tags match the
// job's tags (getTargetNodes: "key": "value[:count]", count of them at random) and calls each
// one's AgentRun at its rpc_addr tag; grpc_agent.go AgentRun runs the executor and the outcome
// reaches the leader's store (ExecutionDone), listed by `GET /v1/jobs/NAME/executions`.
//
// Here the shell executor runs executor_config.command split on spaces, without a shell, and
// between the stand-in's own leader and agents the run goes as JSON over HTTP on the agent's
// RPC port instead of gRPC: a stand-in never talks to a real Dkron. Executions go into the raft
// log (type 4, Dkron's ExecutionDoneType) but not into snapshots.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/serf/serf"
)

const executionDoneType byte = 4

// Execution keeps the JSON names of Dkron v4.1.2 dkron/execution.go Execution.
type Execution struct {
	JobName    string    `json:"job_name"`
	StartedAt  time.Time `json:"started_at"`
	FinishedAt time.Time `json:"finished_at"`
	Success    bool      `json:"success"`
	Output     string    `json:"output"`
	NodeName   string    `json:"node_name"`
	Attempt    uint      `json:"attempt"`
}

// targets: getTargetNodes: every job tag must match a tag of the member; the smallest count
// given bounds how many are picked, at random.
func targets(members []serf.Member, tags map[string]string) []serf.Member {
	count := -1
	var out []serf.Member
	for _, m := range members {
		if m.Status != serf.StatusAlive {
			continue
		}
		ok := true
		for k, v := range tags {
			value, n, found := strings.Cut(v, ":")
			if found {
				if c, err := strconv.Atoi(n); err == nil && (count < 0 || c < count) {
					count = c
				}
			}
			ok = ok && m.Tags[k] == value
		}
		if ok {
			out = append(out, m)
		}
	}
	rand.Shuffle(len(out), func(i, k int) { out[i], out[k] = out[k], out[i] })
	if count >= 0 && count < len(out) {
		out = out[:count]
	}
	return out
}

// runJob: POST /v1/jobs/NAME on a server. A follower passes it to the leader's HTTP API (Dkron:
// gRPC to the leader); the leader answers 202 with the job and runs it in the background.
func (a *Agent) runJob(w http.ResponseWriter, r *http.Request, name string) {
	j := a.fsm.get(name)
	if j == nil {
		w.WriteHeader(404)
		_, _ = fmt.Fprintf(w, "job not found: %s", name)
		return
	}
	if !a.IsLeader() {
		var leader string
		if rf := a.getRaft(); rf != nil {
			leader = string(rf.Leader())
		}
		host, _, err := net.SplitHostPort(leader)
		_, port, _ := net.SplitHostPort(a.config.HTTPAddr)
		if err != nil {
			w.WriteHeader(500)
			_, _ = fmt.Fprint(w, "no leader")
			return
		}
		resp, err := http.Post("http://"+net.JoinHostPort(host, port)+r.URL.Path, "application/json", nil)
		if err != nil {
			w.WriteHeader(500)
			_, _ = fmt.Fprint(w, err.Error())
			return
		}
		defer resp.Body.Close()
		w.WriteHeader(resp.StatusCode)
		_, _ = io.Copy(w, resp.Body)
		return
	}
	go func() {
		for _, m := range targets(a.serf.Members(), j.Tags) {
			ex := a.agentRun(m, j)
			body, _ := json.Marshal(ex)
			if err := a.getRaft().Apply(append([]byte{executionDoneType}, body...), 30*time.Second).Error(); err != nil {
				logf(lError, "agent: Error storing the execution of %s: %v", j.Name, err)
			}
		}
	}()
	w.Header().Set("Location", r.URL.RequestURI())
	renderJSON(w, r, 202, j)
}

// agentRun calls member m to run job j; a failed call is a failed execution.
func (a *Agent) agentRun(m serf.Member, j *Job) Execution {
	ex := Execution{JobName: j.Name, StartedAt: time.Now(), NodeName: m.Name, Attempt: 1}
	body, _ := json.Marshal(j)
	client := http.Client{Timeout: 70 * time.Second}
	// Dkron v4.1.2 dkron/run.go: the rpc_addr tag, else the member's bare IP (no port), which
	// an agent that has not set its tags yet never answers at.
	addr, ok := m.Tags["rpc_addr"]
	if !ok {
		addr = m.Addr.String()
	}
	resp, err := client.Post("http://"+addr+"/agent-run", "application/json", bytes.NewReader(body))
	if err == nil {
		defer resp.Body.Close()
		err = json.NewDecoder(resp.Body).Decode(&ex)
	}
	if err != nil {
		ex.Success, ex.Output, ex.FinishedAt = false, err.Error(), time.Now()
	}
	return ex
}

// serveAgentRuns: the AgentService of a non-server agent, on its RPC listener.
func (a *Agent) serveAgentRuns() {
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var j Job
		if r.URL.Path != "/agent-run" || json.NewDecoder(r.Body).Decode(&j) != nil {
			w.WriteHeader(400)
			return
		}
		logf(lInfo, "grpc_agent: Starting job %s", j.Name)
		ex := Execution{JobName: j.Name, StartedAt: time.Now(), NodeName: a.config.NodeName, Attempt: 1}
		words := strings.Fields(j.ExecutorConfig["command"])
		if j.Executor != "shell" || len(words) == 0 {
			ex.Output = "grpc_agent: No executor defined, nothing to do"
		} else {
			ctx, cancel := context.WithTimeout(r.Context(), time.Minute)
			out, err := exec.CommandContext(ctx, words[0], words[1:]...).CombinedOutput()
			cancel()
			ex.Success, ex.Output = err == nil, string(out)
		}
		ex.FinishedAt = time.Now()
		renderJSON(w, r, 200, ex)
	})
	go func() {
		if err := http.Serve(a.listener, h); err != nil {
			logf(lError, "grpc_agent: %v", err)
		}
	}()
}
