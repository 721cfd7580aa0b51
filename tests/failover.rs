//! Failover, fencing and the QUORUM and STRONG paths on a `geokv dev`
//! cluster: real node processes, every inter-region link behind the fault
//! proxy with emulated WAN latency (docs/architecture.md sections 3 and 8).
//!
//! - `kill -9` of the home region under STRONG, QUORUM and LOCAL load: the
//!   STRONG group elects a new leader, the control plane moves the home
//!   under epoch 2, and no acknowledged STRONG or QUORUM write is lost; the
//!   LOCAL writes the dead home had acknowledged come back when it does.
//!   The recovery times are printed (the benchmark notes report them).
//! - SIGSTOP of the home past its lease: after the failover, everything the
//!   paused node tries to accept is refused as FENCED, and no epoch of the
//!   home ever has writes accepted by two regions.
//! - a planned failover and failback under load lose nothing: the regions
//!   converge to equal digests with every acknowledged write present.
//! - with one region partitioned away, a QUORUM write in one region is seen
//!   by a QUORUM read in another.
//! - a new cluster's STRONG groups are led from their home regions from
//!   the first term: the home bootstraps each group, so a voter nearer the
//!   others cannot win the first election and keep the leadership.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster::{forwarded_put, wait_moved, DevCluster, Options};
use common::{home_held_by, Deadline};
use geokv_client::proto as pb;
use geokv_client::{Consistency, ReadConsistency, Row, WriteOptions};

const US: &str = "us-east-1";
const EU_WEST: &str = "eu-west-1";
const EU_CENTRAL: &str = "eu-central-1";
const AP: &str = "ap-southeast-1";

/// Longest wait for the regions to converge after a fault ends.
const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
/// Longest wait for the control plane to move a home.
const FAILOVER_LIMIT: Duration = Duration::from_secs(20);
/// Longest a background writer may take to stop once told to.
const TASK_TIMEOUT: Duration = Duration::from_secs(30);

fn level(c: Consistency) -> WriteOptions {
    WriteOptions::default().consistency(c)
}

/// A row of the `default` table, homed in us-east-1.
fn default_row(key: &str) -> Row {
    Row::new("default", key.as_bytes().to_vec())
}

fn register(key: &str) -> Row {
    Row::new("registers", key.as_bytes().to_vec())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn join_bounded<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(TASK_TIMEOUT, task).await.expect("writer stops in time").expect("writer task")
}

/// The home lease of `home` as `client`'s node sees it.
/// What one writer saw.
#[derive(Default)]
struct Log {
    /// (value or key, time the request started, time acknowledged).
    acked: Vec<(u64, Instant, Instant)>,
    attempted: u64,
}

/// Writes 1, 2, 3... with `write` until `stop`, one request at a time.
fn spawn_writer<F, Fut>(stop: Arc<AtomicBool>, write: F) -> tokio::task::JoinHandle<Log>
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    tokio::spawn(async move {
        let mut log = Log::default();
        // Bounded: at most 100,000 requests, and each has a deadline.
        for i in 1..=100_000u64 {
            if stop.load(Ordering::Acquire) {
                break;
            }
            log.attempted = i;
            let started = Instant::now();
            if write(i).await {
                log.acked.push((i, started, Instant::now()));
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        log
    })
}

/// Milliseconds from `t0` to the first acknowledged request that started
/// after it.
fn recovery_ms(log: &Log, t0: Instant) -> Option<u128> {
    log.acked.iter().find(|(_, started, _)| *started >= t0).map(|(_, _, done)| (*done - t0).as_millis())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_home_loses_no_strong_or_quorum_write() {
    let mut cluster = DevCluster::start(1.0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let quick = |c: &mut geokv_client::ClientConfig| {
        c.timeout = Duration::from_millis(1500);
        c.retries_max = 0;
    };
    let strong = cluster.client_with(EU_WEST, quick).await;
    let quorum = cluster.client_with(EU_CENTRAL, quick).await;
    let local = cluster.client_with(EU_WEST, quick).await;
    let strong_task = spawn_writer(stop.clone(), move |i| {
        let c = strong.clone();
        async move { c.put(&register("reg"), i.to_string().into_bytes(), WriteOptions::default()).await.is_ok() }
    });
    let quorum_task = spawn_writer(stop.clone(), move |i| {
        let c = quorum.clone();
        async move {
            c.put(&default_row(&format!("q{i}")), b"v".to_vec(), level(Consistency::Quorum)).await.is_ok()
        }
    });
    let local_task = spawn_writer(stop.clone(), move |i| {
        let c = local.clone();
        async move {
            c.put(&default_row(&format!("l{i}")), b"v".to_vec(), level(Consistency::Local)).await.is_ok()
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.kill_9(US);
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Release);
    let strong_log = join_bounded(strong_task).await;
    let quorum_log = join_bounded(quorum_task).await;
    let local_log = join_bounded(local_task).await;

    let strong_ms = recovery_ms(&strong_log, killed);
    let local_ms = recovery_ms(&local_log, killed);
    let quorum_ms = recovery_ms(&quorum_log, killed);
    eprintln!(
        "after kill -9 of {US}: STRONG writes resumed in {strong_ms:?} ms, LOCAL in {local_ms:?} ms, \
         QUORUM in {quorum_ms:?} ms; acknowledged: STRONG {}, QUORUM {}, LOCAL {}",
        strong_log.acked.len(),
        quorum_log.acked.len(),
        local_log.acked.len()
    );
    assert!(strong_ms.is_some(), "no STRONG write succeeded after the home died");
    assert!(local_ms.is_some(), "no LOCAL write succeeded after the home died");
    assert!(quorum_ms.is_some(), "no QUORUM write succeeded after the home died");

    let reader = cluster.client(EU_CENTRAL).await;
    let moved = wait_moved(&reader, US, US, FAILOVER_LIMIT, true).await;
    assert_eq!(moved.epoch, 2, "one failover moves the home to epoch 2: {moved:?}");

    // STRONG: one sequential writer, so the register holds the last
    // acknowledged value or a later attempted one, never an older value.
    let got = reader.get(&register("reg"), ReadConsistency::Strong).await.expect("STRONG read");
    let value: u64 = text(&got.siblings[0].value).parse().expect("a number");
    let last_acked = strong_log.acked.last().map(|a| a.0).unwrap_or(0);
    assert!(
        value >= last_acked && value <= strong_log.attempted,
        "STRONG register holds {value}; last acknowledged {last_acked}, last attempted {}",
        strong_log.attempted
    );

    // QUORUM: every acknowledged write is seen by a QUORUM read, with the
    // old home still down.
    for (i, _, _) in &quorum_log.acked {
        let got =
            reader.get(&default_row(&format!("q{i}")), ReadConsistency::Quorum).await.expect("QUORUM read");
        assert!(got.found, "acknowledged QUORUM write q{i} is lost");
    }

    // LOCAL: writes the dead home acknowledged come back with it.
    cluster.restart(US).await;
    cluster.wait_converged(CONVERGE_LIMIT).await;
    let any = cluster.client(EU_WEST).await;
    let mut missing = Vec::new();
    for (i, _, _) in &local_log.acked {
        let got = any.get(&default_row(&format!("l{i}")), ReadConsistency::Local).await.expect("LOCAL read");
        if !got.found {
            missing.push(*i);
        }
    }
    assert!(missing.is_empty(), "acknowledged LOCAL writes lost after the home returned: {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paused_home_is_fenced_after_failover() {
    let cluster = DevCluster::start(0.5).await;
    let writer = cluster.client(EU_WEST).await;
    // (key, epoch, region that accepted it) of every acknowledged write of home us-east-1.
    let mut accepted: Vec<(String, u64, String)> = Vec::new();
    for i in 0..20 {
        let key = format!("before{i}");
        let ack =
            writer.put(&default_row(&key), b"v".to_vec(), level(Consistency::Local)).await.expect("put");
        accepted.push((key, ack.epoch, ack.accepted_by_region));
    }

    cluster.pause(US);
    let moved = wait_moved(&writer, US, US, FAILOVER_LIMIT, true).await;
    assert!(moved.epoch >= 2, "{moved:?}");
    for i in 0..20 {
        let key = format!("during{i}");
        let ack =
            writer.put(&default_row(&key), b"v".to_vec(), level(Consistency::Local)).await.expect("put");
        assert_eq!(ack.accepted_by_region, moved.holder, "the new holder accepts the home's writes");
        accepted.push((key, ack.epoch, ack.accepted_by_region));
    }

    cluster.unpause(US);
    // Right after it continues (stale state, lapsed lease) and after it
    // caught up with the control plane, the old home refuses every write.
    let mut refusals = 0;
    for i in 0..30 {
        match forwarded_put(&cluster, US, &format!("after{i}"), b"from-the-paused-home").await {
            Ok(ack) => panic!("the fenced old home accepted a write: {ack:?}"),
            Err(status) => {
                let err = geokv_client::Error::from(status);
                assert_eq!(err.reason.as_deref(), Some("FENCED"), "refused with {err}");
                refusals += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refusals, 30);

    // Writes after SIGCONT through the normal path go to the new holder.
    let us_client = cluster.client(US).await;
    let ack = us_client
        .put(&default_row("after-normal"), b"v".to_vec(), level(Consistency::Local))
        .await
        .expect("put");
    assert_eq!(ack.accepted_by_region, moved.holder);
    accepted.push(("after-normal".into(), ack.epoch, ack.accepted_by_region));

    // One epoch, one accepting region.
    let mut by_epoch: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for (_, epoch, region) in accepted.iter() {
        by_epoch.entry(*epoch).or_default().insert(region.clone());
    }
    for (epoch, regions) in &by_epoch {
        assert_eq!(regions.len(), 1, "epoch {epoch} of home {US} has writes accepted by {regions:?}");
    }
    assert!(by_epoch.len() >= 2, "writes under the old and the new epoch: {by_epoch:?}");

    // Nothing written is lost, and no refused write exists anywhere.
    cluster.wait_converged(CONVERGE_LIMIT).await;
    for (key, _, _) in accepted.iter() {
        let got = us_client.get(&default_row(key), ReadConsistency::Local).await.expect("read");
        assert!(got.found, "acknowledged write {key} is lost");
    }
    for i in 0..30 {
        let got = writer.get(&default_row(&format!("after{i}")), ReadConsistency::Local).await.expect("read");
        assert!(!got.found, "refused write after{i} exists");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_failover_and_failback_lose_nothing() {
    let cluster = DevCluster::start_with(Options::scale(0.5)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (n, region) in [US, EU_WEST, AP].into_iter().enumerate() {
        let client = cluster.client(region).await;
        tasks.push(spawn_writer(stop.clone(), move |i| {
            let c = client.clone();
            async move {
                c.put(&default_row(&format!("w{n}-{i}")), b"v".to_vec(), level(Consistency::Local))
                    .await
                    .is_ok()
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let moved = cluster.cli_json(&["region", "failover", "--from", US, "--to", EU_WEST]).await;
    assert!(home_held_by(&moved, US, EU_WEST).is_some(), "{moved}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back = cluster.cli_json(&["region", "failback", "--region", US]).await;
    assert!(home_held_by(&back, US, US).is_some_and(|h| h["epoch"] == 3), "{back}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Release);
    let mut acked = Vec::new();
    for (n, task) in tasks.into_iter().enumerate() {
        let log = join_bounded(task).await;
        assert!(!log.acked.is_empty(), "writer {n} got no acknowledgement");
        acked.extend(log.acked.iter().map(|(i, _, _)| format!("w{n}-{i}")));
    }
    cluster.wait_converged(CONVERGE_LIMIT).await;
    for region in [US, EU_CENTRAL, AP] {
        let c = cluster.client(region).await;
        for key in &acked {
            let got = c.get(&default_row(key), ReadConsistency::Local).await.expect("read");
            assert!(got.found, "acknowledged write {key} missing in {region} after failover and failback");
        }
    }
    // A planned handover ships the tail first: nothing arrives late.
    let conflicts = cluster.client(EU_WEST).await.failover_conflicts().await.expect("conflicts");
    assert!(conflicts.conflicts.is_empty(), "planned handover left conflicts: {:?}", conflicts.conflicts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_write_is_seen_by_a_quorum_read_with_a_region_partitioned() {
    let cluster = DevCluster::start(0.5).await;
    cluster.isolate(AP).await;
    let us = cluster.client(US).await;
    let central = cluster.client(EU_CENTRAL).await;
    for i in 0..10 {
        let key = format!("quorum{i}");
        us.put(&default_row(&key), format!("v{i}").into_bytes(), level(Consistency::Quorum))
            .await
            .expect("QUORUM put");
        let got = central.get(&default_row(&key), ReadConsistency::Quorum).await.expect("QUORUM read");
        assert_eq!(got.siblings.iter().map(|s| text(&s.value)).collect::<Vec<_>>(), vec![format!("v{i}")]);
    }
    // An EU-resident row: its zone has two regions, so QUORUM needs both.
    let eu_row = Row::new("eu_users", b"anna".to_vec()).home(EU_WEST);
    let west = cluster.client(EU_WEST).await;
    west.put(&eu_row, b"berlin".to_vec(), level(Consistency::Quorum)).await.expect("EU QUORUM put");
    let got = central.get(&eu_row, ReadConsistency::Quorum).await.expect("EU QUORUM read");
    assert_eq!(got.siblings.iter().map(|s| text(&s.value)).collect::<Vec<_>>(), vec!["berlin".to_string()]);
    // The partitioned region cannot reach a majority: its QUORUM write fails
    // with a typed, retryable reason instead of being acknowledged.
    let ap = cluster
        .client_with(AP, |c| {
            c.retries_max = 0;
            c.timeout = Duration::from_secs(8);
        })
        .await;
    let err = ap
        .put(&default_row("lonely"), b"v".to_vec(), level(Consistency::Quorum))
        .await
        .expect_err("no majority");
    assert_eq!(err.reason.as_deref(), Some("QUORUM_UNAVAILABLE"), "{err}");
    cluster.heal(AP).await;
}

/// The home's own node's view of every STRONG group the home prefers to
/// lead, once each of them has a leader.
async fn strong_groups_with_leaders(cluster: &DevCluster) -> Vec<pb::GroupInfo> {
    let deadline = Deadline::after(FAILOVER_LIMIT);
    let mut clients = Vec::new();
    for region in [US, EU_WEST, EU_CENTRAL, AP] {
        clients.push((region, cluster.client(region).await));
    }
    loop {
        let mut groups = Vec::new();
        for (region, client) in &clients {
            if let Ok(status) = client.region_status().await {
                groups.extend(
                    status.groups.into_iter().filter(|g| g.preferred_region == *region && g.local_member),
                );
            }
        }
        if !groups.is_empty() && groups.iter().all(|g| !g.leader.is_empty()) {
            return groups;
        }
        assert!(!deadline.passed(), "STRONG groups without a leader after {FAILOVER_LIMIT:?}: {groups:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_clusters_strong_groups_are_led_from_their_homes() {
    // Full WAN distances: the us-east-1 group's other voters (eu-west-1 and
    // eu-central-1) are 26 ms apart and 80-90 ms from the home, which is
    // what let one of them win a first election held by every voter at once.
    let cluster = DevCluster::start(1.0).await;
    let groups = strong_groups_with_leaders(&cluster).await;
    assert!(groups.iter().any(|g| g.preferred_region == US), "no STRONG group homed in {US}: {groups:?}");
    for g in &groups {
        let leader_region = g.leader.split('/').next().unwrap_or_default();
        assert_eq!(leader_region, g.preferred_region, "{} is led from {}: {g:?}", g.name, g.leader);
    }
}
