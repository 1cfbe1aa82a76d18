//! A tiny HTTP client for the two Dkron endpoints the in-pod runtime needs: `GET /v1/leader`
//! (does the cluster have a leader?) and `GET /v1/isleader` (is this server the leader?).
//!
//! Plain HTTP/1.1 over a tokio `TcpStream` with `Connection: close`: the answers are a few hundred
//! bytes, so a full client stack would only add dependencies.

use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Dkron's HTTP API port on servers.
pub const HTTP_PORT: u16 = 8080;

/// Answers larger than this are not Dkron's and are refused.
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum DkronError {
    #[error("cannot reach Dkron at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from Dkron at {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("Dkron at {addr} sent a malformed HTTP answer: {reason}")]
    Malformed { addr: String, reason: String },
}

/// Status code and body of one HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// What a server said to `GET /v1/leader`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderAnswer {
    /// 200 with the leader's serf member; `name` is its node name when the body has one.
    Known { name: Option<String> },
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
                Some(serde_json::Value::Object(member)) => LeaderAnswer::Known {
                    name: member
                        .get("Name")
                        .and_then(|n| n.as_str())
                        .map(str::to_owned),
                },
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

/// `GET /v1/leader` on `host:port`.
pub async fn leader(host: &str, port: u16, timeout: Duration) -> Result<LeaderAnswer, DkronError> {
    let answer = get(host, port, "/v1/leader", timeout).await?;
    Ok(parse_leader_answer(&answer))
}

/// `GET /v1/isleader` on `host:port`.
pub async fn is_leader(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<IsLeaderAnswer, DkronError> {
    let answer = get(host, port, "/v1/isleader", timeout).await?;
    Ok(parse_isleader_answer(&answer))
}

/// One `GET` with the whole exchange (connect, send, read) bounded by `timeout`.
pub async fn get(
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<HttpAnswer, DkronError> {
    let addr = format!("{host}:{port}");
    match tokio::time::timeout(timeout, exchange(&addr, host, path)).await {
        Ok(result) => result,
        Err(_) => Err(DkronError::Timeout { addr, timeout }),
    }
}

async fn exchange(addr: &str, host: &str, path: &str) -> Result<HttpAnswer, DkronError> {
    let connect_error = |source| DkronError::Connect {
        addr: addr.to_owned(),
        source,
    };
    let mut stream = TcpStream::connect(addr).await.map_err(connect_error)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: dkron-ha/{}\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
        crate::VERSION
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(connect_error)?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .await
        .map_err(connect_error)?;
    parse_http_response(&raw).map_err(|reason| DkronError::Malformed {
        addr: addr.to_owned(),
        reason,
    })
}

/// Parses a complete HTTP/1.x response read until the server closed the connection (pure).
/// Handles `Content-Length`, `Transfer-Encoding: chunked` and bodies delimited by close.
pub fn parse_http_response(raw: &[u8]) -> Result<HttpAnswer, String> {
    let head_end = find(raw, b"\r\n\r\n").ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..head_end]).map_err(|_| "headers are not UTF-8")?;
    let rest = &raw[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(format!("status line {status_line:?} is not HTTP/1.x"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("status line {status_line:?} has no status code"))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            chunked = true;
        }
    }
    let body = if chunked {
        decode_chunked(rest)?
    } else if let Some(length) = content_length {
        rest.get(..length)
            .ok_or("body shorter than Content-Length")?
            .to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpAnswer { status, body })
}

fn decode_chunked(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n").ok_or("chunk size line not terminated")?;
        let size_line = std::str::from_utf8(&rest[..line_end]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        let chunk = rest.get(..size).ok_or("chunk shorter than announced")?;
        body.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("chunk not terminated")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: &str) -> HttpAnswer {
        HttpAnswer {
            status,
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn leader_known_from_serf_member() {
        let body = r#"{"Name":"dkron-1","Addr":"10.0.0.7","Port":8946,"Tags":{"server":"true"},"Status":1}"#;
        assert_eq!(
            parse_leader_answer(&answer(200, body)),
            LeaderAnswer::Known {
                name: Some("dkron-1".into())
            }
        );
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

    #[test]
    fn parses_content_length_chunked_and_close_delimited() {
        let raw = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: 4\r\n\r\nnull";
        assert_eq!(parse_http_response(raw).unwrap(), answer(500, "null"));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n\"I am\r\n9\r\n a leader\r\n1\r\n\"\r\n0\r\n\r\n";
        assert_eq!(
            parse_http_response(raw).unwrap(),
            answer(200, "\"I am a leader\"")
        );
        let raw = b"HTTP/1.0 404 Not Found\r\n\r\n\"I am a follower\"";
        assert_eq!(
            parse_http_response(raw).unwrap(),
            answer(404, "\"I am a follower\"")
        );
        assert!(parse_http_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_http_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnull").is_err());
    }

    /// Serves `canned` once on a loopback port (a transport check of this client, not a Dkron).
    async fn serve_once(canned: &'static [u8]) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 1024];
            let _ = stream.read(&mut request).await;
            if !canned.is_empty() {
                stream.write_all(canned).await.unwrap();
            } else {
                // Never answer.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        port
    }

    #[tokio::test]
    async fn client_reads_a_whole_answer_over_tcp() {
        let port = serve_once(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnull",
        )
        .await;
        let answer = leader("127.0.0.1", port, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(answer, LeaderAnswer::NoLeader);
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let port = serve_once(b"").await;
        let result = is_leader("127.0.0.1", port, Duration::from_millis(300)).await;
        assert!(
            matches!(result, Err(DkronError::Timeout { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_server_is_an_error_not_an_answer() {
        // Port 9 (discard) on loopback is closed in test environments: connection refused.
        let result = leader("127.0.0.1", 9, Duration::from_secs(2)).await;
        assert!(result.is_err(), "{result:?}");
    }
}
