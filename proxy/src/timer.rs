//! Delivery times kept to tens of microseconds.
//!
//! tokio's timer works in whole milliseconds: a sleep ends on the first
//! millisecond tick after its deadline, and the runtime's `epoll_wait`
//! timeout is itself rounded up to a millisecond. A delayed chunk therefore
//! arrived 1-2 ms late in each direction, and an emulated 80 ms round trip
//! measured about 83 ms. The proxy's links are what latency targets are
//! measured against, so their delays must be the configured ones.
//!
//! A chunk's wait is split: tokio's timer covers all but the last
//! [`COARSE_MARGIN`], and one timer thread per process, parked on a futex
//! with a microsecond timeout, wakes the waiter at the deadline itself.
//! Waits shorter than the margin go to the thread directly. The thread only
//! ever holds the few chunks that are within the margin of their deadline.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The part of a wait left to the precise thread.
const COARSE_MARGIN: Duration = Duration::from_millis(3);

/// A waiter: woken (its sender dropped or used) at `at`.
struct Entry {
    at: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Waiters {
    heap: BinaryHeap<Reverse<Entry>>,
    next_seq: u64,
}

/// The process's precise timer: a heap of waiters and the thread that
/// wakes them.
struct Timer {
    waiters: Mutex<Waiters>,
    changed: Condvar,
}

impl Timer {
    /// The process's timer, started on first use; `None` if its thread
    /// could not be spawned (waits then stay on tokio's timer).
    fn get() -> Option<&'static Arc<Timer>> {
        static TIMER: OnceLock<Option<Arc<Timer>>> = OnceLock::new();
        TIMER
            .get_or_init(|| {
                let timer =
                    Arc::new(Timer { waiters: Mutex::new(Waiters::default()), changed: Condvar::new() });
                let t = timer.clone();
                // Detached: it lives as long as the process and holds
                // nothing but wake-ups.
                match std::thread::Builder::new().name("proxy-timer".into()).spawn(move || t.run()) {
                    Ok(_) => Some(timer),
                    Err(e) => {
                        tracing::warn!(error = %e, "no precise timer thread; delays may end up to 2 ms late");
                        None
                    }
                }
            })
            .as_ref()
    }

    fn run(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let now = Instant::now();
            while w.heap.peek().is_some_and(|Reverse(e)| e.at <= now) {
                if let Some(Reverse(e)) = w.heap.pop() {
                    // A waiter that went away (its connection ended) has
                    // dropped its receiver; nothing to do then.
                    let _ = e.wake.send(());
                }
            }
            w = match w.heap.peek().map(|Reverse(e)| e.at) {
                Some(at) => {
                    self.changed
                        .wait_timeout(w, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(w).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    fn register(&self, at: Instant) -> oneshot::Receiver<()> {
        let (wake, rx) = oneshot::channel();
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        let seq = w.next_seq;
        w.next_seq = w.next_seq.wrapping_add(1);
        let earliest = w.heap.peek().is_none_or(|Reverse(e)| at < e.at);
        w.heap.push(Reverse(Entry { at, seq, wake }));
        drop(w);
        if earliest {
            self.changed.notify_one();
        }
        rx
    }
}

/// Waits until `deadline`, ending within tens of microseconds after it
/// (scheduling permitting) rather than up to 2 ms after it.
pub(crate) async fn sleep_until(deadline: tokio::time::Instant) {
    let deadline = deadline.into_std();
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    if deadline - now > COARSE_MARGIN {
        tokio::time::sleep_until((deadline - COARSE_MARGIN).into()).await;
    }
    if Instant::now() < deadline {
        // The timer thread never drops a sender before its deadline, so
        // an error can only mean the thread is gone. Without the thread the
        // deadline is kept by tokio's timer, late but never early.
        let woken = match Timer::get() {
            Some(timer) => timer.register(deadline).await.is_ok(),
            None => false,
        };
        if !woken {
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Median lateness of `n` waits of assorted lengths through `sleep`.
    async fn median_lateness<F, Fut>(n: u64, sleep: F) -> Duration
    where
        F: Fn(tokio::time::Instant) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut late = Vec::new();
        for i in 0..n {
            let deadline = tokio::time::Instant::now() + Duration::from_micros(500 + 997 * (i % 9));
            sleep(deadline).await;
            let now = tokio::time::Instant::now();
            assert!(now >= deadline, "woke {:?} early", deadline - now);
            late.push(now - deadline);
        }
        late.sort();
        late[late.len() / 2]
    }

    #[tokio::test]
    async fn never_early_and_later_than_tokio_timer_less_often() {
        // Measured against tokio's own timer in the same run, so a loaded
        // machine slows both alike.
        let precise = median_lateness(40, sleep_until).await;
        let coarse = median_lateness(40, tokio::time::sleep_until).await;
        assert!(precise < coarse, "median lateness {precise:?}, tokio's timer {coarse:?}");
    }

    #[tokio::test]
    async fn many_waiters_each_wake_at_or_after_their_deadline() {
        let base = tokio::time::Instant::now() + Duration::from_millis(5);
        let mut tasks = Vec::new();
        for i in (0..20u64).rev() {
            let at = base + Duration::from_micros(300 * i);
            tasks.push(tokio::spawn(async move {
                sleep_until(at).await;
                (i, tokio::time::Instant::now())
            }));
        }
        for t in tasks {
            let (i, woke) = t.await.unwrap();
            assert!(woke >= base + Duration::from_micros(300 * i), "waiter {i} woke early");
        }
    }
}
