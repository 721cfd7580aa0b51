//! The state machine of a STRONG group: linearizable registers.
//!
//! Rows of STRONG tables live in their group's replicated state machine,
//! keyed `r/<table>\0<key>`, so every committed command is applied in the
//! same order by every replica region. A value's version is the Raft log
//! index of the command that wrote it.
//!
//! A command carrying a request id (the client's idempotency key) leaves
//! its reply at `i/<id>`, so a retry gets the first outcome instead of
//! applying again. Those records are bounded like LOCAL's: each is also
//! queued at `q/<seq>` in the order applied, and applying a record drops
//! the oldest ones that are older than the TTL (by the proposers' clocks,
//! carried in the log, so every replica drops the same ones) or beyond
//! the count bound, a few per command, so the state machine stays bounded.

use serde::{Deserialize, Serialize};

use super::json_bytes;
use super::store::{Machine, MachineView};
use super::{Command, Reply};

/// A stored STRONG value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StrongValue {
    #[serde(with = "json_bytes")]
    pub value: Vec<u8>,
    /// Log index of the write that produced it.
    pub version: u64,
    /// Millisecond after which the value is invisible (the command's time
    /// plus its TTL); 0 = never. Absent in values of older builds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires_ms: u64,
}

impl StrongValue {
    /// Whether the value has expired at millisecond `now_ms`.
    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_ms != 0 && self.expires_ms <= now_ms
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// A linearizable write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrongCommand {
    Put {
        table: String,
        #[serde(with = "json_bytes")]
        key: Vec<u8>,
        #[serde(with = "json_bytes")]
        value: Vec<u8>,
        /// Time to live from the command's time, in milliseconds; 0 = none.
        #[serde(default, skip_serializing_if = "is_zero")]
        ttl_ms: u64,
    },
    Delete {
        table: String,
        #[serde(with = "json_bytes")]
        key: Vec<u8>,
    },
    /// Writes `value` (None deletes) only if the current value is
    /// `expected` (None = absent).
    Cas {
        table: String,
        #[serde(with = "json_bytes")]
        key: Vec<u8>,
        #[serde(with = "json_bytes::option", default)]
        expected: Option<Vec<u8>>,
        #[serde(with = "json_bytes::option", default)]
        value: Option<Vec<u8>>,
        /// Time to live of the written value, as for `Put`.
        #[serde(default, skip_serializing_if = "is_zero")]
        ttl_ms: u64,
    },
}

/// The outcome of a STRONG write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StrongReply {
    Written {
        version: u64,
    },
    /// A CAS whose expectation did not hold; nothing was written.
    CasFailed {
        current: Option<StrongValue>,
    },
    /// The stored value could not be read (corruption); nothing was written.
    Failed {
        why: String,
    },
}

/// State-machine key of a row.
pub fn row_key(table: &str, key: &[u8]) -> Vec<u8> {
    let mut k = b"r/".to_vec();
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

/// Decodes a stored value.
pub fn decode_value(bytes: &[u8]) -> Result<StrongValue, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("stored STRONG value does not decode: {e}"))
}

/// Most old records one command drops: at least two, so the queue shrinks
/// back under its bounds while commands keep coming.
const EVICT_PER_APPLY: usize = 8;
const QUEUE_HEAD: &[u8] = b"q-head";
const QUEUE_TAIL: &[u8] = b"q-tail";

/// One queued idempotency record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Queued {
    id: String,
    at_ms: u64,
}

fn queue_key(seq: u64) -> Vec<u8> {
    let mut k = b"q/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn idempotency_key(id: &str) -> Vec<u8> {
    let mut k = b"i/".to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

fn read_u64(view: &MachineView<'_>, key: &[u8]) -> Result<u64, String> {
    match view.get(key)? {
        None => Ok(0),
        Some(b) => {
            let bytes: [u8; 8] = b
                .as_slice()
                .try_into()
                .map_err(|_| format!("{} is {} bytes, not 8", String::from_utf8_lossy(key), b.len()))?;
            Ok(u64::from_be_bytes(bytes))
        }
    }
}

/// Applies STRONG commands.
pub struct StrongMachine {
    /// How long a reply is kept for its request id, in milliseconds.
    ttl_ms: u64,
    /// Most records kept.
    max_records: u64,
}

impl StrongMachine {
    pub fn new(ttl_ms: u64, max_records: u64) -> Self {
        Self { ttl_ms, max_records: max_records.max(1) }
    }

    /// Queues the record of `id` (applied at `at_ms`) and drops the oldest
    /// records past the TTL or the count bound, at most
    /// [`EVICT_PER_APPLY`] of them.
    fn remember(&self, view: &mut MachineView<'_>, id: &str, at_ms: u64) -> Result<(), String> {
        let mut head = read_u64(view, QUEUE_HEAD)?;
        let tail = read_u64(view, QUEUE_TAIL)?;
        let entry = serde_json::to_vec(&Queued { id: id.to_string(), at_ms }).map_err(|e| e.to_string())?;
        view.put(&queue_key(tail), entry);
        let tail = tail + 1;
        view.put(QUEUE_TAIL, tail.to_be_bytes().to_vec());
        for _ in 0..EVICT_PER_APPLY {
            if head >= tail {
                break;
            }
            let Some(bytes) = view.get(&queue_key(head))? else {
                head += 1;
                continue;
            };
            let oldest: Queued = serde_json::from_slice(&bytes).map_err(|e| format!("queued record: {e}"))?;
            let over_count = tail - head > self.max_records;
            let expired = oldest.at_ms.saturating_add(self.ttl_ms) < at_ms;
            if !over_count && !expired {
                break;
            }
            // Never the reply just stored (possible only with a bound of
            // one record and a command of the same id).
            view.delete(&queue_key(head));
            if oldest.id != id {
                view.delete(&idempotency_key(&oldest.id));
            }
            head += 1;
        }
        view.put(QUEUE_HEAD, head.to_be_bytes().to_vec());
        Ok(())
    }

    fn write(
        view: &mut MachineView<'_>,
        k: Vec<u8>,
        value: Option<Vec<u8>>,
        index: u64,
        expires_ms: u64,
    ) -> Result<StrongReply, String> {
        match value {
            Some(value) => {
                let v = serde_json::to_vec(&StrongValue { value, version: index, expires_ms })
                    .map_err(|e| e.to_string())?;
                view.put(&k, v);
            }
            None => view.delete(&k),
        }
        Ok(StrongReply::Written { version: index })
    }

    /// Runs `cmd` at log `index`; `at_ms` is the command's time (its
    /// proposer's HLC, carried in the log), which dates expiry, so every
    /// replica reaches the same state.
    fn run(
        index: u64,
        at_ms: u64,
        cmd: &StrongCommand,
        view: &mut MachineView<'_>,
    ) -> Result<StrongReply, String> {
        let expiry = |ttl_ms: u64| if ttl_ms == 0 { 0 } else { at_ms.saturating_add(ttl_ms) };
        match cmd {
            StrongCommand::Put { table, key, value, ttl_ms } => {
                Self::write(view, row_key(table, key), Some(value.clone()), index, expiry(*ttl_ms))
            }
            StrongCommand::Delete { table, key } => Self::write(view, row_key(table, key), None, index, 0),
            StrongCommand::Cas { table, key, expected, value, ttl_ms } => {
                let k = row_key(table, key);
                // An expired value is absent, as it is to a reader.
                let current =
                    view.get(&k)?.map(|b| decode_value(&b)).transpose()?.filter(|c| !c.is_expired(at_ms));
                if current.as_ref().map(|c| &c.value) != expected.as_ref() {
                    return Ok(StrongReply::CasFailed { current });
                }
                Self::write(view, k, value.clone(), index, expiry(*ttl_ms))
            }
        }
    }
}

impl Machine for StrongMachine {
    fn apply(&self, index: u64, command: &Command, view: &mut MachineView<'_>) -> Reply {
        match command {
            Command::Strong { request_id, op, at_ms } => {
                let idem_key = request_id.as_deref().map(idempotency_key);
                if let Some(k) = &idem_key {
                    if let Ok(Some(stored)) = view.get(k) {
                        if let Ok(reply) = serde_json::from_slice::<StrongReply>(&stored) {
                            return Reply::Strong(reply);
                        }
                    }
                }
                let reply =
                    Self::run(index, *at_ms, op, view).unwrap_or_else(|why| StrongReply::Failed { why });
                if let (Some(k), Ok(bytes)) = (idem_key, serde_json::to_vec(&reply)) {
                    view.put(&k, bytes);
                    if let Some(id) = request_id {
                        if let Err(why) = self.remember(view, id, *at_ms) {
                            tracing::error!(error = %why, "STRONG idempotency queue unreadable: records are not aged");
                        }
                    }
                }
                Reply::Strong(reply)
            }
            other => Reply::Rejected { why: format!("a STRONG group cannot apply {other:?}") },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryEngine;

    fn put(id: &str, at_ms: u64) -> Command {
        Command::Strong {
            request_id: Some(id.to_string()),
            op: StrongCommand::Put {
                table: "t".into(),
                key: b"k".to_vec(),
                value: id.as_bytes().to_vec(),
                ttl_ms: 0,
            },
            at_ms,
        }
    }

    fn kept(view: &MachineView<'_>, ids: impl Iterator<Item = String>) -> Vec<String> {
        ids.filter(|id| view.get(&idempotency_key(id)).unwrap().is_some()).collect()
    }

    fn version(reply: Reply) -> u64 {
        match reply {
            Reply::Strong(StrongReply::Written { version }) => version,
            other => panic!("not a write: {other:?}"),
        }
    }

    #[test]
    fn idempotency_records_are_bounded_by_count_and_by_age() {
        let engine = MemoryEngine::new();
        let mut view = MachineView::for_test(&engine, "g");
        let m = StrongMachine::new(1_000, 3);
        let ids = || (0..10).map(|i| format!("r{i}"));
        for (i, id) in ids().enumerate() {
            m.apply(i as u64 + 1, &put(&id, 100), &mut view);
        }
        // The count bound: the three newest replies are kept.
        assert_eq!(kept(&view, ids()), ["r7", "r8", "r9"]);
        // A retry of a kept one replays its first outcome (log index 10)...
        assert_eq!(version(m.apply(11, &put("r9", 150), &mut view)), 10);
        // ...and a retry of a dropped one applies again.
        assert_eq!(version(m.apply(12, &put("r0", 150), &mut view)), 12);
        assert_eq!(kept(&view, ids()), ["r0", "r8", "r9"]);
        // The TTL: a command 1 s after them drops every older reply.
        m.apply(13, &put("late", 1_151), &mut view);
        assert_eq!(kept(&view, ids().chain(["late".to_string()].into_iter())), ["late"]);
        // The queue holds only what is kept.
        let head = read_u64(&view, QUEUE_HEAD).unwrap();
        let tail = read_u64(&view, QUEUE_TAIL).unwrap();
        assert_eq!(tail - head, 1);
    }

    #[test]
    fn commands_of_older_builds_age_first() {
        // Entries written before commands carried a time decode with
        // at_ms 0: their records are the first to expire.
        let old: Command = serde_json::from_str(
            r#"{"Strong":{"request_id":"a","op":{"Put":{"table":"t","key":[107],"value":[118]}}}}"#,
        )
        .unwrap();
        let engine = MemoryEngine::new();
        let mut view = MachineView::for_test(&engine, "g");
        let m = StrongMachine::new(1_000, 100);
        m.apply(1, &old, &mut view);
        m.apply(2, &put("b", 5_000), &mut view);
        assert_eq!(kept(&view, ["a", "b"].into_iter().map(String::from)), ["b"]);
    }
}
