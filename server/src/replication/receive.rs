//! The receiving side: the `geokv.v1.Replication` service.

use std::pin::Pin;
use std::sync::Arc;

use geokv_proto::v1 as pb;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::Replicator;
use crate::kv::commit::RemoteApply;
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

#[tonic::async_trait]
impl pb::replication_server::Replication for ReplicationService {
    type ShipStream = AckStream;

    async fn ship(
        &self,
        request: Request<Streaming<pb::ShipFrame>>,
    ) -> Result<Response<Self::ShipStream>, Status> {
        let mut frames = request.into_inner();
        let node = self.node.clone();
        let replicator = self.replicator.clone();
        let out = async_stream(move |tx| async move {
            let cfg = node.config().clone();
            let max_bytes = cfg.replication.batch_bytes_max.saturating_mul(4).max(8 << 20);
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
                let entries = node.fence_entries(&frame.source_region, opened.entries, &opened.accepted);
                let remote = RemoteApply {
                    source_region: frame.source_region.clone(),
                    first_seq: frame.first_seq,
                    through_seq: frame.through_seq,
                    entries,
                };
                let applied = if remote.entries.is_empty()
                    && frame.through_seq
                        <= node.inbound().get(&frame.source_region).map(|i| i.applied_through).unwrap_or(0)
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
                    node.note_fresh(&frame.source_region, frame.through_seq, frame.sent_hlc);
                }
                if tx.send(Ok(pb::ShipAck { applied_through_seq: frame.through_seq })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Runs `body` with a bounded channel and returns the receiving end as a stream.
fn async_stream<F, Fut>(body: F) -> impl Stream<Item = Result<pb::ShipAck, Status>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::ShipAck, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
