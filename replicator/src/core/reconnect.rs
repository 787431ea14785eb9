//! Which relay the next connection attempt goes to, and when: the device's relay list, tried in
//! turn, with a backoff that grows per full round of the list.
//!
//! Every relay of a device's list serves the same data (they share one database, and a receipt
//! means durable there), so any one of them will do. The rule:
//!
//! * **A failure moves on.** An attempt that fails (unreachable, timed out, refused at the
//!   upgrade, closed before `welcome`) and an established connection that drops both move to the
//!   next URL of the list, wrapping around. Every URL is therefore tried within any `N`
//!   consecutive attempts of an `N`-URL list; none is starved.
//! * **Short delay inside a round, growing delay per round.** The attempt after a dropped
//!   connection, and every attempt whose URL has not failed yet in the current round, waits the
//!   shortest backoff (`backoff_min_ms / 2 ..= backoff_min_ms`): a dead relay costs a device
//!   well under a second before it tries another. Only when a whole round of the list has failed
//!   does the delay grow: `backoff_min_ms * 2^rounds`, capped at `backoff_max_ms`, of which the
//!   device waits a jittered half to whole. With one URL every failure is a full round, which
//!   is plain exponential backoff.
//! * **Success stays.** After `welcome` the device keeps the relay that answered (the failure
//!   count is reset, the position is not): switching back to the preferred URL would cost a
//!   reconnect for nothing, since every relay holds the same data. A device starts again from
//!   the preferred URL only when its engine is rebuilt (the app restarts).
//!
//! Refusals of the device's token are not this module's business: the engine waits the longest
//! backoff after one whichever relay is next, as a revoked token is revoked on every relay.

use crdt_model::Entropy;

use super::EngineConfig;

/// The device's relay list and where the connection attempts stand on it.
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    /// Every relay URL, preferred first, without duplicates; never empty.
    urls: Vec<String>,
    /// Index into `urls` of the relay of the current (or next) attempt.
    current: usize,
    /// Attempts failed in a row since the last `welcome` (or since the engine started): a full
    /// round has failed each time it reaches a multiple of `urls.len()`.
    failures: u32,
}

impl Dialer {
    /// A dialer over `urls` (preferred first), starting at the preferred one. An empty list
    /// gets one empty URL, so there is always a relay to name (connecting to it fails).
    pub(crate) fn new(mut urls: Vec<String>) -> Self {
        if urls.is_empty() {
            urls.push(String::new());
        }
        Self {
            urls,
            current: 0,
            failures: 0,
        }
    }

    /// Every relay URL, in the order they are tried.
    pub(crate) fn urls(&self) -> &[String] {
        &self.urls
    }

    /// Index of the relay the current (or next) attempt goes to.
    pub(crate) fn index(&self) -> usize {
        self.current
    }

    /// URL of the relay the current (or next) attempt goes to.
    pub(crate) fn url(&self) -> &str {
        // `current` is always `< urls.len()` and `urls` is never empty.
        self.urls.get(self.current).map_or("", String::as_str)
    }

    /// Attempts failed in a row since the last `welcome`.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// The relay answered `welcome`: stay on it, and start counting failures afresh.
    pub(crate) fn established(&mut self) {
        self.failures = 0;
    }

    /// An established connection dropped: the next attempt goes to the next relay, after the
    /// shortest backoff. Returns that delay, ms.
    pub(crate) fn dropped(&mut self, config: &EngineConfig, rng: &mut dyn Entropy) -> i64 {
        self.failures = 0;
        self.advance();
        delay(0, config, rng)
    }

    /// The attempt failed: the next one goes to the next relay, after the shortest backoff
    /// while the round has URLs left to try, or a backoff doubled per failed round when the
    /// whole list has just failed. Returns that delay, ms.
    pub(crate) fn failed(&mut self, config: &EngineConfig, rng: &mut dyn Entropy) -> i64 {
        self.failures = self.failures.saturating_add(1);
        self.advance();
        let n = u32::try_from(self.urls.len()).unwrap_or(u32::MAX);
        let rounds = if self.failures.is_multiple_of(n) {
            self.failures / n
        } else {
            0
        };
        delay(rounds, config, rng)
    }

    fn advance(&mut self) {
        self.current = (self.current + 1) % self.urls.len();
    }
}

/// The wait before an attempt after `rounds` failed rounds: `backoff_min_ms * 2^rounds`, capped
/// at `backoff_max_ms`, of which a random half to whole (the jitter spreads devices that lost
/// their relay together). Never more than `backoff_max_ms`, never negative.
pub(crate) fn delay(rounds: u32, config: &EngineConfig, rng: &mut dyn Entropy) -> i64 {
    let base = config
        .backoff_min_ms
        .saturating_mul(1i64 << rounds.min(20))
        .min(config.backoff_max_ms)
        .max(0);
    let jitter = (rng.next_u64() % (base as u64 / 2 + 1)) as i64;
    base / 2 + jitter
}

#[cfg(test)]
mod tests {
    use crdt_model::SplitMix64;

    use super::*;

    fn config() -> EngineConfig {
        EngineConfig {
            backoff_min_ms: 100,
            backoff_max_ms: 3_000,
            ..EngineConfig::default()
        }
    }

    fn urls(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ws://relay-{i}/v1/sync")).collect()
    }

    #[test]
    fn failures_rotate_through_the_list_and_wrap() {
        let mut d = Dialer::new(urls(3));
        let mut rng = SplitMix64::new(1);
        let mut seen = vec![d.index()];
        for _ in 0..6 {
            let _ = d.failed(&config(), &mut rng);
            seen.push(d.index());
        }
        assert_eq!(seen, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(d.url(), "ws://relay-0/v1/sync");
    }

    #[test]
    fn backoff_grows_only_per_failed_round() {
        let c = config();
        let mut d = Dialer::new(urls(3));
        let mut rng = SplitMix64::new(2);
        // (delay, failures) for nine failures in a row: short inside a round, then
        // 2x, 4x, 8x the minimum at the end of rounds one, two and three.
        let delays: Vec<i64> = (0..9).map(|_| d.failed(&c, &mut rng)).collect();
        let short = 50..=100;
        for (i, ms) in delays.iter().enumerate() {
            let expected = match i + 1 {
                3 => 100..=200,
                6 => 200..=400,
                9 => 400..=800,
                _ => short.clone(),
            };
            assert!(expected.contains(ms), "failure {}: {ms} ms", i + 1);
        }
    }

    #[test]
    fn one_url_is_plain_exponential_backoff_capped_at_the_maximum() {
        let c = config();
        let mut d = Dialer::new(urls(1));
        let mut rng = SplitMix64::new(3);
        for k in 1..=30u32 {
            let ms = d.failed(&c, &mut rng);
            let base = (100i64 << k.min(20)).min(3_000);
            assert!((base / 2..=base).contains(&ms), "failure {k}: {ms} ms");
            assert_eq!(d.index(), 0);
        }
    }

    #[test]
    fn a_drop_moves_on_promptly_and_success_stays_on_the_relay() {
        let c = config();
        let mut d = Dialer::new(urls(2));
        let mut rng = SplitMix64::new(4);
        // Two rounds fail: the backoff has grown.
        for _ in 0..4 {
            let _ = d.failed(&c, &mut rng);
        }
        assert_eq!(d.failures(), 4);
        // Relay 0 answers; the device stays on it.
        d.established();
        assert_eq!((d.index(), d.failures()), (0, 0));
        // Its connection drops: relay 1 next, after the shortest backoff.
        let ms = d.dropped(&c, &mut rng);
        assert!((50..=100).contains(&ms), "{ms} ms");
        assert_eq!(d.index(), 1);
        // Relay 1 is dead too: back to 0, still the shortest (one round is not over).
        let ms = d.failed(&c, &mut rng);
        assert!((50..=100).contains(&ms), "{ms} ms");
        assert_eq!(d.index(), 0);
    }

    #[test]
    fn an_empty_list_still_names_a_relay() {
        let d = Dialer::new(Vec::new());
        assert_eq!(d.urls().len(), 1);
        assert_eq!(d.url(), "");
    }

    #[test]
    fn the_delay_never_exceeds_the_maximum() {
        let c = EngineConfig {
            backoff_min_ms: 7,
            backoff_max_ms: 1_001,
            ..EngineConfig::default()
        };
        let mut rng = SplitMix64::new(5);
        for rounds in 0..100 {
            let ms = delay(rounds, &c, &mut rng);
            assert!((0..=1_001).contains(&ms), "{rounds} rounds: {ms} ms");
        }
    }
}
