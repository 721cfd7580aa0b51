//! The cluster policy every node must agree on (docs/architecture.md
//! section 16): regions and their nodes, zones, tables, partitions and
//! localities. Nodes compare it in the replication handshake; a node whose
//! policy differs is refused with `CONFIG_MISMATCH`, naming the
//! difference, since rows homed or partitioned by another policy would be
//! stranded silently.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::config::Config;

/// The policy as items: name -> canonical value.
pub fn items(cfg: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    out.insert("partitions".to_string(), cfg.partitions.to_string());
    for r in &cfg.regions {
        let mut nodes: Vec<&str> = r.nodes.iter().map(|n| n.id.as_str()).collect();
        if r.name == cfg.region && !nodes.contains(&cfg.node_id.as_str()) {
            nodes.push(cfg.node_id.as_str());
        }
        nodes.sort_unstable();
        out.insert(format!("region {}", r.name), format!("nodes [{}]", nodes.join(", ")));
    }
    for z in &cfg.zones {
        out.insert(format!("zone {}", z.name), format!("[{}]", z.regions.join(", ")));
    }
    for t in &cfg.tables {
        let value = serde_json::to_string(t).unwrap_or_else(|e| format!("(unencodable: {e})"));
        out.insert(format!("table {}", t.name), value);
    }
    for (locality, region) in &cfg.localities {
        out.insert(format!("locality {locality}"), region.clone());
    }
    // Nodes must hash subjects alike, or an erasure would miss rows: the
    // key is compared by a digest of it, never sent.
    if let Some(key) = &cfg.lifecycle.subject_key {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("geokv subject key {}", key.to_ascii_lowercase()));
        out.insert("lifecycle subject_key".to_string(), format!("sha256 {}", hex::encode(&digest[..8])));
    }
    out
}

/// The items as they travel (a protobuf map).
pub fn to_wire(items: &BTreeMap<String, String>) -> std::collections::HashMap<String, String> {
    items.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The items received from a peer.
pub fn from_wire(items: &std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    items.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// A short fingerprint of `items` (hex SHA-256 of their canonical form).
pub fn fingerprint(items: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in items {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    hex::encode(&h.finalize()[..16])
}

/// Differences named at most, so an error stays readable.
const DIFFERENCES_MAX: usize = 8;

/// Every item that differs between `here` and `there`, named:
/// `table x: here {..}, at peer missing`.
pub fn differences(here: &BTreeMap<String, String>, there: &BTreeMap<String, String>) -> Vec<String> {
    let mut out = Vec::new();
    let keys: std::collections::BTreeSet<&String> = here.keys().chain(there.keys()).collect();
    let mut total = 0usize;
    for k in keys {
        let (a, b) = (here.get(k), there.get(k));
        if a == b {
            continue;
        }
        total += 1;
        if out.len() < DIFFERENCES_MAX {
            let show = |v: Option<&String>| v.map(|v| v.to_string()).unwrap_or_else(|| "missing".into());
            out.push(format!("{k}: here {}, at peer {}", show(a), show(b)));
        }
    }
    if total > out.len() {
        out.push(format!("and {} more", total - out.len()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let base = "node_id = \"n1\"\nregion = \"us-east-1\"\npartitions = 16\n\
                    [[regions]]\nname = \"us-east-1\"\n[[regions]]\nname = \"eu-west-1\"\n\
                    [[zones]]\nname = \"eu\"\nregions = [\"eu-west-1\"]\n";
        Config::from_toml(&format!("{base}{extra}")).expect("config")
    }

    #[test]
    fn the_same_policy_has_the_same_fingerprint_and_no_difference() {
        let (a, b) = (items(&cfg("")), items(&cfg("")));
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert!(differences(&a, &b).is_empty());
    }

    #[test]
    fn a_table_zone_or_partition_count_differs_by_name() {
        let a = items(&cfg(""));
        let b = items(&cfg("[[tables]]\nname = \"extra\"\n"));
        assert_ne!(fingerprint(&a), fingerprint(&b));
        let d = differences(&a, &b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("table extra: here missing, at peer {"), "{d:?}");

        let mut c = a.clone();
        c.insert("partitions".into(), "32".into());
        c.insert("zone eu".into(), "[eu-west-1, us-east-1]".into());
        let d = differences(&a, &c);
        assert_eq!(
            d,
            vec![
                "partitions: here 16, at peer 32",
                "zone eu: here [eu-west-1], at peer [eu-west-1, us-east-1]"
            ]
        );
    }
}
