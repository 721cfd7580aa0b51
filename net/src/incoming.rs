//! Accepting connections on a node's two ports, with or without TLS.
//!
//! The accept loop never waits on a handshake: each accepted socket is
//! handed to its own task (at most [`HANDSHAKES_MAX`] at once, each bounded
//! by [`HANDSHAKE_TIMEOUT`]), and only finished connections reach the gRPC
//! server. A connection that does not open with a TLS record is counted as
//! `plaintext` and closed; a failed handshake as `tls_handshake`; both in
//! `geokv_security_refused_total{port, reason}`.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::identity::CertIdentity;
use crate::tls::Tls;

/// Handshakes in progress at once per port; further sockets wait in the
/// kernel's accept queue.
pub const HANDSHAKES_MAX: usize = 256;
/// Longest a peer may take to send its first byte and finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Finished connections waiting for the gRPC server.
const READY_QUEUE: usize = 64;
/// First byte of a TLS handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Counts a refusal with its stable reason (docs/security.md).
pub fn count_refused(port: &'static str, reason: &'static str) {
    metrics::counter!("geokv_security_refused_total", "port" => port, "reason" => reason).increment(1);
}

/// A connection's verdict on its certificate chain: the roots generation
/// it was reached under, and the identity or the reason for refusal.
type Verdict = Option<(u64, Result<CertIdentity, String>)>;

/// What a request learns about the connection it came on (inserted into
/// its extensions by tonic).
#[derive(Clone, Debug)]
pub struct PeerConn {
    pub remote: Option<SocketAddr>,
    /// The certificate chain the peer presented; None without TLS or
    /// when it sent none.
    pub chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Verdict on `chain` under a roots generation, so a connection's chain
    /// is verified once per generation rather than once per request.
    verdict: Arc<Mutex<Verdict>>,
}

impl PeerConn {
    /// A connection without TLS (tests and `--insecure`).
    pub fn plain(remote: Option<SocketAddr>) -> Self {
        Self { remote, chain: None, verdict: Arc::new(Mutex::new(None)) }
    }

    /// The identity in the peer's certificate, verified against the roots
    /// in force now. None: no certificate was presented.
    pub fn identity(&self, tls: &Tls) -> Option<Result<CertIdentity, String>> {
        let chain = self.chain.as_ref()?;
        let generation = tls.generation();
        let mut verdict = self.verdict.lock().unwrap_or_else(|p| p.into_inner());
        match &*verdict {
            Some((g, v)) if *g == generation => Some(v.clone()),
            _ => {
                let v = tls.verify_peer(chain);
                *verdict = Some((generation, v.clone()));
                Some(v)
            }
        }
    }
}

/// An accepted connection.
pub enum PortConn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerConn),
}

impl Connected for PortConn {
    type ConnectInfo = PeerConn;

    fn connect_info(&self) -> PeerConn {
        match self {
            PortConn::Plain(s) => PeerConn::plain(s.peer_addr().ok()),
            PortConn::Tls(_, info) => info.clone(),
        }
    }
}

impl AsyncRead for PortConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PortConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            PortConn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PortConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PortConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            PortConn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PortConn::Plain(s) => Pin::new(s).poll_flush(cx),
            PortConn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            PortConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            PortConn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            PortConn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            PortConn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            PortConn::Plain(s) => s.is_write_vectored(),
            PortConn::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// The connections accepted on `listener`, TLS-terminated when `tls` is
/// given. `port` names the port in metrics and logs ("client" or "peer").
/// The accept loop ends when the returned stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    port: &'static str,
) -> ReceiverStream<io::Result<PortConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(READY_QUEUE);
    let acceptor = tls.as_ref().map(|t| TlsAcceptor::from(t.server_config()));
    let permits = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: pause, never spin.
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY on an accepted connection");
            }
            let Some(acceptor) = acceptor.clone() else {
                if tx.send(Ok(PortConn::Plain(stream))).await.is_err() {
                    return;
                }
                continue;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else { return };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, stream, remote)).await {
                    Ok(Ok(conn)) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Ok(Err(reason)) => {
                        count_refused(port, reason);
                        tracing::info!(port, %remote, reason, "connection refused");
                    }
                    Err(_) => {
                        count_refused(port, "handshake_timeout");
                        tracing::info!(port, %remote, "connection refused: no TLS handshake in time");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    remote: SocketAddr,
) -> Result<PortConn, &'static str> {
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(0) | Err(_) => return Err("closed"),
        Ok(_) => return Err("plaintext"),
    }
    let tls = acceptor.accept(stream).await.map_err(|e| {
        tracing::debug!(%remote, error = %e, "TLS handshake failed");
        "tls_handshake"
    })?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
    let info = PeerConn { remote: Some(remote), chain, verdict: Arc::new(Mutex::new(None)) };
    Ok(PortConn::Tls(Box::new(tls), info))
}
