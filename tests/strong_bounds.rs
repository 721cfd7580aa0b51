//! A STRONG group's consensus state stays bounded however many writes it
//! takes, and a member far behind catches up by a snapshot sent in pieces
//! (docs/architecture.md, "Bounded consensus state").
//!
//! The bounds are scaled down so the test writes a few thousand STRONG
//! writes instead of a million: a snapshot every 200 entries, 50 entries
//! kept behind it, 300 idempotency records, snapshots sent in 4 KiB pieces.
//! With every write carrying its own idempotency key (the client makes
//! one), an unbounded group would keep one log entry and one record per
//! write.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::cluster::{DevCluster, Options};
use common::Deadline;
use geokv_client::{Row, WriteOptions};

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";

const SNAPSHOT_EVERY: u64 = 200;
const LOG_KEEP: u64 = 50;
const RECORDS_MAX: u64 = 300;
const CHUNK_BYTES: u64 = 4096;
/// Most old records one STRONG command drops (consensus::strong).
const EVICT_PER_APPLY: u64 = 8;
const EXTRA: &str = "[consensus]\nsnapshot_every = 200\nlog_keep = 50\n\
                     snapshot_chunk_bytes = 4096\nstrong_idempotency_records_max = 300\n";

/// STRONG writes, over `KEYS` registers, by `WRITERS` concurrent writers.
const WRITES: u64 = 3000;
const KEYS: u64 = 100;
const WRITERS: u64 = 16;
const VALUE_BYTES: usize = 100;
/// Longest the writes may take, and the catch-up.
const WRITE_LIMIT: Duration = Duration::from_secs(240);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);
/// Live bytes a group may keep at these settings: log entries of under
/// 1 KiB (2 x 200 + 50 of them), 300 records and their queue entries, 100
/// registers (a snapshot is the state machine itself: no copy is kept
/// beside it, decision 035). 1 MiB is about twice what they take; the same store without bounds would hold
/// 3,000 entries and 3,000 records, over 2 MiB.
const GROUP_BYTES_MAX: u64 = 1 << 20;

/// What one group keeps in a store's `raft` column family.
#[derive(Default)]
struct GroupState {
    log_entries: u64,
    records: u64,
    queued: u64,
    registers: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Bytes of the state machine's pairs, framed as a snapshot frames them.
    sm_bytes: u64,
    /// Keys of a stored snapshot copy (`snapshot`, `snapshot/<n>`).
    snapshot_copy_keys: u64,
    live_bytes: u64,
}

/// Reads every group's state from the store at `data_dir`, opened
/// read-only beside the running node (what a restart would find).
fn stored_groups(data_dir: &Path) -> BTreeMap<String, GroupState> {
    let cfs = rocksdb::DB::list_cf(&rocksdb::Options::default(), data_dir).expect("list column families");
    let db = rocksdb::DB::open_cf_for_read_only(&rocksdb::Options::default(), data_dir, &cfs, false)
        .expect("open the store read-only");
    let cf = db.cf_handle("raft").expect("raft column family");
    let mut groups: BTreeMap<String, GroupState> = BTreeMap::new();
    for item in db.iterator_cf(&cf, rocksdb::IteratorMode::Start) {
        let (k, v) = item.expect("read the raft column family");
        let Some(rest) = k.strip_prefix(b"g/strong/") else { continue };
        // `g/strong/<home>@<zone>/<suffix>`: the group name holds one more
        // slash than the prefix.
        let Some(split) = rest.iter().position(|b| *b == b'/') else { continue };
        let group = format!("strong/{}", String::from_utf8_lossy(&rest[..split]));
        let suffix = &rest[split + 1..];
        let state = groups.entry(group).or_default();
        state.live_bytes += (k.len() + v.len()) as u64;
        if let Some(pair) = suffix.strip_prefix(b"sm/") {
            state.sm_bytes += (8 + pair.len() + v.len()) as u64;
        }
        if suffix.starts_with(b"log/") {
            state.log_entries += 1;
        } else if suffix.starts_with(b"sm/i/") {
            state.records += 1;
        } else if suffix.starts_with(b"sm/q/") {
            state.queued += 1;
        } else if let Some(register) = suffix.strip_prefix(b"sm/r/") {
            state.registers.insert(register.to_vec(), v.to_vec());
        } else if suffix.starts_with(b"snapshot") {
            state.snapshot_copy_keys += 1;
        }
    }
    groups
}

/// The registers table's group (homed in us-east-1) in `region`'s store.
fn registers_group(cluster: &DevCluster, region: &str) -> (String, GroupState) {
    let mut groups = stored_groups(&cluster.store_dir(region));
    let name = groups
        .keys()
        .find(|g| g.starts_with(&format!("strong/{US}")))
        .cloned()
        .unwrap_or_else(|| panic!("no STRONG group of {US} in {region}'s store: {:?}", groups.keys()));
    let state = groups.remove(&name).expect("listed");
    (name, state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strong_state_stays_bounded_and_a_member_far_behind_catches_up_by_snapshot() {
    let mut cluster =
        DevCluster::start_with(Options { extra_config: EXTRA.into(), ..Options::scale(0.02) }).await;
    // A voter of the group misses every write below.
    cluster.kill_9(EU_CENTRAL);

    let client = Arc::new(cluster.client(EU_WEST).await);
    let deadline = Arc::new(Deadline::after(WRITE_LIMIT));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (client, deadline) = (client.clone(), deadline.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Bounded: WRITES / WRITERS writes, each retried at most 5 times.
            for i in (w..WRITES).step_by(WRITERS as usize) {
                let row = Row::new("registers", format!("k{:03}", i % KEYS).into_bytes());
                let value = format!("{i:0width$}", width = VALUE_BYTES).into_bytes();
                let mut ok = false;
                for _ in 0..5 {
                    if deadline.passed() {
                        break;
                    }
                    match client.put(&row, value.clone(), WriteOptions::default()).await {
                        Ok(_) => {
                            ok = true;
                            break;
                        }
                        Err(e) => failures.push(format!("write {i}: {e}")),
                    }
                }
                if !ok {
                    return Err(failures);
                }
            }
            Ok(failures.len())
        }));
    }
    let mut retried = 0;
    for task in tasks {
        match task.await.expect("writer task") {
            Ok(n) => retried += n,
            Err(failures) => panic!("a STRONG write failed 5 times: {:?}", failures.last()),
        }
    }

    // The leader's and the other live voter's state, after WRITES writes.
    for region in [US, EU_WEST] {
        let (group, s) = registers_group(&cluster, region);
        println!(
            "{region} {group} after {WRITES} STRONG writes ({retried} retried): {} log entries, {} records, \
             {} queued, {} registers, state machine {} bytes, {} live bytes",
            s.log_entries,
            s.records,
            s.queued,
            s.registers.len(),
            s.sm_bytes,
            s.live_bytes
        );
        assert!(
            s.log_entries <= 2 * SNAPSHOT_EVERY + LOG_KEEP,
            "{region} keeps {} log entries after {WRITES} writes (bound {})",
            s.log_entries,
            2 * SNAPSHOT_EVERY + LOG_KEEP
        );
        assert!(
            s.records <= RECORDS_MAX + EVICT_PER_APPLY && s.queued <= RECORDS_MAX + EVICT_PER_APPLY,
            "{region} keeps {} idempotency records ({} queued) after {WRITES} writes (bound {RECORDS_MAX})",
            s.records,
            s.queued
        );
        assert_eq!(s.registers.len() as u64, KEYS, "{region}: one register per key");
        assert_eq!(s.snapshot_copy_keys, 0, "{region} keeps a copy of its state machine as a snapshot");
        assert!(s.live_bytes <= GROUP_BYTES_MAX, "{region} keeps {} bytes for the group", s.live_bytes);
    }

    // The voter that missed them comes back behind the leader's log: it
    // catches up by a snapshot, in pieces, and then holds the same registers.
    cluster.restart(EU_CENTRAL).await;
    let admin = cluster.admin_addr(EU_CENTRAL);
    let deadline = Deadline::after(CATCH_UP_LIMIT);
    let (installed, pieces) = loop {
        let body = tokio::task::spawn_blocking(move || common::http_get(admin, "/metrics"))
            .await
            .expect("metrics probe")
            .unwrap_or_default();
        let installed = common::metric_in(&body, "geokv_raft_snapshots_installed_total", &[]);
        let pieces = common::metric_in(&body, "geokv_raft_snapshot_chunks_received_total", &[]);
        if installed >= 1.0 {
            break (installed, pieces);
        }
        assert!(!deadline.passed(), "{EU_CENTRAL} installed no snapshot in {CATCH_UP_LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (_, leader) = registers_group(&cluster, US);
    // The snapshot sent is the leader's state machine, framed: 4 bytes of
    // magic and the pairs (it may have grown since the leader's store was read).
    let expected_pieces = (4 + leader.sm_bytes).div_ceil(CHUNK_BYTES);
    println!(
        "{EU_CENTRAL}: {installed} snapshot(s) installed from {pieces} pieces (a {} byte snapshot is {} pieces)",
        4 + leader.sm_bytes, expected_pieces
    );
    assert!(
        pieces >= 2.0,
        "the snapshot came in {pieces} pieces, not several of at most {CHUNK_BYTES} bytes"
    );
    let deadline = Deadline::after(CATCH_UP_LIMIT);
    loop {
        let (_, caught_up) = registers_group(&cluster, EU_CENTRAL);
        if caught_up.registers == leader.registers {
            break;
        }
        let differ = leader.registers.iter().filter(|(k, v)| caught_up.registers.get(*k) != Some(*v)).count();
        assert!(
            !deadline.passed(),
            "{EU_CENTRAL} still differs from the leader in {differ} of {KEYS} registers after {CATCH_UP_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
