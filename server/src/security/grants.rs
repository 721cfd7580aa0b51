//! Authorization as data: which principal may do what, on which tables.
//!
//! Grants are read from the node's configuration and checked on every
//! request after authentication has named the principal (a client
//! certificate's CN or a token's subject). Everything not granted is
//! denied: an unknown principal, a node identity that is not listed, and a
//! table-level privilege asked for a table the grant does not name.
//!
//! The principal [`ROOT_PRINCIPAL`] is a built-in superuser that holds every
//! privilege without being listed, so an operator can always reach the
//! cluster to repair its grants (as `root` does in CockroachDB). Listing it
//! is refused by [`validate`]: a grant cannot restrict it, and a grant that
//! looks like a restriction would mislead a reader of the configuration.
//!
//! Privileges come in two kinds. Table-level ones ([`Privilege::Read`],
//! [`Privilege::Write`], [`Privilege::Watch`]) apply to the tables a grant
//! names, or to every table with `"*"`. Cluster-wide ones
//! ([`Privilege::Admin`], [`Privilege::Erase`], [`Privilege::Export`]) take
//! no tables; [`validate`] refuses a grant that mixes them with a table list
//! so that a reader never believes `admin` was scoped to a table.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

/// The built-in superuser: holds every privilege, needs no grant.
pub const ROOT_PRINCIPAL: &str = "root";
/// The table name in a grant that stands for every table, present and future.
pub const ALL_TABLES: &str = "*";
/// The prefix of a node's own identity, `node:<region>/<node>`.
pub const NODE_PRINCIPAL_PREFIX: &str = "node:";
/// Longest principal name (and longest region or node part of a node identity).
pub const PRINCIPAL_BYTES_MAX: usize = 64;

/// Something a principal may be allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Privilege {
    /// Table-level: point reads and scans.
    Read,
    /// Table-level: puts, deletes, counters, sets, compare-and-set.
    Write,
    /// Table-level: change streams.
    Watch,
    /// Cluster-wide: operating the cluster (the control-plane and admin
    /// RPCs).
    Admin,
    /// Cluster-wide: erasure of data on request.
    Erase,
    /// Cluster-wide: bulk export.
    Export,
}

impl Privilege {
    pub const ALL: [Privilege; 6] = [
        Privilege::Read,
        Privilege::Write,
        Privilege::Watch,
        Privilege::Admin,
        Privilege::Erase,
        Privilege::Export,
    ];

    /// The name as written in the configuration.
    pub fn name(self) -> &'static str {
        match self {
            Privilege::Read => "read",
            Privilege::Write => "write",
            Privilege::Watch => "watch",
            Privilege::Admin => "admin",
            Privilege::Erase => "erase",
            Privilege::Export => "export",
        }
    }

    /// Whether the privilege applies to the whole cluster rather than to
    /// tables (a grant's `tables` do not scope it).
    pub fn is_cluster_wide(self) -> bool {
        match self {
            Privilege::Read | Privilege::Write | Privilege::Watch => false,
            Privilege::Admin | Privilege::Erase | Privilege::Export => true,
        }
    }
}

impl fmt::Display for Privilege {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One grant as written in the configuration (`[[grants]]` in TOML).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrantConfig {
    /// A client certificate's CN, a token's subject, or a node identity
    /// `node:<region>/<node>`.
    pub principal: String,
    /// Table names, or `"*"` for every table. Cluster-wide privileges take
    /// none.
    #[serde(default)]
    pub tables: Vec<String>,
    #[serde(default)]
    pub privileges: Vec<Privilege>,
}

/// A request refused for want of a grant. `missing_grant` reads as the
/// grant that would have allowed it, so the message tells an operator what
/// to add (`read on table \`a\``, `admin`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("principal `{principal}` lacks the grant: {missing_grant}")]
pub struct Denied {
    pub principal: String,
    pub missing_grant: String,
}

/// What one principal holds, merged over all of its grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Held {
    cluster: BTreeSet<Privilege>,
    every_table: BTreeSet<Privilege>,
    tables: BTreeMap<String, BTreeSet<Privilege>>,
}

/// The grants of a node, indexed by principal for the request path.
///
/// Several grants for one principal add up; nothing subtracts, so the
/// order of grants in the configuration does not matter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    by_principal: BTreeMap<String, Held>,
}

impl Grants {
    /// Indexes `grants`. It does not validate them: the configuration does
    /// that at start-up with [`validate`], naming the bad field; anything
    /// malformed that reaches here only ever grants less (a table-level
    /// privilege without tables grants nothing, tables of a cluster-wide
    /// privilege are ignored).
    pub fn new(grants: &[GrantConfig]) -> Self {
        let mut by_principal: BTreeMap<String, Held> = BTreeMap::new();
        for g in grants {
            let held = by_principal.entry(g.principal.clone()).or_default();
            for &p in &g.privileges {
                if p.is_cluster_wide() {
                    held.cluster.insert(p);
                    continue;
                }
                for t in &g.tables {
                    if t == ALL_TABLES {
                        held.every_table.insert(p);
                    } else {
                        held.tables.entry(t.clone()).or_default().insert(p);
                    }
                }
            }
        }
        Self { by_principal }
    }

    /// Allows or denies `principal` the `privilege`, on `table` for a
    /// table-level privilege. `table` is ignored for a cluster-wide
    /// privilege. A table-level privilege asked with no table (an operation
    /// that spans every table) needs the privilege on `"*"`.
    pub fn check(&self, principal: &str, privilege: Privilege, table: Option<&str>) -> Result<(), Denied> {
        if principal == ROOT_PRINCIPAL {
            return Ok(());
        }
        let held = self.by_principal.get(principal);
        let allowed = match (privilege.is_cluster_wide(), table) {
            (true, _) => held.is_some_and(|h| h.cluster.contains(&privilege)),
            (false, None) => held.is_some_and(|h| h.every_table.contains(&privilege)),
            (false, Some(t)) => held.is_some_and(|h| {
                h.every_table.contains(&privilege) || h.tables.get(t).is_some_and(|s| s.contains(&privilege))
            }),
        };
        if allowed {
            return Ok(());
        }
        let missing_grant = match (privilege.is_cluster_wide(), table) {
            (true, _) => privilege.name().to_string(),
            (false, None) => format!("{privilege} on every table (`{ALL_TABLES}`)"),
            (false, Some(t)) => format!("{privilege} on table `{t}`"),
        };
        Err(Denied { principal: principal.to_string(), missing_grant })
    }

    /// Whether no principal other than root holds anything.
    pub fn is_empty(&self) -> bool {
        self.by_principal.is_empty()
    }
}

impl From<&[GrantConfig]> for Grants {
    fn from(grants: &[GrantConfig]) -> Self {
        Self::new(grants)
    }
}

/// The principal a node presents to its peers: `node:<region>/<node>`.
pub fn node_principal(region: &str, node: &str) -> String {
    format!("{NODE_PRINCIPAL_PREFIX}{region}/{node}")
}

/// 1-64 of a-z, 0-9, '_', '-', plus `extra`.
fn valid_name(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= PRINCIPAL_BYTES_MAX
        && s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-' || extra.contains(&b)
        })
}

/// Whether `principal` is a name a grant may hold: 1-64 of a-z, 0-9, '_',
/// '-', '.', '@', or a node identity `node:<region>/<node>` whose region
/// and node follow the configuration's naming rule (1-64 of a-z, 0-9, '_',
/// '-').
pub fn valid_principal(principal: &str) -> bool {
    if let Some(rest) = principal.strip_prefix(NODE_PRINCIPAL_PREFIX) {
        return match rest.split_once('/') {
            Some((region, node)) => valid_name(region, &[]) && valid_name(node, &[]),
            None => false,
        };
    }
    valid_name(principal, b".@")
}

/// Checks `grants` against the configured `tables`, returning the first
/// problem as (field as written in the TOML, why), e.g.
/// (`grants[3].tables`, "unknown table `x`").
pub fn validate(grants: &[GrantConfig], tables: &[&str]) -> Result<(), (String, String)> {
    let known: BTreeSet<&str> = tables.iter().copied().collect();
    for (i, g) in grants.iter().enumerate() {
        let field = |name: &str| format!("grants[{i}].{name}");
        if !valid_principal(&g.principal) {
            return Err((
                field("principal"),
                format!(
                    "`{}`: use 1-{PRINCIPAL_BYTES_MAX} of a-z, 0-9, '_', '-', '.', '@', \
                     or a node identity `node:<region>/<node>`",
                    g.principal
                ),
            ));
        }
        if g.principal == ROOT_PRINCIPAL {
            return Err((
                field("principal"),
                format!("`{ROOT_PRINCIPAL}` is the built-in superuser and holds every privilege; it takes no grants"),
            ));
        }
        if g.privileges.is_empty() {
            return Err((field("privileges"), "a grant needs at least one privilege".to_string()));
        }
        for t in &g.tables {
            if t != ALL_TABLES && !known.contains(t.as_str()) {
                return Err((field("tables"), format!("unknown table `{t}` (known: {known:?}, or `*`)")));
            }
        }
        let cluster: Vec<Privilege> = g.privileges.iter().copied().filter(|p| p.is_cluster_wide()).collect();
        let table_level: Vec<Privilege> =
            g.privileges.iter().copied().filter(|p| !p.is_cluster_wide()).collect();
        if let Some(p) = cluster.first() {
            if !g.tables.is_empty() {
                return Err((
                    field("privileges"),
                    format!("`{p}` is cluster-wide and takes no tables; give it in a grant without `tables`"),
                ));
            }
        }
        if let Some(p) = table_level.first() {
            if g.tables.is_empty() {
                return Err((
                    field("tables"),
                    format!("`{p}` is granted on tables: list table names, or `*` for every table"),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(principal: &str, tables: &[&str], privileges: &[Privilege]) -> GrantConfig {
        GrantConfig {
            principal: principal.to_string(),
            tables: tables.iter().map(|t| t.to_string()).collect(),
            privileges: privileges.to_vec(),
        }
    }

    fn sample() -> Grants {
        Grants::new(&[
            grant("alice", &["a"], &[Privilege::Read]),
            grant("ops@example.com", &[], &[Privilege::Admin]),
            grant("reader", &["*"], &[Privilege::Read, Privilege::Watch]),
            grant("node:us-east-1/n1", &[], &[Privilege::Export]),
        ])
    }

    #[test]
    fn read_on_a_reads_a_and_nothing_else() {
        let g = sample();
        assert_eq!(g.check("alice", Privilege::Read, Some("a")), Ok(()));
        let denied = g.check("alice", Privilege::Write, Some("a")).unwrap_err();
        assert_eq!(denied.principal, "alice");
        assert_eq!(denied.missing_grant, "write on table `a`");
        assert_eq!(
            g.check("alice", Privilege::Read, Some("b")).unwrap_err().missing_grant,
            "read on table `b`"
        );
        assert_eq!(g.check("alice", Privilege::Admin, None).unwrap_err().missing_grant, "admin");
        assert_eq!(g.check("alice", Privilege::Admin, Some("a")).unwrap_err().missing_grant, "admin");
        assert!(g.check("alice", Privilege::Read, None).is_err(), "a table grant does not cover every table");
    }

    #[test]
    fn root_holds_everything_without_a_grant() {
        let empty = Grants::default();
        for p in Privilege::ALL {
            assert_eq!(empty.check(ROOT_PRINCIPAL, p, Some("anything")), Ok(()));
            assert_eq!(empty.check(ROOT_PRINCIPAL, p, None), Ok(()));
        }
    }

    #[test]
    fn star_covers_every_table_for_the_listed_privileges_only() {
        let g = sample();
        for t in ["a", "b", "not-yet-created"] {
            assert_eq!(g.check("reader", Privilege::Read, Some(t)), Ok(()));
            assert_eq!(g.check("reader", Privilege::Watch, Some(t)), Ok(()));
            assert!(g.check("reader", Privilege::Write, Some(t)).is_err());
        }
        assert_eq!(g.check("reader", Privilege::Read, None), Ok(()));
        assert_eq!(
            g.check("reader", Privilege::Write, None).unwrap_err().missing_grant,
            "write on every table (`*`)"
        );
    }

    #[test]
    fn unknown_principals_and_unlisted_nodes_are_denied() {
        let g = sample();
        for p in Privilege::ALL {
            assert!(g.check("mallory", p, Some("a")).is_err());
            assert!(g.check("node:eu-west-1/n1", p, Some("a")).is_err());
            assert!(g.check("", p, None).is_err());
            // Names compare exactly: no case folding, no prefix matching.
            assert!(g.check("ROOT", p, None).is_err());
            assert!(g.check("alice2", p, Some("a")).is_err());
        }
        assert_eq!(g.check("node:us-east-1/n1", Privilege::Export, None), Ok(()));
        assert_eq!(g.check("ops@example.com", Privilege::Admin, None), Ok(()));
        assert!(g.check("ops@example.com", Privilege::Read, Some("a")).is_err());
    }

    #[test]
    fn grants_of_one_principal_add_up() {
        let g = Grants::new(&[
            grant("bob", &["a"], &[Privilege::Read]),
            grant("bob", &["b"], &[Privilege::Write]),
        ]);
        assert_eq!(g.check("bob", Privilege::Read, Some("a")), Ok(()));
        assert_eq!(g.check("bob", Privilege::Write, Some("b")), Ok(()));
        assert!(g.check("bob", Privilege::Write, Some("a")).is_err());
        assert!(g.check("bob", Privilege::Read, Some("b")).is_err());
    }

    #[test]
    fn deserializes_from_toml_and_rejects_unknown_fields() {
        #[derive(Deserialize)]
        struct Doc {
            grants: Vec<GrantConfig>,
        }
        let doc: Doc = toml::from_str(
            r#"
            [[grants]]
            principal = "alice"
            tables = ["a", "*"]
            privileges = ["read", "write", "watch"]

            [[grants]]
            principal = "ops"
            privileges = ["admin", "erase", "export"]
            "#,
        )
        .unwrap();
        assert_eq!(doc.grants[0].privileges, [Privilege::Read, Privilege::Write, Privilege::Watch]);
        assert!(doc.grants[1].tables.is_empty());
        assert_eq!(doc.grants[1].privileges, [Privilege::Admin, Privilege::Erase, Privilege::Export]);
        let typo =
            toml::from_str::<Doc>("[[grants]]\nprincipal = \"a\"\ntable = [\"a\"]\nprivileges = [\"read\"]");
        assert!(typo.is_err());
        let bad_privilege = toml::from_str::<Doc>("[[grants]]\nprincipal = \"a\"\nprivileges = [\"sudo\"]");
        assert!(bad_privilege.is_err());
    }

    #[test]
    fn validate_names_the_bad_field() {
        let tables = ["a", "b"];
        let ok = [
            grant("alice", &["a"], &[Privilege::Read]),
            grant("svc.batch@corp", &["*"], &[Privilege::Write]),
            grant("node:us-east-1/n1", &[], &[Privilege::Admin, Privilege::Export]),
        ];
        assert_eq!(validate(&ok, &tables), Ok(()));

        let check = |g: GrantConfig| {
            let mut all = ok.to_vec();
            all.push(g);
            validate(&all, &tables).unwrap_err()
        };
        let (field, why) = check(grant("alice", &["a", "x"], &[Privilege::Read]));
        assert_eq!(field, "grants[3].tables");
        assert!(why.contains("`x`"), "{why}");
        assert_eq!(
            check(grant("alice", &["a"], &[Privilege::Read, Privilege::Admin])).0,
            "grants[3].privileges"
        );
        assert_eq!(check(grant("alice", &["a"], &[])).0, "grants[3].privileges");
        assert_eq!(check(grant("alice", &[], &[Privilege::Read])).0, "grants[3].tables");
        assert_eq!(check(grant("root", &[], &[Privilege::Admin])).0, "grants[3].principal");
        let long = "a".repeat(PRINCIPAL_BYTES_MAX + 1);
        for bad in [
            "",
            "Alice",
            "a b",
            "a/b",
            "a:b",
            long.as_str(),
            "node:",
            "node:r",
            "node:r/",
            "node:/n",
            "node:R/n",
        ] {
            assert_eq!(check(grant(bad, &["a"], &[Privilege::Read])).0, "grants[3].principal", "{bad:?}");
        }
        assert!(valid_principal(&"a".repeat(PRINCIPAL_BYTES_MAX)));
        assert!(valid_principal(&node_principal("eu-west-1", "n2")));
    }
}
