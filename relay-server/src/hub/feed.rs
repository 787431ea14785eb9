//! The store feed's live side: connections by store, and committed feed entries coalesced for
//! a few milliseconds and broadcast once per store (encoded once for every connection).

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
const FEED_COALESCE: Duration = Duration::from_millis(5);

/// Connections by store, and the feed entries waiting to go out.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_store: RwLock<HashMap<StoreId, HashMap<ConnId, Arc<Peer>>>>,
    /// Committed feed entries not broadcast yet, by store, the latest per order.
    pending: Mutex<HashMap<StoreId, HashMap<String, FeedEntry>>>,
    /// Woken when `pending` goes from empty to not empty.
    wake: Notify,
}

impl Registry {
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
        let Ok(m) = self.by_store.read() else {
            return;
        };
        for (store, entries) in pending {
            let Some(conns) = m.get(&store) else {
                continue;
            };
            let mut entries: Vec<FeedEntry> = entries.into_values().collect();
            entries.sort_unstable_by_key(|e| e.seq);
            let frame = RelayFrame::Feed { entries };
            let bytes = Bytes::from(frame.encode());
            let RelayFrame::Feed { entries } = frame else {
                continue;
            };
            for p in conns.values() {
                p.offer_feed(&bytes, &entries);
            }
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
