//! Orders in PostgreSQL: [`PgStore::commit`] (a batch of [`OrderWrite`]s in one transaction,
//! each checked under row locks against the stored heads it builds on), the reads of one order
//! or of a store's orders, and the store feed ([`PgStore::feed_since`],
//! [`PgStore::feed_head`]).
//!
//! The tail of an order is its `changes` rows in `pos` order. A change is keyed by its
//! Automerge hash and inserted with `ON CONFLICT DO NOTHING`, so a change sent again (a retried
//! write, a full resend) is stored once: unlike the redb store, which appends duplicates,
//! [`OrderMeta::tail_len`] counts distinct changes.

use std::collections::{BTreeSet, HashMap, HashSet};

use crdt_model::automerge::Change;
use crdt_model::{OrderId, OrderNumber, OrderStatus, StoreId};
use deadpool_postgres::Transaction;
use tokio_postgres::Row;
use tokio_postgres::error::SqlState;
use uuid::Uuid;

use super::{
    CommitOutcome, FeedNotice, FeedRecord, OrderMeta, OrderWrite, PgStore, StoredOrder, StoredTail,
    decode_heads, encode_heads, limit_of, number_of, status_of, store_of, to_i64, to_u64,
};
use crate::error::RelayError;
use crate::store::StatusFilter;

/// The `orders` columns [`meta_from_row`] reads, in its order.
const META_COLUMNS: &str =
    "order_id, store, number, status, heads, created_at, updated_at, feed_seq, tail_len";

fn meta_from_row(row: &Row) -> Result<OrderMeta, RelayError> {
    let tail_len: i32 = row.try_get(8)?;
    Ok(OrderMeta {
        order: OrderId(row.try_get(0)?),
        store: store_of(row.try_get(1)?)?,
        number: number_of(row.try_get(2)?)?,
        status: status_of(row.try_get(3)?)?,
        heads: decode_heads(row.try_get(4)?)?,
        created_at: row.try_get(5)?,
        updated_at: row.try_get(6)?,
        feed_seq: to_u64(row.try_get(7)?, "feed position")?,
        tail_len: u32::try_from(tail_len)
            .map_err(|_| RelayError::Corrupt(format!("stored tail length {tail_len}")))?,
    })
}

/// The Automerge hash of one raw change; bytes that are not a change are refused.
fn change_hash(order: OrderId, i: usize, bytes: &[u8]) -> Result<[u8; 32], RelayError> {
    Change::from_bytes(bytes.to_vec())
        .map(|c| c.hash().0)
        .map_err(|e| RelayError::Invalid(format!("order {order}: change {i} does not load: {e}")))
}

/// `true` when `a` and `b` hold the same heads, in any order.
fn same_heads(a: &[[u8; 32]], b: &[[u8; 32]]) -> bool {
    a.iter().collect::<BTreeSet<_>>() == b.iter().collect::<BTreeSet<_>>()
}

/// One order as the batch leaves it.
struct Staged<'a> {
    /// Its metadata after the batch's last write of it.
    meta: OrderMeta,
    /// Stored before the batch (an update, not an insert).
    existed: bool,
    /// Listed as waiting for its number change.
    unnumbered: bool,
    /// The snapshot a compaction in the batch set.
    snapshot: Option<&'a [u8]>,
    /// A compaction in the batch removed the stored tail.
    cleared: bool,
    /// Hashes of the tail as it stands (stored ones only as far as the batch's changes go).
    hashes: HashSet<[u8; 32]>,
    /// Changes to insert: hash, position, bytes.
    appended: Vec<([u8; 32], i32, &'a [u8])>,
}

impl PgStore {
    /// Persists a batch of order writes in one transaction (`synchronous_commit` on): on return,
    /// all of them are durable, or (on error) none. Same meaning as
    /// [`RelayStore::commit`](crate::store::RelayStore::commit): numbers from 1, gap-free,
    /// assigned in this transaction unless the write carries one; a known order's store must
    /// match ([`RelayError::Invalid`]); each write's base must be the heads stored (or left by
    /// the batch's previous write of the order) when it applies, else the whole batch is
    /// refused with [`RelayError::Conflict`]. Bytes that are not an Automerge change are
    /// refused with [`RelayError::Invalid`].
    ///
    /// Under concurrency between relays: the batch's store rows, then its order rows, are
    /// locked (sorted, `FOR UPDATE`) before anything is checked, so the batch sees every
    /// commit of those orders that finished before it and blocks any that starts after.
    pub async fn commit(&self, writes: &[OrderWrite]) -> Result<Vec<CommitOutcome>, RelayError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        // Parse outside the transaction: no lock is held while hashing.
        let mut hashed = Vec::with_capacity(writes.len());
        for w in writes {
            let mut hs = Vec::new();
            if w.compacted.is_none() {
                for (i, c) in w.changes.iter().enumerate() {
                    hs.push(change_hash(w.order, i, c)?);
                }
            }
            hashed.push(hs);
        }
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        match apply(&txn, writes, &hashed, &self.channel).await {
            Ok(out) => {
                txn.commit().await?;
                Ok(out)
            }
            Err(e) => {
                if let Err(rollback) = txn.rollback().await {
                    tracing::warn!(error = %rollback, "rolling back a refused batch failed");
                }
                Err(e)
            }
        }
    }

    /// The order's metadata, snapshot and tail, if stored (read in one statement: one
    /// consistent state).
    pub async fn load_order(&self, order: OrderId) -> Result<Option<StoredOrder>, RelayError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(&format!(
                        "SELECT {META_COLUMNS}, snapshot, \
                     array(SELECT bytes FROM changes c WHERE c.order_id = o.order_id \
                           ORDER BY pos) \
                     FROM orders o WHERE order_id = $1"
                    ))
                    .await?,
                &[&order.0],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let meta = meta_from_row(&row)?;
        let snapshot: Vec<u8> = row.try_get(9)?;
        let tail: Vec<Vec<u8>> = row.try_get(10)?;
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

    /// The order's metadata and the tail changes stored at positions `from` and after, if
    /// stored (one statement: one consistent state). What a relay reads to catch up with
    /// another relay's commits.
    pub async fn load_tail(
        &self,
        order: OrderId,
        from: u32,
    ) -> Result<Option<StoredTail>, RelayError> {
        let client = self.client().await?;
        let from_pos = i32::try_from(from).unwrap_or(i32::MAX);
        let row = client
            .query_opt(
                &client
                    .prepare_cached(&format!(
                        "SELECT {META_COLUMNS}, \
                     array(SELECT bytes FROM changes c WHERE c.order_id = o.order_id \
                           AND c.pos >= $2 ORDER BY pos) \
                     FROM orders o WHERE order_id = $1"
                    ))
                    .await?,
                &[&order.0, &from_pos],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let meta = meta_from_row(&row)?;
        let changes: Vec<Vec<u8>> = row.try_get(9)?;
        Ok(Some(StoredTail {
            meta,
            from,
            changes,
        }))
    }

    /// The order's metadata, if stored.
    pub async fn order_meta(&self, order: OrderId) -> Result<Option<OrderMeta>, RelayError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(&format!(
                        "SELECT {META_COLUMNS} FROM orders WHERE order_id = $1"
                    ))
                    .await?,
                &[&order.0],
            )
            .await?;
        row.as_ref().map(meta_from_row).transpose()
    }

    /// Orders stored with a number their document does not carry yet, at most `limit` (the
    /// relay writes those numbers at start).
    pub async fn unnumbered(&self, limit: usize) -> Result<Vec<OrderId>, RelayError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT order_id FROM orders WHERE unnumbered ORDER BY order_id LIMIT $1",
                    )
                    .await?,
                &[&limit_of(limit)],
            )
            .await?;
        rows.iter().map(|r| Ok(OrderId(r.try_get(0)?))).collect()
    }

    /// The order with `number` in `store`, if any.
    pub async fn order_by_number(
        &self,
        store: &StoreId,
        number: OrderNumber,
    ) -> Result<Option<OrderId>, RelayError> {
        let Ok(n) = i64::try_from(number.0) else {
            return Ok(None);
        };
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT order_id FROM order_numbers WHERE store = $1 AND number = $2",
                    )
                    .await?,
                &[&store.as_str(), &n],
            )
            .await?;
        row.map(|r| Ok(OrderId(r.try_get(0)?))).transpose()
    }

    /// Orders of `store` passing `filter` with `feed_seq > since_feed_seq`, ascending by
    /// `feed_seq`, at most `limit`. The next page starts after the last `feed_seq` returned.
    pub async fn list_orders(
        &self,
        store: &StoreId,
        filter: StatusFilter,
        since_feed_seq: u64,
        limit: usize,
    ) -> Result<Vec<OrderMeta>, RelayError> {
        let statuses: Vec<&str> = OrderStatus::ALL
            .into_iter()
            .filter(|s| filter.matches(*s))
            .map(OrderStatus::as_str)
            .collect();
        self.scan(store, since_feed_seq, limit, Some(&statuses))
            .await
    }

    /// How many orders are stored (all stores).
    pub async fn order_count(&self) -> Result<u64, RelayError> {
        let client = self.client().await?;
        let n: i64 = client
            .query_one(
                &client.prepare_cached("SELECT count(*) FROM orders").await?,
                &[],
            )
            .await?
            .try_get(0)?;
        to_u64(n, "order count")
    }

    /// Feed entries of `store` with `seq > since`, ascending, at most `limit`.
    pub async fn feed_since(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
    ) -> Result<Vec<FeedRecord>, RelayError> {
        let metas = self.scan(store, since, limit, None).await?;
        Ok(metas
            .into_iter()
            .map(|meta| FeedRecord {
                seq: meta.feed_seq,
                meta,
            })
            .collect())
    }

    /// The latest feed sequence of `store`, 0 if it has none.
    pub async fn feed_head(&self, store: &StoreId) -> Result<u64, RelayError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached("SELECT feed_head FROM stores WHERE store = $1")
                    .await?,
                &[&store.as_str()],
            )
            .await?;
        match row {
            Some(r) => to_u64(r.try_get(0)?, "feed head"),
            None => Ok(0),
        }
    }

    /// Orders of `store` after feed position `since`, in feed order, at most `limit`, with a
    /// status among `statuses` when given.
    async fn scan(
        &self,
        store: &StoreId,
        since: u64,
        limit: usize,
        statuses: Option<&[&str]>,
    ) -> Result<Vec<OrderMeta>, RelayError> {
        let Ok(since) = i64::try_from(since) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        let rows = match statuses {
            None => {
                client
                    .query(
                        &client
                            .prepare_cached(&format!(
                                "SELECT {META_COLUMNS} FROM orders \
                             WHERE store = $1 AND feed_seq > $2 ORDER BY feed_seq LIMIT $3"
                            ))
                            .await?,
                        &[&store.as_str(), &since, &limit_of(limit)],
                    )
                    .await?
            }
            Some(statuses) => {
                client
                    .query(
                        &client
                            .prepare_cached(&format!(
                                "SELECT {META_COLUMNS} FROM orders \
                             WHERE store = $1 AND feed_seq > $2 AND status = ANY($4) \
                             ORDER BY feed_seq LIMIT $3"
                            ))
                            .await?,
                        &[&store.as_str(), &since, &limit_of(limit), &statuses],
                    )
                    .await?
            }
        };
        rows.iter().map(meta_from_row).collect()
    }
}

/// The batch inside its transaction: lock, check and stage in memory, then write.
async fn apply(
    txn: &Transaction<'_>,
    writes: &[OrderWrite],
    hashed: &[Vec<[u8; 32]>],
    channel: &str,
) -> Result<Vec<CommitOutcome>, RelayError> {
    let mut stores = lock_stores(txn, writes).await?;
    // Each store's feed position before this commit, for the announcement.
    let since: HashMap<String, u64> = stores
        .iter()
        .map(|(name, (_, head))| (name.clone(), *head))
        .collect();

    let ids: BTreeSet<Uuid> = writes.iter().map(|w| w.order.0).collect();
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let rows = txn
        .query(
            &txn.prepare_cached(&format!(
                "SELECT {META_COLUMNS}, unnumbered FROM orders \
                 WHERE order_id = ANY($1) ORDER BY order_id FOR UPDATE"
            ))
            .await?,
            &[&ids],
        )
        .await?;
    let mut staged: HashMap<OrderId, Staged<'_>> = HashMap::with_capacity(writes.len());
    for row in &rows {
        let meta = meta_from_row(row)?;
        let unnumbered: bool = row.try_get(9)?;
        staged.insert(
            meta.order,
            Staged {
                meta,
                existed: true,
                unnumbered,
                snapshot: None,
                cleared: false,
                hashes: HashSet::new(),
                appended: Vec::new(),
            },
        );
    }

    // Which of the batch's changes the stored tails already hold.
    let mut probe_ids = Vec::new();
    let mut probe_hashes: Vec<&[u8]> = Vec::new();
    for (w, hs) in writes.iter().zip(hashed) {
        if staged.contains_key(&w.order) {
            for h in hs {
                probe_ids.push(w.order.0);
                probe_hashes.push(h.as_slice());
            }
        }
    }
    if !probe_ids.is_empty() {
        let rows = txn
            .query(
                &txn.prepare_cached(
                    "SELECT c.order_id, c.hash FROM changes c \
                 JOIN unnest($1::uuid[], $2::bytea[]) AS p(order_id, hash) \
                 ON c.order_id = p.order_id AND c.hash = p.hash",
                )
                .await?,
                &[&probe_ids, &probe_hashes],
            )
            .await?;
        for row in &rows {
            let id = OrderId(row.try_get(0)?);
            let hash: &[u8] = row.try_get(1)?;
            let hash = <[u8; 32]>::try_from(hash)
                .map_err(|_| RelayError::Corrupt(format!("order {id}: a change hash")))?;
            if let Some(s) = staged.get_mut(&id) {
                s.hashes.insert(hash);
            }
        }
    }

    let mut numbers: Vec<(String, u64, OrderId)> = Vec::new();
    let mut out = Vec::with_capacity(writes.len());
    for (w, hs) in writes.iter().zip(hashed) {
        let store = w.store.as_str();
        let prev = staged.get(&w.order).map(|s| &s.meta);
        if let Some(prev) = prev
            && prev.store != w.store
        {
            return Err(RelayError::Invalid(format!(
                "order {} belongs to store {}, not {}",
                w.order, prev.store, w.store
            )));
        }
        let stored_heads = prev.map_or(&[][..], |p| p.heads.as_slice());
        if !same_heads(stored_heads, &w.base) {
            return Err(RelayError::Conflict(match prev {
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
        let counters = stores
            .get_mut(store)
            .ok_or_else(|| RelayError::Internal(format!("store {store} was not locked")))?;
        let feed_seq = counters
            .1
            .checked_add(1)
            .ok_or_else(|| RelayError::Internal(format!("feed of store {store} is full")))?;
        counters.1 = feed_seq;
        let (number, newly_numbered) = match prev {
            Some(p) => (p.number, false),
            // Back through a till after a restore, with the number the relay gave it.
            None => match w.number {
                Some(n) => {
                    let holder = number_holder(txn, &numbers, &w.store, n).await?;
                    match holder {
                        Some(other) if other != w.order => tracing::error!(
                            order = %w.order, number = n.0, store,
                            "the number this order came back with is held by another order \
                             (recovery was released before every till was heard from)"
                        ),
                        Some(_) => {}
                        None => numbers.push((store.to_owned(), n.0, w.order)),
                    }
                    counters.0 = counters.0.max(n.0);
                    (n, false)
                }
                None => {
                    counters.0 = counters.0.checked_add(1).ok_or_else(|| {
                        RelayError::Internal(format!("order numbers of store {store} exhausted"))
                    })?;
                    numbers.push((store.to_owned(), counters.0, w.order));
                    (OrderNumber(counters.0), true)
                }
            },
        };
        let s = staged.entry(w.order).or_insert_with(|| Staged {
            meta: OrderMeta {
                order: w.order,
                store: w.store.clone(),
                number,
                status: w.status,
                heads: Vec::new(),
                created_at: w.at,
                updated_at: w.at,
                feed_seq,
                tail_len: 0,
            },
            existed: false,
            unnumbered: false,
            snapshot: None,
            cleared: false,
            hashes: HashSet::new(),
            appended: Vec::new(),
        });
        if w.number.is_some() {
            s.unnumbered = false;
        } else if newly_numbered {
            s.unnumbered = true;
        }
        if let Some(snapshot) = &w.compacted {
            s.snapshot = Some(snapshot.as_slice());
            s.cleared = true;
            s.hashes.clear();
            s.appended.clear();
            s.meta.tail_len = 0;
        } else {
            for (h, bytes) in hs.iter().zip(&w.changes) {
                if s.hashes.insert(*h) {
                    let pos = i32::try_from(s.meta.tail_len).map_err(|_| {
                        RelayError::Invalid(format!("order {}: tail is full, compact it", w.order))
                    })?;
                    s.appended.push((*h, pos, bytes.as_slice()));
                    s.meta.tail_len += 1;
                }
            }
        }
        s.meta.status = w.status;
        s.meta.heads.clone_from(&w.heads);
        s.meta.updated_at = w.at;
        s.meta.feed_seq = feed_seq;
        out.push(CommitOutcome {
            order: w.order,
            number,
            newly_numbered,
            feed_seq,
            meta: s.meta.clone(),
        });
    }

    write_staged(txn, &staged).await?;
    write_numbers(txn, &numbers).await?;
    write_changes(txn, &staged).await?;
    let (names, lasts, heads) = {
        let mut names = Vec::new();
        let mut lasts = Vec::new();
        let mut heads = Vec::new();
        for (name, (last, head)) in &stores {
            names.push(name.as_str());
            lasts.push(to_i64(*last, "order number")?);
            heads.push(to_i64(*head, "feed position")?);
        }
        (names, lasts, heads)
    };
    txn.execute(
        &txn.prepare_cached(
            "UPDATE stores SET last_number = u.last_number, feed_head = u.feed_head \
         FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(store, last_number, feed_head) \
         WHERE stores.store = u.store",
        )
        .await?,
        &[&names, &lasts, &heads],
    )
    .await?;
    // Announced to every relay listening when (and only if) the transaction commits, with
    // the entries added (an order written twice in the batch keeps its last position only).
    let mut notices: Vec<String> = Vec::with_capacity(stores.len());
    for (name, (_, head)) in &stores {
        let mut latest: HashMap<OrderId, &OrderMeta> = HashMap::new();
        for o in out.iter().filter(|o| o.meta.store.as_str() == name) {
            latest.insert(o.order, &o.meta);
        }
        let mut metas: Vec<OrderMeta> = latest.into_values().cloned().collect();
        metas.sort_by_key(|m| m.feed_seq);
        let notice = FeedNotice {
            store: StoreId::new(name.as_str())?,
            seq: *head,
            added: Some((since.get(name).copied().unwrap_or(0), metas)),
        };
        notices.push(notice.payload());
    }
    txn.execute(
        &txn.prepare_cached("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .await?,
        &[&channel, &notices],
    )
    .await?;
    Ok(out)
}

/// Locks the batch's store rows (sorted, creating missing ones) and returns their counters:
/// store -> (last number, feed head).
async fn lock_stores(
    txn: &Transaction<'_>,
    writes: &[OrderWrite],
) -> Result<HashMap<String, (u64, u64)>, RelayError> {
    let names: BTreeSet<&str> = writes.iter().map(|w| w.store.as_str()).collect();
    let names: Vec<&str> = names.into_iter().collect();
    let lock = "SELECT store, last_number, feed_head FROM stores \
                WHERE store = ANY($1) ORDER BY store FOR UPDATE";
    let mut rows = txn
        .query(&txn.prepare_cached(lock).await?, &[&names])
        .await?;
    if rows.len() < names.len() {
        // A store's first order. Existing rows are already locked; rows other relays insert
        // meanwhile make ours wait for their commit and then do nothing.
        let have: HashSet<String> = rows
            .iter()
            .map(|r| r.try_get::<_, String>(0))
            .collect::<Result<_, _>>()?;
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !have.contains(*n))
            .collect();
        txn.execute(
            &txn.prepare_cached(
                "INSERT INTO stores (store) SELECT s FROM unnest($1::text[]) AS s ORDER BY s \
             ON CONFLICT DO NOTHING",
            )
            .await?,
            &[&missing],
        )
        .await?;
        rows.extend(
            txn.query(&txn.prepare_cached(lock).await?, &[&missing])
                .await?,
        );
    }
    let mut out = HashMap::with_capacity(rows.len());
    for r in &rows {
        let name: String = r.try_get(0)?;
        let last = to_u64(r.try_get(1)?, "order number")?;
        let head = to_u64(r.try_get(2)?, "feed head")?;
        out.insert(name, (last, head));
    }
    Ok(out)
}

/// The order holding `number` in `store`: numbered earlier in this batch, or stored.
async fn number_holder(
    txn: &Transaction<'_>,
    batch: &[(String, u64, OrderId)],
    store: &StoreId,
    number: OrderNumber,
) -> Result<Option<OrderId>, RelayError> {
    if let Some((_, _, id)) = batch
        .iter()
        .find(|(s, n, _)| s == store.as_str() && *n == number.0)
    {
        return Ok(Some(*id));
    }
    let row = txn
        .query_opt(
            &txn.prepare_cached(
                "SELECT order_id FROM order_numbers WHERE store = $1 AND number = $2",
            )
            .await?,
            &[&store.as_str(), &to_i64(number.0, "order number")?],
        )
        .await?;
    row.map(|r| Ok(OrderId(r.try_get(0)?))).transpose()
}

/// The `orders` columns of several orders, as arrays for one `unnest` statement.
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<Uuid>,
    stores: Vec<&'a str>,
    numbers: Vec<i64>,
    statuses: Vec<&'static str>,
    heads: Vec<Vec<u8>>,
    created: Vec<i64>,
    updated: Vec<i64>,
    seqs: Vec<i64>,
    tails: Vec<i32>,
    unnumbered: Vec<bool>,
}

impl<'a> Columns<'a> {
    fn push(&mut self, s: &'a Staged<'_>) -> Result<(), RelayError> {
        let m = &s.meta;
        self.ids.push(m.order.0);
        self.stores.push(m.store.as_str());
        self.numbers.push(to_i64(m.number.0, "order number")?);
        self.statuses.push(m.status.as_str());
        self.heads.push(encode_heads(&m.heads));
        self.created.push(m.created_at);
        self.updated.push(m.updated_at);
        self.seqs.push(to_i64(m.feed_seq, "feed position")?);
        self.tails.push(
            i32::try_from(m.tail_len)
                .map_err(|_| RelayError::Invalid(format!("order {}: tail is full", m.order)))?,
        );
        self.unnumbered.push(s.unnumbered);
        Ok(())
    }
}

/// Inserts the new orders and updates the known ones (metadata; snapshot where compacted);
/// removes the stored tail of compacted ones.
async fn write_staged(
    txn: &Transaction<'_>,
    staged: &HashMap<OrderId, Staged<'_>>,
) -> Result<(), RelayError> {
    let mut new = Columns::default();
    let mut known = Columns::default();
    let mut cleared = Vec::new();
    let mut snap_ids = Vec::new();
    let mut snapshots: Vec<&[u8]> = Vec::new();
    for s in staged.values() {
        if s.existed {
            known.push(s)?;
            if s.cleared {
                cleared.push(s.meta.order.0);
            }
        } else {
            new.push(s)?;
        }
        if let Some(snapshot) = s.snapshot {
            snap_ids.push(s.meta.order.0);
            snapshots.push(snapshot);
        }
    }
    if !cleared.is_empty() {
        txn.execute(
            &txn.prepare_cached("DELETE FROM changes WHERE order_id = ANY($1)")
                .await?,
            &[&cleared],
        )
        .await?;
    }
    if !new.ids.is_empty() {
        // No ON CONFLICT: an order first persisted at once by two relays that disagree on its
        // store (so the store locks did not serialise them) hits the primary key.
        let result = txn
            .execute(
                &txn.prepare_cached(
                    "INSERT INTO orders (order_id, store, number, status, heads, created_at, \
                                     updated_at, feed_seq, tail_len, unnumbered) \
                 SELECT * FROM unnest($1::uuid[], $2::text[], $3::bigint[], $4::text[], \
                                      $5::bytea[], $6::bigint[], $7::bigint[], $8::bigint[], \
                                      $9::int[], $10::bool[])",
                )
                .await?,
                &[
                    &new.ids,
                    &new.stores,
                    &new.numbers,
                    &new.statuses,
                    &new.heads,
                    &new.created,
                    &new.updated,
                    &new.seqs,
                    &new.tails,
                    &new.unnumbered,
                ],
            )
            .await;
        if let Err(e) = result {
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                && e.as_db_error().and_then(|d| d.constraint()) == Some("orders_pkey")
            {
                return Err(RelayError::Conflict(format!(
                    "an order of the batch was first stored meanwhile by another relay: {e}"
                )));
            }
            return Err(e.into());
        }
    }
    if !known.ids.is_empty() {
        txn.execute(
            &txn.prepare_cached(
                "UPDATE orders SET status = u.status, heads = u.heads, updated_at = u.updated_at, \
                 feed_seq = u.feed_seq, tail_len = u.tail_len, unnumbered = u.unnumbered \
             FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[], \
                         $6::int[], $7::bool[]) \
                 AS u(order_id, status, heads, updated_at, feed_seq, tail_len, unnumbered) \
             WHERE orders.order_id = u.order_id",
            )
            .await?,
            &[
                &known.ids,
                &known.statuses,
                &known.heads,
                &known.updated,
                &known.seqs,
                &known.tails,
                &known.unnumbered,
            ],
        )
        .await?;
    }
    if !snap_ids.is_empty() {
        txn.execute(
            &txn.prepare_cached(
                "UPDATE orders SET snapshot = u.snapshot \
             FROM unnest($1::uuid[], $2::bytea[]) AS u(order_id, snapshot) \
             WHERE orders.order_id = u.order_id",
            )
            .await?,
            &[&snap_ids, &snapshots],
        )
        .await?;
    }
    Ok(())
}

/// Records the numbers the batch assigned (or kept, for orders back after a restore).
async fn write_numbers(
    txn: &Transaction<'_>,
    numbers: &[(String, u64, OrderId)],
) -> Result<(), RelayError> {
    if numbers.is_empty() {
        return Ok(());
    }
    let mut stores = Vec::with_capacity(numbers.len());
    let mut values = Vec::with_capacity(numbers.len());
    let mut ids = Vec::with_capacity(numbers.len());
    for (s, n, id) in numbers {
        stores.push(s.as_str());
        values.push(to_i64(*n, "order number")?);
        ids.push(id.0);
    }
    txn.execute(
        &txn.prepare_cached(
            "INSERT INTO order_numbers (store, number, order_id) \
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[])",
        )
        .await?,
        &[&stores, &values, &ids],
    )
    .await?;
    Ok(())
}

/// Appends the batch's new tail changes; one already stored is left as it is.
async fn write_changes(
    txn: &Transaction<'_>,
    staged: &HashMap<OrderId, Staged<'_>>,
) -> Result<(), RelayError> {
    let mut ids = Vec::new();
    let mut hashes: Vec<&[u8]> = Vec::new();
    let mut positions = Vec::new();
    let mut bytes: Vec<&[u8]> = Vec::new();
    for s in staged.values() {
        for (h, pos, b) in &s.appended {
            ids.push(s.meta.order.0);
            hashes.push(h.as_slice());
            positions.push(*pos);
            bytes.push(b);
        }
    }
    if ids.is_empty() {
        return Ok(());
    }
    txn.execute(
        &txn.prepare_cached(
            "INSERT INTO changes (order_id, hash, pos, bytes) \
         SELECT * FROM unnest($1::uuid[], $2::bytea[], $3::int[], $4::bytea[]) \
         ON CONFLICT (order_id, hash) DO NOTHING",
        )
        .await?,
        &[&ids, &hashes, &positions, &bytes],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::same_heads;

    #[test]
    fn heads_compare_as_sets() {
        assert!(same_heads(&[], &[]));
        assert!(same_heads(&[[1; 32], [2; 32]], &[[2; 32], [1; 32]]));
        assert!(!same_heads(&[[1; 32]], &[]));
        assert!(!same_heads(&[[1; 32], [2; 32]], &[[1; 32], [3; 32]]));
    }
}
