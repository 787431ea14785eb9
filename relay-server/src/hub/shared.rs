//! Several relays on one PostgreSQL database: learning what the others committed.
//!
//! Every commit announces, in its own transaction, each store's new feed head on the
//! database's `LISTEN`/`NOTIFY` channel ([`crate::pg::FeedNotice`]), with the feed entries
//! it added when they fit in one notification (almost always: a few hundred bytes per
//! order); PostgreSQL delivers the announcement to every listening relay when the
//! transaction commits, never before, in commit order. This task keeps one listening
//! connection and, per store, the last feed position it has read (`seen`). A notification
//! whose entries start exactly at `seen` is taken as it is (no query). A store whose head
//! moved otherwise (a notification without entries, one that shows a gap, or a head found
//! by the periodic sweep) is read from the database, from `seen` on, in feed order. Either
//! way, in feed order:
//!
//! * each entry goes to the worker owning its order
//!   ([`RelayCore::handle_changed_elsewhere`](crate::core::RelayCore::handle_changed_elsewhere)),
//!   which reads the order again if its copy in memory lacks the entry's heads and sends the
//!   new changes to the order's connections here;
//! * the entries go to this relay's connections of the store, as the live feed. Positions are
//!   assigned by the database across every relay, so the feed is sent as the database
//!   announces it (in order, no gaps), this relay's own commits included: they come back as
//!   notifications like everyone's (read at once only while no connection listens).
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
use crate::pg::{FeedListener, FeedNotice, PgStore};
use crate::records::OrderMeta;

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
                    if let Err(e) =
                        take_notice(n, &mut seen, &mut dirty, &registry, &workers, &seal, &metrics)
                            .await
                    {
                        tracing::warn!(error = %e, "stopping: the relay's workers are gone");
                        return;
                    }
                }
                None => {
                    tracing::warn!("the listening connection ended; listening again");
                    listener = None;
                }
            },
            () = registry.wake.notified() => {
                // This relay's own commits come back as notifications like everyone's; only
                // without a listening connection are they read at once.
                let here = registry.take_committed_here();
                if listener.is_none() {
                    dirty.extend(here);
                }
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
        let here = registry.take_committed_here();
        if listener.is_none() {
            dirty.extend(here);
        }
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

/// A notification: its entries are delivered at once if they follow exactly what this relay
/// has read of the store's feed; otherwise (some were missed, or it came without entries)
/// the store is marked to be read from the database. Errs only when the workers are gone.
async fn take_notice(
    n: FeedNotice,
    seen: &mut HashMap<StoreId, u64>,
    dirty: &mut HashSet<StoreId>,
    registry: &Registry,
    workers: &[mpsc::Sender<WorkerMsg>],
    seal: &crdt_model::SealKey,
    metrics: &Metrics,
) -> Result<(), crate::RelayError> {
    let at = seen.get(&n.store).copied().unwrap_or(0);
    if n.seq <= at {
        return Ok(());
    }
    match n.added {
        Some((since, metas)) if since == at && !dirty.contains(&n.store) => {
            metrics.feed_notices_applied.inc();
            deliver(&n.store, metas.iter(), registry, workers, seal).await?;
            seen.insert(n.store, n.seq);
        }
        _ => {
            dirty.insert(n.store);
        }
    }
    Ok(())
}

/// Hands feed entries, in feed order, to the workers owning their orders and to this relay's
/// connections of `store`.
async fn deliver<'a>(
    store: &StoreId,
    metas: impl Iterator<Item = &'a OrderMeta>,
    registry: &Registry,
    workers: &[mpsc::Sender<WorkerMsg>],
    seal: &crdt_model::SealKey,
) -> Result<(), crate::RelayError> {
    let live = registry.has_conns(store);
    let mut entries: Vec<FeedEntry> = Vec::new();
    for meta in metas {
        let heads = meta
            .heads
            .iter()
            .map(|h| automerge::ChangeHash(*h))
            .collect();
        let worker = &workers[shard_of(&meta.order, workers.len())];
        if worker
            .send(WorkerMsg::ChangedElsewhere {
                order: meta.order,
                heads,
            })
            .await
            .is_err()
        {
            return Err(crate::RelayError::ShuttingDown);
        }
        if live {
            entries.push(feed_entry(meta, seal));
        }
    }
    registry.send_entries(store, entries);
    Ok(())
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
        deliver(
            store,
            records.iter().map(|r| &r.meta),
            registry,
            workers,
            seal,
        )
        .await?;
        from = last;
        if !full {
            return Ok(from);
        }
    }
}
