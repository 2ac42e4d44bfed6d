//! Request ids: 32 lowercase hex digits, the length of a UUID in simple form. The first 16 digits
//! are random per process. The last 16 are a process-wide counter passed through a keyed
//! bijection of 64-bit integers. So ids never repeat within a process (before 2^64 requests), and
//! ids of two processes differ with high probability. The ids also do not show how many requests
//! came before. Each id costs one atomic add and no random draw, where a v4 UUID formatted into a
//! `String` cost a random draw and two allocations.
//!
//! NOTE: ids are for correlating logs and responses, not secrets. Someone who collects many ids
//! of one process could in principle recover the key and predict the next ones.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;

use http::HeaderValue;

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Number of requests that got an id in this process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Random values drawn once per process.
struct Seed {
    /// Hex digits of the random prefix.
    prefix: [u8; 16],
    /// Key of the bijection that hides the counter.
    key: u64,
}

fn seed() -> &'static Seed {
    static SEED: OnceLock<Seed> = OnceLock::new();
    SEED.get_or_init(|| {
        // A v4 UUID is 122 random bits from the operating system's generator, via `rand`.
        let (high, low) = uuid::Uuid::new_v4().as_u64_pair();
        let mut prefix = [0; 16];
        write_hex(high, &mut prefix);
        Seed { prefix, key: low }
    })
}

/// The id of one request, ready to be sent as a header value.
#[derive(Debug, Clone)]
pub(crate) struct RequestId(HeaderValue);

impl RequestId {
    /// Returns a new id, distinct from every other id of this process.
    pub(crate) fn next() -> Self {
        let seed = seed();
        let count = COUNTER.fetch_add(1, Relaxed);
        let mut text = [0; 32];
        text[..16].copy_from_slice(&seed.prefix);
        write_hex(permute(count, seed.key), &mut text[16..]);
        // Hex digits are always a valid header value, so the fallback is never taken.
        let value = HeaderValue::from_bytes(&text)
            .unwrap_or_else(|_| HeaderValue::from_static("00000000000000000000000000000000"));
        RequestId(value)
    }

    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }

    pub(crate) fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

/// A bijection of `u64` chosen by `key`: an XOR with the key, then the finaliser of the
/// SplitMix64 generator, whose xor-shift and odd-multiplier steps are each invertible.
fn permute(value: u64, key: u64) -> u64 {
    let mut x = value ^ key;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Writes the 16 hex digits of `value`, most significant first.
fn write_hex(value: u64, out: &mut [u8]) {
    for (index, digit) in out.iter_mut().take(16).enumerate() {
        let shift = 60 - 4 * index;
        *digit = HEX_DIGITS[((value >> shift) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ids_are_32_hex_digits() {
        let id = RequestId::next();
        assert_eq!(id.as_str().len(), 32);
        assert!(
            id.as_str().bytes().all(|b| HEX_DIGITS.contains(&b)),
            "{}",
            id.as_str()
        );
    }

    #[test]
    fn ids_share_prefix_and_differ() {
        let ids: Vec<RequestId> = (0..10_000).map(|_| RequestId::next()).collect();
        let distinct: HashSet<&str> = ids.iter().map(RequestId::as_str).collect();
        assert_eq!(distinct.len(), ids.len());
        let prefixes: HashSet<&str> = ids.iter().map(|id| &id.as_str()[..16]).collect();
        assert_eq!(prefixes.len(), 1);
    }

    #[test]
    fn permutation_is_injective_on_a_sample() {
        let key = 0x1234_5678_9abc_def0;
        let outputs: HashSet<u64> = (0..100_000).map(|n| permute(n, key)).collect();
        assert_eq!(outputs.len(), 100_000);
        let shifted: HashSet<u64> = (0..1_000).map(|n| permute(n << 40, key)).collect();
        assert_eq!(shifted.len(), 1_000);
    }

    #[test]
    fn consecutive_counts_do_not_look_consecutive() {
        let key = 7;
        let a = permute(1, key);
        let b = permute(2, key);
        assert!((a ^ b).count_ones() > 8, "{a:016x} {b:016x}");
    }
}
