//! The history of a run: every operation's invocation and completion, and
//! every nemesis step, in the order the harness saw them.
//!
//! A history is stored as JSON lines (`history.jsonl`), one [`Record`] per
//! line. Times are microseconds on the harness's monotonic clock since the
//! run started, so they order events even if the wall clock jumps.
//!
//! An operation has two records with the same `op` id: an `invoke`, then one
//! completion: `ok` (acknowledged), `fail` (the server said it did not
//! happen) or `unknown` (a timeout or a transport error after the request
//! was sent: it may or may not have taken effect, and checkers must allow
//! both). A completion is never missing: the harness writes `unknown` for an
//! operation still in flight when the run ends.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum F {
    /// Register read: value is the value read (null = not found).
    Read,
    /// Register write of a unique value.
    Write,
    /// Register compare-and-set: value is `[from, to]`.
    Cas,
    /// Counter increment by value.
    Incr,
    /// Counter read: value is the value read (null = never written).
    CounterRead,
    /// Set add of one element.
    SetAdd,
    /// Set remove of one element (without a context: removes the adds stored
    /// where the request lands).
    SetRemove,
    /// Set read: value is the members read.
    SetRead,
    /// Register write with the causal context of a read just before it:
    /// value is `[new, seen...]`, the value written and the values the read
    /// returned (which the write supersedes), recorded whatever the outcome.
    Resolve,
}

/// Whether a record opens or closes an operation, and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    Invoke,
    Ok,
    /// Definitely did not take effect.
    Fail,
    /// May or may not have taken effect.
    Unknown,
}

/// An operation's argument or result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(untagged)]
pub enum Value {
    #[default]
    None,
    Int(i64),
    Pair([i64; 2]),
    List(Vec<i64>),
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }
}

/// One half of an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Pairs an invocation with its completion.
    pub op: u64,
    /// Harness clock, microseconds since the run started.
    pub time_us: u64,
    /// Which logical client (one operation at a time per client).
    pub client: String,
    /// The region whose node the client sent to.
    pub region: String,
    /// The consistency level asked for (e.g. `LOCAL`, `EVENTUAL`).
    pub level: String,
    #[serde(rename = "type")]
    pub kind: Kind,
    pub f: F,
    pub key: String,
    pub value: Value,
    /// The error reason for `fail` and `unknown`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For an acknowledged LOCAL write: who accepted it, under which epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<Ack>,
}

/// Where and under which home epoch a LOCAL write was accepted (from its
/// acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The row's home region.
    pub home: String,
    pub epoch: u64,
    /// The region that accepted (committed) the write.
    pub by: String,
}

/// A home lease as one node's region status showed it (the control plane's
/// state applied there), or as a failover call returned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub time_us: u64,
    /// The home's key (region and zone).
    pub home: String,
    pub home_region: String,
    pub holder: String,
    pub epoch: u64,
    /// The region whose node answered, or `failover` for a call's reply.
    pub observed_by: String,
}

/// What became of a nemesis step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NemesisStatus {
    /// The fault is in place (or was lifted, for a heal step).
    Installed,
    /// Not attempted; `detail` says why.
    Skipped,
    /// Attempted, but whether it took effect is not known.
    Indeterminate,
}

/// One nemesis step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NemesisRecord {
    pub time_us: u64,
    /// E.g. `partition`, `heal`, `kill`, `restart`.
    pub action: String,
    /// What it hit: regions or links.
    pub targets: Vec<String>,
    pub status: NemesisStatus,
    pub detail: String,
}

/// What a watcher saw (the watch workload's change feed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WatchEventKind {
    /// The stream was opened; `detail` says whether from a cursor.
    Open,
    /// A change of row `key`: its values after the change.
    Change,
    /// A resolved-time heartbeat (`hlc`).
    Heartbeat,
    /// The stream ended or could not be opened; `detail` says why.
    Error,
}

/// One event of a change feed as the harness's watcher received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRecord {
    pub time_us: u64,
    /// The region serving the feed.
    pub region: String,
    pub event: WatchEventKind,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key: String,
    /// A change's values (decoded), empty for a deleted row.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<i64>,
    /// The change's name: the node that accepted the write, and its
    /// position in that node's log.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub origin: String,
    #[serde(default)]
    pub seq: u64,
    /// A change's HLC stamp, or a heartbeat's resolved time.
    #[serde(default)]
    pub hlc: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl WatchRecord {
    /// An event of `kind` from `region`, with no change, time or detail.
    pub fn new(region: &str, event: WatchEventKind) -> Self {
        Self {
            time_us: 0,
            region: region.to_string(),
            event,
            key: String::new(),
            values: Vec::new(),
            origin: String::new(),
            seq: 0,
            hlc: 0,
            detail: String::new(),
        }
    }
}

/// One line of `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum Record {
    Op(OpRecord),
    Nemesis(NemesisRecord),
    Epoch(EpochRecord),
    Watch(WatchRecord),
}

/// An operation with its invocation and completion joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub id: u64,
    pub client: String,
    pub region: String,
    pub level: String,
    pub f: F,
    pub key: String,
    /// The argument (writes) or, for `ok` reads, the result.
    pub value: Value,
    pub invoke_us: u64,
    /// Completion time; for `unknown` the time the harness gave up waiting,
    /// which is not a bound on when the operation took effect.
    pub complete_us: u64,
    /// `Ok`, `Fail` or `Unknown`.
    pub outcome: Kind,
    pub error: Option<String>,
    pub ack: Option<Ack>,
}

/// A problem that makes a history unusable for checking.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("operation {0} completed without an invocation")]
    NoInvocation(u64),
    #[error("operation {0} invoked twice")]
    InvokedTwice(u64),
    #[error("operation {0} completed twice")]
    CompletedTwice(u64),
    #[error("operation {0} never completed")]
    NeverCompleted(u64),
    #[error("operation {0}: completion differs from the invocation in client, f or key")]
    Mismatch(u64),
}

/// Joins invocations and completions into operations, ordered by
/// invocation. Every invocation must have exactly one completion.
pub fn operations(records: &[Record]) -> Result<Vec<Op>, HistoryError> {
    use std::collections::BTreeMap;
    let mut open: BTreeMap<u64, &OpRecord> = BTreeMap::new();
    let mut done: BTreeMap<u64, Op> = BTreeMap::new();
    for r in records {
        let Record::Op(r) = r else { continue };
        match r.kind {
            Kind::Invoke => {
                if open.insert(r.op, r).is_some() || done.contains_key(&r.op) {
                    return Err(HistoryError::InvokedTwice(r.op));
                }
            }
            _ => {
                let Some(inv) = open.remove(&r.op) else {
                    return Err(if done.contains_key(&r.op) {
                        HistoryError::CompletedTwice(r.op)
                    } else {
                        HistoryError::NoInvocation(r.op)
                    });
                };
                if inv.client != r.client || inv.f != r.f || inv.key != r.key {
                    return Err(HistoryError::Mismatch(r.op));
                }
                // Reads carry their result on the completion; writes their
                // argument on the invocation.
                let value = match r.kind {
                    Kind::Ok if r.value != Value::None || is_read(r.f) => r.value.clone(),
                    _ => inv.value.clone(),
                };
                done.insert(
                    r.op,
                    Op {
                        id: r.op,
                        client: inv.client.clone(),
                        region: inv.region.clone(),
                        level: inv.level.clone(),
                        f: inv.f,
                        key: inv.key.clone(),
                        value,
                        invoke_us: inv.time_us,
                        complete_us: r.time_us,
                        outcome: r.kind,
                        error: r.error.clone(),
                        ack: r.ack.clone(),
                    },
                );
            }
        }
    }
    if let Some((id, _)) = open.into_iter().next() {
        return Err(HistoryError::NeverCompleted(id));
    }
    let mut ops: Vec<Op> = done.into_values().collect();
    ops.sort_by_key(|o| (o.invoke_us, o.id));
    Ok(ops)
}

/// Reads return their result in the completion.
pub fn is_read(f: F) -> bool {
    matches!(f, F::Read | F::CounterRead | F::SetRead)
}

/// Collects records as they happen; shared by every client task and the
/// nemesis. Bounded: past `records_max` records, new operations are refused
/// (the workload stops), so a runaway run cannot fill memory.
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<RecorderInner>>,
    start: Instant,
    records_max: usize,
}

struct RecorderInner {
    records: Vec<Record>,
    next_op: u64,
    /// Invocations not completed yet, so the run can close them.
    open: std::collections::BTreeMap<u64, OpRecord>,
}

/// Lines of history kept in memory at most.
pub const RECORDS_MAX: usize = 2_000_000;

impl Recorder {
    pub fn new(start: Instant) -> Self {
        Self {
            inner: Arc::new(Mutex::new(RecorderInner {
                records: Vec::new(),
                next_op: 0,
                open: Default::default(),
            })),
            start,
            records_max: RECORDS_MAX,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Microseconds since the run started.
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Records an invocation and returns its id; None when the history is full.
    pub fn invoke(
        &self,
        client: &str,
        region: &str,
        level: &str,
        f: F,
        key: &str,
        value: Value,
    ) -> Option<Invocation> {
        let mut inner = self.lock();
        if inner.records.len() + 2 > self.records_max {
            return None;
        }
        let op = inner.next_op;
        inner.next_op += 1;
        let record = OpRecord {
            op,
            time_us: self.now_us(),
            client: client.to_string(),
            region: region.to_string(),
            level: level.to_string(),
            kind: Kind::Invoke,
            f,
            key: key.to_string(),
            value,
            error: None,
            ack: None,
        };
        inner.records.push(Record::Op(record.clone()));
        inner.open.insert(op, record.clone());
        Some(Invocation { record })
    }

    /// Records the completion of `inv`.
    pub fn complete(&self, inv: Invocation, kind: Kind, value: Value, error: Option<String>) {
        self.complete_acked(inv, kind, value, error, None)
    }

    /// Records the completion of `inv` with the write's acknowledgement.
    pub fn complete_acked(
        &self,
        inv: Invocation,
        kind: Kind,
        value: Value,
        error: Option<String>,
        ack: Option<Ack>,
    ) {
        debug_assert!(kind != Kind::Invoke);
        let mut record = inv.record;
        record.time_us = self.now_us();
        record.kind = kind;
        record.value = value;
        record.error = error;
        record.ack = ack;
        let mut inner = self.lock();
        inner.open.remove(&record.op);
        inner.records.push(Record::Op(record));
    }

    /// Completes every operation still open as `unknown` (its client was
    /// stopped while waiting); returns how many there were.
    pub fn close_open(&self, why: &str) -> usize {
        let mut inner = self.lock();
        let open = std::mem::take(&mut inner.open);
        let now = self.now_us();
        for (_, mut record) in open.iter().map(|(k, v)| (*k, v.clone())) {
            record.time_us = now;
            record.kind = Kind::Unknown;
            record.error = Some(why.to_string());
            inner.records.push(Record::Op(record));
        }
        open.len()
    }

    pub fn nemesis(
        &self,
        action: &str,
        targets: Vec<String>,
        status: NemesisStatus,
        detail: impl Into<String>,
    ) {
        self.nemesis_at(self.now_us(), action, targets, status, detail)
    }

    /// Records a nemesis step that began at `time_us` (a step that takes a
    /// while, such as a cut that starts one way, is dated from its start).
    pub fn nemesis_at(
        &self,
        time_us: u64,
        action: &str,
        targets: Vec<String>,
        status: NemesisStatus,
        detail: impl Into<String>,
    ) {
        let record =
            NemesisRecord { time_us, action: action.to_string(), targets, status, detail: detail.into() };
        tracing::info!(action, targets = ?record.targets, status = ?status, detail = %record.detail, "nemesis");
        self.lock().records.push(Record::Nemesis(record));
    }

    /// Records a home lease as `observed_by` saw it now.
    pub fn epoch(&self, home: &str, home_region: &str, holder: &str, epoch: u64, observed_by: &str) {
        let record = EpochRecord {
            time_us: self.now_us(),
            home: home.to_string(),
            home_region: home_region.to_string(),
            holder: holder.to_string(),
            epoch,
            observed_by: observed_by.to_string(),
        };
        self.lock().records.push(Record::Epoch(record));
    }

    /// Records what a watcher received (its `time_us` is set here).
    /// Returns false when the history is full: the watcher stops.
    pub fn watch(&self, mut record: WatchRecord) -> bool {
        record.time_us = self.now_us();
        let mut inner = self.lock();
        if inner.records.len() + 1 > self.records_max {
            return false;
        }
        inner.records.push(Record::Watch(record));
        true
    }

    pub fn ops_invoked(&self) -> u64 {
        self.lock().next_op
    }

    pub fn records(&self) -> Vec<Record> {
        self.lock().records.clone()
    }
}

/// An operation in flight; completing it consumes it, so an operation
/// cannot complete twice.
#[derive(Debug)]
pub struct Invocation {
    record: OpRecord,
}

impl Invocation {
    pub fn id(&self) -> u64 {
        self.record.op
    }
}

/// Writes records as JSON lines.
pub fn write_jsonl(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::new(file);
    for r in records {
        serde_json::to_writer(&mut out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Reads a `history.jsonl`.
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Record>> {
    let file = std::fs::File::open(path)?;
    let mut records = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let r: Record = serde_json::from_str(&line)
            .map_err(|e| anyhow::anyhow!("{}: line {}: {e}", path.display(), n + 1))?;
        records.push(r);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json_lines() {
        let rec = Recorder::new(Instant::now());
        let a = rec.invoke("c1", "us-east-1", "LOCAL", F::Write, "r1", Value::Int(7)).unwrap();
        let b = rec.invoke("c2", "us-east-1", "LOCAL", F::Read, "r1", Value::None).unwrap();
        rec.complete(a, Kind::Ok, Value::None, None);
        rec.complete(b, Kind::Unknown, Value::None, Some("DEADLINEEXCEEDED".into()));
        rec.nemesis("partition", vec!["eu-west-1".into()], NemesisStatus::Installed, "");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("h.jsonl");
        write_jsonl(&path, &rec.records()).unwrap();
        let back = read_jsonl(&path).unwrap();
        assert_eq!(back, rec.records());
        let ops = operations(&back).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[0].value, Value::Int(7), "a write keeps its argument");
        assert_eq!(ops[0].outcome, Kind::Ok);
        assert_eq!(ops[1].outcome, Kind::Unknown);
    }

    #[test]
    fn a_dangling_invocation_is_an_error() {
        let rec = Recorder::new(Instant::now());
        let _open = rec.invoke("c1", "r", "LOCAL", F::Write, "k", Value::Int(1)).unwrap();
        assert_eq!(operations(&rec.records()), Err(HistoryError::NeverCompleted(0)));
    }
}
