//! QUORUM writes and reads (docs/architecture.md section 3).
//!
//! A QUORUM write is accepted by the node the client reached (it must be in
//! the row's zone), made durable there through the normal write path, then
//! its row state is merged durably in the other replica regions; it is
//! acknowledged once a majority of the replica regions (this one included)
//! hold it. A QUORUM read asks a majority of replica regions for their
//! state, merges them, and repairs every replica that lacked something.
//! Any two majorities intersect, so a QUORUM read sees every acknowledged
//! QUORUM write. Merges are idempotent, so retries and the asynchronous
//! replication of the same write change nothing.

use std::sync::Arc;
use std::time::Duration;

use geokv_proto::consensus as pb;
use tokio::task::JoinSet;

use super::{raft_id, Consensus, Member};
use crate::config::Level;
use crate::error::KvError;
use crate::kv::commit::{merge_row, WriteOutcome};
use crate::kv::row::Row;
use crate::kv::{Node, RowRef, WriteOp, WriteRequest};
use crate::residency::{self, Placement};

/// Deadline of one replica call.
const REPLICA_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs QUORUM operations from this node.
pub struct Quorum {
    consensus: Arc<Consensus>,
    node: Arc<Node>,
}

fn unavailable(why: String) -> KvError {
    KvError::QuorumUnavailable { group: "quorum".into(), why }
}

impl Quorum {
    pub fn new(consensus: Arc<Consensus>, node: Arc<Node>) -> Self {
        Self { consensus, node }
    }

    /// The node owning the row in every replica region other than this one.
    fn others(&self, placement: &Placement, table: &str, key: &[u8]) -> Vec<Member> {
        let here = &self.node.config().region;
        let topology = self.node.topology();
        placement
            .replica_regions
            .iter()
            .filter(|r| *r != here)
            .filter_map(|r| topology.owner_of(r, table, key))
            .map(|o| Member { id: raft_id(&o.actor()), actor: o.actor(), region: o.region.clone() })
            .collect()
    }

    fn placement(&self, row: &RowRef) -> Result<Placement, KvError> {
        let cfg = self.node.config();
        let table =
            cfg.table(&row.table).ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
        let placement = residency::resolve(cfg, table, &row.locality)?;
        // Coordinating means holding the row here: it must be in the zone.
        residency::admit_write(&cfg.region, &placement, Level::Eventual)?;
        Ok(placement)
    }

    /// Merges `row` on each of `targets` concurrently; returns how many acknowledged.
    async fn push(&self, targets: &[Member], table: &str, key: &[u8], row: &Row) -> usize {
        let mut set = JoinSet::new();
        for m in targets {
            let Some(mut client) = self.consensus.peers().client(m.id) else { continue };
            let req =
                pb::ReplicaWriteRequest { table: table.to_string(), key: key.to_vec(), row: row.seal() };
            set.spawn(async move {
                let mut r = tonic::Request::new(req);
                r.set_timeout(REPLICA_TIMEOUT);
                client.replica_write(r).await.is_ok()
            });
        }
        let mut acks = 0;
        while let Some(r) = set.join_next().await {
            if matches!(r, Ok(true)) {
                acks += 1;
            }
        }
        acks
    }

    /// A QUORUM write of one op: durable here, then in a majority.
    pub async fn write(
        &self,
        op: WriteOp,
        req_idem: Option<crate::kv::commit::Idempotency>,
    ) -> Result<WriteOutcome, KvError> {
        let placement = self.placement(&op.row)?;
        let (table, key) = (op.row.table.clone(), op.row.key.clone());
        let mut outcomes = self
            .node
            .write(WriteRequest { ops: vec![op], level: Some(Level::Eventual), idempotency: req_idem })
            .await?;
        let outcome =
            outcomes.pop().ok_or_else(|| KvError::Storage("committer returned no outcome".into()))?;
        let need = placement.replica_regions.len() / 2 + 1;
        if need <= 1 {
            return Ok(outcome);
        }
        let Some(row) = self.node.stored_row(&table, &key)? else {
            // A delete of a row that never existed wrote nothing anywhere.
            return Ok(outcome);
        };
        let others = self.others(&placement, &table, &key);
        let acks = 1 + self.push(&others, &table, &key, &row).await;
        metrics::counter!("geokv_quorum_writes_total", "outcome" => if acks >= need { "ok" } else { "short" })
            .increment(1);
        if acks >= need {
            Ok(outcome)
        } else {
            Err(unavailable(format!(
                "{acks} of {} replica regions hold the write, {need} needed; it is durable here and will \
                 replicate, but it is not acknowledged at QUORUM",
                placement.replica_regions.len()
            )))
        }
    }

    /// A QUORUM read: merges a majority's states and repairs the replicas.
    pub async fn read(&self, row: &RowRef) -> Result<Option<Row>, KvError> {
        let placement = self.placement(row)?;
        let need = placement.replica_regions.len() / 2 + 1;
        let local = self.node.stored_row(&row.table, &row.key)?;
        let others = self.others(&placement, &row.table, &row.key);
        let mut set = JoinSet::new();
        for m in &others {
            let Some(mut client) = self.consensus.peers().client(m.id) else { continue };
            let req = pb::ReplicaReadRequest { table: row.table.clone(), key: row.key.clone() };
            let member = m.clone();
            set.spawn(async move {
                let mut r = tonic::Request::new(req);
                r.set_timeout(REPLICA_TIMEOUT);
                (member, client.replica_read(r).await.map(|r| r.into_inner()))
            });
        }
        let mut answered: Vec<(Member, Option<Row>)> = Vec::new();
        while let Some(joined) = set.join_next().await {
            let Ok((member, Ok(reply))) = joined else { continue };
            let state = if reply.found {
                match Row::open(&reply.row, || format!("{}/{}", row.table, String::from_utf8_lossy(&row.key)))
                {
                    Ok(r) => Some(r),
                    Err(e) => {
                        tracing::warn!(region = %member.region, error = %e, "QUORUM read: bad replica state");
                        continue;
                    }
                }
            } else {
                None
            };
            answered.push((member, state));
            if 1 + answered.len() >= need {
                // A majority answered; the rest are not waited for.
                break;
            }
        }
        set.abort_all();
        if 1 + answered.len() < need {
            return Err(unavailable(format!(
                "{} of {} replica regions answered, {need} needed",
                1 + answered.len(),
                placement.replica_regions.len()
            )));
        }
        let mut merged: Option<Row> = local.clone();
        for (_, state) in &answered {
            if let Some(s) = state {
                match &mut merged {
                    None => merged = Some(s.clone()),
                    Some(m) => {
                        merge_row(m, s);
                    }
                }
            }
        }
        if let Some(m) = &merged {
            let stale: Vec<Member> = answered
                .iter()
                .filter(|(_, s)| s.as_ref() != Some(m))
                .map(|(member, _)| member.clone())
                .collect();
            if !stale.is_empty() {
                metrics::counter!("geokv_read_repairs_total").increment(stale.len() as u64);
                self.push(&stale, &row.table, &row.key, m).await;
            }
            if local.as_ref() != Some(m) {
                self.node.merge_rows(vec![(row.table.clone(), row.key.clone(), m.clone())]).await?;
            }
        }
        Ok(merged)
    }
}
