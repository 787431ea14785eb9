//! The store feed's live side: connections by store, and committed feed entries coalesced for
//! a few milliseconds and broadcast once per store (encoded once for every connection).
//!
//! With a shared store (several relays on one database) the entries of this relay's own
//! commits are not broadcast from here: feed positions are assigned by the database across
//! every relay, so the feed goes out as read back from it, in order (`hub::shared`); a commit
//! here only marks its store for reading.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use crdt_model::StoreId;
use crdt_model::wire::{FeedEntry, RelayFrame};
use tokio::sync::Notify;

use super::peer::Peer;
use crate::core::ConnId;

/// How long feed entries are collected before they go out: every device of a store gets one
/// `feed` frame per window instead of one per commit, and an order edited many times in the
/// window appears once, with its latest state.
pub(crate) const FEED_COALESCE: Duration = Duration::from_millis(5);

/// Connections by store, and the feed entries waiting to go out.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_store: RwLock<HashMap<StoreId, HashMap<ConnId, Arc<Peer>>>>,
    /// Committed feed entries not broadcast yet, by store, the latest per order.
    pending: Mutex<HashMap<StoreId, HashMap<String, FeedEntry>>>,
    /// Woken when `pending` (or, shared, `committed_here`) goes from empty to not empty.
    pub(crate) wake: Notify,
    /// Whether the store is shared with other relays (see the module docs).
    shared: bool,
    /// Shared store: stores this relay committed to since the feed was last read.
    committed_here: Mutex<std::collections::HashSet<StoreId>>,
    /// Told of every durable commit and every refusal (the back-office board listens).
    pub(crate) watch: Arc<crate::watch::Watch>,
}

impl Registry {
    /// An empty registry; `shared` when several relays share the store.
    pub(crate) fn new(shared: bool) -> Self {
        Self {
            shared,
            ..Self::default()
        }
    }

    /// Shared store: the stores committed to here since the last call.
    pub(crate) fn take_committed_here(&self) -> Vec<StoreId> {
        self.committed_here
            .lock()
            .map(|mut s| s.drain().collect())
            .unwrap_or_default()
    }

    /// Whether any connection of `store` is here (or someone watches the feed).
    pub(crate) fn has_conns(&self, store: &StoreId) -> bool {
        self.watch.is_watched()
            || self
                .by_store
                .read()
                .map(|m| m.contains_key(store))
                .unwrap_or(false)
    }

    /// Sends feed entries (in feed order) to every connection of `store`, at once.
    pub(crate) fn send_entries(&self, store: &StoreId, entries: Vec<FeedEntry>) {
        if entries.is_empty() {
            return;
        }
        if self.shared {
            // Read back from the database: another relay's commits too.
            self.watch.committed(store);
        }
        let Ok(m) = self.by_store.read() else {
            return;
        };
        let Some(conns) = m.get(store) else {
            return;
        };
        let frame = RelayFrame::Feed { entries };
        let bytes = Bytes::from(frame.encode());
        let RelayFrame::Feed { entries } = frame else {
            return;
        };
        for p in conns.values() {
            p.offer_feed(&bytes, &entries, self.shared);
        }
    }

    pub(crate) fn add(&self, peer: &Arc<Peer>) {
        if let Ok(mut m) = self.by_store.write() {
            m.entry(peer.store.clone())
                .or_default()
                .insert(peer.conn, Arc::clone(peer));
        }
    }

    pub(crate) fn remove(&self, peer: &Peer) {
        if let Ok(mut m) = self.by_store.write()
            && let Some(conns) = m.get_mut(&peer.store)
        {
            conns.remove(&peer.conn);
            if conns.is_empty() {
                m.remove(&peer.store);
            }
        }
    }

    /// Queues a committed order's feed entry for the next coalesced broadcast.
    pub(crate) fn publish(&self, store: StoreId, entry: FeedEntry) {
        self.watch.committed(&store);
        if self.shared {
            let Ok(mut here) = self.committed_here.lock() else {
                return;
            };
            let was_empty = here.is_empty();
            here.insert(store);
            drop(here);
            if was_empty {
                self.wake.notify_one();
            }
            return;
        }
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let was_empty = pending.is_empty();
        let slot = pending.entry(store).or_default();
        match slot.get(&entry.order) {
            Some(old) if old.seq >= entry.seq => {}
            _ => {
                slot.insert(entry.order.clone(), entry);
            }
        }
        drop(pending);
        if was_empty {
            self.wake.notify_one();
        }
    }

    /// Broadcasts every pending feed entry: one frame per store, entries in feed order.
    pub(crate) fn flush_feed(&self) {
        let pending = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        for (store, entries) in pending {
            let mut entries: Vec<FeedEntry> = entries.into_values().collect();
            entries.sort_unstable_by_key(|e| e.seq);
            self.send_entries(&store, entries);
        }
    }

    /// The feed task: waits for entries, lets more gather for [`FEED_COALESCE`], sends them.
    pub(crate) async fn run_feed(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(FEED_COALESCE).await;
            self.flush_feed();
        }
    }
}
