//! The stable key → partition hash.
//!
//! A session lives in the partition of its client id, a retained message in the partition of
//! its topic. Those assignments are persisted implicitly (in which partition's storage the data
//! sits), so this function must never change between versions without a data migration. It is
//! 64-bit FNV-1a over the key's UTF-8 bytes, reduced modulo the partition count: simple,
//! specified, and identical on every platform (no `std::hash`, whose output may change).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// The partition (0..partitions) that owns `key`.
pub fn partition_of(key: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "partition count must be positive");
    (fnv1a64(key.as_bytes()) % u64::from(partitions)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if this test fails, the hash changed and stored data would be misplaced.
    #[test]
    fn hash_is_stable() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            partition_of("client-1", 16),
            (fnv1a64(b"client-1") % 16) as u32
        );
    }

    #[test]
    fn spreads_keys() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition_of(&format!("client-{i}"), 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }
}
