//! A real Kubernetes control plane for tests: etcd, kube-apiserver and kube-controller-manager,
//! built from the Go modules pinned in `tests/tools/` and started once per test binary on free
//! loopback ports, with RBAC on and ServiceAccount tokens signed by a key generated here.
//!
//! No component outlives the test binary, however it ends (panic, abort, SIGKILL): each one runs
//! under a `sh` watchdog that kills it when its stdin pipe, held by this process, reaches EOF.
//! The OS closes that pipe when the process exits, so this needs no destructor (statics are
//! never dropped). A janitor watchdog removes the temp dir the same way.

use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// Runs `"$@"` until this process lets go of the watchdog's stdin, then SIGKILLs it. The
/// watchdog also exits (with the component's status) when the component dies on its own, so a
/// crash is visible through `Child::try_wait`. It ignores HUP/INT/TERM so that only EOF or the
/// component's end stops it; a Ctrl-C still reaches the component itself.
const WATCHDOG: &str = r#"exec 3<&0 </dev/null
"$@" 3<&- &
component=$!
trap '' HUP INT TERM
{ cat <&3 >/dev/null; kill -KILL "$component" 2>/dev/null; } &
watcher=$!
exec 3<&-
wait "$component"
status=$?
kill -KILL "$watcher" 2>/dev/null
exit "$status""#;

/// Removes the temp dir once this process is gone (after the components' watchdogs, which kill
/// at once), unless a `keep` file asks to leave it for debugging.
const JANITOR: &str = r#"trap '' HUP INT TERM
cat >/dev/null
sleep 1
[ -e "$1/keep" ] || rm -rf "$1""#;

/// Set to keep the control plane's dir (logs, certs, etcd data) after the test binary exits.
const KEEP_ENV: &str = "DKRON_HA_KEEP_CONTROL_PLANE";
const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const CONTROLLERS: &[&str] = &[
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "clusterrole-aggregation-controller",
    "namespace-controller",
    "garbage-collector-controller",
    "statefulset-controller",
    "replicaset-controller",
    "deployment-controller",
    "job-controller",
    "disruption-controller",
    "endpointslice-controller",
    "persistentvolumeclaim-protection-controller",
    "persistentvolume-protection-controller",
];
const START_ATTEMPTS: usize = 3;

/// What a control plane other than the shared loopback one needs (the real nodes' cluster).
pub struct Options {
    /// Where kube-apiserver listens and what it advertises (the `kubernetes` Service's endpoint
    /// unless that is loopback); etcd stays on loopback.
    pub address: Ipv4Addr,
    /// Added to kube-apiserver's flags (a flag given twice: the last wins).
    pub apiserver_args: Vec<String>,
    /// Controllers to run besides the default set.
    pub controllers: Vec<&'static str>,
    /// Added to kube-controller-manager's flags.
    pub controller_manager_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            address: Ipv4Addr::LOCALHOST,
            apiserver_args: Vec::new(),
            controllers: Vec::new(),
            controller_manager_args: Vec::new(),
        }
    }
}

pub struct ControlPlane {
    /// Admin kubeconfig (client certificate in `system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://ADDRESS:PORT` (loopback unless [`Options::address`] says otherwise)
    pub server: String,
    /// Temp dir with logs (`<component>.log`), certs and etcd data; removed after the test
    /// binary exits unless `DKRON_HA_KEEP_CONTROL_PLANE` is set.
    pub dir: PathBuf,
    ca_pem: String,
    /// Signs further certificates (node credentials) with the control plane's CA.
    ca: CertifiedIssuer<'static, KeyPair>,
    /// Never read: holding the watchdogs' stdin pipes is what keeps the components alive.
    _processes: Vec<Supervised>,
}

impl ControlPlane {
    /// Starts etcd + kube-apiserver + kube-controller-manager once per test binary (blocking, std only,
    /// safe to call from any tokio runtime or thread); later calls return the same instance.
    /// Builds the binaries first by running tests/tools/build.sh (cached) if they are missing.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();
        let started = SHARED.get_or_init(|| {
            // Its own thread, so that its runtime never nests inside the caller's.
            std::thread::spawn(|| start_with_retries(&Options::default()))
                .join()
                .unwrap_or_else(|panic| {
                    let message = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)");
                    Err(format!(
                        "the control plane's start-up thread panicked: {message}"
                    ))
                })
        });
        match started {
            Ok(control_plane) => control_plane,
            Err(message) => panic!("{message}"),
        }
    }

    /// Starts a control plane of its own with `options` (blocking; never call it on a tokio
    /// runtime's thread). It lives until the returned value is dropped or this process exits.
    pub fn start(options: &Options) -> Result<ControlPlane, String> {
        start_with_retries(options)
    }

    /// The CA certificate (PEM) that signed the API server's and every client's certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A client certificate and key (PEM) from the control plane's CA, for `common_name` in
    /// groups `organizations` (e.g. a kubelet: `system:node:NAME` in `system:nodes`).
    pub fn client_certificate(
        &self,
        common_name: &str,
        organizations: &[&str],
    ) -> Result<(String, String), String> {
        let tls = |error: rcgen::Error| format!("client certificate for {common_name}: {error}");
        let key = KeyPair::generate().map_err(tls)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for organization in organizations {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *organization);
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.ca).map_err(tls)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A kubeconfig (JSON) for this API server with a client certificate.
    pub fn certificate_kubeconfig(&self, user: &str, cert_pem: &str, key_pem: &str) -> String {
        let credentials = serde_json::json!({
            "client-certificate-data": base64_pem(cert_pem),
            "client-key-data": base64_pem(key_pem),
        });
        let kubeconfig = kubeconfig_json(&self.server, &self.ca_pem, user, credentials, "default");
        serde_json::to_string_pretty(&kubeconfig).expect("kubeconfig serializes")
    }

    /// A fresh admin client (system:masters). Create one per test: each #[tokio::test] has its own runtime.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("read admin kubeconfig");
        client_from(kubeconfig).await
    }

    /// Creates a new namespace named `<prefix>-<random suffix>` and returns its name.
    /// Returns once the namespace's `default` ServiceAccount exists, as in a real cluster a
    /// moment after creation, so Pods and TokenRequests for it work at once.
    pub async fn namespace(&self, prefix: &str) -> String {
        let client = self.client().await;
        let request = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &request)
            .await
            .unwrap_or_else(|error| panic!("create namespace {prefix}-*: {error}"));
        let name = created
            .metadata
            .name
            .expect("the apiserver names a generateName namespace");
        let service_accounts = Api::<ServiceAccount>::namespaced(client, &name);
        poll(Duration::from_secs(60), async || {
            match service_accounts.get_opt("default").await {
                Ok(Some(_)) => Ok(Some(())),
                Ok(None) => Ok(None),
                Err(error) => Err(error.to_string()),
            }
        })
        .await
        .unwrap_or_else(|error| panic!("default ServiceAccount in namespace {name}: {error}"));
        name
    }

    /// A client authenticated as ServiceAccount `sa` in `ns` with a token from the TokenRequest API (real RBAC applies).
    /// Creates the ServiceAccount if it does not exist. The client's default namespace is `ns`.
    pub async fn service_account_client(&self, ns: &str, sa: &str) -> kube::Client {
        let config = self.service_account_config(ns, sa).await;
        kube::Client::try_from(config).expect("build ServiceAccount client")
    }

    /// kube::Config for the same service account token (for code under test that takes a Config).
    pub async fn service_account_config(&self, ns: &str, sa: &str) -> kube::Config {
        let kubeconfig = self.service_account_kubeconfig_json(ns, sa).await;
        let kubeconfig: Kubeconfig = serde_json::from_value(kubeconfig).expect("valid kubeconfig");
        config_from(kubeconfig).await
    }

    /// A kubeconfig file for the same service account token, for processes under test.
    pub async fn service_account_kubeconfig(&self, ns: &str, sa: &str) -> PathBuf {
        let kubeconfig = self.service_account_kubeconfig_json(ns, sa).await;
        let path = self.dir.join(format!("kubeconfig-{ns}-{sa}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&kubeconfig).unwrap())
            .unwrap_or_else(|error| panic!("write {}: {error}", path.display()));
        path
    }

    async fn service_account_kubeconfig_json(&self, ns: &str, sa: &str) -> serde_json::Value {
        let service_accounts = Api::<ServiceAccount>::namespaced(self.client().await, ns);
        let exists = service_accounts
            .get_opt(sa)
            .await
            .unwrap_or_else(|error| panic!("get ServiceAccount {ns}/{sa}: {error}"))
            .is_some();
        if !exists {
            let account = ServiceAccount {
                metadata: ObjectMeta {
                    name: Some(sa.to_owned()),
                    ..ObjectMeta::default()
                },
                ..ServiceAccount::default()
            };
            match service_accounts
                .create(&PostParams::default(), &account)
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => panic!("create ServiceAccount {ns}/{sa}: {error}"),
            }
        }
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..TokenRequestSpec::default()
            }),
            ..TokenRequest::default()
        };
        let token = service_accounts
            .create_token_request(sa, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|error| panic!("TokenRequest for ServiceAccount {ns}/{sa}: {error}"))
            .status
            .and_then(|status| status.token)
            .unwrap_or_else(|| panic!("no token in the TokenRequest status for {ns}/{sa}"));
        let user = serde_json::json!({ "token": token });
        kubeconfig_json(&self.server, &self.ca_pem, &format!("{ns}-{sa}"), user, ns)
    }

    /// The path to a binary from the tools cache (~/.cache/dkron-ha/tools/bin) (e.g. "kube-apiserver").
    pub fn tool(name: &str) -> PathBuf {
        xtask::tools_cache().join("bin").join(name)
    }
}

async fn config_from(kubeconfig: Kubeconfig) -> kube::Config {
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube::Config from kubeconfig")
}

async fn client_from(kubeconfig: Kubeconfig) -> kube::Client {
    kube::Client::try_from(config_from(kubeconfig).await).expect("build kube client")
}

fn kubeconfig_json(
    server: &str,
    ca_pem: &str,
    user_name: &str,
    user: serde_json::Value,
    namespace: &str,
) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "dkron-ha-test",
            "cluster": { "server": server, "certificate-authority-data": base64_pem(ca_pem) },
        }],
        "users": [{ "name": user_name, "user": user }],
        "contexts": [{
            "name": "dkron-ha-test",
            "context": { "cluster": "dkron-ha-test", "user": user_name, "namespace": namespace },
        }],
        "current-context": "dkron-ha-test",
    })
}

fn base64_pem(pem: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(pem)
}

/// A process under a watchdog (see [`WATCHDOG`]); dropping it ends the process.
pub struct Supervised {
    pub name: String,
    pub log: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Supervised {
    /// Starts `program args` under the watchdog, with stdout and stderr going to `log`.
    pub fn start(
        name: &str,
        program: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Self, String> {
        let out =
            File::create(&log).map_err(|error| format!("create {}: {error}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|error| format!("{name} log: {error}"))?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG)
            .arg("sh")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|error| format!("start {name} ({}): {error}", program.display()))?;
        Ok(Self::adopt(name, log, child))
    }

    /// The pid of the watchdog's `sh` (the component is its child).
    pub fn watchdog_pid(&self) -> u32 {
        self.child.id()
    }

    /// The janitor that removes `dir` after this process exits (see [`JANITOR`]).
    fn janitor(dir: &Path) -> Result<Self, String> {
        let child = Command::new("sh")
            .arg("-c")
            .arg(JANITOR)
            .arg("sh")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| format!("start the temp dir janitor: {error}"))?;
        // It writes nothing, so it has no log.
        Ok(Self::adopt("janitor", PathBuf::new(), child))
    }

    /// Adopts `child`, whose stdin pipe keeps it alive (a watchdog or a janitor of its own).
    pub fn adopt(name: &str, log: PathBuf, mut child: Child) -> Self {
        let stdin = child.stdin.take();
        Self {
            name: name.to_owned(),
            log,
            child,
            stdin,
        }
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        format!(
            "--- last {} lines of {} ---\n{}",
            tail.len(),
            self.log.display(),
            tail.join("\n")
        )
    }

    /// An error about this process, with its exit status if it died and the tail of its log.
    pub fn failure(&mut self, what: &str) -> String {
        let status = match self.exited() {
            Some(status) => format!(" ({} exited: {status})", self.name),
            None => String::new(),
        };
        format!("{what}{status}\n{}", self.log_tail())
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

fn start_with_retries(options: &Options) -> Result<ControlPlane, String> {
    build_tools()?;
    let mut attempt = 1;
    loop {
        let started = Instant::now();
        match start(options) {
            Ok(control_plane) => {
                eprintln!(
                    "control plane ready in {:.1}s: {} (dir {})",
                    started.elapsed().as_secs_f64(),
                    control_plane.server,
                    control_plane.dir.display()
                );
                return Ok(control_plane);
            }
            // Ports are picked free, then released for the component to bind: another process
            // can take one in between. Only that failure is worth another try.
            Err(error) if attempt < START_ATTEMPTS && error.contains("address already in use") => {
                eprintln!("control plane start attempt {attempt} lost a port race, retrying");
                attempt += 1;
            }
            Err(error) => return Err(format!("the test control plane did not start: {error}")),
        }
    }
}

/// Runs tests/tools/build.sh, which rebuilds a binary only when it is missing or its pinned
/// go.mod/go.sum changed; on a warm cache it only hashes two files per module.
pub fn build_tools() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .stdout(Stdio::null())
        .status()
        .map_err(|error| format!("run {}: {error}", script.display()))?;
    if !status.success() {
        return Err(format!(
            "{} failed ({status}); it needs Go and network access to the Go module proxy on first run",
            script.display()
        ));
    }
    for tool in ["etcd", "kube-apiserver", "kube-controller-manager"] {
        let path = ControlPlane::tool(tool);
        if !path.is_file() {
            return Err(format!(
                "{} did not produce {}",
                script.display(),
                path.display()
            ));
        }
    }
    Ok(())
}

fn start(options: &Options) -> Result<ControlPlane, String> {
    let dir = tempfile::Builder::new()
        .prefix("dkron-ha-control-plane-")
        .tempdir()
        .map_err(|error| format!("create temp dir: {error}"))?
        .keep();
    let mut processes = vec![Supervised::janitor(&dir)?];
    if std::env::var_os(KEEP_ENV).is_some() {
        keep(&dir);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("start-up runtime: {error}"))?;
    let started = runtime.block_on(start_components(&dir, options, &mut processes));
    match started {
        Ok((server, pki, kubeconfig)) => Ok(ControlPlane {
            kubeconfig,
            server,
            dir,
            ca_pem: pki.ca_pem,
            ca: pki.ca,
            _processes: processes,
        }),
        Err(error) => {
            // Leave the logs for whoever reads the error, then stop the components before the
            // janitor (first in `processes`) is released.
            keep(&dir);
            while let Some(process) = processes.pop() {
                drop(process);
            }
            Err(format!("{error}\n(logs in {})", dir.display()))
        }
    }
}

fn keep(dir: &Path) {
    let _ = fs::write(dir.join("keep"), "");
}

/// Starts the three components in order, each once its dependency is ready, and returns the
/// server URL, the PKI and the admin kubeconfig's path.
async fn start_components(
    dir: &Path,
    options: &Options,
    processes: &mut Vec<Supervised>,
) -> Result<(String, Pki, PathBuf), String> {
    let address = options.address;
    let pki = Pki::write(dir, address)?;
    let [etcd_port, etcd_peer_port, apiserver_port] = free_ports()?;
    let http = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(pki.ca_pem.as_bytes())
                .map_err(|error| format!("CA for the readiness client: {error}"))?,
        )
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|error| format!("readiness client: {error}"))?;

    let etcd_url = format!("http://127.0.0.1:{etcd_port}");
    let etcd_peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
    let etcd_args = [
        "--name=default".to_owned(),
        format!("--data-dir={}", dir.join("etcd").display()),
        format!("--listen-client-urls={etcd_url}"),
        format!("--advertise-client-urls={etcd_url}"),
        format!("--listen-peer-urls={etcd_peer_url}"),
        format!("--initial-advertise-peer-urls={etcd_peer_url}"),
        format!("--initial-cluster=default={etcd_peer_url}"),
        // Throwaway data: durability only costs time.
        "--unsafe-no-fsync=true".to_owned(),
    ];
    processes.push(Supervised::start(
        "etcd",
        &ControlPlane::tool("etcd"),
        &etcd_args,
        dir.join("etcd.log"),
    )?);
    let health = format!("{etcd_url}/health");
    wait_ready(
        processes,
        "etcd /health",
        Duration::from_secs(60),
        async || {
            let ok = match http.get(&health).send().await {
                Ok(response) => response
                    .text()
                    .await
                    .unwrap_or_default()
                    .contains("\"true\""),
                Err(_) => false,
            };
            Ok(ok.then_some(()))
        },
    )
    .await?;

    let server = format!("https://{address}:{apiserver_port}");
    let kubeconfig = dir.join("kubeconfig");
    let admin = serde_json::json!({
        "client-certificate-data": base64_pem(&pki.admin_cert_pem),
        "client-key-data": base64_pem(&pki.admin_key_pem),
    });
    let kubeconfig_text = kubeconfig_json(&server, &pki.ca_pem, "admin", admin, "default");
    let kubeconfig_text =
        serde_json::to_string_pretty(&kubeconfig_text).expect("kubeconfig serializes");
    fs::write(&kubeconfig, kubeconfig_text)
        .map_err(|error| format!("write {}: {error}", kubeconfig.display()))?;

    let path = |file: &str| dir.join(file).display().to_string();
    let mut apiserver_args = vec![
        format!("--etcd-servers={etcd_url}"),
        format!("--bind-address={address}"),
        format!("--advertise-address={address}"),
        format!("--secure-port={apiserver_port}"),
        format!("--cert-dir={}", path("apiserver-certs")),
        format!("--tls-cert-file={}", path("apiserver.crt")),
        format!("--tls-private-key-file={}", path("apiserver.key")),
        format!("--client-ca-file={}", path("ca.crt")),
        "--authorization-mode=RBAC".to_owned(),
        format!("--service-account-issuer={SERVICE_ACCOUNT_ISSUER}"),
        format!("--service-account-key-file={}", path("sa.pub")),
        format!("--service-account-signing-key-file={}", path("sa.key")),
        "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
        "--allow-privileged=true".to_owned(),
        "--profiling=false".to_owned(),
    ];
    if address.is_loopback() {
        // The `kubernetes` Endpoints may not hold a loopback address.
        apiserver_args.push("--endpoint-reconciler-type=none".to_owned());
    } else {
        // Off loopback there may be kubelets: `logs` and `exec` call them with this identity.
        apiserver_args.push(format!(
            "--kubelet-client-certificate={}",
            path("admin.crt")
        ));
        apiserver_args.push(format!("--kubelet-client-key={}", path("admin.key")));
    }
    // A flag in the options replaces the default (list flags such as --authorization-mode
    // would otherwise add up).
    let flag = |arg: &String| arg.split('=').next().unwrap_or_default().to_owned();
    let overridden: Vec<String> = options.apiserver_args.iter().map(flag).collect();
    apiserver_args.retain(|arg| !overridden.contains(&flag(arg)));
    apiserver_args.extend(options.apiserver_args.iter().cloned());
    processes.push(Supervised::start(
        "kube-apiserver",
        &ControlPlane::tool("kube-apiserver"),
        &apiserver_args,
        dir.join("kube-apiserver.log"),
    )?);
    let readyz = format!("{server}/readyz");
    wait_ready(
        processes,
        "kube-apiserver /readyz",
        Duration::from_secs(240),
        async || {
            let ok = match http.get(&readyz).send().await {
                Ok(response) => response.status().is_success(),
                Err(_) => false,
            };
            Ok(ok.then_some(()))
        },
    )
    .await?;

    let controllers: Vec<&str> = CONTROLLERS
        .iter()
        .chain(&options.controllers)
        .copied()
        .collect();
    let mut controller_manager_args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        format!("--controllers={}", controllers.join(",")),
        "--leader-elect=false".to_owned(),
        format!("--root-ca-file={}", path("ca.crt")),
        format!("--service-account-private-key-file={}", path("sa.key")),
        // Nothing scrapes it; not listening means no port to race for.
        "--secure-port=0".to_owned(),
        "--profiling=false".to_owned(),
    ];
    controller_manager_args.extend(options.controller_manager_args.iter().cloned());
    processes.push(Supervised::start(
        "kube-controller-manager",
        &ControlPlane::tool("kube-controller-manager"),
        &controller_manager_args,
        dir.join("kube-controller-manager.log"),
    )?);
    let admin_client =
        client_from(Kubeconfig::read_from(&kubeconfig).map_err(|error| error.to_string())?).await;
    let service_accounts = Api::<ServiceAccount>::namespaced(admin_client, "default");
    wait_ready(
        processes,
        "kube-controller-manager (the default ServiceAccount in namespace default)",
        Duration::from_secs(180),
        async || match service_accounts.get_opt("default").await {
            Ok(found) => Ok(found.map(|_| ())),
            Err(error) => Err(error.to_string()),
        },
    )
    .await?;

    Ok((server, pki, kubeconfig))
}

/// Polls `ready` until it yields a value, failing as soon as the last started process dies or
/// `timeout` passes, with that process's log tail in the error.
pub async fn wait_ready(
    processes: &mut [Supervised],
    what: &str,
    timeout: Duration,
    mut ready: impl AsyncFnMut() -> Result<Option<()>, String>,
) -> Result<(), String> {
    let process = processes.last_mut().expect("a process was just started");
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    loop {
        if process.exited().is_some() {
            return Err(process.failure(&format!("{what}: the process died")));
        }
        match ready().await {
            Ok(Some(())) => return Ok(()),
            Ok(None) => {}
            Err(error) => last_error = error,
        }
        if Instant::now() > deadline {
            let detail = if last_error.is_empty() {
                String::new()
            } else {
                format!(" (last error: {last_error})")
            };
            return Err(process.failure(&format!(
                "{what}: not ready after {}s{detail}",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Polls `check` every 250ms until it yields a value, errs, or `timeout` passes.
pub async fn poll<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<Option<T>, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!("not there after {}s", timeout.as_secs()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Distinct free loopback ports: all listeners are held until every port is picked.
pub fn free_ports<const N: usize>() -> Result<[u16; N], String> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("pick a free loopback port: {error}"))?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener
            .local_addr()
            .map_err(|error| format!("pick a free loopback port: {error}"))?
            .port();
    }
    Ok(ports)
}

/// The control plane's keys and certificates (ECDSA P-256), written to `dir`.
struct Pki {
    ca_pem: String,
    ca: CertifiedIssuer<'static, KeyPair>,
    admin_cert_pem: String,
    admin_key_pem: String,
}

impl Pki {
    fn write(dir: &Path, address: Ipv4Addr) -> Result<Self, String> {
        let tls = |error: rcgen::Error| format!("generate test PKI: {error}");
        let ca_key = KeyPair::generate().map_err(tls)?;
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "dkron-ha test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(tls)?;

        let apiserver_key = KeyPair::generate().map_err(tls)?;
        let mut apiserver_params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ])
        .map_err(tls)?;
        apiserver_params.subject_alt_names.extend([
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress([10, 0, 0, 1].into()),
        ]);
        if !address.is_loopback() {
            apiserver_params
                .subject_alt_names
                .push(SanType::IpAddress(address.into()));
        }
        apiserver_params
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        apiserver_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let apiserver_cert = apiserver_params
            .signed_by(&apiserver_key, &ca)
            .map_err(tls)?;

        let admin_key = KeyPair::generate().map_err(tls)?;
        let mut admin_params = CertificateParams::default();
        admin_params
            .distinguished_name
            .push(DnType::CommonName, "dkron-ha-test-admin");
        admin_params
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin_params.signed_by(&admin_key, &ca).map_err(tls)?;

        let service_account_key = KeyPair::generate().map_err(tls)?;

        let pki = Self {
            ca_pem: ca.pem(),
            ca,
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        };
        let files = [
            ("ca.crt", pki.ca_pem.clone()),
            ("apiserver.crt", apiserver_cert.pem()),
            ("apiserver.key", apiserver_key.serialize_pem()),
            ("admin.crt", pki.admin_cert_pem.clone()),
            ("admin.key", pki.admin_key_pem.clone()),
            ("sa.key", service_account_key.serialize_pem()),
            ("sa.pub", service_account_key.public_key_pem()),
        ];
        for (name, contents) in files {
            let path = dir.join(name);
            fs::write(&path, contents)
                .map_err(|error| format!("write {}: {error}", path.display()))?;
        }
        Ok(pki)
    }
}
