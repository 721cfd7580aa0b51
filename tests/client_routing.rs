//! The region-aware client against a real four-region `geokv dev` cluster:
//! it reads from its local region, writes LOCAL rows straight to their
//! home's holder (no forwarding hop), fails over to the other EU region
//! when its own dies without losing an acknowledged write, and never lets
//! an EU row's request reach a region outside the EU zone, not even when
//! both EU regions are down.

use crate::common;

use std::time::{Duration, Instant};

use common::cluster::{DevCluster, REGIONS};
use common::{metric, Deadline};
use geokv_client::{Client, ClientConfig, Consistency, ReadConsistency, Row, WriteOptions};

const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";
const OUTSIDE_EU: [&str; 2] = ["us-east-1", "ap-southeast-1"];

fn level(c: Consistency) -> WriteOptions {
    WriteOptions { consistency: Some(c), ..WriteOptions::default() }
}

/// Requests forwarded by any node, in or across regions.
fn forwarded(cluster: &DevCluster) -> f64 {
    REGIONS.iter().map(|r| metric(cluster.admin_addr(r), "geokv_forwarded_total", &[])).sum()
}

/// KV requests a region's node handled (whatever their outcome).
fn kv_requests(cluster: &DevCluster, region: &str) -> f64 {
    metric(cluster.admin_addr(region), "geokv_requests_total", &[])
}

async fn region_aware(cluster: &DevCluster, local: &str) -> Client {
    let seeds: Vec<String> = REGIONS.iter().map(|r| cluster.endpoint(r)).collect();
    let mut cfg = ClientConfig::discover(seeds).local_region(local).with_certs_dir(cluster.certs_dir());
    // Quick failover for the test's bounds: short attempts and breakers.
    cfg.timeout = Duration::from_secs(2);
    cfg.ping_interval = Duration::from_millis(200);
    cfg.refresh_interval = Duration::from_millis(200);
    Client::with_config(cfg).await.expect("a region-aware client from four seeds")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn region_aware_client_routes_fails_over_and_keeps_residency() {
    let mut cluster = DevCluster::start(0.1).await;
    let client = region_aware(&cluster, EU_WEST).await;
    let topology = client.topology().expect("a region-aware client knows the topology");
    assert_eq!(topology.region_order, REGIONS, "every region learnt from the seeds");

    // 1. A LOCAL write of a us-east-1 row goes straight to us-east-1: no
    // node forwards it.
    let before = forwarded(&cluster);
    let us_row = Row::new("users", "route:us").home("us-east-1");
    let ack = client.put(&us_row, b"v1".to_vec(), level(Consistency::Local)).await.expect("LOCAL put");
    assert_eq!(ack.accepted_by_region, "us-east-1");
    for i in 0..20 {
        let row = Row::new("users", format!("route:us:{i}")).home("us-east-1");
        client.put(&row, b"x".to_vec(), level(Consistency::Local)).await.expect("LOCAL put");
    }
    // A STRONG write goes to the region leading the registers' group
    // (us-east-1, which the topology names), not to the local region.
    let register = Row::new("registers", "route:strong");
    let deadline = Deadline::after(Duration::from_secs(20));
    loop {
        let t = client.topology().expect("topology");
        match t.strong_leaders.get("us-east-1").map(String::as_str) {
            Some("us-east-1") => break,
            other => assert!(!deadline.passed(), "the topology names the STRONG leader {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(client.plan_for(&register, true).first().map(String::as_str), Some("us-east-1"));
    let ack = client.put(&register, b"s".to_vec(), WriteOptions::default()).await.expect("STRONG put");
    assert_eq!(ack.accepted_by_region, "us-east-1");
    assert_eq!(forwarded(&cluster), before, "a LOCAL write of a us-east-1 row was forwarded by a node");

    // 2. LOCAL reads are served by the local region once the row arrives.
    let deadline = Deadline::after(Duration::from_secs(10));
    loop {
        let got = client.get(&us_row, ReadConsistency::Local).await.expect("LOCAL get");
        assert_eq!(got.info.served_by_region, EU_WEST, "a LOCAL read left the local region");
        if got.values() == [b"v1".to_vec()] {
            break;
        }
        assert!(!deadline.passed(), "the us-east-1 row did not reach eu-west-1 within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(forwarded(&cluster), before, "a LOCAL read was forwarded by a node");

    // 3. kill -9 of eu-west-1 under EVENTUAL writes and LOCAL reads of EU
    // rows: the client carries on through eu-central-1 within 2 s, and no
    // request for an EU row reaches a region outside the zone.
    let outside_before: Vec<f64> = OUTSIDE_EU.iter().map(|r| kv_requests(&cluster, r)).collect();
    let mut acked: Vec<(Row, Vec<u8>)> = Vec::new();
    let mut killed_at: Option<Instant> = None;
    let mut recovered_after: Option<Duration> = None;
    let mut failures_after_kill = 0u32;
    for i in 0..120u32 {
        if i == 40 {
            cluster.kill_9(EU_WEST);
            killed_at = Some(Instant::now());
        }
        let row = Row::new("eu_users", format!("eu:{i}")).locality("FR");
        let value = format!("value-{i}").into_bytes();
        match client.put(&row, value.clone(), level(Consistency::Eventual)).await {
            Ok(ack) => {
                assert!(
                    ack.accepted_by_region.starts_with("eu-"),
                    "EU row accepted by {}",
                    ack.accepted_by_region
                );
                if let (Some(at), None) = (killed_at, recovered_after) {
                    recovered_after = Some(at.elapsed());
                }
                let read = client.get(&row, ReadConsistency::Local).await.expect("LOCAL read after an ack");
                assert!(read.info.served_by_region.starts_with("eu-"));
                acked.push((row, value));
            }
            Err(e) => {
                assert!(killed_at.is_some(), "an EU write failed before any fault: {e}");
                failures_after_kill += 1;
            }
        }
    }
    let recovered = recovered_after.expect("no EU write succeeded after eu-west-1 was killed");
    assert!(recovered < Duration::from_secs(2), "EU writes came back after {recovered:?}, not within 2 s");
    assert!(failures_after_kill <= 2, "{failures_after_kill} EU writes failed after the kill");
    eprintln!(
        "eu-west-1 killed: next acknowledged EU write after {recovered:?}, {failures_after_kill} failed"
    );

    // 4. Both EU regions down: an EU row's request fails at once with the
    // typed residency error naming the allowed regions; a US row still works.
    cluster.kill_9(EU_CENTRAL);
    let eu_row = Row::new("eu_users", "eu:down").locality("DE");
    let started = Instant::now();
    let err =
        client.put(&eu_row, b"x".to_vec(), level(Consistency::Eventual)).await.expect_err("no EU region");
    let took = started.elapsed();
    assert_eq!(err.reason.as_deref(), Some("ZONE_UNREACHABLE"), "{err}");
    assert_eq!(err.metadata.get("allowed_regions").map(String::as_str), Some("eu-west-1,eu-central-1"));
    assert!(took < Duration::from_secs(1), "the zone error took {took:?}");
    let err = client.get(&eu_row, ReadConsistency::Local).await.expect_err("no EU region");
    assert_eq!(err.reason.as_deref(), Some("ZONE_UNREACHABLE"), "{err}");
    let ack = client.put(&us_row, b"v2".to_vec(), level(Consistency::Local)).await.expect("US row");
    assert_eq!(ack.accepted_by_region, "us-east-1");
    let outside_after: Vec<f64> = OUTSIDE_EU.iter().map(|r| kv_requests(&cluster, r)).collect();
    // The US write above is the one KV request us-east-1 may have seen.
    assert_eq!(outside_after[1], outside_before[1], "ap-southeast-1 handled a KV request for an EU row");
    assert_eq!(outside_after[0], outside_before[0] + 1.0, "us-east-1 handled a KV request for an EU row");

    // 5. No acknowledged EU write is lost: with both EU nodes back, every
    // one is readable in both EU regions.
    cluster.restart(EU_WEST).await;
    cluster.restart(EU_CENTRAL).await;
    for region in [EU_WEST, EU_CENTRAL] {
        let node = cluster.client(region).await;
        let deadline = Deadline::after(Duration::from_secs(30));
        let mut missing: Vec<String>;
        loop {
            missing = Vec::new();
            for (row, value) in &acked {
                let got = node.get(row, ReadConsistency::Local).await.expect("read after restart");
                if !got.values().contains(value) {
                    missing.push(String::from_utf8_lossy(&row.key).into_owned());
                }
            }
            if missing.is_empty() || deadline.passed() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(missing.is_empty(), "{region} lacks acknowledged EU writes: {missing:?}");
    }
    eprintln!("{} acknowledged EU writes, all present in both EU regions", acked.len());
    // Dropping the cluster stops geokv dev and the restarted nodes.
}
