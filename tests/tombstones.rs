//! Tombstone collection and log trimming as a user of a `geokv dev` cluster
//! sees them (docs/architecture.md section 17): real node processes, every
//! inter-region link behind the fault proxy.
//!
//! Rows are written in us-east-1 and replicated everywhere; ap-southeast-1
//! is then killed (it keeps every row, live, on disk) and every row is
//! deleted. While it is away no region may collect a tombstone of those
//! rows: it has not acknowledged them. Once it is back it applies the
//! deletes, every region collects every tombstone (`geokv status` counts
//! them), and no row comes back anywhere, at any read level. The log of
//! the writing region is trimmed of the entries every destination has.
//!
//! `GEOKV_TOMBSTONE_ROWS` sets the number of rows (default 10,000).

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{DevCluster, Options, REGIONS};
use common::{http_get, metric_sum, Deadline};
use geokv_client::proto as pb;
use geokv_client::{Client, Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const AP: &str = "ap-southeast-1";
/// Ops per batch request (the default `limits.batch_ops_max`).
const BATCH: usize = 128;
/// Longest wait for replication to settle or for collection to finish.
const SETTLE_LIMIT: Duration = Duration::from_secs(90);
/// Rows read at every read level in every region (all rows are checked by scans).
const SAMPLE: usize = 40;

fn rows() -> usize {
    std::env::var("GEOKV_TOMBSTONE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

fn key(i: usize) -> String {
    format!("t{i:06}")
}

fn row_ref(i: usize) -> pb::RowRef {
    pb::RowRef { table: "default".into(), key: key(i).into_bytes(), locality: None }
}

/// Puts (`Some`) or deletes (`None`) rows `0..n` in batches, LOCAL at the home.
async fn write_all(client: &Client, n: usize, value: Option<&[u8]>) {
    for start in (0..n).step_by(BATCH) {
        let ops = (start..(start + BATCH).min(n))
            .map(|i| pb::BatchOp {
                op: Some(match value {
                    Some(v) => pb::batch_op::Op::Put(pb::PutRequest {
                        row: Some(row_ref(i)),
                        value: v.to_vec(),
                        ..Default::default()
                    }),
                    None => pb::batch_op::Op::Delete(pb::DeleteRequest {
                        row: Some(row_ref(i)),
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        client.batch(ops, Some(Consistency::Local), None).await.expect("batch write");
    }
}

/// Waits until a LOCAL read of row `i` in `region` is `found`.
async fn wait_found(cluster: &DevCluster, region: &str, i: usize, found: bool) {
    let client = cluster.client(region).await;
    let deadline = Deadline::after(SETTLE_LIMIT);
    loop {
        let got = client.get(&Row::new("default", key(i)), ReadConsistency::Local).await;
        if got.as_ref().is_ok_and(|g| g.found == found) {
            return;
        }
        assert!(!deadline.passed(), "{region}: row {i} not found={found} within {SETTLE_LIMIT:?}: {got:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Live rows of the test in `region`.
async fn live_rows(client: &Client) -> usize {
    scan_count(client, false).await
}

/// Rows of the test a scan lists, deleted ones (tombstones) too when
/// `include_deleted`.
async fn scan_count(client: &Client, include_deleted: bool) -> usize {
    let mut live = 0;
    let mut after = Vec::new();
    for _ in 0..10_000 {
        let page = client.scan_rows("default", b"t", &after, 1000, include_deleted).await.expect("scan");
        live += page.rows.len();
        match page.next_start_after {
            Some(next) => after = next,
            None => return live,
        }
    }
    panic!("a scan of the test's rows did not end within 10,000 pages");
}

/// Node status of `region`: (tombstones, complete sweeps, collected, log entries trimmed).
async fn gc_status(cluster: &DevCluster, region: &str) -> (u64, u64, u64, u64) {
    let s = cluster.client(region).await.node_status().await.expect("node status");
    (s.tombstones, s.tombstone_sweeps, s.tombstones_collected, s.log_entries_trimmed)
}

/// Waits until `region` completed two sweeps after now (the second one
/// started after every write so far) and returns its status then.
async fn after_two_sweeps(cluster: &DevCluster, region: &str) -> (u64, u64, u64, u64) {
    let (_, start, _, _) = gc_status(cluster, region).await;
    let deadline = Deadline::after(SETTLE_LIMIT);
    loop {
        let status = gc_status(cluster, region).await;
        if status.1 >= start + 2 {
            return status;
        }
        assert!(!deadline.passed(), "{region}: tombstone sweeps stuck at {} ({start} before)", status.1);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_rows_are_collected_everywhere_and_a_stale_replica_brings_none_back() {
    let n = rows();
    let started = Instant::now();
    // Short rounds, so sweeps (one per round) come often while a region is away.
    let mut cluster = DevCluster::start_with(Options {
        extra_config: "[storage]\ntombstone_gc_interval_ms = 500\ntombstone_gc_round_ms_max = 2000\n".into(),
        ..Options::scale(0.2)
    })
    .await;
    let writer = cluster.client(US).await;
    write_all(&writer, n, Some(b"value")).await;
    for region in REGIONS {
        wait_found(&cluster, region, n - 1, true).await;
    }
    eprintln!("{n} rows written and replicated in {:?}", started.elapsed());

    // The stale replica: killed with every row live on its disk.
    cluster.kill_9(AP);
    let deleted_at = Instant::now();
    write_all(&writer, n, None).await;
    let live: Vec<&str> = REGIONS.iter().copied().filter(|r| *r != AP).collect();
    for region in &live {
        wait_found(&cluster, region, n - 1, false).await;
        assert_eq!(live_rows(&cluster.client(region).await).await, 0, "{region}: a deleted row is live");
    }
    eprintln!("{n} rows deleted and replicated to {live:?} in {:?}", deleted_at.elapsed());

    // While the stale replica is away nothing of those rows is collected:
    // it has not acknowledged the deletes.
    for region in &live {
        let (tombstones, _, collected, _) = after_two_sweeps(&cluster, region).await;
        assert_eq!(
            (tombstones, collected),
            (n as u64, 0),
            "{region}: a tombstone was collected while {AP}, holding the live rows, was away"
        );
        let stored = scan_count(&cluster.client(region).await, true).await;
        assert_eq!(stored, n, "{region}: tombstones stored while {AP} is away");
    }

    // It comes back and applies the deletes; then every region collects.
    cluster.restart(AP).await;
    wait_found(&cluster, AP, n - 1, false).await;
    // A scan that lists deleted rows finds none left in any region, and the
    // node status (last complete sweep) agrees.
    let collect_from = Instant::now();
    let deadline = Deadline::after(SETTLE_LIMIT);
    let mut remaining = Vec::new();
    for region in REGIONS {
        let client = cluster.client(region).await;
        loop {
            let stored = scan_count(&client, true).await;
            if stored == 0 {
                let status = after_two_sweeps(&cluster, region).await;
                eprintln!(
                    "{region}: no tombstone left {:?} after {AP} caught up (status: {} tombstones, {} collected, \
                     {} log entries trimmed)",
                    collect_from.elapsed(),
                    status.0,
                    status.2,
                    status.3
                );
                assert_eq!(status.0, 0, "{region}: status counts tombstones that a scan does not list");
                break;
            }
            if deadline.passed() {
                remaining.push((region, stored));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(remaining.is_empty(), "tombstones left after replication settled: {remaining:?}");

    // No row came back: none live in any region, and a sample read at every
    // level the table serves (STRONG is for consensus tables) in every
    // region finds nothing.
    for region in REGIONS {
        let client = cluster.client(region).await;
        assert_eq!(live_rows(&client).await, 0, "{region}: a collected row came back");
        for i in (0..n).step_by((n / SAMPLE).max(1)) {
            for level in [
                ReadConsistency::Local,
                ReadConsistency::Session,
                ReadConsistency::Bounded(Duration::from_secs(5)),
                ReadConsistency::Quorum,
            ] {
                let got = client.get(&Row::new("default", key(i)), level).await.expect("read");
                assert!(!got.found, "{region}: row {i} came back at {level:?}: {got:?}");
            }
        }
    }
    // Every destination had the writing region's entries: its log is trimmed.
    let (_, _, collected, trimmed) = gc_status(&cluster, US).await;
    assert!(collected >= n as u64, "{US} collected {collected} of {n} tombstones");
    // All but the newest, which is kept: a restart reads the log head from it.
    assert!(trimmed >= 2 * n as u64 - 1, "{US} trimmed {trimmed} log entries of the {} it wrote", 2 * n);
    let metrics = http_get(cluster.admin_addr(US), "/metrics").expect("metrics");
    assert!(metric_sum(&metrics, "geokv_tombstones_collected_total") >= n as f64);
    assert_eq!(metric_sum(&metrics, "geokv_tombstones"), 0.0);

    // A write after collection is a new row everywhere, not a merge with
    // anything older.
    writer
        .put(&Row::new("default", key(0)), b"again".to_vec(), WriteOptions::default())
        .await
        .expect("put after collection");
    for region in REGIONS {
        wait_found(&cluster, region, 0, true).await;
        let got =
            cluster.client(region).await.get(&Row::new("default", key(0)), ReadConsistency::Local).await;
        let values: Vec<Vec<u8>> = got.expect("read").siblings.into_iter().map(|s| s.value).collect();
        assert_eq!(values, vec![b"again".to_vec()], "{region}: an old value merged into the new row");
    }
    eprintln!("whole test with {n} rows: {:?}", started.elapsed());
}
