//! Redis as a target: one `redis-server` with an fsync'd append-only file,
//! and a minimal RESP client (SET and GET, one connection per load client).
//! With [`Transport::Tls`] the server takes only mutual-TLS connections
//! (`tls-port`, `tls-auth-clients yes`; [`crate::peer_tls`]).

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use geokv_net::channel::Io;
use geokv_net::tls::Tls;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::peer_tls::{PeerCerts, Transport};
use crate::process::{self, Child};

/// Longest the server may take to answer its first PING.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest bulk reply accepted; values in this tool are at most 1 MiB.
const BULK_BYTES_MAX: usize = 64 << 20;
/// Longest status line accepted ("+OK", "-ERR ...", "$123").
const LINE_BYTES_MAX: usize = 64 << 10;

pub const INSTALL_HINT: &str = "install Redis (Debian: `apt-get install redis-server`) or pass --redis-bin";

/// A running server, stopped and its files removed when dropped.
pub struct RedisServer {
    /// Declared before `dir` so the process stops before its files go.
    child: Child,
    pub addr: SocketAddr,
    /// The load client's identity when the server takes only TLS.
    pub tls: Option<Arc<Tls>>,
    _dir: TempDir,
}

impl RedisServer {
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}

/// Starts a server on a free port; every write is fsync'd before the reply
/// (`appendfsync always`), as geokv's and etcd's are.
pub async fn start(bin: &Path, transport: Transport) -> Result<RedisServer> {
    let bin = process::require_binary(bin, INSTALL_HINT)?;
    let dir =
        tempfile::Builder::new().prefix("geokv-load-redis-").tempdir().context("creating a temp dir")?;
    let port = process::free_ports(1)?[0];
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut cmd = Command::new(&bin);
    let tls = match transport {
        Transport::Plaintext => {
            cmd.arg("--port").arg(port.to_string());
            None
        }
        Transport::Tls => {
            let certs = PeerCerts::create(&dir.path().join("certs"), &["redis"])?;
            let files = certs.server("redis");
            cmd.arg("--port")
                .arg("0")
                .arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(&files.cert)
                .arg("--tls-key-file")
                .arg(&files.key)
                .arg("--tls-ca-cert-file")
                .arg(&files.ca)
                .arg("--tls-auth-clients")
                .arg("yes");
            Some(certs.client)
        }
    };
    cmd.arg("--bind")
        .arg("127.0.0.1")
        .arg("--appendonly")
        .arg("yes")
        .arg("--appendfsync")
        .arg("always")
        .arg("--save")
        .arg("")
        .arg("--dir")
        .arg(dir.path())
        .arg("--daemonize")
        .arg("no");
    let mut child = Child::spawn("redis-server", cmd, &dir.path().join("redis.log"))?;
    process::wait_ready(
        "redis-server",
        READY_TIMEOUT,
        || child.check_alive(),
        || async {
            let mut c = RedisConn::new(addr, tls.clone());
            let reply = c.command(&[b"PING"]).await?;
            match reply {
                Reply::Simple(s) if s == "PONG" => Ok(()),
                other => bail!("PING answered {other:?}"),
            }
        },
    )
    .await?;
    eprintln!("redis: pid {} on {addr} ({})", child.pid().unwrap_or(0), transport.describe());
    Ok(RedisServer { child, addr, tls, _dir: dir })
}

impl RedisServer {
    pub fn check_alive(&mut self) -> Result<()> {
        self.child.check_alive()
    }
}

/// A reply the tool understands.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

/// One connection, opened on first use and again after any failure (a
/// timed-out reply would leave the stream out of step).
pub struct RedisConn {
    addr: SocketAddr,
    /// The client identity for a TLS server (None: plaintext).
    tls: Option<Arc<Tls>>,
    stream: Option<BufReader<Box<dyn Io>>>,
    out: Vec<u8>,
}

impl RedisConn {
    pub fn new(addr: SocketAddr, tls: Option<Arc<Tls>>) -> Self {
        Self { addr, tls, stream: None, out: Vec::with_capacity(256) }
    }

    pub async fn connect(server: &RedisServer) -> Result<Self> {
        let mut c = Self::new(server.addr, server.tls.clone());
        c.stream().await?;
        Ok(c)
    }

    async fn stream(&mut self) -> Result<&mut BufReader<Box<dyn Io>>> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr)
                .await
                .with_context(|| format!("connecting to redis at {}", self.addr))?;
            s.set_nodelay(true)?;
            let io: Box<dyn Io> = match &self.tls {
                None => Box::new(s),
                Some(tls) => {
                    let name = rustls_pki_types::ServerName::IpAddress(self.addr.ip().into());
                    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
                    let s = connector
                        .connect(name, s)
                        .await
                        .with_context(|| format!("TLS handshake with redis at {}", self.addr))?;
                    Box::new(s)
                }
            };
            self.stream = Some(BufReader::new(io));
        }
        self.stream.as_mut().context("redis connection missing")
    }

    pub async fn set(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        match self.command(&[b"SET", key, value]).await? {
            Reply::Simple(s) if s == "OK" => Ok(()),
            other => bail!("SET answered {other:?}"),
        }
    }

    /// Sets every key of `keys` to `value` with one MSET.
    pub async fn mset(&mut self, keys: &[(u64, Vec<u8>)], value: &[u8]) -> Result<()> {
        let mut args: Vec<&[u8]> = Vec::with_capacity(1 + 2 * keys.len());
        args.push(b"MSET");
        for (_, k) in keys {
            args.push(k);
            args.push(value);
        }
        match self.command(&args).await? {
            Reply::Simple(s) if s == "OK" => Ok(()),
            other => bail!("MSET answered {other:?}"),
        }
    }

    pub async fn get(&mut self, key: &[u8]) -> Result<()> {
        match self.command(&[b"GET", key]).await? {
            Reply::Bulk(_) => Ok(()),
            other => bail!("GET answered {other:?}"),
        }
    }

    /// Sends one command and reads its reply; drops the connection on error.
    pub async fn command(&mut self, args: &[&[u8]]) -> Result<Reply> {
        let result = self.round_trip(args).await;
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    async fn round_trip(&mut self, args: &[&[u8]]) -> Result<Reply> {
        let mut out = std::mem::take(&mut self.out);
        encode(&mut out, args);
        let stream = self.stream().await?;
        let written = stream.get_mut().write_all(&out).await;
        self.out = out;
        written.context("writing to redis")?;
        read_reply(self.stream().await?).await
    }
}

/// Encodes a command as a RESP array of bulk strings.
fn encode(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.clear();
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

async fn read_reply(stream: &mut BufReader<Box<dyn Io>>) -> Result<Reply> {
    let mut line = Vec::with_capacity(64);
    let n = (&mut *stream)
        .take(LINE_BYTES_MAX as u64)
        .read_until(b'\n', &mut line)
        .await
        .context("reading from redis")?;
    if n == 0 {
        bail!("redis closed the connection");
    }
    let Some(body) = line.strip_suffix(b"\r\n") else {
        bail!("redis reply line is not terminated within {LINE_BYTES_MAX} bytes");
    };
    let (kind, rest) = body.split_first().context("empty redis reply line")?;
    let text = std::str::from_utf8(rest).context("redis reply line is not UTF-8")?;
    match kind {
        b'+' => Ok(Reply::Simple(text.to_string())),
        b'-' => bail!("redis error: {text}"),
        b':' => Ok(Reply::Integer(text.parse().context("bad redis integer")?)),
        b'$' => {
            let len: i64 = text.parse().context("bad redis bulk length")?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let len = usize::try_from(len)?;
            if len > BULK_BYTES_MAX {
                bail!("redis bulk reply of {len} bytes exceeds {BULK_BYTES_MAX}");
            }
            let mut buf = vec![0; len + 2];
            stream.read_exact(&mut buf).await.context("reading a redis bulk reply")?;
            if !buf.ends_with(b"\r\n") {
                bail!("redis bulk reply not terminated by CRLF");
            }
            buf.truncate(len);
            Ok(Reply::Bulk(Some(buf)))
        }
        other => bail!("unsupported redis reply type {:?}", *other as char),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_encode_as_resp_arrays() {
        let mut out = Vec::new();
        encode(&mut out, &[b"SET", b"k", b"v\r\n"]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n");
    }

    /// Needs redis-server (`scripts/deps` installs it); fails without it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tls_server_serves_the_load_client_and_refuses_plaintext() {
        let mut server =
            start(Path::new("/usr/bin/redis-server"), Transport::Tls).await.expect("redis with TLS");
        let mut conn = RedisConn::connect(&server).await.expect("TLS client");
        conn.set(b"k", b"v").await.expect("SET through TLS");
        assert_eq!(conn.command(&[b"GET", b"k"]).await.expect("GET"), Reply::Bulk(Some(b"v".to_vec())));

        // The same port in plaintext gets no reply.
        let mut plain = RedisConn::new(server.addr, None);
        let outcome = tokio::time::timeout(Duration::from_secs(5), plain.command(&[b"PING"])).await;
        assert!(
            !matches!(outcome, Ok(Ok(_))),
            "a plaintext client was answered on the TLS port: {outcome:?}"
        );
        server.check_alive().expect("the server still runs");
    }
}
