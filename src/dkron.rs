//! The HTTP client for the Dkron endpoints the in-pod runtime needs: `GET /v1/leader` (does the
//! cluster have a leader?), `GET /v1/isleader` (is this server the leader?) and `POST /v1/leave`
//! (leave the cluster before stopping), and `GET /v1/members` (the serf members, for the
//! controller). The raft calls are gRPC: [`grpc`].
//! reqwest without TLS or proxies: Dkron's API is plain HTTP on the pod network.

pub mod grpc;

use std::time::Duration;

/// Dkron's HTTP API port on servers.
pub const HTTP_PORT: u16 = 8080;

/// Answers larger than this are not Dkron's and are refused.
const MAX_RESPONSE_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DkronError {
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("cannot reach Dkron at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no answer from Dkron at {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("Dkron at {addr} sent an answer larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge { addr: String },
}

/// Status code and body of one HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    /// The `X-Total-Count` header (Dkron's list endpoints), when it holds a number.
    pub total_count: Option<u64>,
}

/// What a server said to `GET /v1/leader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderAnswer {
    /// 200 with the leader's serf member, alive and with an `rpc_addr` tag (raft's and gRPC's
    /// `host:port`); `name` is its node name when the body has one.
    Known {
        name: Option<String>,
        rpc_addr: String,
    },
    /// The server runs but knows no leader. Dkron answers 500 with body `null`
    /// (`leaderMember` fails with ErrLeaderNotFound, then the handler still renders `nil`).
    NoLeader,
    /// Any other answer: not evidence either way.
    Unexpected { status: u16 },
}

/// Interprets an answer to `GET /v1/leader` (pure).
pub fn parse_leader_answer(answer: &HttpAnswer) -> LeaderAnswer {
    match answer.status {
        200 => {
            let value: Option<serde_json::Value> = serde_json::from_slice(&answer.body).ok();
            match value {
                // Dkron's `leaderMember` returns the first serf member whose `rpc_addr` tag
                // equals `raft.Leader()`. With no leader that is "", which a member still
                // joining (no tag yet) matches: only an alive member with an address leads.
                Some(serde_json::Value::Object(member)) => {
                    let rpc_addr = member
                        .get("Tags")
                        .and_then(|t| t.get("rpc_addr"))
                        .and_then(|a| a.as_str())
                        .unwrap_or_default();
                    let alive = member
                        .get("Status")
                        .and_then(|s| s.as_u64())
                        .map(MemberStatus::from_code)
                        == Some(MemberStatus::Alive);
                    if rpc_addr.is_empty() || !alive {
                        LeaderAnswer::NoLeader
                    } else {
                        LeaderAnswer::Known {
                            name: member
                                .get("Name")
                                .and_then(|n| n.as_str())
                                .map(str::to_owned),
                            rpc_addr: rpc_addr.to_owned(),
                        }
                    }
                }
                // `null` with 200 cannot name a leader.
                Some(serde_json::Value::Null) => LeaderAnswer::NoLeader,
                _ => LeaderAnswer::Unexpected { status: 200 },
            }
        }
        // 500 is ErrLeaderNotFound; 404 is the handler's `member == nil` branch.
        500 | 404 if is_null_body(&answer.body) => LeaderAnswer::NoLeader,
        status => LeaderAnswer::Unexpected { status },
    }
}

fn is_null_body(body: &[u8]) -> bool {
    let trimmed = String::from_utf8_lossy(body);
    let trimmed = trimmed.trim();
    trimmed.is_empty() || trimmed == "null"
}

/// What a server said to `GET /v1/isleader`: 200 `"I am a leader"`, 404 `"I am a follower"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsLeaderAnswer {
    Leader,
    Follower,
    Unexpected { status: u16 },
}

/// Interprets an answer to `GET /v1/isleader` by status code, as Dkron sets it (pure).
pub fn parse_isleader_answer(answer: &HttpAnswer) -> IsLeaderAnswer {
    match answer.status {
        200 => IsLeaderAnswer::Leader,
        404 => IsLeaderAnswer::Follower,
        status => IsLeaderAnswer::Unexpected { status },
    }
}

/// Serf member status as Dkron's `/v1/members` and `/v1/leader` report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    Alive,
    Leaving,
    Left,
    Failed,
    Unknown,
}

impl MemberStatus {
    /// Serf's numeric status: 1 alive, 2 leaving, 3 left, 4 failed.
    pub fn from_code(code: u64) -> Self {
        match code {
            1 => Self::Alive,
            2 => Self::Leaving,
            3 => Self::Left,
            4 => Self::Failed,
            _ => Self::Unknown,
        }
    }
}

/// One serf member of `GET /v1/members` (serf's `Member` as Go's JSON encoding writes it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SerfMember {
    #[serde(rename = "Name")]
    pub name: String,
    /// The IP serf last heard the member at (Go's `net.IP` encodes as a string).
    #[serde(rename = "Addr", default)]
    pub addr: String,
    /// Its gossip port.
    #[serde(rename = "Port", default)]
    pub port: Option<u16>,
    /// 1 alive, 2 leaving, 3 left, 4 failed.
    #[serde(rename = "Status", default)]
    pub status: u64,
}

/// Interprets an answer to `GET /v1/members` (pure): `None` unless a 200 with a member list.
pub fn parse_members_answer(answer: &HttpAnswer) -> Option<Vec<SerfMember>> {
    (answer.status == 200)
        .then(|| serde_json::from_slice(&answer.body).ok())
        .flatten()
}

/// A client of Dkron's HTTP API; cheap to clone, keeps connections alive between polls.
#[derive(Clone, Debug)]
pub struct DkronClient {
    http: reqwest::Client,
}

impl DkronClient {
    pub fn new() -> Result<Self, DkronError> {
        let http = reqwest::Client::builder()
            // An HTTP_PROXY set for the pod must not route pod-to-pod calls.
            .no_proxy()
            .user_agent(concat!("dkron-ha/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(DkronError::Client)?;
        Ok(Self { http })
    }

    /// `GET /v1/leader` on `host:port`.
    pub async fn leader(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<LeaderAnswer, DkronError> {
        let answer = self.get(host, port, "/v1/leader", timeout).await?;
        Ok(parse_leader_answer(&answer))
    }

    /// `GET /v1/isleader` on `host:port`.
    pub async fn is_leader(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<IsLeaderAnswer, DkronError> {
        let answer = self.get(host, port, "/v1/isleader", timeout).await?;
        Ok(parse_isleader_answer(&answer))
    }

    /// `GET /v1/members` on `host:port`: the serf members that server sees; `None` for an answer
    /// that is not a member list.
    pub async fn members(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Option<Vec<SerfMember>>, DkronError> {
        let answer = self.get(host, port, "/v1/members", timeout).await?;
        Ok(parse_members_answer(&answer))
    }

    /// How many jobs the server at `host:port` has in its store: `GET /v1/jobs?_end=0` answers
    /// none of them and their count in `X-Total-Count`. `None` for an answer without a count.
    pub async fn job_count(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Option<u64>, DkronError> {
        let answer = self.get(host, port, "/v1/jobs?_end=0", timeout).await?;
        Ok(answer.total_count.filter(|_| answer.status == 200))
    }

    /// `POST /v1/leave` on `host:port`: Dkron's agent leaves serf gracefully and stops before it
    /// answers (what `dkron leave` does), so its peers see it `left`, not `failed`.
    pub async fn leave(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<HttpAnswer, DkronError> {
        self.call(reqwest::Method::POST, host, port, "/v1/leave", timeout)
            .await
    }

    /// One `GET` with the whole exchange (connect, send, read the body) bounded by `timeout`.
    pub async fn get(
        &self,
        host: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpAnswer, DkronError> {
        self.call(reqwest::Method::GET, host, port, path, timeout)
            .await
    }

    async fn call(
        &self,
        method: reqwest::Method,
        host: &str,
        port: u16,
        path: &str,
        timeout: Duration,
    ) -> Result<HttpAnswer, DkronError> {
        let addr = format!("{host}:{port}");
        let failed = |source: reqwest::Error| {
            if source.is_timeout() {
                DkronError::Timeout {
                    addr: addr.clone(),
                    timeout,
                }
            } else {
                DkronError::Connect {
                    addr: addr.clone(),
                    source,
                }
            }
        };
        let mut response = self
            .http
            .request(method, format!("http://{addr}{path}"))
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(timeout)
            .send()
            .await
            .map_err(failed)?;
        let status = response.status().as_u16();
        let total_count = response
            .headers()
            .get("X-Total-Count")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(DkronError::TooLarge { addr });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpAnswer {
            status,
            body,
            total_count,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            body: body.as_bytes().to_vec(),
            total_count: None,
        }
    }

    #[test]
    fn leader_known_from_serf_member() {
        let body = r#"{"Name":"dkron-1","Addr":"10.0.0.7","Port":8946,"Tags":{"server":"true","rpc_addr":"10.0.0.7:6868"},"Status":1}"#;
        assert_eq!(
            parse_leader_answer(&answer(200, body)),
            LeaderAnswer::Known {
                name: Some("dkron-1".into()),
                rpc_addr: "10.0.0.7:6868".into(),
            }
        );
    }

    #[test]
    fn members_parse_as_dkron_lists_them() {
        let body = r#"[{"Name":"dkron-0","Addr":"10.0.0.7","Port":8946,"Tags":{"server":"true"},"Status":1,"ProtocolMin":1},
                      {"Name":"dkron-1","Addr":"10.0.0.8","Port":8946,"Tags":{},"Status":4}]"#;
        let members = parse_members_answer(&answer(200, body)).expect("a list");
        assert_eq!(members.len(), 2);
        assert_eq!(
            (
                members[1].name.as_str(),
                members[1].addr.as_str(),
                members[1].status
            ),
            ("dkron-1", "10.0.0.8", 4)
        );
        assert_eq!(parse_members_answer(&answer(500, body)), None);
        assert_eq!(parse_members_answer(&answer(200, "null")), None);
    }

    #[test]
    fn a_member_still_joining_or_not_alive_is_no_leader() {
        // During a cold start Dkron answers 200 naming a member without `rpc_addr`: its
        // `raft.Leader()` is "" and that member's missing tag reads as "" too.
        for body in [
            r#"{"Name":"dkron-2","Addr":"10.0.0.8","Port":8946,"Tags":{"server":"true"},"Status":1}"#,
            r#"{"Name":"dkron-2","Tags":{"server":"true","rpc_addr":""},"Status":1}"#,
            r#"{"Name":"dkron-2","Tags":{"rpc_addr":"10.0.0.8:6868"},"Status":4}"#,
            r#"{"Name":"dkron-2","Tags":{"rpc_addr":"10.0.0.8:6868"}}"#,
        ] {
            assert_eq!(
                parse_leader_answer(&answer(200, body)),
                LeaderAnswer::NoLeader,
                "{body}"
            );
        }
    }

    #[test]
    fn no_leader_is_500_with_null_body() {
        assert_eq!(
            parse_leader_answer(&answer(500, "null")),
            LeaderAnswer::NoLeader
        );
        assert_eq!(
            parse_leader_answer(&answer(404, "null")),
            LeaderAnswer::NoLeader
        );
        assert_eq!(
            parse_leader_answer(&answer(200, "null")),
            LeaderAnswer::NoLeader
        );
    }

    #[test]
    fn other_answers_are_not_evidence() {
        assert_eq!(
            parse_leader_answer(&answer(503, "busy")),
            LeaderAnswer::Unexpected { status: 503 }
        );
        assert_eq!(
            parse_leader_answer(&answer(200, "<html>")),
            LeaderAnswer::Unexpected { status: 200 }
        );
    }

    #[test]
    fn isleader_by_status() {
        assert_eq!(
            parse_isleader_answer(&answer(200, "\"I am a leader\"")),
            IsLeaderAnswer::Leader
        );
        assert_eq!(
            parse_isleader_answer(&answer(404, "\"I am a follower\"")),
            IsLeaderAnswer::Follower
        );
        assert_eq!(
            parse_isleader_answer(&answer(502, "")),
            IsLeaderAnswer::Unexpected { status: 502 }
        );
    }

    /// Serves `canned` once on a loopback port (a transport check of this client, not a Dkron).
    async fn serve_once(canned: Vec<u8>) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let _ = stream.read(&mut request).await;
            if !canned.is_empty() {
                let _ = stream.write_all(&canned).await;
            } else {
                // Never answer.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        port
    }

    fn client() -> DkronClient {
        DkronClient::new().unwrap()
    }

    #[tokio::test]
    async fn client_reads_a_content_length_answer() {
        let port = serve_once(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnull"
                .to_vec(),
        )
        .await;
        let answer = client()
            .leader("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(answer, LeaderAnswer::NoLeader);
    }

    #[tokio::test]
    async fn client_reads_a_chunked_answer() {
        let port = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n\"I am\r\n9\r\n a leader\r\n1\r\n\"\r\n0\r\n\r\n"
                .to_vec(),
        )
        .await;
        let answer = client()
            .get("127.0.0.1", port, "/v1/isleader", Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(answer, self::answer(200, "\"I am a leader\""));
    }

    #[tokio::test]
    async fn an_oversized_answer_is_refused() {
        let mut canned = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_RESPONSE_BYTES + 1
        )
        .into_bytes();
        canned.resize(canned.len() + MAX_RESPONSE_BYTES + 1, b' ');
        let port = serve_once(canned).await;
        let result = client()
            .leader("127.0.0.1", port, Duration::from_secs(5))
            .await;
        assert!(
            matches!(result, Err(DkronError::TooLarge { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let port = serve_once(Vec::new()).await;
        let result = client()
            .is_leader("127.0.0.1", port, Duration::from_millis(300))
            .await;
        assert!(
            matches!(result, Err(DkronError::Timeout { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_server_is_an_error_not_an_answer() {
        // A port just released on loopback: connection refused.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let result = client()
            .leader("127.0.0.1", port, Duration::from_secs(2))
            .await;
        assert!(
            matches!(result, Err(DkronError::Connect { .. })),
            "{result:?}"
        );
    }
}
