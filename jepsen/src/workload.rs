//! Workloads: clients in several regions doing operations and recording
//! each one's invocation and completion.
//!
//! - **register**: reads and writes of unique values on a few keys of an
//!   LWW table homed in the first region. Until STRONG exists (issue 4)
//!   every client, wherever it stands, sends to the home region's node at
//!   LOCAL, which makes the register linearizable without failover; CAS
//!   waits for issue 4.
//! - **counter**: increments at EVENTUAL in every region, reads at LOCAL.
//! - **counter-retry**: increments at LOCAL (so each goes to the home's
//!   holder, wherever the client stands), each with its own idempotency key
//!   and retried with that key until acknowledged or [`RETRY_OP_TIMEOUT`]
//!   passes, so retries cross the failovers the nemesis causes: a retry may
//!   land at a new holder after the old one applied the original. The
//!   counter must still count every increment once.
//! - **quorum-counter**: increments at QUORUM in every region, reads at LOCAL.
//! - **set**: adds and removes (no context) at EVENTUAL, reads at LOCAL.
//! - **residency**: EU-resident rows (`eu_users`, zone eu) written and read
//!   from every region; outside the zone every operation must be refused.
//! - **watch**: EVENTUAL writes of unique values to last-writer-wins rows
//!   in every region, each key written by one client only (`user:<client>:<n>`
//!   under the watched prefix, `item:<client>:<n>` outside it), while a
//!   watcher in [`WATCH_REGION`] follows the prefix's change feed and
//!   resumes from its last cursor whenever its stream breaks
//!   (`crate::watcher`). The checker (`checker::watch`) holds every event
//!   against the history of acknowledged writes.
//! - **big-rows**: blind (context-less) EVENTUAL puts of values near the
//!   value limit to a few hot keys from every region, some writes that
//!   resolve the siblings with a read's context, and reads. The nodes run
//!   with small row limits ([`node_config`]), so rows hit them all the time:
//!   a put is accepted or refused with `ROW_TOO_LARGE` / `TOO_MANY_SIBLINGS`,
//!   and replication of rows merged past the limit must not wedge.
//!
//! Each workload declares the regions it depends on ([`dependencies`]):
//! the fault schedule aims at them and a run that never faulted one of
//! them fails as vacuous.
//!
//! Outcomes: `ok`; `fail` only when the server said the operation was
//! refused before it could apply (invalid, residency, level unavailable,
//! ...); `unknown` for everything else after the request was sent
//! (deadline, transport error, unavailable, internal).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geokv_client::{Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cluster::{
    zones, EU_LOCALITIES, EU_ZONE, TABLE_COUNTERS, TABLE_EU_USERS, TABLE_REGISTERS, TABLE_SETS,
    TABLE_STRONG_REGISTERS, TABLE_WATCHED,
};
use crate::history::{Ack, Kind, Recorder, Value, F};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadKind {
    Register,
    /// Register at STRONG (a consensus group per home), with CAS.
    StrongRegister,
    Counter,
    /// LOCAL increments retried with their idempotency key across failovers.
    CounterRetry,
    /// QUORUM increments.
    QuorumCounter,
    Set,
    Residency,
    /// Hot keys with values near the limits (docs/decisions/015-bounded-rows.md).
    BigRows,
    /// Writes in every region watched through a change feed.
    Watch,
}

impl WorkloadKind {
    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::StrongRegister => "strong-register",
            WorkloadKind::Counter => "counter",
            WorkloadKind::CounterRetry => "counter-retry",
            WorkloadKind::QuorumCounter => "quorum-counter",
            WorkloadKind::Set => "set",
            WorkloadKind::Residency => "residency",
            WorkloadKind::BigRows => "big-rows",
            WorkloadKind::Watch => "watch",
        }
    }
}

/// Why a scenario depends on a region: what a fault there puts to the test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Home of the workload's table: it orders the table's writes.
    Home,
    /// The leader the table's consensus group prefers (STRONG).
    Leader,
    /// A region whose node the workload's clients send to, and which
    /// accepts their writes.
    Entry,
    /// A region of the residency zone the workload's rows must stay in.
    Zone,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Home => "home",
            Role::Leader => "leader",
            Role::Entry => "entry",
            Role::Zone => "zone",
        }
    }
}

/// The region whose node a client standing in `standing` sends to: the
/// LOCAL register's clients all send to the registers' home (`regions[0]`,
/// see `cluster::node_config`), every other workload's to their own region.
pub fn entry_region<'a>(kind: WorkloadKind, regions: &'a [String], standing: &'a str) -> &'a str {
    match kind {
        WorkloadKind::Register => &regions[0],
        _ => standing,
    }
}

/// The regions a scenario of `kind` depends on, and why. A fault schedule
/// must touch at least one of them (`nemesis::schedule` aims at them, and a
/// run whose installed faults never touched one fails as vacuous:
/// `checker::coverage`).
///
/// - register: the home (`regions[0]`), which is also every client's entry.
/// - strong-register: the home and preferred leader of the consensus group
///   (`regions[0]`). Its clients enter in every region, but a fault on a
///   follower alone never moves the leader, so entries do not count here.
/// - counter, quorum-counter, set, big-rows, watch: every region (each is
///   an entry and accepts writes; under watch, a change cut off in any
///   region must still reach the watcher after the heal).
/// - counter-retry: the counters' home (`regions[0]`): its holder applies
///   every increment, and a fault there is what makes retries cross a
///   failover.
/// - residency: the regions of the EU zone, the only ones that hold and
///   accept `eu_users` rows.
pub fn dependencies(kind: WorkloadKind, regions: &[String]) -> BTreeMap<String, Vec<Role>> {
    let mut deps: BTreeMap<String, Vec<Role>> = BTreeMap::new();
    let Some(first) = regions.first() else { return deps };
    match kind {
        WorkloadKind::Register => {
            deps.insert(first.clone(), vec![Role::Home, Role::Entry]);
        }
        WorkloadKind::CounterRetry => {
            deps.insert(first.clone(), vec![Role::Home]);
        }
        WorkloadKind::StrongRegister => {
            deps.insert(first.clone(), vec![Role::Home, Role::Leader]);
        }
        WorkloadKind::Counter
        | WorkloadKind::QuorumCounter
        | WorkloadKind::Set
        | WorkloadKind::BigRows
        | WorkloadKind::Watch => {
            for r in regions {
                deps.insert(r.clone(), vec![Role::Entry]);
            }
        }
        WorkloadKind::Residency => {
            for r in zones(regions).remove(EU_ZONE).unwrap_or_default() {
                deps.insert(r, vec![Role::Zone, Role::Entry]);
            }
        }
    }
    deps
}

/// Node config a workload needs beyond the cluster's (appended to every
/// node's file). Big rows run with a 64 KiB value limit and a 256 KiB row
/// limit, so a few values fill a row and many puts meet the bounds.
pub fn node_config(kind: WorkloadKind) -> String {
    match kind {
        WorkloadKind::BigRows => format!(
            "[limits]\nvalue_bytes_max = {BIG_VALUE_BYTES_MAX}\nrow_bytes_max = {BIG_ROW_BYTES_MAX}\nsiblings_max = 16\n"
        ),
        _ => String::new(),
    }
}

/// Lines for every node's `[consensus]` section. strong-register snapshots
/// its groups every 500 entries and keeps 200 behind (the defaults are
/// 5,000 and 1,000, more than a run writes): snapshots are taken while
/// the faults run, the log is purged behind them, and a member that was
/// killed or cut off for long comes back by installing one (the leader's
/// state machine read from a point-in-time view), all under the
/// linearizability checker.
pub fn consensus_config(kind: WorkloadKind) -> String {
    match kind {
        WorkloadKind::StrongRegister => {
            format!("snapshot_every = {STRONG_SNAPSHOT_EVERY}\nlog_keep = {STRONG_LOG_KEEP}\n")
        }
        _ => String::new(),
    }
}

/// strong-register's `consensus.snapshot_every` and `consensus.log_keep`.
pub const STRONG_SNAPSHOT_EVERY: u64 = 500;
pub const STRONG_LOG_KEEP: u64 = 200;

/// Whether the cluster runs with automatic failover: only counter-retry,
/// whose point is retries that cross an unplanned move of the home (a
/// killed or cut-off holder replaced by another region).
pub fn auto_failover(kind: WorkloadKind) -> bool {
    kind == WorkloadKind::CounterRetry
}

/// Hot keys of the big-rows workload.
pub const BIG_ROW_KEYS: u64 = 2;
/// The nodes' value and row limits under the big-rows workload, in bytes.
pub const BIG_VALUE_BYTES_MAX: usize = 64 << 10;
pub const BIG_ROW_BYTES_MAX: usize = 256 << 10;
/// Big values are drawn from this many bytes up to the value limit.
pub const BIG_VALUE_BYTES_MIN: usize = 40 << 10;

/// Register keys.
pub const REGISTER_KEYS: u64 = 3;
/// The region whose node serves the watch workload's change feed.
pub const WATCH_REGION: &str = "eu-west-1";
/// The prefix the watcher follows; keys under `item:` are written beside it
/// and must never show up in its feed.
pub const WATCH_PREFIX: &str = "user:";
const WATCH_OTHER_PREFIX: &str = "item:";
/// Keys each watch client writes under each prefix.
pub const WATCH_KEYS: u64 = 3;
/// Counter keys.
pub const COUNTER_KEYS: u64 = 2;
/// Set keys, and the elements each draws from.
pub const SET_KEYS: u64 = 2;
pub const SET_ELEMENTS: i64 = 24;
/// Bound on one operation, retries included; past it the outcome is unknown.
pub const OP_TIMEOUT: Duration = Duration::from_secs(8);
/// Bound on one counter-retry increment, all its retries included: longer
/// than a home's lease plus a failover, so retries outlive the old holder.
pub const RETRY_OP_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two retries of one counter-retry increment.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// One logical client: where it stands and which node it sends to.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub name: String,
    /// The region the client stands in.
    pub home: String,
    /// The region whose node it sends to.
    pub region: String,
    pub endpoint: String,
    pub seed: u64,
}

/// Settings shared by every client of a run.
#[derive(Clone)]
pub struct Shared {
    pub kind: WorkloadKind,
    pub recorder: Recorder,
    /// Operations invoked by all clients so far, and the bound.
    pub invoked: Arc<AtomicU64>,
    pub ops_max: u64,
    pub deadline: Instant,
    /// Mean pause between one client's operations.
    pub think: Duration,
    /// Unique values for register writes and residency rows.
    pub next_value: Arc<AtomicU64>,
    /// Regions of the EU zone.
    pub eu: Vec<String>,
}

/// The client config of a workload client: short attempts, a few retries
/// (with the same idempotency key, so a retried write applies once).
pub fn client_config(endpoint: &str) -> ClientConfig {
    let mut cfg = crate::cluster::client_config(endpoint);
    cfg.timeout = Duration::from_millis(2_000);
    cfg.connect_timeout = Duration::from_millis(1_000);
    cfg.retries_max = 2;
    cfg.retry_backoff = Duration::from_millis(100);
    cfg
}

/// Whether an error means the operation cannot have taken effect.
pub fn definite_failure(e: &geokv_client::Error) -> bool {
    use tonic::Code;
    match e.reason.as_deref() {
        Some("LEVEL_UNAVAILABLE") | Some("CLIENT_ERROR") => return true,
        _ => {}
    }
    matches!(
        e.code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// The row of register `key`.
pub fn register_row(key: &str) -> Row {
    Row::new(TABLE_REGISTERS, key.as_bytes().to_vec())
}

pub fn strong_row(key: &str) -> Row {
    Row::new(TABLE_STRONG_REGISTERS, key.as_bytes().to_vec())
}

pub fn counter_row(key: &str) -> Row {
    Row::new(TABLE_COUNTERS, key.as_bytes().to_vec())
}

pub fn set_row(key: &str) -> Row {
    Row::new(TABLE_SETS, key.as_bytes().to_vec())
}

/// A watch workload row (keys `user:<client>:<n>` or `item:<client>:<n>`).
pub fn watched_row(key: &str) -> Row {
    Row::new(TABLE_WATCHED, key.as_bytes().to_vec())
}

/// Residency rows carry their locality in the key: `u-<COUNTRY>-<n>`.
pub fn eu_row(key: &str) -> Row {
    let country = key.split('-').nth(1).unwrap_or("FR").to_string();
    Row::new(TABLE_EU_USERS, key.as_bytes().to_vec()).locality(country)
}

/// Decodes a register value written by the harness (decimal text).
pub fn decode(v: &[u8]) -> Option<i64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The row of big-rows key `key` (table `default`, homed in the first region).
pub fn big_row(key: &str) -> Row {
    Row::new("default", key.as_bytes().to_vec())
}

/// A big value: its id in decimal, `;`, then incompressible padding up to
/// `len` bytes, so compression cannot hide its size.
pub fn big_value(id: i64, len: usize) -> Vec<u8> {
    let mut v = format!("{id};").into_bytes();
    let mut x = (id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x as u8);
    }
    v
}

/// The id of a value written by [`big_value`].
pub fn big_id(v: &[u8]) -> Option<i64> {
    let end = v.iter().position(|b| *b == b';')?;
    decode(&v[..end])
}

/// Reads a big row: the ids of its values (sorted) and its context.
async fn big_read(
    client: &Client,
    key: &str,
) -> Result<(Vec<i64>, geokv_client::CausalContext), geokv_client::Error> {
    let got = client.get(&big_row(key), ReadConsistency::Local).await?;
    let mut ids: Vec<i64> = got.values().iter().filter_map(|v| big_id(v)).collect();
    ids.sort_unstable();
    Ok((ids, got.context))
}

/// Runs one big-rows operation. A resolve records what its read returned
/// whatever becomes of its write, so the checker knows what it may have
/// superseded.
async fn perform_big_rows(client: &Client, p: &Planned) -> Result<Value, (Value, geokv_client::Error)> {
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    match (p.f, &p.value) {
        (F::Read, _) => {
            big_read(client, &p.key).await.map(|(ids, _)| Value::List(ids)).map_err(|e| (Value::None, e))
        }
        (F::Write, Value::Pair([id, len])) => client
            .put(&big_row(&p.key), big_value(*id, *len as usize), eventual)
            .await
            .map(|_| Value::Int(*id))
            .map_err(|e| (Value::Int(*id), e)),
        (F::Resolve, Value::Int(id)) => {
            let (seen, context) = big_read(client, &p.key).await.map_err(|e| (Value::List(vec![*id]), e))?;
            let written: Vec<i64> = std::iter::once(*id).chain(seen).collect();
            match client.put(&big_row(&p.key), big_value(*id, 64), eventual.context(context)).await {
                Ok(_) => Ok(Value::List(written)),
                Err(e) => Err((Value::List(written), e)),
            }
        }
        (f, v) => Err((
            Value::None,
            geokv_client::Error {
                code: tonic::Code::Internal,
                reason: Some("HARNESS".into()),
                message: format!("big-rows has no {f:?} of {v:?}"),
                metadata: Default::default(),
            },
        )),
    }
}

/// A counter-retry increment: one idempotency key for every attempt; an
/// attempt whose outcome is unknown is sent again (to the same entry node,
/// which forwards to whichever region holds the home now) until one is
/// acknowledged, one is definitely refused, or [`RETRY_OP_TIMEOUT`] passes.
async fn perform_retried_increment(
    client: &Client,
    p: &Planned,
) -> (Kind, Value, Option<String>, Option<Ack>) {
    let idempotency_key = format!("cr-{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let opts = WriteOptions::default().consistency(Consistency::Local).idempotency_key(idempotency_key);
    let row = counter_row(&p.key);
    let started = Instant::now();
    let mut last = "HARNESS_TIMEOUT".to_string();
    // Whether some attempt may have applied (its outcome is unknown).
    let mut maybe_applied = false;
    while started.elapsed() < RETRY_OP_TIMEOUT {
        let left = RETRY_OP_TIMEOUT.saturating_sub(started.elapsed());
        let attempt = client.counter_add(&row, p.value.as_int().unwrap_or(0), opts.clone());
        match tokio::time::timeout(left.min(OP_TIMEOUT), attempt).await {
            Ok(Ok((_, a))) => {
                let ack = Ack { home: a.home_region, epoch: a.epoch, by: a.accepted_by_region };
                return (Kind::Ok, Value::None, None, Some(ack));
            }
            // Refused before it applied because the home is moving or its
            // holder is fenced: a client waits and sends it again.
            Ok(Err(e)) if definite_failure(&e) && !home_in_motion(&e) => {
                let kind = if maybe_applied { Kind::Unknown } else { Kind::Fail };
                return (kind, Value::None, Some(e.reason_or_code()), None);
            }
            Ok(Err(e)) => {
                maybe_applied |= !definite_failure(&e);
                last = e.reason_or_code();
            }
            Err(_) => {
                maybe_applied = true;
                last = "HARNESS_TIMEOUT".into();
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    (if maybe_applied { Kind::Unknown } else { Kind::Fail }, Value::None, Some(last), None)
}

/// Whether a definite refusal only says the home is between holders (a
/// fenced or lapsed holder, a handover), so the same request may be sent
/// again later.
fn home_in_motion(e: &geokv_client::Error) -> bool {
    matches!(e.reason.as_deref(), Some("FENCED" | "NOT_HOME" | "HOME_UNAVAILABLE"))
}

/// One operation, ready to run.
#[derive(Debug, Clone)]
pub struct Planned {
    pub f: F,
    pub key: String,
    pub value: Value,
    pub level: &'static str,
}

/// Picks the next operation of client `client`.
pub fn plan(
    kind: WorkloadKind,
    rng: &mut impl Rng,
    shared: &Shared,
    client: &str,
    written: &[String],
) -> Planned {
    match kind {
        WorkloadKind::Watch => {
            // Mostly under the watched prefix; one write in five beside it.
            let prefix = if rng.random_bool(0.8) { WATCH_PREFIX } else { WATCH_OTHER_PREFIX };
            let key = format!("{prefix}{client}:{}", rng.random_range(0..WATCH_KEYS));
            let v = shared.next_value.fetch_add(1, Ordering::Relaxed) as i64 + 1;
            Planned { f: F::Write, key, value: Value::Int(v), level: "EVENTUAL" }
        }
        WorkloadKind::Register => {
            let key = format!("r{}", rng.random_range(0..REGISTER_KEYS));
            if rng.random_bool(0.5) {
                Planned { f: F::Read, key, value: Value::None, level: "LOCAL" }
            } else {
                let v = shared.next_value.fetch_add(1, Ordering::Relaxed) as i64 + 1;
                Planned { f: F::Write, key, value: Value::Int(v), level: "LOCAL" }
            }
        }
        WorkloadKind::StrongRegister => {
            let key = format!("r{}", rng.random_range(0..REGISTER_KEYS));
            let written = shared.next_value.load(Ordering::Relaxed) as i64;
            match rng.random_range(0..10) {
                0..=3 => Planned { f: F::Read, key, value: Value::None, level: "STRONG" },
                4..=7 => {
                    let v = shared.next_value.fetch_add(1, Ordering::Relaxed) as i64 + 1;
                    Planned { f: F::Write, key, value: Value::Int(v), level: "STRONG" }
                }
                _ => {
                    // Expect one of the latest values, so some CASes succeed.
                    let from = (written - rng.random_range(0..4)).max(1);
                    let to = shared.next_value.fetch_add(1, Ordering::Relaxed) as i64 + 1;
                    Planned { f: F::Cas, key, value: Value::Pair([from, to]), level: "STRONG" }
                }
            }
        }
        WorkloadKind::Counter | WorkloadKind::CounterRetry | WorkloadKind::QuorumCounter => {
            let key = format!("c{}", rng.random_range(0..COUNTER_KEYS));
            let level = match kind {
                WorkloadKind::CounterRetry => "LOCAL",
                WorkloadKind::QuorumCounter => "QUORUM",
                _ => "EVENTUAL",
            };
            if rng.random_bool(0.8) {
                Planned { f: F::Incr, key, value: Value::Int(rng.random_range(1..=5)), level }
            } else {
                Planned { f: F::CounterRead, key, value: Value::None, level: "LOCAL" }
            }
        }
        WorkloadKind::Set => {
            let key = format!("s{}", rng.random_range(0..SET_KEYS));
            let e = Value::Int(rng.random_range(0..SET_ELEMENTS));
            match rng.random_range(0..10) {
                0..=4 => Planned { f: F::SetAdd, key, value: e, level: "EVENTUAL" },
                5..=7 => Planned { f: F::SetRemove, key, value: e, level: "EVENTUAL" },
                _ => Planned { f: F::SetRead, key, value: Value::None, level: "LOCAL" },
            }
        }
        WorkloadKind::BigRows => {
            let key = format!("b{}", rng.random_range(0..BIG_ROW_KEYS));
            let id = shared.next_value.fetch_add(1, Ordering::Relaxed) as i64 + 1;
            match rng.random_range(0..20) {
                0..=10 => {
                    let len = rng.random_range(BIG_VALUE_BYTES_MIN..=BIG_VALUE_BYTES_MAX) as i64;
                    Planned { f: F::Write, key, value: Value::Pair([id, len]), level: "EVENTUAL" }
                }
                11..=13 => Planned { f: F::Resolve, key, value: Value::Int(id), level: "EVENTUAL" },
                _ => Planned { f: F::Read, key, value: Value::None, level: "LOCAL" },
            }
        }
        WorkloadKind::Residency => {
            if rng.random_bool(0.5) {
                let (country, _) = EU_LOCALITIES[rng.random_range(0..EU_LOCALITIES.len())];
                let n = shared.next_value.fetch_add(1, Ordering::Relaxed) as i64 + 1;
                Planned {
                    f: F::Write,
                    key: format!("u-{country}-{n}"),
                    value: Value::Int(n),
                    level: "EVENTUAL",
                }
            } else {
                // Reads of this client's rows, or (outside the zone, where
                // nothing is ever written) of any row id.
                let key = if written.is_empty() {
                    let (country, _) = EU_LOCALITIES[rng.random_range(0..EU_LOCALITIES.len())];
                    let n = shared.next_value.load(Ordering::Relaxed).max(1);
                    format!("u-{country}-{}", rng.random_range(1..=n))
                } else {
                    written[rng.random_range(0..written.len())].clone()
                };
                Planned { f: F::Read, key, value: Value::None, level: "LOCAL" }
            }
        }
    }
}

/// Runs one operation against `client`; returns the completion.
pub async fn perform(
    kind: WorkloadKind,
    client: &Client,
    p: &Planned,
) -> (Kind, Value, Option<String>, Option<Ack>) {
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    let local = WriteOptions::default().consistency(Consistency::Local);
    if kind == WorkloadKind::BigRows {
        // Values are bigger: the timeout allows for them.
        return match tokio::time::timeout(OP_TIMEOUT, perform_big_rows(client, p)).await {
            Err(_) => (Kind::Unknown, p.value.clone(), Some("HARNESS_TIMEOUT".into()), None),
            Ok(Ok(v)) => (Kind::Ok, v, None, None),
            Ok(Err((v, e))) if definite_failure(&e) => (Kind::Fail, v, Some(e.reason_or_code()), None),
            Ok(Err((v, e))) => (Kind::Unknown, v, Some(e.reason_or_code()), None),
        };
    }
    if kind == WorkloadKind::CounterRetry && p.f == F::Incr {
        return perform_retried_increment(client, p).await;
    }
    // A LOCAL write's acknowledgement: who accepted it under which epoch.
    let mut ack: Option<Ack> = None;
    let fut = async {
        match (kind, p.f) {
            (WorkloadKind::Register | WorkloadKind::Residency | WorkloadKind::StrongRegister, F::Read) => {
                let (row, level) = match kind {
                    WorkloadKind::Register => (register_row(&p.key), ReadConsistency::Local),
                    WorkloadKind::StrongRegister => (strong_row(&p.key), ReadConsistency::Strong),
                    _ => (eu_row(&p.key), ReadConsistency::Local),
                };
                client.get(&row, level).await.map(|g| {
                    let vals: Vec<i64> = g.values().iter().filter_map(|v| decode(v)).collect();
                    match vals.as_slice() {
                        [] => Value::None,
                        [one] => Value::Int(*one),
                        _ => Value::List(vals),
                    }
                })
            }
            (WorkloadKind::StrongRegister, F::Write) => {
                let v = p.value.as_int().unwrap_or_default();
                let strong = WriteOptions::default().consistency(Consistency::Strong);
                client.put(&strong_row(&p.key), v.to_string().into_bytes(), strong).await.map(|_| Value::None)
            }
            (WorkloadKind::StrongRegister, F::Cas) => {
                let [from, to] = match p.value {
                    Value::Pair(pair) => pair,
                    _ => [0, 0],
                };
                let r = client
                    .compare_and_set(
                        &strong_row(&p.key),
                        Some(from.to_string().into_bytes()),
                        Some(to.to_string().into_bytes()),
                        None,
                    )
                    .await;
                // A CAS whose compare failed saw the current value: a read.
                r.map(|c| match (c.succeeded, c.current) {
                    (true, _) => Value::Pair([from, to]),
                    (false, None) => Value::List(vec![]),
                    (false, Some((v, _))) => Value::List(decode(&v).into_iter().collect()),
                })
            }
            (WorkloadKind::Register, F::Write) => {
                let v = p.value.as_int().unwrap_or_default();
                client.put(&register_row(&p.key), v.to_string().into_bytes(), local).await.map(|a| {
                    ack = Some(Ack { home: a.home_region, epoch: a.epoch, by: a.accepted_by_region });
                    Value::None
                })
            }
            (WorkloadKind::Watch, F::Write) => {
                let v = p.value.as_int().unwrap_or_default();
                client
                    .put(&watched_row(&p.key), v.to_string().into_bytes(), eventual)
                    .await
                    .map(|_| Value::None)
            }
            (WorkloadKind::Residency, F::Write) => {
                let v = p.value.as_int().unwrap_or_default();
                client.put(&eu_row(&p.key), v.to_string().into_bytes(), eventual).await.map(|_| Value::None)
            }
            (WorkloadKind::QuorumCounter, F::Incr) => client
                .counter_add(
                    &counter_row(&p.key),
                    p.value.as_int().unwrap_or(0),
                    WriteOptions::default().consistency(Consistency::Quorum),
                )
                .await
                .map(|_| Value::None),
            (_, F::Incr) => client
                .counter_add(&counter_row(&p.key), p.value.as_int().unwrap_or(0), eventual)
                .await
                .map(|_| Value::None),
            (_, F::CounterRead) => client
                .counter_get(&counter_row(&p.key), ReadConsistency::Local)
                .await
                .map(|v| v.map(Value::Int).unwrap_or(Value::None)),
            (_, F::SetAdd) => {
                let e = p.value.as_int().unwrap_or(0).to_string().into_bytes();
                client.set_add(&set_row(&p.key), vec![e], eventual).await.map(|_| Value::None)
            }
            (_, F::SetRemove) => {
                let e = p.value.as_int().unwrap_or(0).to_string().into_bytes();
                client.set_remove(&set_row(&p.key), vec![e], eventual).await.map(|_| Value::None)
            }
            (_, F::SetRead) => client.set_members(&set_row(&p.key), ReadConsistency::Local).await.map(|s| {
                let mut m: Vec<i64> = s.members.iter().filter_map(|v| decode(v)).collect();
                m.sort_unstable();
                Value::List(m)
            }),
            (k, f) => Err(geokv_client::Error {
                code: tonic::Code::Internal,
                reason: Some("HARNESS".into()),
                message: format!("workload {k:?} has no {f:?}"),
                metadata: Default::default(),
            }),
        }
    };
    let done = tokio::time::timeout(OP_TIMEOUT, fut).await;
    match done {
        Err(_) => (Kind::Unknown, Value::None, Some("HARNESS_TIMEOUT".into()), None),
        Ok(Ok(v)) => (Kind::Ok, v, None, ack),
        Ok(Err(e)) if definite_failure(&e) => (Kind::Fail, Value::None, Some(e.reason_or_code()), None),
        Ok(Err(e)) => (Kind::Unknown, Value::None, Some(e.reason_or_code()), None),
    }
}

/// Whether a client that completed `done` operations in `elapsed` is
/// behind its schedule of one operation per `think_ms`.
fn behind_schedule(done: u64, elapsed: Duration, think_ms: u64) -> bool {
    let due = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX) / think_ms.max(1);
    done < due
}

/// One client's loop: bounded by the run's operation count and deadline.
pub async fn client_loop(spec: ClientSpec, shared: Shared) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut client: Option<Client> = None;
    let mut written: Vec<String> = Vec::new();
    // Stagger the start so clients do not move in lock step.
    let think_ms = u64::try_from(shared.think.as_millis()).unwrap_or(1_000).max(1);
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..think_ms))).await;
    // The client's share of the schedule: one operation per think time on
    // average from here. A client behind it (blocked by a fault: a paused
    // node, operations that ran to their timeout) skips its think time
    // until it is back on schedule, never past it, so the run spreads its
    // operations over its whole time and reaches its count.
    let started = Instant::now();
    let mut done: u64 = 0;
    loop {
        if Instant::now() >= shared.deadline {
            return;
        }
        if shared.invoked.fetch_add(1, Ordering::AcqRel) >= shared.ops_max {
            return;
        }
        let p = plan(shared.kind, &mut rng, &shared, &spec.name, &written);
        let Some(inv) =
            shared.recorder.invoke(&spec.name, &spec.region, p.level, p.f, &p.key, p.value.clone())
        else {
            return;
        };
        if client.is_none() {
            client = Client::with_config(client_config(&spec.endpoint)).await.ok();
        }
        let (kind, value, error, ack) = match &client {
            // Not connected: nothing was sent.
            None => (Kind::Fail, Value::None, Some("UNREACHABLE".to_string()), None),
            Some(c) => perform(shared.kind, c, &p).await,
        };
        if shared.kind == WorkloadKind::Residency && p.f == F::Write && kind != Kind::Fail {
            written.push(p.key.clone());
        }
        // Reads and CASes complete with what they found; writes with their
        // argument; big-rows operations with what they wrote and saw.
        let write = if crate::history::is_read(p.f)
            || (p.f == F::Cas && kind == Kind::Ok)
            || shared.kind == WorkloadKind::BigRows
        {
            value
        } else {
            p.value.clone()
        };
        shared.recorder.complete_acked(inv, kind, write, error, ack);
        done += 1;
        // Exponentially distributed think time around the mean, capped; a
        // millisecond while behind schedule.
        let u: f64 = rng.random_range(0.0001..1.0);
        let pause = (-(u.ln()) * think_ms as f64).min(think_ms as f64 * 5.0) as u64;
        let pause = if behind_schedule(done, started.elapsed(), think_ms) { 1 } else { pause };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_blocked_by_a_fault_catches_up_to_its_schedule_and_no_further() {
        // One operation per 250 ms: after 10 s, 40 are due.
        let think = 250;
        assert!(behind_schedule(10, Duration::from_secs(10), think), "blocked for 7.5 s: catch up");
        assert!(behind_schedule(39, Duration::from_secs(10), think));
        assert!(!behind_schedule(40, Duration::from_secs(10), think), "on schedule: think again");
        assert!(!behind_schedule(41, Duration::from_secs(10), think), "never ahead of it");
        assert!(!behind_schedule(0, Duration::from_millis(100), think), "nothing due yet");
        assert!(behind_schedule(5, Duration::from_secs(1), 0), "a zero think time counts as 1 ms");
    }
}
