package main

import (
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/serf/serf"
	"github.com/robfig/cron/v3"
	"google.golang.org/grpc/status"
)

// serveHTTP: Dkron v4.1.2 dkron/api.go ServeHTTP: the API on --http-addr (servers only,
// started before raft exists; a listen error is only logged). Routes are matched as gin
// matches them: any other method or path is a 404 "404 page not found" (gin's text/plain
// body), and every answer carries X-Whom: <node name> (api.go MetaMiddleware).
func (a *Agent) serveHTTP() {
	logf(lInfo, "api: Running HTTP server on %s", a.config.HTTPAddr)
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Whom", a.config.NodeName)
		p, m := r.URL.Path, r.Method
		switch {
		case m == "GET" && p == "/health":
			a.health(w, r)
		case m == "GET" && (p == "/v1" || p == "/v1/"):
			local := a.serf.LocalMember()
			renderJSON(w, r, 200, map[string]any{"agent": map[string]string{"name": local.Name, "version": version},
				"serf": a.serf.Stats(), "tags": local.Tags})
		case m == "GET" && p == "/v1/members":
			a.members(w, r)
		case m == "GET" && p == "/v1/leader":
			a.leader(w, r)
		case m == "GET" && p == "/v1/isleader":
			// Dkron v4.1.2 api.go isLeaderHandler: JSON strings, 200 or 404.
			if a.IsLeader() {
				renderJSON(w, r, 200, "I am a leader")
			} else {
				renderJSON(w, r, 404, "I am a follower")
			}
		case m == "POST" && p == "/v1/leave":
			a.leave(w, r)
		case (m == "POST" || m == "PATCH") && p == "/v1/jobs", m == "PUT" && jobPath(p) != "":
			a.setJob(w, r)
		case m == "GET" && p == "/v1/jobs":
			// Dkron v4.1.2 api.go jobsHandler: X-Total-Count is every job, the body the
			// `_start`..`_end` slice of them (end clamped to the count); 500 once the store
			// is shut down.
			if a.fsm.isClosed() {
				logf(lError, "api: Unable to get jobs, store not reachable.")
				w.WriteHeader(500)
				return
			}
			jobs := a.fsm.list()
			w.Header().Set("X-Total-Count", strconv.Itoa(len(jobs)))
			start, _ := strconv.Atoi(r.URL.Query().Get("_start"))
			end := len(jobs)
			if v, ok := r.URL.Query()["_end"]; ok {
				end, _ = strconv.Atoi(v[0])
				end = min(end, len(jobs))
			}
			renderJSON(w, r, 200, jobs[start:end])
		case m == "POST" && jobPath(p) != "":
			a.runJob(w, r, jobPath(p))
		case m == "GET" && strings.HasSuffix(p, "/executions") && jobPath(strings.TrimSuffix(p, "/executions")) != "":
			name := jobPath(strings.TrimSuffix(p, "/executions"))
			if a.fsm.get(name) == nil {
				w.WriteHeader(404)
				return
			}
			executions := a.fsm.executionsOf(name)
			w.Header().Set("X-Total-Count", strconv.Itoa(len(executions)))
			renderJSON(w, r, 200, executions)
		case m == "GET" && jobPath(p) != "":
			// Dkron v4.1.2 api.go jobGetHandler: the local store; unknown: 404, empty body.
			if j := a.fsm.get(jobPath(p)); j != nil {
				renderJSON(w, r, 200, j)
			} else {
				w.WriteHeader(404)
			}
		default:
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(404)
			_, _ = io.WriteString(w, "404 page not found")
		}
	})
	go func() {
		if err := http.ListenAndServe(a.config.HTTPAddr, h); err != nil {
			logf(lError, "api: Error starting HTTP server: %v", err)
		}
	}()
}

func jobPath(p string) string {
	name, ok := strings.CutPrefix(p, "/v1/jobs/")
	if !ok || name == "" || strings.Contains(name, "/") {
		return ""
	}
	return name
}

// renderJSON: gin's c.JSON (application/json; charset=utf-8, no newline), indented by four
// spaces with ?pretty (Dkron v4.1.2 api.go renderJSON).
func renderJSON(w http.ResponseWriter, r *http.Request, code int, v any) {
	var body []byte
	if _, ok := r.URL.Query()["pretty"]; ok {
		body, _ = json.MarshalIndent(v, "", "    ")
	} else {
		body, _ = json.Marshal(v)
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

// abortedJSON: what Dkron answers when a handler aborts with a status and then still renders
// JSON: gin has already sent the status without a Content-Type, the later 200 and its header
// are dropped, and the body is sniffed as text/plain.
func abortedJSON(w http.ResponseWriter, code int, v any) {
	body, _ := json.Marshal(v)
	w.WriteHeader(code)
	_, _ = w.Write(body)
}

// health: Dkron v4.1.2 api.go /health: {"leader":<raft leader?>,"status":"healthy"}, 200.
func (a *Agent) health(w http.ResponseWriter, r *http.Request) {
	renderJSON(w, r, 200, map[string]any{"status": "healthy", "leader": a.IsLeader()})
}

// member is Dkron v4.1.2 gen/proto/types/v1/members.go Member: the serf member (Name, Addr,
// Port, Tags, Status 1 alive / 2 leaving / 3 left / 4 failed, protocol versions) plus a random
// "id" per answer and "statusText".
type member struct {
	serf.Member
	ID         string `json:"id"`
	StatusText string `json:"statusText"`
}

func (a *Agent) members(w http.ResponseWriter, r *http.Request) {
	out := []member{}
	for _, m := range a.serf.Members() {
		out = append(out, member{m, uuid(), m.Status.String()})
	}
	w.Header().Set("X-Total-Count", strconv.Itoa(len(out)))
	renderJSON(w, r, 200, out)
}

func uuid() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// leader: Dkron v4.1.2 api.go leaderHandler + agent.go leaderMember: the first serf member
// whose rpc_addr tag equals raft's leader address, 200 with that serf member as JSON. With no
// raft yet, or no match, 500 with the body null (text/plain). raft's leader is "" while there
// is none, so a member that has no rpc_addr tag yet (still joining) matches: 200 naming a
// member that is not a leader (ARCHITECTURE.md Dkron facts).
func (a *Agent) leader(w http.ResponseWriter, r *http.Request) {
	if rf := a.getRaft(); rf != nil {
		l := string(rf.Leader())
		for _, m := range a.serf.Members() {
			if m.Tags["rpc_addr"] == l {
				renderJSON(w, r, 200, m)
				return
			}
		}
	}
	abortedJSON(w, 500, nil)
}

// leave: Dkron v4.1.2 api.go leaveHandler: Stop synchronously (raft shutdown, serf leave,
// serf shutdown: peers see the server left, status 3), then the known peers by region as
// JSON, 200 (500 if the stop failed). The process keeps running until it is signalled.
func (a *Agent) leave(w http.ResponseWriter, r *http.Request) {
	err := a.Stop()
	body, _ := json.Marshal(a.lookup.peers())
	if err != nil {
		logf(lError, "api: leave: %v", err)
		w.WriteHeader(500)
		_, _ = w.Write(body)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	_, _ = w.Write(body)
}

// setJob: Dkron v4.1.2 api.go jobCreateOrUpdateHandler: the body is a job (concurrency
// "allow" unless given, id = name), validated (job.go Validate), then sent over gRPC to raft's
// leader (grpc_client.go SetJob) from any server; 201 with the job and a Location header.
// Errors: 400 "Unable to parse payload: ERR." or "Job validation failed: ERR.", 404 for a
// missing parent job, 500 with the gRPC error message (e.g. no leader).
func (a *Agent) setJob(w http.ResponseWriter, r *http.Request) {
	j := Job{Concurrency: "allow"}
	if err := json.NewDecoder(r.Body).Decode(&j); err != nil {
		w.WriteHeader(400)
		_, _ = fmt.Fprintf(w, "Unable to parse payload: %s.", err)
		return
	}
	j.ID = j.Name
	if err := validateJob(&j); err != nil {
		w.WriteHeader(400)
		_, _ = fmt.Fprintf(w, "Job validation failed: %s.", err)
		return
	}
	if err := a.rpcSetJob(&j); err != nil {
		msg := status.Convert(err).Message()
		if msg == errParentJobNotFound.Error() {
			w.WriteHeader(404)
		} else {
			w.WriteHeader(500)
		}
		_, _ = io.WriteString(w, msg)
		return
	}
	w.Header().Set("Location", r.RequestURI+"/"+j.Name)
	renderJSON(w, r, 201, &j)
}

var illegalName = regexp.MustCompile(`[^\p{Ll}0-9_-]`)

// cronParser: Dkron v4.1.2 extcron/extparser.go: robfig/cron v3 with a mandatory seconds field
// and descriptors, plus @manually, @minutely, @at <RFC3339> and @after <RFC3339> <DURATION.
var cronParser = cron.NewParser(cron.Second | cron.Minute | cron.Hour | cron.Dom | cron.Month | cron.Dow | cron.Descriptor)

// validateJob: Dkron v4.1.2 dkron/job.go Validate (the "~" hash in schedules and the shell
// executor's mem_limit check are not mirrored).
func validateJob(j *Job) error {
	if j.Name == "" {
		return fmt.Errorf("name cannot be empty")
	}
	if c := illegalName.FindString(j.Name); c != "" {
		return fmt.Errorf("name contains illegal character '%s'", c)
	}
	if j.ParentJob == j.Name {
		return fmt.Errorf("the job can not have itself as parent")
	}
	if j.Schedule != "" || j.ParentJob == "" {
		if err := parseSchedule(j.Schedule); err != nil {
			return fmt.Errorf("can't parse job schedule: %s", err)
		}
	}
	if j.Concurrency != "allow" && j.Concurrency != "forbid" && j.Concurrency != "" {
		return fmt.Errorf("invalid concurrency policy value, use \"allow\" or \"forbid\"")
	}
	if _, err := time.LoadLocation(j.Timezone); err != nil {
		return err
	}
	if j.Executor == "shell" && j.ExecutorConfig["timeout"] != "" {
		if _, err := time.ParseDuration(j.ExecutorConfig["timeout"]); err != nil {
			return fmt.Errorf("Error parsing job timeout value")
		}
	}
	return nil
}

func parseSchedule(spec string) error {
	switch {
	case spec == "@manually" || spec == "@minutely":
		return nil
	case strings.HasPrefix(spec, "@at "):
		if _, err := time.Parse(time.RFC3339, spec[4:]); err != nil {
			return fmt.Errorf("failed to parse date %s: %s", spec, err)
		}
		return nil
	case strings.HasPrefix(spec, "@after "):
		parts := strings.Fields(spec[7:])
		if len(parts) != 2 || !strings.HasPrefix(parts[1], "<") {
			return fmt.Errorf("@after requires format: @after <RFC3339 datetime> <ISO8601 duration>, got: %s", spec)
		}
		_, err := time.Parse(time.RFC3339, parts[0])
		return err
	}
	_, err := cronParser.Parse(spec)
	return err
}
