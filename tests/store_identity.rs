//! Store identity, as a user of a `geokv dev` cluster sees it
//! (docs/architecture.md section 16): a node whose data directory is wiped
//! (a lost or replaced disk) comes back as a new incarnation of its store.
//!
//! - its new writes reach every region, new rows and rows other regions
//!   already hold (never dropped as duplicates of the old incarnation's);
//! - it is re-seeded by anti-entropy: the rows it had come back, digests
//!   match;
//! - no Raft member's stored vote goes back, so none votes twice in a term
//!   (every vote a node stores is logged, and the logs outlive the wipe).

use crate::common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::cluster::{DevCluster, Options, REGIONS};
use common::Deadline;
use geokv_client::{Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_CENTRAL: &str = "eu-central-1";
const ROWS: u32 = 40;
const REACH_LIMIT: Duration = Duration::from_secs(60);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Polls every region until `row` holds `value` among its siblings.
async fn wait_everywhere(cluster: &DevCluster, row: &Row, value: &str) -> Result<(), String> {
    let deadline = Deadline::after(REACH_LIMIT);
    for region in REGIONS {
        let client = cluster.client(region).await;
        loop {
            let got = client.get(row, ReadConsistency::Local).await;
            let values: Vec<String> = match &got {
                Ok(g) => g.siblings.iter().map(|s| text(&s.value)).collect(),
                Err(_) => Vec::new(),
            };
            if values.iter().any(|v| v == value) {
                break;
            }
            if deadline.passed() {
                return Err(format!(
                    "{} in {region} is {values:?} (or {:?}), not {value:?}, {REACH_LIMIT:?} after the write",
                    text(&row.key),
                    got.err()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_comes_back_as_a_new_incarnation() {
    let mut cluster = DevCluster::start_with(Options {
        partitions: 16,
        extra_config: "[replication]\nunhealthy_after_misses = 20\n".into(),
        ..Options::scale(0.1)
    })
    .await;
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);

    // Before the wipe: eu-central-1 and us-east-1 each write rows; every
    // region has them all.
    for region in [EU_CENTRAL, US] {
        let client = cluster.client(region).await;
        for i in 0..ROWS {
            client
                .put(&Row::new("default", format!("{region}-{i}")), b"old".to_vec(), eventual.clone())
                .await
                .unwrap_or_else(|e| panic!("write {region}-{i}: {e:?}"));
        }
    }
    cluster.wait_converged(REACH_LIMIT).await;

    cluster.wipe(EU_CENTRAL).await;
    cluster.wait_links_up().await;

    // After the wipe: writes made through eu-central-1, to new rows and to a
    // row every region already holds, reach every region.
    let central = cluster.client(EU_CENTRAL).await;
    let fresh = Row::new("default", "after-wipe");
    central.put(&fresh, b"new".to_vec(), eventual.clone()).await.expect("write after the wipe");
    let existing = Row::new("default", format!("{US}-0"));
    central.put(&existing, b"new".to_vec(), eventual.clone()).await.expect("overwrite after the wipe");
    let mut failures = Vec::new();
    for row in [&fresh, &existing] {
        if let Err(why) = wait_everywhere(&cluster, row, "new").await {
            failures.push(format!("new write lost: {why}"));
        }
    }

    // The wiped node is re-seeded: the rows written before the wipe, by
    // either region, are back on it.
    for region in [US, EU_CENTRAL] {
        let row = Row::new("default", format!("{region}-{}", ROWS - 1));
        let got = central.get(&row, ReadConsistency::Local).await;
        let deadline = Deadline::after(REACH_LIMIT);
        let mut got = got.map(|g| g.siblings.len()).unwrap_or(0);
        while got == 0 && !deadline.passed() {
            tokio::time::sleep(Duration::from_millis(250)).await;
            got = central.get(&row, ReadConsistency::Local).await.map(|g| g.siblings.len()).unwrap_or(0);
        }
        if got == 0 {
            failures.push(format!("the wiped node never got {} back", text(&row.key)));
        }
    }
    if failures.is_empty() {
        cluster.wait_converged(REACH_LIMIT).await;
        for i in 0..ROWS {
            for region in [US, EU_CENTRAL] {
                let row = Row::new("default", format!("{region}-{i}"));
                let got = central.get(&row, ReadConsistency::Local).await.expect("read on the wiped node");
                assert!(!got.siblings.is_empty(), "{} missing on the wiped node", text(&row.key));
            }
        }
    }

    // No member's stored vote ever went back (openraft votes for a leader
    // id, (term, candidate), and a member's vote only goes up in that
    // order): the wiped one across its wipe included, so it voted at most
    // once for each leader id and never again in a term it had left.
    let votes = cluster.stored_votes();
    let mut last: BTreeMap<(String, String), (u64, u64, bool)> = BTreeMap::new();
    for v in &votes {
        let now = (v.term, v.voted_for, v.committed);
        let prev = last.entry((v.node.clone(), v.group.clone())).or_insert(now);
        if now < *prev {
            failures.push(format!(
                "{} voted again in term {} of {} ({now:?} after {prev:?})",
                v.node, v.term, v.group
            ));
        }
        *prev = (*prev).max(now);
    }
    assert!(
        votes.iter().any(|v| v.node == format!("{EU_CENTRAL}/n1")),
        "no vote of the wiped node was logged"
    );
    eprintln!("{} stored votes read from the node logs", votes.len());
    assert!(failures.is_empty(), "after wiping {EU_CENTRAL}:\n{}", failures.join("\n"));
}

/// A node started with another table config refuses to join: every link
/// to and from it fails with `CONFIG_MISMATCH` naming the table, shown in
/// `geokv replication status`, and no row crosses between it and the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_another_table_config_refuses_to_join_naming_the_difference() {
    const AP: &str = "ap-southeast-1";
    let mut cluster = DevCluster::start_with(Options { partitions: 16, ..Options::scale(0.1) }).await;
    cluster.kill_9(AP);
    let config = cluster.node_config(AP);
    let mut text = std::fs::read_to_string(&config).expect("read node.toml");
    text.push_str("\n[[tables]]\nname = \"only_here\"\n");
    std::fs::write(&config, text).expect("write node.toml");
    cluster.restart(AP).await;

    let deadline = Deadline::after(Duration::from_secs(30));
    let mismatch = |l: &serde_json::Value| {
        let e = l["last_error"].as_str().unwrap_or("");
        e.contains("CONFIG_MISMATCH") && e.contains("table only_here")
    };
    loop {
        let status = cluster.cli_json(&["replication", "status"]).await;
        let links = status["links"].as_array().cloned().unwrap_or_default();
        let from_us = links.iter().any(|l| l["source"] == US && l["destination"] == AP && mismatch(l));
        let from_ap = links.iter().any(|l| l["source"] == AP && l["destination"] == US && mismatch(l));
        if from_us && from_ap {
            eprintln!(
                "refused both ways: {}",
                links.iter().find(|l| l["source"] == US && l["destination"] == AP).unwrap()["last_error"]
            );
            break;
        }
        assert!(!deadline.passed(), "no CONFIG_MISMATCH naming the table in the links' errors: {status}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Nothing crosses: a write at the odd node stays there, and the rest's
    // writes do not reach it.
    let eventual = WriteOptions::default().consistency(Consistency::Eventual);
    let at_ap = Row::new("default", "written-at-ap");
    cluster.client(AP).await.put(&at_ap, b"x".to_vec(), eventual.clone()).await.expect("write at ap");
    let at_us = Row::new("default", "written-at-us");
    cluster.client(US).await.put(&at_us, b"y".to_vec(), eventual).await.expect("write at us");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let us = cluster.client(US).await.get(&at_ap, ReadConsistency::Local).await.expect("read at us");
    assert!(us.siblings.is_empty(), "a row written at the refused node reached us-east-1");
    let ap = cluster.client(AP).await.get(&at_us, ReadConsistency::Local).await.expect("read at ap");
    assert!(ap.siblings.is_empty(), "a row reached the refused node");
}
