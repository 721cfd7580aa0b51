//! Helpers shared by the proxy's integration tests: an echo server, a framed
//! request/response server, and reads with deadlines. Every wait is bounded.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Longest any one test may run; a hang fails instead of blocking CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

pub fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Runs a test body under [`TEST_TIMEOUT`].
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(TEST_TIMEOUT, body).await.expect("test exceeded its time bound");
}

/// A server that echoes every byte and counts the connections it accepted.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Echo {
    pub async fn start() -> Echo {
        let listener = TcpListener::bind(any_port()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                socket.set_nodelay(true).unwrap();
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo { addr, accepted, task }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A request/response server speaking length-prefixed frames (u32 big-endian
/// length, then payload), answering each request with its payload reversed:
/// a stand-in for one long-lived gRPC channel.
pub async fn framed_server() -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind(any_port()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            socket.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                while let Ok(mut payload) = read_frame(&mut socket).await {
                    payload.reverse();
                    if write_frame(&mut socket, &payload).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

pub async fn write_frame(socket: &mut TcpStream, payload: &[u8]) -> std::io::Result<()> {
    let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(payload);
    socket.write_all(&frame).await
}

pub async fn read_frame(socket: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    socket.read_exact(&mut len).await?;
    let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
    socket.read_exact(&mut payload).await?;
    Ok(payload)
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    let socket = TcpStream::connect(addr).await.unwrap();
    socket.set_nodelay(true).unwrap();
    socket
}

/// Reads exactly `n` bytes, failing the test if they do not come within `within`.
pub async fn read_n(socket: &mut TcpStream, n: usize, within: Duration) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(within, socket.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{n} bytes did not arrive within {within:?}"))
        .unwrap();
    buf
}

/// Asserts that nothing arrives (and the connection stays open) for `window`.
pub async fn assert_silent(socket: &mut TcpStream, window: Duration) {
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(window, socket.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("connection closed during a window that should be silent"),
        Ok(Ok(n)) => panic!("{n} bytes arrived during a window that should be silent"),
        Ok(Err(e)) => panic!("connection failed during a window that should be silent: {e}"),
    }
}

/// Waits for the connection to be closed by the proxy: an RST (the error),
/// or end of stream. Returns the error kind, or `None` for a plain EOF.
pub async fn closed_within(socket: &mut TcpStream, within: Duration) -> Option<std::io::ErrorKind> {
    let mut buf = [0u8; 4096];
    let read_to_close = async {
        // Bytes still in flight may arrive before the close; each read is at
        // least one byte, and the total is bounded by `within`.
        loop {
            match socket.read(&mut buf).await {
                Ok(0) => return None,
                Ok(_) => continue,
                Err(e) => return Some(e.kind()),
            }
        }
    };
    tokio::time::timeout(within, read_to_close).await.expect("connection was not closed in time")
}

/// `count` numbered 4-byte chunks, big-endian.
pub fn numbered(count: u32) -> Vec<u8> {
    (0..count).flat_map(|i| i.to_be_bytes()).collect()
}

/// Checks that `bytes` are the numbers 0..count in order.
pub fn assert_numbered_in_order(bytes: &[u8], count: u32) {
    assert_eq!(bytes.len(), count as usize * 4);
    for (i, chunk) in bytes.chunks(4).enumerate() {
        let got = u32::from_be_bytes(chunk.try_into().unwrap());
        assert_eq!(got, i as u32, "chunk {i} out of order (got {got})");
    }
}
