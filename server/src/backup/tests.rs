//! Backup files, a node's backup and restore over the in-memory engine.

use std::sync::Arc;

use super::file::{check, PieceWriter};
use super::*;
use crate::causality::{Hlc, SystemClock, VersionVector};
use crate::config::{Config, Level};
use crate::kv::{RowOp, RowRef, WriteOp, WriteRequest};
use crate::residency::Locality;
use crate::storage::memory::MemoryEngine;

fn config(dirs: &[(&str, &Path)]) -> Arc<Config> {
    let destinations: Vec<String> =
        dirs.iter().map(|(z, d)| format!("{{ zone = \"{z}\", dir = \"{}\" }}", d.display())).collect();
    let text = format!(
        r#"
        region = "eu-west-1"
        regions = [{{ name = "eu-west-1" }}, {{ name = "us-east-1" }}]
        zones = [{{ name = "eu", regions = ["eu-west-1"] }}]
        [[tables]]
        name = "default"
        default_home_region = "us-east-1"
        [[tables]]
        name = "eu_users"
        zone = "eu"
        default_home_region = "eu-west-1"
        [backup]
        piece_bytes_max = 4096
        destinations = [{}]
        "#,
        destinations.join(", ")
    );
    Arc::new(Config::from_toml(&text).unwrap().finish().unwrap())
}

fn node(cfg: Arc<Config>) -> Arc<Node> {
    Node::start(cfg, Arc::new(MemoryEngine::new()), Arc::new(Hlc::new(Arc::new(SystemClock), 500))).unwrap()
}

async fn put(node: &Node, table: &str, key: &str, value: &[u8]) {
    let req = WriteRequest {
        ops: vec![WriteOp {
            row: RowRef { table: table.into(), key: key.as_bytes().to_vec(), locality: Locality::Unset },
            op: RowOp::Put { value: value.to_vec(), context: VersionVector::default(), ttl_ms: 0 },
        }],
        level: Some(Level::Eventual),
        idempotency: None,
    };
    node.write(req).await.unwrap();
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn holds(dir: &Path, needle: &[u8]) -> bool {
    files_under(dir).iter().any(|p| std::fs::read(p).unwrap().windows(needle.len()).any(|w| w == needle))
}

#[tokio::test]
async fn each_zone_goes_to_its_own_folder_and_restores_into_a_fresh_node() {
    let root = tempfile::tempdir().unwrap();
    let (global, eu) = (root.path().join("global"), root.path().join("eu"));
    std::fs::create_dir_all(&global).unwrap();
    std::fs::create_dir_all(&eu).unwrap();
    let cfg = config(&[("", &global), ("eu", &eu)]);
    let source = node(cfg.clone());
    for i in 0..100 {
        put(&source, "default", &format!("g{i}"), format!("global-value-{i:04}").as_bytes()).await;
        put(&source, "eu_users", &format!("e{i}"), format!("eu-only-value-{i:04}").as_bytes()).await;
    }
    let part = create_node_part(&source, None, "b1").unwrap();
    assert_eq!(part.rows(), 200);
    assert!(part.files.len() > 2, "4 KiB pieces split each zone: {:?}", part.files);
    for f in &part.files {
        let dir = if f.zone.is_empty() { &global } else { &eu };
        assert!(dir.join(&f.path).is_file(), "{f:?}");
    }
    // The byte check: EU values only under the EU folder.
    assert!(holds(&eu, b"eu-only-value-0042"));
    assert!(!holds(&global, b"eu-only-value-"), "an EU row reached the unrestricted folder");
    assert!(holds(&global, b"global-value-0042"));

    let manifest = Manifest::assemble("b1", 1, vec![part]).unwrap();
    let parsed = Manifest::parse(&manifest.to_json()).unwrap();
    assert_eq!(parsed, manifest);
    let report = verify(&parsed, |p, z| p.zone_dirs.get(z).map(PathBuf::from)).unwrap();
    assert_eq!(report.rows, 200);

    let fresh = node(cfg.clone());
    let e = restore_node(&fresh, &parsed).await.unwrap_err();
    assert_eq!(e.reason(), "RESTORE_NOT_EMPTY", "a load needs the prepare first: {e}");
    prepare_restore(&fresh, &parsed).await.unwrap();
    // A load cut off part way (here: one row already in) can be prepared
    // and run again.
    let (table, key, row) = {
        let f = parsed.nodes[0].files.iter().find(|f| f.zone == "eu").unwrap();
        let mut first = None;
        check(&eu.join(&f.path), f, &mut |t, k, sealed| {
            if first.is_none() {
                first = Some((t.to_string(), k.to_vec(), Row::open(sealed, String::new).unwrap()));
            }
            Ok(())
        })
        .unwrap();
        first.unwrap()
    };
    fresh.restore_rows(vec![(table, key, row)]).await.unwrap();
    prepare_restore(&fresh, &parsed).await.unwrap();
    let restored = restore_node(&fresh, &parsed).await.unwrap();
    assert_eq!(restored.get("").copied(), Some(100));
    assert_eq!(restored.get("eu").copied(), Some(100));
    assert_eq!(
        fresh.stored_row("eu_users", b"e7").unwrap().map(|r| r.zone),
        Some("eu".to_string()),
        "restored rows keep their zone"
    );
    assert_eq!(fresh.stored_row("default", b"g7").unwrap(), source.stored_row("default", b"g7").unwrap());
    assert!(fresh.log_seq() >= 200, "restored rows are logged so they replicate");

    // A second restore into the now non-empty node is refused, at either phase.
    let again = restore_node(&fresh, &parsed).await.unwrap_err();
    assert_eq!(again.reason(), "RESTORE_NOT_EMPTY");
    let again = prepare_restore(&fresh, &parsed).await.unwrap_err();
    assert_eq!(again.reason(), "RESTORE_NOT_EMPTY");
}

#[tokio::test]
async fn a_missing_zone_destination_fails_the_backup_and_writes_nothing() {
    let root = tempfile::tempdir().unwrap();
    let global = root.path().join("global");
    std::fs::create_dir_all(&global).unwrap();
    let source = node(config(&[("", &global)]));
    put(&source, "default", "g", b"global").await;
    put(&source, "eu_users", "e", b"eu-secret").await;
    let e = create_node_part(&source, None, "b1").unwrap_err();
    assert_eq!(e.reason(), "BACKUP_DESTINATION_MISSING");
    assert!(e.to_string().contains("`eu`"), "{e}");
    assert!(files_under(&global).is_empty(), "nothing written: {:?}", files_under(&global));

    // A configured folder that does not exist fails the same way, and what
    // was made for the backup is removed again.
    let eu = root.path().join("eu-not-mounted");
    let source = node(config(&[("", &global), ("eu", &eu)]));
    put(&source, "eu_users", "e", b"eu-secret").await;
    let e = create_node_part(&source, None, "b2").unwrap_err();
    assert_eq!(e.reason(), "BACKUP_DESTINATION_MISSING");
    assert!(files_under(&global).is_empty() && !global.join("b2").exists());
}

#[tokio::test]
async fn corrupt_files_and_manifests_and_other_policies_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let (global, eu) = (root.path().join("global"), root.path().join("eu"));
    std::fs::create_dir_all(&global).unwrap();
    std::fs::create_dir_all(&eu).unwrap();
    let cfg = config(&[("", &global), ("eu", &eu)]);
    let source = node(cfg.clone());
    for i in 0..10 {
        put(&source, "eu_users", &format!("e{i}"), b"v").await;
    }
    let part = create_node_part(&source, None, "b1").unwrap();
    let manifest = Manifest::assemble("b1", 1, vec![part]).unwrap();

    let mut tampered = manifest.clone();
    tampered.nodes[0].files[0].rows += 1;
    let e = Manifest::parse(&serde_json::to_string(&tampered).unwrap()).unwrap_err();
    assert_eq!(e.reason(), "BACKUP_MISMATCH");

    let mut other_policy = manifest.clone();
    other_policy.policy_fingerprint = "0".repeat(32);
    other_policy.checksum = other_policy.compute_checksum();
    let e = prepare_restore(&node(cfg.clone()), &other_policy).await.unwrap_err();
    assert_eq!(e.reason(), "BACKUP_MISMATCH");

    // One flipped byte: verify and restore both refuse, and nothing is restored.
    let f = manifest.nodes[0].files.iter().find(|f| f.zone == "eu").unwrap();
    let path = eu.join(&f.path);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let e = verify(&manifest, |p, z| p.zone_dirs.get(z).map(PathBuf::from)).unwrap_err();
    assert_eq!(e.reason(), "BACKUP_CORRUPT");
    let fresh = node(cfg);
    let e = prepare_restore(&fresh, &manifest).await.unwrap_err();
    assert_eq!(e.reason(), "BACKUP_CORRUPT");
    assert!(fresh.stored_row("eu_users", b"e0").unwrap().is_none());
}

#[test]
fn a_row_of_another_zone_in_a_piece_is_corruption() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("b")).unwrap();
    let row = Row {
        home_region: "us-east-1".into(),
        zone: String::new(),
        epoch: 1,
        hlc: 1,
        value: crate::kv::row::RowValue::Counter(Default::default()),
    };
    // Written as if it were an EU file.
    let mut w = PieceWriter::new("eu", dir.path(), Path::new("b"), 1 << 20);
    w.append("default", b"k", &row.seal()).unwrap();
    let files = w.finish().unwrap();
    let e = check(&dir.path().join(&files[0].path), &files[0], &mut |_, _, _| Ok(())).unwrap_err();
    assert_eq!(e.reason(), "BACKUP_CORRUPT");
    assert!(e.to_string().contains("zone"), "{e}");
}

#[test]
fn restored_homes_take_the_highest_epoch_and_the_known_ends() {
    let part = |epoch, ended: Vec<EpochEnd>, cut_ms| NodePart {
        region: "r".into(),
        node_id: format!("n{epoch}"),
        store_uuid: String::new(),
        store_incarnation: 0,
        policy_fingerprint: "p".into(),
        cut_hlc: 0,
        cut_ms,
        log_head: 0,
        applied_from: vec![],
        homes: vec![HomeEpochs {
            home: "us".into(),
            holder: "us".into(),
            epoch,
            ended,
            pruned_through_epoch: 0,
            pruned_ended_ms_max: 0,
        }],
        zone_dirs: BTreeMap::new(),
        files: vec![],
    };
    let m = Manifest::assemble(
        "b",
        0,
        vec![
            part(2, vec![], 500),
            part(3, vec![EpochEnd { epoch: 2, holder: "us".into(), ended_ms: 400 }], 600),
        ],
    )
    .unwrap();
    let homes = restored_homes(&m);
    assert_eq!(homes.len(), 1);
    assert_eq!(homes[0].floor, 3);
    assert_eq!(homes[0].ended, vec![(2, "us".to_string(), 400), (3, "us".to_string(), 600)]);
}
