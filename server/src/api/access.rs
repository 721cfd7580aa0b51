//! What each KV request targets (tables, row key, privilege, audit name),
//! and the authorization every handler runs first, which opens the call's
//! audit record (docs/security.md).

use geokv_proto::v1 as pb;
use tonic::{Request, Status};

use crate::kv::Node;
use crate::security::authn::{Access, Caller};
use crate::security::grants::Privilege;

/// What a KV request needs, for authorization and the audit log.
pub(super) trait Target {
    /// Operation name in the audit log.
    const OP: &'static str;
    const PRIVILEGE: Privilege;
    /// Tables it touches and the key of its row, if it names one row.
    fn target(&self) -> (Vec<&str>, Option<&[u8]>);
}

macro_rules! target_row {
    ($($t:ty => $op:literal, $p:ident);* $(;)?) => {$(
        impl Target for $t {
            const OP: &'static str = $op;
            const PRIVILEGE: Privilege = Privilege::$p;
            fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
                match &self.row {
                    Some(r) => (vec![r.table.as_str()], Some(r.key.as_slice())),
                    None => (Vec::new(), None),
                }
            }
        }
    )*};
}

target_row!(
    pb::GetRequest => "kv.get", Read;
    pb::PutRequest => "kv.put", Write;
    pb::DeleteRequest => "kv.delete", Write;
    pb::CounterAddRequest => "kv.counter_add", Write;
    pb::CounterGetRequest => "kv.counter_get", Read;
    pb::SetAddRequest => "kv.set_add", Write;
    pb::SetRemoveRequest => "kv.set_remove", Write;
    pb::SetMembersRequest => "kv.set_members", Read;
    pb::CompareAndSetRequest => "kv.compare_and_set", Write;
);

impl Target for pb::BatchRequest {
    const OP: &'static str = "kv.batch";
    const PRIVILEGE: Privilege = Privilege::Write;
    fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
        let mut tables: Vec<&str> = batch_rows(self).map(|r| r.table.as_str()).collect();
        tables.sort_unstable();
        tables.dedup();
        (tables, None)
    }
}

impl Target for pb::WatchRequest {
    const OP: &'static str = "kv.watch";
    const PRIVILEGE: Privilege = Privilege::Watch;
    fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
        (vec![self.table.as_str()], None)
    }
}

impl Target for pb::ScanRequest {
    const OP: &'static str = "kv.scan";
    const PRIVILEGE: Privilege = Privilege::Read;
    fn target(&self) -> (Vec<&str>, Option<&[u8]>) {
        (vec![self.table.as_str()], None)
    }
}

/// Authorizes a request's caller for `privilege` (None: any authenticated
/// caller) and opens its audit record; a denial is audited and returned.
pub(crate) fn authorize_call<T>(
    node: &Node,
    request: &Request<T>,
    op: &'static str,
    privilege: Option<Privilege>,
    tables: &[&str],
    key: Option<&[u8]>,
) -> Result<(Caller, Access), Status> {
    let caller = Caller::of(request);
    let security = node.security();
    let mut access = None;
    if tables.is_empty() {
        access = Some(security.authorize(&caller, op, privilege, None, key)?);
    }
    for table in tables {
        // One record for the request: the first table's access is kept,
        // the others only authorize.
        let a = security.authorize(&caller, op, privilege, Some(table), key)?;
        match &access {
            None => access = Some(a),
            Some(_) => a.forwarded(),
        }
    }
    let access = access.ok_or_else(|| Status::internal("no access record"))?;
    Ok((caller, access))
}

/// The rows a batch names, in order (ops without a row are left out).
pub(super) fn batch_rows(req: &pb::BatchRequest) -> impl Iterator<Item = &pb::RowRef> {
    req.ops.iter().filter_map(|op| match &op.op {
        Some(pb::batch_op::Op::Put(p)) => p.row.as_ref(),
        Some(pb::batch_op::Op::Delete(d)) => d.row.as_ref(),
        None => None,
    })
}
