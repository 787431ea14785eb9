//! The hub: documents in memory, their per-connection sync states, group commit and fan-out.
//!
//! Orders are sharded over a few worker tasks by order id; a worker owns its documents outright,
//! so no document is ever locked. Per document it keeps
//!
//! * `committed`: exactly what redb holds. Outgoing sync messages are generated from it only, so
//!   nothing reaches another party before it is durable;
//! * `working`: `committed` plus changes accepted by the policy and queued for commit. Incoming
//!   messages are applied to `working` and judged; on refusal `working` is restored from the
//!   last accepted state (each queued write keeps that state, which becomes `committed` once
//!   the write is durable).
//!
//! Accepted changes go to the committer thread, which folds every queued write into one redb
//! transaction (group commit). When it reports back, the worker moves the changes into
//! `committed`, sends the durable receipt to the connections whose changes they were, sync
//! messages to every connection following the order, and a feed entry to every connection of
//! the store.
//!
//! One connection cannot hurt the others: a panic while handling its frame (or generating its
//! fan-out) is contained (`crdt_model::guard::contain`), undone, counted and answered with a fatal
//! `unprocessable`; changes it withholds from their dependency are bounded
//! ([`crate::screen::Limits`]); another store's order is answered as if it did not exist.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash, ReadDoc};
use axum::body::Bytes;
use crdt_model::wire::{FeedEntry, RelayFrame, codes, heads_to_wire};
use crdt_model::{
    Author, DeviceId, Entropy, Order, OrderId, OrderNumber, OrderStatus, OrderView, Role, StoreId,
    Timestamp, Writer, validate, validate_changes,
};
use serde_bytes::ByteBuf;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::error::RelayError;
use crate::metrics::Metrics;
use crate::screen::Limits;
use crate::store::{CommitOutcome, OrderMeta, OrderWrite, RelayStore};
use crdt_model::guard::contain;

/// Identifies one WebSocket connection.
pub type ConnId = u64;

/// How many tail changes an order may accumulate before it is compacted into a snapshot.
const COMPACT_EVERY: u32 = 64;
/// Frames queued for one connection before it is considered too slow and closed.
pub const OUTBOX_CAPACITY: usize = 4096;
/// How long feed entries are collected before they go out: every device of a store gets one
/// `feed` frame per window instead of one per commit, and an order edited many times in the
/// window appears once, with its latest state.
const FEED_COALESCE: Duration = Duration::from_millis(5);

/// Tunables of the hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Worker tasks (document shards).
    pub workers: usize,
    /// Orders kept in memory across all workers; idle ones beyond this are dropped.
    pub cache_orders: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            cache_orders: 10_000,
        }
    }
}

/// The relay's wall clock in milliseconds (the model takes time as an argument).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// OS randomness for the relay's own entries.
#[derive(Debug, Default)]
pub struct OsEntropy;

impl Entropy for OsEntropy {
    fn next_u64(&mut self) -> u64 {
        // getrandom fails only on platforms without an entropy source; fall back to the clock
        // mixed with a counter so ids stay unique even then.
        static FALLBACK: AtomicU64 = AtomicU64::new(0);
        getrandom::u64().unwrap_or_else(|_| {
            (now_ms() as u64).rotate_left(17) ^ FALLBACK.fetch_add(0x9E37_79B9, Ordering::Relaxed)
        })
    }
}

/// A connected, authenticated device, as the hub sees it.
#[derive(Debug)]
pub struct Peer {
    /// The connection.
    pub conn: ConnId,
    /// The device the token belongs to.
    pub device: DeviceId,
    /// Its store.
    pub store: StoreId,
    outbox: mpsc::Sender<Bytes>,
    closed: AtomicBool,
    /// Bytes of this connection's change chunks waiting for a missing dependency, over all
    /// its orders.
    queued_bytes: AtomicUsize,
    /// Woken when the hub gives up on the connection (outbox overflow).
    pub kill: Notify,
}

impl Peer {
    /// Queues a frame for the connection. A connection that cannot keep up is closed rather
    /// than letting its queue grow without bound.
    pub fn send(&self, frame: RelayFrame) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        self.send_encoded(Bytes::from(frame.encode()));
    }

    /// Queues an already encoded frame (a broadcast encodes once for every connection).
    pub fn send_encoded(&self, frame: Bytes) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        if self.outbox.try_send(frame).is_err() {
            self.closed.store(true, Ordering::Relaxed);
            self.kill.notify_one();
        }
    }

    /// Sends a fatal error frame, then closes the connection (the frame goes out first).
    pub fn fail(&self, code: &str, message: impl Into<String>) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let frame = RelayFrame::error(code, message, true);
        let _ = self.outbox.try_send(Bytes::from(frame.encode()));
        self.kill.notify_one();
    }

    /// Whether the hub gave up on this connection.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

/// Connections by store, for the feed, and the feed entries waiting to go out.
#[derive(Debug, Default)]
struct Registry {
    by_store: RwLock<HashMap<StoreId, HashMap<ConnId, Arc<Peer>>>>,
    /// Committed feed entries not broadcast yet, by store, the latest per order.
    pending: std::sync::Mutex<HashMap<StoreId, HashMap<String, FeedEntry>>>,
    /// Woken when `pending` goes from empty to not empty.
    wake: Notify,
}

impl Registry {
    fn add(&self, peer: &Arc<Peer>) {
        if let Ok(mut m) = self.by_store.write() {
            m.entry(peer.store.clone())
                .or_default()
                .insert(peer.conn, Arc::clone(peer));
        }
    }

    fn remove(&self, peer: &Peer) {
        if let Ok(mut m) = self.by_store.write()
            && let Some(conns) = m.get_mut(&peer.store)
        {
            conns.remove(&peer.conn);
            if conns.is_empty() {
                m.remove(&peer.store);
            }
        }
    }

    fn broadcast(&self, store: &StoreId, frame: &RelayFrame) {
        if let Ok(m) = self.by_store.read()
            && let Some(conns) = m.get(store)
            && !conns.is_empty()
        {
            let bytes = Bytes::from(frame.encode());
            for p in conns.values() {
                p.send_encoded(bytes.clone());
            }
        }
    }

    /// Queues a committed order's feed entry for the next coalesced broadcast.
    fn publish(&self, store: StoreId, entry: FeedEntry) {
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
    fn flush_feed(&self) {
        let pending = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => return,
        };
        for (store, entries) in pending {
            let mut entries: Vec<FeedEntry> = entries.into_values().collect();
            entries.sort_unstable_by_key(|e| e.seq);
            self.broadcast(&store, &RelayFrame::Feed { entries });
        }
    }

    /// The feed task: waits for entries, lets more gather for [`FEED_COALESCE`], sends them.
    async fn run_feed(self: Arc<Self>) {
        loop {
            self.wake.notified().await;
            tokio::time::sleep(FEED_COALESCE).await;
            self.flush_feed();
        }
    }
}

/// Feed entry for stored order metadata.
pub fn feed_entry(meta: &OrderMeta) -> FeedEntry {
    FeedEntry {
        seq: meta.feed_seq,
        order: meta.order.to_string(),
        number: Some(meta.number.0),
        status: meta.status.as_str().to_owned(),
        heads: meta
            .heads
            .iter()
            .map(|h| ByteBuf::from(h.to_vec()))
            .collect(),
    }
}

type ViewReply = oneshot::Sender<Result<OrderView, RelayError>>;

enum WorkerMsg {
    Sync {
        peer: Arc<Peer>,
        order: OrderId,
        msg: sync::Message,
    },
    BackOffice {
        order: OrderId,
        store: Option<StoreId>,
        status: OrderStatus,
        reply: ViewReply,
    },
    Disconnect {
        conn: ConnId,
    },
    Flush {
        reply: oneshot::Sender<()>,
    },
    Stop,
}

struct Committed {
    order: OrderId,
    result: Result<CommitOutcome, String>,
    seconds: f64,
}

struct CommitJob {
    write: OrderWrite,
    done: mpsc::UnboundedSender<Committed>,
}

/// The committer: one thread that turns every queued write into one redb transaction.
type CommitterHandle = Option<std::thread::JoinHandle<()>>;

fn spawn_committer(
    store: Arc<RelayStore>,
    metrics: Arc<Metrics>,
) -> (std::sync::mpsc::Sender<CommitJob>, CommitterHandle) {
    let (tx, rx) = std::sync::mpsc::channel::<CommitJob>();
    let spawned = std::thread::Builder::new()
        .name("relay-committer".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut jobs = vec![first];
                while jobs.len() < 4096 {
                    match rx.try_recv() {
                        Ok(j) => jobs.push(j),
                        Err(_) => break,
                    }
                }
                let writes: Vec<OrderWrite> = jobs.iter().map(|j| j.write.clone()).collect();
                let started = Instant::now();
                let result = store.commit(&writes);
                let seconds = started.elapsed().as_secs_f64();
                match result {
                    Ok(outcomes) => {
                        metrics.commits.fetch_add(1, Ordering::Relaxed);
                        metrics.observe_commit(seconds);
                        for (job, outcome) in jobs.into_iter().zip(outcomes) {
                            let _ = job.done.send(Committed {
                                order: job.write.order,
                                result: Ok(outcome),
                                seconds,
                            });
                        }
                    }
                    Err(e) => {
                        metrics.commit_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(error = %e, writes = jobs.len(), "group commit failed");
                        for job in jobs {
                            let _ = job.done.send(Committed {
                                order: job.write.order,
                                result: Err(e.to_string()),
                                seconds,
                            });
                        }
                    }
                }
            }
        });
    let handle = match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the committer thread");
            None
        }
    };
    (tx, handle)
}

/// A write queued for commit, and who waits for it.
struct Inflight {
    /// `working` as it was right after these changes were accepted: what `committed` becomes
    /// once they are durable (a clone costs a few µs, applying the changes again tens).
    snapshot: Automerge,
    changes: Vec<Change>,
    origins: Vec<Arc<Peer>>,
    reply: Option<ViewReply>,
}

struct PeerDoc {
    peer: Arc<Peer>,
    state: sync::State,
    last_receipt: Vec<ChangeHash>,
    /// Change chunks this peer sent that cannot be applied yet (a dependency is missing, e.g.
    /// skipped because of a Bloom filter false positive). They are re-applied with the peer's
    /// next message, and replies to it are generated as if they were queued, so the sync
    /// protocol asks for the missing dependency instead of for the queued change again.
    queued: Vec<Vec<u8>>,
    /// Bytes in `queued` (also counted in the peer's `queued_bytes`).
    queued_bytes: usize,
}

impl Drop for PeerDoc {
    fn drop(&mut self) {
        self.clear_queue();
    }
}

/// The last state the policy accepted: the newest queued write's, or the committed one.
fn last_accepted<'a>(inflight: &'a VecDeque<Inflight>, committed: &'a Automerge) -> &'a Automerge {
    inflight.back().map_or(committed, |i| &i.snapshot)
}

/// Whether `doc` holds change `hash`. Only for documents with no pending (unapplied)
/// changes; unlike `get_change_by_hash`, which rebuilds the change from the op set in
/// automerge 0.12, this is a lookup.
fn holds(doc: &Automerge, hash: &ChangeHash) -> bool {
    !doc.get_missing_deps(std::slice::from_ref(hash))
        .contains(hash)
}

/// The changes among `chunks` that `before` lacks and `after` holds, dependencies first;
/// `None` if a chunk is not a single change or a document has pending (unapplied) changes
/// (the caller then asks the document).
fn new_changes_in(
    chunks: &[Vec<u8>],
    before: &Automerge,
    after: &Automerge,
) -> Option<Vec<Change>> {
    if !before.get_missing_deps(&[]).is_empty() || !after.get_missing_deps(&[]).is_empty() {
        return None;
    }
    let mut fresh: Vec<Change> = Vec::with_capacity(chunks.len());
    for chunk in chunks {
        let change = Change::from_bytes(chunk.clone()).ok()?;
        let hash = change.hash();
        if !holds(before, &hash) && holds(after, &hash) && !fresh.iter().any(|c| c.hash() == hash) {
            fresh.push(change);
        }
    }
    // Dependencies first (a message lists them in that order already; this makes sure).
    let mut ordered = Vec::with_capacity(fresh.len());
    while !fresh.is_empty() {
        let ready = fresh.iter().position(|c| {
            c.deps()
                .iter()
                .all(|d| !fresh.iter().any(|o| o.hash() == *d))
        })?;
        ordered.push(fresh.swap_remove(ready));
    }
    Some(ordered)
}

impl PeerDoc {
    /// Forgets the queued chunks.
    fn clear_queue(&mut self) {
        self.queued.clear();
        self.peer
            .queued_bytes
            .fetch_sub(self.queued_bytes, Ordering::Relaxed);
        self.queued_bytes = 0;
    }

    /// Queues `chunks`; `false` if this (order, connection) or the connection as a whole now
    /// holds more than `limits` allow.
    fn queue(&mut self, chunks: &[Vec<u8>], limits: &Limits) -> bool {
        let bytes: usize = chunks.iter().map(Vec::len).sum();
        self.queued.extend(chunks.iter().cloned());
        self.queued_bytes += bytes;
        let conn_total = self.peer.queued_bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.queued.len() <= limits.max_queued_changes
            && self.queued_bytes <= limits.max_queued_bytes
            && conn_total <= limits.max_queued_bytes_per_conn
    }

    /// `doc`, plus this peer's queued chunks when it has any.
    fn view_of(&self, doc: &Automerge) -> Option<Automerge> {
        if self.queued.is_empty() {
            return None;
        }
        let mut d = doc.fork();
        for q in &self.queued {
            let _ = d.load_incremental(q);
        }
        Some(d)
    }

    /// Generates the next message for this peer from `doc` (with its queued chunks).
    fn generate(&mut self, doc: &Automerge) -> Option<sync::Message> {
        match self.view_of(doc) {
            Some(with_queue) => with_queue.generate_sync_message(&mut self.state),
            None => doc.generate_sync_message(&mut self.state),
        }
    }
}

struct DocState {
    committed: Automerge,
    working: Automerge,
    meta: Option<OrderMeta>,
    store: Option<StoreId>,
    peers: HashMap<ConnId, PeerDoc>,
    inflight: VecDeque<Inflight>,
    tail_len: u32,
    poisoned: bool,
    last_used: u64,
}

impl DocState {
    fn empty() -> Self {
        Self {
            committed: Automerge::new(),
            working: Automerge::new(),
            meta: None,
            store: None,
            peers: HashMap::new(),
            inflight: VecDeque::new(),
            tail_len: 0,
            poisoned: false,
            last_used: 0,
        }
    }

    fn exists(&self) -> bool {
        !self.working.get_heads().is_empty()
    }
}

struct Worker {
    docs: HashMap<OrderId, DocState>,
    conn_docs: HashMap<ConnId, HashSet<OrderId>>,
    store: Arc<RelayStore>,
    metrics: Arc<Metrics>,
    registry: Arc<Registry>,
    writer: Writer,
    relay_author: Author,
    commits: std::sync::mpsc::Sender<CommitJob>,
    done_tx: mpsc::UnboundedSender<Committed>,
    capacity: usize,
    limits: Limits,
    tick: u64,
    flush_waiters: Vec<oneshot::Sender<()>>,
    stopping: bool,
}

impl Worker {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<WorkerMsg>,
        mut done_rx: mpsc::UnboundedReceiver<Committed>,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(c) = done_rx.recv() => self.on_committed_contained(c),
                msg = rx.recv() => match msg {
                    Some(m) => self.on_msg(m).await,
                    None => break,
                },
            }
            self.release_flush_waiters();
            if self.stopping {
                break;
            }
        }
        // Drain commits still in flight so their receipts go out before the worker stops.
        while self.docs.values().any(|d| !d.inflight.is_empty()) {
            match done_rx.recv().await {
                Some(c) => self.on_committed_contained(c),
                None => break,
            }
        }
        self.release_flush_waiters();
    }

    fn release_flush_waiters(&mut self) {
        if !self.flush_waiters.is_empty() && self.docs.values().all(|d| d.inflight.is_empty()) {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    async fn on_msg(&mut self, msg: WorkerMsg) {
        match msg {
            WorkerMsg::Sync { peer, order, msg } => self.on_sync(peer, order, msg).await,
            WorkerMsg::BackOffice {
                order,
                store,
                status,
                reply,
            } => {
                self.on_back_office(order, store, status, reply).await;
            }
            WorkerMsg::Disconnect { conn } => {
                for order in self.conn_docs.remove(&conn).unwrap_or_default() {
                    if let Some(d) = self.docs.get_mut(&order) {
                        d.peers.remove(&conn);
                    }
                }
            }
            WorkerMsg::Flush { reply } => self.flush_waiters.push(reply),
            WorkerMsg::Stop => self.stopping = true,
        }
    }

    /// The document for `order`, loaded from redb on a miss. `None`: the relay has never stored
    /// it (an empty state is inserted so a first sync can create it).
    async fn doc(&mut self, order: OrderId) -> Result<&mut DocState, RelayError> {
        self.tick += 1;
        if !self.docs.contains_key(&order) {
            self.evict_if_full();
            let store = Arc::clone(&self.store);
            let loaded = tokio::task::spawn_blocking(move || store.load_order(order))
                .await
                .map_err(|e| RelayError::Internal(e.to_string()))??;
            let mut state = DocState::empty();
            if let Some(stored) = loaded {
                let mut doc = Automerge::load(&stored.snapshot)
                    .map_err(|e| RelayError::Corrupt(format!("order {order}: {e}")))?;
                for change in &stored.tail {
                    doc.load_incremental(change)
                        .map_err(|e| RelayError::Corrupt(format!("order {order}: {e}")))?;
                }
                state.committed = doc.clone();
                state.working = doc;
                state.store = Some(stored.meta.store.clone());
                state.tail_len = stored.meta.tail_len;
                state.meta = Some(stored.meta);
            }
            self.docs.insert(order, state);
            self.metrics
                .orders_in_memory
                .fetch_add(1, Ordering::Relaxed);
            self.ensure_number(order);
        }
        let tick = self.tick;
        let d = self
            .docs
            .get_mut(&order)
            .ok_or_else(|| RelayError::NotFound(order.to_string()))?;
        d.last_used = tick;
        Ok(d)
    }

    /// Drops idle orders (nothing in flight) beyond the cache capacity, oldest first.
    fn evict_if_full(&mut self) {
        if self.docs.len() < self.capacity {
            return;
        }
        let mut idle: Vec<(u64, OrderId)> = self
            .docs
            .iter()
            .filter(|(_, d)| d.inflight.is_empty())
            .map(|(id, d)| (d.last_used, *id))
            .collect();
        idle.sort_unstable();
        let drop_n = (self.docs.len() + 1)
            .saturating_sub(self.capacity)
            .max(self.capacity / 10)
            .min(idle.len());
        for (_, id) in idle.into_iter().take(drop_n) {
            if let Some(d) = self.docs.remove(&id) {
                for conn in d.peers.keys() {
                    if let Some(set) = self.conn_docs.get_mut(conn) {
                        set.remove(&id);
                    }
                }
                self.metrics
                    .orders_in_memory
                    .fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    async fn on_sync(&mut self, peer: Arc<Peer>, order: OrderId, msg: sync::Message) {
        if let Err(e) = self.doc(order).await {
            tracing::error!(%order, error = %e, "cannot load order");
            peer.send(RelayFrame::error(
                codes::STORAGE,
                format!("cannot load order {order}"),
                false,
            ));
            return;
        }
        let p = Arc::clone(&peer);
        if let Err(why) = contain(|| self.apply_sync(p, order, msg)) {
            self.undo_panicked(order, &peer, &why);
        }
    }

    /// The answer to `msg` for an order the relay does not have, without touching the stored
    /// order of that id (another store's): the message is played against an empty document,
    /// as it would be for an absent order, and answered the same way — `unavailable` for a
    /// fetch, a sync message for announced heads, the same error or rejection for bad changes.
    /// Only changes that would create the order get `unavailable`: the id is taken.
    /// Refuses a document sent as `order` whose header says it is `inside`: counted, logged
    /// and answered with `wrong_order_id` (nothing of it is stored).
    fn refuse_wrong_order_id(metrics: &Metrics, peer: &Peer, order: OrderId, inside: OrderId) {
        metrics.sync_refused(codes::WRONG_ORDER_ID);
        tracing::warn!(%order, %inside, device = %peer.device, "document sent under another order id");
        peer.send(RelayFrame::error(
            codes::WRONG_ORDER_ID,
            format!("the document is order {inside}, sent as {order}"),
            false,
        ));
    }

    fn answer_as_absent(metrics: &Metrics, peer: &Peer, order: OrderId, msg: sync::Message) {
        let has_changes = !msg.changes.is_empty();
        if !has_changes && msg.heads.is_empty() {
            peer.send(RelayFrame::Unavailable {
                order: order.to_string(),
            });
            return;
        }
        let mut empty = Automerge::new();
        let mut state = sync::State::new();
        if let Err(e) = empty.receive_sync_message(&mut state, msg) {
            peer.send(RelayFrame::error(
                codes::BAD_SYNC_MESSAGE,
                e.to_string(),
                false,
            ));
            return;
        }
        let applied = empty.get_heads();
        if !has_changes || applied.is_empty() || !empty.get_missing_deps(&[]).is_empty() {
            if let Some(m) = empty.generate_sync_message(&mut state) {
                peer.send(RelayFrame::Sync {
                    order: order.to_string(),
                    data: ByteBuf::from(m.encode()),
                });
            }
            return;
        }
        if let Ok(inside) = crdt_model::id_of(&empty)
            && inside != order
        {
            Self::refuse_wrong_order_id(metrics, peer, order, inside);
            return;
        }
        let author = Author {
            device: peer.device,
            store: peer.store.clone(),
            role: Role::Device,
        };
        let new_changes = empty.get_changes(&[]);
        match validate_changes(&Automerge::new(), &empty, &new_changes, &author) {
            Err(v) if v != crdt_model::PolicyViolation::ForeignStore => {
                metrics.rejected(v.code());
                let hashes: Vec<ChangeHash> = new_changes.iter().map(Change::hash).collect();
                peer.send(RelayFrame::Rejected {
                    order: order.to_string(),
                    code: v.code().to_owned(),
                    message: v.to_string(),
                    changes: heads_to_wire(&hashes),
                });
            }
            _ => peer.send(RelayFrame::Unavailable {
                order: order.to_string(),
            }),
        }
    }

    /// A frame's work panicked: puts the order back to its last accepted state, forgets the
    /// connection's sync state for it, counts and logs the panic, and closes the connection.
    fn undo_panicked(&mut self, order: OrderId, peer: &Peer, why: &str) {
        self.metrics.frame_panics.fetch_add(1, Ordering::Relaxed);
        tracing::error!(%order, device = %peer.device, conn = peer.conn, panic = %why,
            "handling a sync frame panicked; its effects are undone and the connection closed");
        if let Some(d) = self.docs.get_mut(&order) {
            d.working = last_accepted(&d.inflight, &d.committed).clone();
            d.peers.remove(&peer.conn);
        }
        if let Some(set) = self.conn_docs.get_mut(&peer.conn) {
            set.remove(&order);
        }
        peer.fail(
            codes::UNPROCESSABLE,
            format!("the relay could not process a sync frame for order {order}"),
        );
    }

    /// [`Self::on_committed`], with a panic contained: the order is then dropped from memory
    /// once nothing of it is in flight (it reloads from redb on next use).
    fn on_committed_contained(&mut self, c: Committed) {
        let order = c.order;
        if let Err(why) = contain(|| self.on_committed(c)) {
            self.metrics.frame_panics.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%order, panic = %why, "handling a commit panicked");
            if self.docs.get(&order).is_some_and(|d| d.inflight.is_empty()) {
                self.forget(order);
            }
        }
    }

    /// Drops an order from memory (its connections re-sync from redb on their next message).
    fn forget(&mut self, order: OrderId) {
        if let Some(d) = self.docs.remove(&order) {
            for conn in d.peers.keys() {
                if let Some(set) = self.conn_docs.get_mut(conn) {
                    set.remove(&order);
                }
            }
            self.metrics
                .orders_in_memory
                .fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The synchronous part of a sync frame (the order is loaded); run under [`contain`].
    fn apply_sync(&mut self, peer: Arc<Peer>, order: OrderId, msg: sync::Message) {
        let metrics = Arc::clone(&self.metrics);
        let relay_actor = self.writer.actor.clone();
        let conn = peer.conn;
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let has_changes = !msg.changes.is_empty();
        if let Some(store) = &d.store
            && *store != peer.store
        {
            // Another store's order: answer exactly as for an order the relay does not have,
            // so no message tells a device which ids exist in other stores.
            Self::answer_as_absent(&metrics, &peer, order, msg);
            return;
        }
        if d.poisoned {
            peer.send(RelayFrame::error(
                codes::STORAGE,
                "order is recovering from a storage error; retry",
                false,
            ));
            return;
        }
        // A device asking for an order nobody has (it has none of it either): unavailable. A
        // device announcing heads of an order the relay lacks is creating it: sync normally.
        if !d.exists() && !has_changes && msg.heads.is_empty() {
            peer.send(RelayFrame::Unavailable {
                order: order.to_string(),
            });
            return;
        }
        self.conn_docs.entry(conn).or_default().insert(order);
        let pd = d.peers.entry(conn).or_insert_with(|| PeerDoc {
            peer: Arc::clone(&peer),
            state: sync::State::new(),
            last_receipt: Vec::new(),
            queued: Vec::new(),
            queued_bytes: 0,
        });
        if !has_changes {
            if let Err(e) = d.committed.receive_sync_message(&mut pd.state, msg) {
                peer.send(RelayFrame::error(
                    codes::BAD_SYNC_MESSAGE,
                    e.to_string(),
                    false,
                ));
                return;
            }
            // While a write of this order is being committed, the committed document lacks
            // changes the peer may already have sent: a reply now would ask for them again,
            // and the peer (which already sent them) would answer with its heads, in a loop
            // until the commit lands. Every peer of the order gets a message after each
            // commit, so the reply is simply left to that.
            if d.inflight.is_empty() {
                Self::reply(&metrics, order, d, conn);
            }
            return;
        }
        // The common case applies the message straight to `working` and puts `working` back
        // from the last accepted state if the policy refuses it; a peer with queued chunks
        // (a dependency went missing) gets a fork, so nothing unapplied lingers in `working`.
        let base = last_accepted(&d.inflight, &d.committed);
        let before_heads = d.working.get_heads();
        let direct = pd.queued.is_empty();
        let mut fork = if direct {
            None
        } else {
            let mut f = d.working.fork();
            for q in &pd.queued {
                let _ = f.load_incremental(q);
            }
            Some(f)
        };
        let target = match fork.as_mut() {
            Some(f) => f,
            None => &mut d.working,
        };
        let chunks: Vec<Vec<u8>> = msg.changes.iter().map(<[u8]>::to_vec).collect();
        if let Err(e) = target.receive_sync_message(&mut pd.state, msg) {
            if direct {
                d.working = base.clone();
            }
            pd.state = sync::State::new();
            pd.clear_queue();
            peer.send(RelayFrame::error(
                codes::BAD_SYNC_MESSAGE,
                e.to_string(),
                false,
            ));
            return;
        }
        // A document chunk loads into a non-empty document change by change, and what does
        // not load is dropped silently: every head it declares must be there now.
        let lost = chunks
            .iter()
            .filter_map(|c| crate::screen::document_heads(c))
            .flatten()
            .any(|h| !holds(target, &h));
        if lost {
            if direct {
                d.working = base.clone();
            }
            pd.state = sync::State::new();
            pd.clear_queue();
            metrics.sync_refused(codes::BAD_CHANGE);
            peer.send(RelayFrame::error(
                codes::BAD_CHANGE,
                format!("order {order}: a document chunk did not load completely"),
                false,
            ));
            return;
        }
        // Keep what could not be applied yet; drop the queue once everything applied.
        let mut within_limits = true;
        if target.get_missing_deps(&[]).is_empty() {
            pd.clear_queue();
        } else {
            if direct {
                // Rebuild `working` with only what applied, so it holds no pending chunk.
                let applied = target.get_changes(&before_heads);
                let mut clean = base.clone();
                if let Err(e) = clean.apply_changes(applied) {
                    tracing::error!(%order, error = %e, "cannot re-apply accepted changes");
                }
                d.working = clean;
            }
            within_limits = pd.queue(&chunks, &self.limits);
        }
        if !within_limits {
            // Changes withheld from their dependency past the limits: the connection goes,
            // and its queue with it (`working` holds none of it).
            let held = pd.queued.len();
            d.peers.remove(&conn);
            if let Some(set) = self.conn_docs.get_mut(&conn) {
                set.remove(&order);
            }
            metrics.sync_refused(codes::LIMIT_EXCEEDED);
            tracing::warn!(%order, device = %peer.device, conn, held,
                "too many changes waiting for a missing dependency; closing the connection");
            peer.fail(
                codes::LIMIT_EXCEEDED,
                format!("order {order}: too many changes wait for a dependency that never came"),
            );
            return;
        }
        let after: &Automerge = fork.as_ref().unwrap_or(&d.working);
        // What the message added. Automerge rebuilds changes from its op set in
        // `get_changes` (~20 µs here), so in the common case the chunks the peer sent are
        // decoded instead: with nothing pending, the new changes are exactly those chunks that
        // `base` lacked and `after` holds.
        let from_chunks = if direct && pd.queued.is_empty() {
            new_changes_in(&chunks, base, after)
        } else {
            None
        };
        let new_changes = from_chunks.unwrap_or_else(|| after.get_changes(&before_heads));
        if new_changes.is_empty() {
            // Everything was known already (a retry). If some of it is still being committed,
            // this connection waits for that commit's receipt too.
            match d.inflight.back_mut() {
                Some(last) => last.origins.push(Arc::clone(&peer)),
                None => Self::reply(&metrics, order, d, conn),
            }
            return;
        }
        // The document must be the order it is sent as: one document stored under several ids
        // would be several orders sharing every change. The header is immutable (policy), so
        // checking it when the order is created is enough.
        if base.get_heads().is_empty()
            && let Ok(inside) = crdt_model::id_of(after)
            && inside != order
        {
            if direct {
                d.working = base.clone();
            }
            pd.state = sync::State::new();
            pd.clear_queue();
            Self::refuse_wrong_order_id(&metrics, &peer, order, inside);
            return;
        }
        let author = Author {
            device: peer.device,
            store: peer.store.clone(),
            role: Role::Device,
        };
        if let Err(violation) = validate_changes(base, after, &new_changes, &author) {
            if direct {
                d.working = base.clone();
            }
            if violation == crdt_model::PolicyViolation::ForeignStore {
                // Another store's order: the same answer as for an order that does not exist.
                pd.state = sync::State::new();
                peer.send(RelayFrame::Unavailable {
                    order: order.to_string(),
                });
                return;
            }
            let hashes: Vec<ChangeHash> = new_changes.iter().map(Change::hash).collect();
            tracing::warn!(%order, device = %peer.device, code = violation.code(), reason = %violation, "changes rejected");
            metrics.rejected(violation.code());
            pd.state = sync::State::new();
            peer.send(RelayFrame::Rejected {
                order: order.to_string(),
                code: violation.code().to_owned(),
                message: violation.to_string(),
                changes: heads_to_wire(&hashes),
            });
            return;
        }
        if let Some(f) = fork {
            d.working = f.with_actor(relay_actor);
        }
        metrics.receipts_pending.fetch_add(1, Ordering::Relaxed);
        self.enqueue(order, new_changes, vec![peer], None);
    }

    /// Sends what the peer is missing from the committed document, and a receipt if the
    /// committed heads moved since the last one it got.
    fn reply(metrics: &Metrics, order: OrderId, d: &mut DocState, conn: ConnId) {
        let heads = d.committed.get_heads();
        let Some(pd) = d.peers.get_mut(&conn) else {
            return;
        };
        if let Some(m) = pd.generate(&d.committed) {
            pd.peer.send(RelayFrame::Sync {
                order: order.to_string(),
                data: ByteBuf::from(m.encode()),
            });
        }
        if pd.last_receipt != heads && !heads.is_empty() {
            pd.peer.send(RelayFrame::Receipt {
                order: order.to_string(),
                heads: heads_to_wire(&heads),
            });
            metrics.receipts_sent.fetch_add(1, Ordering::Relaxed);
            pd.last_receipt = heads;
        }
    }

    /// Queues `changes` (already in `working`) for the next group commit.
    fn enqueue(
        &mut self,
        order: OrderId,
        changes: Vec<Change>,
        origins: Vec<Arc<Peer>>,
        reply: Option<ViewReply>,
    ) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let status = match crdt_model::status_of(&d.working) {
            Ok(s) => s,
            Err(e) => {
                // The policy accepted the document, so it parses; if not, refuse loudly.
                tracing::error!(%order, error = %e, "accepted document does not parse");
                for p in &origins {
                    p.send(RelayFrame::error(codes::STORAGE, "internal error", false));
                }
                return;
            }
        };
        let store = match &d.store {
            Some(s) => s.clone(),
            None => match crdt_model::store_of(&d.working) {
                Ok(s) => s,
                Err(_) => return,
            },
        };
        d.store = Some(store.clone());
        let mut raw = Vec::with_capacity(changes.len());
        for c in &changes {
            raw.push(c.raw_bytes().to_vec());
        }
        let n = u32::try_from(changes.len()).unwrap_or(u32::MAX);
        let compacted = if d.tail_len.saturating_add(n) > COMPACT_EVERY {
            d.tail_len = 0;
            Some(d.working.save())
        } else {
            d.tail_len = d.tail_len.saturating_add(n);
            None
        };
        let write = OrderWrite {
            order,
            store,
            changes: raw,
            compacted,
            status,
            base: last_accepted(&d.inflight, &d.committed)
                .get_heads()
                .iter()
                .map(|h| h.0)
                .collect(),
            heads: d.working.get_heads().iter().map(|h| h.0).collect(),
            at: now_ms(),
        };
        d.inflight.push_back(Inflight {
            snapshot: d.working.clone(),
            changes,
            origins,
            reply,
        });
        let job = CommitJob {
            write,
            done: self.done_tx.clone(),
        };
        if self.commits.send(job).is_err() {
            tracing::error!("committer is gone");
        }
    }

    fn on_committed(&mut self, c: Committed) {
        let order = c.order;
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let Some(inflight) = d.inflight.pop_front() else {
            return;
        };
        let outcome = match c.result {
            Ok(o) => o,
            Err(e) => {
                // Nothing of this write is on disk. Later queued writes may build on it, so the
                // in-memory state is dropped once the queue drains and reloaded from disk.
                d.poisoned = true;
                for p in &inflight.origins {
                    p.send(RelayFrame::error(
                        codes::STORAGE,
                        format!("commit failed: {e}"),
                        false,
                    ));
                }
                self.metrics
                    .receipts_pending
                    .fetch_sub(inflight.origins.len() as i64, Ordering::Relaxed);
                if let Some(r) = inflight.reply {
                    let _ = r.send(Err(RelayError::Internal(e)));
                }
                if d.inflight.is_empty() {
                    self.docs.remove(&order);
                    self.metrics
                        .orders_in_memory
                        .fetch_sub(1, Ordering::Relaxed);
                }
                return;
            }
        };
        tracing::debug!(%order, changes = inflight.changes.len(), seconds = c.seconds, "committed");
        d.committed = inflight.snapshot;
        self.metrics
            .changes_accepted
            .fetch_add(inflight.changes.len() as u64, Ordering::Relaxed);
        let heads = d.committed.get_heads();
        for p in &inflight.origins {
            if let Some(pd) = d.peers.get_mut(&p.conn) {
                pd.last_receipt = heads.clone();
            }
            p.send(RelayFrame::Receipt {
                order: order.to_string(),
                heads: heads_to_wire(&heads),
            });
            self.metrics.receipts_sent.fetch_add(1, Ordering::Relaxed);
        }
        self.metrics
            .receipts_pending
            .fetch_sub(inflight.origins.len() as i64, Ordering::Relaxed);
        // Each connection's message is generated from its own sync state, which its own
        // messages shaped: a panic there is that connection's, and ends only it.
        let mut failed = Vec::new();
        for (conn, pd) in &mut d.peers {
            match contain(|| pd.generate(&d.committed)) {
                Ok(Some(m)) => pd.peer.send(RelayFrame::Sync {
                    order: order.to_string(),
                    data: ByteBuf::from(m.encode()),
                }),
                Ok(None) => {}
                Err(why) => failed.push((*conn, why)),
            }
        }
        for (conn, why) in failed {
            if let Some(pd) = d.peers.remove(&conn) {
                self.metrics.frame_panics.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%order, device = %pd.peer.device, conn, panic = %why,
                    "generating a sync message panicked; the connection is closed");
                pd.peer.fail(
                    codes::UNPROCESSABLE,
                    format!("the relay could not process a sync frame for order {order}"),
                );
            }
            if let Some(set) = self.conn_docs.get_mut(&conn) {
                set.remove(&order);
            }
        }
        if let Some(r) = inflight.reply {
            let view = crdt_model::view_of(&d.committed);
            let _ = r.send(view.map_err(RelayError::from));
        }
        self.registry
            .publish(outcome.meta.store.clone(), feed_entry(&outcome.meta));
        let newly = outcome.newly_numbered;
        d.meta = Some(outcome.meta);
        if newly {
            self.ensure_number(order);
        }
    }

    /// Writes the stored number into the document if it is not there yet (after the first
    /// commit, or after a restart that came between the first commit and this change).
    fn ensure_number(&mut self, order: OrderId) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let Some(number) = d.meta.as_ref().map(|m| m.number) else {
            return;
        };
        let mut o = match Order::from_doc(std::mem::take(&mut d.working), self.writer.clone()) {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(%order, error = %e, "stored order does not parse");
                // `working` was moved out above: put the last accepted state back.
                d.working = last_accepted(&d.inflight, &d.committed).clone();
                return;
            }
        };
        let before = o.heads();
        let result = o.assign_number(Timestamp(now_ms()), OrderNumber(number.0));
        let changes = o.doc().get_changes(&before);
        d.working = o.into_doc();
        match result {
            Ok(true) => self.enqueue(order, changes, Vec::new(), None),
            Ok(false) => {}
            Err(e) => {
                tracing::error!(%order, error = %e, "order carries another number than stored")
            }
        }
    }

    async fn on_back_office(
        &mut self,
        order: OrderId,
        store: Option<StoreId>,
        status: OrderStatus,
        reply: ViewReply,
    ) {
        let writer = self.writer.clone();
        let author = self.relay_author.clone();
        let d = match self.doc(order).await {
            Ok(d) => d,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let visible = d.exists()
            && d.meta.is_some()
            && store.as_ref().is_none_or(|s| d.store.as_ref() == Some(s));
        if !visible {
            let _ = reply.send(Err(RelayError::NotFound(format!("order {order}"))));
            return;
        }
        let mut o = match Order::from_doc(d.working.clone(), writer) {
            Ok(o) => o,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let before = o.heads();
        if let Err(e) = o.set_status_any(Timestamp(now_ms()), &mut OsEntropy, status) {
            let _ = reply.send(Err(e.into()));
            return;
        }
        let mut author = author;
        author.store = o.store().clone();
        if let Err(v) = validate(&d.working, o.doc(), &author) {
            let _ = reply.send(Err(crdt_model::ModelError::from(v).into()));
            return;
        }
        let changes = o.doc().get_changes(&before);
        d.working = o.into_doc();
        self.enqueue(order, changes, Vec::new(), Some(reply));
    }
}

/// Handle to the hub, cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    workers: Vec<mpsc::Sender<WorkerMsg>>,
    registry: Arc<Registry>,
    next_conn: AtomicU64,
    metrics: Arc<Metrics>,
    limits: Limits,
    relay: DeviceId,
    handles: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    feed_task: tokio::task::JoinHandle<()>,
    committer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Hub {
    /// Starts the committer thread and the worker tasks (on the current tokio runtime).
    pub fn start(
        store: Arc<RelayStore>,
        metrics: Arc<Metrics>,
        config: &HubConfig,
    ) -> Result<Self, RelayError> {
        let identity = store.identity()?;
        let writer = Writer::new(identity.device, identity.epoch);
        let (commits, committer) = spawn_committer(Arc::clone(&store), Arc::clone(&metrics));
        let registry = Arc::new(Registry::default());
        let n = config.workers.max(1);
        let capacity = (config.cache_orders / n).max(16);
        let mut workers = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(4096);
            let (done_tx, done_rx) = mpsc::unbounded_channel();
            let w = Worker {
                docs: HashMap::new(),
                conn_docs: HashMap::new(),
                store: Arc::clone(&store),
                metrics: Arc::clone(&metrics),
                registry: Arc::clone(&registry),
                writer: writer.clone(),
                relay_author: Author {
                    device: identity.device,
                    store: StoreId::new("relay").map_err(RelayError::from)?,
                    role: Role::Relay,
                },
                commits: commits.clone(),
                done_tx,
                capacity,
                limits: Limits::default(),
                tick: 0,
                flush_waiters: Vec::new(),
                stopping: false,
            };
            handles.push(tokio::spawn(w.run(rx, done_rx)));
            workers.push(tx);
        }
        let feed_task = tokio::spawn(Arc::clone(&registry).run_feed());
        Ok(Self {
            inner: Arc::new(HubInner {
                workers,
                registry,
                next_conn: AtomicU64::new(1),
                metrics,
                limits: Limits::default(),
                relay: identity.device,
                handles: std::sync::Mutex::new(handles),
                feed_task,
                committer: std::sync::Mutex::new(committer),
            }),
        })
    }

    /// The limits device frames are held to.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Whether every worker task is still running (a worker that ended outside shutdown has
    /// taken its share of the orders with it: the relay is unhealthy).
    pub fn workers_alive(&self) -> bool {
        self.inner
            .handles
            .lock()
            .map(|h| h.iter().all(|t| !t.is_finished()))
            .unwrap_or(false)
    }

    /// The relay's own device id.
    pub fn relay_id(&self) -> DeviceId {
        self.inner.relay
    }

    fn worker(&self, order: &OrderId) -> &mpsc::Sender<WorkerMsg> {
        let b = order.as_bytes();
        let idx = (u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
            % self.inner.workers.len() as u64) as usize;
        &self.inner.workers[idx]
    }

    /// Registers a connection of `device` (store `store`); frames for it go to `outbox`.
    pub fn connect(
        &self,
        device: DeviceId,
        store: StoreId,
        outbox: mpsc::Sender<Bytes>,
    ) -> Arc<Peer> {
        let peer = Arc::new(Peer {
            conn: self.inner.next_conn.fetch_add(1, Ordering::Relaxed),
            device,
            store,
            outbox,
            closed: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            kill: Notify::new(),
        });
        self.inner.registry.add(&peer);
        self.inner
            .metrics
            .connections
            .fetch_add(1, Ordering::Relaxed);
        peer
    }

    /// Forgets a connection everywhere.
    pub async fn disconnect(&self, peer: &Peer) {
        self.inner.registry.remove(peer);
        self.inner
            .metrics
            .connections
            .fetch_sub(1, Ordering::Relaxed);
        for w in &self.inner.workers {
            let _ = w.send(WorkerMsg::Disconnect { conn: peer.conn }).await;
        }
    }

    /// Hands one sync message to the order's worker (waits if the worker is saturated).
    pub async fn sync(
        &self,
        peer: &Arc<Peer>,
        order: OrderId,
        msg: sync::Message,
    ) -> Result<(), RelayError> {
        self.worker(&order)
            .send(WorkerMsg::Sync {
                peer: Arc::clone(peer),
                order,
                msg,
            })
            .await
            .map_err(|_| RelayError::ShuttingDown)
    }

    /// A back-office status change, authored by the relay, applied through the lattice and
    /// committed before the answer. `store` restricts it to one store's orders.
    pub async fn set_status(
        &self,
        order: OrderId,
        store: Option<StoreId>,
        status: OrderStatus,
    ) -> Result<OrderView, RelayError> {
        let (reply, rx) = oneshot::channel();
        self.worker(&order)
            .send(WorkerMsg::BackOffice {
                order,
                store,
                status,
                reply,
            })
            .await
            .map_err(|_| RelayError::ShuttingDown)?;
        rx.await.map_err(|_| RelayError::ShuttingDown)?
    }

    /// Stops the workers (after their in-flight commits) and the committer, releasing the store.
    pub async fn shutdown(&self) {
        for w in &self.inner.workers {
            let _ = w.send(WorkerMsg::Stop).await;
        }
        let handles: Vec<_> = self
            .inner
            .handles
            .lock()
            .map(|mut h| h.drain(..).collect())
            .unwrap_or_default();
        for h in handles {
            let _ = h.await;
        }
        self.inner.feed_task.abort();
        self.inner.registry.flush_feed();
        let committer = self.inner.committer.lock().ok().and_then(|mut c| c.take());
        if let Some(c) = committer {
            let _ = tokio::task::spawn_blocking(move || c.join()).await;
        }
    }

    /// Waits until every accepted change has been committed and receipted.
    pub async fn flush(&self) {
        for w in &self.inner.workers {
            let (reply, rx) = oneshot::channel();
            if w.send(WorkerMsg::Flush { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }
}
