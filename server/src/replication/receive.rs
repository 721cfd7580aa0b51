//! The receiving side: the `geokv.v1.Replication` service.

use std::pin::Pin;
use std::sync::Arc;

use geokv_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Replicator;
use crate::kv::commit::{ApplyMode, RemoteApply};
use crate::kv::Node;

/// Accepts frames from other regions, checks them again (residency,
/// checksum, clock), merges them, and acknowledges.
#[derive(Clone)]
pub struct ReplicationService {
    node: Arc<Node>,
    replicator: Arc<Replicator>,
}

impl ReplicationService {
    pub fn new(node: Arc<Node>, replicator: Arc<Replicator>) -> Self {
        Self { node, replicator }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<pb::ShipAck, Status>> + Send>>;
type RepairAnswers = Pin<Box<dyn Stream<Item = Result<pb::RepairResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type ShipStream = AckStream;
    type RepairStream = RepairAnswers;

    /// Opens a link: refuses a source with another cluster policy
    /// (`CONFIG_MISMATCH`), and tells it who this store is and what it has
    /// applied from the source's store incarnation.
    async fn hello(&self, request: Request<pb::ShipHello>) -> Result<Response<pb::ShipWelcome>, Status> {
        let caller = crate::security::authn::Caller::of(&request);
        let hello = request.into_inner();
        let cfg = self.node.config();
        if hello.source_region == cfg.region || cfg.regions.iter().all(|r| r.name != hello.source_region) {
            return Err(crate::error::KvError::UnknownRegion {
                region: hello.source_region.clone(),
                known: cfg.region_names(),
            }
            .to_status());
        }
        if hello.source_node.is_empty() {
            return Err(crate::error::KvError::MissingField { field: "source_node" }.to_status());
        }
        self.node.security().check_claim(
            &caller,
            &hello.source_region,
            Some(&hello.source_node),
            "a replication handshake",
        )?;
        if hello.destination_node != cfg.node_id {
            return Err(crate::error::KvError::InvalidField {
                field: "destination_node",
                why: format!("this is node `{}`, not `{}`", cfg.node_id, hello.destination_node),
            }
            .to_status());
        }
        let source = crate::topology::actor(&hello.source_region, &hello.source_node);
        let policy = crate::topology::policy::items(cfg);
        let fingerprint = crate::topology::policy::fingerprint(&policy);
        if hello.policy_fingerprint != fingerprint {
            let differences = crate::topology::policy::differences(
                &policy,
                &crate::topology::policy::from_wire(&hello.policy),
            );
            let err = crate::error::KvError::ConfigMismatch { peer: source.clone(), differences };
            tracing::error!(peer = %source, error = %err, "refusing a node with another cluster policy");
            metrics::counter!("geokv_config_mismatch_total", "peer" => source).increment(1);
            return Err(err.to_status());
        }
        let applied = self.node.applied_from(&source, &hello.source_store).map_err(|e| e.to_status())?;
        tracing::info!(peer = %source, source_store = %hello.source_store, applied,
            "replication handshake");
        Ok(Response::new(pb::ShipWelcome {
            destination_store: self.node.store_tag(),
            applied_through_seq: applied,
            policy: crate::topology::policy::to_wire(&policy),
            policy_fingerprint: fingerprint,
        }))
    }

    async fn repair(
        &self,
        request: Request<Streaming<pb::RepairRequest>>,
    ) -> Result<Response<Self::RepairStream>, Status> {
        let caller = crate::security::authn::Caller::of(&request);
        let mut steps = request.into_inner();
        let node = self.node.clone();
        let out = async_stream(move |tx| async move {
            let mut session = super::repair::Session::new(node.clone());
            while let Some(step) = steps.next().await {
                let Ok(step) = step else { return };
                // A repair speaks for the node whose certificate sent it.
                if let Some(pb::repair_request::Step::Begin(begin)) = &step.step {
                    if let Err(status) = node.security().check_claim(
                        &caller,
                        &begin.source_region,
                        Some(&begin.source_node),
                        "a repair",
                    ) {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
                let answer = match step.step {
                    Some(step) => session.step(step).await,
                    None => Err(crate::error::KvError::MissingField { field: "step" }),
                };
                let failed = answer.is_err();
                if tx.send(answer.map_err(|e| e.to_status())).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn ship(
        &self,
        request: Request<Streaming<pb::ShipFrame>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let caller = crate::security::authn::Caller::of(&request);
        let mut frames = request.into_inner();
        let node = self.node.clone();
        let replicator = self.replicator.clone();
        let out = async_stream(move |tx| async move {
            let cfg = node.config().clone();
            // Derived from the row limit as the source derives its frames,
            // so the largest legal row always fits (frame::frame_bytes_max).
            let max_bytes = super::frame::frame_bytes_max(&cfg);
            while let Some(frame) = frames.next().await {
                let frame = match frame {
                    Ok(f) => f,
                    Err(_) => return,
                };
                if frame.source_region == cfg.region
                    || cfg.regions.iter().all(|r| r.name != frame.source_region)
                {
                    let _ = tx
                        .send(Err(crate::error::KvError::UnknownRegion {
                            region: frame.source_region.clone(),
                            known: cfg.region_names(),
                        }
                        .to_status()))
                        .await;
                    return;
                }
                if frame.source_node.is_empty() {
                    let _ = tx
                        .send(Err(crate::error::KvError::MissingField { field: "source_node" }.to_status()))
                        .await;
                    return;
                }
                // A frame speaks for the node whose certificate sent it.
                if let Err(status) = node.security().check_claim(
                    &caller,
                    &frame.source_region,
                    Some(&frame.source_node),
                    "a replication frame",
                ) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                let source = crate::topology::actor(&frame.source_region, &frame.source_node);
                replicator.heard_from(&frame.source_region);
                let opened = match super::frame::open(&cfg, &frame, max_bytes) {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!(source = %frame.source_region, error = %e, "refusing replication frame");
                        let _ = tx.send(Err(e.to_status())).await;
                        return;
                    }
                };
                if opened.max_hlc > 0 {
                    if let Err(e) = node.hlc().observe(crate::causality::HlcTimestamp(opened.max_hlc)) {
                        metrics::counter!("geokv_clock_offset_rejected_total", "source" => frame.source_region.clone())
                            .increment(1);
                        let err = crate::error::KvError::ClockOffset {
                            ahead_ms: e.ahead_ms,
                            max_ms: e.max_offset_ms,
                        };
                        let _ = tx.send(Err(err.to_status())).await;
                        return;
                    }
                }
                metrics::counter!("geokv_replication_received_bytes_total", "source" => frame.source_region.clone())
                    .increment(frame.entries.len() as u64);
                // Each entry's log position travels with it through fencing.
                let attached = opened.seqs.into_iter().zip(opened.idempotency).collect();
                let (entries, attached): (_, Vec<(u64, _)>) =
                    node.fence_entries(&frame.source_region, opened.entries, &opened.accepted, attached);
                let (seqs, idempotency): (Vec<u64>, Vec<_>) = attached.into_iter().unzip();
                let store = if crate::storage::identity::identity_off() {
                    String::new()
                } else {
                    frame.source_store.clone()
                };
                let remote = RemoteApply {
                    source: source.clone(),
                    source_store: store.clone(),
                    first_seq: frame.first_seq,
                    through_seq: frame.through_seq,
                    entries,
                    mode: ApplyMode::Log,
                    idempotency: idempotency.into_iter().flatten().collect(),
                    seqs,
                };
                let applied = if remote.entries.is_empty()
                    && frame.through_seq
                        <= node
                            .inbound()
                            .get(&source)
                            .filter(|i| i.store == store)
                            .map(|i| i.applied_through)
                            .unwrap_or(0)
                {
                    Ok(())
                } else {
                    node.apply_remote(remote).await
                };
                if let Err(e) = applied {
                    let _ = tx.send(Err(e.to_status())).await;
                    return;
                }
                if frame.through_seq >= frame.source_head_seq {
                    node.note_fresh(&source, frame.through_seq, frame.sent_hlc);
                }
                if tx.send(Ok(super::progress_ack(&node, frame.through_seq))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Runs `body` with a bounded channel and returns the receiving end as a stream.
fn async_stream<T, F, Fut>(body: F) -> impl Stream<Item = Result<T, Status>> + Send
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
