//! Prometheus metrics, kept and rendered by the `prometheus-client` crate.
//!
//! [`Metrics`] holds one handle per metric; a [`Registry`] holds clones of the same handles
//! and renders them in the Prometheus text format (version 0.0.4, [`CONTENT_TYPE`]) for
//! `GET /metrics`. Counters are [`Count`]s. Every gauge counts things in flight (connections,
//! sockets, orders in memory, receipts awaited) and is a [`Level`]: two monotonic counts,
//! started and ended, shown as their difference and never below zero, so an end counted twice
//! or before its start cannot make a gauge negative and break an alert on it.
//!
//! The types hold atomics only: no I/O, no clock, so the sans-IO core can count with them.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

/// The `Content-Type` of [`Metrics::render`]'s text (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Upper bounds (seconds) of the commit latency histogram buckets (`+Inf` is implicit).
pub const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A monotonic counter (a Prometheus counter; its name ends in `_total`).
///
/// `fetch_add` and `load` mirror [`AtomicU64`] so code written against plain atomics keeps
/// working; the ordering argument is ignored (counting is always relaxed). A counter has no
/// way down.
#[derive(Clone, Debug, Default)]
pub struct Count(Counter<u64, AtomicU64>);

impl Count {
    /// Adds one; returns the previous value.
    pub fn inc(&self) -> u64 {
        self.0.inc()
    }

    /// Adds `n`; returns the previous value.
    pub fn inc_by(&self, n: u64) -> u64 {
        self.0.inc_by(n)
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.get()
    }

    /// Adds `n` (as [`AtomicU64::fetch_add`]); returns the previous value.
    pub fn fetch_add(&self, n: u64, _: Ordering) -> u64 {
        self.inc_by(n)
    }

    /// The current value (as [`AtomicU64::load`]).
    pub fn load(&self, _: Ordering) -> u64 {
        self.get()
    }
}

/// A gauge of things in flight: how many started minus how many ended, never below zero.
///
/// Both counts only grow, so the gauge never goes negative, whatever order increments and
/// decrements race in. Reading loads the ended count first: whenever every end follows its
/// start, the started count read afterwards is at least as large, and the difference is exact
/// once the counts are quiet. More ends than starts is an accounting bug of the caller: the
/// gauge shows 0 and a warning is logged once.
///
/// `fetch_add`, `fetch_sub` and `load` mirror [`std::sync::atomic::AtomicI64`] so code
/// written against plain atomics keeps working; the ordering argument is ignored.
#[derive(Clone, Debug)]
pub struct Level(Arc<LevelCounts>);

#[derive(Debug)]
struct LevelCounts {
    /// The metric's name, for the warning.
    name: &'static str,
    started: AtomicU64,
    ended: AtomicU64,
    /// Whether the "more ended than started" warning was logged already.
    warned: AtomicBool,
}

impl Level {
    /// A gauge at zero; `name` is only used in the warning about an accounting bug.
    pub fn new(name: &'static str) -> Self {
        Self(Arc::new(LevelCounts {
            name,
            started: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        }))
    }

    /// One more in flight.
    pub fn inc(&self) {
        self.start(1);
    }

    /// One fewer in flight.
    pub fn dec(&self) {
        self.end(1);
    }

    /// `n` more in flight.
    pub fn start(&self, n: u64) {
        self.0.started.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` fewer in flight.
    pub fn end(&self, n: u64) {
        // Release: a reader that sees this end also sees every start made before it.
        self.0.ended.fetch_add(n, Ordering::Release);
    }

    /// How many are in flight (0 when more ended than started).
    pub fn get(&self) -> i64 {
        // Ended first: a start and its end that both land between the two loads then count
        // in `started` only, never in `ended` only.
        let ended = self.0.ended.load(Ordering::Acquire);
        let started = self.0.started.load(Ordering::Relaxed);
        match started.checked_sub(ended) {
            Some(n) => i64::try_from(n).unwrap_or(i64::MAX),
            None => {
                if !self.0.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        metric = self.0.name,
                        started,
                        ended,
                        "more ended than started: a gauge's accounting is off; it shows 0"
                    );
                }
                0
            }
        }
    }

    /// Adds `n` in flight (a negative `n` ends `-n`); returns the previous value.
    pub fn fetch_add(&self, n: i64, _: Ordering) -> i64 {
        let before = self.get();
        if n >= 0 {
            self.start(n.unsigned_abs());
        } else {
            self.end(n.unsigned_abs());
        }
        before
    }

    /// Ends `n` in flight (a negative `n` starts `-n`); returns the previous value.
    pub fn fetch_sub(&self, n: i64, _: Ordering) -> i64 {
        let before = self.get();
        if n >= 0 {
            self.end(n.unsigned_abs());
        } else {
            self.start(n.unsigned_abs());
        }
        before
    }

    /// The current value (as [`std::sync::atomic::AtomicI64::load`]).
    pub fn load(&self, _: Ordering) -> i64 {
        self.get()
    }
}

impl TypedMetric for Level {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for Level {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The label of a count kept per error or refusal code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: Cow<'static, str>,
}

/// The label of a count kept per policy reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: Cow<'static, str>,
}

/// The relay's metrics. Counting is lock-free except the first count of a new label value.
#[derive(Debug)]
pub struct Metrics {
    /// Open device connections.
    pub connections: Level,
    /// Orders held in memory.
    pub orders_in_memory: Level,
    /// Changes accepted and committed.
    pub changes_accepted: Count,
    /// Receipts sent.
    pub receipts_sent: Count,
    /// Receipts waiting on a commit: pushes accepted minus pushes answered (committed,
    /// failed, or dropped with their order).
    pub receipts_pending: Level,
    /// Write transactions committed.
    pub commits: Count,
    /// Commit failures (a write refused because another relay wrote its order first is not
    /// one: see `commit_conflicts`).
    pub commit_errors: Count,
    /// Writes refused because another relay wrote their order first (several relays on one
    /// database): the order is read again and the write retried.
    pub commit_conflicts: Count,
    /// Orders read again from the store because another relay changed them.
    pub orders_reread: Count,
    /// Of those, the ones that read the whole order: the changes stored after what the relay
    /// held did not complete it (a compaction had started the stored tail over).
    pub orders_reread_whole: Count,
    /// Reads of a store's feed from the shared database (several relays).
    pub feed_reads: Count,
    /// Commit notifications whose feed entries were taken as they came (no read of the feed).
    pub feed_notices_applied: Count,
    /// Failed reads of the shared feed or its heads (retried; a growing count means this relay
    /// falls behind the others' commits).
    pub feed_read_errors: Count,
    /// Frames received.
    pub frames_in: Count,
    /// Frames sent.
    pub frames_out: Count,
    /// Bad frames and protocol errors.
    pub protocol_errors: Count,
    /// Upgrades refused for a bad token.
    pub auth_failures: Count,
    /// Open client sockets (HTTP and WebSocket, handshake included).
    pub sockets: Level,
    /// Times the accept loop found every socket slot taken.
    pub sockets_full: Count,
    /// Failed accepts (a full file table included).
    pub accept_errors: Count,
    /// Sockets closed for not finishing their handshake in time.
    pub handshake_timeouts: Count,
    /// Connections closed because their device was revoked.
    pub revoked_closed: Count,
    /// Panics contained while handling a frame (the frame's effects were undone).
    pub frame_panics: Count,
    /// Frames a connection had to wait for because it was over its rate (backpressure).
    pub rate_waits: Count,
    /// Rejected batches, by policy reason.
    rejected: Family<ReasonLabel, Counter>,
    /// Device connections refused at admission, by code.
    refused: Family<CodeLabel, Counter>,
    /// Sync messages refused before they were applied, by code.
    sync_refused: Family<CodeLabel, Counter>,
    /// Group commit latency, seconds.
    commit_seconds: Histogram,
    /// Clones of every handle above, with names and help, for [`Metrics::render`].
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, registered under its Prometheus name.
    pub fn new() -> Self {
        let m = Self {
            connections: Level::new("relay_connections"),
            orders_in_memory: Level::new("relay_orders_in_memory"),
            changes_accepted: Count::default(),
            receipts_sent: Count::default(),
            receipts_pending: Level::new("relay_receipts_pending"),
            commits: Count::default(),
            commit_errors: Count::default(),
            commit_conflicts: Count::default(),
            orders_reread: Count::default(),
            orders_reread_whole: Count::default(),
            feed_reads: Count::default(),
            feed_notices_applied: Count::default(),
            feed_read_errors: Count::default(),
            frames_in: Count::default(),
            frames_out: Count::default(),
            protocol_errors: Count::default(),
            auth_failures: Count::default(),
            sockets: Level::new("relay_sockets"),
            sockets_full: Count::default(),
            accept_errors: Count::default(),
            handshake_timeouts: Count::default(),
            revoked_closed: Count::default(),
            frame_panics: Count::default(),
            rate_waits: Count::default(),
            rejected: Family::default(),
            refused: Family::default(),
            sync_refused: Family::default(),
            commit_seconds: Histogram::new(COMMIT_BUCKETS),
            registry: Registry::default(),
        };
        m.registered()
    }

    /// `self` with every handle registered. Help texts have no final period: the encoder adds
    /// one. Counter names get their `_total` when rendered.
    fn registered(mut self) -> Self {
        let r = &mut self.registry;
        let levels = [
            (
                "relay_connections",
                "Open device connections",
                &self.connections,
            ),
            (
                "relay_orders_in_memory",
                "Orders held in memory",
                &self.orders_in_memory,
            ),
            (
                "relay_receipts_pending",
                "Receipts waiting for a commit (pushes accepted minus pushes answered)",
                &self.receipts_pending,
            ),
            (
                "relay_sockets",
                "Open client sockets, handshakes included",
                &self.sockets,
            ),
        ];
        for (name, help, level) in levels {
            r.register(name, help, level.clone());
        }
        let counts = [
            (
                "relay_changes_accepted",
                "Changes accepted and committed",
                &self.changes_accepted,
            ),
            (
                "relay_receipts_sent",
                "Durable receipts sent",
                &self.receipts_sent,
            ),
            (
                "relay_commits",
                "Write transactions committed",
                &self.commits,
            ),
            (
                "relay_commit_errors",
                "Failed write transactions",
                &self.commit_errors,
            ),
            (
                "relay_commit_conflicts",
                "Writes refused because another relay wrote their order first (retried)",
                &self.commit_conflicts,
            ),
            (
                "relay_orders_reread",
                "Orders read again because another relay changed them",
                &self.orders_reread,
            ),
            (
                "relay_orders_reread_whole",
                "Orders read again whole: the tail stored after this relay's copy did not complete it",
                &self.orders_reread_whole,
            ),
            (
                "relay_feed_reads",
                "Reads of a store feed from the shared database",
                &self.feed_reads,
            ),
            (
                "relay_feed_notices_applied",
                "Commit notifications whose feed entries were taken without reading the feed",
                &self.feed_notices_applied,
            ),
            (
                "relay_feed_read_errors",
                "Failed reads of the shared feed (retried)",
                &self.feed_read_errors,
            ),
            ("relay_frames_in", "Frames received", &self.frames_in),
            ("relay_frames_out", "Frames sent", &self.frames_out),
            (
                "relay_protocol_errors",
                "Malformed frames and protocol errors",
                &self.protocol_errors,
            ),
            (
                "relay_auth_failures",
                "Upgrades refused for a bad token",
                &self.auth_failures,
            ),
            (
                "relay_sockets_full",
                "Times every socket slot was taken when accepting",
                &self.sockets_full,
            ),
            (
                "relay_accept_errors",
                "Failed accepts (e.g. EMFILE)",
                &self.accept_errors,
            ),
            (
                "relay_handshake_timeouts",
                "Sockets closed for not finishing their handshake in time",
                &self.handshake_timeouts,
            ),
            (
                "relay_revoked_connections_closed",
                "Connections closed because their device was revoked",
                &self.revoked_closed,
            ),
            (
                "relay_frame_panics",
                "Panics contained while handling a frame (effects undone, connection closed)",
                &self.frame_panics,
            ),
            (
                "relay_rate_waits",
                "Frames held back because their connection was over its rate (its socket was \
                 not read meanwhile)",
                &self.rate_waits,
            ),
        ];
        for (name, help, count) in counts {
            r.register(name, help, count.0.clone());
        }
        r.register(
            "relay_connections_refused",
            "Device connections refused at admission, by code",
            self.refused.clone(),
        );
        r.register(
            "relay_sync_refused",
            "Sync messages refused before they were applied, by code",
            self.sync_refused.clone(),
        );
        r.register(
            "relay_changes_rejected",
            "Rejected batches by policy reason",
            self.rejected.clone(),
        );
        r.register_with_unit(
            "relay_commit",
            "Group commit latency (one redb write transaction)",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        self
    }

    /// Counts one rejected batch under its policy reason code.
    pub fn rejected(&self, code: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: Cow::Borrowed(code),
            })
            .inc();
    }

    /// Counts one device connection refused at admission under its code.
    pub fn refused(&self, code: &'static str) {
        self.refused
            .get_or_create(&CodeLabel {
                code: Cow::Borrowed(code),
            })
            .inc();
    }

    /// Rejections so far for `code`.
    pub fn rejections(&self, code: &str) -> u64 {
        let label = ReasonLabel {
            reason: Cow::Owned(code.to_owned()),
        };
        self.rejected.get(&label).map_or(0, |c| c.get())
    }

    /// Counts one sync message refused before it was applied, under its error code.
    pub fn sync_refused(&self, code: &'static str) {
        self.sync_refused
            .get_or_create(&CodeLabel {
                code: Cow::Borrowed(code),
            })
            .inc();
    }

    /// Sync messages refused so far for `code`.
    pub fn sync_refusals(&self, code: &str) -> u64 {
        let label = CodeLabel {
            code: Cow::Owned(code.to_owned()),
        };
        self.sync_refused.get(&label).map_or(0, |c| c.get())
    }

    /// Records one commit's latency.
    pub fn observe_commit(&self, seconds: f64) {
        self.commit_seconds.observe(seconds);
    }

    /// The Prometheus text exposition (format 0.0.4, [`CONTENT_TYPE`]) of every metric.
    /// A per-code family appears once it has counted something.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an encoder error would leave what was written.
        if let Err(e) =
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        {
            tracing::warn!(error = %e, "metrics: rendering failed");
        }
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
        assert!(
            text.contains("relay_commit_seconds_bucket{le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(text.contains("relay_commit_seconds_bucket{le=\"0.0001\"} 0"));
        assert!(text.contains("relay_commit_seconds_bucket{le=\"+Inf\"} 1"));
        assert!(text.contains("relay_commit_seconds_count 1"));
        assert!(text.contains("# HELP relay_receipts_pending "));
        assert!(text.contains("# TYPE relay_receipts_pending gauge\nrelay_receipts_pending 0"));
        assert!(text.contains("# TYPE relay_commits_total counter\nrelay_commits_total 0"));
        assert_eq!(m.rejections("edit_after_close"), 2);
        assert_eq!(m.rejections("other"), 0);
    }

    #[test]
    fn a_level_never_goes_negative() {
        let m = Metrics::default();
        m.receipts_pending.fetch_add(2, Ordering::Relaxed);
        m.receipts_pending.fetch_sub(5, Ordering::Relaxed);
        assert_eq!(m.receipts_pending.load(Ordering::Relaxed), 0);
        assert!(m.render().contains("\nrelay_receipts_pending 0\n"));
        // Starts after the excess ends are matched against them: the counts stay honest.
        m.receipts_pending.fetch_add(4, Ordering::Relaxed);
        assert_eq!(m.receipts_pending.get(), 1);
        m.connections.inc();
        m.connections.inc();
        m.connections.dec();
        assert_eq!(m.connections.get(), 1);
        m.sockets.fetch_add(-1, Ordering::Relaxed);
        assert_eq!(m.sockets.get(), 0);
    }

    #[test]
    fn levels_balance_across_threads() {
        let level = Level::new("test");
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        level.inc();
                        level.get();
                        level.dec();
                        level.get();
                    }
                });
            }
        });
        assert_eq!(level.get(), 0);
        // No read ever saw more ends than starts.
        assert!(!level.0.warned.load(Ordering::Relaxed));
    }
}
