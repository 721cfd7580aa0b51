//! A retried write counts once wherever it lands: idempotency records
//! travel with the row's replication-log entry, and a retry that a new home
//! applied before the original reached it is undone by its origin
//! (docs/architecture.md section 19).
//!
//! - planned failover: a counter add acknowledged by the old home and
//!   retried (same idempotency key) at the new holder is replayed, not
//!   applied again;
//! - unplanned failover: an add acknowledged by a home that dies before
//!   shipping it is retried at the new holder, which must apply it (the
//!   original is out of reach); when the old home returns, the two
//!   applications are recognised by their key and one is compensated, so
//!   every region ends with the counter counted once.

use crate::common;

use std::time::Duration;

use common::cluster::{wait_moved, DevCluster};
use common::Deadline;
use geokv_client::{Client, Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const REGIONS: [&str; 4] = ["us-east-1", "eu-west-1", "eu-central-1", "ap-southeast-1"];
const FAILOVER_LIMIT: Duration = Duration::from_secs(20);
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

fn local(key: &str) -> WriteOptions {
    WriteOptions::default().consistency(Consistency::Local).idempotency_key(key)
}

/// Retries `add` until it is acknowledged (a new holder may refuse for a
/// moment while it applies its new epoch); returns the value it reported.
async fn add_until_acked(client: &Client, row: &Row, delta: i64, key: &str) -> (i64, bool) {
    let deadline = Deadline::after(Duration::from_secs(15));
    loop {
        match client.counter_add(row, delta, local(key)).await {
            Ok((value, ack)) => return (value, ack.replayed),
            Err(e) => {
                assert!(!deadline.passed(), "retry of {key} never acknowledged: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Reads the counter in every region until all show `expected` (bounded);
/// returns what each region showed last.
async fn counter_everywhere(cluster: &DevCluster, row: &Row, expected: i64) -> Vec<(String, Option<i64>)> {
    let deadline = Deadline::after(CONVERGE_LIMIT);
    loop {
        let mut seen = Vec::new();
        for region in REGIONS {
            let client = cluster.client(region).await;
            seen.push((
                region.to_string(),
                client.counter_get(row, ReadConsistency::Local).await.ok().flatten(),
            ));
        }
        if seen.iter().all(|(_, v)| *v == Some(expected)) || deadline.passed() {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_counter_add_retried_across_failovers_counts_once() {
    let mut cluster = DevCluster::start(0.25).await;

    // Planned: acknowledged at the home, replicated, then the home moves
    // and the client (which never saw the reply) retries at the new holder.
    let planned = Row::new("default", "idem-planned");
    let us = cluster.client(US).await;
    let (first, ack) = us.counter_add(&planned, 5, local("k-planned")).await.expect("add at the home");
    assert_eq!((first, ack.replayed), (5, false));
    cluster.wait_converged(CONVERGE_LIMIT).await;
    let moved = cluster.cli_json(&["region", "failover", "--from", US, "--to", EU_WEST]).await;
    eprintln!("planned failover: {moved}");
    let eu = cluster.client(EU_WEST).await;
    let held = wait_moved(&eu, US, US, FAILOVER_LIMIT, true).await;
    let (value, replayed) = add_until_acked(&eu, &planned, 5, "k-planned").await;
    eprintln!(
        "retry after the planned failover (holder {}): value {value}, replayed {replayed}",
        held.holder
    );
    assert!(replayed, "the retry at the new holder was applied again (value {value}), not replayed");
    assert_eq!(value, 5, "the replayed reply is the original one");
    let seen = counter_everywhere(&cluster, &planned, 5).await;
    assert!(seen.iter().all(|(_, v)| *v == Some(5)), "planned: counted more or less than once: {seen:?}");
    cluster.cli_json(&["region", "failback", "--region", US]).await;
    wait_moved(&eu, US, EU_WEST, FAILOVER_LIMIT, true).await;

    // Unplanned: the home acknowledges, ships nothing (paused), and dies.
    let unplanned = Row::new("default", "idem-unplanned");
    let us = cluster.client(US).await;
    for to in &REGIONS[1..] {
        cluster.cli(&["replication", "pause", "--to", to]).await.ok();
    }
    let (first, _) = us.counter_add(&unplanned, 7, local("k-unplanned")).await.expect("add at the home");
    assert_eq!(first, 7);
    cluster.kill_9(US);
    let eu = cluster.client(EU_WEST).await;
    let held = wait_moved(&eu, US, US, FAILOVER_LIMIT, true).await;
    let (value, replayed) = add_until_acked(&eu, &unplanned, 7, "k-unplanned").await;
    eprintln!(
        "retry after the unplanned failover (holder {}): value {value}, replayed {replayed}",
        held.holder
    );
    assert!(!replayed && value == 7, "the new holder cannot know the original yet: {value} {replayed}");

    // The old home returns (its pause was in memory only) and ships the
    // original: one of the two applications must be compensated.
    cluster.restart(US).await;
    let seen = counter_everywhere(&cluster, &unplanned, 7).await;
    assert!(seen.iter().all(|(_, v)| *v == Some(7)), "unplanned: the retried add counted twice: {seen:?}");
    cluster.wait_converged(CONVERGE_LIMIT).await;
    let metrics = common::http_get(cluster.admin_addr(EU_WEST), "/metrics");
    eprintln!(
        "compensated duplicates: {}",
        common::metric_sum(&metrics.unwrap_or_default(), "geokv_idempotent_duplicates_compensated_total")
    );
}
