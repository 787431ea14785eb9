//! Prometheus metrics: counters and a commit-latency histogram, rendered as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// Upper bounds (seconds) of the commit latency histogram buckets.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// The relay's metrics. All methods are cheap and lock-free except rejection counting.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Open device connections.
    pub connections: AtomicI64,
    /// Orders held in memory.
    pub orders_in_memory: AtomicI64,
    /// Changes accepted and committed.
    pub changes_accepted: AtomicU64,
    /// Receipts sent.
    pub receipts_sent: AtomicU64,
    /// Receipts waiting on a commit.
    pub receipts_pending: AtomicI64,
    /// Write transactions committed.
    pub commits: AtomicU64,
    /// Commit failures.
    pub commit_errors: AtomicU64,
    /// Frames received.
    pub frames_in: AtomicU64,
    /// Frames sent.
    pub frames_out: AtomicU64,
    /// Bad frames and protocol errors.
    pub protocol_errors: AtomicU64,
    /// Upgrades refused for a bad token.
    pub auth_failures: AtomicU64,
    /// Open client sockets (HTTP and WebSocket, handshake included).
    pub sockets: AtomicI64,
    /// Times the accept loop found every socket slot taken.
    pub sockets_full: AtomicU64,
    /// Failed accepts (a full file table included).
    pub accept_errors: AtomicU64,
    /// Sockets closed for not finishing their handshake in time.
    pub handshake_timeouts: AtomicU64,
    /// Connections closed because their device was revoked.
    pub revoked_closed: AtomicU64,
    /// Panics contained while handling a frame (the frame's effects were undone).
    pub frame_panics: AtomicU64,
    /// Frames a connection had to wait for because it was over its rate (backpressure).
    pub rate_waits: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    refused: Mutex<BTreeMap<&'static str, u64>>,
    sync_refused: Mutex<BTreeMap<&'static str, u64>>,
    commit_buckets: [AtomicU64; COMMIT_BUCKETS.len()],
    commit_count: AtomicU64,
    commit_sum_micros: AtomicU64,
}

impl Metrics {
    /// Counts one rejected batch under its policy reason code.
    pub fn rejected(&self, code: &'static str) {
        if let Ok(mut m) = self.rejected.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    /// Counts one device connection refused at admission under its code.
    pub fn refused(&self, code: &'static str) {
        if let Ok(mut m) = self.refused.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    /// Rejections so far for `code`.
    pub fn rejections(&self, code: &str) -> u64 {
        self.rejected
            .lock()
            .map(|m| m.get(code).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Counts one sync message refused before it was applied, under its error code.
    pub fn sync_refused(&self, code: &'static str) {
        if let Ok(mut m) = self.sync_refused.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    /// Sync messages refused so far for `code`.
    pub fn sync_refusals(&self, code: &str) -> u64 {
        self.sync_refused
            .lock()
            .map(|m| m.get(code).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Records one commit's latency.
    pub fn observe_commit(&self, seconds: f64) {
        for (i, bound) in COMMIT_BUCKETS.iter().enumerate() {
            if seconds <= *bound {
                self.commit_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.commit_count.fetch_add(1, Ordering::Relaxed);
        self.commit_sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let g = |o: &mut String, name: &str, help: &str, kind: &str, v: String| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        let r = Ordering::Relaxed;
        g(
            &mut out,
            "relay_connections",
            "Open device connections.",
            "gauge",
            self.connections.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_orders_in_memory",
            "Orders held in memory.",
            "gauge",
            self.orders_in_memory.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_changes_accepted_total",
            "Changes accepted and committed.",
            "counter",
            self.changes_accepted.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_receipts_sent_total",
            "Durable receipts sent.",
            "counter",
            self.receipts_sent.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_receipts_pending",
            "Receipts waiting for a commit.",
            "gauge",
            self.receipts_pending.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_commits_total",
            "Write transactions committed.",
            "counter",
            self.commits.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_commit_errors_total",
            "Failed write transactions.",
            "counter",
            self.commit_errors.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_frames_in_total",
            "Frames received.",
            "counter",
            self.frames_in.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_frames_out_total",
            "Frames sent.",
            "counter",
            self.frames_out.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_protocol_errors_total",
            "Malformed frames and protocol errors.",
            "counter",
            self.protocol_errors.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_auth_failures_total",
            "Upgrades refused for a bad token.",
            "counter",
            self.auth_failures.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_sockets",
            "Open client sockets, handshakes included.",
            "gauge",
            self.sockets.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_sockets_full_total",
            "Times every socket slot was taken when accepting.",
            "counter",
            self.sockets_full.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_accept_errors_total",
            "Failed accepts (e.g. EMFILE).",
            "counter",
            self.accept_errors.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_handshake_timeouts_total",
            "Sockets closed for not finishing their handshake in time.",
            "counter",
            self.handshake_timeouts.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_revoked_connections_closed_total",
            "Connections closed because their device was revoked.",
            "counter",
            self.revoked_closed.load(r).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP relay_connections_refused_total Device connections refused at admission, by code."
        );
        let _ = writeln!(out, "# TYPE relay_connections_refused_total counter");
        if let Ok(m) = self.refused.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(
                    out,
                    "relay_connections_refused_total{{code=\"{code}\"}} {n}"
                );
            }
        }
        g(
            &mut out,
            "relay_frame_panics_total",
            "Panics contained while handling a frame (effects undone, connection closed).",
            "counter",
            self.frame_panics.load(r).to_string(),
        );
        g(
            &mut out,
            "relay_rate_waits_total",
            "Frames held back because their connection was over its rate (its socket was not read meanwhile).",
            "counter",
            self.rate_waits.load(r).to_string(),
        );
        let _ = writeln!(
            out,
            "# HELP relay_sync_refused_total Sync messages refused before they were applied, by code."
        );
        let _ = writeln!(out, "# TYPE relay_sync_refused_total counter");
        if let Ok(m) = self.sync_refused.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(out, "relay_sync_refused_total{{code=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP relay_changes_rejected_total Rejected batches by policy reason."
        );
        let _ = writeln!(out, "# TYPE relay_changes_rejected_total counter");
        if let Ok(m) = self.rejected.lock() {
            for (code, n) in m.iter() {
                let _ = writeln!(out, "relay_changes_rejected_total{{reason=\"{code}\"}} {n}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP relay_commit_seconds Group commit latency (one redb write transaction)."
        );
        let _ = writeln!(out, "# TYPE relay_commit_seconds histogram");
        for (i, bound) in COMMIT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "relay_commit_seconds_bucket{{le=\"{bound}\"}} {}",
                self.commit_buckets[i].load(r)
            );
        }
        let count = self.commit_count.load(r);
        let _ = writeln!(out, "relay_commit_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "relay_commit_seconds_sum {}",
            self.commit_sum_micros.load(r) as f64 / 1e6
        );
        let _ = writeln!(out, "relay_commit_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        m.rejected("edit_after_close");
        m.rejected("edit_after_close");
        m.observe_commit(0.0003);
        let text = m.render();
        assert!(text.contains("relay_changes_rejected_total{reason=\"edit_after_close\"} 2"));
        assert!(text.contains("relay_commit_seconds_bucket{le=\"0.0005\"} 1"));
        assert!(text.contains("relay_commit_seconds_bucket{le=\"0.0001\"} 0"));
        assert!(text.contains("relay_commit_seconds_count 1"));
    }
}
