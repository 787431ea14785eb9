//! The relay's core: a deterministic state machine with no I/O, in the manner of quinn-proto
//! and samod-core.
//!
//! It owns the documents of its share of the orders (a shard), every connection's sync state
//! for them, the policy calls, the writes to commit, receipts, fan-out and the order cache.
//! Drivers feed it inputs with `handle_*` (a sync message from a connection, a connection
//! closed, a back-office request, an order loaded, a commit finished or failed), passing the
//! time in, and drain what it wants done with [`RelayCore::poll_output`]: frames to send,
//! connections to close, orders to load, writes to commit, feed entries to publish, requests to
//! answer. The tokio server with its committer (redb or PostgreSQL) is one driver; the
//! simulation in `tests/tests/relay_sim.rs` is another (one relay, or two relays on one store).
//!
//! With several relays on one store ([`CoreConfig::shared`]) the driver also tells the core
//! what the others committed ([`RelayCore::handle_changed_elsewhere`]): an order in memory that
//! lacks those heads is read again ("refresh"), its new changes go to its connections, and a
//! write refused because another relay moved the order (`Conflict`) is written again on top.
//!
//! The promises it keeps:
//!
//! * **Durable before advertised.** `committed` is exactly what the store holds; sync messages
//!   are generated from it only, and a receipt names heads the connection announced once the
//!   committed document holds all of them. A receipt therefore never names a change the
//!   receiving device lacks (it announced those heads) nor one that is not on disk.
//! * **One write per order in flight.** The next write of an order is built when the previous
//!   one is durable. A failed write is not followed by one that builds on it: the order falls
//!   back to what is stored, and every connection waiting on the failed changes is told.
//! * **Followers survive the cache.** An evicted order keeps its list of following
//!   connections; when it is loaded again they get a fresh sync state, so the next change
//!   reaches them.
//! * **One connection cannot hurt the others.** A panic while handling its message is
//!   contained and undone and closes only that connection; changes it withholds from their
//!   dependency are bounded ([`Limits`]); another store's order is answered as an absent one.

mod commit;
mod doc;
mod sync_in;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;

use automerge::sync;
use crdt_model::wire::{FeedEntry, RelayFrame};
use crdt_model::{
    Author, DeviceId, Entropy, OrderId, OrderStatus, OrderView, RelaySeal, Role, SealKey, StoreId,
    Writer,
};
use serde_bytes::ByteBuf;

use crate::error::RelayError;
use crate::metrics::Metrics;
use crate::records::{CommitOutcome, OrderMeta, OrderWrite, StoredOrder, StoredTail};
use crate::screen::Limits;
use doc::DocState;
pub use sync_in::Incoming;

/// How many tail changes an order may accumulate before it is compacted into a snapshot.
pub const COMPACT_EVERY: u32 = 64;

/// How long after a failed load a touched order (one whose number may be missing from its
/// document) is loaded again, ms.
pub const TOUCH_RETRY_MS: i64 = 1_000;

/// Writes of one order refused in a row as built on old heads (another relay kept writing
/// the order) before the core gives up on them and tells their devices to retry.
pub const MAX_CONFLICT_RETRIES: u32 = 8;

/// One device connection, as numbered by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One back-office request, as numbered by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// Who sent a sync message: the connection and the device and store its token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The connection.
    pub conn: ConnId,
    /// The authenticated device.
    pub device: DeviceId,
    /// Its store.
    pub store: StoreId,
}

/// What the core wants done.
#[derive(Debug)]
pub enum Output {
    /// Send a frame on a connection.
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame.
        frame: RelayFrame,
    },
    /// Send one frame to several connections (encode it once).
    Broadcast {
        /// The connections, in ascending order.
        conns: Vec<ConnId>,
        /// The frame.
        frame: RelayFrame,
    },
    /// Send a fatal error frame, then close the connection.
    Close {
        /// The connection.
        conn: ConnId,
        /// Error code (`crdt_model::wire::codes`).
        code: &'static str,
        /// For the device's log.
        message: String,
    },
    /// Load an order from the store and report with [`RelayCore::handle_loaded`].
    Load {
        /// The order.
        order: OrderId,
    },
    /// Read an order's metadata and the tail changes stored from position `from` on, and
    /// report with [`RelayCore::handle_tail_read`] (a relay catching up with another relay's
    /// commits to an order it holds).
    ReadTail {
        /// The order.
        order: OrderId,
        /// The first tail position to read: the stored tail length the relay holds.
        from: u32,
    },
    /// Commit a write durably and report with [`RelayCore::handle_committed`].
    Commit {
        /// The write (boxed: it is large and rarer than frames).
        write: Box<OrderWrite>,
    },
    /// A committed order's new feed entry, for every connection of its store.
    Publish {
        /// The store.
        store: StoreId,
        /// The entry.
        entry: FeedEntry,
    },
    /// Answer a back-office request.
    Reply {
        /// The request.
        request: RequestId,
        /// The order after the change was committed, or why not (boxed: it is large).
        result: Box<Result<OrderView, RelayError>>,
    },
}

/// Tunables of a core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    /// Orders kept in memory; idle ones beyond this are dropped (and loaded again on use).
    pub capacity: usize,
    /// Limits device messages are held to.
    pub limits: Limits,
    /// Several relays write the same store (PostgreSQL): a relay writes into an order's
    /// document only the numbers it assigned itself (and those of orders touched at start),
    /// not every number a load finds missing, which may be another relay's write in flight.
    pub shared: bool,
}

impl Default for CoreConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            limits: Limits::default(),
            shared: false,
        }
    }
}

/// A back-office write, authored by the relay and held to the policy like a device's change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackOfficeOp {
    /// Set a status through the lattice (an active status is refused on a closed order).
    Status(OrderStatus),
    /// Acknowledge a late edit (allowed on a closed order).
    Acknowledge {
        /// The late edit's id (`LateEdit::id`).
        edit: String,
        /// Who acknowledged it and why, kept in the acknowledgement.
        note: String,
    },
}

/// An input that waits for its order to be loaded.
#[derive(Debug)]
enum Parked {
    Sync {
        origin: Origin,
        msg: Incoming,
    },
    BackOffice {
        request: RequestId,
        store: Option<StoreId>,
        op: BackOfficeOp,
    },
}

/// What the core knows of a connection.
#[derive(Debug, Default)]
struct ConnInfo {
    /// Orders it has a sync state for (or follows).
    orders: HashSet<OrderId>,
    /// Bytes of its change chunks waiting for a missing dependency, over all orders.
    queued_bytes: usize,
    /// The store its device belongs to.
    store: Option<StoreId>,
}

/// The relay's core for one shard of the orders. See the module docs.
pub struct RelayCore {
    docs: HashMap<OrderId, DocState>,
    conns: HashMap<ConnId, ConnInfo>,
    /// Connections following an order, kept when the order leaves the cache.
    followers: HashMap<OrderId, HashSet<ConnId>>,
    /// Inputs waiting for their order's load, by order.
    loading: HashMap<OrderId, Vec<Parked>>,
    /// Orders touched so a missing number gets written, whose load is under way.
    touching: HashSet<OrderId>,
    /// Touched orders whose load failed, and when to load them again.
    touch_retry: std::collections::BTreeMap<OrderId, i64>,
    /// Orders changed by another relay while their load was under way: the heads the store
    /// holds, checked once the load is in.
    changed_while_loading: HashMap<OrderId, Vec<automerge::ChangeHash>>,
    /// Orders loaded because another relay changed them while connections here follow them:
    /// the followers get a sync round once the load is in.
    announce: HashSet<OrderId>,
    /// Shared: messages the policy refused on a copy that may be stale, judged again once
    /// their order has been read again.
    after_refresh: HashMap<OrderId, Vec<(Origin, Incoming)>>,
    /// Set while those are judged again (a second refusal is final).
    retrying: bool,
    outputs: VecDeque<Output>,
    writer: Writer,
    relay_author: Author,
    /// The relay's seal, for judging the relay's changes a device delivers (after a restore).
    seal: RelaySeal,
    /// Stores in recovery after a restore: their new orders wait, accepted but not
    /// committed, until numbering resumes ([`RelayCore::set_recovering`]).
    recovering: HashSet<StoreId>,
    rng: Box<dyn Entropy + Send>,
    metrics: Arc<Metrics>,
    config: CoreConfig,
    tick: u64,
}

impl fmt::Debug for RelayCore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayCore")
            .field("orders", &self.docs.len())
            .field("connections", &self.conns.len())
            .field("loading", &self.loading.len())
            .field("outputs", &self.outputs.len())
            .finish_non_exhaustive()
    }
}

impl RelayCore {
    /// A core writing as `relay` (the relay's device identity and epoch), sealing its changes
    /// with `seal` (`crdt_model::seal`), drawing its random ids from `rng`.
    pub fn new(
        relay: DeviceId,
        epoch: u32,
        seal: SealKey,
        rng: Box<dyn Entropy + Send>,
        metrics: Arc<Metrics>,
        config: CoreConfig,
    ) -> Result<Self, RelayError> {
        Ok(Self {
            docs: HashMap::new(),
            conns: HashMap::new(),
            followers: HashMap::new(),
            loading: HashMap::new(),
            touching: HashSet::new(),
            touch_retry: std::collections::BTreeMap::new(),
            changed_while_loading: HashMap::new(),
            announce: HashSet::new(),
            after_refresh: HashMap::new(),
            retrying: false,
            outputs: VecDeque::new(),
            writer: Writer::new(relay, epoch).with_seal(seal.clone()),
            seal: RelaySeal { relay, key: seal },
            recovering: HashSet::new(),
            relay_author: Author {
                device: relay,
                store: StoreId::new("relay")?,
                role: Role::Relay,
                seal: None,
                vouched: Default::default(),
            },
            rng,
            metrics,
            config,
            tick: 0,
        })
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Whether nothing is being committed, waiting to be, or waiting for a load. New orders
    /// held for their number during a store's recovery do not count: they wait for devices,
    /// not for the store.
    pub fn is_idle(&self) -> bool {
        self.loading.is_empty() && self.docs.values().all(|d| !d.busy() || d.held)
    }

    /// Puts `store` in recovery after a restore (`true`): a new order of it (one not stored
    /// yet, whose document carries no number) is accepted but not committed, so it gets no
    /// number, until the store leaves recovery (`false`), when every such order is written.
    /// Orders that come back carrying the relay's sealed number are written at once.
    pub fn set_recovering(&mut self, now: i64, store: StoreId, on: bool) {
        if on {
            self.recovering.insert(store);
            return;
        }
        if !self.recovering.remove(&store) {
            return;
        }
        let held: Vec<OrderId> = self
            .docs
            .iter()
            .filter(|(_, d)| d.held && d.store.as_ref() == Some(&store))
            .map(|(id, _)| *id)
            .collect();
        tracing::info!(%store, orders = held.len(), "numbering resumes");
        for order in held {
            if let Some(d) = self.docs.get_mut(&order) {
                d.held = false;
            }
            self.dispatch(now, order);
        }
    }

    /// Whether `store` is in recovery ([`RelayCore::set_recovering`]).
    pub fn is_recovering(&self, store: &StoreId) -> bool {
        self.recovering.contains(store)
    }

    /// The author a device's changes are judged as: the device, able to deliver the relay's
    /// sealed changes.
    fn device_author(&self, origin: &Origin) -> Author {
        Author {
            device: origin.device,
            store: origin.store.clone(),
            role: Role::Device,
            seal: Some(self.seal.clone()),
            vouched: Default::default(),
        }
    }

    /// Whether inputs for `order` wait for its load.
    pub fn is_loading(&self, order: OrderId) -> bool {
        self.loading.contains_key(&order)
    }

    /// Orders in memory.
    pub fn orders_in_memory(&self) -> usize {
        self.docs.len()
    }

    /// The heads of `order`'s committed document, if it is in memory (for checks: with
    /// several relays, once everything has settled, they are the stored heads).
    pub fn committed_heads(&self, order: OrderId) -> Option<Vec<automerge::ChangeHash>> {
        self.docs.get(&order).map(|d| d.committed.get_heads())
    }

    /// A sync message from a device (already screened and decoded by the driver).
    pub fn handle_sync(&mut self, now: i64, origin: Origin, order: OrderId, msg: sync::Message) {
        self.handle_incoming(now, origin, order, Incoming::Sync(msg));
    }

    /// Changes a device pushed with its heads after them (protocol 2; already screened and
    /// decoded by the driver). Answered with a receipt naming `heads` once they are durable.
    pub fn handle_push(
        &mut self,
        now: i64,
        origin: Origin,
        order: OrderId,
        changes: Vec<automerge::Change>,
        heads: Vec<automerge::ChangeHash>,
    ) {
        let push = Incoming::Push {
            changes,
            heads,
            voucher: None,
        };
        self.handle_incoming(now, origin, order, push);
    }

    /// A sync message or a push from a device.
    pub fn handle_incoming(&mut self, now: i64, origin: Origin, order: OrderId, msg: Incoming) {
        self.conns.entry(origin.conn).or_default().store = Some(origin.store.clone());
        if self.loaded(order) {
            self.sync_loaded(now, &origin, order, msg);
        } else {
            self.park(order, Parked::Sync { origin, msg });
        }
    }

    /// A back-office status change for `order` (of `store` only, when given), authored by the
    /// relay; answered with [`Output::Reply`] once committed.
    pub fn handle_back_office(
        &mut self,
        now: i64,
        request: RequestId,
        order: OrderId,
        store: Option<StoreId>,
        status: OrderStatus,
    ) {
        self.handle_back_office_op(now, request, order, store, BackOfficeOp::Status(status));
    }

    /// A back-office write `op` for `order` (of `store` only, when given), authored by the
    /// relay; answered with [`Output::Reply`] once committed.
    pub fn handle_back_office_op(
        &mut self,
        now: i64,
        request: RequestId,
        order: OrderId,
        store: Option<StoreId>,
        op: BackOfficeOp,
    ) {
        if self.loaded(order) {
            self.back_office_loaded(now, request, order, store, op);
        } else {
            self.park(order, Parked::BackOffice { request, store, op });
        }
    }

    /// Makes sure `order` is in memory, so its stored number is written into its document if
    /// it is not there yet (the driver touches the store's unnumbered orders at start).
    pub fn handle_touch(&mut self, now: i64, order: OrderId) {
        self.touch_retry.remove(&order);
        if self.loaded(order) {
            self.ensure_number(now, order);
            return;
        }
        // Loading it writes the number (see `handle_loaded`); if the load fails, it is tried
        // again after [`TOUCH_RETRY_MS`] (see [`Self::poll_timeout`]).
        self.touching.insert(order);
        if let std::collections::hash_map::Entry::Vacant(e) = self.loading.entry(order) {
            e.insert(Vec::new());
            self.outputs.push_back(Output::Load { order });
        }
    }

    /// When [`Self::handle_timeout`] should run next (ms), if ever: a touched order whose load
    /// failed is due to be loaded again.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.touch_retry.values().min().copied()
    }

    /// Time passed: touched orders whose retry is due are loaded again.
    pub fn handle_timeout(&mut self, now: i64) {
        let due: Vec<OrderId> = self
            .touch_retry
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(o, _)| *o)
            .collect();
        for order in due {
            let stale = self.docs.get(&order).is_some_and(DocState::is_stale);
            if stale {
                self.touch_retry.remove(&order);
                self.refresh(now, order);
            } else {
                self.handle_touch(now, order);
            }
        }
    }

    /// A connection closed: its sync states and queued chunks go.
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let Some(info) = self.conns.remove(&conn) else {
            return;
        };
        for order in info.orders {
            if let Some(d) = self.docs.get_mut(&order) {
                d.peers.remove(&conn);
            }
            if let Some(f) = self.followers.get_mut(&order) {
                f.remove(&conn);
                if f.is_empty() {
                    self.followers.remove(&order);
                }
            }
        }
    }

    /// The store's answer to [`Output::Load`]: the stored order, `None` if never stored, or
    /// why it could not be read.
    pub fn handle_loaded(
        &mut self,
        now: i64,
        order: OrderId,
        loaded: Result<Option<StoredOrder>, RelayError>,
    ) {
        if !self.loading.contains_key(&order) && self.docs.get(&order).is_some_and(|d| d.refreshing)
        {
            self.refresh_step(now, order, |core| core.refreshed(now, order, loaded));
            return;
        }
        let parked = self.loading.remove(&order).unwrap_or_default();
        // A touched order stays touched until a load succeeds (whichever load it is), so the
        // number it may lack is written even if the touch's own load failed.
        let touched = self.touching.contains(&order);
        let state = loaded.and_then(|stored| match stored {
            None => Ok(DocState::empty()),
            Some(stored) => {
                let doc = crdt_model::guard::load_with_increments(
                    &stored.snapshot,
                    stored.tail.iter().map(Vec::as_slice),
                )
                .map_err(|e| RelayError::Corrupt(format!("order {order}: {e}")))?;
                let mut state = DocState::empty();
                state.committed = doc.clone();
                state.working = doc;
                state.store = Some(stored.meta.store.clone());
                state.tail_len = stored.meta.tail_len;
                state.meta = Some(stored.meta);
                Ok(state)
            }
        });
        let mut state = match state {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%order, error = %e, "cannot load order");
                // Connections here following an order another relay changed meanwhile still
                // wait for that change: they get it once a later load succeeds.
                let changed = self.changed_while_loading.remove(&order).is_some();
                if changed && self.followers.get(&order).is_some_and(|f| !f.is_empty()) {
                    self.announce.insert(order);
                }
                if self.announce.contains(&order) {
                    // Followers here wait for another relay's change: try again later.
                    self.touch_retry.insert(order, now + TOUCH_RETRY_MS);
                }
                if touched {
                    // Its number may still be missing from its document: try again later,
                    // whether or not a device comes back to it.
                    self.touch_retry.insert(order, now + TOUCH_RETRY_MS);
                }
                let e = Arc::new(e);
                for p in parked {
                    match p {
                        // Closed, not answered with a plain error: the device counts the
                        // message as sent, and only a new connection makes it send it again.
                        Parked::Sync { origin, .. } => self.outputs.push_back(Output::Close {
                            conn: origin.conn,
                            code: crdt_model::wire::codes::STORAGE,
                            message: format!("cannot load order {order}; reconnect to retry"),
                        }),
                        Parked::BackOffice { request, .. } => {
                            self.answer(request, Err(RelayError::Shared(Arc::clone(&e))));
                        }
                    }
                }
                return;
            }
        };
        self.evict_if_full();
        // Connections that followed the order before it left the cache get a fresh sync state:
        // the next change reaches them.
        // (Only those of the order's store: one of another store that asked while the order
        // was unknown here is forgotten.)
        let mut strangers = Vec::new();
        if let Some(f) = self.followers.get(&order) {
            for conn in f {
                let theirs = self.conns.get(conn).and_then(|i| i.store.as_ref());
                match (&state.store, theirs) {
                    (Some(ours), Some(theirs)) if ours != theirs => strangers.push(*conn),
                    _ => {
                        state.peers.insert(*conn, doc::PeerDoc::new());
                    }
                }
            }
        }
        for conn in strangers {
            self.unfollow(conn, order);
        }
        self.tick += 1;
        state.last_used = self.tick;
        self.docs.insert(order, state);
        self.metrics
            .orders_in_memory
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // With several relays, the stored order may hold changes its followers here lack
        // (written through another relay while it was out of memory): they get a sync round.
        let followed = self.followers.get(&order).is_some_and(|f| !f.is_empty());
        if self.announce.remove(&order) | (self.config.shared && followed) {
            self.announce_to_followers(order);
        }
        if let Some(heads) = self.changed_while_loading.remove(&order) {
            self.handle_changed_elsewhere(now, order, heads);
        }
        self.touching.remove(&order);
        if touched || !self.config.shared {
            self.ensure_number(now, order);
        }
        self.dispatch(now, order);
        // Messages refused on an earlier, stale copy (which then left memory) are judged on
        // this one, just read.
        self.judge_again(now, order);
        for p in parked {
            match p {
                Parked::Sync { origin, msg } => {
                    if self.conns.contains_key(&origin.conn) {
                        self.sync_loaded(now, &origin, order, msg);
                    }
                }
                Parked::BackOffice { request, store, op } => {
                    self.back_office_loaded(now, request, order, store, op);
                }
            }
        }
    }

    /// The store's answer to [`Output::Commit`] for `order`.
    pub fn handle_committed(
        &mut self,
        now: i64,
        order: OrderId,
        result: Result<CommitOutcome, RelayError>,
    ) {
        let outcome = crdt_model::guard::contain(|| self.committed(now, order, result));
        if let Err(why) = outcome {
            self.metrics
                .frame_panics
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(%order, panic = %why, "handling a commit panicked; the order is reloaded on next use");
            self.forget(order);
        }
    }

    /// Another relay committed `order` (several relays on one database): the store now holds
    /// `heads` (empty when unknown). An order in memory whose committed document lacks them
    /// is read again and its connections get the new changes; an order not in memory that
    /// connections here follow is loaded and they get a sync round; any other order is left
    /// alone (it is read fresh when next used).
    pub fn handle_changed_elsewhere(
        &mut self,
        now: i64,
        order: OrderId,
        heads: Vec<automerge::ChangeHash>,
    ) {
        if self.loading.contains_key(&order) {
            // The load under way may have started before that commit.
            self.changed_while_loading.insert(order, heads);
            return;
        }
        match self.docs.get_mut(&order) {
            Some(d) => {
                if !heads.is_empty() && heads.iter().all(|h| doc::holds(&d.committed, h)) {
                    return;
                }
                d.mark_stale(heads);
                self.refresh(now, order);
            }
            None if self.followers.contains_key(&order) => {
                self.announce.insert(order);
                self.loading.insert(order, Vec::new());
                self.outputs.push_back(Output::Load { order });
            }
            None => {}
        }
    }

    /// Reads a stale order again unless a write of it is in flight (its outcome comes first)
    /// or it is already being read.
    pub(crate) fn refresh(&mut self, _now: i64, order: OrderId) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        if !d.is_stale() {
            d.stale_heads.clear();
            return;
        }
        if d.refreshing || d.inflight.is_some() {
            return;
        }
        d.refreshing = true;
        self.metrics.orders_reread.inc();
        if d.committed.get_heads().is_empty() {
            self.outputs.push_back(Output::Load { order });
        } else {
            // Only what was stored after what this relay holds; the whole order if that
            // does not complete it (a compaction started the tail over).
            let from = d.tail_len;
            self.outputs.push_back(Output::ReadTail { order, from });
        }
    }

    /// The store's answer to [`Output::ReadTail`]: the changes stored after what this relay
    /// holds of `order`. If they take the committed document exactly to the stored heads,
    /// they are what the refresh adds; otherwise (a compaction started the tail over, or the
    /// read raced one) the whole order is read instead. Errors and a vanished order go the
    /// way of a failed whole read.
    pub fn handle_tail_read(
        &mut self,
        now: i64,
        order: OrderId,
        read: Result<Option<StoredTail>, RelayError>,
    ) {
        if self.loading.contains_key(&order) || !self.docs.get(&order).is_some_and(|d| d.refreshing)
        {
            // The order left memory (or is being loaded afresh) meanwhile: nothing to add to.
            return;
        }
        self.refresh_step(now, order, |core| match read {
            Ok(Some(tail)) => match core.tail_completes(order, tail) {
                Some((meta, fresh)) => core.caught_up(now, order, meta, fresh),
                None => {
                    core.metrics.orders_reread_whole.inc();
                    core.outputs.push_back(Output::Load { order });
                }
            },
            Ok(None) => core.refreshed(now, order, Ok(None)),
            Err(e) => core.refreshed(now, order, Err(e)),
        });
    }

    /// One step of a refresh of `order`, with a panic contained (the order leaves memory and
    /// is loaded afresh on next use). Messages refused on the stale copy are judged again
    /// once the order is up to date (a failed read is retried first), or once it left memory
    /// (it is then loaded for them).
    fn refresh_step(&mut self, now: i64, order: OrderId, step: impl FnOnce(&mut Self)) {
        if let Err(why) = crdt_model::guard::contain(|| step(self)) {
            self.metrics
                .frame_panics
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!(%order, panic = %why, "reading an order again panicked; it is reloaded on next use");
            self.forget(order);
        }
        if !self
            .docs
            .get(&order)
            .is_some_and(|d| d.refreshing || d.is_stale())
        {
            self.judge_again(now, order);
        }
    }

    /// The changes of `tail` that `order`'s committed document lacks, if they are exactly
    /// what takes it to the stored heads (decoded through the guard; every dependency either
    /// held or among them). `None` sends the refresh to a whole read.
    fn tail_completes(
        &self,
        order: OrderId,
        tail: StoredTail,
    ) -> Option<(OrderMeta, Vec<automerge::Change>)> {
        let d = self.docs.get(&order)?;
        if tail.meta.tail_len < tail.from
            || tail.changes.len() != (tail.meta.tail_len - tail.from) as usize
        {
            return None;
        }
        let mut fresh = Vec::with_capacity(tail.changes.len());
        for bytes in &tail.changes {
            let change = crdt_model::guard::decode_change(bytes).ok()?;
            if !doc::holds(&d.committed, &change.hash()) {
                fresh.push(change);
            }
        }
        // The heads the committed document would have: its own and the new changes', less
        // every hash a new change depends on; each dependency must be held or new.
        let new: HashSet<automerge::ChangeHash> = fresh.iter().map(|c| c.hash()).collect();
        let mut heads: std::collections::BTreeSet<automerge::ChangeHash> =
            d.committed.get_heads().into_iter().collect();
        heads.extend(new.iter().copied());
        for c in &fresh {
            for dep in c.deps() {
                if !new.contains(dep) && !doc::holds(&d.committed, dep) {
                    return None;
                }
                heads.remove(dep);
            }
        }
        let stored: std::collections::BTreeSet<automerge::ChangeHash> = tail
            .meta
            .heads
            .iter()
            .map(|h| automerge::ChangeHash(*h))
            .collect();
        (heads == stored).then_some((tail.meta, fresh))
    }

    /// The answer to a refresh's load: the stored changes `committed` lacks are added to the
    /// committed and working documents and sent to the order's connections, then the waiting
    /// write (built again on the stored heads) goes out.
    fn refreshed(
        &mut self,
        now: i64,
        order: OrderId,
        loaded: Result<Option<StoredOrder>, RelayError>,
    ) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        d.refreshing = false;
        let never_stored = d.committed.get_heads().is_empty();
        let stored = match loaded {
            Ok(Some(s)) => s,
            Ok(None) if never_stored => {
                // A new order whose first write was refused with another one of its batch:
                // nothing to read, write it now.
                d.stale_unknown = false;
                d.stale_heads.clear();
                self.dispatch(now, order);
                return;
            }
            Ok(None) => {
                self.give_up(now, order, "the order is no longer stored".into());
                return;
            }
            Err(e) => {
                // Read again later; meanwhile nothing is written on old heads.
                tracing::warn!(%order, error = %e, "cannot read a changed order again; retrying");
                self.touch_retry.insert(order, now + TOUCH_RETRY_MS);
                return;
            }
        };
        let doc = match crdt_model::guard::load_with_increments(
            &stored.snapshot,
            stored.tail.iter().map(Vec::as_slice),
        ) {
            Ok(doc) => doc,
            Err(e) => {
                self.give_up(now, order, format!("the stored order does not load: {e}"));
                return;
            }
        };
        let before = d.committed.get_heads();
        // The store holds every change `committed` holds (it is what was stored), so the new
        // ones are the stored document's changes after `before`.
        if !before.iter().all(|h| doc::holds(&doc, h)) {
            self.give_up(
                now,
                order,
                "the stored order lacks changes this relay committed".into(),
            );
            return;
        }
        let fresh: Vec<automerge::Change> = doc.get_changes(&before);
        self.caught_up(now, order, stored.meta, fresh);
    }

    /// The end of a refresh: `fresh`, the stored changes the committed document lacked (up to
    /// the stored `meta`), are added to the committed and working documents and sent to the
    /// order's connections, then the waiting write (built again on the stored heads) goes out.
    fn caught_up(
        &mut self,
        now: i64,
        order: OrderId,
        meta: OrderMeta,
        fresh: Vec<automerge::Change>,
    ) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        d.refreshing = false;
        let before = d.committed.get_heads();
        // Through the guard: changes read from the store are bytes from outside.
        if let Err(e) = crdt_model::guard::apply_changes(&mut d.committed, fresh.clone()) {
            self.give_up(now, order, format!("stored changes do not apply: {e}"));
            return;
        }
        // `working` holds `committed` plus the accepted changes waiting: add the stored ones.
        let _ = d.working.apply_changes(fresh.iter().cloned());
        if !d.pending.is_empty() {
            d.pending.snapshot = Some(d.working.clone());
        }
        d.facts = crdt_model::OrderFacts::default();
        d.tail_len = meta.tail_len;
        let store = meta.store.clone();
        d.store = Some(store.clone());
        d.meta = Some(meta);
        // Connections of another store that asked for the order while it was unknown here
        // (it was being read again) learn nothing of it: answered as an absent order.
        let foreign: Vec<ConnId> = d
            .peers
            .keys()
            .filter(|c| {
                self.conns
                    .get(c)
                    .and_then(|i| i.store.as_ref())
                    .is_some_and(|s| *s != store)
            })
            .copied()
            .collect();
        d.stale_unknown = false;
        if !d.is_stale() {
            d.stale_heads.clear();
        }
        // A connection's chunks queued for a missing dependency must go through the policy
        // with its next message, never out with a reply built on the stored changes that may
        // have just supplied the dependency: its queue is dropped and its sync restarted
        // (Automerge's reset: the device forgets what it counted as sent, and sends it again).
        let mut freed = Vec::new();
        for (conn, pd) in &mut d.peers {
            if !pd.queued.is_empty() {
                // As after a failed write: a fresh state that keeps what the peer can do (a
                // reset needs it), marked so that the device forgets what it counted as sent.
                let caps = pd.state.their_capabilities.take();
                freed.push((*conn, pd.reset()));
                pd.state.their_capabilities = caps;
                pd.push_mode = false;
                pd.sent.clear();
                pd.state.needs_reset = true;
            }
        }
        for (conn, bytes) in freed {
            if let Some(info) = self.conns.get_mut(&conn) {
                info.queued_bytes = info.queued_bytes.saturating_sub(bytes);
            }
        }
        for conn in foreign {
            self.unfollow(conn, order);
            self.send(
                conn,
                RelayFrame::Unavailable {
                    order: order.to_string(),
                },
            );
        }
        tracing::debug!(%order, changes = fresh.len(), "read again after another relay's commit");
        self.fan_out(order, &before, &fresh);
        if self.touching.remove(&order) {
            self.ensure_number(now, order);
        }
        // Still behind (yet another commit came meanwhile): read again.
        self.refresh(now, order);
        self.dispatch(now, order);
    }

    /// Messages refused on a possibly stale copy of `order` are judged again, now that it was
    /// read again (a second refusal is sent to the device).
    fn judge_again(&mut self, now: i64, order: OrderId) {
        let Some(waiting) = self.after_refresh.remove(&order) else {
            return;
        };
        self.retrying = true;
        for (origin, msg) in waiting {
            if self.conns.contains_key(&origin.conn) {
                self.handle_incoming(now, origin, order, msg);
            }
        }
        self.retrying = false;
    }

    /// An order that cannot be read again: everyone waiting on its accepted changes is told
    /// they are not stored (their devices send them again), and it leaves memory (it is read
    /// fresh on next use).
    fn give_up(&mut self, now: i64, order: OrderId, why: String) {
        tracing::error!(%order, why = %why, "cannot bring the order up to date; dropped from memory");
        self.abandon(
            now,
            order,
            doc::Batch::default(),
            RelayError::Internal(format!("order {order}: {why}")),
        );
        self.forget(order);
    }

    /// A sync round with every connection following `order` (just loaded after another
    /// relay changed it): each learns what the relay holds and asks for what it lacks.
    fn announce_to_followers(&mut self, order: OrderId) {
        let Some(d) = self.docs.get_mut(&order) else {
            return;
        };
        let mut rounds = Vec::new();
        for (conn, pd) in &mut d.peers {
            if let Ok(Some(m)) = crdt_model::guard::contain(|| pd.generate(&d.committed)) {
                rounds.push((*conn, m));
            }
        }
        rounds.sort_by_key(|(conn, _)| *conn);
        for (conn, m) in rounds {
            self.send_sync(conn, order, m);
        }
    }

    /// Whether `order` is in memory (and marks it used).
    fn loaded(&mut self, order: OrderId) -> bool {
        self.tick += 1;
        match self.docs.get_mut(&order) {
            Some(d) => {
                d.last_used = self.tick;
                true
            }
            None => false,
        }
    }

    /// Keeps `parked` until `order` is loaded, asking for the load once.
    fn park(&mut self, order: OrderId, parked: Parked) {
        if !self.loading.contains_key(&order) {
            self.outputs.push_back(Output::Load { order });
        }
        self.loading.entry(order).or_default().push(parked);
    }

    /// Drops idle orders (nothing being committed, nothing queued) beyond the capacity, oldest
    /// first.
    fn evict_if_full(&mut self) {
        let capacity = self.config.capacity.max(1);
        if self.docs.len() < capacity {
            return;
        }
        let mut idle: Vec<(u64, OrderId)> = self
            .docs
            .iter()
            // Changes queued for a missing dependency live in the order's peers: an order
            // holding some stays until they apply or their connection goes.
            .filter(|(_, d)| !d.busy() && d.peers.values().all(|p| p.queued.is_empty()))
            .map(|(id, d)| (d.last_used, *id))
            .collect();
        idle.sort_unstable();
        let drop_n = (self.docs.len() + 1)
            .saturating_sub(capacity)
            .max(capacity / 10)
            .min(idle.len());
        for (_, id) in idle.into_iter().take(drop_n) {
            self.forget(id);
        }
    }

    /// Drops an order from memory; its followers stay registered.
    fn forget(&mut self, order: OrderId) {
        if let Some(d) = self.docs.remove(&order) {
            let in_flight = d.inflight.iter().chain(std::iter::once(&d.pending));
            let waiting: usize = in_flight.map(|b| b.origins.len()).sum();
            self.metrics
                .receipts_pending
                .fetch_sub(waiting as i64, std::sync::atomic::Ordering::Relaxed);
            for b in d.inflight.into_iter().chain(std::iter::once(d.pending)) {
                for request in b.requests {
                    let e = format!("order {order} was dropped after an internal error");
                    self.answer(request, Err(RelayError::Internal(e)));
                }
            }
            for (conn, pd) in d.peers {
                if let Some(info) = self.conns.get_mut(&conn) {
                    info.queued_bytes = info.queued_bytes.saturating_sub(pd.queued_bytes);
                }
            }
            self.metrics
                .orders_in_memory
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn answer(&mut self, request: RequestId, result: Result<OrderView, RelayError>) {
        self.outputs.push_back(Output::Reply {
            request,
            result: Box::new(result),
        });
    }

    fn send(&mut self, conn: ConnId, frame: RelayFrame) {
        self.outputs.push_back(Output::Send { conn, frame });
    }

    fn send_sync(&mut self, conn: ConnId, order: OrderId, m: sync::Message) {
        self.send(
            conn,
            RelayFrame::Sync {
                order: order.to_string(),
                data: ByteBuf::from(m.encode()),
            },
        );
    }

    /// Registers `conn` as following `order`.
    fn follow(&mut self, conn: ConnId, order: OrderId) {
        self.conns.entry(conn).or_default().orders.insert(order);
        self.followers.entry(order).or_default().insert(conn);
    }

    /// Forgets `conn`'s sync state for `order` (after a panic or a limit).
    fn unfollow(&mut self, conn: ConnId, order: OrderId) {
        let queued = self
            .docs
            .get_mut(&order)
            .and_then(|d| d.peers.remove(&conn))
            .map_or(0, |pd| pd.queued_bytes);
        if let Some(info) = self.conns.get_mut(&conn) {
            info.orders.remove(&order);
            info.queued_bytes = info.queued_bytes.saturating_sub(queued);
        }
        if let Some(f) = self.followers.get_mut(&order) {
            f.remove(&conn);
            if f.is_empty() {
                self.followers.remove(&order);
            }
        }
    }

    /// The stored metadata of an order in memory.
    pub fn meta(&self, order: OrderId) -> Option<&OrderMeta> {
        self.docs.get(&order).and_then(|d| d.meta.as_ref())
    }

    /// The entry a stored order has in its store's feed, with the relay's voucher.
    pub fn feed_entry(&self, meta: &OrderMeta) -> FeedEntry {
        feed_entry(meta, &self.seal.key)
    }
}

/// Feed entry for stored order metadata, vouched for with the relay's key `seal`.
pub fn feed_entry(meta: &OrderMeta, seal: &SealKey) -> FeedEntry {
    let heads: Vec<automerge::ChangeHash> = meta
        .heads
        .iter()
        .map(|h| automerge::ChangeHash(*h))
        .collect();
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
        voucher: Some(ByteBuf::from(seal.vouch(meta.order, &heads).to_vec())),
    }
}
