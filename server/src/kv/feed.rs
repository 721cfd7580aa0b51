//! The change feed (docs/architecture.md section 13): every change a node
//! applies, its own writes and the entries it applies from other regions,
//! in the order applied, kept for `watch.retention_entries` positions in
//! the `feed` column family and streamed to watchers.
//!
//! Each change is named by its origin (the node and store incarnation
//! whose log holds the write, `region/node#store`) and its position in
//! that log, so a watcher's cursor is a position per origin: the same
//! cursor resumes on this node after a restart (the feed is written in the
//! same batch as the change), and a change seen twice is recognised. An
//! origin's changes reach the feed in the order of its log, so "delivered
//! through position p of origin o" is all a cursor needs. Trimming the
//! feed records, per origin, the highest position trimmed (`f/<origin>`);
//! a cursor behind that is refused with `CURSOR_COMPACTED`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use geokv_proto::storage as spb;
use geokv_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Node;
use crate::codec;
use crate::error::KvError;
use crate::storage::{Cf, WriteBatch};

/// Feed entries read per page.
const PAGE: usize = 256;
/// Most entries one trimming batch removes.
const TRIM_PER_PASS: usize = 10_000;
/// Most batches one trimming call writes (a million entries: more than a
/// node writes in the second between two calls).
const TRIM_BATCHES_MAX: usize = 100;

/// Key of the feed entry at local position `seq`.
pub fn entry_key(seq: u64) -> Vec<u8> {
    let mut k = b"l/".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn floor_key(origin: &str) -> Vec<u8> {
    let mut k = b"f/".to_vec();
    k.extend_from_slice(origin.as_bytes());
    k
}

fn seq_of(key: &[u8]) -> Option<u64> {
    key.strip_prefix(b"l/").and_then(|s| <[u8; 8]>::try_from(s).ok()).map(u64::from_be_bytes)
}

/// A watcher's position: per origin, the last position delivered, and
/// the store whose feed it is a position in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    pub positions: BTreeMap<String, u64>,
    pub store: String,
}

impl Cursor {
    pub fn encode(&self) -> Vec<u8> {
        let positions = self
            .positions
            .iter()
            .map(|(actor, counter)| spb::VvEntry { actor: actor.clone(), counter: *counter })
            .collect();
        codec::seal_message(&spb::FeedCursor { positions, store: self.store.clone() })
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, KvError> {
        let bad = |why: String| KvError::InvalidField { field: "cursor", why };
        if bytes.len() > 1 << 20 {
            return Err(bad(format!("{} bytes; a cursor is at most 1 MiB", bytes.len())));
        }
        let c: spb::FeedCursor = codec::open_message(bytes).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            positions: c.positions.into_iter().map(|e| (e.actor, e.counter)).collect(),
            store: c.store,
        })
    }
}

/// The highest trimmed position of every origin.
pub fn floors(node: &Node) -> Result<BTreeMap<String, u64>, KvError> {
    let storage = |e: crate::storage::StorageError| KvError::Storage(e.to_string());
    let mut out = BTreeMap::new();
    let mut start = b"f/".to_vec();
    loop {
        let page = node.engine().scan(Cf::Feed, &start, Some(b"f0"), PAGE).map_err(storage)?;
        for (k, v) in &page {
            let origin = String::from_utf8_lossy(&k[2..]).into_owned();
            let seq = <[u8; 8]>::try_from(v.as_slice()).map(u64::from_be_bytes).unwrap_or(u64::MAX);
            out.insert(origin, seq);
        }
        match page.last() {
            Some((k, _)) if page.len() == PAGE => {
                start = k.clone();
                start.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// Checks that `cursor` can resume: every origin trimmed past it refuses
/// it with `CURSOR_COMPACTED`.
pub fn check_cursor(node: &Node, cursor: &Cursor) -> Result<(), KvError> {
    let here = node.store_tag();
    if cursor.store != here {
        return Err(KvError::CursorCompacted {
            origin: cursor.store.clone(),
            why: format!(
                "it was issued by store `{}` and this node's store is `{here}` (a wiped or restored store keeps no feed of the old one)",
                cursor.store
            ),
        });
    }
    for (origin, trimmed) in floors(node)? {
        let delivered = cursor.positions.get(&origin).copied().unwrap_or(0);
        if trimmed > delivered {
            return Err(KvError::CursorCompacted {
                why: format!(
                    "changes of `{origin}` after position {delivered} were trimmed (through {trimmed})"
                ),
                origin,
            });
        }
    }
    Ok(())
}

/// Feed entries from local position `from` on, at most `limit`.
fn read_page(node: &Node, from: u64, limit: usize) -> Result<Vec<spb::FeedEntry>, KvError> {
    let page = node
        .engine()
        .scan(Cf::Feed, &entry_key(from), Some(b"l0"), limit)
        .map_err(|e| KvError::Storage(e.to_string()))?;
    page.iter()
        .map(|(k, v)| {
            codec::open_message::<spb::FeedEntry>(v).map_err(|e| KvError::Corrupt {
                what: format!("change feed entry {:?}", seq_of(k)),
                why: e.to_string(),
            })
        })
        .collect()
}

/// The oldest local position still in the feed (1 when empty).
fn oldest(node: &Node) -> Result<u64, KvError> {
    let first =
        node.engine().scan(Cf::Feed, b"l/", Some(b"l0"), 1).map_err(|e| KvError::Storage(e.to_string()))?;
    Ok(first.first().and_then(|(k, _)| seq_of(k)).unwrap_or(1))
}

/// The local position of the newest entry (recovered at start).
pub fn newest(engine: &dyn crate::storage::Engine) -> Result<u64, KvError> {
    let last = engine.last(Cf::Feed).map_err(|e| KvError::Storage(e.to_string()))?;
    Ok(last.and_then(|(k, _)| seq_of(&k)).unwrap_or(0))
}

/// Removes every entry past the retention, oldest first, in batches of
/// at most [`TRIM_PER_PASS`] (at most [`TRIM_BATCHES_MAX`] of them per
/// call), recording per origin the highest position removed; returns how
/// many it removed. A call catches up with everything written since the
/// last one: one batch per second fell behind any node writing faster.
pub fn trim(node: &Node) -> Result<u64, KvError> {
    trim_in_batches(node, TRIM_PER_PASS, TRIM_BATCHES_MAX)
}

pub(super) fn trim_in_batches(node: &Node, per_batch: usize, batches_max: usize) -> Result<u64, KvError> {
    let mut removed = 0;
    for _ in 0..batches_max {
        let n = trim_batch(node, per_batch)?;
        removed += n;
        if n < per_batch as u64 {
            break;
        }
    }
    if removed > 0 {
        metrics::counter!("geokv_feed_trimmed_total").increment(removed);
    }
    Ok(removed)
}

/// One batch of [`trim`]. It starts below the retention where the last
/// one stopped (`feed_trimmed_below`), not at the first stored key: the
/// entries it deleted stay on disk as tombstones until compaction, and a
/// scan from the start would step over every one of them each time.
fn trim_batch(node: &Node, per_batch: usize) -> Result<u64, KvError> {
    let retention = node.config().watch.retention_entries;
    let head = node.state.feed_seq.load(Ordering::Acquire);
    if retention == 0 || head <= retention {
        return Ok(0);
    }
    let keep_from = head - retention + 1;
    // With no trim since the start, from the first key under `l/`
    // (malformed or not).
    let (mut from, mut start) = match node.state.feed_trimmed_below.load(Ordering::Acquire) {
        0 => (oldest(node)?, b"l/".to_vec()),
        below => (below, entry_key(below)),
    };
    let mut floors: BTreeMap<String, u64> = BTreeMap::new();
    let mut batch = WriteBatch::new();
    let mut removed = 0u64;
    // Every key in [start, end) is past the retention, or is no entry key
    // at all (counted as corrupt and deleted with the rest: kept, it would
    // stay for good, and the next page starts after it either way).
    let end = entry_key(keep_from);
    while from < keep_from && (removed as usize) < per_batch {
        let want = PAGE.min(per_batch - removed as usize);
        let page = node
            .engine()
            .scan(Cf::Feed, &start, Some(&end), want)
            .map_err(|e| KvError::Storage(e.to_string()))?;
        let complete = page.len() < want;
        for (k, v) in page {
            match seq_of(&k) {
                Some(seq) => {
                    from = seq + 1;
                    match codec::open_message::<spb::FeedEntry>(&v) {
                        Ok(e) => {
                            let f = floors.entry(e.origin).or_insert(0);
                            *f = (*f).max(e.origin_seq);
                        }
                        // Past the retention either way: it goes, or it would
                        // stop every later trim. Its origin's floor is not
                        // raised.
                        Err(e) => {
                            metrics::counter!("geokv_corruption_detected_total").increment(1);
                            tracing::error!(seq, error = %e, "trimming an unreadable change feed entry");
                        }
                    }
                }
                None => {
                    metrics::counter!("geokv_corruption_detected_total").increment(1);
                    tracing::error!(key = ?k, "trimming a change feed key that names no position");
                }
            }
            start.clone_from(&k);
            start.push(0);
            batch.delete(Cf::Feed, k);
            removed += 1;
        }
        if complete {
            from = keep_from;
        }
    }
    if removed > 0 {
        let stored = self::floors(node)?;
        for (origin, seq) in floors {
            let seq = seq.max(stored.get(&origin).copied().unwrap_or(0));
            batch.put(Cf::Feed, floor_key(&origin), seq.to_be_bytes().to_vec());
        }
        node.engine().write(batch, false).map_err(|e| KvError::Storage(e.to_string()))?;
    }
    node.state.feed_trimmed_below.store(from.min(keep_from), Ordering::Release);
    Ok(removed)
}

/// Trims the feed every second until `cancel`.
pub async fn run_trim(node: Arc<Node>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let n = node.clone();
        match tokio::task::spawn_blocking(move || trim(&n)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "change feed trimming failed; retried in a second"),
            Err(e) => tracing::warn!(error = %e, "change feed trimming task failed"),
        }
    }
}

/// What a watcher asked for.
pub struct Watch {
    pub table: String,
    pub prefix: Vec<u8>,
    /// None: changes from now on.
    pub cursor: Option<Cursor>,
}

/// The HLC time through which this node has every change of every source
/// it hears from and of its own (every own write stamped by then is
/// published: [`Node::stable_hlc`]). Taken before the feed is read up to
/// its head, so every change it covers is delivered before the heartbeat
/// that carries it.
fn resolved_hlc(node: &Node) -> u64 {
    let own = node.stable_hlc();
    let sources = node.inbound();
    sources.values().map(|i| i.fresh_as_of_hlc).min().map_or(own, |m| m.min(own))
}

fn change_event(node: &Node, e: spb::FeedEntry, cursor: &Cursor) -> Result<pb::WatchEvent, KvError> {
    let row = e
        .row
        .map(super::row::Row::from_proto)
        .transpose()
        .map_err(|why| KvError::Corrupt { what: format!("change feed entry {}", e.local_seq), why })?;
    let now_ms = super::expiry::read_ms(node.hlc());
    let (siblings, kind, counter_value, set_members) = match &row {
        Some(r) => {
            let (values, _) = super::register_view(r, now_ms, 0);
            let (counter, members) = match &r.value {
                super::RowValue::Counter(c) => (c.value(), Vec::new()),
                super::RowValue::Set(s) => (0, s.members().into_iter().map(<[u8]>::to_vec).collect()),
                _ => (0, Vec::new()),
            };
            (values, r.value.kind().to_string(), counter, members)
        }
        None => (Vec::new(), String::new(), 0, Vec::new()),
    };
    Ok(pb::WatchEvent {
        event: Some(pb::watch_event::Event::Change(pb::WatchChange {
            key: e.key,
            siblings: crate::api::convert::siblings(siblings),
            origin: e.origin,
            origin_seq: e.origin_seq,
            hlc: e.hlc,
            kind,
            counter_value,
            set_members,
        })),
        cursor: cursor.encode(),
    })
}

/// Streams `watch` into `tx` until the receiver goes away or the node
/// fails: stored changes after the cursor first, then new ones as they are
/// written, with a heartbeat at least every `watch.heartbeat_ms`.
pub async fn serve(node: Arc<Node>, watch: Watch, tx: mpsc::Sender<Result<pb::WatchEvent, tonic::Status>>) {
    if let Err(e) = stream(&node, watch, &tx).await {
        let _ = tx.send(Err(e.into())).await;
    }
}

async fn stream(
    node: &Arc<Node>,
    watch: Watch,
    tx: &mpsc::Sender<Result<pb::WatchEvent, tonic::Status>>,
) -> Result<(), KvError> {
    let mut changes = node.state.feed_watch.subscribe();
    let head = node.state.feed_seq.load(Ordering::Acquire);
    // Without a cursor, the stored changes only set the cursor.
    let deliver_after = if watch.cursor.is_some() { 0 } else { head };
    let mut cursor =
        watch.cursor.unwrap_or_else(|| Cursor { positions: BTreeMap::new(), store: node.store_tag() });
    let mut next = oldest(node)?;
    let mut heartbeat = tokio::time::interval(Duration::from_millis(node.config().watch.heartbeat_ms));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A heartbeat's resolved time, taken at its tick and sent once the
    // feed was read through its head after that.
    let mut resolved: Option<u64> = None;
    loop {
        loop {
            let n = node.clone();
            let page = tokio::task::spawn_blocking(move || read_page(&n, next, PAGE))
                .await
                .map_err(|e| KvError::Storage(e.to_string()))??;
            let Some(last) = page.last() else { break };
            let full = page.len() == PAGE;
            next = last.local_seq + 1;
            for e in page {
                let delivered = cursor.positions.entry(e.origin.clone()).or_insert(0);
                if e.origin_seq <= *delivered {
                    continue;
                }
                *delivered = e.origin_seq;
                if e.local_seq <= deliver_after || e.table != watch.table || !e.key.starts_with(&watch.prefix)
                {
                    continue;
                }
                let event = change_event(node, e, &cursor)?;
                if tx.send(Ok(event)).await.is_err() {
                    return Ok(());
                }
            }
            if !full {
                break;
            }
        }
        if let Some(r) = resolved.take() {
            let event = pb::WatchEvent {
                event: Some(pb::watch_event::Event::ResolvedHlc(r)),
                cursor: cursor.encode(),
            };
            if tx.send(Ok(event)).await.is_err() {
                return Ok(());
            }
        }
        tokio::select! {
            changed = changes.changed() => {
                if changed.is_err() {
                    return Err(KvError::ShuttingDown);
                }
            }
            // Read the feed again before sending: a change published after
            // the last page but covered by this time goes out first.
            _ = heartbeat.tick() => resolved = Some(resolved_hlc(node)),
            _ = tx.closed() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let c = Cursor {
            positions: [("us-east-1/n1#a".to_string(), 7), ("eu-west-1/n1#b".to_string(), 3)].into(),
            store: "000001-abc".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        assert!(matches!(Cursor::decode(b"nonsense"), Err(KvError::InvalidField { field: "cursor", .. })));
        assert_eq!(seq_of(&entry_key(42)), Some(42));
        assert!(entry_key(1) < entry_key(256), "big-endian keys sort by position");
    }
}
