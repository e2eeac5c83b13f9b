//! Rendezvous (highest-random-weight) hashing: every node ranks the peers for a key the same way, from a
//! hash that every version and architecture computes alike, and a membership change moves only the keys of
//! the peers that came or went.

use sha2::{Digest as _, Sha256};

/// The weight of `peer` for `key`: the first 8 bytes of SHA-256(peer ‖ 0 ‖ key), big-endian. (Not
/// `DefaultHasher`, whose output may change between Rust releases, so mixed versions would disagree.)
pub fn score(peer: &str, key: &str) -> u64 {
    let mut h = Sha256::new();
    h.update(peer.as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    let out = h.finalize();
    u64::from_be_bytes(out[..8].try_into().expect("a SHA-256 output has 8 bytes"))
}

/// `peers` ordered for `key`: the owner first, then the fallbacks. Ties (never seen in practice) go to the
/// smaller id, so the order is total.
pub fn rank<'a>(peers: impl IntoIterator<Item = &'a str>, key: &str) -> Vec<&'a str> {
    let mut scored: Vec<(u64, &str)> = peers.into_iter().map(|p| (score(p, key), p)).collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().map(|(_, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_score_is_a_fixed_function() {
        // Pinned: a change here would make old and new versions in one cluster disagree about every owner.
        assert_eq!(score("10.0.0.1:5001", "sha256:abc"), score("10.0.0.1:5001", "sha256:abc"));
        let expected = {
            let d = Sha256::digest(b"10.0.0.1:5001\0sha256:abc");
            u64::from_be_bytes(d[..8].try_into().unwrap())
        };
        assert_eq!(score("10.0.0.1:5001", "sha256:abc"), expected);
        assert_ne!(score("10.0.0.1:5001", "a"), score("10.0.0.2:5001", "a"));
    }

    #[test]
    fn a_membership_change_moves_only_the_keys_of_the_peer_that_left() {
        let peers: Vec<String> = (1..=5).map(|i| format!("10.0.0.{i}:5001")).collect();
        let fewer: Vec<&str> = peers.iter().map(String::as_str).filter(|p| *p != "10.0.0.3:5001").collect();
        let (mut moved, mut owned_by_gone) = (0, 0);
        let mut owners = std::collections::HashMap::new();
        for k in 0..2000 {
            let key = format!("sha256:{k}");
            let before = rank(peers.iter().map(String::as_str), &key)[0];
            let after = rank(fewer.iter().copied(), &key)[0];
            *owners.entry(before).or_insert(0) += 1;
            if before == "10.0.0.3:5001" {
                owned_by_gone += 1;
            } else if before != after {
                moved += 1;
            }
        }
        assert_eq!(moved, 0, "keys of peers that stayed changed owner");
        assert!(owned_by_gone > 200, "the gone peer owned {owned_by_gone} of 2000 keys");
        // Spread: each of 5 peers owns roughly a fifth.
        assert!(owners.values().all(|n| (250..550).contains(n)), "uneven: {owners:?}");
    }

    #[test]
    fn rank_is_a_permutation_without_duplicates() {
        let r = rank(["b:1", "a:1", "b:1", "c:1"], "k");
        assert_eq!(r.len(), 3);
        let mut sorted = r.clone();
        sorted.sort();
        assert_eq!(sorted, ["a:1", "b:1", "c:1"]);
    }
}
