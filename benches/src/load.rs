//! The closed loop: N client tasks, each with its own connection, each
//! sending its next operation as soon as the previous one answered.
//!
//! Every task runs a warmup (not recorded) then the measured window, and
//! stops by itself at the window's end; the runner aborts any task still
//! running `op_timeout` plus a grace period later. Each task records into
//! its own histogram, merged at the end, so recording takes no lock.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::target::{Conn, Running, TargetKind};

/// Highest latency the histograms track, in microseconds; longer operations
/// are recorded at this value. Above any `op_timeout` the tool accepts.
const LATENCY_US_MAX: u64 = 120_000_000;
/// Time after the window's end (beyond `op_timeout`) before tasks are aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Pause after a failed operation, so a target that is down is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Concurrent writers of the preload.
const PRELOAD_CLIENTS: usize = 32;
/// Longest the preload may take before the run fails (10M keys load in a
/// few minutes batched).
const PRELOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The load's shape: identical for every target of a run.
#[derive(Debug, Clone)]
pub struct Shape {
    /// Share of operations that are puts (the rest are gets), 0..=1.
    pub put_ratio: f64,
    pub value_bytes: usize,
    /// Keys are drawn uniformly from `0..keys`.
    pub keys: u64,
    pub warmup: Duration,
    pub duration: Duration,
    /// Deadline of one operation; a slower one counts as an error.
    pub op_timeout: Duration,
    /// Seeds each client's key and operation choices (client i uses seed + i).
    pub seed: u64,
    /// Connections the clients share, where the protocol multiplexes; None
    /// gives every client its own.
    pub connections: Option<usize>,
}

/// The key of index `i`: fixed width, so every target stores the same bytes.
pub fn key(i: u64) -> Vec<u8> {
    format!("bench/{i:012}").into_bytes()
}

/// What one run (one target, one client count) measured.
pub struct Measured {
    pub target: TargetKind,
    pub clients: usize,
    /// Operations that completed successfully inside the window.
    pub ops: u64,
    /// Operations that failed or timed out inside the window.
    pub errors: u64,
    pub window: Duration,
    /// Latency of the successful operations, in microseconds.
    pub latency_us: Histogram<u64>,
    /// The first failure any client saw, warmup included, to explain errors.
    pub first_error: Option<String>,
    /// CPU seconds (user + system) the target's server processes used in
    /// the window; None when this tool did not start them.
    pub server_cpu_s: Option<f64>,
}

impl Measured {
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.window.as_secs_f64()
    }

    /// Server CPU per successful operation in microseconds (the same
    /// number as CPU milliseconds per 1,000 operations).
    pub fn server_cpu_us_per_op(&self) -> Option<f64> {
        let cpu = self.server_cpu_s?;
        (self.ops > 0).then(|| cpu * 1e6 / self.ops as f64)
    }

    /// Latency at `quantile` in milliseconds; 0 when nothing succeeded.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static histogram bounds are valid")
}

/// One client's tallies.
struct ClientStats {
    latency_us: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Runs `clients` closed-loop clients against `running` for the shape's
/// warmup plus duration.
pub async fn run(running: &Running, shape: &Shape, clients: usize) -> Result<Measured> {
    let own = shape.connections.unwrap_or(clients).min(clients);
    let mut conns: Vec<Conn> = Vec::with_capacity(clients);
    for i in 0..clients {
        let shared = if i >= own { conns[i % own].share() } else { None };
        let conn = match shared {
            Some(c) => c,
            None => {
                running.connect().await.with_context(|| format!("opening connection {i} of {clients}"))?
            }
        };
        conns.push(conn);
    }
    let start = Instant::now();
    let measure_from = start + shape.warmup;
    let end = measure_from + shape.duration;
    let mut tasks = JoinSet::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let shape = shape.clone();
        tasks.spawn(client_loop(conn, shape, i as u64, measure_from, end));
    }
    // The servers' CPU time over exactly the measured window.
    let pids = running.server_pids();
    let cpu_at = |t: Instant| {
        let pids = pids.clone();
        async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
            if pids.is_empty() {
                None
            } else {
                crate::process::cpu_seconds_of(&pids)
            }
        }
    };
    let cpu_start = cpu_at(measure_from).await;
    let cpu_end = cpu_at(end).await;
    let server_cpu_s = cpu_start.zip(cpu_end).map(|(a, b)| (b - a).max(0.0));
    let hard_stop = tokio::time::Instant::from_std(end + shape.op_timeout + STOP_GRACE);
    let mut merged = ClientStats { latency_us: histogram(), ops: 0, errors: 0, first_error: None };
    loop {
        match tokio::time::timeout_at(hard_stop, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(joined)) => {
                let stats = joined.context("a load client panicked")?;
                merged.latency_us.add(&stats.latency_us).context("merging latency histograms")?;
                merged.ops += stats.ops;
                merged.errors += stats.errors;
                merged.first_error = merged.first_error.or(stats.first_error);
            }
            Err(_) => {
                tasks.abort_all();
                bail!("{} load clients were still running {STOP_GRACE:?} after their deadline", tasks.len());
            }
        }
    }
    Ok(Measured {
        target: running.kind(),
        clients,
        ops: merged.ops,
        errors: merged.errors,
        window: shape.duration,
        latency_us: merged.latency_us,
        first_error: merged.first_error,
        server_cpu_s,
    })
}

async fn client_loop(
    mut conn: Conn,
    shape: Shape,
    index: u64,
    measure_from: Instant,
    end: Instant,
) -> ClientStats {
    let mut rng = StdRng::seed_from_u64(shape.seed.wrapping_add(index));
    let mut value = vec![0u8; shape.value_bytes];
    rng.fill(&mut value[..]);
    let mut stats = ClientStats { latency_us: histogram(), ops: 0, errors: 0, first_error: None };
    // Bounded by `end`: every pass takes time, and the check comes first.
    while Instant::now() < end {
        let key_index = rng.random_range(0..shape.keys);
        let key = key(key_index);
        let is_put = rng.random_bool(shape.put_ratio);
        let started = Instant::now();
        let result = if is_put {
            tokio::time::timeout(shape.op_timeout, conn.put(key_index, &key, &value)).await
        } else {
            tokio::time::timeout(shape.op_timeout, conn.get(key_index, &key)).await
        };
        let finished = Instant::now();
        let outcome = match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err(format!("no answer within {:?}", shape.op_timeout)),
        };
        let counted = started >= measure_from && finished <= end;
        match outcome {
            Ok(()) if counted => {
                let us = u64::try_from((finished - started).as_micros()).unwrap_or(u64::MAX);
                stats.latency_us.saturating_record(us.max(1));
                stats.ops += 1;
            }
            Ok(()) => {}
            Err(e) => {
                if counted {
                    stats.errors += 1;
                }
                stats.first_error.get_or_insert(e);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
    stats
}

/// Writes keys `0..count` once, so gets find values of the configured size:
/// `batch` keys per request (a geokv batch, a Redis MSET), many requests in
/// flight.
pub async fn preload(running: &Running, shape: &Shape, count: u64, batch: usize) -> Result<()> {
    let batch = batch.max(1) as u64;
    let chunks = count.div_ceil(batch);
    let clients = PRELOAD_CLIENTS.min(usize::try_from(chunks).unwrap_or(usize::MAX)).max(1);
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for i in 0..clients {
        let mut conn = running.connect().await.context("opening a preload connection")?;
        let (stride, op_timeout) = (clients as u64, shape.op_timeout);
        let value = vec![b'p'; shape.value_bytes];
        tasks.spawn(async move {
            let mut chunk = i as u64;
            while chunk < chunks {
                let first = chunk * batch;
                let keys: Vec<(u64, Vec<u8>)> =
                    (first..(first + batch).min(count)).map(|k| (k, key(k))).collect();
                tokio::time::timeout(op_timeout, conn.put_many(&keys, &value))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!("preload of keys from {first} took longer than {op_timeout:?}")
                    })?
                    .with_context(|| format!("preload of {} keys from {first}", keys.len()))?;
                chunk += stride;
            }
            anyhow::Ok(())
        });
    }
    let deadline = tokio::time::Instant::from_std(started + PRELOAD_TIMEOUT);
    while let Some(joined) = tokio::time::timeout_at(deadline, tasks.join_next())
        .await
        .map_err(|_| anyhow::anyhow!("preload of {count} keys took longer than {PRELOAD_TIMEOUT:?}"))?
    {
        joined.context("a preload task panicked")??;
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{}: preloaded {count} keys in {secs:.1} s ({:.0} keys/s, {batch} per request)",
        running.kind(),
        count as f64 / secs.max(1e-9)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_a_fixed_width() {
        assert_eq!(key(7), b"bench/000000000007".to_vec());
        assert_eq!(key(0).len(), key(999_999_999_999).len());
    }
}
