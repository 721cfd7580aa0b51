//! Bounded replication logs, as a user of a `geokv dev` cluster sees them
//! (docs/architecture.md section 6): real node processes, every inter-region link
//! behind the fault proxy.
//!
//! - back-pressure: when a healthy destination falls behind, writers are
//!   slowed, then refused with `REPLICATION_BACKPRESSURE` (retryable), and
//!   served again once it catches up; a paused destination never holds
//!   writers back;
//! - anti-entropy: a region partitioned away while every node writes far
//!   past log retention is repaired by Merkle-tree anti-entropy after the
//!   heal: all regions converge, every acknowledged write is present, and
//!   no row was ever sent outside its residency zone.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{DevCluster, Options, REGIONS};
use common::{http_get, metric_sum, Deadline};
use geokv_client::{Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";
const AP: &str = "ap-southeast-1";
const CONVERGE_LIMIT: Duration = Duration::from_secs(120);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backpressure_slows_then_refuses_writers_and_releases() {
    // One entry per frame and one frame in flight: shipping to the far
    // regions is bound by the round trip, far slower than local writes.
    // Health waits 100 heartbeats, so a slow link stays healthy.
    let cluster = DevCluster::start_with(Options {
        extra_config: "[replication]\nunhealthy_after_misses = 100\nbackpressure_soft_entries = 10\n\
                       backpressure_hard_entries = 30\nbackpressure_delay_ms_max = 20\n\
                       batch_entries_max = 1\nin_flight_frames_max = 1\n"
            .into(),
        ..Options::scale(1.0)
    })
    .await;
    let client = cluster.client_with(US, |c| c.retries_max = 0).await;
    let local = WriteOptions::default().consistency(Consistency::Local);

    // Engage: write until refused (bounded).
    let mut accepted = 0u32;
    let mut refused = None;
    for i in 0..500u32 {
        match client.put(&Row::new("default", format!("bp{i}")), b"x".to_vec(), local.clone()).await {
            Ok(_) => accepted += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let refused = refused.expect("500 writes outran a 1-entry-per-round-trip link without back-pressure");
    assert_eq!(refused.reason.as_deref(), Some("REPLICATION_BACKPRESSURE"), "{refused:?}");
    assert_eq!(refused.code, tonic::Code::ResourceExhausted);
    assert!(refused.metadata.contains_key("destination") && refused.metadata["bound_entries"] == "30");
    assert!(accepted >= 30, "writes are refused only past the hard bound; {accepted} accepted");
    let metrics = http_get(cluster.admin_addr(US), "/metrics").expect("metrics");
    assert!(metric_sum(&metrics, "geokv_backpressure_throttled_total") >= 1.0, "writes were slowed first");
    assert!(metric_sum(&metrics, "geokv_backpressure_rejected_total") >= 1.0);
    eprintln!(
        "back-pressure engaged after {accepted} accepted writes ({} slowed, {} refused): {}",
        metric_sum(&metrics, "geokv_backpressure_throttled_total"),
        metric_sum(&metrics, "geokv_backpressure_rejected_total"),
        refused.message
    );
    let released_from = Instant::now();

    // Release: once the destinations catch up, writes go through again.
    let deadline = Deadline::after(Duration::from_secs(60));
    loop {
        let started = Instant::now();
        match client.put(&Row::new("default", "after"), b"y".to_vec(), local.clone()).await {
            Ok(_) => {
                assert!(started.elapsed() < Duration::from_secs(2));
                eprintln!("back-pressure released after {:?}", released_from.elapsed());
                break;
            }
            Err(e) => assert_eq!(e.reason.as_deref(), Some("REPLICATION_BACKPRESSURE"), "{e:?}"),
        }
        assert!(!deadline.passed(), "back-pressure never released");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    cluster.wait_converged(CONVERGE_LIMIT).await;

    // A destination the operator paused never holds writers back.
    for to in [EU_WEST, EU_CENTRAL, AP] {
        cluster.cli(&["replication", "pause", "--to", to]).await.ok();
    }
    for i in 0..60u32 {
        client
            .put(&Row::new("default", format!("paused{i}")), b"z".to_vec(), local.clone())
            .await
            .unwrap_or_else(|e| panic!("write {i} with every destination paused: {e:?}"));
    }
    for to in [EU_WEST, EU_CENTRAL, AP] {
        cluster.cli(&["replication", "resume", "--to", to]).await.ok();
    }
    cluster.wait_converged(CONVERGE_LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_behind_log_retention_is_repaired_by_anti_entropy() {
    let cluster = DevCluster::start_with(Options {
        nodes_per_region: 2,
        partitions: 16,
        extra_config:
            "[storage]\nlog_retention_entries = 40\n[replication]\nbackpressure_soft_entries = 20\n\
                       backpressure_hard_entries = 38\nrepair_batch_rows_max = 16\n"
                .into(),
        ..Options::scale(0.1)
    })
    .await;
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    cluster.isolate(EU_CENTRAL).await;

    // Every region writes far past the 40 entries each node keeps, the
    // partitioned one included: rows of every region's zone (default, no
    // zone) and EU-only rows written in both EU regions.
    let mut written: Vec<(Row, String, &[&str])> = Vec::new();
    let everywhere: &[&str] = &REGIONS;
    let eu: &[&str] = &[EU_WEST, EU_CENTRAL];
    // (entry region, table, locality, rows, regions that may hold them)
    type Step<'a> = (&'a str, &'a str, Option<&'a str>, u32, &'a [&'a str]);
    let plan: [Step; 5] = [
        (US, "default", None, 200, everywhere),
        (AP, "default", None, 60, everywhere),
        (EU_CENTRAL, "default", None, 100, everywhere),
        (EU_WEST, "eu_users", Some("FR"), 100, eu),
        (EU_CENTRAL, "eu_users", Some("DE"), 100, eu),
    ];
    for (region, table, locality, count, allowed) in plan {
        let clients = [cluster.node_client(region, 0).await, cluster.node_client(region, 1).await];
        for i in 0..count {
            let mut row = Row::new(table, format!("{region}-{i}"));
            if let Some(l) = locality {
                row = row.locality(l);
            }
            let value = format!("{region}:{i}");
            clients[(i % 2) as usize]
                .put(&row, value.clone().into_bytes(), eventual.clone())
                .await
                .unwrap_or_else(|e| panic!("write {table}/{region}-{i}: {e:?}"));
            written.push((row, value, allowed));
        }
    }
    cluster.heal(EU_CENTRAL).await;
    let healed = Instant::now();
    cluster.wait_converged(CONVERGE_LIMIT).await;
    eprintln!("{} writes acknowledged; converged {:?} after the heal", written.len(), healed.elapsed());

    // The links that fell behind were repaired, both ways.
    let status = cluster.cli_json(&["replication", "status"]).await;
    let links = status["links"].as_array().expect("links");
    let repaired = |from: &str, to: &str| -> (u64, u64) {
        links
            .iter()
            .filter(|l| l["source"] == from && l["destination"] == to)
            .map(|l| {
                (l["repair"]["finished"].as_u64().unwrap_or(0), l["repair"]["rows"].as_u64().unwrap_or(0))
            })
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    // A repair sends every row the destination lacks, whatever region wrote
    // it, so the rows US wrote may reach eu-central-1 through eu-west-1's
    // repair first: only the sum into eu-central-1 must be non-zero. The
    // rows eu-central-1 wrote exist nowhere else, so its own links must
    // carry them.
    let mut into_central = 0;
    for (from, to) in [(US, EU_CENTRAL), (EU_WEST, EU_CENTRAL), (EU_CENTRAL, EU_WEST), (EU_CENTRAL, US)] {
        let (finished, rows) = repaired(from, to);
        eprintln!("repairs {from} -> {to}: {finished} finished, {rows} rows sent");
        assert!(finished >= 2, "{from} -> {to}: {finished} repairs finished; status {status}");
        if to == EU_CENTRAL {
            into_central += rows;
        } else {
            assert!(rows > 0, "{from} -> {to}: no row repaired; status {status}");
        }
    }
    assert!(into_central > 0, "no row repaired into {EU_CENTRAL}; status {status}");
    assert!(
        links.iter().all(|l| !l["repair"]["state"].as_str().unwrap_or("").starts_with("failed")),
        "a repair failed: {status}"
    );

    // Every acknowledged write is in every region its zone allows.
    let mut readers = std::collections::BTreeMap::new();
    for region in REGIONS {
        readers.insert(region, cluster.node_client(region, 0).await);
    }
    for (row, value, allowed) in &written {
        for region in *allowed {
            let got = readers[region].get(row, ReadConsistency::Local).await;
            let got = got.unwrap_or_else(|e| panic!("get {} in {region}: {e:?}", text(&row.key)));
            let values: Vec<String> = got.siblings.iter().map(|s| text(&s.value)).collect();
            assert_eq!(values, vec![value.clone()], "{} in {region}", text(&row.key));
        }
    }

    // No row was ever sent outside its zone: nothing is stored there, and no
    // receiver ever had to refuse one.
    let audit = cluster.cli_json(&["residency", "audit"]).await;
    assert_eq!(audit["violations"].as_array().map(Vec::len), Some(0), "{audit}");
    for region in REGIONS {
        for j in 0..2 {
            let metrics = http_get(cluster.node_admin_addr(region, j), "/metrics").expect("metrics");
            assert_eq!(metric_sum(&metrics, "geokv_residency_refused_total"), 0.0, "{region}/{j}");
            if region == US || region == AP {
                assert_eq!(metric_sum(&metrics, "geokv_replication_skipped_by_residency_total"), 0.0);
            }
        }
    }
}
