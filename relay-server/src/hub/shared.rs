//! Several relays on one PostgreSQL database: learning what the others committed.
//!
//! Every commit announces, in its own transaction, each store's new feed head on the
//! database's `LISTEN`/`NOTIFY` channel ([`crate::pg::FeedNotice`]); PostgreSQL delivers the
//! announcement to every listening relay when the transaction commits, never before, in
//! commit order. This task keeps one listening connection and, per store, the last feed
//! position it has read (`seen`). A store whose head moved (announced by another relay, by
//! this one's own commits, or found by the periodic sweep) is read from the database, from
//! `seen` on, in feed order:
//!
//! * each entry goes to the worker owning its order
//!   ([`RelayCore::handle_changed_elsewhere`](crate::core::RelayCore::handle_changed_elsewhere)),
//!   which reads the order again if its copy in memory lacks the entry's heads and sends the
//!   new changes to the order's connections here;
//! * the entries go to this relay's connections of the store, as the live feed. Positions are
//!   assigned by the database across every relay, so the feed is sent as read back from it
//!   (in order, no gaps), this relay's own commits included.
//!
//! Nothing depends on a notification arriving: the payload only says where to read. A relay
//! that misses some (its listening connection dropped, or it was busy) finds the moved heads
//! with the sweep ([`SWEEP`]) or when it listens again, and reads what it missed from the
//! database; it never diverges silently.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crdt_model::StoreId;
use crdt_model::wire::FeedEntry;
use tokio::sync::mpsc;

use super::feed::{FEED_COALESCE, Registry};
use super::shard_of;
use super::worker::WorkerMsg;
use crate::core::feed_entry;
use crate::metrics::Metrics;
use crate::pg::{FeedListener, PgStore};

/// How often every store's feed head is compared with what this relay has read (and a lost
/// listening connection is opened again).
pub(crate) const SWEEP: Duration = Duration::from_secs(1);

/// Feed entries read per query.
const PAGE: usize = 512;

/// The task: see the module docs. Runs until the hub stops it.
pub(crate) async fn run(
    pg: Arc<PgStore>,
    registry: Arc<Registry>,
    workers: Vec<mpsc::Sender<WorkerMsg>>,
    metrics: Arc<Metrics>,
) {
    let seal = pg.seal_key();
    let mut seen: HashMap<StoreId, u64> = HashMap::new();
    // Where every store's feed is now: what happened before this relay started is in the
    // database, where connections and loads read it.
    loop {
        match pg.feed_heads().await {
            Ok(heads) => {
                seen.extend(heads);
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the store feed heads; retrying");
                tokio::time::sleep(SWEEP).await;
            }
        }
    }
    let mut listener: Option<FeedListener> = None;
    let mut dirty: HashSet<StoreId> = HashSet::new();
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if listener.is_none() {
            match pg.listen().await {
                Ok(l) => {
                    tracing::info!(
                        channel = pg.channel(),
                        "listening for other relays' commits"
                    );
                    listener = Some(l);
                    // Whatever was announced while nobody listened: the sweep reads it.
                    sweep.reset_immediately();
                }
                Err(e) => tracing::warn!(error = %e, "cannot listen for other relays' commits"),
            }
        }
        tokio::select! {
            notice = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await,
                    None => std::future::pending().await,
                }
            } => match notice {
                Some(n) => {
                    if n.seq > seen.get(&n.store).copied().unwrap_or(0) {
                        dirty.insert(n.store);
                    }
                }
                None => {
                    tracing::warn!("the listening connection ended; listening again");
                    listener = None;
                }
            },
            () = registry.wake.notified() => {
                dirty.extend(registry.take_committed_here());
            }
            _ = sweep.tick() => match pg.feed_heads().await {
                Err(e) => {
                    metrics.feed_read_errors.inc();
                    tracing::warn!(error = %e, "cannot read the store feed heads");
                }
                Ok(heads) => {
                    for (store, head) in heads {
                        if head > seen.get(&store).copied().unwrap_or(0) {
                            dirty.insert(store);
                        }
                    }
                }
            },
        }
        if dirty.is_empty() {
            continue;
        }
        // Let more commits gather, then read each moved store once.
        tokio::time::sleep(FEED_COALESCE).await;
        if let Some(l) = listener.as_mut() {
            while let Some(n) = l.try_recv() {
                if n.seq > seen.get(&n.store).copied().unwrap_or(0) {
                    dirty.insert(n.store);
                }
            }
        }
        dirty.extend(registry.take_committed_here());
        for store in std::mem::take(&mut dirty) {
            let from = seen.get(&store).copied().unwrap_or(0);
            match read_store(&pg, &store, from, &registry, &workers, &seal, &metrics).await {
                Ok(upto) => {
                    seen.insert(store, upto);
                }
                Err(e) => {
                    metrics.feed_read_errors.inc();
                    tracing::warn!(%store, error = %e, "cannot read the store feed; retrying");
                    // Read again from the same position at the next sweep.
                }
            }
        }
    }
}

/// Reads `store`'s feed after `from` to its end: each entry to its order's worker, and to
/// this relay's connections of the store. Returns the last position read.
async fn read_store(
    pg: &PgStore,
    store: &StoreId,
    mut from: u64,
    registry: &Registry,
    workers: &[mpsc::Sender<WorkerMsg>],
    seal: &crdt_model::SealKey,
    metrics: &Metrics,
) -> Result<u64, crate::RelayError> {
    loop {
        metrics.feed_reads.inc();
        let records = pg.feed_since(store, from, PAGE).await?;
        let full = records.len() == PAGE;
        let Some(last) = records.last().map(|r| r.seq) else {
            return Ok(from);
        };
        let mut entries: Vec<FeedEntry> = Vec::new();
        let live = registry.has_conns(store);
        for r in &records {
            let heads = r
                .meta
                .heads
                .iter()
                .map(|h| automerge::ChangeHash(*h))
                .collect();
            let worker = &workers[shard_of(&r.meta.order, workers.len())];
            if worker
                .send(WorkerMsg::ChangedElsewhere {
                    order: r.meta.order,
                    heads,
                })
                .await
                .is_err()
            {
                return Err(crate::RelayError::ShuttingDown);
            }
            if live {
                entries.push(feed_entry(&r.meta, seal));
            }
        }
        registry.send_entries(store, entries);
        from = last;
        if !full {
            return Ok(from);
        }
    }
}
