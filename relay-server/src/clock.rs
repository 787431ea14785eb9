//! The relay's one clock and one entropy source. The cores take time and randomness as
//! arguments; the drivers and binaries pass these.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crdt_model::Entropy;

/// The wall clock in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// OS randomness for the relay's own entries.
#[derive(Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn next_u64(&mut self) -> u64 {
        // getrandom fails only on platforms without an entropy source; fall back to the clock
        // mixed with a counter so ids stay unique even then.
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        getrandom::u64().unwrap_or_else(|_| {
            (now_ms() as u64).rotate_left(17) ^ FALLBACK.fetch_add(0x9E37_79B9, Ordering::Relaxed)
        })
    }
}
