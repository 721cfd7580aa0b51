//! How a node opens connections to its peers: real TCP by default, or a
//! dialer injected by a test, so the real services, shippers and Raft
//! network can run over a simulated network (`tests/simulation`, turmoil).
//!
//! Every outgoing gRPC channel of a node (forwarding, replication, Raft) is
//! built from a configured [`Endpoint`] (timeouts, HTTP/2 keepalive) and
//! then connected through a [`Dialer`]. The default dialer calls
//! `Endpoint::connect` / `connect_lazy`, exactly as before the dialer
//! existed; a custom one only replaces how the byte stream is opened, so the
//! endpoint's settings still apply. Incoming connections are injected the
//! same way: `server::serve_with` takes any stream of connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

/// A connected byte stream.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// What a custom dialer returns for one connection attempt.
pub type DialFuture = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Io>>> + Send>>;

/// Opens a byte stream to the authority of a URI ("host:port").
pub type DialFn = dyn Fn(Uri) -> DialFuture + Send + Sync;

/// How a node connects to its peers.
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
    /// Real TCP, through tonic's own connector.
    pub fn tcp() -> Self {
        Self::default()
    }

    /// Connections opened by `dial` (a simulated network).
    pub fn custom(dial: Arc<DialFn>) -> Self {
        Self { custom: Some(dial) }
    }

    /// Connects now, with the endpoint's settings.
    pub async fn connect(&self, endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
        match &self.custom {
            None => endpoint.connect().await,
            Some(dial) => endpoint.connect_with_connector(Connector(dial.clone())).await,
        }
    }

    /// A channel that connects on first use (and again after a failure).
    pub fn connect_lazy(&self, endpoint: &Endpoint) -> Channel {
        match &self.custom {
            None => endpoint.connect_lazy(),
            Some(dial) => endpoint.connect_with_connector_lazy(Connector(dial.clone())),
        }
    }
}

/// Adapts a [`DialFn`] to the connector tonic expects.
#[derive(Clone)]
struct Connector(Arc<DialFn>);

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Box<dyn Io>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let dial = (self.0)(uri);
        Box::pin(async move { dial.await.map(TokioIo::new) })
    }
}
