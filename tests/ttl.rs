//! Row TTL as a user of a `geokv dev` cluster sees it (docs/architecture.md
//! section 13): a value written with a 2 s TTL in us-east-1 is replicated
//! to every region, is then invisible in every region at every read level
//! once 2 s (plus the clock margin) passed since its write, and after
//! `geokv compact` its bytes are in no file of any node's store, while a
//! value written beside it without a TTL still is (so the byte scan can
//! find what is there, compression included). A STRONG register written
//! with a TTL reads as absent at every level after it too.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{DevCluster, Options, REGIONS};
use common::{marker, store_holds, Deadline};
use geokv_client::{Client, Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const TTL: Duration = Duration::from_secs(2);
/// `clock.max_offset_ms` of a dev cluster, plus scheduling slack: every
/// node's clock is the host's, so expiry is judged within this margin.
const CLOCK_MARGIN: Duration = Duration::from_millis(800);
/// Longest wait for a value to reach every region's store.
const REPLICATE_LIMIT: Duration = Duration::from_secs(30);

async fn wait_in_every_store(cluster: &DevCluster, needle: &[u8], what: &str) {
    let deadline = Deadline::after(REPLICATE_LIMIT);
    for region in REGIONS {
        while !store_holds(&cluster.store_dir(region), needle) {
            assert!(!deadline.passed(), "{what} did not reach {region}'s store within {REPLICATE_LIMIT:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

const LEVELS: [ReadConsistency; 5] = [
    ReadConsistency::Local,
    ReadConsistency::Bounded(Duration::from_secs(3600)),
    ReadConsistency::Session,
    ReadConsistency::Quorum,
    ReadConsistency::Strong,
];

/// Reads `row` in `region` at every level; returns the levels that served
/// it (a level a table does not offer is refused and shows nothing) and
/// fails on any that found a value.
async fn assert_invisible(client: &Client, region: &str, row: &Row) -> usize {
    let mut served = 0;
    for level in LEVELS {
        match client.get(row, level).await {
            Ok(got) => {
                assert!(
                    !got.found && got.siblings.is_empty(),
                    "{region}: {row:?} at {level:?} still shows {:?} after its TTL",
                    got.siblings
                );
                served += 1;
            }
            Err(e) => {
                let reason = e.reason_or_code();
                assert!(
                    reason == "LEVEL_UNAVAILABLE" || reason == "WRONG_TYPE",
                    "{region}: {row:?} at {level:?} failed with {reason}: {e}"
                );
            }
        }
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_value_is_invisible_everywhere_and_leaves_every_disk_after_compaction() {
    let cluster = DevCluster::start_with(Options::scale(0.1)).await;
    expire_and_compact(&cluster).await;
}

/// The checks above can fail: with the put-back bug `ttl-ignored` (values
/// never expire) the first read after the TTL still shows the value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn values_that_never_expire_are_caught() {
    let cluster = DevCluster::start_with(Options { bug: Some("ttl-ignored"), ..Options::scale(0.1) }).await;
    // The cluster moves into the task, so a failed check stops its nodes
    // as it unwinds.
    let run = tokio::spawn(async move { expire_and_compact(&cluster).await });
    common::expect_caught(run, "still shows").await;
}

/// Writes values with and without a TTL, and checks reads everywhere after
/// the TTL and the disks after a compaction (panics on a failed check).
async fn expire_and_compact(cluster: &DevCluster) {
    let us = cluster.client(US).await;
    let expiring = marker(b"ttl-gone");
    let kept = marker(b"ttl-kept");
    let strong = marker(b"ttl-strg");
    let local = WriteOptions::default().consistency(Consistency::Local);

    us.put(&Row::new("default", "kept"), kept.clone(), local.clone()).await.expect("put without TTL");
    us.put(&Row::new("registers", "expiring"), strong.clone(), WriteOptions::default().ttl(TTL))
        .await
        .expect("STRONG put with TTL");
    let strong_written = Instant::now();
    us.put(&Row::new("default", "expiring"), expiring.clone(), local.clone().ttl(TTL))
        .await
        .expect("put with TTL");
    let written = Instant::now();

    // Positive controls: visible before the TTL, and on every region's disk.
    let got = us.get(&Row::new("default", "expiring"), ReadConsistency::Local).await.expect("read");
    assert!(got.found, "the value is visible before its TTL");
    let got = us.get(&Row::new("registers", "expiring"), ReadConsistency::Strong).await.expect("read");
    if strong_written.elapsed() < TTL {
        assert!(got.found, "the STRONG value is visible before its TTL");
    }
    wait_in_every_store(cluster, &expiring, "the expiring value").await;
    wait_in_every_store(cluster, &kept, "the value without TTL").await;

    let invisible_at = written + TTL + CLOCK_MARGIN;
    tokio::time::sleep_until(invisible_at.into()).await;
    for region in REGIONS {
        let client = cluster.client(region).await;
        let served = assert_invisible(&client, region, &Row::new("default", "expiring")).await;
        assert!(served >= 4, "{region}: only {served} read levels served the expired row");
        let served = assert_invisible(&client, region, &Row::new("registers", "expiring")).await;
        assert!(served >= 2, "{region}: only {served} read levels served the expired STRONG row");
        let page = client.scan("default", b"", b"", 100).await.expect("scan");
        let keys: Vec<_> = page.rows.iter().map(|r| String::from_utf8_lossy(&r.key).into_owned()).collect();
        assert_eq!(keys, ["kept"], "{region}: a scan lists only the live row");
        let got = client.get(&Row::new("default", "kept"), ReadConsistency::Local).await.expect("read");
        assert!(got.found, "{region}: the value without TTL is still there");
    }

    // On disk until a compaction takes it: compact every region.
    for region in REGIONS {
        let done = cluster.client(region).await.compact().await.expect("compact");
        assert_eq!(done.nodes, 1, "{region}: {done:?}");
        assert!(done.expired_stripped >= 1, "{region}: compaction removed no expired value: {done:?}");
    }
    for region in REGIONS {
        let dir = cluster.store_dir(region);
        assert!(
            !store_holds(&dir, &expiring),
            "{region}: the expired value's bytes are still in {}",
            dir.display()
        );
        assert!(
            store_holds(&dir, &kept),
            "{region}: the byte scan no longer finds the live value in {}",
            dir.display()
        );
    }
}
