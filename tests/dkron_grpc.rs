//! The raft gRPC client (`dkron::grpc`) against a Dkron server on loopback: the stand-in
//! (tests/tools/dkron-standin), or real Dkron when `DKRON_BIN` names one. A single server
//! (`--bootstrap-expect=1`) serving the v4.0.9+ package `types.v1`, and the stand-in serving the
//! older `types` package (Dkron v2.1.1–v4.0.8) the client must fall back to.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dkron_ha::dkron::grpc::{GrpcError, Package, RaftClient};

struct Server {
    child: Child,
    rpc: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        // The whole process group: real Dkron starts its executor plugins as children of its
        // own, which would outlive it.
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// One Dkron server on loopback that bootstraps alone; `package` "types" makes the stand-in
/// serve the old package.
fn server(binary: &std::path::Path, package: Option<&str>) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let [serf, http, rpc] =
        support::control_plane::free_ports().unwrap_or_else(|error| panic!("{error}"));
    let mut command = Command::new(binary);
    command
        .args([
            "agent",
            "--server",
            "--bootstrap-expect=1",
            "--node-name=solo",
        ])
        .arg(format!("--bind-addr=127.0.0.1:{serf}"))
        .arg(format!("--advertise-addr=127.0.0.1:{serf}"))
        .arg(format!("--http-addr=127.0.0.1:{http}"))
        .arg(format!("--rpc-port={rpc}"))
        .arg(format!("--data-dir={}", dir.path().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    if let Some(package) = package {
        command.env("DKRON_STANDIN_GRPC_PACKAGE", package);
    }
    Server {
        child: command.spawn().unwrap(),
        rpc: format!("127.0.0.1:{rpc}"),
        _dir: dir,
    }
}

/// The stand-in, built by tests/tools/build.sh (cached) first.
fn standin() -> std::path::PathBuf {
    support::control_plane::build_tools().unwrap_or_else(|error| panic!("{error}"));
    support::ControlPlane::tool("dkron-standin")
}

/// Asks until the server has elected itself (bounded).
async fn configuration_once_led(
    client: &RaftClient,
    addr: &str,
) -> dkron_ha::dkron::grpc::RaftConfiguration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match client.configuration(addr).await {
            Ok(c) if c.servers.iter().any(|s| s.leader) => return c,
            Ok(_) | Err(GrpcError::Connect { .. }) | Err(GrpcError::Timeout { .. }) => {}
            Err(error) => panic!("{error}"),
        }
        assert!(Instant::now() < deadline, "no leader at {addr} after 60s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_client_reads_the_configuration_and_remembers_the_package() {
    let binary = std::env::var_os("DKRON_BIN")
        .map(Into::into)
        .unwrap_or_else(standin);
    let server = server(&binary, None);
    let client = RaftClient::new(Duration::from_secs(3));
    let configuration = configuration_once_led(&client, &server.rpc).await;
    assert_eq!(configuration.servers.len(), 1, "{configuration:?}");
    let solo = &configuration.servers[0];
    assert_eq!((solo.id.as_str(), solo.voter), ("solo", true));
    assert_eq!(client.package(), Some(Package::TypesV1));
    // An id that is not in the configuration is refused, and the refusal says so.
    let error = client
        .remove_peer(&server.rpc, "nobody")
        .await
        .expect_err("unknown id");
    assert!(
        error
            .to_string()
            .contains("was not found in the Raft configuration"),
        "{error}"
    );
}

#[tokio::test]
async fn the_client_falls_back_to_the_old_package() {
    // Only the stand-in can serve Dkron's pre-v4.0.9 package.
    let server = server(&standin(), Some("types"));
    let client = RaftClient::new(Duration::from_secs(3));
    let configuration = configuration_once_led(&client, &server.rpc).await;
    assert_eq!(configuration.servers[0].id, "solo");
    assert_eq!(client.package(), Some(Package::Types));
    // Remembered: the next call goes straight to the old path and works.
    client.configuration(&server.rpc).await.unwrap();
    assert_eq!(client.package(), Some(Package::Types));
}
