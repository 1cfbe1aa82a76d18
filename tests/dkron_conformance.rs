//! Does the stand-in behave as Dkron does, where dkron-ha depends on it? One membership script
//! played against three Dkron servers on loopback, each at an address of its own (127.0.77.x,
//! Dkron's own ports), recording what an operator would observe after each step: a leave and a
//! return at a new address, a SIGKILL and a return, 3 → 5 → 3 servers, the leader stopped, jobs
//! written before and read after, reads from a server that left.
//!
//! The observations are compared with `tests/fixtures/dkron-conformance.txt`, taken from real
//! Dkron v4.1.2 (`DKRON_BIN=/path/to/dkron UPDATE_CONFORMANCE=1 cargo test --test
//! dkron_conformance` rewrites it; commit the file, never Dkron). A line reads
//! `step: observation = value`; where the stand-in cannot match, the line goes on
//! `| stand-in: value: why`, and the stand-in is held to that value instead.
//!
//! Every server reads `reconcileinterval: 2s` from a config file (Dkron reads that key only from
//! a file): the leader's raft reconcile then runs every 2 s instead of 60 s, so the script waits
//! seconds where an operator would wait minutes. What it observes is the same.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dkron_ha::dkron::grpc::RaftClient;
use nix::sys::signal::Signal;
use serde_json::Value;

const HTTP: u16 = 8080;
const SERF: u16 = 8946;
const RPC: u16 = 6868;
const EXPECTED: &str = "tests/fixtures/dkron-conformance.txt";

/// One Dkron server: its name, data directory (kept across restarts) and, while it runs, its
/// process and address.
struct Server {
    name: String,
    dir: PathBuf,
    ip: String,
    child: Option<Child>,
}

impl Server {
    fn signal(&mut self, signal: Signal) {
        if let Some(child) = &self.child {
            // The whole process group: real Dkron starts its executor plugins as its children.
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, signal);
        }
    }

    /// Waits at most 20 s for the process to end after a signal; SIGKILL after that.
    fn reap(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
        let _ = nix::sys::signal::kill(group, Signal::SIGKILL);
        let _ = child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

/// The servers of the script and what it observed.
struct Script {
    binary: PathBuf,
    root: tempfile::TempDir,
    config: PathBuf,
    servers: BTreeMap<String, Server>,
    next_ip: u8,
    http: reqwest::Client,
    raft: RaftClient,
    observed: Vec<(String, String, String)>,
    step: String,
    began: Instant,
}

impl Script {
    fn new(binary: PathBuf) -> Script {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join("dkron.yml");
        std::fs::write(&config, "reconcileinterval: 2s\n").unwrap();
        Script {
            binary,
            root,
            config,
            servers: BTreeMap::new(),
            next_ip: 10,
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(2))
                .build()
                .unwrap(),
            raft: RaftClient::new(Duration::from_secs(2)),
            observed: Vec::new(),
            step: String::new(),
            began: Instant::now(),
        }
    }

    fn step(&mut self, step: &str) {
        eprintln!(
            "== {step} ({:.1}s into the script)",
            self.began.elapsed().as_secs_f64()
        );
        self.step = step.to_owned();
    }

    fn observe(&mut self, what: &str, value: impl Into<String>) {
        let value = value.into();
        eprintln!("   {what} = {value}");
        self.observed
            .push((self.step.clone(), what.to_owned(), value));
    }

    /// Starts `name` (anew, or again with its data) at a new address, joining the others.
    fn start(&mut self, name: &str) {
        let ip = format!("127.0.77.{}", self.next_ip);
        self.next_ip += 1;
        let joins: Vec<String> = self
            .servers
            .values()
            .filter(|s| s.name != name && s.child.is_some())
            .map(|s| format!("--retry-join={}:{SERF}", s.ip))
            .collect();
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("log"))
            .unwrap();
        let mut command = Command::new(&self.binary);
        command
            .args([
                "agent",
                "--server",
                "--bootstrap-expect=3",
                "--log-level=info",
            ])
            .arg(format!("--config={}", self.config.display()))
            .arg(format!("--node-name={name}"))
            .arg(format!("--bind-addr={ip}:{SERF}"))
            .arg(format!("--advertise-addr={ip}:{SERF}"))
            .arg(format!("--http-addr={ip}:{HTTP}"))
            .arg(format!("--rpc-port={RPC}"))
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .args(&joins)
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log));
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().unwrap();
        let server = self.servers.entry(name.to_owned()).or_insert(Server {
            name: name.to_owned(),
            dir,
            ip: ip.clone(),
            child: None,
        });
        server.ip = ip;
        server.child = Some(child);
    }

    /// Sends `signal` to `name` and waits until it has ended.
    fn stop(&mut self, name: &str, signal: Signal) {
        let server = self.server(name);
        server.signal(signal);
        server.reap();
    }

    /// The first of `names` that does not lead.
    async fn a_follower(&self, names: [&str; 3]) -> String {
        let leader = self.leader().await.expect("a leader");
        names.into_iter().find(|n| *n != leader).unwrap().to_owned()
    }

    fn server(&mut self, name: &str) -> &mut Server {
        self.servers.get_mut(name).unwrap()
    }

    fn ip(&self, name: &str) -> String {
        self.servers[name].ip.clone()
    }

    fn running(&self) -> Vec<String> {
        self.servers
            .values()
            .filter(|s| s.child.is_some())
            .map(|s| s.name.clone())
            .collect()
    }

    async fn get(&self, name: &str, path: &str) -> Option<(u16, String)> {
        let response = self
            .http
            .get(format!("http://{}:{HTTP}{path}", self.ip(name)))
            .send()
            .await
            .ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }

    async fn json(&self, name: &str, path: &str) -> Option<Value> {
        let (code, body) = self.get(name, path).await?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// The running server that says it leads, if exactly one does.
    async fn leader(&self) -> Option<String> {
        let mut leaders = Vec::new();
        for name in self.running() {
            if self.get(&name, "/v1/isleader").await.map(|(c, _)| c) == Some(200) {
                leaders.push(name);
            }
        }
        (leaders.len() == 1).then(|| leaders.pop().unwrap())
    }

    /// The leader's raft voters, by name, sorted; with the address each has there.
    async fn voters(&self) -> Option<BTreeMap<String, String>> {
        let leader = self.leader().await?;
        let configuration = self
            .raft
            .configuration(&format!("{}:{RPC}", self.ip(&leader)))
            .await
            .ok()?;
        Some(
            configuration
                .servers
                .into_iter()
                .filter(|s| s.voter)
                .map(|s| (s.id, s.address))
                .collect(),
        )
    }

    /// The status the leader's serf gives `name` ("alive", "left", "failed", ...).
    async fn member_status(&self, name: &str) -> String {
        let Some(leader) = self.leader().await else {
            return "no leader".into();
        };
        let members = self.json(&leader, "/v1/members").await;
        members
            .as_ref()
            .and_then(Value::as_array)
            .and_then(|m| m.iter().find(|m| m["Name"] == name))
            .map(|m| match m["Status"].as_u64() {
                Some(1) => "alive".to_owned(),
                Some(2) => "leaving".to_owned(),
                Some(3) => "left".to_owned(),
                Some(4) => "failed".to_owned(),
                other => format!("status {other:?}"),
            })
            .unwrap_or_else(|| "not a member".into())
    }

    /// Polls `check` every 200 ms until it returns `Some`, or `bound` passes (`None`).
    async fn within<T>(
        &self,
        bound: Duration,
        mut check: impl AsyncFnMut() -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(value) = check().await {
                return Some(value);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// "yes", or "no within N s".
    fn yes(found: bool, bound: Duration) -> String {
        if found {
            "yes".into()
        } else {
            format!("no within {} s", bound.as_secs())
        }
    }

    /// Every running server names the same leader; observed as "yes".
    async fn observe_led(&mut self, bound: Duration) {
        let led = self
            .within(bound, async || {
                let leader = self.leader().await?;
                for name in self.running() {
                    let named = self.json(&name, "/v1/leader").await?;
                    (named["Name"] == leader.as_str()).then_some(())?;
                }
                Some(())
            })
            .await;
        self.observe(
            "one leader, named by every server",
            Self::yes(led.is_some(), bound),
        );
    }

    /// The leader's voters once they are exactly `want` (observed as `named`, so that a name
    /// the script chose by role does not enter the record), or what they are after `bound`.
    async fn observe_voters(&mut self, want: &[&str], named: &str, bound: Duration) {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        let seen = self
            .within(bound, async || {
                let voters = self.voters().await?;
                voters.keys().eq(want.iter()).then_some(voters)
            })
            .await;
        let value = match seen {
            Some(_) => named.to_owned(),
            None => format!(
                "not {} within {} s: {:?}",
                want.join(","),
                bound.as_secs(),
                self.voters()
                    .await
                    .map(|v| v.into_keys().collect::<Vec<_>>())
            ),
        };
        self.observe("raft voters", value);
    }

    /// Whether the leader's configuration has `name` at its current address within `bound`.
    async fn observe_address(&mut self, name: &str, bound: Duration) {
        let want = format!("{}:{RPC}", self.ip(name));
        let found = self
            .within(bound, async || {
                (self.voters().await?.get(name) == Some(&want)).then_some(())
            })
            .await;
        self.observe(
            "its new address in the configuration",
            Self::yes(found.is_some(), bound),
        );
    }

    /// Writes `job` through the leader.
    async fn write_job(&self, job: &str) {
        let leader = self.leader().await.expect("a leader to write to");
        let response = self
            .http
            .post(format!("http://{}:{HTTP}/v1/jobs", self.ip(&leader)))
            .json(&serde_json::json!({
                "name": job, "schedule": "@every 1h", "executor": "shell",
                "executor_config": { "command": "true" },
            }))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "POST /v1/jobs {job}: {response:?}"
        );
    }

    /// Whether every running server answers `job` within `bound`.
    async fn observe_job_everywhere(&mut self, job: &str, bound: Duration) {
        let found = self
            .within(bound, async || {
                for name in self.running() {
                    let (code, _) = self.get(&name, &format!("/v1/jobs/{job}")).await?;
                    (code == 200).then_some(())?;
                }
                Some(())
            })
            .await;
        self.observe(
            &format!("job {job} on every server"),
            Self::yes(found.is_some(), bound),
        );
    }

    /// The leader's serf status of `name` (`who` in the observation) once it is no longer
    /// alive (or after `bound`).
    async fn observe_gone(&mut self, name: &str, who: &str, bound: Duration) {
        let mut last = String::new();
        let status = self
            .within(bound, async || {
                last = self.member_status(name).await;
                (last != "alive" && last != "no leader").then(|| last.clone())
            })
            .await
            .unwrap_or_else(|| format!("{last} after {} s", bound.as_secs()));
        self.observe(&format!("{who} in the leader's serf"), status);
    }

    /// A server back at a new address with its data: it names the leader, is a voter, the
    /// configuration gets its new address, it has the jobs.
    async fn observe_return(&mut self, name: &str, who: &str, want: &[&str]) {
        self.step(&format!("{who} returns at a new address"));
        self.start(name);
        self.observe_led(Duration::from_secs(60)).await;
        self.observe_voters(want, &want.join(","), Duration::from_secs(60))
            .await;
        self.observe_address(name, Duration::from_secs(30)).await;
        self.observe_job_everywhere("before", Duration::from_secs(30))
            .await;
        let job = format!("after-{}", self.next_ip);
        self.write_job(&job).await;
        let found = self
            .within(Duration::from_secs(30), async || {
                let (code, _) = self.get(name, &format!("/v1/jobs/{job}")).await?;
                (code == 200).then_some(())
            })
            .await;
        self.observe(
            "a job written now is on it",
            Self::yes(found.is_some(), Duration::from_secs(30)),
        );
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for server in self.servers.values() {
            let log = std::fs::read_to_string(server.dir.join("log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            out.push_str(&format!("\n--- {}\n", server.name));
            for line in tail.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// One line of the expectation: the real value, and where the stand-in differs, its note
/// (`value: why`).
struct Expected {
    real: String,
    standin: Option<String>,
}

impl Expected {
    /// The value the stand-in is held to.
    fn standin_value(&self) -> &str {
        match &self.standin {
            Some(note) => note
                .split_once(": ")
                .map_or(note.as_str(), |(value, _)| value),
            None => &self.real,
        }
    }
}

/// The expectation file: per (step, observation), what is expected.
fn expectations(text: &str) -> BTreeMap<(String, String), Expected> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
    {
        let bad = || panic!("{EXPECTED}: not `step: observation = value`: {line}");
        let Some((key, rest)) = line.split_once(" = ") else {
            bad()
        };
        let Some((step, what)) = key.split_once(": ") else {
            bad()
        };
        let (real, standin) = match rest.split_once(" | stand-in: ") {
            Some((real, note)) => {
                let why = note.split_once(": ").map(|(_, why)| why.trim());
                assert!(
                    why.is_some_and(|why| !why.is_empty()),
                    "{EXPECTED}: say why the stand-in differs (`| stand-in: value: why`): {line}"
                );
                (real, Some(note.to_owned()))
            }
            None => (rest, None),
        };
        out.insert(
            (step.to_owned(), what.to_owned()),
            Expected {
                real: real.to_owned(),
                standin,
            },
        );
    }
    out
}

#[tokio::test]
async fn the_stand_in_shows_what_dkron_shows_through_a_membership_script() {
    let (binary, what) = support::dkron::dkron_binary();
    if std::env::var_os("DKRON_BIN").is_none() {
        support::control_plane::build_tools().unwrap_or_else(|error| panic!("{error}"));
    }
    let real = std::env::var_os("DKRON_BIN").is_some();
    eprintln!("Dkron here: {what} ({})", binary.display());
    let mut script = Script::new(binary);
    let s = |n: usize| format!("s{n}");

    script.step("3 servers start");
    for n in 0..3 {
        script.start(&s(n));
    }
    script.observe_led(Duration::from_secs(60)).await;
    script
        .observe_voters(&["s0", "s1", "s2"], "s0,s1,s2", Duration::from_secs(60))
        .await;
    script.write_job("before").await;
    script
        .observe_job_everywhere("before", Duration::from_secs(30))
        .await;

    // A follower leaves through the API, and is read from after its leave.
    let left = script.a_follower(["s2", "s1", "s0"]).await;
    script.step("a follower leaves (POST /v1/leave)");
    let answer = script
        .http
        .post(format!("http://{}:{HTTP}/v1/leave", script.ip(&left)))
        .send()
        .await
        .map(|r| r.status().as_u16().to_string())
        .unwrap_or_else(|error| format!("no answer: {error}"));
    script.observe("POST /v1/leave answers", answer);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for path in ["/v1/jobs", "/v1/leader", "/v1/members"] {
        let answer = script
            .get(&left, path)
            .await
            .map_or("no answer".to_owned(), |(code, _)| code.to_string());
        script.observe(&format!("the left server answers GET {path}"), answer);
    }
    let running = script
        .server(&left)
        .child
        .as_mut()
        .unwrap()
        .try_wait()
        .unwrap()
        .is_none();
    script.observe(
        "the left server's process still runs",
        if running { "yes" } else { "no" },
    );
    script
        .observe_gone(&left, "the left server", Duration::from_secs(30))
        .await;
    let others: Vec<String> = ["s0", "s1", "s2"]
        .iter()
        .filter(|n| **n != left)
        .map(|n| n.to_string())
        .collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    script
        .observe_voters(&others, "the two others", Duration::from_secs(20))
        .await;
    script.stop(&left, Signal::SIGTERM);
    script
        .observe_return(&left, "the follower that left", &["s0", "s1", "s2"])
        .await;

    // A follower SIGKILLed: failed, not removed; then back at a new address.
    let killed = script.a_follower(["s1", "s2", "s0"]).await;
    script.step("a follower is SIGKILLed");
    script.stop(&killed, Signal::SIGKILL);
    script
        .observe_gone(&killed, "the killed server", Duration::from_secs(30))
        .await;
    // Three reconciles later it is still a voter.
    tokio::time::sleep(Duration::from_secs(6)).await;
    script
        .observe_voters(&["s0", "s1", "s2"], "s0,s1,s2", Duration::from_secs(5))
        .await;
    script
        .observe_return(&killed, "the killed follower", &["s0", "s1", "s2"])
        .await;

    script.step("scale 3 -> 5");
    script.start("s3");
    script.start("s4");
    script
        .observe_voters(
            &["s0", "s1", "s2", "s3", "s4"],
            "s0,s1,s2,s3,s4",
            Duration::from_secs(60),
        )
        .await;
    script.observe_led(Duration::from_secs(30)).await;
    script
        .observe_job_everywhere("before", Duration::from_secs(30))
        .await;

    // As a StatefulSet scales down: SIGTERM to the highest ordinals. Dkron leaves on SIGTERM
    // only with `leave_on_terminate`, so the two stay voters, failed, until an operator (or
    // dkron-ha's controller) removes them from raft.
    script.step("scale 5 -> 3 (SIGTERM to s4, then s3)");
    for name in ["s4", "s3"] {
        script.stop(name, Signal::SIGTERM);
        script
            .observe_gone(name, name, Duration::from_secs(30))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let voters = script
        .voters()
        .await
        .map(|v| v.into_keys().collect::<Vec<_>>().join(","));
    script.observe(
        "raft voters three reconciles later",
        voters.unwrap_or_else(|| "no leader".into()),
    );
    script.step("the two are removed from raft (RaftRemovePeerByID on the leader)");
    let leader = script.leader().await.expect("a leader");
    for name in ["s4", "s3"] {
        let removed = script
            .raft
            .remove_peer(&format!("{}:{RPC}", script.ip(&leader)), name)
            .await;
        script.observe(
            &format!("removing {name} answers"),
            match removed {
                Ok(()) => "ok".to_owned(),
                Err(error) => format!("error: {error}"),
            },
        );
    }
    script
        .observe_voters(&["s0", "s1", "s2"], "s0,s1,s2", Duration::from_secs(10))
        .await;

    script.step("the leader is stopped (SIGTERM)");
    let leader = script.leader().await.expect("a leader");
    script.stop(&leader, Signal::SIGTERM);
    let elected = script
        .within(Duration::from_secs(30), async || script.leader().await)
        .await;
    script.observe(
        "another server leads",
        Script::yes(elected.is_some(), Duration::from_secs(30)),
    );
    script
        .observe_gone(&leader, "the stopped leader", Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let voters = script.voters().await.map(|v| v.len());
    script.observe(
        "raft voters three reconciles later",
        voters.map_or("no leader".to_owned(), |n| format!("{n}")),
    );
    script
        .observe_return(&leader, "the stopped leader", &["s0", "s1", "s2"])
        .await;
    eprintln!(
        "the script took {:.1}s",
        script.began.elapsed().as_secs_f64()
    );

    // The observations, as the expectation file writes them.
    let observed: Vec<String> = script
        .observed
        .iter()
        .map(|(step, what, value)| format!("{step}: {what} = {value}"))
        .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXPECTED);
    if real && std::env::var_os("UPDATE_CONFORMANCE").is_some() {
        // Real Dkron's values; a stand-in note stays on a line whose real value did not change.
        let before = expectations(&std::fs::read_to_string(&path).unwrap_or_default());
        let mut text = String::from(
            "# What real Dkron shows through tests/dkron_conformance.rs's script, written by\n# `DKRON_BIN=... UPDATE_CONFORMANCE=1 cargo test --test dkron_conformance`.\n# A line ends in `| stand-in: value: why` where the stand-in cannot match.\n",
        );
        for (step, what, value) in &script.observed {
            text.push_str(&format!("{step}: {what} = {value}"));
            if let Some(Expected {
                real,
                standin: Some(note),
            }) = before.get(&(step.clone(), what.clone()))
                && real == value
            {
                text.push_str(&format!(" | stand-in: {note}"));
            }
            text.push('\n');
        }
        std::fs::write(&path, text).unwrap();
        return;
    }
    let expected = expectations(&std::fs::read_to_string(&path).unwrap());
    let mut differences = Vec::new();
    for (step, what, value) in &script.observed {
        match expected.get(&(step.clone(), what.clone())) {
            None => differences.push(format!("not in {EXPECTED}: {step}: {what} = {value}")),
            Some(expected) => {
                let want = if real {
                    expected.real.as_str()
                } else {
                    expected.standin_value()
                };
                if want != value {
                    differences.push(format!("{step}: {what}: expected {want}, observed {value}"));
                }
            }
        }
    }
    assert_eq!(
        observed.len(),
        expected.len(),
        "the script observed {} things, {EXPECTED} expects {}:\n{}",
        observed.len(),
        expected.len(),
        observed.join("\n")
    );
    assert!(
        differences.is_empty(),
        "{what} differs from {EXPECTED}:\n{}\n\nobserved:\n{}\n{}",
        differences.join("\n"),
        observed.join("\n"),
        script.logs()
    );
}
