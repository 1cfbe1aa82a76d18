package main

import (
	"encoding/json"
	"errors"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// setJobType: the first byte of a raft log entry that sets a job (Dkron v4.1.2 dkron/fsm.go
// SetJobType = 0). The rest is the job as JSON here (Dkron: the types.v1.Job protobuf), so a
// stand-in data dir is not a Dkron one.
const setJobType byte = 0

var errParentJobNotFound = errors.New("specified parent job not found")

// Job keeps the fields of Dkron v4.1.2 dkron/job.go Job under the same JSON names. Only
// stored and listed: the stand-in runs nothing, so counts, status and next stay as sent.
type Job struct {
	ID             string                       `json:"id"`
	Name           string                       `json:"name"`
	DisplayName    string                       `json:"displayname"`
	Timezone       string                       `json:"timezone"`
	Schedule       string                       `json:"schedule"`
	Owner          string                       `json:"owner"`
	OwnerEmail     string                       `json:"owner_email"`
	SuccessCount   int                          `json:"success_count"`
	ErrorCount     int                          `json:"error_count"`
	LastSuccess    *time.Time                   `json:"last_success"`
	LastError      *time.Time                   `json:"last_error"`
	Disabled       bool                         `json:"disabled"`
	Tags           map[string]string            `json:"tags"`
	Metadata       map[string]string            `json:"metadata"`
	Retries        uint                         `json:"retries"`
	DependentJobs  []string                     `json:"dependent_jobs"`
	ParentJob      string                       `json:"parent_job"`
	Processors     map[string]map[string]string `json:"processors"`
	Concurrency    string                       `json:"concurrency"`
	Executor       string                       `json:"executor"`
	ExecutorConfig map[string]string            `json:"executor_config"`
	Status         string                       `json:"status"`
	Next           time.Time                    `json:"next"`
	Ephemeral      bool                         `json:"ephemeral"`
	StartsAt       *time.Time                   `json:"starts_at"`
	ExpiresAt      *time.Time                   `json:"expires_at"`
}

// jobFSM is the raft FSM: Dkron v4.1.2 keeps jobs in an in-memory buntdb store fed by the
// raft log (dkron/store.go NewStore ":memory:"), so jobs survive a restart through the raft
// log and snapshots under the data dir; so do these.
type jobFSM struct {
	mu         sync.RWMutex
	jobs       map[string]*Job
	executions map[string][]Execution
	// closed: Dkron v4.1.2 agent.go Stop shuts its store down (Store.Shutdown), so a server
	// that left through POST /v1/leave, still running, can no longer read its jobs.
	closed bool
}

func newFSM() *jobFSM {
	return &jobFSM{jobs: map[string]*Job{}, executions: map[string][]Execution{}}
}

func (f *jobFSM) Apply(l *raft.Log) any {
	if len(l.Data) > 0 && l.Data[0] == executionDoneType {
		var ex Execution
		if err := json.Unmarshal(l.Data[1:], &ex); err != nil {
			return err
		}
		f.mu.Lock()
		defer f.mu.Unlock()
		f.executions[ex.JobName] = append(f.executions[ex.JobName], ex)
		return nil
	}
	if len(l.Data) == 0 || l.Data[0] != setJobType {
		return nil
	}
	var j Job
	if err := json.Unmarshal(l.Data[1:], &j); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// Dkron v4.1.2 dkron/store.go SetJob: a parent job must exist.
	if j.ParentJob != "" && f.jobs[j.ParentJob] == nil {
		return errParentJobNotFound
	}
	// NewJobFromProto always makes the processors map.
	if j.Processors == nil {
		j.Processors = map[string]map[string]string{}
	}
	f.jobs[j.Name] = &j
	return nil
}

func (f *jobFSM) get(name string) *Job {
	f.mu.RLock()
	defer f.mu.RUnlock()
	if f.closed {
		return nil
	}
	return f.jobs[name]
}

// shutdown: Dkron v4.1.2 store.go Shutdown; reads fail from then on.
func (f *jobFSM) shutdown() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
}

// isClosed: whether shutdown ran.
func (f *jobFSM) isClosed() bool {
	f.mu.RLock()
	defer f.mu.RUnlock()
	return f.closed
}

// executionsOf: newest first (Dkron v4.1.2 api.go executionsHandler: _order DESC).
func (f *jobFSM) executionsOf(name string) []Execution {
	f.mu.RLock()
	defer f.mu.RUnlock()
	in := f.executions[name]
	out := make([]Execution, 0, len(in))
	for i := len(in) - 1; i >= 0; i-- {
		out = append(out, in[i])
	}
	return out
}

// list: by name, ascending (Dkron v4.1.2 dkron/api.go jobsHandler's default sort).
func (f *jobFSM) list() []*Job {
	f.mu.RLock()
	defer f.mu.RUnlock()
	out := make([]*Job, 0, len(f.jobs))
	for _, j := range f.jobs {
		out = append(out, j)
	}
	sort.Slice(out, func(i, k int) bool { return out[i].Name < out[k].Name })
	return out
}

func (f *jobFSM) Snapshot() (raft.FSMSnapshot, error) {
	body, err := json.Marshal(f.list())
	return snapshot(body), err
}

func (f *jobFSM) Restore(r io.ReadCloser) error {
	defer r.Close()
	var jobs []*Job
	if err := json.NewDecoder(r).Decode(&jobs); err != nil {
		return err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.jobs = map[string]*Job{}
	for _, j := range jobs {
		f.jobs[j.Name] = j
	}
	return nil
}

type snapshot []byte

func (s snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s); err != nil {
		_ = sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s snapshot) Release() {}
