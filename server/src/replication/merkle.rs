//! Merkle trees over rows, for anti-entropy. Pure: no IO, tested alone.
//!
//! A row falls into one of `FANOUT^depth` leaf buckets by a hash of its
//! `(table, key)`. A leaf's hash is the XOR of its rows' hashes (so the
//! order rows are visited in does not matter); an inner node's hash is the
//! SHA-256 of its children's, or zero when they are all zero (an empty
//! subtree). Two sides compare roots, then only the children of nodes that
//! differ, down to the leaves, then the keys of the differing leaves.

use sha2::{Digest, Sha256};

/// Children per inner node.
pub const FANOUT: u32 = 16;
/// Levels below the root: 16^3 = 4096 leaf buckets.
pub const DEPTH: u32 = 3;
/// Deepest tree a peer may ask for (16^4 = 65536 leaves).
pub const DEPTH_MAX: u32 = 4;

pub type Hash = [u8; 32];
pub const ZERO: Hash = [0; 32];

/// The hash of one row: its table, key and canonical contents.
pub fn row_hash(table: &str, key: &[u8], contents: &[u8]) -> Hash {
    let mut h = Sha256::new();
    for part in [table.as_bytes(), key, contents] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// The leaf bucket of `(table, key)` in a tree of `depth` levels.
pub fn leaf_of(depth: u32, table: &str, key: &[u8]) -> u32 {
    let mut h = Sha256::new();
    h.update(table.as_bytes());
    h.update([0]);
    h.update(key);
    let d: [u8; 32] = h.finalize().into();
    let top = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
    let bits = 4 * depth.min(DEPTH_MAX);
    if bits == 0 {
        0
    } else {
        top >> (32 - bits)
    }
}

/// Nodes at `level` (`FANOUT^level`).
pub fn width(level: u32) -> u32 {
    FANOUT.pow(level.min(DEPTH_MAX))
}

/// The children of `indices` (nodes at one level), at the next level.
pub fn children(indices: &[u32]) -> Vec<u32> {
    indices.iter().flat_map(|i| (i * FANOUT)..(i * FANOUT + FANOUT)).collect()
}

/// A built tree: `levels[0]` is the root, `levels[depth]` the leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    depth: u32,
    levels: Vec<Vec<Hash>>,
}

impl MerkleTree {
    /// Builds the tree from `(leaf, row hash)` pairs, in any order. Leaves
    /// out of range are refused by clamping to `depth` (callers compute
    /// them with [`leaf_of`] at the same depth).
    pub fn build(depth: u32, rows: impl IntoIterator<Item = (u32, Hash)>) -> Self {
        let depth = depth.min(DEPTH_MAX);
        let mut leaves = vec![ZERO; width(depth) as usize];
        for (leaf, hash) in rows {
            if let Some(slot) = leaves.get_mut(leaf as usize) {
                for (a, b) in slot.iter_mut().zip(hash.iter()) {
                    *a ^= b;
                }
            }
        }
        let mut levels = vec![leaves];
        for _ in 0..depth {
            let below = levels.last().map(Vec::as_slice).unwrap_or(&[]);
            let up: Vec<Hash> = below.chunks(FANOUT as usize).map(inner_hash).collect();
            levels.push(up);
        }
        levels.reverse();
        Self { depth, levels }
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn root(&self) -> Hash {
        self.hash(0, 0).unwrap_or(ZERO)
    }

    /// The hash of node `index` at `level`, if both are in range.
    pub fn hash(&self, level: u32, index: u32) -> Option<Hash> {
        self.levels.get(level as usize)?.get(index as usize).copied()
    }

    /// `(index, hash)` for each of `indices` at `level` that exists.
    pub fn hashes(&self, level: u32, indices: &[u32]) -> Vec<(u32, Hash)> {
        indices.iter().filter_map(|i| self.hash(level, *i).map(|h| (*i, h))).collect()
    }

    /// Which of `theirs` (nodes at `level`) differ from this tree; a node
    /// they did not send counts as zero (empty on their side).
    pub fn differing(&self, level: u32, asked: &[u32], theirs: &[(u32, Hash)]) -> Vec<u32> {
        asked
            .iter()
            .copied()
            .filter(|i| {
                let mine = self.hash(level, *i).unwrap_or(ZERO);
                let other = theirs.iter().find(|(j, _)| j == i).map(|(_, h)| *h).unwrap_or(ZERO);
                mine != other
            })
            .collect()
    }
}

fn inner_hash(children: &[Hash]) -> Hash {
    if children.iter().all(|c| *c == ZERO) {
        return ZERO;
    }
    let mut h = Sha256::new();
    for c in children {
        h.update(c);
    }
    h.finalize().into()
}

/// A row on one side of a comparison: `(table, key, row hash)`.
pub type KeyHash = (String, Vec<u8>, Hash);

/// The rows the source must send: those it has that the destination lacks
/// or holds in another state. Rows only the destination has are left alone
/// (they came from elsewhere; anti-entropy only pushes).
pub fn rows_to_send(mine: &[KeyHash], theirs: &[KeyHash]) -> Vec<(String, Vec<u8>)> {
    let theirs: std::collections::HashMap<(&str, &[u8]), &Hash> =
        theirs.iter().map(|(t, k, h)| ((t.as_str(), k.as_slice()), h)).collect();
    mine.iter()
        .filter(|(t, k, h)| theirs.get(&(t.as_str(), k.as_slice())) != Some(&h))
        .map(|(t, k, _)| (t.clone(), k.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: u32, tag: &str) -> Vec<KeyHash> {
        (0..n)
            .map(|i| {
                let key = format!("k{i}").into_bytes();
                let h = row_hash("t", &key, format!("{tag}{i}").as_bytes());
                ("t".to_string(), key, h)
            })
            .collect()
    }

    fn tree(rows: &[KeyHash]) -> MerkleTree {
        MerkleTree::build(DEPTH, rows.iter().map(|(t, k, h)| (leaf_of(DEPTH, t, k), *h)))
    }

    /// Walks two trees as the shipper does, counting the hashes compared.
    fn descend(mine: &MerkleTree, theirs: &MerkleTree) -> (Vec<u32>, usize) {
        let mut asked = vec![0];
        let mut compared = 0;
        for level in 0..=mine.depth() {
            let answer = theirs.hashes(level, &asked);
            compared += answer.len();
            let diff = mine.differing(level, &asked, &answer);
            if diff.is_empty() || level == mine.depth() {
                return (diff, compared);
            }
            asked = children(&diff);
        }
        (Vec::new(), compared)
    }

    #[test]
    fn equal_sets_give_equal_roots_whatever_the_order() {
        let a = rows(500, "v");
        let mut b = a.clone();
        b.reverse();
        assert_eq!(tree(&a).root(), tree(&b).root());
        assert_ne!(tree(&a).root(), ZERO);
        assert_eq!(MerkleTree::build(DEPTH, Vec::new()).root(), ZERO);
        assert_eq!(descend(&tree(&a), &tree(&b)).0, Vec::<u32>::new());
    }

    #[test]
    fn descent_finds_exactly_the_changed_leaves_and_reads_few_hashes() {
        let a = rows(2000, "v");
        let mut b = a.clone();
        // The destination misses row 7 and holds an older state of row 1234.
        b.retain(|(_, k, _)| k != b"k7");
        b.iter_mut().filter(|(_, k, _)| k == b"k1234").for_each(|r| r.2 = row_hash("t", b"k1234", b"old"));
        let (leaves, compared) = descend(&tree(&a), &tree(&b));
        let mut want = vec![leaf_of(DEPTH, "t", b"k7"), leaf_of(DEPTH, "t", b"k1234")];
        want.sort();
        want.dedup();
        let mut got = leaves.clone();
        got.sort();
        assert_eq!(got, want);
        // 1 root + 16 per differing node per level, far fewer than 4096 leaves.
        assert!(compared <= 1 + 2 * 16 * 3, "compared {compared} hashes");
        let in_leaves = |rs: &[KeyHash]| -> Vec<KeyHash> {
            rs.iter().filter(|(t, k, _)| leaves.contains(&leaf_of(DEPTH, t, k))).cloned().collect()
        };
        let mut send = rows_to_send(&in_leaves(&a), &in_leaves(&b));
        send.sort();
        assert_eq!(send, vec![("t".to_string(), b"k1234".to_vec()), ("t".to_string(), b"k7".to_vec())]);
    }

    #[test]
    fn rows_only_the_destination_has_are_not_sent_back() {
        let a = rows(3, "v");
        let mut b = a.clone();
        b.push(("t".into(), b"extra".to_vec(), row_hash("t", b"extra", b"x")));
        assert!(rows_to_send(&a, &b).is_empty());
    }

    #[test]
    fn leaves_and_widths_stay_in_range() {
        for i in 0..1000 {
            assert!(leaf_of(DEPTH, "t", format!("{i}").as_bytes()) < width(DEPTH));
        }
        assert_eq!(leaf_of(0, "t", b"k"), 0);
        assert_eq!(children(&[1]), (16..32).collect::<Vec<_>>());
        let t = tree(&rows(10, "v"));
        assert_eq!(t.hash(DEPTH, width(DEPTH)), None, "out of range");
        assert_eq!(t.hashes(9, &[0]), Vec::new());
    }
}
