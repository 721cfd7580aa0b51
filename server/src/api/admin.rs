//! The `geokv.v1.Admin` service: node, cluster and replication status,
//! replication control, residency audits, digests, the partition map, the
//! access audit log and row location; region-wide answers gather every
//! node of the region.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use geokv_proto::v1 as pb;
use pb::admin_client::AdminClient;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use super::access::authorize_call;
use super::convert;
use super::forward::{on_behalf, Peers};
use crate::error::KvError;
use crate::kv::Node;
use crate::security::authn::Caller;
use crate::security::grants::Privilege;

/// The `geokv.v1.Admin` service over one node.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
    replicator: Arc<crate::replication::Replicator>,
    /// For region-wide answers (status, audit, digest) from every node.
    peers: Peers,
    /// The control plane, for the epochs of backups and restores.
    consensus: Option<Arc<crate::consensus::Consensus>>,
}

impl AdminService {
    pub fn new(node: Arc<Node>, replicator: Arc<crate::replication::Replicator>, peers: Peers) -> Self {
        Self { node, replicator, peers, consensus: None }
    }

    /// With the control plane (backups record epochs, restores raise them).
    pub fn with_consensus(mut self, consensus: Arc<crate::consensus::Consensus>) -> Self {
        self.consensus = Some(consensus);
        self
    }

    fn link(&self, s: crate::replication::ship::LinkSnapshot) -> pb::ReplicationLink {
        let backlog_entries = s.head_seq.saturating_sub(s.acked_seq);
        pb::ReplicationLink {
            source: s.source,
            destination: s.destination,
            paused: s.paused,
            connected: s.connected,
            acked_seq: s.acked_seq,
            head_seq: s.head_seq,
            lag_seconds: s.lag_seconds,
            lag_entries: s.lag_entries,
            lag_bytes: s.lag_bytes,
            skipped_by_residency: s.skipped_by_residency,
            shipped_bytes: s.shipped_bytes,
            last_error: s.last_error,
            destination_node: s.destination_node,
            source_node: s.source_node,
            repair_state: s.repair_state,
            repairs_started: s.repairs_started,
            repairs_finished: s.repairs_finished,
            rows_repaired: s.rows_repaired,
            repair_bytes: s.repair_bytes,
            backlog_entries,
        }
    }

    fn control(&self, destination: &str, paused: bool) -> Result<Vec<pb::ReplicationLink>, KvError> {
        let links = self.replicator.links_to(destination);
        if links.is_empty() && self.node.config().regions.iter().all(|r| r.name != destination) {
            return Err(KvError::UnknownRegion {
                region: destination.to_string(),
                known: self.replicator.links().iter().map(|l| l.destination.clone()).collect(),
            });
        }
        for link in &links {
            link.set_paused(paused);
        }
        tracing::info!(destination, paused, "replication control");
        Ok(links.iter().map(|l| self.link(l.snapshot(&self.node))).collect())
    }

    /// Pauses or resumes this node's links to a region and, unless the
    /// request is node-only, those of every other node of this region
    /// (admins only).
    async fn control_region(
        &self,
        request: Request<pb::ReplicationControlRequest>,
        paused: bool,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        let op = if paused { "admin.pause_replication" } else { "admin.resume_replication" };
        let (caller, _access) = authorize_call(&self.node, &request, op, Some(Privilege::Admin), &[], None)?;
        let caller = &caller;
        let req = request.into_inner();
        let mut links = self.control(&req.destination, paused)?;
        if !req.node_only {
            let fan = pb::ReplicationControlRequest { node_only: true, ..req };
            let others = self
                .on_region_peers(caller, fan, |mut c, r| async move {
                    if paused {
                        c.pause_replication(r).await
                    } else {
                        c.resume_replication(r).await
                    }
                })
                .await?;
            links.extend(others.into_iter().filter_map(|o| o.link));
        }
        Ok(Response::new(pb::ReplicationControlResponse { link: links.into_iter().next() }))
    }

    /// Runs `call` on every other node of this region (node-only requests),
    /// failing if any node cannot answer: a partial answer would pass for a
    /// whole one.
    async fn on_region_peers<Req, Resp, F, Fut>(
        &self,
        caller: &Caller,
        req: Req,
        call: F,
    ) -> Result<Vec<Resp>, Status>
    where
        Req: Clone,
        F: Fn(AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        self.on_region_peers_within(caller, req, ADMIN_FANOUT_TIMEOUT, call).await
    }

    /// [`Self::on_region_peers`] with each node's deadline.
    async fn on_region_peers_within<Req, Resp, F, Fut>(
        &self,
        caller: &Caller,
        req: Req,
        timeout: Duration,
        call: F,
    ) -> Result<Vec<Resp>, Status>
    where
        Req: Clone,
        F: Fn(AdminClient<Channel>, Request<Req>) -> Fut,
        Fut: Future<Output = Result<Response<Resp>, Status>>,
    {
        let mut out = Vec::new();
        for peer in self.node.topology().region_peers() {
            let client = self.peers.admin(peer)?;
            let mut request = on_behalf(req.clone(), &[], self.node.actor(), caller);
            request.set_timeout(timeout);
            let resp = call(client, request).await.map_err(|s| {
                Status::new(s.code(), format!("node {} of this region: {}", peer.actor(), s.message()))
            })?;
            out.push(resp.into_inner());
        }
        Ok(out)
    }
}

/// Audit records returned when a request names no limit, and at most.
const AUDIT_READ_DEFAULT: usize = 1000;
const AUDIT_READ_MAX: usize = 10_000;

/// Deadline of one node's part of a region-wide admin request (a full
/// scan of its store for audits and digests).
const ADMIN_FANOUT_TIMEOUT: Duration = Duration::from_secs(120);

/// Deadline of one node's part of a backup or restore (a full scan of its
/// store, or a load of its part of a backup).
const BACKUP_FANOUT_TIMEOUT: Duration = Duration::from_secs(1800);

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn node_status(
        &self,
        request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusResponse>, Status> {
        let (_caller, _access) = authorize_call(&self.node, &request, "admin.node_status", None, &[], None)?;
        let cfg = self.node.config();
        let conflicts = self.node.conflicts();
        let gc = self.node.gc().stats();
        let tables = cfg
            .tables
            .iter()
            .map(|t| pb::TableInfo {
                name: t.name.clone(),
                locality: t.locality.as_str().into(),
                default_consistency: t.default_consistency.as_str().into(),
                conflict_policy: t.conflict.as_str().into(),
                home_region: t
                    .home_region
                    .clone()
                    .or_else(|| t.default_home_region.clone())
                    .unwrap_or_default(),
                zone: t.zone.clone().unwrap_or_default(),
                conflicts: conflicts.get(&t.name).copied().unwrap_or(0),
            })
            .collect();
        Ok(Response::new(pb::NodeStatusResponse {
            node_id: cfg.node_id.clone(),
            region: cfg.region.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.node.uptime().as_millis() as u64,
            data_dir: cfg.data_dir.display().to_string(),
            regions: cfg.region_names(),
            tables,
            log_seq: self.node.log_seq(),
            hlc: self.node.hlc().now().0,
            durable_writes: cfg.storage.sync,
            storage_engine: self.node.engine().kind().into(),
            tombstones: gc.tombstones,
            tombstone_sweeps: gc.sweeps,
            tombstones_collected: self.node.tombstones_collected(),
            log_entries_trimmed: gc.log_trimmed,
        }))
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let (_caller, _access) =
            authorize_call(&self.node, &request, "admin.cluster_status", None, &[], None)?;
        let cfg = self.node.config();
        let regions = cfg
            .regions
            .iter()
            .map(|r| {
                let is_self = r.name == cfg.region;
                let client_addrs: Vec<String> =
                    self.node.topology().nodes(&r.name).iter().map(|n| n.client_addr.clone()).collect();
                let health = if is_self {
                    "self"
                } else if self.replicator.is_healthy(&r.name) {
                    "healthy"
                } else {
                    "unreachable"
                };
                pb::RegionInfo {
                    name: r.name.clone(),
                    zone: cfg.zone_of(&r.name).map(|z| z.name.clone()).unwrap_or_default(),
                    client_addrs,
                    peer_addrs: self.node.topology().nodes(&r.name).iter().map(|n| n.addr.clone()).collect(),
                    health: health.into(),
                    last_contact_ms: if is_self {
                        0
                    } else {
                        self.replicator
                            .last_contact(&r.name)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(u64::MAX)
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::ClusterStatusResponse { answered_by_region: cfg.region.clone(), regions }))
    }

    async fn replication_status(
        &self,
        request: Request<pb::ReplicationStatusRequest>,
    ) -> Result<Response<pb::ReplicationStatusResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.replication_status", None, &[], None)?;
        let node_only = request.into_inner().node_only;
        let mut links: Vec<pb::ReplicationLink> =
            self.replicator.links().into_iter().map(|l| self.link(l.snapshot(&self.node))).collect();
        if !node_only {
            let req = pb::ReplicationStatusRequest { node_only: true };
            for other in self
                .on_region_peers(&caller, req, |mut c, r| async move { c.replication_status(r).await })
                .await?
            {
                links.extend(other.links);
            }
        }
        Ok(Response::new(pb::ReplicationStatusResponse { links }))
    }

    async fn pause_replication(
        &self,
        request: Request<pb::ReplicationControlRequest>,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        self.control_region(request, true).await
    }

    async fn resume_replication(
        &self,
        request: Request<pb::ReplicationControlRequest>,
    ) -> Result<Response<pb::ReplicationControlResponse>, Status> {
        self.control_region(request, false).await
    }

    async fn residency_audit(
        &self,
        request: Request<pb::ResidencyAuditRequest>,
    ) -> Result<Response<pb::ResidencyAuditResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.residency_audit", Some(Privilege::Admin), &[], None)?;
        let node_only = request.into_inner().node_only;
        let node = self.node.clone();
        let (checked, findings) = tokio::task::spawn_blocking(move || node.residency_audit())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let region = self.node.config().region.clone();
        let node_id = self.node.config().node_id.clone();
        let violations = findings
            .into_iter()
            .map(|f| pb::ResidencyViolationRow {
                table: f.table,
                key: f.key,
                zone: f.zone,
                allowed_regions: f.allowed_regions,
                stored_in_region: region.clone(),
                stored_on_node: node_id.clone(),
            })
            .collect();
        let mut out = pb::ResidencyAuditResponse { region, rows_checked: checked, violations, nodes: 1 };
        if !node_only {
            let req = pb::ResidencyAuditRequest { node_only: true };
            for other in self
                .on_region_peers(&caller, req, |mut c, r| async move { c.residency_audit(r).await })
                .await?
            {
                out.rows_checked += other.rows_checked;
                out.violations.extend(other.violations);
                out.nodes += other.nodes;
            }
        }
        Ok(Response::new(out))
    }

    async fn compact(
        &self,
        request: Request<pb::CompactRequest>,
    ) -> Result<Response<pb::CompactResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.compact", Some(Privilege::Admin), &[], None)?;
        let node_only = request.into_inner().node_only;
        let before = crate::kv::expiry::stripped_total();
        let engine = self.node.engine().clone();
        tokio::task::spawn_blocking(move || engine.compact())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::from(KvError::Storage(e.to_string())))?;
        let mut out = pb::CompactResponse {
            region: self.node.config().region.clone(),
            nodes: 1,
            expired_stripped: crate::kv::expiry::stripped_total().saturating_sub(before),
        };
        if !node_only {
            let req = pb::CompactRequest { node_only: true };
            for other in
                self.on_region_peers(&caller, req, |mut c, r| async move { c.compact(r).await }).await?
            {
                out.nodes += other.nodes;
                out.expired_stripped += other.expired_stripped;
            }
        }
        Ok(Response::new(out))
    }

    async fn erase_subject(
        &self,
        request: Request<pb::EraseSubjectRequest>,
    ) -> Result<Response<pb::EraseSubjectResponse>, Status> {
        let subject = request.get_ref().subject.clone();
        let (caller, _access) = authorize_call(
            &self.node,
            &request,
            "admin.erase_subject",
            Some(Privilege::Erase),
            &[],
            Some(&subject),
        )?;
        let req = request.into_inner();
        let receipt = self.node.erase_subject(&req.subject, req.fence_hlc).await?;
        let fence_hlc = receipt.fence_hlc;
        let mut out =
            pb::EraseSubjectResponse { fence_hlc, receipts: vec![convert::receipt(&self.node, receipt)] };
        if !req.node_only {
            let peer_req = pb::EraseSubjectRequest { subject: req.subject, fence_hlc, node_only: true };
            for other in self
                .on_region_peers(&caller, peer_req, |mut c, r| async move { c.erase_subject(r).await })
                .await?
            {
                out.receipts.extend(other.receipts);
            }
        }
        Ok(Response::new(out))
    }

    async fn export_subject(
        &self,
        request: Request<pb::ExportSubjectRequest>,
    ) -> Result<Response<pb::ExportSubjectResponse>, Status> {
        let subject = request.get_ref().subject.clone();
        let (caller, _access) = authorize_call(
            &self.node,
            &request,
            "admin.export_subject",
            Some(Privilege::Export),
            &[],
            Some(&subject),
        )?;
        let req = request.into_inner();
        let node = self.node.clone();
        let s = req.subject.clone();
        let rows = tokio::task::spawn_blocking(move || node.export_subject(&s))
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let now_ms = crate::kv::expiry::read_ms(self.node.hlc());
        let read_hlc = self.node.hlc().now().0;
        let mut out = pb::ExportSubjectResponse {
            rows: rows.iter().map(|r| convert::exported_row(&self.node, r, now_ms, read_hlc)).collect(),
        };
        if !req.node_only {
            let peer_req = pb::ExportSubjectRequest { subject: req.subject, node_only: true };
            for other in self
                .on_region_peers(&caller, peer_req, |mut c, r| async move { c.export_subject(r).await })
                .await?
            {
                out.rows.extend(other.rows);
            }
        }
        Ok(Response::new(out))
    }

    async fn digest(
        &self,
        request: Request<pb::DigestRequest>,
    ) -> Result<Response<pb::DigestResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.digest", Some(Privilege::Admin), &[], None)?;
        let node_only = request.into_inner().node_only;
        let node = self.node.clone();
        let mine = tokio::task::spawn_blocking(move || node.digest())
            .await
            .map_err(|e| Status::internal(e.to_string()))??;
        let region = self.node.config().region.clone();
        let mut parts: Vec<pb::PartitionDigest> = mine
            .into_iter()
            .map(|d| pb::PartitionDigest {
                table: d.table,
                zone: d.zone,
                partition: d.partition,
                rows: d.rows,
                digest: d.digest,
            })
            .collect();
        if node_only {
            return Ok(Response::new(pb::DigestResponse {
                region,
                digests: Vec::new(),
                partitions: parts,
                nodes: 1,
            }));
        }
        let mut nodes = 1;
        let req = pb::DigestRequest { node_only: true };
        for other in self.on_region_peers(&caller, req, |mut c, r| async move { c.digest(r).await }).await? {
            parts.extend(other.partitions);
            nodes += other.nodes;
        }
        let combined = crate::kv::combine_digests(
            parts
                .into_iter()
                .map(|p| crate::kv::PartitionDigest {
                    table: p.table,
                    zone: p.zone,
                    partition: p.partition,
                    rows: p.rows,
                    digest: p.digest,
                })
                .collect(),
        );
        Ok(Response::new(pb::DigestResponse {
            region,
            digests: combined
                .into_iter()
                .map(|d| pb::ZoneDigest { table: d.table, zone: d.zone, rows: d.rows, digest: d.digest })
                .collect(),
            partitions: Vec::new(),
            nodes,
        }))
    }

    async fn partition_map(
        &self,
        request: Request<pb::PartitionMapRequest>,
    ) -> Result<Response<pb::PartitionMapResponse>, Status> {
        let (_caller, _access) =
            authorize_call(&self.node, &request, "admin.partition_map", None, &[], None)?;
        let t = self.node.topology();
        let regions = t
            .regions
            .iter()
            .map(|r| pb::RegionPartitions {
                region: r.name.clone(),
                node_ids: r.nodes.iter().map(|n| n.id.clone()).collect(),
                owners: (0..t.partitions)
                    .filter_map(|p| {
                        t.owner(&r.name, p)
                            .map(|n| pb::PartitionOwner { partition: p, node_id: n.id.clone() })
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::PartitionMapResponse {
            partitions: t.partitions,
            regions,
            answered_by_node: self.node.actor(),
        }))
    }

    async fn audit_log(
        &self,
        request: Request<pb::AuditLogRequest>,
    ) -> Result<Response<pb::AuditLogResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.audit_log", Some(Privilege::Admin), &[], None)?;
        let req = request.into_inner();
        let limit = match req.limit {
            0 => AUDIT_READ_DEFAULT,
            n => (n as usize).min(AUDIT_READ_MAX),
        };
        let region = self.node.config().region.clone();
        let mut records = Vec::new();
        if let Some(audit) = self.node.security().audit() {
            let principal = (!req.principal.is_empty()).then_some(req.principal.as_str());
            let table = (!req.table.is_empty()).then_some(req.table.as_str());
            let found = audit
                .query(req.since_ms, principal, table, limit)
                .map_err(|e| Status::from(KvError::Storage(e.to_string())))?;
            let me = self.node.actor();
            records.extend(found.into_iter().map(|r| pb::AuditEntry { node: me.clone(), ..r.into() }));
        }
        if !req.node_only {
            let fan = pb::AuditLogRequest { node_only: true, ..req };
            for other in
                self.on_region_peers(&caller, fan, |mut c, r| async move { c.audit_log(r).await }).await?
            {
                records.extend(other.records);
            }
            records.sort_by_key(|r| r.time_ms);
            records.truncate(limit);
        }
        Ok(Response::new(pb::AuditLogResponse { region, records }))
    }

    async fn backup_create(
        &self,
        request: Request<pb::BackupCreateRequest>,
    ) -> Result<Response<pb::BackupCreateResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.backup_create", Some(Privilege::Admin), &[], None)?;
        let req = request.into_inner();
        let node = self.node.clone();
        let control = self.consensus.as_ref().map(|c| c.control_state());
        let id = req.backup_id.clone();
        let part = tokio::task::spawn_blocking(move || crate::backup::create_node_part(&node, control, &id))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .inspect_err(|e| tracing::warn!(backup = %req.backup_id, error = %e, "backup failed"))?;
        tracing::info!(backup = %req.backup_id, rows = part.rows(), files = part.files.len(), "backup written");
        let mut node_parts = vec![serde_json::to_string(&part).map_err(|e| Status::internal(e.to_string()))?];
        if !req.node_only {
            let fan = pb::BackupCreateRequest { node_only: true, ..req };
            for other in self
                .on_region_peers_within(&caller, fan, BACKUP_FANOUT_TIMEOUT, |mut c, r| async move {
                    c.backup_create(r).await
                })
                .await?
            {
                node_parts.extend(other.node_parts);
            }
        }
        Ok(Response::new(pb::BackupCreateResponse { region: self.node.config().region.clone(), node_parts }))
    }

    async fn backup_restore(
        &self,
        request: Request<pb::BackupRestoreRequest>,
    ) -> Result<Response<pb::BackupRestoreResponse>, Status> {
        let (caller, _access) =
            authorize_call(&self.node, &request, "admin.backup_restore", Some(Privilege::Admin), &[], None)?;
        let req = request.into_inner();
        let manifest = crate::backup::Manifest::parse(&req.manifest)?;
        let cfg = self.node.config();
        if req.prepare {
            crate::backup::prepare_restore(&self.node, &manifest).await.inspect_err(
                |e| tracing::warn!(backup = %manifest.backup_id, error = %e, "restore refused"),
            )?;
            let mut nodes = vec![pb::BackupRestoreNode {
                region: cfg.region.clone(),
                node_id: cfg.node_id.clone(),
                zones: Vec::new(),
            }];
            if !req.node_only {
                let fan = pb::BackupRestoreRequest { node_only: true, ..req };
                for other in self
                    .on_region_peers_within(&caller, fan, BACKUP_FANOUT_TIMEOUT, |mut c, r| async move {
                        c.backup_restore(r).await
                    })
                    .await?
                {
                    nodes.extend(other.nodes);
                }
            }
            return Ok(Response::new(pb::BackupRestoreResponse {
                region: cfg.region.clone(),
                nodes,
                homes_raised: 0,
            }));
        }
        let restored = crate::backup::restore_node(&self.node, &manifest)
            .await
            .inspect_err(|e| tracing::warn!(backup = %manifest.backup_id, error = %e, "restore failed"))?;
        tracing::info!(backup = %manifest.backup_id, rows = restored.values().sum::<u64>(), "backup restored");
        let mut nodes = vec![pb::BackupRestoreNode {
            region: cfg.region.clone(),
            node_id: cfg.node_id.clone(),
            zones: restored.into_iter().map(|(zone, rows)| pb::BackupRestoreZone { zone, rows }).collect(),
        }];
        let mut homes_raised = 0;
        if !req.node_only {
            let fan = pb::BackupRestoreRequest { node_only: true, ..req };
            for other in self
                .on_region_peers_within(&caller, fan, BACKUP_FANOUT_TIMEOUT, |mut c, r| async move {
                    c.backup_restore(r).await
                })
                .await?
            {
                nodes.extend(other.nodes);
            }
            // Every epoch of the backup is history now: leases move above
            // them (the same command from each region applies once).
            let homes = crate::backup::restored_homes(&manifest);
            if !homes.is_empty() {
                let Some(consensus) = &self.consensus else {
                    return Err(Status::failed_precondition("no control plane to raise the epochs in"));
                };
                homes_raised = homes.len() as u32;
                let cmd = crate::consensus::control::ControlCommand::RestoreEpochs {
                    homes,
                    now_ms: self.node.hlc().now().physical_ms(),
                };
                match consensus
                    .propose(crate::consensus::CONTROL_GROUP, crate::consensus::Command::Control(cmd), 0)
                    .await?
                {
                    (crate::consensus::Reply::Control(crate::consensus::control::ControlReply::Done), _) => {}
                    (other, _) => {
                        return Err(Status::internal(format!("raising the epochs was answered {other:?}")));
                    }
                }
            }
        }
        Ok(Response::new(pb::BackupRestoreResponse { region: cfg.region.clone(), nodes, homes_raised }))
    }

    async fn locate(
        &self,
        request: Request<pb::LocateRequest>,
    ) -> Result<Response<pb::LocateResponse>, Status> {
        let (_caller, _access) = authorize_call(&self.node, &request, "admin.locate", None, &[], None)?;
        let row = convert::row_ref(request.into_inner().row)?;
        let cfg = self.node.config();
        let table =
            cfg.table(&row.table).ok_or_else(|| KvError::UnknownTable { table: row.table.clone() })?;
        let placement = crate::residency::resolve(cfg, table, &row.locality)?;
        let t = self.node.topology();
        let partition = t.partition_of(&row.table, &row.key);
        let replicas = placement
            .replica_regions
            .iter()
            .map(|region| {
                let owner = t.owner(region, partition);
                pb::LocateReplica {
                    region: region.clone(),
                    node_id: owner.map(|n| n.id.clone()).unwrap_or_default(),
                    client_addr: owner.map(|n| n.client_addr.clone()).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::LocateResponse {
            table: row.table.clone(),
            partition,
            home_node_id: t
                .owner(&placement.home_region, partition)
                .map(|n| n.id.clone())
                .unwrap_or_default(),
            home_region: placement.home_region,
            zone: placement.zone,
            replicas,
        }))
    }
}
