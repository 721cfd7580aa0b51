//! One proxied link: a listener, the upstream it forwards to, its faults and
//! its connections.
//!
//! Every connection is one task (no per-direction tasks), so ending it drops
//! everything it holds at once. The task races the four halves of its two
//! directions (see [`crate::pump`]) against the link's control signals: the
//! reset action, a heal after the partition dropped its bytes, and shutdown.
//! Whenever the proxy ends a connection itself, it closes both sockets with
//! SO_LINGER 0 (an RST), never a FIN: a FIN after discarded bytes would let a
//! peer mistake a cut stream for a complete one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::faults::{Direction, FaultsError, FaultsPatch, LinkFaults};
use crate::pump::{self, ConnEnd, Pacer, Pump, CHUNK_BYTES_MAX};
use crate::stats::{Counters, LinkStats};

/// Pause after a failed `accept` (for example out of file descriptors), so a
/// persistent error does not spin, in milliseconds.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;

/// How long shutdown waits for connections to close before abandoning them,
/// in milliseconds.
const SHUTDOWN_WAIT_MS: u64 = 5_000;

/// Bounds and knobs of one link, fixed when it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Bytes held per connection per direction (delay queue, stall and
    /// pacing together), in bytes. A full queue stops reading from the
    /// sender: back-pressure, not unbounded buffering. With latency this is
    /// also the window: throughput per connection is at most
    /// `queue_bytes_max / latency`. At least 16 KiB (one read chunk).
    pub queue_bytes_max: usize,
    /// Chunks held per connection per direction; bounds the bookkeeping when
    /// the sender writes many tiny messages.
    pub queue_chunks_max: usize,
    /// Open connections per link. At the bound the listener stops accepting
    /// and new clients wait in the kernel's backlog.
    pub connections_max: usize,
    /// Time allowed to dial the upstream, in milliseconds; on failure the
    /// client is reset, as if the upstream refused it.
    pub upstream_connect_timeout_ms: u64,
    /// Seed of the jitter samples (each connection derives its own from it
    /// and its sequence number); `None` draws one from the OS.
    pub jitter_seed: Option<u64>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            queue_bytes_max: 1024 * 1024,
            queue_chunks_max: 4096,
            connections_max: 1024,
            upstream_connect_timeout_ms: 5_000,
            jitter_seed: None,
        }
    }
}

impl ProxyOptions {
    /// Rejects bounds that cannot work, naming the field.
    pub fn validate(&self) -> Result<(), Error> {
        if self.queue_bytes_max < CHUNK_BYTES_MAX {
            return Err(Error::Options(format!(
                "queue_bytes_max = {}: must be at least {CHUNK_BYTES_MAX} (one read chunk)",
                self.queue_bytes_max
            )));
        }
        if u32::try_from(self.queue_bytes_max).is_err() {
            return Err(Error::Options(format!(
                "queue_bytes_max = {}: must fit in 32 bits",
                self.queue_bytes_max
            )));
        }
        if self.queue_chunks_max == 0 {
            return Err(Error::Options("queue_chunks_max = 0: must be at least 1".into()));
        }
        if self.connections_max == 0 || self.connections_max > Semaphore::MAX_PERMITS {
            return Err(Error::Options(format!(
                "connections_max = {}: must be at least 1",
                self.connections_max
            )));
        }
        if self.upstream_connect_timeout_ms == 0 {
            return Err(Error::Options("upstream_connect_timeout_ms = 0: must be at least 1".into()));
        }
        Ok(())
    }
}

/// What every task of a link watches: its faults and its control signals.
#[derive(Clone, Debug, Default)]
pub(crate) struct LinkState {
    pub(crate) faults: LinkFaults,
    /// Grows at every reset action; a connection accepted under an older
    /// epoch is reset.
    pub(crate) reset_epoch: u64,
    /// Set once, by shutdown.
    pub(crate) shutting_down: bool,
}

/// What the tasks of a link share.
#[derive(Debug)]
pub(crate) struct Shared {
    upstream: SocketAddr,
    options: ProxyOptions,
    pub(crate) counters: Arc<Counters>,
    /// One pacer per direction, shared by all connections: the bandwidth cap
    /// is the link's, not each connection's.
    pacers: [Pacer; 2],
}

impl Shared {
    pub(crate) fn pacer(&self, direction: Direction) -> &Pacer {
        match direction {
            Direction::ToUpstream => &self.pacers[0],
            Direction::ToClient => &self.pacers[1],
        }
    }
}

/// What the halves of one connection share with its supervisor.
#[derive(Debug, Default)]
pub(crate) struct ConnShared {
    /// Per direction (client to upstream, upstream to client): a partition
    /// or a one-way black hole dropped bytes (or the FIN) of that stream,
    /// so it has a gap and must never deliver again. The other direction
    /// is a separate byte stream and may flow on.
    lost: [AtomicBool; 2],
    /// Wakes the supervisor when a direction is first marked lost.
    notify: Notify,
}

fn direction_index(direction: Direction) -> usize {
    match direction {
        Direction::ToUpstream => 0,
        Direction::ToClient => 1,
    }
}

impl ConnShared {
    pub(crate) fn mark_lost(&self, direction: Direction) {
        if !self.lost[direction_index(direction)].swap(true, Ordering::AcqRel) {
            self.notify.notify_one();
        }
    }

    /// Whether bytes of `direction` were dropped.
    pub(crate) fn lost_in(&self, direction: Direction) -> bool {
        self.lost[direction_index(direction)].load(Ordering::Acquire)
    }

    /// Whether bytes of either direction were dropped.
    pub(crate) fn lost(&self) -> bool {
        Direction::BOTH.iter().any(|d| self.lost_in(*d))
    }
}

/// Starts links. See [`ProxyHandle`] for what a running link offers.
pub struct Proxy;

impl Proxy {
    /// Binds `listen` (port 0 picks a free port) and forwards every accepted
    /// connection to `upstream` through `faults`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        faults: LinkFaults,
    ) -> Result<ProxyHandle, Error> {
        Self::start_with(listen, upstream, faults, ProxyOptions::default()).await
    }

    /// [`Proxy::start`] with explicit bounds.
    pub async fn start_with(
        listen: SocketAddr,
        upstream: SocketAddr,
        faults: LinkFaults,
        options: ProxyOptions,
    ) -> Result<ProxyHandle, Error> {
        let listener =
            TcpListener::bind(listen).await.map_err(|source| Error::Bind { addr: listen, source })?;
        Self::start_on(listener, upstream, faults, options)
    }

    /// Runs a link on a listener the caller bound (tests, socket activation).
    pub fn start_on(
        listener: TcpListener,
        upstream: SocketAddr,
        faults: LinkFaults,
        options: ProxyOptions,
    ) -> Result<ProxyHandle, Error> {
        faults.validate()?;
        options.validate()?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| Error::Bind { addr: SocketAddr::from(([0, 0, 0, 0], 0)), source })?;
        let (state, state_rx) = watch::channel(LinkState { faults, ..Default::default() });
        let shared = Arc::new(Shared {
            upstream,
            options,
            counters: Arc::new(Counters::default()),
            pacers: Default::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone(), state_rx));
        info!(%local_addr, %upstream, "link started");
        Ok(ProxyHandle {
            inner: Arc::new(HandleInner { local_addr, shared, state, accept: Mutex::new(Some(accept)) }),
        })
    }
}

/// A running link. Cheap to clone; every clone controls the same link.
/// Dropping the last clone stops the link without waiting; call
/// [`ProxyHandle::shutdown`] to wait until it has stopped.
#[derive(Clone, Debug)]
pub struct ProxyHandle {
    inner: Arc<HandleInner>,
}

#[derive(Debug)]
struct HandleInner {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    /// Faults and control signals; dropping it tells every task to stop.
    state: watch::Sender<LinkState>,
    /// The accept loop, taken by the first shutdown to wait on it.
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl ProxyHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The address the link dials.
    pub fn upstream(&self) -> SocketAddr {
        self.inner.shared.upstream
    }

    /// The current faults.
    pub fn faults(&self) -> LinkFaults {
        self.inner.state.borrow().faults.clone()
    }

    /// Replaces the faults. Existing connections follow at once: chunks read
    /// from now on get the new latency (chunks already scheduled keep their
    /// time, as packets already on the wire would); stall, partition and
    /// bandwidth apply to the next byte written.
    pub fn set_faults(&self, faults: LinkFaults) -> Result<(), FaultsError> {
        faults.validate()?;
        self.inner.state.send_modify(|s| s.faults = faults);
        Ok(())
    }

    /// Changes only the fields `patch` names; returns the resulting faults.
    pub fn apply(&self, patch: &FaultsPatch) -> Result<LinkFaults, FaultsError> {
        let mut result = Ok(LinkFaults::default());
        self.inner.state.send_if_modified(|s| match patch.apply(&s.faults) {
            Ok(faults) => {
                result = Ok(faults.clone());
                let changed = s.faults != faults;
                s.faults = faults;
                changed
            }
            Err(e) => {
                result = Err(e);
                false
            }
        });
        result
    }

    /// Clears partition, stall, refuse and bandwidth caps, keeping latency and
    /// jitter; returns the resulting faults.
    pub fn heal(&self) -> LinkFaults {
        let mut healed = LinkFaults::default();
        self.inner.state.send_modify(|s| {
            s.faults = s.faults.healed();
            healed = s.faults.clone();
        });
        healed
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> LinkStats {
        self.inner.shared.counters.snapshot()
    }

    /// Closes every current connection with an RST (both the client's and
    /// the upstream's socket). New connections are served unless `refuse` is
    /// set. Returns how many connections were open when asked; they close
    /// within moments, not before this returns.
    pub fn reset_all(&self) -> u64 {
        self.reset(None)
    }

    /// [`ProxyHandle::reset_all`], also setting or clearing `refuse` in the
    /// same step, so no new connection slips in between.
    pub fn reset(&self, refuse: Option<bool>) -> u64 {
        let active = self.stats().connections_active;
        self.inner.state.send_modify(|s| {
            s.reset_epoch += 1;
            if let Some(refuse) = refuse {
                s.faults.refuse = refuse;
            }
        });
        info!(local_addr = %self.inner.local_addr, active, ?refuse, "reset");
        active
    }

    /// Stops accepting, closes every connection with an RST (queued bytes are
    /// discarded) and waits until all of it is done, at most a few seconds.
    /// Idempotent.
    pub async fn shutdown(&self) {
        self.inner.state.send_modify(|s| s.shutting_down = true);
        let accept = self.inner.accept.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(accept) = accept {
            if let Err(e) = accept.await {
                warn!(local_addr = %self.inner.local_addr, "accept loop ended badly: {e}");
            }
            info!(local_addr = %self.inner.local_addr, "link stopped");
        }
    }
}

/// Waits until the link shuts down (or its handle is gone).
async fn until_shutdown(state: &mut watch::Receiver<LinkState>) {
    let _ = state.wait_for(|s| s.shutting_down).await;
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut state: watch::Receiver<LinkState>) {
    let slots = Arc::new(Semaphore::new(shared.options.connections_max));
    let mut conns = JoinSet::new();
    let seed = shared.options.jitter_seed.unwrap_or_else(rand::random);
    let mut seq: u64 = 0;
    loop {
        // Finished connections leave the set here, so it never holds more
        // than connections_max tasks.
        while conns.try_join_next().is_some() {}
        let slot = tokio::select! {
            biased;
            () = until_shutdown(&mut state) => break,
            slot = slots.clone().acquire_owned() => slot.expect("the slot semaphore is never closed"),
        };
        let accepted = tokio::select! {
            biased;
            () = until_shutdown(&mut state) => break,
            accepted = listener.accept() => accepted,
        };
        let (client, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(local_addr = ?listener.local_addr().ok(), "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        shared.counters.connections_accepted.fetch_add(1, Ordering::Relaxed);
        let (refuse, epoch) = {
            let s = state.borrow();
            (s.faults.refuse, s.reset_epoch)
        };
        if refuse {
            shared.counters.connections_refused.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = client.set_zero_linger() {
                warn!(%peer, "setting SO_LINGER 0 to refuse: {e}");
            }
            debug!(%peer, "refused");
            continue;
        }
        // Chunks are delayed on purpose; Nagle would add its own delay on top.
        if let Err(e) = client.set_nodelay(true) {
            debug!(%peer, "setting TCP_NODELAY: {e}");
        }
        seq += 1;
        let rng = StdRng::seed_from_u64(seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        conns.spawn(serve_connection(client, peer, epoch, shared.clone(), state.clone(), rng, slot));
    }
    drop(listener);
    // Each connection sees shutting_down and resets itself; wait for them,
    // then abandon (abort) any that do not finish in time.
    let wait = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_millis(SHUTDOWN_WAIT_MS), wait).await.is_err() {
        warn!(open = conns.len(), "connections did not close in time; aborting them");
        conns.shutdown().await;
    }
}

/// Counts a connection as active for as long as it lives, however it ends.
struct ActiveGuard(Arc<Counters>);

impl ActiveGuard {
    fn new(counters: &Arc<Counters>) -> Self {
        counters.connections_active.fetch_add(1, Ordering::Relaxed);
        ActiveGuard(counters.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(
    client: TcpStream,
    peer: SocketAddr,
    epoch: u64,
    shared: Arc<Shared>,
    state: watch::Receiver<LinkState>,
    rng: StdRng,
    _slot: OwnedSemaphorePermit,
) {
    let _active = ActiveGuard::new(&shared.counters);
    let conn = ConnShared::default();
    // Set once the upstream is dialled; kept here so the reset path can
    // reach it after the pumps are gone.
    let upstream: OnceLock<TcpStream> = OnceLock::new();
    let outcome = tokio::select! {
        outcome = pump_both(&client, &upstream, &conn, &shared, &state, rng) => outcome,
        end = control(state.clone(), epoch, &conn) => Err(end),
    };
    match outcome {
        Ok(()) => debug!(%peer, "connection closed by both sides"),
        Err(end) => {
            debug!(%peer, "resetting connection: {end}");
            shared.counters.connections_reset.fetch_add(1, Ordering::Relaxed);
            for socket in std::iter::once(&client).chain(upstream.get()) {
                if let Err(e) = socket.set_zero_linger() {
                    debug!(%peer, "setting SO_LINGER 0: {e}");
                }
            }
        }
    }
    // Dropping the sockets closes them: FINs were already sent on a clean
    // end; with SO_LINGER 0 the close is an RST.
}

/// Ends the connection when the link says so.
async fn control(mut state: watch::Receiver<LinkState>, epoch: u64, conn: &ConnShared) -> ConnEnd {
    loop {
        {
            let s = state.borrow_and_update();
            if s.shutting_down {
                return ConnEnd::Shutdown;
            }
            if s.reset_epoch != epoch {
                return ConnEnd::ResetAction;
            }
            if conn.lost() && !s.faults.dropping_any() {
                return ConnEnd::HealedAfterLoss;
            }
        }
        tokio::select! {
            changed = state.changed() => if changed.is_err() {
                return ConnEnd::Shutdown;
            },
            () = conn.notify.notified() => {}
        }
    }
}

/// Dials the upstream once bytes may flow: a partitioned or stalled link
/// lets no connection through, as SYNs would be lost or held.
async fn dial(shared: &Shared, state: &watch::Receiver<LinkState>) -> Result<TcpStream, ConnEnd> {
    pump::until_flowing(&mut state.clone()).await;
    let timeout = Duration::from_millis(shared.options.upstream_connect_timeout_ms);
    let upstream = match tokio::time::timeout(timeout, TcpStream::connect(shared.upstream)).await {
        Ok(Ok(upstream)) => upstream,
        Ok(Err(e)) => return Err(ConnEnd::Dial(e)),
        Err(_) => return Err(ConnEnd::Dial(std::io::ErrorKind::TimedOut.into())),
    };
    if let Err(e) = upstream.set_nodelay(true) {
        debug!("setting TCP_NODELAY upstream: {e}");
    }
    Ok(upstream)
}

/// Both directions of a connection, until both ends have closed cleanly or
/// one side fails.
async fn pump_both(
    client: &TcpStream,
    upstream_cell: &OnceLock<TcpStream>,
    conn: &ConnShared,
    shared: &Shared,
    state: &watch::Receiver<LinkState>,
    rng: StdRng,
) -> Result<(), ConnEnd> {
    let options = &shared.options;
    let pump = |direction| Pump { direction, link: shared, conn, state: state.clone() };
    let (to_upstream_tx, to_upstream_rx) = pump::queue(options.queue_bytes_max, options.queue_chunks_max);
    let (to_client_tx, to_client_rx) = pump::queue(options.queue_bytes_max, options.queue_chunks_max);
    // Its own generator, so the two directions do not draw the same jitter.
    let mut rng = rng;
    let to_client_rng = StdRng::seed_from_u64(rng.random());
    // The client's bytes are read (and delayed, or dropped) from the start;
    // they wait in the queue while the upstream is dialled.
    let client_reader = pump(Direction::ToUpstream).read_loop(client, to_upstream_tx, rng);
    let rest = async {
        let dialled = dial(shared, state).await?;
        let upstream = upstream_cell.get_or_init(|| dialled);
        tokio::try_join!(
            pump(Direction::ToUpstream).write_loop(upstream, to_upstream_rx),
            pump(Direction::ToClient).read_loop(upstream, to_client_tx, to_client_rng),
            pump(Direction::ToClient).write_loop(client, to_client_rx),
        )?;
        Ok::<(), ConnEnd>(())
    };
    tokio::try_join!(client_reader, rest)?;
    Ok(())
}
