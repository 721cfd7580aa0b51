//! The admin HTTP port: `/metrics` for Prometheus, `/health` for probes,
//! and the live dashboard under `/dashboard` ([`dashboard`], with the
//! cluster-wide view in [`cluster`]).

pub mod cluster;
mod dashboard;

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::kv::Node;
use crate::replication::Replicator;

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// Histograms of counts (items per batch), bucketed as counts: with the
/// default buckets, made for seconds, every observation of 1 or more fell
/// in the last two.
const COUNT_HISTOGRAMS: [&str; 2] = ["geokv_commit_group_writes", "geokv_raft_log_sync_batch"];
const COUNT_BUCKETS: [f64; 14] =
    [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Buckets of `geokv_raft_propose_seconds`, in seconds.
const PROPOSE_BUCKETS: [f64; 47] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.075, 0.08, 0.0805, 0.081,
    0.0815, 0.082, 0.0825, 0.083, 0.0835, 0.084, 0.0845, 0.085, 0.0855, 0.086, 0.0865, 0.087, 0.0875, 0.088,
    0.0885, 0.089, 0.0895, 0.09, 0.095, 0.1, 0.11, 0.12, 0.14, 0.16, 0.18, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0,
    5.0,
];

/// Installs the process-wide Prometheus recorder once and returns its handle.
/// Several nodes in one process (tests) share it.
pub fn prometheus() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                ])
                .expect("bucket list is not empty")
                // Replication delay is judged against the one-way WAN delay
                // (tens of ms), so it gets fine buckets of its own.
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "geokv_replication_apply_delay_seconds".into(),
                    ),
                    &[
                        0.005, 0.01, 0.02, 0.03, 0.035, 0.04, 0.045, 0.05, 0.055, 0.06, 0.07, 0.08, 0.09,
                        0.1, 0.125, 0.15, 0.175, 0.19, 0.2, 0.25, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0,
                    ],
                )
                .expect("bucket list is not empty")
                // A STRONG commit is bounded below by the nearest majority's
                // round trip, so its buckets are fine across WAN delays, and
                // half a millisecond apart from 80 to 90 ms (`geokv dev`'s
                // nearest majority from us-east-1 at latency scale 1), where
                // `geokv-load strong-wan` sets the leader's commit time
                // beside what its clients see (decision 039).
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full("geokv_raft_propose_seconds".into()),
                    &PROPOSE_BUCKETS,
                )
                .expect("bucket list is not empty");
            // Counts per batch, not durations: a commit group's writes and
            // the appends one STRONG log sync covers.
            let recorder = COUNT_HISTOGRAMS
                .iter()
                .fold(recorder, |b, m| {
                    b.set_buckets_for_metric(
                        metrics_exporter_prometheus::Matcher::Full((*m).into()),
                        &COUNT_BUCKETS,
                    )
                    .expect("bucket list is not empty")
                })
                .build_recorder();
            let handle = recorder.handle();
            // Fails only when another recorder was installed first, in which
            // case this handle renders nothing but the process still works.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

#[derive(Clone)]
struct AdminState {
    node: Arc<Node>,
    /// Link lag and region health for the dashboard.
    replicator: Arc<Replicator>,
    prometheus: PrometheusHandle,
    /// The cluster-wide view: peer channels, control state, lag history.
    cluster: Arc<cluster::ClusterView>,
}

/// The admin HTTP routes. Without `cluster` (a node with no peer
/// connections or control plane), the cluster view shows every other node
/// as unreachable and no leases.
pub fn router(
    node: Arc<Node>,
    replicator: Arc<Replicator>,
    cluster: Option<cluster::ClusterSources>,
) -> Router {
    let state = AdminState {
        node,
        replicator,
        prometheus: prometheus(),
        cluster: Arc::new(cluster::ClusterView::new(cluster)),
    };
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/health", get(health))
        .merge(dashboard::routes())
        .with_state(state)
}

async fn metrics_page(State(s): State<AdminState>) -> impl IntoResponse {
    metrics::gauge!("geokv_uptime_seconds").set(s.node.uptime().as_secs_f64());
    metrics::gauge!("geokv_log_seq").set(s.node.log_seq() as f64);
    metrics::gauge!("geokv_hlc_rejected_total").set(s.node.hlc().rejected_count() as f64);
    s.cluster.publish_home_metrics(&s.node.config().region_names());
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.prometheus.render())
}

async fn health(State(s): State<AdminState>) -> impl IntoResponse {
    let cfg = s.node.config();
    Json(serde_json::json!({
        "status": "serving",
        "node_id": cfg.node_id,
        "region": cfg.region,
        "uptime_ms": s.node.uptime().as_millis() as u64,
        "log_seq": s.node.log_seq(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A count histogram tells batches of 3 from batches of 20 on /metrics
    /// (with the seconds buckets both fell in `le="+Inf"`).
    #[test]
    fn count_histograms_have_count_buckets() {
        let handle = prometheus();
        for v in [3.0, 20.0, 20.0] {
            metrics::histogram!("geokv_raft_log_sync_batch").record(v);
        }
        let text = handle.render();
        let bucket = |le: &str| -> f64 {
            let prefix = format!("geokv_raft_log_sync_batch_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str()))
                .unwrap_or_else(|| panic!("no bucket le={le} in:\n{text}"))
                .parse()
                .expect("a bucket's count is a number")
        };
        // Other tests of this process may record batches too: only what
        // these three add is certain.
        assert!(bucket("3") - bucket("2") >= 1.0, "the batch of 3 sits between 2 and 3:\n{text}");
        assert!(bucket("24") - bucket("16") >= 2.0, "the batches of 20 sit between 16 and 24:\n{text}");
    }
}
