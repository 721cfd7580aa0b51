//! Read-path decisions, free of IO so they are tested alone: which path a
//! read takes, and how stale the copy it returns may be
//! (docs/architecture.md section 19).

use crate::residency::ReadLevel;

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
