//! The programs the real test nodes run in their pods, in one static executable (the tests put
//! it in images that hold nothing else, no libc either):
//!
//! - `testbed pause`: the pod sandbox (containerd's `sandbox_image`): sleeps until SIGTERM.
//! - `testbed serve --data DIR`: a test workload on :8080. `GET /resolve/NAME` answers the
//!   name's addresses as the pod's resolver gives them, `GET /whoami` asks the API server (the
//!   `kubernetes` Service, by its DNS name) who the pod's ServiceAccount token says it is,
//!   `GET|PUT /files/NAME` reads or writes a file in DIR (a PVC), `GET /boots` lists the starts
//!   recorded in DIR.
//! - invoked as `dkron` (the image's `/usr/local/bin/dkron`): a stand-in for a Dkron server agent
//!   as far as the pod's other containers see one: `GET /v1/leader`, `/v1/isleader`,
//!   `/v1/members`, `/health` and `POST /v1/leave` on :8080. The server whose `--node-name`
//!   ends in `-0` says it is the leader. It prints the arguments it was started with, and
//!   `GET /testbed/pid1` answers the command line of the container's PID 1.
//!
//! Built by the tests' cluster support (tests/support/images.rs) with `+crt-static`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};

const TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
const API: &str = "https://kubernetes.default.svc.cluster.local";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let invoked_as = args
        .first()
        .and_then(|arg0| std::path::Path::new(arg0).file_name())
        .and_then(|name| name.to_str())
        .unwrap_or_default()
        .to_owned();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("start the async runtime")?;
    if invoked_as == "dkron" {
        println!("dkron stand-in started with {:?}", &args[1..]);
        return runtime.block_on(dkron_stand_in(&args[1..]));
    }
    match args.get(1).map(String::as_str) {
        Some("pause") => runtime.block_on(until_terminated()),
        Some("serve") => {
            let data = match args.get(2).map(String::as_str) {
                Some("--data") => args.get(3).map(PathBuf::from),
                _ => None,
            };
            runtime.block_on(serve(data))
        }
        _ => bail!("usage: testbed pause | testbed serve [--data DIR] | dkron agent ..."),
    }
}

async fn until_terminated() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn listen(app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], 8080)))
        .await
        .context("listen on :8080")?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = until_terminated().await;
        })
        .await
        .context("serve")
}

struct Workload {
    data: Option<PathBuf>,
    http: reqwest::Client,
}

async fn serve(data: Option<PathBuf>) -> anyhow::Result<()> {
    if let Some(dir) = &data {
        let boots = dir.join("boots");
        let mut text = std::fs::read_to_string(&boots).unwrap_or_default();
        let pod_ip = std::env::var("POD_IP").unwrap_or_default();
        text.push_str(&format!("{pod_ip}\n"));
        std::fs::write(&boots, text).with_context(|| format!("write {}", boots.display()))?;
    }
    let mut http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
    if let Ok(ca) = std::fs::read(CA) {
        http = http.add_root_certificate(reqwest::Certificate::from_pem(&ca)?);
    }
    let state = Arc::new(Workload {
        data,
        http: http.build()?,
    });
    let app = Router::new()
        .route("/resolve/{name}", get(resolve))
        .route("/whoami", get(whoami))
        .route("/files/{name}", get(read_file).put(write_file))
        .route("/boots", get(boots))
        .with_state(state);
    listen(app).await
}

async fn resolve(Path(name): Path<String>) -> (StatusCode, String) {
    match tokio::net::lookup_host((name.as_str(), 0)).await {
        Ok(addresses) => {
            let mut ips: Vec<String> = addresses.map(|a| a.ip().to_string()).collect();
            ips.sort();
            ips.dedup();
            (StatusCode::OK, ips.join("\n"))
        }
        Err(error) => (StatusCode::BAD_GATEWAY, format!("resolve {name}: {error}")),
    }
}

async fn whoami(State(state): State<Arc<Workload>>) -> (StatusCode, String) {
    let token = match std::fs::read_to_string(TOKEN) {
        Ok(token) => token,
        Err(error) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{TOKEN}: {error}"),
            );
        }
    };
    let review = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "SelfSubjectReview",
    });
    let response = state
        .http
        .post(format!(
            "{API}/apis/authentication.k8s.io/v1/selfsubjectreviews"
        ))
        .bearer_auth(token.trim())
        .json(&review)
        .send()
        .await;
    match response {
        Ok(response) => {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            let code = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            (code, body)
        }
        Err(error) => (StatusCode::BAD_GATEWAY, format!("{API}: {error:#}")),
    }
}

fn data_file(state: &Workload, name: &str) -> Result<PathBuf, (StatusCode, String)> {
    match &state.data {
        Some(dir) if !name.contains('/') && !name.starts_with('.') => Ok(dir.join(name)),
        Some(_) => Err((StatusCode::BAD_REQUEST, format!("bad file name {name}"))),
        None => Err((StatusCode::NOT_FOUND, "started without --data".into())),
    }
}

async fn read_file(
    State(state): State<Arc<Workload>>,
    Path(name): Path<String>,
) -> (StatusCode, String) {
    match data_file(&state, &name) {
        Ok(path) => match std::fs::read_to_string(&path) {
            Ok(text) => (StatusCode::OK, text),
            Err(error) => (
                StatusCode::NOT_FOUND,
                format!("{}: {error}", path.display()),
            ),
        },
        Err(answer) => answer,
    }
}

async fn write_file(
    State(state): State<Arc<Workload>>,
    Path(name): Path<String>,
    body: String,
) -> (StatusCode, String) {
    let path = match data_file(&state, &name) {
        Ok(path) => path,
        Err(answer) => return answer,
    };
    let written = std::fs::File::create(&path).and_then(|mut file| {
        use std::io::Write as _;
        file.write_all(body.as_bytes())?;
        file.sync_all()
    });
    match written {
        Ok(()) => (StatusCode::OK, String::new()),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {error}", path.display()),
        ),
    }
}

async fn boots(State(state): State<Arc<Workload>>) -> (StatusCode, String) {
    read_file(State(state), Path("boots".to_owned())).await
}

struct StandIn {
    node_name: String,
    leader: bool,
}

async fn dkron_stand_in(args: &[String]) -> anyhow::Result<()> {
    let node_name = args
        .iter()
        .find_map(|arg| arg.strip_prefix("--node-name="))
        .map(str::to_owned)
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| "dkron-0".to_owned());
    let leader = node_name.ends_with("-0");
    let state = Arc::new(StandIn { node_name, leader });
    let app = Router::new()
        .route("/v1/leader", get(leader_member))
        .route("/v1/isleader", get(is_leader))
        .route("/v1/members", get(members))
        .route("/v1/leave", post(|| async { "[]" }))
        .route("/health", get(|| async { "ok" }))
        // Not Dkron's: what runs as PID 1 of the container (the injected `wrap`).
        .route("/testbed/pid1", get(pid1))
        .with_state(state);
    listen(app).await
}

async fn pid1() -> String {
    let cmdline = std::fs::read("/proc/1/cmdline").unwrap_or_default();
    String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .trim()
        .to_owned()
}

fn member(state: &StandIn) -> serde_json::Value {
    let ip = std::env::var("POD_IP").unwrap_or_else(|_| "127.0.0.1".into());
    serde_json::json!({
        "Name": state.node_name,
        "Addr": ip,
        "Port": 8946,
        "Tags": { "role": "dkron", "server": "true", "rpc_addr": format!("{ip}:6868") },
        "Status": 1,
    })
}

async fn leader_member(State(state): State<Arc<StandIn>>) -> (StatusCode, String) {
    if state.leader {
        (StatusCode::OK, member(&state).to_string())
    } else {
        (StatusCode::INTERNAL_SERVER_ERROR, "null".into())
    }
}

async fn is_leader(State(state): State<Arc<StandIn>>) -> (StatusCode, &'static str) {
    if state.leader {
        (StatusCode::OK, "\"I am a leader\"")
    } else {
        (StatusCode::NOT_FOUND, "\"I am a follower\"")
    }
}

async fn members(State(state): State<Arc<StandIn>>) -> String {
    serde_json::Value::Array(vec![member(&state)]).to_string()
}
