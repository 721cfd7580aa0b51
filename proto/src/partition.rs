//! The partition function: which hash partition a row belongs to. Nodes
//! use it to pick a row's owner inside a region and region-aware clients to
//! send the row's request straight to that owner, so it is part of the wire
//! contract and never changes (docs/architecture.md section 2).

/// FNV-1a, 64 bits: stable across versions and platforms, which is what a
/// partition function needs (the standard library's hasher is not).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The partition of `(table, key)` among `partitions` (0 is taken as 1).
pub fn partition_of(partitions: u32, table: &str, key: &[u8]) -> u32 {
    let h = fnv1a(&[table.as_bytes(), &[0], key]);
    (h % u64::from(partitions.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_never_change() {
        // FNV-1a of the empty input is its offset basis.
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(&[b"a", b"b"]), fnv1a(&[b"ab"]));
        assert_eq!(partition_of(0, "t", b"k"), 0);
        let spread: std::collections::BTreeSet<u32> =
            (0..64).map(|i| partition_of(8, "default", format!("k{i}").as_bytes())).collect();
        assert_eq!(spread.len(), 8, "64 keys cover every partition");
    }
}
