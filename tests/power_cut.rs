//! Acknowledged writes survive a power cut, not only `kill -9`: a node's
//! store on the fault filesystem (`geokv-faultfs`, docs/architecture.md
//! section 15), which drops every write not synced when the power is cut.
//! A `kill -9` keeps the page cache, so only a power cut can show a missing
//! sync; the second test shows it does, with the `missing-sync` put-back
//! bug.
//!
//! Needs FUSE (`/dev/fuse`, and root or `fusermount3`): without it these
//! tests fail with the mount's error, they do not skip.

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::NodeProcess;
use geokv_client::{ReadConsistency, Row, WriteOptions};
use geokv_faultfs::FaultFs;

/// Concurrent writers, so the committer groups their puts.
const WRITERS: usize = 8;
/// Acknowledged puts per writer.
const PUTS_PER_WRITER: usize = 25;
/// Longest wait for the killed node's files to be released before the cut.
const CUT_QUIET: Duration = Duration::from_secs(10);

fn mount(dir: &Path) -> FaultFs {
    FaultFs::mount(&dir.join("backing"), &dir.join("data")).unwrap_or_else(|e| {
        panic!("the power-cut tests need FUSE (/dev/fuse, and root or fusermount3 from the fuse3 package; scripts/deps installs it): {e}")
    })
}

/// Puts `WRITERS * PUTS_PER_WRITER` rows `<prefix>-<w>-<i>` concurrently;
/// every one must be acknowledged. Returns key -> value.
async fn acknowledged_puts(node: &NodeProcess, prefix: &str) -> BTreeMap<String, String> {
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let client = node.client().await;
        let prefix = prefix.to_string();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PUTS_PER_WRITER {
                let key = format!("{prefix}-{w}-{i:03}");
                let value = format!("value-{w}-{i}");
                client
                    .put(
                        &Row::new("default", key.clone()),
                        value.clone().into_bytes(),
                        WriteOptions::default(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("put {key}: {e}"));
                acked.push((key, value));
            }
            acked
        }));
    }
    let mut all = BTreeMap::new();
    for w in writers {
        let acked = tokio::time::timeout(Duration::from_secs(60), w).await.expect("writer stuck").unwrap();
        all.extend(acked);
    }
    assert_eq!(all.len(), WRITERS * PUTS_PER_WRITER);
    all
}

/// The acknowledged rows the node does not return (LOCAL reads).
async fn missing(node: &NodeProcess, acked: &BTreeMap<String, String>) -> Vec<String> {
    let client = node.client().await;
    let mut lost = Vec::new();
    for (key, value) in acked {
        let got = client.get(&Row::new("default", key.clone()), ReadConsistency::Local).await.unwrap();
        if got.values() != vec![value.clone().into_bytes()] {
            lost.push(key.clone());
        }
    }
    lost
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_puts_survive_a_power_cut() {
    let dir = tempfile::Builder::new().prefix("geokv-power-cut-").tempdir().unwrap();
    let fs = mount(dir.path());
    let mut node = NodeProcess::start_on(Path::new(common::GEOKV_BIN), &[], fs.mountpoint());
    let acked = acknowledged_puts(&node, "cut").await;

    node.kill_9();
    let report = fs.power_cut(CUT_QUIET).expect("power cut");
    // RocksDB's info log is never synced: the cut drops something, so it
    // is a real cut and not a no-op.
    assert!(report.bytes_dropped > 0, "the power cut dropped nothing: {report:?}");
    eprintln!("{} puts acknowledged; power cut: {report:?}", acked.len());

    node.restart();
    let lost = missing(&node, &acked).await;
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged puts lost in a power cut: {lost:?}",
        lost.len(),
        acked.len()
    );
    // Writes go on after the cut.
    let more = acknowledged_puts(&node, "after").await;
    assert!(missing(&node, &more).await.is_empty());
    drop(node);
}

/// Fault first: with `missing-sync` the committer acknowledges writes it
/// never synced. A `kill -9` keeps them (they are in the page cache), so
/// the crash test cannot see the bug; a power cut loses them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_sync_survives_kill_9_but_not_a_power_cut() {
    let dir = tempfile::Builder::new().prefix("geokv-power-cut-").tempdir().unwrap();
    let fs = mount(dir.path());
    let mut node =
        NodeProcess::start_on(&common::bugs_bin(), &[("GEOKV_BUG", "missing-sync")], fs.mountpoint());

    let before_kill = acknowledged_puts(&node, "kill").await;
    node.kill_9();
    node.restart();
    let lost = missing(&node, &before_kill).await;
    assert!(lost.is_empty(), "kill -9 lost {} unsynced puts; the page cache should keep them", lost.len());

    let before_cut = acknowledged_puts(&node, "cut").await;
    node.kill_9();
    let report = fs.power_cut(CUT_QUIET).expect("power cut");
    node.restart();
    let lost = missing(&node, &before_cut).await;
    eprintln!(
        "missing-sync: power cut {report:?}; {} of {} acknowledged puts lost",
        lost.len(),
        before_cut.len()
    );
    assert!(!lost.is_empty(), "with missing-sync a power cut lost no acknowledged put ({report:?})");
    drop(node);
}
