//! The records the relay core and its stores exchange: what is stored about an order
//! ([`OrderMeta`], [`StoredOrder`]), a write to commit ([`OrderWrite`]) and its outcome
//! ([`CommitOutcome`]), a feed entry ([`FeedRecord`]). Plain data, no storage engine: the core
//! builds without one (see [`crate::core`]); [`crate::store`] re-exports them.

use crdt_model::automerge::Automerge;
use crdt_model::{OrderId, OrderNumber, OrderStatus, StoreId};
use serde::{Deserialize, Serialize};

use crate::error::RelayError;

/// Everything stored about one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOrder {
    /// The order's metadata.
    pub meta: OrderMeta,
    /// The last compacted document (`Automerge::save()`), empty before the first compaction.
    pub snapshot: Vec<u8>,
    /// Raw Automerge changes appended since the snapshot, in commit order.
    pub tail: Vec<Vec<u8>>,
}

impl StoredOrder {
    /// The document: the snapshot loaded, then every tail change applied incrementally.
    /// Stored bytes that do not load give [`RelayError::Corrupt`].
    pub fn to_doc(&self) -> Result<Automerge, RelayError> {
        let mut doc = if self.snapshot.is_empty() {
            Automerge::new()
        } else {
            Automerge::load(&self.snapshot).map_err(|e| {
                RelayError::Corrupt(format!("order {}: snapshot: {e}", self.meta.order))
            })?
        };
        for (i, change) in self.tail.iter().enumerate() {
            doc.load_incremental(change).map_err(|e| {
                RelayError::Corrupt(format!("order {}: tail change {i}: {e}", self.meta.order))
            })?;
        }
        Ok(doc)
    }
}

/// The end of an order's stored tail: its metadata and the raw changes stored at tail
/// positions `from` and after, in commit order. What a relay that holds the order up to tail
/// position `from` reads to catch up with another relay's commits, instead of the whole order.
/// After a compaction the positions start over: the reader checks that the changes complete
/// what it holds up to `meta.heads`, and reads the whole order otherwise.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTail {
    /// The order's metadata.
    pub meta: OrderMeta,
    /// The first tail position read.
    pub from: u32,
    /// The raw changes at positions `from..meta.tail_len`.
    pub changes: Vec<Vec<u8>>,
}

/// What the relay keeps about an order beside its document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderMeta {
    /// The order.
    pub order: OrderId,
    /// Its store.
    pub store: StoreId,
    /// The number the relay assigned (per store, from 1).
    pub number: OrderNumber,
    /// Effective business status as of the last write.
    pub status: OrderStatus,
    /// Heads of the stored document.
    pub heads: Vec<[u8; 32]>,
    /// First persist, ms since the epoch (relay clock).
    pub created_at: i64,
    /// Last write, ms since the epoch (relay clock).
    pub updated_at: i64,
    /// The order's current position in its store's feed.
    pub feed_seq: u64,
    /// Number of changes in the tail after the snapshot.
    pub tail_len: u32,
}

/// One order's write within a `RelayStore::commit` batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderWrite {
    /// The order.
    pub order: OrderId,
    /// Its store; must equal the stored store of a known order.
    pub store: StoreId,
    /// Raw Automerge change bytes to append to the tail (ignored when `compacted` is set).
    pub changes: Vec<Vec<u8>>,
    /// A full `Automerge::save()` that replaces the snapshot and the whole tail.
    pub compacted: Option<Vec<u8>>,
    /// Effective status after this write.
    pub status: OrderStatus,
    /// Heads of the stored document this write builds on: the stored [`OrderMeta::heads`],
    /// empty for an order not yet stored. Compared as a set; when it differs from what is
    /// stored, `RelayStore::commit` refuses the whole batch with [`RelayError::Conflict`].
    /// Several writes of one order in one batch chain: each builds on the heads of the one
    /// before.
    pub base: Vec<[u8; 32]>,
    /// The number the document after this write carries (the relay's number change), if
    /// any. An order first stored without it is listed ([`crate::store`]'s `unnumbered`)
    /// until a write with it lands, so a relay that stopped in between writes it at start. An
    /// order first stored with one (it came back through a till after a restore, carrying the
    /// relay's sealed number change) keeps that number instead of getting the next.
    pub number: Option<OrderNumber>,
    /// Heads after this write.
    pub heads: Vec<[u8; 32]>,
    /// When, ms since the epoch (relay clock).
    pub at: i64,
}

/// The result of one [`OrderWrite`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitOutcome {
    /// The order.
    pub order: OrderId,
    /// Its number (new or kept).
    pub number: OrderNumber,
    /// `true` when this write assigned the number (the order's first persist).
    pub newly_numbered: bool,
    /// The order's new feed position.
    pub feed_seq: u64,
    /// The metadata as stored after this write.
    pub meta: OrderMeta,
}

/// One entry of a store feed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FeedRecord {
    /// Position in the store's feed.
    pub seq: u64,
    /// The order's metadata (its latest; `meta.feed_seq == seq`).
    pub meta: OrderMeta,
}
