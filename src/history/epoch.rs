//! Epochs: the names of channel histories, so that a client never compares offsets of two.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// 48 bits, written as 12 hex digits: short on the wire, and two stores' epoch sequences
/// (two runs of the process) meet by chance with odds of about n / 2^48 per epoch.
const EPOCH_BITS: u32 = 48;
const EPOCH_MASK: u64 = (1 << EPOCH_BITS) - 1;
/// Odd, so that `counter * STRIDE` is a bijection modulo 2^48: within one store no two
/// epochs are equal until 2^48 histories were created.
const STRIDE: u64 = 0x9E37_79B9_7F4B;

/// Hands out a new epoch for every channel history created by one store.
///
/// Epoch n is `seed + n * STRIDE` modulo 2^48: different for every n within the store (see
/// [`STRIDE`]); the seed is random per store (ahash's and std's random keys, and the wall
/// clock), so a restarted process starts somewhere else and does not reissue an epoch a
/// client still holds.
pub(crate) struct EpochSource {
    seed: u64,
    created: AtomicU64,
}

impl EpochSource {
    pub(crate) fn new() -> Self {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let random = ahash::RandomState::new().hash_one(now)
            ^ std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        EpochSource {
            seed: random,
            created: AtomicU64::new(0),
        }
    }

    /// The next epoch, as the shared string every frame of the history will carry.
    pub(crate) fn next(&self) -> Arc<str> {
        let n = self.created.fetch_add(1, Ordering::Relaxed);
        let value = self.seed.wrapping_add(n.wrapping_mul(STRIDE)) & EPOCH_MASK;
        format!("{value:012x}").into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_differ_within_a_store_and_between_stores() {
        let a = EpochSource::new();
        let b = EpochSource::new();
        let from_a: Vec<Arc<str>> = (0..1000).map(|_| a.next()).collect();
        let mut unique: Vec<&str> = from_a.iter().map(|e| &**e).collect();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 1000);
        assert!(from_a.iter().all(|e| e.len() == 12
            && e.bytes()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())));
        assert_ne!(b.next(), from_a[0], "two stores (two runs) start apart");
    }
}
