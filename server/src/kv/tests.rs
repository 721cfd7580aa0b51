//! Node-level tests over the in-memory and RocksDB engines: the behaviour a
//! client sees, without the network.

use std::sync::Arc;

use super::*;
use crate::causality::SystemClock;
use crate::config::Config;
use crate::storage::memory::MemoryEngine;
use crate::storage::rocks::{RocksEngine, RocksOptions};
use crate::storage::{KvPair, KvPairs, StorageError, WriteBatch};
use commit::ApplyMode;

fn config(extra: &str) -> Arc<Config> {
    let text = format!(
        r#"
        region = "eu-west-1"
        regions = [{{ name = "eu-west-1" }}, {{ name = "eu-central-1" }}, {{ name = "us-east-1" }}]
        zones = [{{ name = "eu", regions = ["eu-west-1", "eu-central-1"] }}]
        localities = {{ FR = "eu-west-1", DE = "eu-central-1", US = "us-east-1" }}
        [[tables]]
        name = "default"
        default_home_region = "eu-west-1"
        [[tables]]
        name = "strict"
        [[tables]]
        name = "lww"
        default_home_region = "eu-west-1"
        conflict = "lww"
        {extra}
        "#
    );
    Arc::new(Config::from_toml(&text).unwrap().finish().unwrap())
}

fn node_on(engine: Arc<dyn Engine>) -> Arc<Node> {
    node_with("", engine)
}

/// A node on `engine` with `extra` added to the test configuration.
fn node_with(extra: &str, engine: Arc<dyn Engine>) -> Arc<Node> {
    let hlc = Arc::new(Hlc::new(Arc::new(SystemClock), 500));
    Node::start(config(extra), engine, hlc).unwrap()
}

fn node() -> Arc<Node> {
    node_on(Arc::new(MemoryEngine::new()))
}

fn row(key: &str) -> RowRef {
    RowRef { table: "default".into(), key: key.as_bytes().to_vec(), locality: Locality::Unset }
}

fn put(row: RowRef, value: &str, context: VersionVector) -> WriteRequest {
    WriteRequest {
        ops: vec![WriteOp { row, op: RowOp::Put { value: value.as_bytes().to_vec(), context, ttl_ms: 0 } }],
        level: Some(Level::Eventual),
        idempotency: None,
    }
}

fn values(node: &Node, key: &str) -> (Vec<String>, VersionVector) {
    let read = node.read(&row(key), ReadLevel::Local, &[]).unwrap();
    let (siblings, ctx) = register_view(read.row.as_ref().expect("row exists"), 0, 0);
    let mut vals: Vec<String> = siblings.into_iter().map(|s| String::from_utf8(s.value).unwrap()).collect();
    vals.sort();
    (vals, parse_context(&ctx).unwrap())
}

#[tokio::test]
async fn concurrent_blind_puts_leave_siblings_and_a_context_put_supersedes_exactly_them() {
    let node = node();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            node.write(put(row("k"), &format!("v{i}"), VersionVector::default())).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (vals, ctx) = values(&node, "k");
    assert_eq!(vals.len(), 8, "every blind write is kept as a sibling: {vals:?}");
    assert_eq!(node.conflicts().get("default").copied().unwrap_or(0), 7);

    // A write the reader did not see survives the reader's resolving write.
    node.write(put(row("k"), "late", VersionVector::default())).await.unwrap();
    node.write(put(row("k"), "resolved", ctx)).await.unwrap();
    let (vals, _) = values(&node, "k");
    assert_eq!(vals, ["late", "resolved"]);
}

#[tokio::test]
async fn delete_with_context_removes_what_it_saw() {
    let node = node();
    node.write(put(row("d"), "a", VersionVector::default())).await.unwrap();
    let (_, ctx) = values(&node, "d");
    node.write(WriteRequest {
        ops: vec![WriteOp { row: row("d"), op: RowOp::Delete { context: Some(ctx) } }],
        level: None,
        idempotency: None,
    })
    .await
    .unwrap();
    let read = node.read(&row("d"), ReadLevel::Local, &[]).unwrap();
    assert!(row_is_deleted(read.row.as_ref().unwrap()));
    assert!(register_view(read.row.as_ref().unwrap(), 0, 0).0.is_empty());
}

#[tokio::test]
async fn concurrent_counter_adds_sum_exactly_and_idempotent_retry_counts_once() {
    let node = node();
    let add = |delta, key: Option<&str>| WriteRequest {
        ops: vec![WriteOp { row: row("c"), op: RowOp::CounterAdd { delta } }],
        level: None,
        idempotency: key.map(|k| Idempotency { key: k.into(), request_hash: 7 }),
    };
    let mut tasks = Vec::new();
    for i in 0..50i64 {
        let node = node.clone();
        let req = add(if i % 5 == 0 { -1 } else { 2 }, None);
        tasks.push(tokio::spawn(async move { node.write(req).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let first = node.write(add(100, Some("retry-1"))).await.unwrap();
    let again = node.write(add(100, Some("retry-1"))).await.unwrap();
    assert!(!first[0].replayed && again[0].replayed);
    assert_eq!(first[0].counter_value, again[0].counter_value);
    let expected = 40 * 2 - 10 + 100;
    assert_eq!(first[0].counter_value, Some(expected));
    let read = node.read(&row("c"), ReadLevel::Local, &[]).unwrap();
    match read.row.unwrap().value {
        RowValue::Counter(c) => assert_eq!(c.value(), expected),
        other => panic!("not a counter: {other:?}"),
    }
    // The same key for another request is refused, not silently replayed.
    let err = node.write(WriteRequest {
        idempotency: Some(Idempotency { key: "retry-1".into(), request_hash: 8 }),
        ..add(1, None)
    });
    assert_eq!(err.await.unwrap_err().reason(), "IDEMPOTENCY_KEY_REUSED");
}

#[tokio::test]
async fn set_remove_with_stale_context_keeps_a_later_add() {
    let node = node();
    let op = |op| WriteRequest { ops: vec![WriteOp { row: row("s"), op }], level: None, idempotency: None };
    node.write(op(RowOp::SetAdd { members: vec![b"x".to_vec(), b"y".to_vec()] })).await.unwrap();
    let seen = match node.read(&row("s"), ReadLevel::Local, &[]).unwrap().row.unwrap().value {
        RowValue::Set(s) => s.context().clone(),
        _ => unreachable!(),
    };
    node.write(op(RowOp::SetAdd { members: vec![b"x".to_vec()] })).await.unwrap();
    let out = node
        .write(op(RowOp::SetRemove { members: vec![b"x".to_vec(), b"y".to_vec()], context: Some(seen) }))
        .await
        .unwrap();
    assert_eq!(out[0].members.as_deref(), Some(&[b"x".to_vec()][..]), "the unseen add of x wins");
}

#[tokio::test]
async fn wrong_type_and_limits_are_typed() {
    let node = node();
    node.write(put(row("r"), "v", VersionVector::default())).await.unwrap();
    let incr = WriteRequest {
        ops: vec![WriteOp { row: row("r"), op: RowOp::CounterAdd { delta: 1 } }],
        level: None,
        idempotency: None,
    };
    assert_eq!(node.write(incr).await.unwrap_err().reason(), "WRONG_TYPE");
    let big = "x".repeat(node.config().limits.value_bytes_max + 1);
    assert_eq!(
        node.write(put(row("r"), &big, VersionVector::default())).await.unwrap_err().reason(),
        "VALUE_TOO_LARGE"
    );
    let long_key = "k".repeat(node.config().limits.key_bytes_max + 1);
    assert_eq!(
        node.write(put(row(&long_key), "v", VersionVector::default())).await.unwrap_err().reason(),
        "KEY_TOO_LARGE"
    );
    let mut strict = row("s");
    strict.table = "strict".into();
    assert_eq!(
        node.write(put(strict, "v", VersionVector::default())).await.unwrap_err().reason(),
        "MISSING_LOCALITY"
    );
    let mut unknown = row("s");
    unknown.table = "nope".into();
    assert_eq!(
        node.write(put(unknown, "v", VersionVector::default())).await.unwrap_err().reason(),
        "UNKNOWN_TABLE"
    );
}

#[tokio::test]
async fn residency_and_levels_are_enforced_at_admission() {
    let node = node();
    let us_row = RowRef { locality: Locality::Value("US".into()), ..row("u") };
    let mut local = put(us_row.clone(), "v", VersionVector::default());
    local.level = Some(Level::Local);
    let err = node.write(local).await.unwrap_err();
    assert_eq!(err.reason(), "NOT_HOME", "{err}");
    let mut eventual = put(us_row, "v", VersionVector::default());
    eventual.level = Some(Level::Quorum);
    assert_eq!(node.write(eventual).await.unwrap_err().reason(), "LEVEL_UNAVAILABLE");
    let de = RowRef { locality: Locality::Value("DE".into()), ..row("de") };
    node.write(put(de.clone(), "v", VersionVector::default()))
        .await
        .expect("eu row accepted in an eu region");
    let stored = node.read(&de, ReadLevel::Local, &[]).unwrap().row.unwrap();
    assert_eq!((stored.home_region.as_str(), stored.zone.as_str()), ("eu-central-1", "eu"));
}

/// Damages the stored copy of row `key` (one bit flipped in the middle).
fn damage_stored_row(engine: &MemoryEngine, key: &str) {
    let dk = row::data_key("default", key.as_bytes());
    let mut bytes = engine.get(Cf::Data, &dk).unwrap().unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    let mut batch = crate::storage::WriteBatch::new();
    batch.put(Cf::Data, dk, bytes);
    engine.write(batch, true).unwrap();
}

#[tokio::test]
async fn corrupted_stored_value_is_reported_never_returned() {
    let engine = Arc::new(MemoryEngine::new());
    // Without the committer's row cache (the default) a write reads the
    // stored copy too.
    let node = node_with("[storage]\nrow_cache_mib = 0", engine.clone());
    node.write(put(row("bad"), "precious", VersionVector::default())).await.unwrap();
    damage_stored_row(&engine, "bad");

    let err = node.read(&row("bad"), ReadLevel::Local, &[]).unwrap_err();
    assert_eq!(err.reason(), "DATA_CORRUPTION");
    assert!(err.to_string().contains("default/bad"), "names the key: {err}");
    // A write does not paper over the corruption either.
    let err = node.write(put(row("bad"), "new", VersionVector::default())).await.unwrap_err();
    assert_eq!(err.reason(), "DATA_CORRUPTION");
    assert_eq!(node.scan("default", b"", b"", 10, false).unwrap_err().reason(), "DATA_CORRUPTION");
}

/// With the row cache (`storage.row_cache_mib`), a write to a row the committer wrote
/// last merges into the row it wrote, not into the damaged stored copy:
/// reads report the damage until then, and the write stores the row whole,
/// nothing of it lost (docs/decisions/043-row-cache-and-shared-connections.md).
#[tokio::test]
async fn a_write_over_a_damaged_stored_copy_keeps_the_row_the_committer_wrote() {
    let engine = Arc::new(MemoryEngine::new());
    let node = node_with("[storage]\nrow_cache_mib = 64", engine.clone());
    node.write(put(row("bad"), "precious", VersionVector::default())).await.unwrap();
    damage_stored_row(&engine, "bad");
    assert_eq!(node.read(&row("bad"), ReadLevel::Local, &[]).unwrap_err().reason(), "DATA_CORRUPTION");
    node.write(put(row("bad"), "new", VersionVector::default())).await.unwrap();
    assert_eq!(values(&node, "bad").0, ["new", "precious"], "the earlier value kept beside the new one");
}

#[tokio::test]
async fn rocksdb_node_recovers_rows_and_log_position_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let seq = {
        let engine = Arc::new(RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap());
        let node = node_on(engine);
        for i in 0..20 {
            node.write(put(row(&format!("k{i:02}")), &format!("v{i}"), VersionVector::default()))
                .await
                .unwrap();
        }
        node.shutdown();
        node.log_seq()
    };
    assert_eq!(seq, 20);
    let engine = Arc::new(RocksEngine::open(dir.path(), &RocksOptions::default()).unwrap());
    let node = node_on(engine);
    assert_eq!(node.log_seq(), 20, "log numbering continues after restart");
    let page = node.scan("default", b"k1", b"", 100, false).unwrap();
    let keys: Vec<_> = page.rows.iter().map(|r| String::from_utf8(r.key.clone()).unwrap()).collect();
    assert_eq!(keys, (10..20).map(|i| format!("k{i}")).collect::<Vec<_>>());
    let first = node.scan("default", b"k", b"", 5, false).unwrap();
    assert_eq!(first.rows.len(), 5);
    let rest = node.scan("default", b"k", first.next_start_after.as_deref().unwrap(), 100, false).unwrap();
    assert_eq!(rest.rows.len(), 15);
    assert!(rest.next_start_after.is_none());
}

#[tokio::test]
async fn batch_is_atomic_when_one_op_fails() {
    let node = node();
    node.write(put(row("counter"), "v", VersionVector::default())).await.unwrap();
    let req = WriteRequest {
        ops: vec![
            WriteOp {
                row: row("a"),
                op: RowOp::Put { value: b"1".to_vec(), context: VersionVector::default(), ttl_ms: 0 },
            },
            WriteOp { row: row("counter"), op: RowOp::CounterAdd { delta: 1 } },
        ],
        level: None,
        idempotency: None,
    };
    assert_eq!(node.write(req).await.unwrap_err().reason(), "WRONG_TYPE");
    assert!(node.read(&row("a"), ReadLevel::Local, &[]).unwrap().row.is_none(), "no partial batch");
}

#[tokio::test]
async fn lww_table_keeps_the_last_write() {
    let node = node();
    let lww = |key: &str| RowRef { table: "lww".into(), ..row(key) };
    node.write(put(lww("x"), "one", VersionVector::default())).await.unwrap();
    node.write(put(lww("x"), "two", VersionVector::default())).await.unwrap();
    let read = node.read(&lww("x"), ReadLevel::Local, &[]).unwrap();
    let (siblings, _) = register_view(read.row.as_ref().unwrap(), 0, 0);
    assert_eq!(siblings.len(), 1);
    assert_eq!(siblings[0].value, b"two");
}

#[tokio::test]
async fn replicated_frames_merge_once_and_keep_local_writes() {
    let node = node();
    let row = remote_counter(5);
    let frame = |first, through| RemoteApply {
        source: "us-east-1/n1".into(),
        source_store: String::new(),
        first_seq: first,
        through_seq: through,
        entries: vec![("default".into(), b"c".to_vec(), row.clone())],
        mode: ApplyMode::Log,
        idempotency: Vec::new(),
        seqs: Vec::new(),
    };
    node.apply_remote(frame(1, 1)).await.unwrap();
    node.apply_remote(frame(1, 1)).await.unwrap();
    assert_eq!(node.inbound()["us-east-1/n1"].applied_through, 1);
    let eventual_add = WriteRequest {
        ops: vec![WriteOp {
            row: RowRef { locality: Locality::HomeRegion("us-east-1".into()), ..row_ref_c() },
            op: RowOp::CounterAdd { delta: 2 },
        }],
        level: Some(Level::Eventual),
        idempotency: None,
    };
    let out = node.write(eventual_add).await.unwrap();
    assert_eq!(out[0].counter_value, Some(7), "the remote 5 counted once, plus the local 2");
    // A later frame carrying the same remote state changes nothing.
    node.apply_remote(frame(2, 2)).await.unwrap();
    match node.read(&row_ref_c(), ReadLevel::Local, &[]).unwrap().row.unwrap().value {
        RowValue::Counter(c) => assert_eq!(c.value(), 7),
        other => panic!("not a counter: {other:?}"),
    }
}

#[tokio::test]
async fn repaired_rows_merge_without_moving_the_position_until_done() {
    let node = node();
    let row = remote_counter(4);
    let apply = |mode, through, entries: Vec<(String, Vec<u8>, Row)>| RemoteApply {
        source: "us-east-1/n1".into(),
        source_store: String::new(),
        first_seq: 0,
        through_seq: through,
        entries,
        mode,
        idempotency: Vec::new(),
        seqs: Vec::new(),
    };
    let rows = vec![("default".to_string(), b"c".to_vec(), row.clone())];
    node.apply_remote(apply(ApplyMode::RepairRows, 0, rows.clone())).await.unwrap();
    node.apply_remote(apply(ApplyMode::RepairRows, 0, rows)).await.unwrap();
    assert!(!node.inbound().contains_key("us-east-1/n1"), "repair rows leave the position alone");
    node.apply_remote(apply(ApplyMode::RepairDone, 40, Vec::new())).await.unwrap();
    assert_eq!(node.inbound()["us-east-1/n1"].applied_through, 40);
    node.apply_remote(apply(ApplyMode::RepairDone, 10, Vec::new())).await.unwrap();
    assert_eq!(node.inbound()["us-east-1/n1"].applied_through, 40, "never moves down");
    match node.read(&row_ref_c(), ReadLevel::Local, &[]).unwrap().row.unwrap().value {
        RowValue::Counter(c) => assert_eq!(c.value(), 4, "the repaired state merged once"),
        other => panic!("not a counter: {other:?}"),
    }
}

/// A counter row homed in us-east-1 holding `n` added by us-east-1/n1.
fn remote_counter(n: i64) -> Row {
    let mut remote = crate::causality::PnCounter::default();
    remote.add("us-east-1/n1", n);
    Row {
        home_region: "us-east-1".into(),
        zone: String::new(),
        epoch: 1,
        hlc: 1,
        value: RowValue::Counter(remote),
    }
}

fn row_ref_c() -> RowRef {
    RowRef { table: "default".into(), key: b"c".to_vec(), locality: Locality::Unset }
}

fn bounded_node() -> Arc<Node> {
    let cfg = config(
        "[limits]\nvalue_bytes_max = 4096\nkey_bytes_max = 64\nrow_bytes_max = 100000\n\
         siblings_max = 40\nset_members_max = 5\n",
    );
    let hlc = Arc::new(Hlc::new(Arc::new(SystemClock), 500));
    Node::start(cfg, Arc::new(MemoryEngine::new()), hlc).unwrap()
}

#[tokio::test]
async fn blind_puts_past_the_row_bounds_are_refused_before_anything_is_stored() {
    let node = bounded_node();
    // Siblings: 40 blind puts are kept, the 41st is refused.
    for i in 0..40 {
        node.write(put(row("hot"), &format!("v{i}"), VersionVector::default())).await.unwrap();
    }
    let seq = node.log_seq();
    let err = node.write(put(row("hot"), "one-too-many", VersionVector::default())).await.unwrap_err();
    assert_eq!(err.reason(), "TOO_MANY_SIBLINGS", "{err}");
    assert_eq!(node.log_seq(), seq, "a refused write logs nothing");
    let (vals, ctx) = values(&node, "hot");
    assert_eq!(vals.len(), 40, "and stores nothing");
    // A put with the read's context replaces what it saw.
    node.write(put(row("hot"), "resolved", ctx)).await.unwrap();
    assert_eq!(values(&node, "hot").0, ["resolved"]);

    // Bytes: 4 KiB values fill the 100,000-byte row after 24 siblings.
    let big = "x".repeat(4000);
    let mut accepted = 0;
    let refused = loop {
        match node.write(put(row("big"), &big, VersionVector::default())).await {
            Ok(_) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= 40, "never refused");
    };
    assert_eq!(refused.reason(), "ROW_TOO_LARGE", "{refused}");
    assert!((20..25).contains(&accepted), "100,000 bytes hold under 25 values of 4,000 bytes: {accepted}");
    let stored = node.stored_row("default", b"big").unwrap().unwrap();
    assert!(prost::Message::encoded_len(&stored.to_proto()) <= 100_000);

    // Set members: 5 kept, the 6th refused; a remove is always accepted.
    let op = |op| WriteRequest { ops: vec![WriteOp { row: row("s"), op }], level: None, idempotency: None };
    let members = |r: std::ops::Range<u8>| r.map(|i| vec![b'm', i]).collect::<Vec<_>>();
    node.write(op(RowOp::SetAdd { members: members(0..5) })).await.unwrap();
    let err = node.write(op(RowOp::SetAdd { members: members(5..6) })).await.unwrap_err();
    assert_eq!(err.reason(), "ROW_TOO_LARGE");
    assert!(err.to_string().contains("members"), "{err}");
    node.write(op(RowOp::SetRemove { members: members(0..1), context: None })).await.unwrap();
    node.write(op(RowOp::SetAdd { members: members(5..6) })).await.unwrap();
}

#[tokio::test]
async fn a_row_merged_past_the_bounds_is_kept_and_can_be_shrunk_but_not_grown() {
    use crate::causality::{DvvSet, HlcTimestamp};
    let node = bounded_node();
    // Another region accepted 40 siblings of its own (within its bound);
    // merged with this region's 40, the row holds 80.
    let mut ours = VersionVector::default();
    for i in 0..40 {
        let out = node.write(put(row("m"), &format!("here{i}"), VersionVector::default())).await.unwrap();
        ours = parse_context(&out[0].context).unwrap();
    }
    let mut theirs = DvvSet::default();
    for i in 0..40 {
        theirs.write(
            "eu-central-1/n1",
            &VersionVector::default(),
            Some(format!("there{i}").into_bytes()),
            HlcTimestamp(1),
        );
    }
    let remote = Row {
        home_region: "eu-west-1".into(),
        zone: "eu".into(),
        epoch: 1,
        hlc: 1,
        value: RowValue::Register(theirs),
    };
    node.merge_rows(vec![("default".into(), b"m".to_vec(), remote)]).await.expect("a merge is never refused");
    let (vals, ctx) = values(&node, "m");
    assert_eq!(vals.len(), 80, "what other regions accepted is kept");
    // A blind put would grow it: refused. A delete of this region's half
    // shrinks it: accepted, although the row stays past the bound.
    let err = node.write(put(row("m"), "more", VersionVector::default())).await.unwrap_err();
    assert_eq!(err.reason(), "TOO_MANY_SIBLINGS");
    node.write(WriteRequest {
        ops: vec![WriteOp { row: row("m"), op: RowOp::Delete { context: Some(ours) } }],
        level: Some(Level::Eventual),
        idempotency: None,
    })
    .await
    .expect("a delete that shrinks the row is accepted");
    assert_eq!(values(&node, "m").0.len(), 40, "their 40 remain");
    node.write(put(row("m"), "resolved", ctx)).await.expect("a put superseding every sibling fits");
    assert_eq!(values(&node, "m").0, ["resolved"]);
}

/// Epoch 1 of home us-east-1 ended at 10,000 ms (plus no offset); epoch 2 is current.
struct EndedAt10s;

impl LeaseGuard for EndedAt10s {
    fn check_local(&self, home: &str) -> Result<u64, KvError> {
        Err(KvError::NotHome { home: home.into(), here: "eu-west-1".into() })
    }
    fn current_epoch(&self, _home: &str) -> u64 {
        2
    }
    fn fence_entry(&self, _home: &str, epoch: u64, hlc_ms: u64) -> EntryFence {
        match epoch {
            2.. => EntryFence::Current,
            _ if hlc_ms < 10_000 => EntryFence::LateButValid { current: 2 },
            _ => EntryFence::Fenced { current: 2 },
        }
    }
}

#[tokio::test]
async fn repair_does_not_bring_back_a_row_fenced_at_its_epoch_end() {
    let n = node();
    n.set_leases(Arc::new(EndedAt10s));
    let stamped = |ms: u64, epoch: u64, v: i64| {
        let mut r = remote_counter(v);
        r.epoch = epoch;
        r.hlc = crate::causality::HlcTimestamp::from_parts(ms, 0).0;
        r
    };
    let rows = vec![
        // Written by the old home after its epoch ended: fenced.
        ("default".to_string(), b"late".to_vec(), stamped(20_000, 1, 7)),
        // Written under the old epoch while it was valid: an old row, kept.
        ("default".to_string(), b"old".to_vec(), stamped(5_000, 1, 3)),
        // Under the current epoch: kept.
        ("default".to_string(), b"new".to_vec(), stamped(20_000, 2, 5)),
    ];
    let (kept, refused) = n.fence_repaired_rows("us-east-1/n1", rows);
    assert_eq!(refused, 1);
    let keys: Vec<&[u8]> = kept.iter().map(|(_, k, _)| k.as_slice()).collect();
    assert_eq!(keys, vec![b"old".as_slice(), b"new".as_slice()]);
    // Repair records no failover conflicts: it carries row states, not writes.
    assert!(n.failover_conflicts().is_empty());
}

/// A wiped source's new incarnation numbers its log from 1 again: its
/// frames are its own positions, never duplicates of the old incarnation's
/// (docs/architecture.md section 16).
#[tokio::test]
async fn a_new_source_incarnation_is_not_taken_for_duplicates() {
    let node = node();
    let apply = |store: &str, first, through, value: i64| RemoteApply {
        source: "us-east-1/n1".into(),
        source_store: store.into(),
        first_seq: first,
        through_seq: through,
        entries: vec![("default".into(), format!("k{store}{through}").into_bytes(), remote_counter(value))],
        mode: ApplyMode::Log,
        idempotency: Vec::new(),
        seqs: Vec::new(),
    };
    let old = format!("{:016x}-{}", 1, "a".repeat(32));
    let new = format!("{:016x}-{}", 2, "b".repeat(32));
    node.apply_remote(apply(&old, 1, 30, 3)).await.unwrap();
    assert_eq!(node.applied_from("us-east-1/n1", &old).unwrap(), 30);
    assert_eq!(node.applied_from("us-east-1/n1", &new).unwrap(), 0, "nothing of the new incarnation yet");
    node.apply_remote(apply(&new, 1, 1, 4)).await.unwrap();
    assert_eq!(node.applied_from("us-east-1/n1", &new).unwrap(), 1);
    assert_eq!(node.applied_from("us-east-1/n1", &old).unwrap(), 30, "the old incarnation's position stays");
    let inbound = &node.inbound()["us-east-1/n1"];
    assert_eq!((inbound.store.as_str(), inbound.applied_through), (new.as_str(), 1));
    let key = format!("k{new}1").into_bytes();
    let read = node.read(&RowRef { key, ..row_ref_c() }, ReadLevel::Local, &[]).unwrap();
    assert!(read.row.is_some(), "the new incarnation's first entry was applied");
}

/// An engine whose writes wait at a gate and can be made to fail once, and
/// which counts writes waiting and point reads of idempotency records.
#[derive(Default)]
struct GatedEngine {
    inner: MemoryEngine,
    closed: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
    fail_next: std::sync::atomic::AtomicBool,
    waiting: std::sync::atomic::AtomicUsize,
    idem_gets: std::sync::atomic::AtomicUsize,
    data_scans: std::sync::atomic::AtomicUsize,
}

impl GatedEngine {
    fn set_closed(&self, closed: bool) {
        *self.closed.lock().unwrap() = closed;
        self.opened.notify_all();
    }
}

impl Engine for GatedEngine {
    fn kind(&self) -> &'static str {
        "gated"
    }

    fn get(&self, cf: Cf, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        if cf == Cf::Meta && key.starts_with(b"idem/") {
            self.idem_gets.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.get(cf, key)
    }

    fn write(&self, batch: WriteBatch, sync: bool) -> Result<(), StorageError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.fetch_add(1, SeqCst);
        let closed = self.closed.lock().unwrap();
        let (_open, timeout) =
            self.opened.wait_timeout_while(closed, std::time::Duration::from_secs(10), |c| *c).unwrap();
        self.waiting.fetch_sub(1, SeqCst);
        if timeout.timed_out() {
            return Err(StorageError::Write {
                ops: batch.len(),
                reason: "the test's gate stayed closed".into(),
            });
        }
        if self.fail_next.swap(false, SeqCst) {
            return Err(StorageError::Write { ops: batch.len(), reason: "injected failure".into() });
        }
        self.inner.write(batch, sync)
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.inner.sync()
    }

    fn scan(&self, cf: Cf, start: &[u8], end: Option<&[u8]>, limit: usize) -> Result<KvPairs, StorageError> {
        if cf == Cf::Data {
            self.data_scans.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.scan(cf, start, end, limit)
    }

    fn snapshot(&self) -> Box<dyn crate::storage::Snapshot + '_> {
        self.inner.snapshot()
    }

    fn snapshot_owned(self: Arc<Self>) -> Box<dyn crate::storage::Snapshot + Send + Sync> {
        self.inner.snapshot_copy()
    }

    fn last(&self, cf: Cf) -> Result<Option<KvPair>, StorageError> {
        self.inner.last(cf)
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// A group prepared while the one before it is being written reads that
/// group's rows; when the earlier group's write fails, the later one fails
/// too, unwritten, and the next write starts again from the store: nothing
/// of either reaches the store or the log, and the log has no hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_fails_the_group_prepared_over_it_and_the_next_starts_from_the_store() {
    use std::sync::atomic::Ordering::SeqCst;
    let engine = Arc::new(GatedEngine::default());
    // With the committer's row cache: a failed group's rows must not reach it.
    let node = node_with("[storage]\nrow_cache_mib = 64", engine.clone());
    node.write(put(row("k"), "base", VersionVector::default())).await.unwrap();
    let base_seq = node.log_seq();
    let (_, base_ctx) = values(&node, "k");

    engine.set_closed(true);
    let a = tokio::spawn({
        let node = node.clone();
        async move { node.write(put(row("k"), "a", VersionVector::default())).await }
    });
    until("the first group is being written", || engine.waiting.load(SeqCst) == 1).await;
    let b = tokio::spawn({
        let node = node.clone();
        let mut req = put(row("k"), "b", VersionVector::default());
        req.idempotency = Some(Idempotency { key: "b".into(), request_hash: 1 });
        async move { node.write(req).await }
    });
    // The second group's preparation has read its idempotency key.
    until("the second group is prepared", || engine.idem_gets.load(SeqCst) >= 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    engine.fail_next.store(true, SeqCst);
    engine.set_closed(false);

    let a = a.await.unwrap().unwrap_err();
    let b = b.await.unwrap().unwrap_err();
    assert!(matches!(&a, KvError::Storage(why) if why.contains("injected failure")), "{a}");
    assert!(b.to_string().contains("prepared over it"), "{b}");
    assert_eq!(values(&node, "k").0, ["base"], "nothing of the failed groups is stored");
    assert_eq!(node.log_seq(), base_seq);

    node.write(put(row("k"), "c", base_ctx)).await.unwrap();
    assert_eq!(values(&node, "k").0, ["c"], "the next group merged over the stored row");
    assert_eq!(node.log_seq(), base_seq + 1, "the failed groups' log positions are reused, no hole");
}

/// With the pipeline off (one thread prepares and writes each group), a
/// group that fails to be written fails alone: the next write is prepared
/// from the store and succeeds, and so does every later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_pipeline_a_failed_group_fails_alone() {
    use std::sync::atomic::Ordering::SeqCst;
    let engine = Arc::new(GatedEngine::default());
    let hlc = Arc::new(Hlc::new(Arc::new(SystemClock), 500));
    let node = Node::start(config("[storage]\ncommit_pipeline = false"), engine.clone(), hlc).unwrap();
    node.write(put(row("k"), "base", VersionVector::default())).await.unwrap();
    let base_seq = node.log_seq();
    engine.fail_next.store(true, SeqCst);
    let failed = node.write(put(row("k"), "a", VersionVector::default())).await.unwrap_err();
    assert!(matches!(&failed, KvError::Storage(why) if why.contains("injected failure")), "{failed}");
    for (i, v) in ["b", "c"].into_iter().enumerate() {
        node.write(put(row("k"), v, VersionVector::default())).await.unwrap();
        assert_eq!(node.log_seq(), base_seq + 1 + i as u64);
    }
    assert_eq!(values(&node, "k").0, ["b", "base", "c"]);
}

/// Erasure reads a subject's rows a page at a time: a subject of more rows
/// than a page is erased whole, and another subject's rows stay.
#[tokio::test]
async fn an_erasure_of_more_rows_than_a_page_takes_them_all() {
    let cfg = config(
        "[[tables]]\nname = \"people\"\ndefault_home_region = \"eu-west-1\"\nsubject_separator = \":\"\n[lifecycle]\nsubject_key = \"1111111111111111111111111111111111111111111111111111111111111111\"\n",
    );
    let node =
        Node::start(cfg, Arc::new(MemoryEngine::new()), Arc::new(Hlc::new(Arc::new(SystemClock), 500)))
            .unwrap();
    let person =
        |key: String| RowRef { table: "people".into(), key: key.into_bytes(), locality: Locality::Unset };
    let rows = 2 * 512 + 76;
    for i in 0..rows {
        let mut w = put(person(format!("alice:{i:05}")), "secret", VersionVector::default());
        w.level = Some(Level::Local);
        node.write(w).await.unwrap();
    }
    node.write(put(person("bob:0".into()), "kept", VersionVector::default())).await.unwrap();
    let receipt = node.erase_subject(b"alice", 0).await.unwrap();
    assert_eq!((receipt.rows, receipt.values), (rows as u64, rows as u64), "{receipt:?}");
    let shown = |key: &str| {
        let read = node.read(&person(key.into()), ReadLevel::Local, &[]).unwrap();
        read.row.map(|r| register_view(&r, 0, 0).0.len()).unwrap_or(0)
    };
    assert_eq!(shown("alice:00000"), 0);
    assert_eq!(shown(&format!("alice:{:05}", rows - 1)), 0, "the last page too");
    assert_eq!(shown("bob:0"), 1, "another subject keeps its value");
}

/// The change feed keeps its retention however fast writes come: one
/// trimming call removes everything past it, in bounded batches (it took
/// one batch a second, so a node writing faster than that kept every
/// entry past the first batch).
#[tokio::test]
async fn one_feed_trim_catches_up_with_all_writes_past_the_retention() {
    let engine = Arc::new(MemoryEngine::new());
    let node = node_with("[watch]\nretention_entries = 20\n", engine.clone());
    let stored = |engine: &MemoryEngine| engine.scan(Cf::Feed, b"l/", Some(b"l0"), usize::MAX).unwrap();
    for round in 0..3 {
        for i in 0..150 {
            node.write(put(row(&format!("k{round}-{i}")), "v", VersionVector::default())).await.unwrap();
        }
        // Batches of 16: as if each second's writes were many batches' worth.
        let removed = feed::trim_in_batches(&node, 16, 1_000).unwrap();
        assert_eq!(removed, if round == 0 { 130 } else { 150 }, "round {round}");
        let left = stored(&engine);
        assert_eq!(left.len(), 20, "round {round}: the retention is kept");
        let head = node.state.feed_seq.load(Ordering::Acquire);
        assert_eq!(left.first().map(|(k, _)| k.clone()), Some(feed::entry_key(head - 19)));
    }
    // Where trimming stands is known: a trim with nothing new removes nothing.
    assert_eq!(feed::trim_in_batches(&node, 16, 1_000).unwrap(), 0);
    // A batch bound still bounds one call.
    for i in 0..100 {
        node.write(put(row(&format!("more-{i}")), "v", VersionVector::default())).await.unwrap();
    }
    assert_eq!(feed::trim_in_batches(&node, 16, 2).unwrap(), 32);
    assert_eq!(feed::trim_in_batches(&node, 16, 1_000).unwrap(), 68);
    node.shutdown();
}

/// A key under `l/` that is no entry key (a torn or foreign write) is
/// trimmed with the entries around it. One that ended a scan page used to
/// be taken for the end of the feed: every entry of that page was marked
/// trimmed without being deleted, and stayed until a restart.
#[tokio::test]
async fn a_malformed_feed_key_does_not_stop_the_trim() {
    let engine = Arc::new(MemoryEngine::new());
    let node = node_with("[watch]\nretention_entries = 20\n", engine.clone());
    for i in 0..40 {
        node.write(put(row(&format!("k{i}")), "v", VersionVector::default())).await.unwrap();
    }
    let head = node.state.feed_seq.load(Ordering::Acquire);
    let mut malformed = feed::entry_key(head - 35);
    malformed.push(0);
    let mut seed = WriteBatch::new();
    seed.put(Cf::Feed, malformed.clone(), b"junk".to_vec());
    engine.write(seed, false).unwrap();
    // Pages of 6 from the first entry: the sixth key is the malformed one.
    let removed = feed::trim_in_batches(&node, 6, 1_000).unwrap();
    let left = engine.scan(Cf::Feed, b"l/", Some(b"l0"), usize::MAX).unwrap();
    assert_eq!(left.len(), 20, "only the retention is left");
    assert_eq!(left.first().map(|(k, _)| k.clone()), Some(feed::entry_key(head - 19)));
    assert_eq!(removed, head - 20 + 1, "every entry past the retention and the malformed key");
    node.shutdown();
}

/// A key reused after its record expired keeps the new record for the
/// whole TTL. The old record's expiry key, reached by a later sweep, named
/// the same record key and used to delete the new record with it: a retry
/// of the new request was then applied a second time.
#[tokio::test]
async fn an_idempotency_key_reused_after_expiry_keeps_its_new_record() {
    let engine = Arc::new(MemoryEngine::new());
    let old_at = commit::now_ms() - 2 * 3600 * 1000;
    let old = pb::IdempotencyRecord { stored_at_ms: old_at, request_hash: 7, ..Default::default() };
    let mut seed = WriteBatch::new();
    seed.put(Cf::Meta, commit::idem_key("k"), codec::seal_message(&old));
    seed.put(Cf::Meta, commit::idem_expiry_key(old_at, "k"), Vec::new());
    engine.write(seed, false).unwrap();
    let node = node_on(engine.clone());
    let add = || WriteRequest {
        ops: vec![WriteOp { row: row("c"), op: RowOp::CounterAdd { delta: 5 } }],
        level: None,
        idempotency: Some(Idempotency { key: "k".into(), request_hash: 8 }),
    };
    let first = node.write(add()).await.unwrap();
    assert!(!first[0].replayed, "the expired record is not replayed");
    assert_eq!(first[0].counter_value, Some(5));
    // A group more than a second later sweeps, past the old expiry key.
    tokio::time::sleep(commit::IDEM_SWEEP_EVERY + Duration::from_millis(100)).await;
    node.write(put(row("other"), "v", VersionVector::default())).await.unwrap();
    let again = node.write(add()).await.unwrap();
    assert!(again[0].replayed, "the retry is answered from the new record");
    assert_eq!(again[0].counter_value, Some(5), "and applied once");
    let stored = engine.get(Cf::Meta, &commit::idem_key("k")).unwrap();
    assert!(stored.is_some(), "the new record is still stored");
}

/// Tombstone collection reads the store only when a deleted row may be in
/// it: after a sweep that found none, its passes scan nothing until a
/// deleted row is written (or the clean sweep is too old to stand for
/// them), and still count as sweeps with no tombstone.
#[tokio::test]
async fn tombstone_sweeps_skip_the_scan_while_nothing_was_deleted() {
    use std::sync::atomic::Ordering::SeqCst;
    let engine = Arc::new(GatedEngine::default());
    let node = node_on(engine.clone());
    for k in ["a", "b", "c"] {
        node.write(put(row(k), "v", VersionVector::default())).await.unwrap();
    }
    let mut settings = gc::GcSettings::from_config(&node.config().storage);
    let scans = || engine.data_scans.load(SeqCst);
    let sweeps = |node: &Node| node.gc().stats().sweeps;

    let before = scans();
    gc::pass(&node, None, settings).await.unwrap();
    assert!(scans() > before, "the first sweep reads the store");
    assert_eq!((sweeps(&node), node.gc().stats().tombstones), (1, 0));

    let before = scans();
    for _ in 0..3 {
        gc::pass(&node, None, settings).await.unwrap();
    }
    assert_eq!(scans(), before, "nothing deleted since a sweep that found nothing: no scan");
    assert_eq!(sweeps(&node), 4, "each pass still counts as a sweep");

    // A delete: the next sweep reads the store and finds it.
    let (_, ctx) = values(&node, "b");
    node.write(WriteRequest {
        ops: vec![WriteOp { row: row("b"), op: RowOp::Delete { context: Some(ctx) } }],
        level: Some(Level::Eventual),
        idempotency: None,
    })
    .await
    .unwrap();
    let before = scans();
    gc::pass(&node, None, settings).await.unwrap();
    assert!(scans() > before, "a deleted row was written: the sweep reads the store");
    assert_eq!(node.gc().stats().tombstones, 1);

    // A clean sweep stands for the later ones only so long.
    let fresh_engine = Arc::new(GatedEngine::default());
    let fresh = node_on(fresh_engine.clone());
    settings.clean_stands_for = Duration::ZERO;
    gc::pass(&fresh, None, settings).await.unwrap();
    let before = fresh_engine.data_scans.load(SeqCst);
    gc::pass(&fresh, None, settings).await.unwrap();
    assert!(fresh_engine.data_scans.load(SeqCst) > before, "an old clean sweep stands for nothing");
    assert_eq!(fresh.gc().stats().sweeps, 2);
    node.shutdown();
    fresh.shutdown();
}
