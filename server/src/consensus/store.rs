//! Raft storage of one group on the node's engine (column family `raft`).
//!
//! Key layout, all under `g/<group>/`:
//! - `log/<index, 8 bytes big-endian>`: sealed JSON of an openraft entry;
//! - `vote`, `committed`, `purged`: sealed JSON of the vote and log ids;
//! - `fence`: the vote fence of a member whose store was made empty;
//! - `sm/<key>`: the state machine's pairs; `applied`, `membership`;
//! - `snapshot`: the last built snapshot (meta and data).
//!
//! Log appends and votes are synced before openraft is told they are
//! durable. An append is written at once (readable for replication) and
//! synced by the group's log syncer thread, which acknowledges appends in
//! order and covers every append waiting with one sync: the leader's own
//! sync then runs while its entries are already on the way to followers. State-machine writes are not synced: after a crash the applied
//! position read back may be older, and openraft re-applies the committed
//! entries after it (the log is only purged behind a synced snapshot), so
//! every apply must be deterministic, which [`Machine`] implementations are.

// openraft's storage traits fix the error type (`StorageError`, ~224
// bytes); the helpers here return it unboxed to match them.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{Command, NodeId, Reply, TypeConfig};
use crate::codec;
use crate::storage::{prefix_end, Cf, Engine, KvPairs, WriteBatch};

/// Log entries read per scan page while recovering the last log id.
const SCAN_PAGE: usize = 4096;

fn group_key(group: &str, suffix: &[u8]) -> Vec<u8> {
    let mut k = format!("g/{group}/").into_bytes();
    k.extend_from_slice(suffix);
    k
}

fn log_key(group: &str, index: u64) -> Vec<u8> {
    let mut k = group_key(group, b"log/");
    k.extend_from_slice(&index.to_be_bytes());
    k
}

fn sm_key(group: &str, key: &[u8]) -> Vec<u8> {
    let mut k = group_key(group, b"sm/");
    k.extend_from_slice(key);
    k
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageIOError<NodeId>> {
    serde_json::to_vec(value).map(|v| codec::seal(&v)).map_err(|e| StorageIOError::write(&e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageIOError<NodeId>> {
    let payload = codec::open(bytes).map_err(|e| StorageIOError::read(&e))?;
    serde_json::from_slice(payload).map_err(|e| StorageIOError::read(&e))
}

fn io_read(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read(&e).into()
}

fn io_write(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write(&e).into()
}

/// The Raft log of one group.
#[derive(Clone)]
pub struct LogStore {
    engine: Arc<dyn Engine>,
    group: String,
    /// Last log id written (None when the log is empty), recovered on open.
    last: Arc<Mutex<Option<LogId<NodeId>>>>,
    /// Appends written but not yet synced, to the syncer thread (None for
    /// the memory engine, which has nothing to sync: appends complete
    /// inline, and the simulation keeps to its own threads).
    syncer: Option<std::sync::mpsc::Sender<LogFlushed<TypeConfig>>>,
}

/// Syncs the engine for appends in the order they were written and
/// reports each as flushed; one sync covers every append waiting. Ends
/// when the last [`LogStore`] clone of the group is dropped.
fn run_log_syncer(engine: Arc<dyn Engine>, rx: std::sync::mpsc::Receiver<LogFlushed<TypeConfig>>) {
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        waiting.extend(rx.try_iter());
        let result = engine.sync().map_err(|e| e.to_string());
        metrics::histogram!("geokv_raft_log_sync_batch").record(waiting.len() as f64);
        for callback in waiting {
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}

impl LogStore {
    pub fn open(engine: Arc<dyn Engine>, group: &str) -> Result<Self, StorageError<NodeId>> {
        let start = group_key(group, b"log/");
        let end = prefix_end(&start);
        let mut last = None;
        let mut from = start.clone();
        loop {
            let page = engine.scan(Cf::Raft, &from, end.as_deref(), SCAN_PAGE).map_err(io_read)?;
            let Some((k, v)) = page.last() else { break };
            let entry: Entry<TypeConfig> = decode(v)?;
            last = Some(entry.log_id);
            if page.len() < SCAN_PAGE {
                break;
            }
            from = k.clone();
            from.push(0);
        }
        if last.is_none() {
            last = read_json(engine.as_ref(), &group_key(group, b"purged"))?;
        }
        let syncer = if engine.kind() == "memory" {
            None
        } else {
            let (tx, rx) = std::sync::mpsc::channel();
            let sync_engine = engine.clone();
            std::thread::Builder::new()
                .name(format!("raft-sync-{group}"))
                .spawn(move || run_log_syncer(sync_engine, rx))
                .map_err(io_write)?;
            Some(tx)
        };
        Ok(Self { engine, group: group.to_string(), last: Arc::new(Mutex::new(last)), syncer })
    }

    fn get_json<T: DeserializeOwned>(&self, suffix: &[u8]) -> Result<Option<T>, StorageError<NodeId>> {
        read_json(self.engine.as_ref(), &group_key(&self.group, suffix))
    }

    fn put_json<T: Serialize>(
        &self,
        suffix: &[u8],
        value: &T,
        sync: bool,
    ) -> Result<(), StorageError<NodeId>> {
        let mut batch = WriteBatch::new();
        batch.put(Cf::Raft, group_key(&self.group, suffix), encode(value)?);
        self.engine.write(batch, sync).map_err(io_write)
    }
}

/// The vote fence of a group at this member (docs/architecture.md
/// section 16): kept beside the group's vote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// The member is still learning the group's terms (its store was made
    /// empty): it grants no vote and starts no election.
    pub pending: bool,
    /// It grants no vote for a leader id at or below (term, voted_for),
    /// and takes no leader below it (term 0 = no fence).
    pub term: u64,
    #[serde(default)]
    pub voted_for: NodeId,
}

/// The group's fence record at this member, if any.
pub fn read_fence(engine: &dyn Engine, group: &str) -> Result<Option<FenceRecord>, StorageError<NodeId>> {
    read_json(engine, &group_key(group, b"fence"))
}

/// Stores the group's fence record (synced: it must outlive a crash).
pub fn write_fence(
    engine: &dyn Engine,
    group: &str,
    record: FenceRecord,
) -> Result<(), StorageError<NodeId>> {
    let mut batch = WriteBatch::new();
    batch.put(Cf::Raft, group_key(group, b"fence"), encode(&record)?);
    engine.write(batch, true).map_err(io_write)
}

fn read_json<T: DeserializeOwned>(
    engine: &dyn Engine,
    key: &[u8],
) -> Result<Option<T>, StorageError<NodeId>> {
    match engine.get(Cf::Raft, key).map_err(io_read)? {
        Some(bytes) => Ok(Some(decode(&bytes)?)),
        None => Ok(None),
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        use std::ops::Bound;
        let first = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => Some(i.saturating_add(1)),
            Bound::Excluded(i) => Some(*i),
            Bound::Unbounded => None,
        };
        let start_key = log_key(&self.group, first);
        let end_key = match end {
            Some(e) => log_key(&self.group, e),
            None => prefix_end(&group_key(&self.group, b"log/")).unwrap_or_default(),
        };
        let limit = end.map(|e| e.saturating_sub(first) as usize).unwrap_or(usize::MAX).min(1 << 20);
        let pairs = self.engine.scan(Cf::Raft, &start_key, Some(&end_key), limit).map_err(io_read)?;
        pairs.iter().map(|(_, v)| decode(v).map_err(StorageError::from)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let purged: Option<LogId<NodeId>> = self.get_json(b"purged")?;
        let last = *self.last.lock().unwrap_or_else(|p| p.into_inner());
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_json(b"vote", vote, true)?;
        // Every stored vote is logged, so a run can show that no member
        // voted for two candidates in one term (the log outlives a wiped
        // store). A committed vote only acknowledges the term's leader.
        tracing::info!(
            "VOTE group={} term={} voted_for={} committed={}",
            self.group,
            vote.leader_id().get_term(),
            vote.leader_id().voted_for().unwrap_or(0),
            vote.is_committed()
        );
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_json(b"vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError<NodeId>> {
        // Not synced: it is on the path of every commit, and losing it only
        // means re-applying entries after a crash (the engine keeps write
        // order, so it is never ahead of the synced log).
        self.put_json(b"committed", &committed, false)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_json::<Option<LogId<NodeId>>>(b"committed")?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::new();
        let mut last = None;
        for entry in entries {
            batch.put(Cf::Raft, log_key(&self.group, entry.log_id.index), encode(&entry)?);
            last = Some(entry.log_id);
        }
        // Written now (visible to the replication readers), reported
        // flushed once the syncer synced it.
        if let Err(e) = self.engine.write(batch, false) {
            callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
            return Err(io_write(e));
        }
        if let Some(l) = last {
            *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
        }
        let unsent = match &self.syncer {
            Some(tx) => tx.send(callback).err().map(|std::sync::mpsc::SendError(c)| c),
            None => Some(callback),
        };
        if let Some(callback) = unsent {
            // No syncer (memory engine), or it is gone (only while shutting
            // down): sync here.
            let result = self.engine.sync();
            callback.log_io_completed(
                result.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())),
            );
            return result.map_err(io_write);
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let start = log_key(&self.group, log_id.index);
        let end = prefix_end(&group_key(&self.group, b"log/")).unwrap_or_default();
        let keys = self.engine.scan(Cf::Raft, &start, Some(&end), 1 << 20).map_err(io_read)?;
        let mut batch = WriteBatch::new();
        for (k, _) in keys {
            batch.delete(Cf::Raft, k);
        }
        self.engine.write(batch, true).map_err(io_write)?;
        let previous = if log_id.index == 0 {
            None
        } else {
            self.clone().try_get_log_entries(log_id.index - 1..log_id.index).await?.pop().map(|e| e.log_id)
        };
        let purged: Option<LogId<NodeId>> = self.get_json(b"purged")?;
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = previous.or(purged);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let start = log_key(&self.group, 0);
        let end = log_key(&self.group, log_id.index.saturating_add(1));
        let keys = self.engine.scan(Cf::Raft, &start, Some(&end), 1 << 20).map_err(io_read)?;
        let mut batch = WriteBatch::new();
        batch.put(Cf::Raft, group_key(&self.group, b"purged"), encode(&log_id)?);
        for (k, _) in keys {
            batch.delete(Cf::Raft, k);
        }
        self.engine.write(batch, true).map_err(io_write)?;
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|l| l.index < log_id.index) {
            *last = Some(log_id);
        }
        Ok(())
    }
}

/// Reads of the state machine's pairs during an apply: pending writes of
/// the same batch first, then the engine.
pub struct MachineView<'a> {
    engine: &'a dyn Engine,
    group: &'a str,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl MachineView<'_> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        if let Some(v) = self.pending.get(key) {
            return Ok(v.clone());
        }
        self.engine.get(Cf::Raft, &sm_key(self.group, key)).map_err(|e| e.to_string())
    }

    pub fn put(&mut self, key: &[u8], value: Vec<u8>) {
        self.pending.insert(key.to_vec(), Some(value));
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
    }
}

/// The deterministic logic of a group's state machine.
pub trait Machine: Send + Sync + 'static {
    /// Applies one committed command. Must depend only on the command and
    /// the view (never on clocks or local state), since every member and
    /// every replay must reach the same state.
    fn apply(&self, index: u64, command: &Command, view: &mut MachineView<'_>) -> Reply;

    /// Called after a batch of applies is stored (to publish new state).
    fn applied(&self, _view_of: &dyn Fn(&[u8]) -> Option<Vec<u8>>) {}
}

/// A snapshot's data: every pair of the state machine.
#[derive(Serialize, Deserialize)]
struct SnapshotData {
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, openraft::BasicNode>,
    data: Vec<u8>,
}

/// The state machine of one group over the engine.
#[derive(Clone)]
pub struct StateMachine {
    engine: Arc<dyn Engine>,
    group: String,
    machine: Arc<dyn Machine>,
}

impl StateMachine {
    pub fn new(engine: Arc<dyn Engine>, group: &str, machine: Arc<dyn Machine>) -> Self {
        let me = Self { engine, group: group.to_string(), machine };
        me.publish();
        me
    }

    /// A pair of the state machine as last applied on this node.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
        self.engine.get(Cf::Raft, &sm_key(&self.group, key)).map_err(|e| e.to_string())
    }

    fn publish(&self) {
        let engine = self.engine.clone();
        let group = self.group.clone();
        self.machine.applied(&move |k| engine.get(Cf::Raft, &sm_key(&group, k)).ok().flatten());
    }

    fn all_pairs(&self) -> Result<KvPairs, StorageError<NodeId>> {
        let prefix = group_key(&self.group, b"sm/");
        let end = prefix_end(&prefix);
        let pairs = self.engine.scan(Cf::Raft, &prefix, end.as_deref(), usize::MAX).map_err(io_read)?;
        // Every scanned key starts with the prefix; one that did not would
        // be skipped, never sliced past its end.
        Ok(pairs
            .into_iter()
            .filter_map(|(k, v)| Some((k.strip_prefix(prefix.as_slice())?.to_vec(), v)))
            .collect())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (last_applied, membership) = self.clone().applied_state().await?;
        let data = serde_json::to_vec(&SnapshotData { pairs: self.all_pairs()? }).map_err(io_write)?;
        let id = format!("{}-{}", last_applied.map(|l| l.index).unwrap_or(0), data.len());
        let meta = SnapshotMeta { last_log_id: last_applied, last_membership: membership, snapshot_id: id };
        let mut batch = WriteBatch::new();
        batch.put(
            Cf::Raft,
            group_key(&self.group, b"snapshot"),
            encode(&StoredSnapshot { meta: meta.clone(), data: data.clone() })?,
        );
        self.engine.write(batch, true).map_err(io_write)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, openraft::BasicNode>), StorageError<NodeId>>
    {
        let applied: Option<Option<LogId<NodeId>>> =
            read_json(self.engine.as_ref(), &group_key(&self.group, b"applied"))?;
        let applied = applied.flatten();
        let membership = read_json(self.engine.as_ref(), &group_key(&self.group, b"membership"))?;
        Ok((applied, membership.unwrap_or_default()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Reply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut view =
            MachineView { engine: self.engine.as_ref(), group: &self.group, pending: BTreeMap::new() };
        let mut replies = Vec::new();
        let mut batch = WriteBatch::new();
        let mut last = None;
        for entry in entries {
            last = Some(entry.log_id);
            match &entry.payload {
                EntryPayload::Blank => replies.push(Reply::None),
                EntryPayload::Normal(cmd) => {
                    replies.push(self.machine.apply(entry.log_id.index, cmd, &mut view))
                }
                EntryPayload::Membership(m) => {
                    let stored = StoredMembership::new(Some(entry.log_id), m.clone());
                    batch.put(Cf::Raft, group_key(&self.group, b"membership"), encode(&stored)?);
                    replies.push(Reply::None);
                }
            }
        }
        for (k, v) in std::mem::take(&mut view.pending) {
            match v {
                Some(v) => batch.put(Cf::Raft, sm_key(&self.group, &k), v),
                None => batch.delete(Cf::Raft, sm_key(&self.group, &k)),
            }
        }
        if let Some(l) = last {
            batch.put(Cf::Raft, group_key(&self.group, b"applied"), encode(&Some(l))?);
        }
        self.engine.write(batch, false).map_err(io_write)?;
        self.publish();
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let parsed: SnapshotData = serde_json::from_slice(&data).map_err(io_read)?;
        let mut batch = WriteBatch::new();
        for (k, _) in self.all_pairs()? {
            batch.delete(Cf::Raft, sm_key(&self.group, &k));
        }
        for (k, v) in parsed.pairs {
            batch.put(Cf::Raft, sm_key(&self.group, &k), v);
        }
        batch.put(Cf::Raft, group_key(&self.group, b"applied"), encode(&meta.last_log_id)?);
        batch.put(Cf::Raft, group_key(&self.group, b"membership"), encode(&meta.last_membership)?);
        batch.put(
            Cf::Raft,
            group_key(&self.group, b"snapshot"),
            encode(&StoredSnapshot { meta: meta.clone(), data })?,
        );
        self.engine.write(batch, true).map_err(io_write)?;
        self.publish();
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let stored: Option<StoredSnapshot> =
            read_json(self.engine.as_ref(), &group_key(&self.group, b"snapshot"))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}
