//! Hot big rows, as a new user of `geokv dev` writes them
//! (docs/decisions/015-bounded-rows.md): blind (context-less) puts of
//! values near the value limit to one key, from two regions at once. Every
//! put is either accepted or refused with a typed error before anything is
//! stored, and replication never wedges: a small write made afterwards is
//! readable in every other region within 2 s, and all regions converge.
//! A destination whose limits are smaller (a config that disagrees) refuses
//! an entry: the source skips it, loudly and counted, and the rest arrives.

use crate::common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::cluster::{DevCluster, REGIONS};
use common::{http_get, metric_sum};
use geokv_client::{Client, Consistency, ReadConsistency, Row, WriteOptions};

/// The two regions that write the hot key.
const WRITERS: [&str; 2] = ["us-east-1", "eu-west-1"];
/// Blind puts to the hot key, alternating between the writers.
const PUTS: usize = 20;
/// Size of each put: under the default value limit (1 MiB), while a dozen
/// of them as siblings are far over any frame of a few MiB.
const VALUE_BYTES: usize = 900_000;
/// How soon a write made after the big ones must be readable elsewhere.
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);
/// How long the regions may take to agree on every row afterwards.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

/// Incompressible bytes (xorshift), so compression cannot hide the size.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Polls `client` (bounded by `deadline`) until `row` is found.
async fn found_by(client: &Client, row: &Row, deadline: Instant) -> bool {
    loop {
        if let Ok(got) = client.get(row, ReadConsistency::Local).await {
            if got.found {
                return true;
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blind_big_puts_from_two_regions_are_bounded_and_never_wedge_replication() {
    let cluster = DevCluster::start(1.0).await;
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    let mut writers = Vec::new();
    for region in WRITERS {
        writers.push(cluster.client_with(region, |c| c.timeout = Duration::from_secs(20)).await);
    }

    let hot = Row::new("default", "hot");
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..PUTS {
        let value = noise(i as u64 + 1, VALUE_BYTES);
        let outcome = match writers[i % WRITERS.len()].put(&hot, value, eventual.clone()).await {
            Ok(_) => "accepted".to_string(),
            Err(e) => {
                let reason = e.reason.clone().unwrap_or_default();
                assert!(
                    reason == "ROW_TOO_LARGE" || reason == "TOO_MANY_SIBLINGS",
                    "put {i} from {} failed without a row-bound reason: {e:?}",
                    WRITERS[i % WRITERS.len()]
                );
                assert_eq!(e.code, tonic::Code::FailedPrecondition, "{e:?}");
                reason
            }
        };
        *outcomes.entry(outcome).or_default() += 1;
    }
    eprintln!("{PUTS} blind puts of {VALUE_BYTES} bytes to one key from {WRITERS:?}: {outcomes:?}");

    // A small write made afterwards in each writing region reaches every
    // other region within the bound: nothing before it in the stream holds
    // it back.
    let mut readers = BTreeMap::new();
    for region in REGIONS {
        readers.insert(region, cluster.client(region).await);
    }
    for (w, region) in WRITERS.iter().enumerate() {
        let small = Row::new("default", format!("after-{region}"));
        writers[w].put(&small, b"small".to_vec(), eventual.clone()).await.expect("small put");
        let deadline = Instant::now() + VISIBLE_WITHIN;
        for other in REGIONS.iter().filter(|r| *r != region) {
            assert!(
                found_by(&readers[other], &small, deadline).await,
                "a small write in {region} was not readable in {other} within {VISIBLE_WITHIN:?} \
                 after {PUTS} big puts ({outcomes:?}): replication is wedged"
            );
        }
    }

    // Every region ends with the same rows, the hot one included.
    cluster.wait_converged(CONVERGE_LIMIT).await;
    for region in REGIONS {
        let metrics = http_get(cluster.admin_addr(region), "/metrics").expect("metrics");
        assert_eq!(
            metric_sum(&metrics, "geokv_replication_unshippable_total"),
            0.0,
            "{region}: a row within the limits could not be shipped"
        );
    }
}

/// A destination whose row limit is smaller than the source's (a config
/// that disagrees) refuses frames as `ROW_TOO_LARGE`: the source sends the
/// refused frame's entries one by one, skips the one refused alone (loudly,
/// counted), and what comes after it still arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_entry_a_destination_refuses_is_skipped_and_the_stream_moves_on() {
    const SMALL: &str = "ap-southeast-1";
    const SOURCE: &str = "us-east-1";
    let mut cluster = DevCluster::start(1.0).await;
    cluster.kill_9(SMALL);
    let config = cluster.node_config(SMALL);
    let mut text = std::fs::read_to_string(&config).expect("read node.toml");
    text.push_str("\n[limits]\nvalue_bytes_max = 65536\nrow_bytes_max = 80000\n");
    std::fs::write(&config, text).expect("write node.toml");
    cluster.restart(SMALL).await;

    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    let source = cluster.client_with(SOURCE, |c| c.timeout = Duration::from_secs(20)).await;
    let hot = Row::new("default", "hot");
    // Two siblings of 900 KB: within the source's limits, far over the
    // frames the small region accepts.
    for i in 0..2 {
        source.put(&hot, noise(i + 1, VALUE_BYTES), eventual.clone()).await.expect("big put");
    }
    let small = Row::new("default", "after-the-big-row");
    source.put(&small, b"small".to_vec(), eventual).await.expect("small put");
    let reader = cluster.client(SMALL).await;
    let limit = Duration::from_secs(15);
    assert!(
        found_by(&reader, &small, Instant::now() + limit).await,
        "a write made after an entry {SMALL} refuses did not arrive there within {limit:?}"
    );
    let metrics = http_get(cluster.admin_addr(SOURCE), "/metrics").expect("metrics");
    assert!(metric_sum(&metrics, "geokv_replication_unshippable_total") >= 1.0, "the skip is counted");
    let metrics = http_get(cluster.admin_addr(SMALL), "/metrics").expect("metrics");
    assert!(metric_sum(&metrics, "geokv_replication_frames_too_large_total") >= 1.0);
}
