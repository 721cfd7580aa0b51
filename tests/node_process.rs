//! A real `geokv node` process: the command line round-trips data, a clean
//! stop and a crash (`kill -9`) both keep every acknowledged write.

use crate::common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Deadline, NodeProcess};
use geokv_client::{ReadConsistency, Row, WriteOptions};

#[test]
fn cli_put_then_get_round_trips() {
    let node = NodeProcess::start();
    assert!(node.log().contains("node serving"), "the node did not log `node serving`:\n{}", node.log());

    let put = node.cli(&["put", "greeting", "hello world"]).ok();
    assert!(put.starts_with("OK"), "put printed {put:?}");
    assert_eq!(node.cli(&["get", "greeting"]).ok(), "hello world");

    // A key never written reads as not found, and is not an error.
    assert_eq!(node.cli(&["get", "nobody"]).ok(), "(not found)");

    // The JSON form carries one sibling with the value and a context.
    let json: serde_json::Value =
        serde_json::from_str(&node.cli(&["get", "greeting", "--json"]).ok()).unwrap();
    assert_eq!(json["found"], true);
    assert_eq!(json["siblings"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(json["siblings"][0]["value"], "hello world");
    assert!(!json["context"].as_str().unwrap().is_empty(), "{json}");

    // Deleting makes it not found again.
    node.cli(&["del", "greeting"]).ok();
    assert_eq!(node.cli(&["get", "greeting"]).ok(), "(not found)");
}

#[test]
fn sigterm_then_restart_keeps_data() {
    let mut node = NodeProcess::start();
    node.cli(&["put", "k1", "v1"]).ok();
    node.cli(&["put", "k2", "v2"]).ok();
    assert_eq!(node.cli(&["sadd", "s", "a", "b"]).ok(), "a\nb");

    let status = node.terminate();
    assert!(status.success(), "node exited with {status} after SIGTERM:\n{}", node.log());
    // The stopped node no longer answers.
    let refused = node.cli(&["get", "k1", "--timeout-ms", "500"]);
    assert!(!refused.status.success(), "a stopped node answered: {}", refused.stdout);

    node.restart();
    assert_eq!(node.cli(&["get", "k1"]).ok(), "v1");
    assert_eq!(node.cli(&["get", "k2"]).ok(), "v2");
    assert_eq!(node.cli(&["smembers", "s"]).ok(), "a\nb");
    let scan = node.cli(&["scan", "k"]).ok();
    assert_eq!(scan, "k1\tv1\nk2\tv2");

    // A second clean cycle: still there, and writes continue to work.
    node.cli(&["put", "k3", "v3"]).ok();
    assert!(node.terminate().success());
    node.restart();
    assert_eq!(node.cli(&["get", "k3"]).ok(), "v3");
}

/// Writers in flight when the node is killed.
const WRITERS: usize = 8;
/// Acknowledged puts after which the node is killed.
const ACKS_BEFORE_KILL: usize = 200;
/// Puts each writer attempts at most: enough that writes are still in
/// flight when the kill lands.
const PUTS_PER_WRITER_MAX: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_after_acknowledged_puts_loses_none() {
    let mut node = NodeProcess::start();
    let acked: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let ack_count = Arc::new(AtomicUsize::new(0));
    let enough = Arc::new(tokio::sync::Notify::new());

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        // One connection per writer: concurrent clients, not one multiplexed one.
        let client = node.client().await;
        let (acked, ack_count, enough) = (acked.clone(), ack_count.clone(), enough.clone());
        writers.push(tokio::spawn(async move {
            let mut failures = 0usize;
            for i in 0..PUTS_PER_WRITER_MAX {
                let key = format!("crash-{w}-{i:03}");
                let value = format!("value-{w}-{i}");
                match client
                    .put(
                        &Row::new("default", key.clone()),
                        value.clone().into_bytes(),
                        WriteOptions::default(),
                    )
                    .await
                {
                    Ok(_) => {
                        acked.lock().unwrap().insert(key, value);
                        if ack_count.fetch_add(1, Ordering::SeqCst) + 1 == ACKS_BEFORE_KILL {
                            enough.notify_one();
                        }
                    }
                    // The node is gone: the write may or may not have landed,
                    // and it was never acknowledged.
                    Err(_) => {
                        failures += 1;
                        break;
                    }
                }
            }
            failures
        }));
    }

    tokio::time::timeout(Duration::from_secs(60), enough.notified())
        .await
        .expect("200 puts were not acknowledged within 60 s");
    node.kill_9();

    let mut failed_writers = 0;
    for w in writers {
        failed_writers +=
            tokio::time::timeout(Duration::from_secs(30), w).await.expect("writer stuck").unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= ACKS_BEFORE_KILL);
    eprintln!("{} puts acknowledged before kill -9; {failed_writers} writers saw the crash", acked.len());

    node.restart();
    let client = node.client().await;
    let mut lost = Vec::new();
    for (key, value) in &acked {
        let got = client.get(&Row::new("default", key.clone()), ReadConsistency::Local).await.unwrap();
        if got.values() != vec![value.clone().into_bytes()] {
            lost.push(format!("{key}: expected {value:?}, found {:?}", got.values()));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged puts lost after kill -9:\n{}",
        lost.len(),
        acked.len(),
        lost.join("\n")
    );

    // A scan agrees: every acknowledged key is listed.
    let page = client.scan("default", b"crash-", b"", 1000).await.unwrap();
    let scanned: std::collections::BTreeSet<String> =
        page.rows.iter().map(|r| String::from_utf8(r.key.clone()).unwrap()).collect();
    for key in acked.keys() {
        assert!(scanned.contains(key), "scan after restart misses acknowledged key {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counter_is_exact_after_kill_9() {
    let mut node = NodeProcess::start();
    assert_eq!(node.cli(&["incr", "visits", "7"]).ok(), "7");
    assert_eq!(node.cli(&["incr", "visits", "-2"]).ok(), "5");

    // Concurrent adds of 1..=40 from separate connections.
    let mut tasks = Vec::new();
    for delta in 1..=40i64 {
        let client = node.client().await;
        tasks.push(tokio::spawn(async move {
            client
                .counter_add(&Row::new("default", "visits"), delta, WriteOptions::default())
                .await
                .map(|(v, _)| v)
        }));
    }
    let deadline = Deadline::after(Duration::from_secs(60));
    for t in tasks {
        assert!(!deadline.passed(), "counter adds took longer than {:?}", deadline.limit());
        tokio::time::timeout(Duration::from_secs(30), t).await.expect("add stuck").unwrap().unwrap();
    }
    let expected = 5 + (1..=40i64).sum::<i64>();
    assert_eq!(node.cli(&["count", "visits"]).ok(), expected.to_string());

    node.kill_9();
    node.restart();
    assert_eq!(node.cli(&["count", "visits"]).ok(), expected.to_string());
    let client = node.client().await;
    assert_eq!(
        client.counter_get(&Row::new("default", "visits"), ReadConsistency::Local).await.unwrap(),
        Some(expected)
    );
    // And it keeps counting from there.
    assert_eq!(node.cli(&["incr", "visits"]).ok(), (expected + 1).to_string());
}

#[test]
fn health_and_metrics_answer() {
    let node = NodeProcess::start();
    let health: serde_json::Value = serde_json::from_str(&node.health()).unwrap();
    assert_eq!(health["status"], "serving");
    assert_eq!(health["region"], "local-1");
    node.cli(&["put", "m", "1"]).ok();
    let metrics = common::http_get(node.admin_addr, "/metrics").unwrap();
    assert!(metrics.contains("geokv_requests_total"), "metrics page lacks geokv_requests_total:\n{metrics}");

    let status: serde_json::Value = serde_json::from_str(&node.cli(&["status", "--json"]).ok()).unwrap();
    assert_eq!(status["region"], "local-1");
    assert_eq!(status["durable_writes"], true);
    assert_eq!(status["storage_engine"], "rocksdb");
    assert!(status["log_seq"].as_u64().unwrap() >= 1, "{status}");
}
