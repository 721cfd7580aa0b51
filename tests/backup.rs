//! Zone-strict backup and restore against real `geokv dev` clusters
//! (docs/decisions/029-zone-strict-backups.md): a backup taken while two
//! writers keep writing holds every write acknowledged before
//! `geokv backup create` was issued, restores into a second, fresh cluster
//! where every such write reads back, and the raw bytes of the
//! unrestricted (non-EU) destination hold no EU row, while the EU
//! destination does (the positive control of the byte scan). A backup
//! whose EU destination is missing fails with `BACKUP_DESTINATION_MISSING`
//! and writes no EU row anywhere.

use crate::common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{home_lease, DevCluster, Options};
use common::Deadline;
use geokv_client::{Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_CENTRAL: &str = "eu-central-1";
const EU_WEST: &str = "eu-west-1";
const AP: &str = "ap-southeast-1";
/// How long the writers run before the backup is issued.
const WARM_UP: Duration = Duration::from_millis(1500);
/// Writes per writer at most (bounds the loops with the deadline below).
const WRITES_MAX: usize = 5_000;
/// Longest a writer runs in all.
const WRITER_LIMIT: Duration = Duration::from_secs(120);

/// A marker value for `tag` (`common::marker`).
fn marker(tag: u64) -> Vec<u8> {
    common::marker(&tag.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes())
}

/// One acknowledged write.
#[derive(Clone)]
struct Acked {
    row: Row,
    value: Vec<u8>,
    /// When the acknowledgement arrived.
    at: Instant,
}

fn backup_config(global: &Path, eu: Option<&Path>) -> String {
    let mut dest = vec![format!("{{ zone = \"\", dir = \"{}\" }}", global.display())];
    if let Some(eu) = eu {
        dest.push(format!("{{ zone = \"eu\", dir = \"{}\" }}", eu.display()));
    }
    // Both clusters hash subjects with one key, so the erasure ledger of the
    // source applies to the restored one.
    format!(
        "\n[backup]\npiece_bytes_max = 65536\ndestinations = [{}]\n\n[lifecycle]\nsubject_key = \"{}\"\n",
        dest.join(", "),
        "5e".repeat(32)
    )
}

/// Writes rows until `stop` (or the bounds), returning each acknowledged
/// write. `eu` picks the table: `eu_users` homed in eu-central-1 (zone
/// `eu`), else `default` homed in us-east-1 (no zone).
async fn writer(cluster_client: geokv_client::Client, eu: bool, stop: Arc<AtomicBool>) -> Vec<Acked> {
    let mut acked = Vec::new();
    let deadline = Deadline::after(WRITER_LIMIT);
    let opts =
        WriteOptions::default().consistency(if eu { Consistency::Eventual } else { Consistency::Local });
    for i in 0..WRITES_MAX {
        if stop.load(Ordering::Acquire) || deadline.passed() {
            break;
        }
        let (row, value) = if eu {
            (Row::new("eu_users", format!("eu-{i}")).locality("DE"), marker(2 * i as u64 + 1))
        } else {
            (Row::new("default", format!("g-{i}")), marker(2 * i as u64))
        };
        if cluster_client.put(&row, value.clone(), opts.clone()).await.is_ok() {
            acked.push(Acked { row, value, at: Instant::now() });
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_write_load_restores_every_acknowledged_write_and_keeps_eu_rows_out_of_other_destinations(
) {
    let root = tempfile::Builder::new().prefix("geokv-backup-it-").tempdir().expect("temp dir");
    let (global, eu) = (root.path().join("dest-global"), root.path().join("dest-eu"));
    std::fs::create_dir_all(&global).unwrap();
    std::fs::create_dir_all(&eu).unwrap();
    let extra = backup_config(&global, Some(&eu));
    let catalog = root.path().join("catalog").join("nightly-1");
    let catalog_arg = catalog.to_str().unwrap().to_string();

    let source = DevCluster::start_with(Options { extra_config: extra.clone(), ..Options::scale(0.1) }).await;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    // Two data subjects: `gone` is erased after the backup, `kept` is not.
    let subject_rows = |s: &str| {
        [
            (Row::new("default", format!("{s}:profile")).home(US), marker(9_000_001 + s.len() as u64)),
            (Row::new("eu_users", format!("{s}:address")).locality("DE"), marker(9_000_101 + s.len() as u64)),
        ]
    };
    let (gone, kept) = (subject_rows("gone"), subject_rows("kept!"));
    for (row, value) in gone.iter().chain(kept.iter()) {
        let client = source.client(if row.table == "eu_users" { EU_CENTRAL } else { US }).await;
        client.put(row, value.clone(), WriteOptions::default()).await.expect("subject row");
    }
    let us_writer = tokio::spawn(writer(source.client(US).await, false, stop.clone()));
    let eu_writer = tokio::spawn(writer(source.client(EU_CENTRAL).await, true, stop.clone()));
    tokio::time::sleep(WARM_UP).await;

    // The cut: every write acknowledged before this instant must be in the backup.
    let issued = Instant::now();
    let out = source.cli(&["backup", "create", "--to", &catalog_arg, "--json"]).await;
    let backup_took = issued.elapsed();
    // The writers go on a little past the backup, then stop.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Release);
    let us_acked = us_writer.await.expect("us writer");
    let eu_acked = eu_writer.await.expect("eu writer");
    let created: serde_json::Value = serde_json::from_str(&out.ok()).expect("backup create prints JSON");
    let before = |w: &Vec<Acked>| w.iter().filter(|a| a.at < issued).cloned().collect::<Vec<_>>();
    let (us_before, eu_before) = (before(&us_acked), before(&eu_acked));
    let during = us_acked.len() + eu_acked.len() - us_before.len() - eu_before.len();
    eprintln!(
        "backup took {backup_took:?}; writes acknowledged before it: {} default, {} eu_users; {during} more during and after it; {created}",
        us_before.len(),
        eu_before.len(),
    );
    assert!(
        us_before.len() >= 10 && eu_before.len() >= 10,
        "the writers made too few writes before the backup"
    );
    assert!(during > 0, "no write ran concurrently with the backup");
    assert_eq!(created["nodes"].as_array().map(Vec::len), Some(4), "every node has a part: {created}");

    // The byte scan: no EU value in the non-EU destination; and, as its
    // positive control, every EU value in the EU destination and every
    // unrestricted value in the unrestricted one.
    let eu_values: Vec<Vec<u8>> = eu_before.iter().map(|a| a.value.clone()).collect();
    let us_values: Vec<Vec<u8>> = us_before.iter().map(|a| a.value.clone()).collect();
    let leaked = common::found_in(&global, &eu_values);
    assert!(leaked.is_empty(), "{} EU rows are in the non-EU destination {}", leaked.len(), global.display());
    assert_eq!(
        common::found_in(&eu, &eu_values).len(),
        eu_values.len(),
        "the scan finds every EU value in the EU destination"
    );
    assert_eq!(
        common::found_in(&global, &us_values).len(),
        us_values.len(),
        "the scan finds every unrestricted value"
    );
    let verified = source.cli_json(&["backup", "verify", "--from", &catalog_arg]).await;
    assert_eq!(verified["ok"], true, "{verified}");
    eprintln!("verify: {verified}");

    let all_eu: Vec<Vec<u8>> = eu_acked.iter().map(|a| a.value.clone()).collect();
    assert!(
        common::found_in(&global, &all_eu).is_empty(),
        "an EU row written during the backup reached the non-EU destination"
    );
    let manifest_text = std::fs::read_to_string(catalog.join("manifest.json")).expect("manifest written");
    let as_bytes = manifest_text.as_bytes();
    assert!(
        all_eu.iter().chain(&us_values).all(|v| !as_bytes.windows(v.len()).any(|w| w == v.as_slice())),
        "the manifest holds no row data"
    );
    let manifest: serde_json::Value = serde_json::from_str(&manifest_text).unwrap();
    let epoch_max = |home: &str| {
        manifest["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| n["homes"].as_array().cloned().unwrap_or_default())
            .filter(|h| h["home"] == home)
            .map(|h| h["epoch"].as_u64().unwrap())
            .max()
            .unwrap_or(0)
    };
    let backup_epoch = epoch_max(US);
    assert!(backup_epoch >= 1, "the manifest records the home epochs: {manifest_text}");
    // After the backup, `gone` is erased in the source: the backup still
    // holds its values, the erasure ledger in the destinations says so.
    let gone_values: Vec<Vec<u8>> = gone.iter().map(|(_, v)| v.clone()).collect();
    let in_backup = common::found_in(&global, &gone_values).len() + common::found_in(&eu, &gone_values).len();
    assert_eq!(in_backup, gone_values.len(), "the backup holds the subject's values (positive control)");
    let erased = source.cli_json(&["subject", "erase", "gone"]).await;
    assert_eq!(erased["receipts"].as_array().map(Vec::len), Some(4), "{erased}");
    drop(source);

    // A fresh cluster with the same policy and destinations.
    let fresh = DevCluster::start_with(Options { extra_config: extra, ..Options::scale(0.1) }).await;
    let restore_started = Instant::now();
    let restored = fresh.cli_json(&["backup", "restore", "--from", &catalog_arg]).await;
    eprintln!("restore took {:?}: {restored}", restore_started.elapsed());
    let zone_rows = |region: &str, zone: &str| {
        restored["restored"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["region"] == region && r["zone"] == zone)
            .and_then(|r| r["rows"].as_u64())
            .unwrap_or(0)
    };
    assert!(zone_rows(US, "") >= us_before.len() as u64, "{restored}");
    assert!(zone_rows(EU_CENTRAL, "eu") >= eu_before.len() as u64, "{restored}");
    assert_eq!(zone_rows(US, "eu"), 0, "us-east-1 restores no EU row: {restored}");

    // Every write acknowledged before the backup was issued reads back, at its home.
    let us = fresh.client(US).await;
    let euc = fresh.client(EU_CENTRAL).await;
    for (client, acked) in [(&us, &us_before), (&euc, &eu_before)] {
        for a in acked.iter() {
            let got = client.get(&a.row, ReadConsistency::Local).await.expect("read after restore");
            assert!(
                got.values().contains(&a.value),
                "{:?}: the write acknowledged before the backup is missing after the restore",
                a.row
            );
        }
    }
    // The restored copies converge in every region that may hold them.
    fresh.wait_converged(Duration::from_secs(60)).await;

    // The subject erased after the backup is still erased after the
    // restore (reads and every byte of every store); the other one is back.
    for ((row, value), client) in gone.iter().zip([&us, &euc]) {
        let got = client.get(row, ReadConsistency::Local).await.expect("read after restore");
        assert!(!got.found, "{row:?}: the erased subject came back with the restore: {:?}", got.values());
        for region in [US, EU_WEST, EU_CENTRAL, AP] {
            let dir = fresh.store_dir(region);
            assert!(
                common::found_in(&dir, std::slice::from_ref(value)).is_empty(),
                "{region}: the erased subject's value is in the restored store {}",
                dir.display()
            );
        }
    }
    for ((row, value), client) in kept.iter().zip([&us, &euc]) {
        let got = client.get(row, ReadConsistency::Local).await.expect("read after restore");
        assert!(got.values().contains(value), "{row:?}: the subject not erased is missing after the restore");
    }

    // Epochs moved above the backup's, and the cluster takes writes.
    let deadline = Deadline::after(Duration::from_secs(30));
    loop {
        let epoch = home_lease(&us, US).await.map(|h| h.epoch).unwrap_or(0);
        if epoch > backup_epoch {
            break;
        }
        assert!(!deadline.passed(), "home {US} is at epoch {epoch}, not above the backup's {backup_epoch}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    us.put(&Row::new("default", "after-restore"), b"new".to_vec(), WriteOptions::default())
        .await
        .expect("a write after the restore");

    // A second restore into the now non-empty cluster is refused.
    fresh.cli(&["backup", "restore", "--from", &catalog_arg]).await.assert_reason("RESTORE_NOT_EMPTY");

    // One flipped byte in one EU file: verify fails, naming the file.
    let piece = common::files_under(&eu)
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "gkb"))
        .expect("an EU piece");
    let mut bytes = std::fs::read(&piece).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&piece, &bytes).unwrap();
    let out = fresh.cli(&["backup", "verify", "--from", &catalog_arg]).await;
    out.assert_reason("BACKUP_CORRUPT");
    eprintln!("corrupt file caught: {}", out.stderr.trim());
    eprintln!("whole test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_without_an_eu_destination_fails_and_writes_no_eu_row_anywhere() {
    let root = tempfile::Builder::new().prefix("geokv-backup-it-").tempdir().expect("temp dir");
    let global = root.path().join("dest-global");
    std::fs::create_dir_all(&global).unwrap();
    let cluster =
        DevCluster::start_with(Options { extra_config: backup_config(&global, None), ..Options::scale(0.1) })
            .await;
    let eu = cluster.client(EU_CENTRAL).await;
    let us = cluster.client(US).await;
    let mut eu_values = Vec::new();
    for i in 0..20u64 {
        let v = marker(1000 + i);
        eu.put(
            &Row::new("eu_users", format!("secret-{i}")).locality("DE"),
            v.clone(),
            WriteOptions::default(),
        )
        .await
        .expect("eu put");
        eu_values.push(v);
        us.put(&Row::new("default", format!("open-{i}")), marker(2000 + i), WriteOptions::default())
            .await
            .expect("us put");
    }
    // Positive control: the scan finds the EU values where they are stored.
    let deadline = Deadline::after(Duration::from_secs(30));
    while common::found_in(&cluster.store_dir(EU_CENTRAL), &eu_values).len() < eu_values.len() {
        assert!(!deadline.passed(), "the EU values never showed in eu-central-1's store");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let catalog = root.path().join("catalog").join("b-missing");
    let out = cluster.cli(&["backup", "create", "--to", catalog.to_str().unwrap()]).await;
    out.assert_reason("BACKUP_DESTINATION_MISSING");
    eprintln!("refused as expected: {}", out.stderr.trim());
    assert!(out.stderr.contains("eu"), "the error names the zone: {}", out.stderr);
    assert!(!catalog.join("manifest.json").exists(), "a failed backup writes no manifest");
    let leaked = common::found_in(&global, &eu_values);
    assert!(leaked.is_empty(), "{} EU rows were written to the non-EU destination", leaked.len());
    for f in common::files_under(&global) {
        let path = f.display().to_string();
        assert!(!path.contains("eu-west-1") && !path.contains("eu-central-1"), "an EU node wrote {path}");
    }
}

/// With two nodes per region each region's node fans the backup and the
/// restore out to its other node: the manifest has a part per node, and
/// every row reads back after a restore into a fresh two-node cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_per_region_are_backed_up_and_restored_node_by_node() {
    let root = tempfile::Builder::new().prefix("geokv-backup-it-").tempdir().expect("temp dir");
    let (global, eu) = (root.path().join("dest-global"), root.path().join("dest-eu"));
    std::fs::create_dir_all(&global).unwrap();
    std::fs::create_dir_all(&eu).unwrap();
    let extra = backup_config(&global, Some(&eu));
    let options = Options { extra_config: extra, nodes_per_region: 2, ..Options::scale(0.1) };
    let catalog = root.path().join("catalog").join("two-nodes");
    let catalog_arg = catalog.to_str().unwrap().to_string();

    let source = DevCluster::start_with(options.clone()).await;
    let us = source.client(US).await;
    let euc = source.client(EU_CENTRAL).await;
    let mut written = Vec::new();
    for i in 0..60u64 {
        let (row, client) = if i % 2 == 0 {
            (Row::new("default", format!("k-{i}")), &us)
        } else {
            (Row::new("eu_users", format!("k-{i}")).locality("DE"), &euc)
        };
        let value = marker(3000 + i);
        client.put(&row, value.clone(), WriteOptions::default()).await.expect("put");
        written.push((row, value));
    }
    let created = source.cli_json(&["backup", "create", "--to", &catalog_arg]).await;
    let nodes = created["nodes"].as_array().cloned().unwrap_or_default();
    assert_eq!(nodes.len(), 8, "a part per node: {created}");
    assert!(nodes.iter().all(|n| n["node_id"] == "n1" || n["node_id"] == "n2"), "{created}");
    let eu_values: Vec<Vec<u8>> =
        written.iter().filter(|(r, _)| r.table == "eu_users").map(|(_, v)| v.clone()).collect();
    assert!(common::found_in(&global, &eu_values).is_empty(), "an EU row is in the non-EU destination");
    assert_eq!(
        common::found_in(&eu, &eu_values).len(),
        eu_values.len(),
        "positive control: every EU value in the EU destination"
    );
    drop(source);

    let fresh = DevCluster::start_with(options).await;
    let restored = fresh.cli_json(&["backup", "restore", "--from", &catalog_arg]).await;
    assert!(restored["rows"].as_u64().unwrap_or(0) > 0, "{restored}");
    eprintln!("two nodes per region: {} parts, restored {restored}", nodes.len());
    let us = fresh.client(US).await;
    let euc = fresh.client(EU_CENTRAL).await;
    for (row, value) in &written {
        let client = if row.table == "eu_users" { &euc } else { &us };
        let got = client.get(row, ReadConsistency::Local).await.expect("read after restore");
        assert!(got.values().contains(value), "{row:?} is missing after the restore");
    }
}
