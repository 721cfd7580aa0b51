//! A client of the control API, for `geokv-proxy ctl`, test harnesses and
//! the chaos nemeses in other processes.
//!
//! It speaks just enough HTTP/1.1 for this API (one request per connection,
//! `Connection: close`), which keeps the crate free of an HTTP client stack.

use std::net::SocketAddr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::control::{ErrorBody, ResetReply};
use crate::faults::FaultsPatch;
use crate::set::LinkStatus;

/// Largest answer read, in bytes: far above a thousand links' status.
pub const RESPONSE_BYTES_MAX: usize = 8 * 1024 * 1024;

/// Time allowed for one request, connect to last byte, in milliseconds.
pub const REQUEST_TIMEOUT_MS: u64 = 10_000;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The control server could not be reached or the connection broke.
    #[error("talking to the control API at {addr}: {source}")]
    Io {
        /// The control address.
        addr: SocketAddr,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// No full answer within [`REQUEST_TIMEOUT_MS`].
    #[error("the control API at {0} did not answer within {REQUEST_TIMEOUT_MS} ms")]
    Timeout(SocketAddr),
    /// The API answered with an error.
    #[error("{reason} (HTTP {status}): {message}")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The stable reason, e.g. `LINK_NOT_FOUND`.
        reason: String,
        /// For people.
        message: String,
    },
    /// The answer is not what this API sends.
    #[error("unexpected answer from the control API: {0}")]
    BadResponse(String),
}

impl ControlError {
    /// The API's stable reason, when the API answered with an error.
    pub fn reason(&self) -> Option<&str> {
        match self {
            ControlError::Api { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Talks to one control server.
#[derive(Clone, Debug)]
pub struct ControlClient {
    addr: SocketAddr,
}

impl ControlClient {
    /// A client of the control API at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        ControlClient { addr }
    }

    /// `GET /links`.
    pub async fn links(&self) -> Result<Vec<LinkStatus>, ControlError> {
        self.call("GET", "/links", None).await
    }

    /// `GET /links/{name}`.
    pub async fn link(&self, name: &str) -> Result<LinkStatus, ControlError> {
        self.call("GET", &link_path(name, ""), None).await
    }

    /// `PUT /links/{name}`: changes the fields `patch` names.
    pub async fn set(&self, name: &str, patch: &FaultsPatch) -> Result<LinkStatus, ControlError> {
        let body = serde_json::to_vec(patch).map_err(|e| ControlError::BadResponse(e.to_string()))?;
        self.call("PUT", &link_path(name, ""), Some(body)).await
    }

    /// `POST /links/{name}/reset`, optionally setting or clearing `refuse`.
    pub async fn reset(&self, name: &str, refuse: Option<bool>) -> Result<ResetReply, ControlError> {
        let query = match refuse {
            None => String::new(),
            Some(refuse) => format!("?refuse={refuse}"),
        };
        self.call("POST", &link_path(name, &format!("/reset{query}")), None).await
    }

    /// `POST /links/{name}/heal`.
    pub async fn heal(&self, name: &str) -> Result<LinkStatus, ControlError> {
        self.call("POST", &link_path(name, "/heal"), None).await
    }

    /// Partitions (black-holes) the link.
    pub async fn partition(&self, name: &str) -> Result<LinkStatus, ControlError> {
        self.set(name, &FaultsPatch { partition: Some(true), ..Default::default() }).await
    }

    /// Stalls the link.
    pub async fn stall(&self, name: &str) -> Result<LinkStatus, ControlError> {
        self.set(name, &FaultsPatch { stall: Some(true), ..Default::default() }).await
    }

    /// Sets the one-way latency of both directions.
    pub async fn latency(&self, name: &str, latency_ms: u64) -> Result<LinkStatus, ControlError> {
        self.set(name, &FaultsPatch { latency_ms: Some(latency_ms), ..Default::default() }).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ControlError> {
        let timeout = Duration::from_millis(REQUEST_TIMEOUT_MS);
        let (status, body) = tokio::time::timeout(timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| ControlError::Timeout(self.addr))??;
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => ControlError::Api { status, reason: e.reason, message: e.message },
                Err(_) => ControlError::Api {
                    status,
                    reason: "HTTP_ERROR".into(),
                    message: String::from_utf8_lossy(&body).into_owned(),
                },
            });
        }
        serde_json::from_slice(&body).map_err(|e| ControlError::BadResponse(format!("{e} in {path}")))
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ControlError> {
        let io = |source| ControlError::Io { addr: self.addr, source };
        let mut stream = TcpStream::connect(self.addr).await.map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        stream.write_all(head.as_bytes()).await.map_err(io)?;
        stream.write_all(&body).await.map_err(io)?;
        let mut answer = Vec::new();
        // One byte past the bound tells a too-large answer from one exactly
        // at it.
        (&mut stream).take(RESPONSE_BYTES_MAX as u64 + 1).read_to_end(&mut answer).await.map_err(io)?;
        if answer.len() > RESPONSE_BYTES_MAX {
            return Err(ControlError::BadResponse(format!("answer longer than {RESPONSE_BYTES_MAX} bytes")));
        }
        parse_response(&answer)
    }
}

/// `/links/{name}{rest}` with the name percent-encoded.
fn link_path(name: &str, rest: &str) -> String {
    let mut path = String::from("/links/");
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            path.push(b as char);
        } else {
            path.push_str(&format!("%{b:02X}"));
        }
    }
    path.push_str(rest);
    path
}

/// Splits an HTTP/1.1 answer read to its end into status and body.
fn parse_response(answer: &[u8]) -> Result<(u16, Vec<u8>), ControlError> {
    let bad = |why: &str| ControlError::BadResponse(why.to_string());
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| bad("headers are not UTF-8"))?;
    let body = &answer[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad(&format!("bad status line {status_line:?}")))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| bad("bad content-length"))?);
        }
    }
    let body = if chunked {
        dechunk(body).ok_or_else(|| bad("bad chunked body"))?
    } else if let Some(length) = length {
        body.get(..length).ok_or_else(|| bad("body shorter than content-length"))?.to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, body))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    // Each round consumes at least the size line, so this ends.
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..eol]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(link_path("us-east-1->eu-west-1", "/heal"), "/links/us-east-1-%3Eeu-west-1/heal");
        assert_eq!(link_path("a:b", ""), "/links/a%3Ab");
    }

    #[test]
    fn parses_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (404, b"{}".to_vec()));
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, b"[1,2]".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }
}
