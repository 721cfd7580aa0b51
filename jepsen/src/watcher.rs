//! The watch workload's watcher: one change-feed stream of the watched
//! table's prefix, served by one region's node, followed for the whole run
//! (faults, heal, convergence) and recorded event by event in the history.
//!
//! When the stream breaks (the node was killed, paused past
//! [`STALE_AFTER`], or the connection was cut) the watcher opens it again
//! from the cursor of the last event it received, as a client of the feed
//! is told to (docs/architecture.md section 13): no acknowledged change may
//! be missing afterwards, though some may come twice. A cursor the node
//! refuses (`CURSOR_COMPACTED`) ends the watch: resuming from "now" would
//! hide a gap, and `checker::watch` fails the run on it.
//!
//! Bounded: each open waits at most the client's connect and call
//! timeouts, reopening is paced by [`REOPEN_PAUSE`], and the watch ends at
//! [`Watcher::stop`] or when the history is full.

use std::time::Duration;

use geokv_client::Client;
use tokio::sync::watch;

use crate::history::{Recorder, WatchEventKind, WatchRecord};
use crate::workload;

/// A stream silent this long is dropped and opened again from the last
/// cursor (a heartbeat comes at least every second).
pub const STALE_AFTER: Duration = Duration::from_secs(5);
/// Pause before opening a stream again.
pub const REOPEN_PAUSE: Duration = Duration::from_millis(250);
/// Longest wait for the first event of the first stream, which fixes the
/// feed position the run's writes start after.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// A running watcher.
pub struct Watcher {
    stop: watch::Sender<bool>,
    ready: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// Starts watching `table`'s rows under `prefix` at `endpoint` (the node
    /// of `region`).
    pub fn start(
        endpoint: String,
        region: String,
        table: String,
        prefix: String,
        recorder: Recorder,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready) = watch::channel(false);
        let task = tokio::spawn(follow(endpoint, region, table, prefix, recorder, stop_rx, ready_tx));
        Self { stop, ready, task }
    }

    /// Waits until the first stream delivered its first event (bounded by
    /// [`READY_TIMEOUT`]); false if it did not.
    pub async fn ready(&mut self) -> bool {
        tokio::time::timeout(READY_TIMEOUT, self.ready.wait_for(|r| *r)).await.is_ok_and(|r| r.is_ok())
    }

    /// Ends the watch and waits for the task.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

fn record(region: &str, event: WatchEventKind) -> WatchRecord {
    WatchRecord::new(region, event)
}

async fn follow(
    endpoint: String,
    region: String,
    table: String,
    prefix: String,
    recorder: Recorder,
    mut stop: watch::Receiver<bool>,
    ready: watch::Sender<bool>,
) {
    let mut cursor: Vec<u8> = Vec::new();
    while !*stop.borrow() {
        let opened = async {
            let client = Client::with_config(workload::client_config(&endpoint)).await?;
            client.watch(&table, prefix.as_bytes(), &cursor).await
        };
        let mut stream = match tokio::time::timeout(STALE_AFTER, opened).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let why = e.reason_or_code();
                let compacted = why == "CURSOR_COMPACTED";
                recorder.watch(WatchRecord { detail: why, ..record(&region, WatchEventKind::Error) });
                if compacted {
                    return;
                }
                pause_or_stop(&mut stop).await;
                continue;
            }
            Err(_) => {
                let detail = "HARNESS_TIMEOUT opening the stream".to_string();
                recorder.watch(WatchRecord { detail, ..record(&region, WatchEventKind::Error) });
                pause_or_stop(&mut stop).await;
                continue;
            }
        };
        let detail = if cursor.is_empty() { "from now" } else { "from the last cursor" };
        recorder.watch(WatchRecord { detail: detail.into(), ..record(&region, WatchEventKind::Open) });
        loop {
            let next = tokio::select! {
                _ = stop.changed() => return,
                next = tokio::time::timeout(STALE_AFTER, stream.message()) => next,
            };
            let why = match next {
                Err(_) => format!("HARNESS_STALE: no event for {} s", STALE_AFTER.as_secs()),
                Ok(Ok(None)) => "STREAM_ENDED".to_string(),
                Ok(Err(status)) => geokv_client::Error::from(status).reason_or_code(),
                Ok(Ok(Some(ev))) => {
                    let r = match ev.event {
                        Some(geokv_client::proto::watch_event::Event::Change(c)) => WatchRecord {
                            key: String::from_utf8_lossy(&c.key).into_owned(),
                            values: c.siblings.iter().filter_map(|s| workload::decode(&s.value)).collect(),
                            origin: c.origin,
                            seq: c.origin_seq,
                            hlc: c.hlc,
                            ..record(&region, WatchEventKind::Change)
                        },
                        Some(geokv_client::proto::watch_event::Event::ResolvedHlc(h)) => {
                            WatchRecord { hlc: h, ..record(&region, WatchEventKind::Heartbeat) }
                        }
                        None => WatchRecord {
                            detail: "an event with neither a change nor a heartbeat".into(),
                            ..record(&region, WatchEventKind::Error)
                        },
                    };
                    if !recorder.watch(r) {
                        return;
                    }
                    cursor = ev.cursor;
                    let _ = ready.send(true);
                    continue;
                }
            };
            let compacted = why == "CURSOR_COMPACTED";
            recorder.watch(WatchRecord { detail: why, ..record(&region, WatchEventKind::Error) });
            if compacted {
                return;
            }
            break;
        }
        pause_or_stop(&mut stop).await;
    }
}

async fn pause_or_stop(stop: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = stop.changed() => {}
        _ = tokio::time::sleep(REOPEN_PAUSE) => {}
    }
}
