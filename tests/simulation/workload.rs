//! The workload: writes at LOCAL, EVENTUAL and QUORUM from clients in every
//! region, planned up front from the seed, and the history of what each
//! write's caller saw (acknowledged, or an error that leaves it unknown).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use geokv_proto::v1 as pb;
use geokv_server::config::Level;
use rand::rngs::StdRng;
use rand::Rng;

use crate::cluster::{zone_regions, Nodes, REGIONS, TABLE_COUNTERS, TABLE_KV};

/// Clients start once the control plane had time to elect and grant leases.
pub const START_MS: u64 = 3_000;
/// No write starts after this.
pub const END_MS: u64 = 12_500;
/// Deadline of one write as the client sees it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Register keys and counter keys; key `i` is homed in `REGIONS[i % 4]`.
const KV_KEYS: usize = 8;
const COUNTER_KEYS: usize = 4;
/// Concurrent clients, each writing one op at a time.
const LANES: usize = 4;
/// Gap between one client's writes, in ms.
const GAP_MS: std::ops::Range<u64> = 80..400;

/// What one write does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpKind {
    /// A blind put (empty context): the value becomes a sibling of whatever
    /// is stored, so it may never disappear.
    Put { value: String },
    /// A counter increment.
    Add { delta: i64 },
}

/// One planned write.
#[derive(Debug, Clone)]
pub struct PlannedOp {
    pub id: u64,
    pub at_ms: u64,
    /// The region whose node the client sends it to.
    pub entry: &'static str,
    pub level: Level,
    pub table: &'static str,
    pub key: String,
    pub home: &'static str,
    pub kind: OpKind,
}

/// What the caller saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Acked {
        home_region: String,
        epoch: u64,
        accepted_by: String,
    },
    /// An error: the write may or may not have been applied.
    Failed {
        code: String,
        message: String,
    },
}

/// One write and its outcome.
#[derive(Debug, Clone)]
pub struct OpRecord {
    pub op: PlannedOp,
    pub outcome: Outcome,
    pub done_ms: u64,
}

/// Every write's record, in completion order.
pub type History = Arc<Mutex<Vec<OpRecord>>>;

/// The writes of one run, one list per client.
pub struct Plan {
    pub lanes: Vec<Vec<PlannedOp>>,
}

pub fn kv_key(i: usize) -> (String, &'static str) {
    (format!("k{i}"), REGIONS[i % REGIONS.len()])
}

pub fn counter_key(i: usize) -> (String, &'static str) {
    (format!("c{i}"), REGIONS[i % REGIONS.len()])
}

impl Plan {
    pub fn generate(rng: &mut StdRng) -> Self {
        let mut id = 0;
        let lanes = (0..LANES)
            .map(|_| {
                let mut ops = Vec::new();
                let mut at = START_MS + rng.random_range(0..200);
                while at < END_MS {
                    let level = match rng.random_range(0..10) {
                        0..4 => Level::Local,
                        4..8 => Level::Eventual,
                        _ => Level::Quorum,
                    };
                    let (table, (key, home), kind) = if rng.random_bool(0.6) {
                        let k = kv_key(rng.random_range(0..KV_KEYS));
                        (TABLE_KV, k, OpKind::Put { value: format!("v{id}") })
                    } else {
                        let k = counter_key(rng.random_range(0..COUNTER_KEYS));
                        (TABLE_COUNTERS, k, OpKind::Add { delta: rng.random_range(1..=5) })
                    };
                    // Clients send each row only to regions of its zone: a
                    // row never transits a region outside it.
                    let allowed = zone_regions(home);
                    let entry = allowed[rng.random_range(0..allowed.len())];
                    ops.push(PlannedOp { id, at_ms: at, entry, level, table, key, home, kind });
                    id += 1;
                    at += rng.random_range(GAP_MS);
                }
                ops
            })
            .collect();
        Plan { lanes }
    }
}

fn level(l: Level) -> i32 {
    (match l {
        Level::Local => pb::WriteConsistency::WriteLocal,
        Level::Eventual => pb::WriteConsistency::WriteEventual,
        Level::Quorum => pb::WriteConsistency::WriteQuorum,
        Level::Strong => pb::WriteConsistency::WriteStrong,
    }) as i32
}

fn outcome(ack: Option<pb::WriteAck>) -> Outcome {
    match ack {
        Some(a) => {
            Outcome::Acked { home_region: a.home_region, epoch: a.epoch, accepted_by: a.accepted_by_region }
        }
        None => Outcome::Failed { code: "NO_ACK".into(), message: "a reply without an ack".into() },
    }
}

async fn execute(op: &PlannedOp) -> Outcome {
    let mut client = pb::kv_client::KvClient::new(crate::net::channel(op.entry, WRITE_TIMEOUT));
    let row = Some(pb::RowRef {
        table: op.table.into(),
        key: op.key.clone().into_bytes(),
        locality: Some(pb::row_ref::Locality::HomeRegion(op.home.into())),
    });
    let result = match &op.kind {
        OpKind::Put { value } => client
            .put(pb::PutRequest {
                row,
                value: value.clone().into_bytes(),
                consistency: level(op.level),
                context: Vec::new(),
                idempotency_key: String::new(),
                ttl_ms: 0,
            })
            .await
            .map(|r| r.into_inner().ack),
        OpKind::Add { delta } => client
            .counter_add(pb::CounterAddRequest {
                row,
                delta: *delta,
                consistency: level(op.level),
                idempotency_key: String::new(),
            })
            .await
            .map(|r| r.into_inner().ack),
    };
    match result {
        Ok(ack) => outcome(ack),
        Err(status) => Outcome::Failed {
            code: format!("{:?}", status.code()),
            message: status.message().chars().take(160).collect(),
        },
    }
}

/// Milliseconds of simulated time since the simulation started.
pub fn sim_ms() -> u64 {
    turmoil::sim_elapsed().map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The client host: runs every lane, waits for the heal, then waits (bounded)
/// until every region holds the same rows, and records when.
pub async fn client(
    plan: Plan,
    history: History,
    nodes: Arc<Nodes>,
    heal_at_ms: u64,
    converge_ms_max: u64,
    converged_at: Arc<Mutex<Option<u64>>>,
) -> turmoil::Result {
    let mut lanes = tokio::task::JoinSet::new();
    for lane in plan.lanes {
        let history = history.clone();
        lanes.spawn(async move {
            for op in lane {
                let now = sim_ms();
                if op.at_ms > now {
                    tokio::time::sleep(Duration::from_millis(op.at_ms - now)).await;
                }
                let outcome = execute(&op).await;
                let record = OpRecord { op, outcome, done_ms: sim_ms() };
                history.lock().unwrap_or_else(|p| p.into_inner()).push(record);
            }
        });
    }
    while let Some(joined) = lanes.join_next().await {
        joined?;
    }
    let now = sim_ms();
    if heal_at_ms > now {
        tokio::time::sleep(Duration::from_millis(heal_at_ms - now)).await;
    }
    while sim_ms() < heal_at_ms + converge_ms_max {
        if crate::check::observe(&nodes).is_ok_and(|o| crate::check::convergence(&o).is_empty()) {
            *converged_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(sim_ms());
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}
