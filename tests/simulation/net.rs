//! The glue between turmoil's simulated TCP and the node's injectable
//! transport: a dialer for every outgoing gRPC channel, and a stream of
//! incoming connections for the tonic server (turmoil's `examples/grpc`
//! shows the same two adapters).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use geokv_server::transport::{Dialer, Io};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::Uri;

/// The gRPC port of every simulated node.
pub const GRPC_PORT: u16 = 7000;

/// Connections accepted but not yet taken by the server.
const ACCEPT_QUEUE_MAX: usize = 64;

/// One accepted simulated connection.
pub struct SimConn(turmoil::net::TcpStream);

impl Connected for SimConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Opens simulated TCP connections to `host:port` (a turmoil host name).
pub fn dialer() -> Dialer {
    Dialer::custom(Arc::new(|uri: Uri| {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in `{uri}`")))?
                .to_string();
            let port = uri.port_u16().unwrap_or(GRPC_PORT);
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(Box::new(stream) as Box<dyn Io>)
        })
    }))
}

/// Binds the node's gRPC port on the current simulated host and returns
/// the stream of connections for `server::serve_with`.
pub async fn incoming() -> io::Result<ReceiverStream<io::Result<SimConn>>> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", GRPC_PORT)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(ACCEPT_QUEUE_MAX);
    tokio::spawn(async move {
        loop {
            let accepted = listener.accept().await.map(|(stream, _)| SimConn(stream));
            let failed = accepted.is_err();
            if tx.send(accepted).await.is_err() || failed {
                return;
            }
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// A gRPC channel from the current simulated host to `region`'s node.
pub fn channel(region: &str, timeout: std::time::Duration) -> tonic::transport::Channel {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{region}:{GRPC_PORT}"))
        .expect("a host name and port make a valid URI")
        .connect_timeout(std::time::Duration::from_secs(1))
        .timeout(timeout)
        // Keepalive: a connection cut by a partition is noticed and redialed.
        .http2_keep_alive_interval(std::time::Duration::from_secs(1))
        .keep_alive_timeout(std::time::Duration::from_secs(2))
        .keep_alive_while_idle(true);
    dialer().connect_lazy(&endpoint)
}
