//! Criterion micro-benchmarks of the node's hot paths, without the network.
//!
//! - `causality`: a DVV-set write with a causal context and the merge of two
//!   replicas holding siblings; PN-counter and OR-set merges.
//! - `codec`: the versioned, checksummed envelope, sealed and opened.
//! - `storage`: one-row batches and point reads on RocksDB (unsynced and
//!   fsync'd) and on the in-memory engine, through the `Engine` trait.
//! - `commit`: 64 concurrent durable puts (each with an idempotency key, as
//!   the client sends them) through a node's committer on RocksDB, with
//!   the two-stage pipeline and on one thread (decision 025), and with
//!   the sync off. Every put writes a new row: blind puts to a key
//!   written before would pile up siblings and measure a growing row.
//! - `commit_stage`: the pipeline's stages one by one: the preparing
//!   thread's work per put, and the syncing thread's write of a group of
//!   64 without and with the sync.
//! - `raft_log_purge`: purging 4,000 entries of a STRONG group's log
//!   behind a snapshot, in steady state (every earlier entry purged
//!   before): by reading the purged range and deleting each key in a
//!   synced batch (the store before decision 037), and by one unsynced
//!   range deletion (the store now). openraft waits for the purge in its
//!   core loop, so its time is a stall of the group's leader.
//!
//! Each group keeps few samples and a short measurement time so the whole
//! suite runs in a few minutes on a 2-core machine:
//! `cargo bench -p geokv-bench --bench micro` (see docs/benchmarks.md).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use geokv_server::causality::{Crdt, DvvSet, HlcTimestamp, OrSet, PnCounter, VersionVector};
use geokv_server::codec::{open, seal};
use geokv_server::storage::memory::MemoryEngine;
use geokv_server::storage::rocks::{RocksEngine, RocksOptions};
use geokv_server::storage::{Cf, Engine, WriteBatch};

/// Actors of a three-region deployment.
const ACTORS: [&str; 3] = ["us-east-1/n1", "eu-west-1/n1", "ap-south-1/n1"];
/// Keys written before the read benchmarks, and cycled through by them.
const STORED_KEYS: u64 = 10_000;

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

fn ts(ms: u64) -> HlcTimestamp {
    HlcTimestamp::from_parts(ms, 0)
}

/// A register as a replica holds it after each region wrote blind once: one
/// sibling per region.
fn dvv_with_siblings(value_bytes: usize) -> DvvSet {
    let mut replicas: Vec<DvvSet> = ACTORS
        .iter()
        .enumerate()
        .map(|(i, actor)| {
            let mut d = DvvSet::new();
            d.write(actor, &VersionVector::new(), Some(vec![i as u8; value_bytes]), ts(i as u64 + 1));
            d
        })
        .collect();
    let mut merged = replicas.remove(0);
    for r in &replicas {
        merged.merge(r);
    }
    merged
}

fn causality(c: &mut Criterion) {
    let mut g = c.benchmark_group("causality");
    let value = vec![7u8; 100];

    // The committer's path for a put that carries the context of the last
    // read: the write replaces every sibling the context covers.
    let base = dvv_with_siblings(100);
    let context = base.context().clone();
    g.bench_function("dvv_write_with_context", |b| {
        b.iter(|| {
            let mut d = base.clone();
            d.write(ACTORS[0], black_box(&context), Some(value.clone()), ts(10));
            black_box(d)
        })
    });

    // Replication receive path: a replica with three siblings merges one
    // whose write superseded them all.
    let mut ahead = base.clone();
    ahead.write(ACTORS[1], &context, Some(value.clone()), ts(11));
    g.bench_function("dvv_merge_3_siblings", |b| {
        b.iter(|| {
            let mut d = base.clone();
            d.merge(black_box(&ahead));
            black_box(d)
        })
    });

    let counter = |offset: i64| {
        let mut p = PnCounter::new();
        for (i, actor) in ACTORS.iter().enumerate() {
            p.add(actor, 1000 + offset + i as i64);
            p.add(actor, -(10 + i as i64));
        }
        p
    };
    let (left, right) = (counter(0), counter(5));
    g.bench_function("pn_counter_merge_3_actors", |b| {
        b.iter(|| {
            let mut p = left.clone();
            Crdt::merge(&mut p, black_box(&right));
            black_box(p.value())
        })
    });

    for members in [10usize, 100] {
        let set = |actor: &str, skip: usize| {
            let mut s = OrSet::new();
            for m in (0..members).filter(|m| m % 7 != skip) {
                s.add(actor, format!("member-{m:04}").into_bytes());
            }
            s
        };
        let (a, b_set) = (set(ACTORS[0], 0), set(ACTORS[1], 3));
        g.throughput(Throughput::Elements(members as u64));
        g.bench_with_input(BenchmarkId::new("or_set_merge", members), &members, |b, _| {
            b.iter(|| {
                let mut s = a.clone();
                Crdt::merge(&mut s, black_box(&b_set));
                black_box(s.len())
            })
        });
    }
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    for bytes in [100usize, 4096] {
        let payload = vec![0x5au8; bytes];
        let sealed = seal(&payload);
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_with_input(BenchmarkId::new("seal", bytes), &payload, |b, p| {
            b.iter(|| black_box(seal(black_box(p))))
        });
        g.bench_with_input(BenchmarkId::new("open", bytes), &sealed, |b, s| {
            b.iter(|| black_box(open(black_box(s)).expect("a sealed record opens").len()))
        });
    }
    g.finish();
}

fn key(i: u64) -> Vec<u8> {
    format!("default\0bench/{i:012}").into_bytes()
}

/// Writes `STORED_KEYS` rows of `value` in batches, unsynced.
fn fill(engine: &dyn Engine, value: &[u8]) {
    for chunk in (0..STORED_KEYS).collect::<Vec<_>>().chunks(1000) {
        let mut batch = WriteBatch::new();
        for &i in chunk {
            batch.put(Cf::Data, key(i), value.to_vec());
        }
        engine.write(batch, false).expect("filling the store");
    }
}

fn engine_benches(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    engine: &dyn Engine,
) {
    let value = seal(&[0x42u8; 100]);
    fill(engine, &value);
    let mut n = 0u64;
    g.bench_function(format!("{name}_put"), |b| {
        b.iter(|| {
            n = (n + 1) % STORED_KEYS;
            let mut batch = WriteBatch::new();
            batch.put(Cf::Data, key(n), value.clone());
            engine.write(batch, false).expect("put");
        })
    });
    let mut n = 0u64;
    g.bench_function(format!("{name}_get"), |b| {
        b.iter(|| {
            n = (n + 7) % STORED_KEYS;
            black_box(engine.get(Cf::Data, &key(n)).expect("get").is_some())
        })
    });
}

fn storage(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Elements(1));

    let memory = MemoryEngine::new();
    engine_benches(&mut g, "memory", &memory);

    let dir = tempfile::tempdir().expect("temp dir");
    let rocks = RocksEngine::open(dir.path(), &RocksOptions::default()).expect("opening RocksDB");
    engine_benches(&mut g, "rocksdb", &rocks);

    // One fsync'd batch per iteration: the floor under a durable write when
    // nothing shares the sync, which group commit amortizes.
    let value = seal(&[0x42u8; 100]);
    let mut n = 0u64;
    g.sample_size(10);
    g.bench_function("rocksdb_put_sync", |b| {
        b.iter(|| {
            n = (n + 1) % STORED_KEYS;
            let mut batch = WriteBatch::new();
            batch.put(Cf::Data, key(n), value.clone());
            rocks.write(batch, true).expect("synced put");
        })
    });
    // A group of 64 rows in one synced batch: what group commit pays for 64
    // concurrent writers.
    g.throughput(Throughput::Elements(64));
    g.bench_function("rocksdb_put_sync_batch_64", |b| {
        b.iter(|| {
            let mut batch = WriteBatch::new();
            for _ in 0..64 {
                n = (n + 1) % STORED_KEYS;
                batch.put(Cf::Data, key(n), value.clone());
            }
            rocks.write(batch, true).expect("synced batch");
        })
    });
    // A scan of a range with nothing left in it, followed by the
    // tombstones of 100,000 deleted keys and one live key (a sweep or a
    // trim that caught up, in a store not yet compacted). RocksDB stops at
    // the scan's end only when it is told the bound.
    let mut batch = WriteBatch::new();
    for i in 0..100_000u64 {
        batch.put(Cf::Meta, [b"t/".as_slice(), &i.to_be_bytes()].concat(), value.clone());
    }
    batch.put(Cf::Meta, b"u/live".to_vec(), value.clone());
    rocks.write(batch, false).expect("fill");
    let mut batch = WriteBatch::new();
    for i in 0..100_000u64 {
        batch.delete(Cf::Meta, [b"t/".as_slice(), &i.to_be_bytes()].concat());
    }
    rocks.write(batch, false).expect("delete");
    g.sample_size(20);
    g.bench_function("rocksdb_scan_empty_range_before_100k_deletes", |b| {
        b.iter(|| assert!(rocks.scan(Cf::Meta, b"s/", Some(b"t/"), 16).expect("scan").is_empty()))
    });
    g.finish();
    drop(rocks);
}

/// Concurrent writers per iteration of the commit benchmarks.
const COMMIT_WRITERS: usize = 64;

fn commit(c: &mut Criterion) {
    use std::sync::Arc;

    use geokv_server::causality::{Hlc, SystemClock};
    use geokv_server::config::Config;
    use geokv_server::kv::commit::Idempotency;
    use geokv_server::kv::{Node, RowOp, RowRef, WriteOp, WriteRequest};
    use geokv_server::residency::Locality;

    let mut g = c.benchmark_group("commit");
    g.throughput(Throughput::Elements(COMMIT_WRITERS as u64));
    g.sample_size(10);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let runtime = runtime.expect("a tokio runtime");
    // Pipelined and on one thread, synced; pipelined with the sync off
    // (everything but the fsync): a new row per put. Then hot rows: the
    // same 64 rows of an LWW table (rows stay one value), so every write
    // after the first merges into a row written before, from the
    // committer's row cache or, with it off, from the store (decision 043).
    let lww = "[[tables]]\nname = \"default\"\ndefault_home_region = \"local-1\"\nconflict = \"lww\"\n";
    let cases = [
        ("put_64_pipelined", "[storage]\ncommit_pipeline = true\nsync = true\n".to_string(), false),
        ("put_64_one_thread", "[storage]\ncommit_pipeline = false\nsync = true\n".to_string(), false),
        ("put_64_pipelined_unsynced", "[storage]\ncommit_pipeline = true\nsync = false\n".to_string(), false),
        ("put_64_hot_rows_cached", format!("[storage]\nrow_cache_mib = 64\n{lww}"), true),
        ("put_64_hot_rows_uncached", format!("[storage]\nrow_cache_mib = 0\n{lww}"), true),
    ];
    for (name, text, hot) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = Config::from_toml(&text).and_then(Config::finish).expect("the benchmark's config");
        let engine =
            Arc::new(RocksEngine::open(dir.path(), &RocksOptions::default()).expect("opening RocksDB"));
        let hlc = Arc::new(Hlc::new(Arc::new(SystemClock), 500));
        let node =
            runtime.block_on(async { Node::start(Arc::new(cfg), engine, hlc) }).expect("starting a node");
        let mut n = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                let writes = (0..COMMIT_WRITERS).map(|i| {
                    n += 1;
                    let node = node.clone();
                    let row_key = if hot { format!("hot/{i:02}").into_bytes() } else { key(n) };
                    let req = WriteRequest {
                        ops: vec![WriteOp {
                            row: RowRef { table: "default".into(), key: row_key, locality: Locality::Unset },
                            op: RowOp::Put {
                                value: vec![0x42; 100],
                                context: VersionVector::new(),
                                ttl_ms: 0,
                            },
                        }],
                        level: None,
                        idempotency: Some(Idempotency { key: format!("bench-{n}"), request_hash: n }),
                    };
                    async move { node.write(req).await }
                });
                let tasks: Vec<_> = writes.map(|w| runtime.spawn(w)).collect();
                runtime.block_on(async {
                    for t in tasks {
                        t.await.expect("a write task").expect("a durable put");
                    }
                });
            })
        });
        node.shutdown();
    }
    g.finish();
}

/// The stages of a durable put through the committer, one by one
/// (docs/decisions/025-commit-cpu.md): what the preparing thread does per
/// write, what the syncing thread hands RocksDB per group of 64 without
/// and with the sync, and the whole path with the sync turned off.
fn commit_stages(c: &mut Criterion) {
    use geokv_proto::storage as spb;
    use geokv_server::codec::{open_message, seal_message};
    use geokv_server::kv::row::{Row, RowValue};

    let mut g = c.benchmark_group("commit_stage");
    let value = vec![0x42u8; 100];
    let stored = Row {
        home_region: "us-east-1".into(),
        zone: String::new(),
        epoch: 1,
        hlc: 1,
        value: RowValue::Register(dvv_with_siblings(100)),
    }
    .seal();
    let key = key(7);

    // Prepare, per write: open the stored row, write into it with the
    // context the client read, seal the row, the log entry, the change
    // feed entry and the idempotency record.
    g.throughput(Throughput::Elements(1));
    g.bench_function("prepare_put", |b| {
        b.iter(|| {
            let mut row = Row::open(black_box(&stored), || "bench row".into()).expect("a sealed row opens");
            let RowValue::Register(d) = &mut row.value else { unreachable!("a register row") };
            let context = d.context().clone();
            d.write(ACTORS[0], &context, Some(value.clone()), ts(20));
            let sealed_row = row.seal();
            let proto = row.to_proto();
            let entry = spb::LogEntry {
                seq: 42,
                table: "default".into(),
                key: key.clone(),
                row: Some(proto.clone()),
                hlc: 20,
                origin: ACTORS[0].into(),
                accepted_epoch: 1,
                idempotency: None,
            };
            let feed = spb::FeedEntry {
                local_seq: 42,
                origin: ACTORS[0].into(),
                origin_seq: 42,
                table: "default".into(),
                key: key.clone(),
                row: Some(proto),
                hlc: 20,
            };
            let record = spb::IdempotencyRecord {
                stored_at_ms: 20,
                request_hash: 7,
                origin: ACTORS[0].into(),
                hlc: 20,
                outcomes: Some(spb::StoredReply {
                    outcomes: vec![spb::StoredOutcome {
                        context: vec![1; 24],
                        hlc: 20,
                        home_region: "us-east-1".into(),
                        epoch: 1,
                        accepted_by_region: "us-east-1".into(),
                        log_seq: 42,
                        ..Default::default()
                    }],
                }),
                ..Default::default()
            };
            black_box((sealed_row, seal_message(&entry), seal_message(&feed), seal_message(&record)))
        })
    });
    // The replication receive side of the same row: open a log entry.
    let sealed_entry = seal_message(&spb::LogEntry {
        seq: 42,
        table: "default".into(),
        key: key.clone(),
        row: Some(Row::open(&stored, || "bench row".into()).expect("opens").to_proto()),
        hlc: 20,
        origin: ACTORS[0].into(),
        accepted_epoch: 1,
        idempotency: None,
    });
    g.bench_function("open_log_entry", |b| {
        b.iter(|| black_box(open_message::<spb::LogEntry>(black_box(&sealed_entry)).expect("opens").seq))
    });

    // Sync stage: a group of 64 puts as the committer writes it (row, log
    // entry, feed entry, idempotency record and its expiry index per put),
    // into RocksDB without and with the WAL sync.
    let dir = tempfile::tempdir().expect("temp dir");
    let rocks = RocksEngine::open(dir.path(), &RocksOptions::default()).expect("opening RocksDB");
    let sealed = seal(&[0x42u8; 160]);
    let mut seq = 0u64;
    let group = |seq: &mut u64| {
        let mut batch = WriteBatch::new();
        for _ in 0..COMMIT_WRITERS {
            *seq += 1;
            let n = *seq;
            batch.put(Cf::Data, format!("default\0k{:06}", n % STORED_KEYS).into_bytes(), sealed.clone());
            batch.put(Cf::ReplLog, n.to_be_bytes().to_vec(), sealed.clone());
            batch.put(Cf::Feed, [b"l/".as_slice(), &n.to_be_bytes()].concat(), sealed.clone());
            batch.put(Cf::Meta, format!("idem/req-{n:016x}").into_bytes(), sealed.clone());
            batch.put(Cf::Meta, [b"idemx/".as_slice(), &n.to_be_bytes(), b"req"].concat(), Vec::new());
        }
        batch
    };
    g.throughput(Throughput::Elements(COMMIT_WRITERS as u64));
    g.bench_function("write_group_64_unsynced", |b| {
        b.iter(|| rocks.write(group(&mut seq), false).expect("unsynced group"))
    });
    g.sample_size(10);
    g.bench_function("write_group_64_synced", |b| {
        b.iter(|| rocks.write(group(&mut seq), true).expect("synced group"))
    });
    g.finish();
}

/// Entries purged at a time: `consensus.snapshot_every` (5,000) less
/// `consensus.log_keep` (1,000).
const PURGED_PER_SNAPSHOT: u64 = 4_000;

fn raft_log_key(index: u64) -> Vec<u8> {
    [b"g/strong/us-east-1/log/".as_slice(), &index.to_be_bytes()].concat()
}

fn raft_log_purge(c: &mut Criterion) {
    let mut g = c.benchmark_group("raft_log_purge");
    g.sample_size(10);
    g.throughput(Throughput::Elements(PURGED_PER_SNAPSHOT));
    // An entry as the log stores it: sealed JSON of about 250 bytes.
    let entry = seal(&[b'e'; 250]);
    for way in ["scan_and_delete_synced", "range_unsynced"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let rocks = RocksEngine::open(dir.path(), &RocksOptions::default()).expect("opening RocksDB");
        let mut next = 1u64;
        let mut purged = 0u64;
        g.bench_function(way, |b| {
            b.iter_batched(
                || {
                    // Untimed: the entries written since the last purge.
                    let mut batch = WriteBatch::new();
                    for _ in 0..PURGED_PER_SNAPSHOT {
                        batch.put(Cf::Raft, raft_log_key(next), entry.clone());
                        next += 1;
                    }
                    rocks.write(batch, false).expect("append");
                    next - 1
                },
                |upto| {
                    let mut batch = WriteBatch::new();
                    batch.put(Cf::Raft, b"g/strong/us-east-1/purged".to_vec(), upto.to_be_bytes().to_vec());
                    if way == "range_unsynced" {
                        batch.delete_range(Cf::Raft, raft_log_key(purged + 1), raft_log_key(upto + 1));
                        rocks.write(batch, false).expect("purge");
                    } else {
                        let keys = rocks
                            .scan(Cf::Raft, &raft_log_key(0), Some(&raft_log_key(upto + 1)), 1 << 20)
                            .expect("scan");
                        for (k, _) in keys {
                            batch.delete(Cf::Raft, k);
                        }
                        rocks.write(batch, true).expect("purge");
                    }
                    purged = upto;
                },
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = micro;
    config = config();
    targets = causality, codec, storage, commit, commit_stages, raft_log_purge
}
criterion_main!(micro);
