//! The one builder of every outgoing gRPC channel: the node's forwarding,
//! replication, Raft and fan-out channels, and the client library's.
//!
//! [`ChannelSettings`] holds the settings (connect timeout, HTTP/2
//! keepalive, TCP_NODELAY); [`Channels`] adds how the byte stream is opened
//! (a [`Dialer`]: real TCP, or a simulated network injected by a test) and
//! TLS (a [`Tls`] identity and roots, optionally checking the node identity
//! the server's certificate must carry). The gRPC URI is always `http://`:
//! TLS is done here, below tonic, so a certificate reload reaches the next
//! connection without rebuilding the channel.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity;
use crate::tls::Tls;

/// A connected byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What a custom dialer returns for one connection attempt.
pub type DialFuture = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send>>;

/// Opens a byte stream to the authority of a URI ("host:port").
pub type DialFn = dyn Fn(Uri) -> DialFuture + Send + Sync;

/// How a process opens its byte streams.
#[derive(Clone, Default)]
pub struct Dialer {
    /// None: the operating system's TCP (the production path).
    custom: Option<Arc<DialFn>>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.custom.is_some() { "Dialer(custom)" } else { "Dialer(tcp)" })
    }
}

impl Dialer {
    /// Real TCP.
    pub fn tcp() -> Self {
        Self::default()
    }

    /// Connections opened by `dial` (a simulated network).
    pub fn custom(dial: Arc<DialFn>) -> Self {
        Self { custom: Some(dial) }
    }

    /// A plaintext channel over this dialer with `endpoint`'s own settings
    /// (the simulation's test clients).
    pub fn connect_lazy(&self, endpoint: &Endpoint) -> Channel {
        endpoint.clone().connect_with_connector_lazy(Connector {
            dialer: self.clone(),
            tls: None,
            expect: None,
            timeout: Duration::from_secs(10),
        })
    }

    async fn dial(&self, uri: Uri) -> std::io::Result<Box<dyn Io>> {
        match &self.custom {
            Some(dial) => dial(uri).await,
            None => {
                let authority = uri
                    .authority()
                    .ok_or_else(|| {
                        std::io::Error::new(std::io::ErrorKind::InvalidInput, "address has no host")
                    })?
                    .as_str()
                    .to_string();
                let stream = tokio::net::TcpStream::connect(authority).await?;
                stream.set_nodelay(true)?;
                Ok(Box::new(stream))
            }
        }
    }
}

/// Settings of a channel. Named constructors hold the values each use needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSettings {
    /// Longest a connection (TCP and TLS handshake) may take.
    pub connect_timeout: Duration,
    /// HTTP/2 pings on an idle connection, so a dead peer (a partition, a
    /// paused process) is noticed and the connection replaced.
    pub keepalive_interval: Duration,
    /// No answer to a ping for this long closes the connection.
    pub keepalive_timeout: Duration,
}

impl ChannelSettings {
    /// Between nodes: forwarding, replication, Raft, fan-out.
    pub const PEER: Self = Self {
        connect_timeout: Duration::from_secs(2),
        keepalive_interval: Duration::from_secs(1),
        keepalive_timeout: Duration::from_secs(3),
    };

    /// From a client to a node's client port.
    pub const CLIENT: Self = Self {
        connect_timeout: Duration::from_secs(5),
        keepalive_interval: Duration::from_secs(10),
        keepalive_timeout: Duration::from_secs(5),
    };
}

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("bad address `{addr}`: {why}")]
    BadAddress { addr: String, why: String },
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The node identity a server's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    pub region: String,
    /// None: any node of the region.
    pub node: Option<String>,
}

/// Makes channels with one set of settings, one dialer and one TLS identity.
#[derive(Clone)]
pub struct Channels {
    settings: ChannelSettings,
    dialer: Dialer,
    /// None: plaintext (`--insecure`, and the simulation).
    tls: Option<Arc<Tls>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("settings", &self.settings)
            .field("dialer", &self.dialer)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Channels {
    pub fn new(settings: ChannelSettings, dialer: Dialer, tls: Option<Arc<Tls>>) -> Self {
        Self { settings, dialer, tls }
    }

    /// Plain TCP without TLS, for tests and `--insecure` deployments.
    pub fn plaintext(settings: ChannelSettings) -> Self {
        Self::new(settings, Dialer::tcp(), None)
    }

    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    pub fn settings(&self) -> ChannelSettings {
        self.settings
    }

    fn endpoint(&self, addr: &str) -> Result<Endpoint, ChannelError> {
        let host_port =
            addr.strip_prefix("http://").or_else(|| addr.strip_prefix("https://")).unwrap_or(addr);
        let url = format!("http://{host_port}");
        let ep = Endpoint::from_shared(url)
            .map_err(|e| ChannelError::BadAddress { addr: addr.into(), why: e.to_string() })?;
        Ok(ep
            .connect_timeout(self.settings.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.settings.keepalive_interval)
            .keep_alive_timeout(self.settings.keepalive_timeout)
            .keep_alive_while_idle(true))
    }

    fn connector(&self, expect: Option<Expect>) -> Connector {
        Connector {
            dialer: self.dialer.clone(),
            tls: self.tls.clone(),
            expect: expect.map(Arc::new),
            timeout: self.settings.connect_timeout,
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn lazy(&self, addr: &str, expect: Option<Expect>) -> Result<Channel, ChannelError> {
        Ok(self.endpoint(addr)?.connect_with_connector_lazy(self.connector(expect)))
    }

    /// Connects now.
    pub async fn connect(&self, addr: &str, expect: Option<Expect>) -> Result<Channel, ChannelError> {
        self.endpoint(addr)?
            .connect_with_connector(self.connector(expect))
            .await
            .map_err(|source| ChannelError::Connect { addr: addr.into(), source })
    }
}

/// Opens one connection: dial, then TLS (when configured), then check the
/// server's node identity (when expected).
#[derive(Clone)]
struct Connector {
    dialer: Dialer,
    tls: Option<Arc<Tls>>,
    expect: Option<Arc<Expect>>,
    timeout: Duration,
}

fn io_err(kind: std::io::ErrorKind, why: String) -> std::io::Error {
    std::io::Error::new(kind, why)
}

impl Connector {
    async fn open(self, uri: Uri) -> std::io::Result<Box<dyn Io>> {
        let stream = self.dialer.dial(uri.clone()).await?;
        let Some(tls) = self.tls else { return Ok(stream) };
        let host =
            uri.host().unwrap_or("localhost").trim_start_matches('[').trim_end_matches(']').to_string();
        let name = ServerName::try_from(host.clone())
            .map_err(|e| io_err(std::io::ErrorKind::InvalidInput, format!("server name `{host}`: {e}")))?;
        let connector = tokio_rustls::TlsConnector::from(tls.client_config());
        let stream = connector.connect(name, stream).await?;
        if let Some(expect) = &self.expect {
            let (_, conn) = stream.get_ref();
            let cert = conn.peer_certificates().and_then(|c| c.first()).ok_or_else(|| {
                io_err(std::io::ErrorKind::PermissionDenied, "server sent no certificate".into())
            })?;
            let id = identity::parse(cert).map_err(|e| {
                io_err(std::io::ErrorKind::PermissionDenied, format!("server certificate: {e}"))
            })?;
            let node = id.node.ok_or_else(|| {
                io_err(std::io::ErrorKind::PermissionDenied, "server certificate names no geokv node".into())
            })?;
            let node_ok = expect.node.as_deref().is_none_or(|n| n == node.node);
            if node.region != expect.region || !node_ok {
                return Err(io_err(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "server certificate is for node `{}`, expected a node of region `{}`{}",
                        node.actor(),
                        expect.region,
                        expect.node.as_deref().map(|n| format!(" named `{n}`")).unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(Box::new(stream))
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, this.open(uri)).await {
                Ok(r) => r.map(TokioIo::new),
                Err(_) => {
                    Err(io_err(std::io::ErrorKind::TimedOut, "connect and TLS handshake timed out".into()))
                }
            }
        })
    }
}
