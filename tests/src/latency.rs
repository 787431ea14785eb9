//! Latency histograms for the benchmark binaries, on `hdrhistogram`: microsecond resolution,
//! three significant figures, mergeable across device tasks.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latencies recorded in microseconds, two significant figures (1 % resolution), in a
/// histogram that grows with the largest value recorded (a few KiB for millisecond latencies,
/// so a benchmark may keep one per simulated device).
#[derive(Clone, Debug)]
pub struct Latency {
    h: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // Two significant figures is a constant that `new` accepts.
        let h = Histogram::new(2).unwrap_or_else(|_| unreachable!());
        Self { h }
    }

    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(u64::MAX)
            .clamp(1, 1 << 40);
        // Recording grows the histogram as needed; should growing fail, the value is kept at
        // the largest one it can hold instead.
        if self.h.record(us).is_err() {
            self.h.saturating_record(us);
        }
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides: cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.h.is_empty()
    }

    /// The latency at quantile `q` (0.0 to 1.0; 1.0 is the maximum), in milliseconds.
    pub fn ms(&self, q: f64) -> Option<f64> {
        if self.h.is_empty() {
            return None;
        }
        let us = if q >= 1.0 {
            self.h.max()
        } else {
            self.h.value_at_quantile(q)
        };
        Some(us as f64 / 1e3)
    }

    /// [`Self::ms`] formatted as `"1.23 ms"`, or `"-"` when empty.
    pub fn fmt(&self, q: f64) -> String {
        self.ms(q)
            .map_or_else(|| "-".into(), |v| format!("{v:.2} ms"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_follow_the_samples() {
        let mut a = Latency::new();
        for ms in 1..=100 {
            a.record(Duration::from_millis(ms));
        }
        let mut b = Latency::new();
        b.record(Duration::from_secs(2));
        a.merge(&b);
        assert_eq!(a.len(), 101);
        let p50 = a.ms(0.5).unwrap();
        assert!((49.5..=51.5).contains(&p50), "{p50}");
        assert!((a.ms(1.0).unwrap() - 2000.0).abs() < 20.0);
        assert_eq!(Latency::new().fmt(0.99), "-");
    }
}
