//! The committer: one thread that folds every queued write into one redb transaction (group
//! commit) and reports each write's outcome to its worker. A write is always answered: if the
//! thread cannot start, stops, or panics, the writes it held are reported failed (a dropped
//! [`CommitReply`] reports itself), so nothing waits forever on a commit.

use std::sync::Arc;
use std::time::Instant;

use crdt_model::OrderId;
use tokio::sync::mpsc;

use super::worker::Event;
use crate::error::RelayError;
use crate::metrics::Metrics;
use crate::store::{CommitOutcome, OrderWrite, RelayStore};

/// Most writes folded into one transaction.
const MAX_BATCH: usize = 4096;

/// Where a write's outcome goes; reports a failure if dropped unanswered.
pub(crate) struct CommitReply {
    order: OrderId,
    to: Option<mpsc::UnboundedSender<Event>>,
}

impl CommitReply {
    pub(crate) fn new(order: OrderId, to: mpsc::UnboundedSender<Event>) -> Self {
        Self {
            order,
            to: Some(to),
        }
    }

    pub(crate) fn send(mut self, result: Result<CommitOutcome, RelayError>) {
        if let Some(to) = self.to.take() {
            let _ = to.send(Event::Committed {
                order: self.order,
                result,
            });
        }
    }
}

impl Drop for CommitReply {
    fn drop(&mut self) {
        if let Some(to) = self.to.take() {
            let _ = to.send(Event::Committed {
                order: self.order,
                result: Err(RelayError::Internal(
                    "the committer stopped before this write".into(),
                )),
            });
        }
    }
}

/// One write and where its outcome goes.
pub(crate) struct CommitJob {
    pub(crate) write: OrderWrite,
    pub(crate) reply: CommitReply,
}

/// Handle to the committer thread.
pub(crate) struct Committer {
    tx: Option<std::sync::mpsc::Sender<CommitJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Committer {
    /// Starts the thread. If it cannot start, every write is answered with a failure.
    pub(crate) fn start(store: Arc<RelayStore>, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
        let spawned = std::thread::Builder::new()
            .name("relay-committer".into())
            .spawn(move || run(&store, &metrics, &rx));
        match spawned {
            Ok(h) => Self {
                tx: Some(tx),
                thread: Some(h),
            },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the committer thread; every write fails");
                Self {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    /// Queues a job; if the committer is gone the job is answered with a failure at once.
    pub(crate) fn submit(&self, job: CommitJob) {
        match &self.tx {
            Some(tx) => {
                // On error the job comes back and is dropped: its reply reports the failure.
                let _ = tx.send(job);
            }
            None => job.reply.send(Err(RelayError::Internal(
                "the committer is not running".into(),
            ))),
        }
    }

    /// Stops accepting jobs and waits for the thread to finish what it holds.
    pub(crate) fn stop(&mut self) -> Option<std::thread::JoinHandle<()>> {
        self.tx = None;
        self.thread.take()
    }
}

fn run(store: &RelayStore, metrics: &Metrics, rx: &std::sync::mpsc::Receiver<CommitJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let writes: Vec<OrderWrite> = jobs.iter().map(|j| j.write.clone()).collect();
        let started = Instant::now();
        let result = crdt_model::guard::contain(|| store.commit(&writes))
            .unwrap_or_else(|why| Err(RelayError::Internal(format!("commit panicked: {why}"))));
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(outcomes) => {
                metrics.commits.inc();
                metrics.observe_commit(seconds);
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    job.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                metrics.commit_errors.inc();
                tracing::error!(error = %e, writes = jobs.len(), "group commit failed");
                let shared = Arc::new(e);
                for job in jobs {
                    job.reply.send(Err(RelayError::Shared(Arc::clone(&shared))));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn order() -> OrderId {
        OrderId::generate(
            crdt_model::Timestamp(1),
            &mut crdt_model::SplitMix64::new(3),
        )
    }

    /// Issue 12, defect 5: a write the committer never answers (its thread stopped or
    /// panicked with the job) is reported failed, so nobody waits for it forever.
    #[test]
    fn a_write_dropped_unanswered_reports_a_failure() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        drop(CommitReply::new(order(), tx));
        match rx.try_recv() {
            Ok(Event::Committed { result: Err(e), .. }) => {
                assert!(e.to_string().contains("committer stopped"), "{e}");
            }
            _ => panic!("no failure reported"),
        }
    }

    /// A committer that is not running answers every write at once with a failure.
    #[test]
    fn a_committer_that_is_not_running_fails_writes_at_once() {
        let committer = Committer {
            tx: None,
            thread: None,
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let write = OrderWrite {
            order: order(),
            store: crdt_model::StoreId::new("s1").unwrap(),
            base: Vec::new(),
            number: None,
            changes: Vec::new(),
            compacted: None,
            status: crdt_model::OrderStatus::InProgress,
            heads: Vec::new(),
            at: 1,
        };
        committer.submit(CommitJob {
            write,
            reply: CommitReply::new(order(), tx),
        });
        assert!(matches!(
            rx.try_recv(),
            Ok(Event::Committed { result: Err(_), .. })
        ));
    }
}
