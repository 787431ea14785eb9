//! Orders: [`RelayStore::commit`] (a batch of [`OrderWrite`]s in one durable write transaction,
//! each checked against the stored heads it builds on), and the reads of one order or of a
//! store's orders: [`RelayStore::load_order`], [`RelayStore::order_meta`],
//! [`RelayStore::order_by_number`], [`RelayStore::list_orders`], [`RelayStore::order_count`].

use std::collections::BTreeSet;

use crdt_model::{OrderId, OrderNumber, StoreId};
use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::codec::{self, decode_meta, encode_meta};
use super::tables::{FEED, NUMBERS, ORDERS, SNAPSHOTS, STORES, TAIL, UNNUMBERED};
use super::{
    CommitOutcome, OrderMeta, OrderWrite, RelayStore, StatusFilter, StoredOrder, StoredTail,
    set_immediate,
};
use crate::error::RelayError;

impl RelayStore {
    /// Persists a batch of order writes in one write transaction with immediate durability
    /// (group commit): on return, all of them are on disk, or (on error) none.
    ///
    /// An order not yet stored gets the next number of its store (from 1, gap-free), exactly
    /// once. A known order keeps its number, and its store must match (else
    /// [`RelayError::Invalid`] and nothing of the batch is written). Changes are appended to the
    /// tail, or `compacted` replaces snapshot and tail. Each write moves the order to the next
    /// position of its store's feed. Writes for the same order apply in slice order.
    ///
    /// Each write's [`OrderWrite::base`] must equal, as a set, the heads stored for its order
    /// when it applies (empty for an order not yet stored; for a second write of one order in
    /// the batch, the first one's heads): otherwise the whole batch is refused with
    /// [`RelayError::Conflict`] naming the order, and nothing of it is written. A write built on
    /// a state that is not the stored one would store heads (and a tail) that do not describe
    /// one document.
    pub fn commit(&self, writes: &[OrderWrite]) -> Result<Vec<CommitOutcome>, RelayError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        match Self::apply(&txn, writes) {
            Ok(out) => {
                txn.commit()?;
                Ok(out)
            }
            Err(e) => {
                // Nothing of the batch is written.
                if let Err(abort) = txn.abort() {
                    tracing::warn!(error = %abort, "aborting a refused batch failed");
                }
                Err(e)
            }
        }
    }

    fn apply(
        txn: &WriteTransaction,
        writes: &[OrderWrite],
    ) -> Result<Vec<CommitOutcome>, RelayError> {
        let mut orders = txn.open_table(ORDERS)?;
        let mut snapshots = txn.open_table(SNAPSHOTS)?;
        let mut tail = txn.open_table(TAIL)?;
        let mut feed = txn.open_table(FEED)?;
        let mut numbers = txn.open_table(NUMBERS)?;
        let mut stores = txn.open_table(STORES)?;
        let mut unnumbered = txn.open_table(UNNUMBERED)?;
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let key = *w.order.as_bytes();
            let store = w.store.as_str();
            let prev = orders
                .get(key)?
                .map(|g| decode_meta(g.value()))
                .transpose()?;
            if let Some(prev) = &prev
                && prev.store != w.store
            {
                return Err(RelayError::Invalid(format!(
                    "order {} belongs to store {}, not {}",
                    w.order, prev.store, w.store
                )));
            }
            let stored_heads = prev.as_ref().map_or(&[][..], |p| p.heads.as_slice());
            if !same_heads(stored_heads, &w.base) {
                return Err(RelayError::Conflict(match &prev {
                    Some(_) => format!(
                        "order {}: the write builds on {} head(s) that are not the {} stored",
                        w.order,
                        w.base.len(),
                        stored_heads.len()
                    ),
                    None => format!(
                        "order {}: the write builds on {} head(s) but the order is not stored",
                        w.order,
                        w.base.len()
                    ),
                }));
            }
            let (mut last_number, feed_head) =
                stores.get(store)?.map(|g| g.value()).unwrap_or((0, 0));
            let feed_seq = feed_head
                .checked_add(1)
                .ok_or_else(|| RelayError::Internal(format!("feed of store {store} is full")))?;
            let (number, newly_numbered, created_at, old_tail, old_seq) = match &prev {
                Some(p) => (p.number, false, p.created_at, p.tail_len, Some(p.feed_seq)),
                // Back through a till after a restore, with the number the relay gave it.
                None => match w.number {
                    Some(n) => {
                        let holder = numbers.get((store, n.0))?.map(|g| g.value());
                        match holder {
                            Some(other) if other != key => tracing::error!(
                                order = %w.order, number = n.0, store,
                                "the number this order came back with is held by another order \
                                 (recovery was released before every till was heard from)"
                            ),
                            _ => {
                                numbers.insert((store, n.0), key)?;
                            }
                        }
                        last_number = last_number.max(n.0);
                        (n, false, w.at, 0, None)
                    }
                    None => {
                        last_number = last_number.checked_add(1).ok_or_else(|| {
                            RelayError::Internal(format!(
                                "order numbers of store {store} exhausted"
                            ))
                        })?;
                        numbers.insert((store, last_number), key)?;
                        (OrderNumber(last_number), true, w.at, 0, None)
                    }
                },
            };
            stores.insert(store, (last_number, feed_seq))?;
            if w.number.is_some() {
                unnumbered.remove(key)?;
            } else if newly_numbered {
                unnumbered.insert(key, ())?;
            }

            let tail_len = if let Some(snapshot) = &w.compacted {
                snapshots.insert(key, snapshot.as_slice())?;
                tail.retain_in((key, 0u32)..=(key, u32::MAX), |_, _| false)?;
                0
            } else {
                if prev.is_none() {
                    snapshots.insert(key, &[][..])?;
                }
                let mut len = old_tail;
                for change in &w.changes {
                    tail.insert((key, len), change.as_slice())?;
                    len = len.checked_add(1).ok_or_else(|| {
                        RelayError::Invalid(format!("order {}: tail is full, compact it", w.order))
                    })?;
                }
                len
            };

            if let Some(old) = old_seq {
                feed.remove((store, old))?;
            }
            feed.insert((store, feed_seq), key)?;

            let meta = OrderMeta {
                order: w.order,
                store: w.store.clone(),
                number,
                status: w.status,
                heads: w.heads.clone(),
                created_at,
                updated_at: w.at,
                feed_seq,
                tail_len,
            };
            orders.insert(key, encode_meta(&meta)?.as_slice())?;
            out.push(CommitOutcome {
                order: w.order,
                number,
                newly_numbered,
                feed_seq,
                meta,
            });
        }
        Ok(out)
    }

    /// The order's metadata and the tail changes stored at positions `from` and after, if
    /// stored (one read transaction).
    pub fn load_tail(&self, order: OrderId, from: u32) -> Result<Option<StoredTail>, RelayError> {
        let txn = self.read()?;
        let key = *order.as_bytes();
        let Some(meta) = stored_meta(&txn, key)? else {
            return Ok(None);
        };
        let mut changes = Vec::new();
        for entry in txn.open_table(TAIL)?.range((key, from)..=(key, u32::MAX))? {
            let (_, v) = entry?;
            changes.push(v.value().to_vec());
        }
        Ok(Some(StoredTail {
            meta,
            from,
            changes,
        }))
    }

    /// The order's metadata, snapshot and tail, if stored (one read transaction).
    pub fn load_order(&self, order: OrderId) -> Result<Option<StoredOrder>, RelayError> {
        let txn = self.read()?;
        let key = *order.as_bytes();
        let Some(meta) = stored_meta(&txn, key)? else {
            return Ok(None);
        };
        let snapshot = txn
            .open_table(SNAPSHOTS)?
            .get(key)?
            .map(|g| g.value().to_vec())
            .ok_or_else(|| RelayError::Corrupt(format!("order {order}: snapshot missing")))?;
        let tail_table = txn.open_table(TAIL)?;
        let mut tail = Vec::new();
        for entry in tail_table.range((key, 0u32)..=(key, u32::MAX))? {
            let (_, v) = entry?;
            tail.push(v.value().to_vec());
        }
        if tail.len() != usize::try_from(meta.tail_len).unwrap_or(usize::MAX) {
            return Err(RelayError::Corrupt(format!(
                "order {order}: {} tail changes stored, metadata says {}",
                tail.len(),
                meta.tail_len
            )));
        }
        Ok(Some(StoredOrder {
            meta,
            snapshot,
            tail,
        }))
    }

    /// The order's metadata, if stored.
    pub fn order_meta(&self, order: OrderId) -> Result<Option<OrderMeta>, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(ORDERS)?;
        let meta = table
            .get(*order.as_bytes())?
            .map(|g| decode_meta(g.value()))
            .transpose()?;
        Ok(meta)
    }

    /// Orders stored with a number their document does not carry yet, at most `limit` (the
    /// relay writes those numbers at start). A file from before this list existed has none.
    pub fn unnumbered(&self, limit: usize) -> Result<Vec<OrderId>, RelayError> {
        let txn = self.read()?;
        let table = match txn.open_table(UNNUMBERED) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let mut out = Vec::new();
        for entry in table.iter()?.take(limit) {
            let (k, _) = entry?;
            out.push(codec::order_id(&k.value())?);
        }
        Ok(out)
    }

    /// The order with `number` in `store`, if any.
    pub fn order_by_number(
        &self,
        store: &StoreId,
        number: OrderNumber,
    ) -> Result<Option<OrderId>, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(NUMBERS)?;
        let id = table.get((store.as_str(), number.0))?.map(|g| g.value());
        id.map(|b| codec::order_id(&b)).transpose()
    }
    /// Orders of `store` passing `filter` with `feed_seq > since_feed_seq`, ascending by
    /// `feed_seq`, at most `limit`. The next page starts after the last `feed_seq` returned.
    pub fn list_orders(
        &self,
        store: &StoreId,
        filter: StatusFilter,
        since_feed_seq: u64,
        limit: usize,
    ) -> Result<Vec<OrderMeta>, RelayError> {
        let mut out = Vec::new();
        self.scan_feed(
            store,
            since_feed_seq,
            |_, meta| {
                if filter.matches(meta.status) {
                    out.push(meta);
                }
                out.len() < limit
            },
            limit,
        )?;
        Ok(out)
    }

    /// How many orders are stored (all stores).
    pub fn order_count(&self) -> Result<u64, RelayError> {
        let txn = self.read()?;
        Ok(txn.open_table(ORDERS)?.len()?)
    }
}

/// `true` when `a` and `b` hold the same heads, in any order.
fn same_heads(a: &[[u8; 32]], b: &[[u8; 32]]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// An order's stored metadata, read in `txn`.
fn stored_meta(
    txn: &redb::ReadTransaction,
    key: [u8; 16],
) -> Result<Option<OrderMeta>, RelayError> {
    txn.open_table(ORDERS)?
        .get(key)?
        .map(|g| decode_meta(g.value()))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::same_heads;

    #[test]
    fn heads_compare_as_sets() {
        assert!(same_heads(&[], &[]));
        assert!(same_heads(&[[1; 32], [2; 32]], &[[2; 32], [1; 32]]));
        assert!(!same_heads(&[[1; 32]], &[]));
        assert!(!same_heads(&[], &[[1; 32]]));
        assert!(!same_heads(&[[1; 32], [2; 32]], &[[1; 32], [3; 32]]));
    }
}
