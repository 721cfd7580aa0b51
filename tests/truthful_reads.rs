//! Reads report the staleness they can prove: the bound covers every
//! region that may write the row (the holder of its home's lease, wherever
//! a failover moved it, and every region that accepts EVENTUAL writes for
//! it), not only the configured home (docs/architecture.md section 19).
//!
//! The test withholds one writer's log from the reader's region (its
//! shipping paused), lets the withheld write age, and checks that a
//! BOUNDED read there never claims less staleness than that age: it reports
//! at least the age, or refuses with `REPLICA_STALE` when the age is past
//! the bound.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{DevCluster, Options};
use common::Deadline;
use geokv_client::{Client, Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";
const AP: &str = "ap-southeast-1";
const FAILOVER_LIMIT: Duration = Duration::from_secs(20);
/// How long the withheld write ages before the read.
const AGE: Duration = Duration::from_millis(2_000);

/// Reads `row` at BOUNDED(bound) from `reader` and checks the claim
/// against the truth: `written_at` is when the newest write the reader's
/// region lacks was acknowledged.
/// A read the client sent elsewhere (after `REPLICA_STALE` named a fresher
/// region) must come from a region that has the withheld write (`newest`).
async fn check_claim(
    reader: &Client,
    row: &Row,
    bound: Duration,
    (lacking, newest): (&str, &[u8]),
    written_at: Instant,
    what: &str,
) -> String {
    let truth_ms = written_at.elapsed().as_millis() as u64;
    match reader.get(row, ReadConsistency::Bounded(bound)).await {
        Ok(got) if got.info.served_by_region != lacking => {
            assert!(
                got.values().iter().any(|v| v.as_slice() == newest),
                "{what}: sent on to {}, which lacks the newest write too: {:?}",
                got.info.served_by_region,
                got.values()
            );
            format!("{what}: sent on to {}, which has the newest write", got.info.served_by_region)
        }
        Ok(got) => {
            let claimed = got.info.staleness_ms_max;
            assert!(
                claimed >= truth_ms,
                "{what}: BOUNDED read served by {} claims at most {claimed} ms stale, but it lacks a write \
                 acknowledged {truth_ms} ms ago (found {})",
                got.info.served_by_region,
                got.found
            );
            format!("{what}: served, claims <= {claimed} ms stale (truth >= {truth_ms} ms)")
        }
        Err(e) => {
            assert_eq!(e.reason.as_deref(), Some("REPLICA_STALE"), "{what}: {e}");
            format!("{what}: refused REPLICA_STALE (truth >= {truth_ms} ms, bound {bound:?})")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bounded_reads_never_claim_less_staleness_than_the_truth() {
    let cluster = DevCluster::start(0.25).await;
    let claims = withheld_writes_and_bounded_reads(&cluster).await;
    eprintln!("{}", claims.join("\n"));
}

/// The check above can fail: with the put-back bug `staleness-home-only`
/// (the bound measured from the configured home's stream alone, as before
/// truthful reads) the same steps end in a read that claims less staleness
/// than the truth.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bound_taken_from_the_home_alone_is_caught() {
    let cluster =
        DevCluster::start_with(Options { bug: Some("staleness-home-only"), ..Options::scale(0.25) }).await;
    // The cluster moves into the task, so a failed check stops its nodes
    // as it unwinds.
    let run = tokio::spawn(async move { withheld_writes_and_bounded_reads(&cluster).await });
    let message = common::expect_caught(run, "claims at most").await;
    assert!(message.contains("after failover"), "caught, but not after the failover: {message}");
}

/// Withholds writes from a reader's region and checks what BOUNDED reads
/// there claim (panics on a claim below the truth); returns what each read
/// did.
async fn withheld_writes_and_bounded_reads(cluster: &DevCluster) -> Vec<String> {
    // 1. After a planned failover the home's writes come from eu-west-1.
    // Its log is withheld from eu-central-1; us-east-1 (the configured
    // home) keeps shipping, so a bound taken from the home alone is fresh.
    // Right after the start the home may not be granted yet: the failover
    // is retried (bounded) until the control plane takes it.
    let deadline = Deadline::after(FAILOVER_LIMIT);
    loop {
        let out = cluster.cli(&["region", "failover", "--from", US, "--to", EU_WEST, "--json"]).await;
        if out.status.success() {
            eprintln!("failover: {}", out.stdout.trim());
            break;
        }
        assert!(!deadline.passed(), "planned failover never accepted: {}", out.stderr);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let holder = cluster.client(EU_WEST).await;
    let row = Row::new("default", "truthful-after-failover");
    loop {
        match holder.put(&row, b"v1".to_vec(), WriteOptions::default().consistency(Consistency::Local)).await
        {
            Ok(ack) if ack.accepted_by_region == EU_WEST => break,
            Ok(ack) => panic!("the write was accepted by {}, not the new holder", ack.accepted_by_region),
            Err(e) => {
                assert!(!deadline.passed(), "the new holder never took writes: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // The first write waited for the new holder; the link is paused before
    // the second, whose age is the truth measured.
    holder.control_replication(EU_CENTRAL, true).await.expect("pause eu-west-1 -> eu-central-1");
    holder
        .put(&row, b"v2".to_vec(), WriteOptions::default().consistency(Consistency::Local))
        .await
        .expect("second write at the holder");
    let written_at = Instant::now();
    tokio::time::sleep(AGE).await;
    let reader = cluster.client(EU_CENTRAL).await;
    let got = reader.get(&row, ReadConsistency::Local).await.expect("LOCAL read");
    assert!(
        got.values().iter().all(|v| v != b"v2"),
        "the paused link delivered the write anyway; the test proves nothing"
    );
    let a = check_claim(
        &reader,
        &row,
        Duration::from_secs(60),
        (EU_CENTRAL, b"v2".as_slice()),
        written_at,
        "after failover, at eu-central-1",
    )
    .await;
    let b = check_claim(
        &reader,
        &row,
        Duration::from_millis(500),
        (EU_CENTRAL, b"v2".as_slice()),
        written_at,
        "after failover, tight bound",
    )
    .await;
    holder.control_replication(EU_CENTRAL, false).await.expect("resume");

    // 2. An EVENTUAL write accepted in ap-southeast-1, withheld from the
    // configured home: a read at the home is not fresh either.
    cluster.cli_json(&["region", "failback", "--region", US]).await;
    let ap = cluster.client(AP).await;
    ap.control_replication(US, true).await.expect("pause ap-southeast-1 -> us-east-1");
    let row = Row::new("default", "truthful-eventual");
    ap.put(&row, b"from-ap".to_vec(), WriteOptions::default().consistency(Consistency::Eventual))
        .await
        .expect("EVENTUAL write in ap-southeast-1");
    let written_at = Instant::now();
    tokio::time::sleep(AGE).await;
    let home = cluster.node_client(US, 0).await;
    let got = home.get(&row, ReadConsistency::Local).await.expect("LOCAL read at the home");
    assert!(!got.found, "the paused link delivered the write anyway; the test proves nothing");
    let c = check_claim(
        &home,
        &row,
        Duration::from_secs(60),
        (US, b"from-ap".as_slice()),
        written_at,
        "EVENTUAL elsewhere, at the home",
    )
    .await;
    ap.control_replication(US, false).await.expect("resume");
    vec![a, b, c]
}
