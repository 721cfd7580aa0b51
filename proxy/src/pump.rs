//! Moving bytes through one direction of one connection.
//!
//! A direction is two halves joined by a bounded FIFO queue:
//!
//! - the *reader* reads a chunk from the sending socket, stamps it with its
//!   delivery time (arrival + latency +/- jitter, never earlier than the chunk
//!   before it, so order holds) and queues it; a partition drops it instead;
//! - the *writer* takes chunks in order, sleeps until each one's delivery
//!   time (to the microsecond, see `timer`), waits while the link is stalled
//!   or partitioned, paces it through
//!   the link's bandwidth cap, and writes it.
//!
//! Because the reader keeps reading while the writer sleeps, many chunks are
//! in flight at once: a 50 ms link adds 50 ms, not 50 ms per chunk. The queue
//! is bounded in bytes (`queue_bytes_max`) and in chunks (`queue_chunks_max`);
//! when it is full the reader stops reading, the kernel buffers fill and the
//! sender's TCP window closes, which is the back-pressure a slow WAN gives.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep_until, Instant};

use crate::faults::{Direction, DirectionFaults};
use crate::link::{ConnShared, LinkState, Shared};
use crate::stats::{self, Counters};
use crate::timer;

/// Bytes read from a socket in one go, and so the largest chunk, in bytes.
pub(crate) const CHUNK_BYTES_MAX: usize = 16 * 1024;

/// Smallest slice a paced write is cut into, in bytes; slices are otherwise
/// about 50 ms of the cap, so a slow link trickles rather than lurches.
const PACE_SLICE_BYTES_MIN: usize = 512;

/// Why a connection ended other than by both sides closing cleanly.
#[derive(Debug)]
pub(crate) enum ConnEnd {
    /// Reading from or writing to one side failed (the peer reset, ...).
    Io { direction: Direction, op: &'static str, source: io::Error },
    /// The upstream could not be dialled.
    Dial(io::Error),
    /// The reset action.
    ResetAction,
    /// The partition healed after it had dropped bytes of this connection.
    HealedAfterLoss,
    /// The link is shutting down.
    Shutdown,
}

impl std::fmt::Display for ConnEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnEnd::Io { direction, op, source } => write!(f, "{op} {}: {source}", direction.as_str()),
            ConnEnd::Dial(e) => write!(f, "dialling upstream: {e}"),
            ConnEnd::ResetAction => f.write_str("reset action"),
            ConnEnd::HealedAfterLoss => f.write_str("partition healed after dropping bytes"),
            ConnEnd::Shutdown => f.write_str("link shutting down"),
        }
    }
}

/// One queued chunk. It holds its share of the byte budget until it is
/// written or dropped, and keeps the `bytes_queued` gauge honest either way.
pub(crate) struct Chunk {
    /// When the chunk may be delivered.
    deliver_at: Instant,
    /// The bytes; empty means end of stream (a FIN to pass on).
    bytes: Vec<u8>,
    /// The chunk's share of `queue_bytes_max`, released on drop.
    _budget: OwnedSemaphorePermit,
    /// Where `bytes_queued` lives.
    counters: Arc<Counters>,
    direction: Direction,
}

impl Drop for Chunk {
    fn drop(&mut self) {
        stats::sub(&self.counters.direction(self.direction).bytes_queued, self.bytes.len());
    }
}

/// The sending end of a direction's queue.
pub(crate) struct QueueTx {
    chunks: mpsc::Sender<Chunk>,
    /// Bytes that may still be queued, out of `queue_bytes_max`.
    budget: Arc<Semaphore>,
}

/// A bounded queue for one direction of one connection.
pub(crate) fn queue(queue_bytes_max: usize, queue_chunks_max: usize) -> (QueueTx, mpsc::Receiver<Chunk>) {
    assert!(queue_bytes_max >= CHUNK_BYTES_MAX, "a full chunk must fit in the queue");
    let (chunks, rx) = mpsc::channel(queue_chunks_max);
    (QueueTx { chunks, budget: Arc::new(Semaphore::new(queue_bytes_max)) }, rx)
}

/// Paces one direction of a link (all its connections) to a bandwidth cap.
/// It keeps the time at which the link is next free; a write of n bytes
/// occupies n / rate seconds after that, and waits until it ends.
#[derive(Debug, Default)]
pub(crate) struct Pacer {
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    async fn pace(&self, len: usize, bytes_per_s: u64) {
        if bytes_per_s == 0 {
            return;
        }
        let done = {
            let mut next_free = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let start = next_free.map_or(now, |t| t.max(now));
            let end = start + Duration::from_secs_f64(len as f64 / bytes_per_s as f64);
            *next_free = Some(end);
            end
        };
        sleep_until(done).await;
    }
}

/// How many bytes to write in one paced step.
fn pace_slice(bytes_per_s: u64, len: usize) -> usize {
    if bytes_per_s == 0 {
        return len;
    }
    let slice = usize::try_from(bytes_per_s / 20).unwrap_or(usize::MAX).max(PACE_SLICE_BYTES_MIN);
    slice.min(len)
}

/// The one-way delay of a chunk under `faults`.
fn one_way_delay(faults: &DirectionFaults, rng: &mut StdRng) -> Duration {
    let base_us = faults.latency_ms as i64 * 1000;
    let jitter_us = faults.jitter_ms as i64 * 1000;
    let us = if jitter_us == 0 { base_us } else { base_us + rng.random_range(-jitter_us..=jitter_us) };
    Duration::from_micros(us.max(0) as u64)
}

/// Reads what is there (at least one byte, or 0 at end of stream).
async fn read_some(socket: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        socket.readable().await?;
        match socket.try_read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(socket: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        socket.writable().await?;
        match socket.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Waits until bytes of `direction` are dropped (a partition or a one-way
/// black hole). A closed state channel means the link is going away; that
/// is the supervisor's to act on, so this waits on.
async fn until_dropping(state: &mut watch::Receiver<LinkState>, direction: Direction) {
    if state.wait_for(|s| s.faults.dropping(direction)).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits until bytes may be delivered (neither stalled nor partitioned).
pub(crate) async fn until_flowing(state: &mut watch::Receiver<LinkState>) {
    if state.wait_for(|s| s.faults.flowing()).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Everything one half of a direction needs.
pub(crate) struct Pump<'a> {
    pub(crate) direction: Direction,
    pub(crate) link: &'a Shared,
    pub(crate) conn: &'a ConnShared,
    pub(crate) state: watch::Receiver<LinkState>,
}

impl Pump<'_> {
    fn io_error(&self, op: &'static str) -> impl FnOnce(io::Error) -> ConnEnd {
        let direction = self.direction;
        move |source| ConnEnd::Io { direction, op, source }
    }

    /// Counts `len` bytes as dropped and marks the connection's stream as
    /// broken, so it never delivers past the gap.
    fn drop_bytes(&self, len: usize) {
        stats::add(&self.link.counters.direction(self.direction).bytes_dropped, len);
        self.conn.mark_lost(self.direction);
    }

    /// The reading half: from `src` into `queue`, until end of stream.
    pub(crate) async fn read_loop(
        mut self,
        src: &TcpStream,
        queue: QueueTx,
        mut rng: StdRng,
    ) -> Result<(), ConnEnd> {
        let counters = &self.link.counters;
        let mut buf = vec![0u8; CHUNK_BYTES_MAX];
        let mut last_deliver_at = Instant::now();
        loop {
            let n = read_some(src, &mut buf).await.map_err(self.io_error("read"))?;
            let now = Instant::now();
            stats::add(&counters.direction(self.direction).bytes_read, n);
            let (dropping, faults) = {
                let s = self.state.borrow();
                (s.faults.dropping(self.direction), s.faults.direction(self.direction).clone())
            };
            // After a gap nothing more may pass in this direction, or the
            // receiver would see a stream no TCP could deliver.
            if dropping || self.conn.lost_in(self.direction) {
                self.drop_bytes(n);
                if n == 0 {
                    // The FIN is black-holed too; the supervisor ends this
                    // connection (reset, heal, shutdown).
                    std::future::pending::<()>().await;
                }
                continue;
            }
            let deliver_at = (now + one_way_delay(&faults, &mut rng)).max(last_deliver_at);
            last_deliver_at = deliver_at;

            // Room in the queue: waiting here is the back-pressure. A
            // partition that starts meanwhile drops the chunk, as a cut link
            // (or a black hole on this direction) loses what is on it.
            let reserve = async {
                let len = u32::try_from(n).expect("a chunk is at most CHUNK_BYTES_MAX");
                let budget = queue.budget.clone().acquire_many_owned(len).await.ok()?;
                let slot = queue.chunks.reserve().await.ok()?;
                Some((budget, slot))
            };
            let reserved = tokio::select! {
                reserved = reserve => reserved,
                () = until_dropping(&mut self.state, self.direction) => None,
            };
            let Some((budget, slot)) = reserved else {
                self.drop_bytes(n);
                if n == 0 {
                    std::future::pending::<()>().await;
                }
                continue;
            };
            stats::add(&counters.direction(self.direction).bytes_queued, n);
            slot.send(Chunk {
                deliver_at,
                bytes: buf[..n].to_vec(),
                _budget: budget,
                counters: counters.clone(),
                direction: self.direction,
            });
            if n == 0 {
                return Ok(());
            }
        }
    }

    /// The writing half: from `queue` to `dst`, in order, each chunk at its
    /// time; passes the end of stream on as a half-close (FIN).
    pub(crate) async fn write_loop(
        mut self,
        dst: &TcpStream,
        mut queue: mpsc::Receiver<Chunk>,
    ) -> Result<(), ConnEnd> {
        let counters = &self.link.counters;
        let pacer = self.link.pacer(self.direction);
        while let Some(chunk) = queue.recv().await {
            timer::sleep_until(chunk.deliver_at).await;
            if chunk.bytes.is_empty() {
                until_flowing(&mut self.state).await;
                socket2::SockRef::from(dst)
                    .shutdown(std::net::Shutdown::Write)
                    .map_err(self.io_error("half-close"))?;
                return Ok(());
            }
            let mut rest = &chunk.bytes[..];
            while !rest.is_empty() {
                let bytes_per_s = self.state.borrow().faults.direction(self.direction).bandwidth_bytes_per_s;
                let len = pace_slice(bytes_per_s, rest.len());
                pacer.pace(len, bytes_per_s).await;
                until_flowing(&mut self.state).await;
                write_all(dst, &rest[..len]).await.map_err(self.io_error("write"))?;
                stats::add(&counters.direction(self.direction).bytes_written, len);
                rest = &rest[len..];
            }
        }
        // The reader only drops its end after an error, which ends the
        // connection before this is reached; nothing to pass on.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delay_stays_within_latency_plus_minus_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        let f =
            DirectionFaults { latency_ms: 50, jitter_ms: 10, bandwidth_bytes_per_s: 0, black_hole: false };
        for _ in 0..1000 {
            let d = one_way_delay(&f, &mut rng);
            assert!(d >= Duration::from_millis(40) && d <= Duration::from_millis(60), "{d:?}");
        }
        let f = DirectionFaults { latency_ms: 2, jitter_ms: 10, bandwidth_bytes_per_s: 0, black_hole: false };
        for _ in 0..1000 {
            assert!(one_way_delay(&f, &mut rng) <= Duration::from_millis(12));
        }
    }

    #[test]
    fn pace_slices_are_about_50ms_of_the_cap() {
        assert_eq!(pace_slice(0, 9000), 9000);
        assert_eq!(pace_slice(100_000, 9000), 5000);
        assert_eq!(pace_slice(1024, 9000), PACE_SLICE_BYTES_MIN);
        assert_eq!(pace_slice(10_000_000, 9000), 9000);
    }
}
