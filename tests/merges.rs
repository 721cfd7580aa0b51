//! Merges as a user of the Rust client sees them on a real node: siblings
//! from concurrent writes, contexts that supersede exactly what was seen,
//! exact counters, idempotent retries, and an add-wins set.

use crate::common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::NodeProcess;
use geokv_client::{Client, Consistency, ReadConsistency, Row, WriteOptions};

/// Longest any one spawned client task may take.
const TASK_TIMEOUT: Duration = Duration::from_secs(30);

fn eventual() -> WriteOptions {
    WriteOptions::default().consistency(Consistency::Eventual)
}

fn set_of(values: Vec<Vec<u8>>) -> BTreeSet<String> {
    values.into_iter().map(|v| String::from_utf8(v).expect("test values are UTF-8")).collect()
}

fn strs(values: &[&str]) -> BTreeSet<String> {
    values.iter().map(|s| s.to_string()).collect()
}

async fn values(client: &Client, row: &Row) -> BTreeSet<String> {
    set_of(client.get(row, ReadConsistency::Local).await.expect("get").values())
}

async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(
            tokio::time::timeout(TASK_TIMEOUT, t)
                .await
                .expect("client task stuck")
                .expect("client task panicked"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_eventual_puts_without_context_leave_siblings() {
    let node = NodeProcess::start();
    let row = Row::new("default", "contested");
    const WRITERS: usize = 8;
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let client = node.client().await;
        let row = row.clone();
        tasks.push(tokio::spawn(
            async move { client.put(&row, format!("v{i}").into_bytes(), eventual()).await },
        ));
    }
    for ack in join_all(tasks).await {
        ack.expect("eventual put");
    }
    let client = node.client().await;
    let got = client.get(&row, ReadConsistency::Local).await.unwrap();
    assert!(got.found);
    let expected: BTreeSet<String> = (0..WRITERS).map(|i| format!("v{i}")).collect();
    assert_eq!(set_of(got.values()), expected, "every concurrent value must survive as a sibling");
    assert_eq!(got.siblings.len(), WRITERS, "one sibling per write, no duplicates: {:?}", got.siblings);

    // The node counts the conflict for the table.
    let status = client.node_status().await.unwrap();
    let table = status.tables.iter().find(|t| t.name == "default").expect("table default listed");
    assert!(table.conflicts >= 1, "siblings were created but no conflict was counted: {table:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_with_read_context_supersedes_exactly_what_was_read() {
    let node = NodeProcess::start();
    let client = node.client().await;
    let row = Row::new("default", "doc");
    client.put(&row, b"a".to_vec(), eventual()).await.unwrap();
    client.put(&row, b"b".to_vec(), eventual()).await.unwrap();
    let read = client.get(&row, ReadConsistency::Local).await.unwrap();
    assert_eq!(set_of(read.values()), strs(&["a", "b"]));

    // Another writer, after the read and unseen by it.
    let other = node.client().await;
    other.put(&row, b"c".to_vec(), eventual()).await.unwrap();

    client.put(&row, b"resolved".to_vec(), eventual().context(read.context.clone())).await.unwrap();
    assert_eq!(values(&client, &row).await, strs(&["c", "resolved"]), "a and b are replaced, c survives");

    // Resolving with a fresh read leaves one value.
    let fresh = client.get(&row, ReadConsistency::Local).await.unwrap();
    client.put(&row, b"final".to_vec(), eventual().context(fresh.context)).await.unwrap();
    assert_eq!(values(&client, &row).await, strs(&["final"]));

    // A stale context (the first read's) supersedes nothing new: the value
    // written with it becomes a sibling of `final`.
    client.put(&row, b"stale".to_vec(), eventual().context(read.context)).await.unwrap();
    assert_eq!(values(&client, &row).await, strs(&["final", "stale"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn put_with_the_ack_context_replaces_the_own_write() {
    // The context returned by a write covers that write: a client writing
    // in sequence with the previous ack's context never makes siblings.
    let node = NodeProcess::start();
    let client = node.client().await;
    let row = Row::new("default", "seq");
    let mut ack = client.put(&row, b"0".to_vec(), WriteOptions::default()).await.unwrap();
    for i in 1..10 {
        ack = client
            .put(&row, i.to_string().into_bytes(), WriteOptions::default().context(ack.context))
            .await
            .unwrap();
    }
    assert_eq!(values(&client, &row).await, strs(&["9"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delete_with_context_removes_only_what_was_read() {
    let node = NodeProcess::start();
    let client = node.client().await;
    let row = Row::new("default", "to-delete");
    client.put(&row, b"a".to_vec(), eventual()).await.unwrap();
    client.put(&row, b"b".to_vec(), eventual()).await.unwrap();
    let read = client.get(&row, ReadConsistency::Local).await.unwrap();
    assert_eq!(set_of(read.values()), strs(&["a", "b"]));

    client.put(&row, b"c".to_vec(), eventual()).await.unwrap();
    client.delete(&row, eventual().context(read.context)).await.unwrap();
    let after = client.get(&row, ReadConsistency::Local).await.unwrap();
    assert!(after.found, "a value written after the read must survive its delete");
    assert_eq!(set_of(after.values()), strs(&["c"]));

    client.delete(&row, eventual().context(after.context)).await.unwrap();
    let gone = client.get(&row, ReadConsistency::Local).await.unwrap();
    assert!(!gone.found, "delete with a context that saw everything: {:?}", gone.siblings);
    assert!(gone.siblings.is_empty());

    // The row can be written again, and without a context it is not a
    // sibling of anything deleted.
    client.put(&row, b"again".to_vec(), eventual()).await.unwrap();
    assert_eq!(values(&client, &row).await, strs(&["again"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_counter_adds_sum_exactly() {
    let node = NodeProcess::start();
    let row = Row::new("default", "hits");
    const TASKS: i64 = 16;
    const ADDS_PER_TASK: i64 = 25;
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        // One connection per task: the adds race as separate clients would.
        let client = node.client().await;
        let row = row.clone();
        tasks.push(tokio::spawn(async move {
            let mut sum = 0i64;
            for i in 0..ADDS_PER_TASK {
                // Mixed signs, so a lost or doubled add of either kind shows.
                let delta = if i % 5 == 4 { -(t + 1) } else { t + i + 1 };
                client.counter_add(&row, delta, WriteOptions::default()).await.expect("counter add");
                sum += delta;
            }
            sum
        }));
    }
    let expected: i64 = join_all(tasks).await.into_iter().sum();
    let client = node.client().await;
    assert_eq!(client.counter_get(&row, ReadConsistency::Local).await.unwrap(), Some(expected));
    // The reply of one more add reports the running total.
    let (value, _) = client.counter_add(&row, 1, WriteOptions::default()).await.unwrap();
    assert_eq!(value, expected + 1);
    // A counter never written reads as absent, not zero.
    assert_eq!(
        client.counter_get(&Row::new("default", "never"), ReadConsistency::Local).await.unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retried_counter_add_with_same_idempotency_key_counts_once() {
    let node = NodeProcess::start();
    let client = node.client().await;
    let row = Row::new("default", "payments");
    let opts = WriteOptions::default().idempotency_key("charge-0001");

    let (first, ack) = client.counter_add(&row, 5, opts.clone()).await.unwrap();
    assert_eq!(first, 5);
    assert!(!ack.replayed, "the first attempt is not a replay");

    // The retry, as a client would send it after a lost reply, from another connection too.
    let (again, ack) = client.counter_add(&row, 5, opts.clone()).await.unwrap();
    assert_eq!(again, 5, "the replayed reply reports the original value");
    assert!(ack.replayed, "the reply to a repeated idempotency key says replayed");
    let other = node.client().await;
    let (third, ack) = other.counter_add(&row, 5, opts.clone()).await.unwrap();
    assert_eq!(third, 5);
    assert!(ack.replayed);
    assert_eq!(client.counter_get(&row, ReadConsistency::Local).await.unwrap(), Some(5), "counted once");

    // Concurrent retries of one request also count once.
    let opts2 = WriteOptions::default().idempotency_key("charge-0002");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, row, opts2) = (client.clone(), row.clone(), opts2.clone());
        tasks.push(tokio::spawn(async move { client.counter_add(&row, 10, opts2).await.unwrap() }));
    }
    let replies = join_all(tasks).await;
    assert_eq!(replies.iter().filter(|(_, ack)| !ack.replayed).count(), 1, "exactly one attempt applied");
    assert!(replies.iter().all(|(v, _)| *v == 15), "every attempt sees the one applied result: {replies:?}");
    assert_eq!(client.counter_get(&row, ReadConsistency::Local).await.unwrap(), Some(15));

    // Reusing a key for a different request is refused, not silently replayed.
    let err = client.counter_add(&row, 7, opts).await.unwrap_err();
    assert_eq!(err.reason.as_deref(), Some("IDEMPOTENCY_KEY_REUSED"), "{err}");
    assert_eq!(err.code, tonic::Code::FailedPrecondition);
    assert_eq!(client.counter_get(&row, ReadConsistency::Local).await.unwrap(), Some(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_remove_is_add_wins() {
    let node = NodeProcess::start();
    let client = node.client().await;
    let row = Row::new("default", "tags");
    let (members, _) = client
        .set_add(&row, vec![b"x".to_vec(), b"y".to_vec(), b"z".to_vec()], WriteOptions::default())
        .await
        .unwrap();
    assert_eq!(set_of(members), strs(&["x", "y", "z"]));

    let seen = client.set_members(&row, ReadConsistency::Local).await.unwrap();
    assert!(seen.found);
    assert_eq!(set_of(seen.members.clone()), strs(&["x", "y", "z"]));

    // Another client adds x again after the read: an add the remover did not see.
    let other = node.client().await;
    other.set_add(&row, vec![b"x".to_vec()], WriteOptions::default()).await.unwrap();

    let (after, _) = client
        .set_remove(
            &row,
            vec![b"x".to_vec(), b"y".to_vec()],
            WriteOptions::default().context(seen.context.clone()),
        )
        .await
        .unwrap();
    assert_eq!(set_of(after), strs(&["x", "z"]), "x was re-added concurrently and wins; y is removed");
    let now = client.set_members(&row, ReadConsistency::Local).await.unwrap();
    assert_eq!(set_of(now.members.clone()), strs(&["x", "z"]));

    // A remove with a context that saw the re-add removes it.
    let (after, _) = client
        .set_remove(&row, vec![b"x".to_vec()], WriteOptions::default().context(now.context))
        .await
        .unwrap();
    assert_eq!(set_of(after), strs(&["z"]));

    // Without a context, a remove takes every add stored here.
    client.set_add(&row, vec![b"w".to_vec()], WriteOptions::default()).await.unwrap();
    let (after, _) =
        client.set_remove(&row, vec![b"w".to_vec(), b"z".to_vec()], WriteOptions::default()).await.unwrap();
    assert!(after.is_empty(), "{:?}", set_of(after));

    // Removing a member that is not there changes nothing and is not an error.
    let (after, _) = client.set_remove(&row, vec![b"nope".to_vec()], WriteOptions::default()).await.unwrap();
    assert!(after.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_register_is_not_a_counter() {
    let node = NodeProcess::start();
    let client = node.client().await;
    let row = Row::new("default", "typed");
    client.put(&row, b"text".to_vec(), WriteOptions::default()).await.unwrap();
    let err = client.counter_add(&row, 1, WriteOptions::default()).await.unwrap_err();
    assert_eq!(err.reason.as_deref(), Some("WRONG_TYPE"), "{err}");
    assert_eq!(values(&client, &row).await, strs(&["text"]), "a refused write changes nothing");
}
