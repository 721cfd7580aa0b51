//! Routing and read-path decisions, free of IO so they are tested alone:
//! which path a write or a read takes, where a request goes when this node
//! cannot serve it, and how stale the copy a read returns may be
//! (docs/architecture.md sections 2 and 19). The gRPC handlers in `api/`
//! carry these decisions out.

use crate::config::Level;
use crate::error::KvError;
use crate::residency::ReadLevel;
use crate::topology::NodeRef;

/// How a write to a row is carried out, from its table and level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WritePath {
    /// The committer of this node (LOCAL at the home, EVENTUAL anywhere).
    Normal,
    /// A majority of the row's regions.
    Quorum,
    /// The row's consensus group: every write to a STRONG table.
    Strong,
}

/// A STRONG level asked of a row outside a STRONG table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAStrongTable;

/// The path of a write at `level` (the table's default when the request
/// names none). `consensus` says whether the node runs the consensus paths,
/// `strong_table` whether the row's table is a STRONG one. Every write to a
/// STRONG table goes through its group, whatever level it names; STRONG on
/// another table is refused (the caller checks residency first, so a row
/// that may not pass through this region is refused as such). Without
/// consensus every write takes the committer, which refuses the levels it
/// cannot give.
pub fn write_path(consensus: bool, strong_table: bool, level: Level) -> Result<WritePath, NotAStrongTable> {
    match level {
        _ if strong_table && consensus => Ok(WritePath::Strong),
        Level::Strong if consensus => Err(NotAStrongTable),
        Level::Quorum if consensus => Ok(WritePath::Quorum),
        _ => Ok(WritePath::Normal),
    }
}

/// The region a write refused here should be sent to: the row's home (or
/// the lease holder that fenced this node), unless the request already
/// crossed regions once (a request crosses at most once, so it never loops).
pub fn redirect_write(error: &KvError, arrived_cross_region: bool) -> Option<&str> {
    match error {
        KvError::NotHome { home, .. } | KvError::Fenced { holder: Some(home), .. }
            if !arrived_cross_region =>
        {
            Some(home)
        }
        _ => None,
    }
}

/// The region a read refused here as too stale should be sent to: the
/// writer this region trails most, unless the request already crossed
/// regions once.
pub fn redirect_read(error: &KvError, arrived_cross_region: bool) -> Option<&str> {
    match error {
        KvError::ReplicaStale { region, .. } if !arrived_cross_region => Some(region),
        _ => None,
    }
}

/// The node of this region a request on one row goes to: its owner, when
/// that is another node and no node of this region forwarded it already
/// (a request is forwarded at most once inside a region).
pub fn forward_in_region(arrived_in_region: bool, owner: Option<&NodeRef>) -> Option<&NodeRef> {
    owner.filter(|o| !arrived_in_region && !o.is_self)
}

/// The one node of this region owning every row of a batch (`owners`, one
/// per row), when it is not this one. A batch commits atomically on one
/// node, so rows owned by two nodes are refused, naming both.
pub fn batch_owner<'a>(
    owners: impl IntoIterator<Item = &'a NodeRef>,
) -> Result<Option<&'a NodeRef>, KvError> {
    let mut owner: Option<&NodeRef> = None;
    for o in owners {
        match owner {
            Some(prev) if prev.id != o.id => {
                return Err(KvError::InvalidField {
                    field: "ops",
                    why: format!(
                        "the rows of one batch must be owned by one node of the region; `{}` and `{}` own some (see `geokv locate`)",
                        prev.actor(),
                        o.actor()
                    ),
                })
            }
            _ => owner = Some(o),
        }
    }
    Ok(owner.filter(|o| !o.is_self))
}

/// How a read of a row is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPath {
    /// From this region's copy (LOCAL, BOUNDED, SESSION).
    Normal,
    /// From a majority of the row's regions.
    Quorum,
    /// A row of a STRONG table, through its consensus group.
    Strong(StrongRead),
}

/// How a read of a STRONG table's row is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StrongRead {
    /// Linearizable, through the group's leader: nothing newer exists.
    Linearizable,
    /// This node's copy of the group's state: it may trail the leader by an
    /// amount this node cannot bound, so the read says so.
    LocalCopy,
}

/// The path of a read at `level`. `consensus` says whether the node runs
/// the consensus paths (QUORUM, STRONG), `strong_table` whether the row's
/// table is a STRONG one, `member` whether this node holds a copy of the
/// row's consensus group.
///
/// A STRONG table's row read at LOCAL or SESSION is served from the local
/// copy of the group and reports no bound; BOUNDED and QUORUM, which
/// promise a bound or a majority, are served linearizably (staleness 0),
/// as is any read on a node outside the group.
pub fn choose(consensus: bool, strong_table: bool, member: bool, level: ReadLevel) -> ReadPath {
    match (consensus, strong_table, level) {
        (true, true, ReadLevel::Local | ReadLevel::Session) if member => {
            ReadPath::Strong(StrongRead::LocalCopy)
        }
        (true, true, _) => ReadPath::Strong(StrongRead::Linearizable),
        (true, false, ReadLevel::Quorum) => ReadPath::Quorum,
        _ => ReadPath::Normal,
    }
}

/// What a STRONG-table read reports as its staleness bound, in ms.
pub fn strong_staleness_ms(read: StrongRead) -> u64 {
    match read {
        StrongRead::Linearizable => 0,
        StrongRead::LocalCopy => UNKNOWN,
    }
}

/// A staleness no bound can be given for.
pub const UNKNOWN: u64 = u64::MAX;

/// The staleness bound of this region's copy of a row: the worst, over
/// every region that may write it (`writers`: the row's replica regions,
/// each of which accepts EVENTUAL and QUORUM writes, one of which holds
/// the home's lease), of how stale this node is with respect to that
/// region (`freshness_of`, None when no node there owns the partition).
/// `here` adds nothing: only this node writes its partitions here.
pub fn staleness_bound(here: &str, writers: &[String], freshness_of: impl Fn(&str) -> Option<u64>) -> u64 {
    stalest_writer(here, writers, freshness_of).map_or(0, |(_, ms)| ms)
}

/// The writer region this region's copy trails most, and by how much: where
/// a reader that needs fresher data should go.
pub fn stalest_writer<'a>(
    here: &str,
    writers: &'a [String],
    freshness_of: impl Fn(&str) -> Option<u64>,
) -> Option<(&'a str, u64)> {
    writers
        .iter()
        .filter(|r| r.as_str() != here)
        .map(|r| (r.as_str(), freshness_of(r).unwrap_or(UNKNOWN)))
        .max_by_key(|(_, ms)| *ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, is_self: bool) -> NodeRef {
        NodeRef {
            region: "us".into(),
            id: id.into(),
            addr: format!("127.0.0.1:1{id}"),
            client_addr: format!("127.0.0.1:2{id}"),
            is_self,
        }
    }

    #[test]
    fn writes_to_strong_tables_always_take_their_group() {
        for level in [Level::Local, Level::Eventual, Level::Quorum, Level::Strong] {
            assert_eq!(write_path(true, true, level), Ok(WritePath::Strong), "{level:?}");
        }
        assert_eq!(write_path(true, false, Level::Strong), Err(NotAStrongTable));
        assert_eq!(write_path(true, false, Level::Quorum), Ok(WritePath::Quorum));
        assert_eq!(write_path(true, false, Level::Local), Ok(WritePath::Normal));
        assert_eq!(write_path(true, false, Level::Eventual), Ok(WritePath::Normal));
        // Without consensus the committer gets every write and refuses the
        // levels it cannot give.
        assert_eq!(write_path(false, true, Level::Strong), Ok(WritePath::Normal));
        assert_eq!(write_path(false, false, Level::Quorum), Ok(WritePath::Normal));
    }

    #[test]
    fn a_refused_request_crosses_regions_at_most_once() {
        let not_home = KvError::NotHome { home: "eu".into(), here: "us".into() };
        let fenced = |holder: Option<&str>| KvError::Fenced {
            home: "us".into(),
            epoch: 3,
            current: 4,
            why: "lease moved".into(),
            holder: holder.map(str::to_string),
        };
        assert_eq!(redirect_write(&not_home, false), Some("eu"));
        assert_eq!(redirect_write(&not_home, true), None, "already crossed: answer the refusal");
        assert_eq!(redirect_write(&fenced(Some("ap")), false), Some("ap"), "to the new holder");
        assert_eq!(redirect_write(&fenced(None), false), None, "no holder known: nowhere to go");
        assert_eq!(redirect_write(&KvError::MissingField { field: "row" }, false), None);

        let stale = KvError::ReplicaStale { region: "eu".into(), why: "900 ms behind, 10 allowed".into() };
        assert_eq!(redirect_read(&stale, false), Some("eu"));
        assert_eq!(redirect_read(&stale, true), None);
        assert_eq!(redirect_read(&not_home, false), None, "a read is redirected only for staleness");
    }

    #[test]
    fn requests_go_to_their_owner_once_inside_a_region() {
        let (me, other) = (node("a", true), node("b", false));
        assert_eq!(forward_in_region(false, Some(&other)), Some(&other));
        assert_eq!(forward_in_region(true, Some(&other)), None, "forwarded once already");
        assert_eq!(forward_in_region(false, Some(&me)), None, "this node owns it");
        assert_eq!(forward_in_region(false, None), None);

        assert_eq!(batch_owner([&other, &other]).unwrap(), Some(&other));
        assert_eq!(batch_owner([&me, &me]).unwrap(), None);
        assert_eq!(batch_owner([]).unwrap(), None);
        let err = batch_owner([&me, &other]).unwrap_err();
        assert_eq!(err.reason(), "INVALID_ARGUMENT");
        assert!(err.to_string().contains("us/a") && err.to_string().contains("us/b"), "{err}");
    }

    fn regions(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_bound_is_the_stalest_writer_not_the_home() {
        let writers = regions(&["us", "eu", "ap"]);
        // Reading in us (the home): eu's writes are 800 ms behind, ap's 20.
        let fresh = |r: &str| match r {
            "eu" => Some(800),
            "ap" => Some(20),
            _ => panic!("this region is never asked"),
        };
        assert_eq!(staleness_bound("us", &writers, fresh), 800, "the home is not fresh by being the home");
        // A writer never heard from leaves the bound unknown.
        assert_eq!(staleness_bound("us", &writers, |r| (r == "eu").then_some(5)), UNKNOWN);
        // A row only this region may hold is always fresh here.
        assert_eq!(staleness_bound("us", &regions(&["us"]), |_| None), 0);
        // A stale reader is sent to the writer it trails most.
        assert_eq!(stalest_writer("us", &writers, fresh), Some(("eu", 800)));
    }

    #[test]
    fn strong_tables_are_never_reported_fresher_than_they_are() {
        use ReadLevel::*;
        for level in [Local, Session, Bounded { max_staleness_ms: 10 }, Quorum, Strong] {
            let path = choose(true, true, true, level);
            let ReadPath::Strong(read) = path else { panic!("{level:?} of a STRONG table took {path:?}") };
            let claimed = strong_staleness_ms(read);
            match level {
                Local | Session => assert_eq!((read, claimed), (StrongRead::LocalCopy, UNKNOWN)),
                _ => assert_eq!((read, claimed), (StrongRead::Linearizable, 0), "{level:?}"),
            }
            // A node outside the group has no copy to read.
            assert_eq!(choose(true, true, false, level), ReadPath::Strong(StrongRead::Linearizable));
        }
        assert_eq!(choose(true, false, true, Quorum), ReadPath::Quorum);
        assert_eq!(choose(true, false, true, Bounded { max_staleness_ms: 5 }), ReadPath::Normal);
        assert_eq!(choose(false, true, true, Strong), ReadPath::Normal, "no consensus: no STRONG path");
    }
}
