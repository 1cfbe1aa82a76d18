//! The two raft calls of Dkron's gRPC API the controller needs: `RaftGetConfiguration` and
//! `RaftRemovePeerByID`, on the port raft shares (6868). The messages are declared here by
//! hand (prost derives; tags from Dkron's `proto/types/v1/dkron.proto`), so no protoc and no
//! generated code: only these three messages are ever used.
//!
//! Dkron renamed its proto package in v4.0.9: the service is `/types.v1.Dkron/...` there and
//! after, `/types.Dkron/...` from v2.1.1 to v4.0.8. A client tries the new path first, falls back
//! on `Unimplemented`, and remembers what worked.

use std::sync::Mutex;
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::Endpoint;

/// Raft's and gRPC's port on Dkron servers (`--rpc-port`).
pub const RPC_PORT: u16 = 6868;

/// `RaftServer` of Dkron's proto.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RaftServer {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub node: String,
    #[prost(string, tag = "3")]
    pub address: String,
    #[prost(bool, tag = "4")]
    pub leader: bool,
    #[prost(bool, tag = "5")]
    pub voter: bool,
    #[prost(string, tag = "6")]
    pub raft_protocol: String,
}

/// `RaftGetConfigurationResponse` of Dkron's proto.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RaftConfiguration {
    #[prost(message, repeated, tag = "1")]
    pub servers: Vec<RaftServer>,
    #[prost(uint64, tag = "2")]
    pub index: u64,
}

/// `RaftRemovePeerByIDRequest` of Dkron's proto.
#[derive(Clone, PartialEq, prost::Message)]
struct RemovePeerRequest {
    #[prost(string, tag = "1")]
    id: String,
}

/// `google.protobuf.Empty`.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// Which proto package a Dkron cluster serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Package {
    /// `types.v1` (Dkron v4.0.9 and later).
    TypesV1,
    /// `types` (Dkron v2.1.1 to v4.0.8).
    Types,
}

impl Package {
    fn path(self, method: &str) -> String {
        match self {
            Package::TypesV1 => format!("/types.v1.Dkron/{method}"),
            Package::Types => format!("/types.Dkron/{method}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot reach Dkron's gRPC at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("Dkron's gRPC at {addr} did not answer {method} within {timeout:?}")]
    Timeout {
        addr: String,
        method: &'static str,
        timeout: Duration,
    },
    /// The server is not the raft leader (raft's `ErrNotLeader`): ask the leader instead.
    #[error("Dkron at {addr} is not the raft leader")]
    NotLeader { addr: String },
    #[error("Dkron at {addr} refused {method}: {status}")]
    Status {
        addr: String,
        method: &'static str,
        status: tonic::Status,
    },
}

/// A client of one Dkron cluster's raft API; it remembers the cluster's proto package.
#[derive(Debug)]
pub struct RaftClient {
    timeout: Duration,
    package: Mutex<Option<Package>>,
}

impl RaftClient {
    /// Every call (connect, send, answer) is bounded by `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            package: Mutex::new(None),
        }
    }

    /// The package detected so far, if any.
    pub fn package(&self) -> Option<Package> {
        *self.package.lock().expect("package lock")
    }

    /// `RaftGetConfiguration` on the server at `addr` (`host:port`). Any server answers with its
    /// own view; only the leader's is authoritative.
    pub async fn configuration(&self, addr: &str) -> Result<RaftConfiguration, GrpcError> {
        self.call(addr, "RaftGetConfiguration", Empty {}).await
    }

    /// `RaftRemovePeerByID` on the leader at `addr`; a follower answers [`GrpcError::NotLeader`].
    pub async fn remove_peer(&self, addr: &str, id: &str) -> Result<(), GrpcError> {
        let _: Empty = self
            .call(
                addr,
                "RaftRemovePeerByID",
                RemovePeerRequest { id: id.to_owned() },
            )
            .await?;
        Ok(())
    }

    async fn call<Req, Resp>(
        &self,
        addr: &str,
        method: &'static str,
        request: Req,
    ) -> Result<Resp, GrpcError>
    where
        Req: prost::Message + Clone + 'static,
        Resp: prost::Message + Default + 'static,
    {
        let timeout = self.timeout;
        let work = async {
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|source| GrpcError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?
                .connect_timeout(timeout)
                .connect()
                .await
                .map_err(|source| GrpcError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?;
            let mut grpc = tonic::client::Grpc::new(channel);
            let candidates = match self.package() {
                Some(known) => vec![known],
                None => vec![Package::TypesV1, Package::Types],
            };
            let mut last = None;
            for package in candidates {
                grpc.ready().await.map_err(|source| GrpcError::Connect {
                    addr: addr.to_owned(),
                    source,
                })?;
                let path = PathAndQuery::try_from(package.path(method))
                    .expect("a method path is a valid URI path");
                let answer = grpc
                    .unary(
                        tonic::Request::new(request.clone()),
                        path,
                        tonic_prost::ProstCodec::<Req, Resp>::default(),
                    )
                    .await;
                match answer {
                    Ok(response) => {
                        *self.package.lock().expect("package lock") = Some(package);
                        return Ok(response.into_inner());
                    }
                    Err(status) if status.code() == tonic::Code::Unimplemented => {
                        last = Some(status);
                    }
                    Err(status) => return Err(refusal(addr, method, status)),
                }
            }
            Err(GrpcError::Status {
                addr: addr.to_owned(),
                method,
                status: last.expect("at least one package was tried"),
            })
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or(Err(GrpcError::Timeout {
                addr: addr.to_owned(),
                method,
                timeout,
            }))
    }
}

/// Raft's `ErrNotLeader` reaches a gRPC client as an `Unknown` status with its text.
fn refusal(addr: &str, method: &'static str, status: tonic::Status) -> GrpcError {
    if status.message().contains("node is not the leader") {
        GrpcError::NotLeader {
            addr: addr.to_owned(),
        }
    } else {
        GrpcError::Status {
            addr: addr.to_owned(),
            method,
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn messages_decode_as_dkron_encodes_them() {
        // RaftGetConfigurationResponse{servers: [{id: "dkron-0", address: "10.0.0.1:6868",
        // leader: true, voter: true}], index: 7}, encoded by hand from the proto's tags.
        let server = [
            &[0x0a, 7][..],
            b"dkron-0",
            &[0x1a, 13],
            b"10.0.0.1:6868",
            &[0x20, 1, 0x28, 1],
        ]
        .concat();
        let bytes = [&[0x0a, server.len() as u8][..], &server, &[0x10, 7]].concat();
        let config = RaftConfiguration::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(config.index, 7);
        assert_eq!(config.servers.len(), 1);
        let s = &config.servers[0];
        assert_eq!(
            (s.id.as_str(), s.address.as_str(), s.leader, s.voter),
            ("dkron-0", "10.0.0.1:6868", true, true)
        );
        let request = RemovePeerRequest {
            id: "dkron-4".into(),
        };
        assert_eq!(
            request.encode_to_vec(),
            [&[0x0a, 7][..], b"dkron-4"].concat()
        );
    }

    #[test]
    fn method_paths_follow_the_package() {
        assert_eq!(
            Package::TypesV1.path("RaftGetConfiguration"),
            "/types.v1.Dkron/RaftGetConfiguration"
        );
        assert_eq!(
            Package::Types.path("RaftRemovePeerByID"),
            "/types.Dkron/RaftRemovePeerByID"
        );
    }

    #[test]
    fn a_followers_refusal_is_not_leader() {
        let status = tonic::Status::unknown("node is not the leader");
        assert!(matches!(
            refusal("a:6868", "RaftRemovePeerByID", status),
            GrpcError::NotLeader { .. }
        ));
        let status = tonic::Status::unknown("id \"x\" was not found in the Raft configuration");
        assert!(matches!(
            refusal("a:6868", "RaftRemovePeerByID", status),
            GrpcError::Status { .. }
        ));
    }

    #[tokio::test]
    async fn nobody_listening_is_a_connect_error_within_the_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let client = RaftClient::new(Duration::from_secs(2));
        let error = client.configuration(&addr).await.expect_err("nobody there");
        assert!(matches!(error, GrpcError::Connect { .. }), "{error}");
        assert_eq!(client.package(), None);
    }
}
