//! Several nodes per region (docs/architecture.md section 2), as a user of a
//! `geokv dev --nodes-per-region 2` cluster sees it: real node processes,
//! two per region, every inter-region link behind the fault proxy.
//!
//! - the partition map the CLI prints is the one the nodes route by: every
//!   row is stored on the owner of its partition, in every region;
//! - writes through any node (of the home region or another) land on the
//!   owner and replicate to the owners in the other regions;
//! - reads, counters and scans through any node see every row;
//! - region digests (over both nodes) compare equal, and the residency
//!   audit (over both nodes) is clean.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::cluster::{DevCluster, Options, REGIONS};
use common::Deadline;
use geokv_client::{Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";
const PARTITIONS: u32 = 16;
/// Longest wait for replication to reach every owner.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `(region, node id) -> partitions it owns`, from `geokv region partitions --json`.
fn owners_from_cli(map: &serde_json::Value) -> BTreeMap<(String, String), BTreeSet<u64>> {
    let mut out: BTreeMap<(String, String), BTreeSet<u64>> = BTreeMap::new();
    for r in map["regions"].as_array().expect("regions") {
        let region = r["region"].as_str().expect("region name").to_string();
        for o in r["owners"].as_array().expect("owners") {
            let node = o["node_id"].as_str().expect("node id").to_string();
            out.entry((region.clone(), node))
                .or_default()
                .insert(o["partition"].as_u64().expect("partition"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_per_region_route_to_owners_and_converge() {
    let cluster = DevCluster::start_with(Options {
        nodes_per_region: 2,
        partitions: PARTITIONS,
        ..Options::scale(0.1)
    })
    .await;

    // The mapping the CLI prints: nodes sorted by id, partition p -> nodes[p % 2].
    let map = cluster.cli_json(&["region", "partitions"]).await;
    assert_eq!(map["partitions"], PARTITIONS);
    let owners = owners_from_cli(&map);
    for region in REGIONS {
        for (j, node) in ["n1", "n2"].iter().enumerate() {
            let want: BTreeSet<u64> = (0..u64::from(PARTITIONS)).filter(|p| p % 2 == j as u64).collect();
            assert_eq!(owners[&(region.to_string(), node.to_string())], want, "{region}/{node}");
        }
    }
    let only_eu = cluster.cli_json(&["region", "partitions", "--region", EU_WEST]).await;
    assert_eq!(only_eu["regions"].as_array().map(Vec::len), Some(1), "--region filters: {only_eu}");

    // Writes through every node of three regions: LOCAL writes of rows homed
    // in us-east-1 (forwarded there from the EU), EU rows written EVENTUAL
    // in the EU, and counter adds spread over every node.
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    let local = WriteOptions::default().consistency(Consistency::Local);
    let mut written: Vec<(Row, String)> = Vec::new();
    for i in 0..24u16 {
        let (region, j) = [(US, 0), (US, 1), (EU_WEST, 0), (EU_WEST, 1)][usize::from(i % 4)];
        let client = cluster.node_client(region, j).await;
        let row = Row::new("default", format!("k{i}"));
        let ack = client.put(&row, format!("v{i}").into_bytes(), local.clone()).await.expect("put");
        assert_eq!(ack.home_region, US);
        written.push((row, format!("v{i}")));
    }
    for i in 0..12u16 {
        let (region, locality) = if i % 2 == 0 { (EU_WEST, "FR") } else { (EU_CENTRAL, "DE") };
        let client = cluster.node_client(region, i % 2).await;
        let row = Row::new("eu_users", format!("p{i}")).locality(locality);
        client.put(&row, format!("eu{i}").into_bytes(), eventual.clone()).await.expect("eu put");
        written.push((row, format!("eu{i}")));
    }
    let counter = Row::new("default", "visits");
    for (n, (region, j)) in REGIONS.iter().flat_map(|r| [(*r, 0u16), (*r, 1u16)]).enumerate() {
        let client = cluster.node_client(region, j).await;
        client.counter_add(&counter, n as i64 + 1, eventual.clone()).await.expect("counter add");
    }

    let report = cluster.wait_converged(CONVERGE_LIMIT).await;
    let zones = report["zones"].as_array().expect("zones");
    let default_zone = zones.iter().find(|z| z["table"] == "default").expect("default table digest");
    let regions = default_zone["regions"].as_array().expect("regions");
    assert_eq!(regions.len(), REGIONS.len(), "every region holds the default table: {default_zone}");
    assert!(regions.iter().all(|r| r["rows"] == 25), "24 rows and a counter everywhere: {default_zone}");
    let audit = cluster.cli_json(&["residency", "audit"]).await;
    assert_eq!(audit["violations"].as_array().map(Vec::len), Some(0), "{audit}");
    assert_eq!(audit["rows_checked"], 25 * 4 + 12 * 2, "both nodes of every region were read: {audit}");

    // Every node stores only rows of partitions it owns, as printed; each
    // region's two nodes together hold every row.
    for region in REGIONS {
        let mut rows = 0;
        for j in 0..2u16 {
            let node = format!("n{}", j + 1);
            let digest = cluster.node_client(region, j).await.node_digest().await.expect("node digest");
            for p in &digest.partitions {
                assert!(
                    owners[&(region.to_string(), node.clone())].contains(&u64::from(p.partition)),
                    "{region}/{node} stores rows of partition {} it does not own",
                    p.partition
                );
                rows += p.rows;
            }
        }
        let want = if region.starts_with("eu-") { 25 + 12 } else { 25 };
        assert_eq!(rows, want, "{region} holds every row once over its two nodes");
    }

    // The CLI's locate names the owner; reads through any node see every
    // row (routed to the owner), and the counter is exact everywhere.
    for (row, value) in written.iter().step_by(5) {
        let key = text(&row.key);
        let mut args = vec!["locate", &key, "--table", &row.table];
        if row.table == "eu_users" {
            args.extend(["--locality", "FR"]);
        }
        let at = cluster.cli_json(&args).await;
        let partition = at["partition"].as_u64().expect("partition");
        for replica in at["replicas"].as_array().expect("replicas") {
            let region = replica["region"].as_str().expect("region");
            let node = replica["node_id"].as_str().expect("node id");
            assert!(owners[&(region.to_string(), node.to_string())].contains(&partition), "{at}");
        }
        let regions: &[&str] = if row.table == "eu_users" { &[EU_WEST, EU_CENTRAL] } else { &REGIONS };
        for region in regions {
            for j in 0..2u16 {
                let got = cluster.node_client(region, j).await.get(row, ReadConsistency::Local).await;
                let got = got.unwrap_or_else(|e| panic!("get {key} via {region}/{j}: {e}"));
                let values: Vec<String> = got.siblings.iter().map(|s| text(&s.value)).collect();
                assert_eq!(values, vec![value.clone()], "{key} via {region} node {j}");
            }
        }
    }
    let total: i64 = (1..=8).sum();
    for region in REGIONS {
        for j in 0..2u16 {
            let deadline = Deadline::after(CONVERGE_LIMIT);
            let client = cluster.node_client(region, j).await;
            loop {
                let v = client.counter_get(&counter, ReadConsistency::Local).await.expect("count");
                if v == Some(total) {
                    break;
                }
                assert!(!deadline.passed(), "counter via {region}/{j} is {v:?}, want {total}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // A scan through either node of a region returns the rows of both, in order.
    for j in 0..2u16 {
        let page =
            cluster.node_client(EU_CENTRAL, j).await.scan("default", b"k", b"", 1000).await.expect("scan");
        let keys: Vec<String> = page.rows.iter().map(|r| text(&r.key)).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert_eq!(keys.len(), 24, "scan via eu-central-1 node {j}: {keys:?}");
        let first =
            cluster.node_client(EU_CENTRAL, j).await.scan("default", b"k", b"", 5).await.expect("scan page");
        assert_eq!(first.rows.len(), 5);
        assert_eq!(
            first.next_start_after.as_deref(),
            Some(sorted[4].as_bytes()),
            "pages continue after their last key"
        );
    }
}
