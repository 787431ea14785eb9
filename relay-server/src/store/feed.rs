//! The store feed: per store, one entry per order at its latest change, in commit order. Devices
//! catch up with [`RelayStore::feed_since`] from the last sequence they saw;
//! [`RelayStore::feed_head`] is the latest.

use crdt_model::StoreId;

use super::codec::{self, decode_meta};
use super::tables::{FEED, ORDERS, STORES};
use super::{FeedRecord, OrderMeta, RelayStore};
use crate::error::RelayError;

impl RelayStore {
    /// Feed entries of `store` with `seq > since`, ascending, at most `limit`.
    pub fn feed_since(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<FeedRecord>, RelayError> {
        let mut out = Vec::new();
        self.scan_feed(
            store,
            since,
            |seq, meta| {
                out.push(FeedRecord { seq, meta });
                out.len() < limit
            },
            limit,
        )?;
        Ok(out)
    }

    /// Walks `store`'s feed after `since`, calling `f` until it returns `false`.
    pub(super) fn scan_feed(
        &self,
        store: &StoreId,
        since: u64,
        mut f: impl FnMut(u64, OrderMeta) -> bool,
        limit: usize,
    ) -> Result<(), RelayError> {
        let Some(first) = since.checked_add(1) else {
            return Ok(());
        };
        if limit == 0 {
            return Ok(());
        }
        let txn = self.read()?;
        let feed = txn.open_table(FEED)?;
        let orders = txn.open_table(ORDERS)?;
        let s = store.as_str();
        for entry in feed.range((s, first)..=(s, u64::MAX))? {
            let (k, v) = entry?;
            let (_, seq) = k.value();
            let id = v.value();
            let meta = orders
                .get(id)?
                .map(|g| decode_meta(g.value()))
                .transpose()?
                .ok_or_else(|| {
                    RelayError::Corrupt(format!(
                        "feed entry {s}/{seq} names unknown order {}",
                        codec::uuid_text(&id)
                    ))
                })?;
            if !f(seq, meta) {
                break;
            }
        }
        Ok(())
    }

    /// The latest feed sequence of `store`, 0 if it has none.
    pub fn feed_head(&self, store: &StoreId) -> Result<u64, RelayError> {
        let txn = self.read()?;
        let table = txn.open_table(STORES)?;
        let head = table.get(store.as_str())?.map(|g| g.value().1);
        Ok(head.unwrap_or(0))
    }
}
