//! The sans-IO sync engine: every order on the device, its sync state with the relay, its local
//! sync status, and the connection's lifecycle — driven by inputs, answered with effects.
//!
//! Shape (after quinn-proto and samod-core): the caller feeds inputs (`handle_*`, and the local
//! operations), passing the time in; the engine queues what must happen next, which the caller
//! drains in this order:
//!
//! 1. [`Engine::poll_effect`]: storage writes (and connect requests). The caller performs each
//!    durably before going on;
//! 2. [`Engine::poll_transmit`]: frames for the relay. Draining effects first is what makes a
//!    change durable on the device before it is advertised to anyone;
//! 3. [`Engine::poll_event`]: notifications for the app.
//!
//! [`Engine::poll_timeout`] says when to call [`Engine::handle_timeout`] next (reconnect backoff,
//! retention of settled orders). Nothing here reads a clock, a socket, a file or the OS random
//! source, so simulations are deterministic.
//!
//! The engine also decides which of the device's relays ([`Identity::relay_urls`]) each
//! connection attempt goes to ([`Engine::relay_url`]): a failed attempt or a dropped connection
//! moves to the next one promptly, and the backoff grows only when the whole list has failed
//! (the rule is spelled out in the `reconnect` module, `core/reconnect.rs`).
//!
//! Local operations (create, edit, record updates, triggers, fetch) can be bracketed by
//! [`Engine::begin`] and [`Engine::commit`]: when their storage effects cannot be made durable,
//! [`Engine::rollback`] puts the touched orders (document, record, status, sync state) and the
//! output queues back as they were before them, so that an error means the operation did not
//! happen.

use std::collections::{BTreeMap, VecDeque};

use automerge::sync;
use automerge::{Automerge, ChangeHash, ReadDoc};
use crdt_model::guard;
use crdt_model::wire::{
    ClientFrame, FeedEntry, RelayFrame, Version, Voucher, codes, heads_from_wire,
};
use crdt_model::{
    Currency, Entropy, ModelError, NewOrder, Order, OrderId, OrderNumber, OrderStatus, OrderView,
    SplitMix64, Timestamp, Writer,
};
use serde_bytes::ByteBuf;

use crate::error::ReplicatorError;
use crate::status::{LocalSyncStatus, Trigger};
use crate::store::{Blocked, Identity, OrderRecord, StoredOrder};

mod reconnect;

use reconnect::Dialer;

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Shortest reconnect delay, ms: after a dropped connection, and between the relays of one
    /// round of the relay list, the device waits a jittered half to whole of it.
    pub backoff_min_ms: i64,
    /// Longest reconnect delay, ms: the cap of the backoff that doubles per failed round of the
    /// relay list, and the wait after the relay refused the device's token.
    pub backoff_max_ms: i64,
    /// How long a closed, synced order stays on the device before it is evicted, ms.
    pub retention_ms: i64,
    /// `storage_error` answers in a row before pending orders are marked Failed.
    pub storage_error_limit: u32,
    /// Tail changes per order before the local copy is compacted.
    pub compact_every: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            backoff_min_ms: 250,
            backoff_max_ms: 30_000,
            retention_ms: 24 * 3600 * 1000,
            storage_error_limit: 3,
            compact_every: 128,
        }
    }
}

/// A storage write (or connection request) the driver must perform, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Append changes to an order's tail and write its record.
    Append {
        /// The order.
        order: OrderId,
        /// Raw change bytes.
        changes: Vec<Vec<u8>>,
        /// Its record after the change.
        record: OrderRecord,
    },
    /// Write an order's record only.
    Record {
        /// The order.
        order: OrderId,
        /// The record.
        record: OrderRecord,
    },
    /// Replace an order's snapshot and tail with a full save.
    Compact {
        /// The order.
        order: OrderId,
        /// `save()` bytes.
        snapshot: Vec<u8>,
        /// The record.
        record: OrderRecord,
    },
    /// Remove an order from the device (retention passed).
    Remove {
        /// The order.
        order: OrderId,
    },
    /// Remember the store feed position.
    FeedSeq(u64),
    /// Record the relay data id seen in `welcome` ([`crate::Store::set_relay_data`]).
    RelayData(String),
    /// Open the connection to the relay now, to [`Engine::relay_url`].
    Connect,
}

/// Something the app may want to show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The order's content changed (locally or from the relay).
    OrderChanged(OrderId),
    /// The order's local sync status changed.
    SyncStatusChanged {
        /// The order.
        order: OrderId,
        /// The new status.
        status: LocalSyncStatus,
    },
    /// The relay's number reached the order.
    NumberAssigned {
        /// The order.
        order: OrderId,
        /// Its number.
        number: OrderNumber,
    },
    /// The relay refused the order's changes.
    Rejected {
        /// The order.
        order: OrderId,
        /// Reason code.
        code: String,
        /// Reason.
        message: String,
    },
    /// An order created elsewhere is now on this device.
    OrderArrived(OrderId),
    /// The relay answered.
    Connected,
    /// The connection is down; changes wait on the device.
    Disconnected,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Link {
    /// No connection; the next attempt is due at `retry_at` (ms).
    Offline {
        retry_at: i64,
    },
    Connecting,
    Handshaking,
    Online,
}

/// An order's document. It becomes a typed [`Order`] at its first local edit and stays one, so
/// the model's per-order caches (status, lines, parse; valid while the heads match) survive
/// from one edit to the next instead of being rebuilt around the bare document every time.
enum Held {
    Raw(Box<Automerge>),
    Typed(Box<Order>),
}

impl Held {
    fn doc(&self) -> &Automerge {
        match self {
            Held::Raw(d) => d,
            Held::Typed(o) => o.doc(),
        }
    }

    /// For merges and sync messages; the typed order notices through its heads.
    fn doc_mut(&mut self) -> &mut Automerge {
        match self {
            Held::Raw(d) => d,
            Held::Typed(o) => o.doc_mut(),
        }
    }

    /// The typed order, parsed from the document on first use.
    fn typed(&mut self, writer: &Writer) -> Result<&mut Order, ModelError> {
        if let Held::Raw(d) = self {
            match Order::try_from_doc(std::mem::take(&mut **d), writer.clone()) {
                Ok(o) => *self = Held::Typed(Box::new(o)),
                Err(back) => {
                    let (doc, e) = *back;
                    **d = doc;
                    return Err(e);
                }
            }
        }
        match self {
            Held::Typed(o) => Ok(o),
            // Just made typed above.
            Held::Raw(_) => Err(ModelError::NotAnOrder("order not parsed".into())),
        }
    }
}

/// A feed entry whose order has not caught up: its position, heads and the relay's voucher.
type FeedWait = (u64, Vec<ChangeHash>, Option<[u8; 32]>);

struct Slot {
    held: Held,
    /// `record.receipted` holds the heads the relay is known to hold durably: receipts, and
    /// changes that came from the relay (it sends only what it committed).
    record: OrderRecord,
    /// Heads the relay holds or was sent on this connection: the next push starts after them.
    pushed: Vec<ChangeHash>,
    sync: sync::State,
    /// Subscribed on the current connection (a push or a sync message was sent since it opened).
    subscribed: bool,
    fetching: bool,
    tail_len: usize,
    number: Option<OrderNumber>,
}

/// The device's sync engine. See the module docs.
pub struct Engine {
    identity: Identity,
    writer: Writer,
    config: EngineConfig,
    orders: BTreeMap<OrderId, Slot>,
    removed: BTreeMap<OrderId, i64>,
    link: Link,
    /// The relay list, and which relay the current or next connection attempt goes to.
    dialer: Dialer,
    outbox: VecDeque<ClientFrame>,
    effects: VecDeque<Effect>,
    events: VecDeque<Event>,
    /// The feed position stored on the device: every entry up to it is handled.
    feed_seq: u64,
    /// The highest feed position seen on this connection.
    feed_seen: u64,
    /// Orders the feed said were behind whose catch-up has not finished: their entry's
    /// position and heads. The stored position stays below them, so a cut connection or a
    /// crash brings their entries again.
    feed_waiting: BTreeMap<OrderId, FeedWait>,
    storage_errors: u32,
    /// The relay data's id last seen in `welcome` (stored): another id means the relay was
    /// restored from a backup.
    relay_data: Option<String>,
    rng: SplitMix64,
    /// Set between [`Engine::begin`] and [`Engine::commit`] / [`Engine::rollback`].
    undo: Option<Undo>,
}

/// What [`Engine::rollback`] restores: the lengths of the output queues when the local
/// operation began, and each order it touched as it was before it touched it.
struct Undo {
    outbox: usize,
    effects: usize,
    events: usize,
    orders: BTreeMap<OrderId, Touched>,
}

/// One order before a local operation touched it.
struct Touched {
    /// `None`: the order was not on the device (created or fetched by the operation).
    slot: Option<Before>,
    /// The order's eviction time, if it had been evicted.
    removed: Option<i64>,
}

/// A slot's state, minus its document, which is rebuilt from `heads` if it changed.
struct Before {
    heads: Vec<ChangeHash>,
    record: OrderRecord,
    pushed: Vec<ChangeHash>,
    sync: sync::State,
    subscribed: bool,
    fetching: bool,
    tail_len: usize,
    number: Option<OrderNumber>,
}

fn to_hashes(h: &[[u8; 32]]) -> Vec<ChangeHash> {
    h.iter().map(|b| ChangeHash(*b)).collect()
}

fn from_hashes(h: &[ChangeHash]) -> Vec<[u8; 32]> {
    h.iter().map(|c| c.0).collect()
}

/// The changes a local edit just made, and the heads it made them on.
struct Fresh {
    after: Vec<ChangeHash>,
    changes: Vec<Vec<u8>>,
}

/// `set` (heads) after `new` changes joined it: their hashes are added, and whatever they
/// depend on is no longer a head. Not always minimal (an older head may stay), which is
/// harmless: the set is only used as `have_deps`.
fn advance(set: &mut Vec<ChangeHash>, new: &[automerge::Change]) {
    for c in new {
        set.retain(|h| !c.deps().contains(h));
    }
    for c in new {
        let h = c.hash();
        if !set.contains(&h) && !new.iter().any(|o| o.deps().contains(&h)) {
            set.push(h);
        }
    }
}

/// Changes that came from the relay: it holds them durably (it sends only what it committed),
/// so they are neither pushed back nor waited for.
fn learned(slot: &mut Slot, new: &[automerge::Change]) {
    if new.is_empty() {
        return;
    }
    let mut known = to_hashes(&slot.record.receipted);
    advance(&mut known, new);
    slot.record.receipted = from_hashes(&known);
    advance(&mut slot.pushed, new);
}

impl Engine {
    /// An engine for `identity`, holding the orders the store had. `seed` feeds the backoff
    /// jitter.
    pub fn new(
        identity: Identity,
        stored: Vec<StoredOrder>,
        feed_seq: u64,
        config: EngineConfig,
        seed: u64,
    ) -> Result<Self, ReplicatorError> {
        let writer = Writer::new(identity.device, identity.epoch);
        let mut orders = BTreeMap::new();
        for s in stored {
            // Stored bytes are foreign to Automerge too: a damaged file must not panic here.
            let doc = guard::load_with_increments(&s.snapshot, s.tail.iter().map(Vec::as_slice))
                .map_err(|e| ReplicatorError::Corrupt(format!("order {}: {e}", s.order)))?
                .with_actor(writer.actor.clone());
            let number = crdt_model::number_of(&doc).ok().flatten();
            orders.insert(
                s.order,
                Slot {
                    fetching: doc.get_heads().is_empty(),
                    held: Held::Raw(Box::new(doc)),
                    tail_len: s.tail.len(),
                    pushed: to_hashes(&s.record.receipted),
                    record: s.record,
                    sync: sync::State::new(),
                    subscribed: false,
                    number,
                },
            );
        }
        let dialer = Dialer::new(identity.relay_urls());
        Ok(Self {
            identity,
            writer,
            config,
            orders,
            removed: BTreeMap::new(),
            link: Link::Offline { retry_at: 0 },
            dialer,
            outbox: VecDeque::new(),
            effects: VecDeque::new(),
            events: VecDeque::new(),
            feed_seq,
            feed_seen: feed_seq,
            feed_waiting: BTreeMap::new(),
            storage_errors: 0,
            relay_data: None,
            rng: SplitMix64::new(seed),
            undo: None,
        })
    }

    /// The engine knowing the relay data id it last synced with (from
    /// [`crate::Store::relay_data`]), so a relay restored from a backup is noticed.
    #[must_use]
    pub fn with_relay_data(mut self, data: Option<String>) -> Self {
        self.relay_data = data;
        self
    }

    /// The relay data id last seen (see [`Engine::with_relay_data`]).
    pub fn relay_data(&self) -> Option<&str> {
        self.relay_data.as_deref()
    }

    /// The highest order number this device holds.
    pub fn highest_number(&self) -> Option<u64> {
        self.orders
            .values()
            .filter_map(|s| s.number)
            .map(|n| n.0)
            .max()
    }

    /// The device identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The URL of the relay the current connection attempt goes to (or the next one, while
    /// offline): connect there on [`Effect::Connect`]. It starts at [`Identity::relay_url`],
    /// moves to the next URL of [`Identity::relay_urls`] (wrapping around) whenever an attempt
    /// fails or an established connection drops, and stays on a relay that answered.
    pub fn relay_url(&self) -> &str {
        self.dialer.url()
    }

    /// The index of [`Self::relay_url`] in [`Self::relay_urls`].
    pub fn relay_index(&self) -> usize {
        self.dialer.index()
    }

    /// Every relay URL of the device, in the order they are tried ([`Identity::relay_urls`]).
    pub fn relay_urls(&self) -> &[String] {
        self.dialer.urls()
    }

    /// Connection attempts failed in a row since the relay last answered `welcome` (or since
    /// the engine started). The backoff doubles each time it completes a round of
    /// [`Self::relay_urls`].
    pub fn failed_attempts(&self) -> u32 {
        self.dialer.failures()
    }

    /// Whether the relay connection is up (welcome received).
    pub fn is_online(&self) -> bool {
        self.link == Link::Online
    }

    /// Whether the engine is offline (not connected, not connecting): a socket still open
    /// should be closed.
    pub fn is_offline(&self) -> bool {
        matches!(self.link, Link::Offline { .. })
    }

    // ----- outputs -------------------------------------------------------------------------

    /// Next storage write or connect request. Perform it before draining transmits.
    #[must_use]
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Next frame to send to the relay.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<ClientFrame> {
        self.outbox.pop_front()
    }

    /// Next app notification.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Self::handle_timeout`] should run next (ms), if ever.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<i64> {
        let reconnect = match self.link {
            Link::Offline { retry_at, .. } => Some(retry_at),
            _ => None,
        };
        let evict = self
            .orders
            .values()
            .filter(|s| s.record.status == LocalSyncStatus::Synced)
            .filter_map(|s| s.record.settled_at)
            .min()
            .map(|t| t + self.config.retention_ms);
        match (reconnect, evict) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- connection lifecycle ---------------------------------------------------------------

    /// Time passed: reconnects when the backoff expires, evicts settled orders past retention.
    pub fn handle_timeout(&mut self, now: i64) {
        if let Link::Offline { retry_at, .. } = self.link
            && now >= retry_at
        {
            self.link = Link::Connecting;
            self.effects.push_back(Effect::Connect);
        }
        let due: Vec<OrderId> = self
            .orders
            .iter()
            .filter(|(_, s)| s.record.status == LocalSyncStatus::Synced)
            .filter(|(_, s)| {
                s.record
                    .settled_at
                    .is_some_and(|t| t + self.config.retention_ms <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.orders.remove(&id);
            self.removed.insert(id, now);
            self.effects.push_back(Effect::Remove { order: id });
            self.events.push_back(Event::SyncStatusChanged {
                order: id,
                status: LocalSyncStatus::Removed,
            });
        }
    }

    /// The socket is open: say hello.
    pub fn handle_connected(&mut self, _now: i64) {
        self.link = Link::Handshaking;
        self.outbox.clear();
        self.outbox.push_back(ClientFrame::Hello {
            protocol: Version::CURRENT,
            device: self.identity.device.to_string(),
            agent: concat!("replicator/", env!("CARGO_PKG_VERSION")).to_owned(),
            feed_since: self.feed_seq,
            highest_number: self.highest_number(),
        });
    }

    /// The connection attempt failed, or the connection dropped: the next attempt goes to the
    /// next relay of the list ([`Self::relay_url`]) after a jittered backoff: the shortest
    /// after a drop and while the current round of the list has relays left to try, doubled
    /// per round once every relay of the list has failed (see [`EngineConfig`]). Orders with
    /// pending changes become Delayed.
    ///
    /// Called while already offline (no attempt in flight), it keeps the scheduled attempt and
    /// its relay: nothing failed, so nothing moves on.
    pub fn handle_disconnected(&mut self, now: i64) {
        let retry_at = match self.link {
            Link::Offline { retry_at } => retry_at,
            Link::Connecting | Link::Handshaking => {
                now + self.dialer.failed(&self.config, &mut self.rng)
            }
            Link::Online => now + self.dialer.dropped(&self.config, &mut self.rng),
        };
        self.go_offline(now, retry_at);
    }

    /// Closes the link (the attempt is due at `retry_at`) and puts every order's sync state
    /// back to "nothing sent on this connection".
    fn go_offline(&mut self, now: i64, retry_at: i64) {
        let was_online = self.link == Link::Online;
        self.link = Link::Offline { retry_at };
        self.outbox.clear();
        self.feed_seen = self.feed_seq;
        self.feed_waiting.clear();
        if was_online {
            self.events.push_back(Event::Disconnected);
        }
        let ids: Vec<OrderId> = self.orders.keys().copied().collect();
        for id in ids {
            if let Some(s) = self.orders.get_mut(&id) {
                s.sync = sync::State::new();
                s.subscribed = false;
                s.pushed = to_hashes(&s.record.receipted);
            }
            self.transition(id, Trigger::Offline, now);
        }
    }

    /// The relay refused this device's token (`revoked`, `unauthorized`), at the upgrade or by
    /// closing the connection: orders with unsent changes become Blocked with that reason
    /// (not merely Delayed), and the next attempt waits the longest backoff.
    pub fn handle_refused(&mut self, code: &str, message: &str, now: i64) {
        let ids: Vec<OrderId> = self
            .orders
            .iter()
            .filter(|(_, s)| {
                s.record.status.next(Trigger::TokenRefused) == Some(LocalSyncStatus::Blocked)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(slot) = self.orders.get_mut(&id) {
                slot.record.blocked = Some(Blocked {
                    code: code.to_owned(),
                    message: message.to_owned(),
                    changes: Vec::new(),
                });
            }
            self.events.push_back(Event::Rejected {
                order: id,
                code: code.to_owned(),
                message: message.to_owned(),
            });
            self.transition(id, Trigger::TokenRefused, now);
        }
        // The next relay is tried, but no sooner than the longest backoff: a revoked token is
        // revoked on every relay of the list.
        self.handle_disconnected(now);
        self.link = Link::Offline {
            retry_at: now + self.config.backoff_max_ms,
        };
    }

    /// One frame from the relay.
    pub fn handle_frame(&mut self, frame: RelayFrame, now: i64) {
        match frame {
            RelayFrame::Welcome { data, .. } => {
                if let Some(data) = data
                    && self.relay_data.as_deref() != Some(data.as_str())
                {
                    // The reset is queued before the new id, so a crash between the two
                    // finds the old id and resets again.
                    let restored = self.relay_data.is_some();
                    if restored {
                        self.relay_restored(now);
                    }
                    self.relay_data = Some(data.clone());
                    self.effects.push_back(Effect::RelayData(data));
                    if restored {
                        return;
                    }
                }
                self.on_welcome(now);
            }
            RelayFrame::Sync { order, data } => {
                if let Err(e) = self.handle_sync(&order, &data, now) {
                    tracing::warn!(%order, error = %e, "sync message refused");
                }
            }
            RelayFrame::Changes {
                order,
                changes,
                heads,
                voucher,
            } => {
                if let Err(e) = self.handle_changes(&order, &changes, now) {
                    tracing::warn!(%order, error = %e, "changes from the relay refused");
                } else {
                    self.voucher_with_changes(
                        &order,
                        &heads,
                        voucher.as_ref().map(|v| v.as_slice()),
                    );
                }
            }
            RelayFrame::Receipt {
                order,
                heads,
                voucher,
            } => self.on_receipt(&order, &heads, voucher.as_ref().map(|v| v.as_slice()), now),
            RelayFrame::Rejected {
                order,
                code,
                message,
                changes,
            } => self.on_rejected(&order, code, message, &changes, now),
            RelayFrame::Feed { entries } => self.on_feed(entries, now),
            RelayFrame::Unavailable { order } => self.on_unavailable(&order, now),
            RelayFrame::Error {
                code,
                message,
                fatal,
            } => {
                tracing::warn!(%code, %message, fatal, "relay error");
                if code == codes::REVOKED || code == codes::UNAUTHORIZED {
                    return self.handle_refused(&code, &message, now);
                }
                if code == codes::STORAGE {
                    self.storage_errors += 1;
                    if self.storage_errors >= self.config.storage_error_limit {
                        let ids: Vec<OrderId> = self.orders.keys().copied().collect();
                        for id in ids {
                            self.transition(id, Trigger::StorageErrors, now);
                        }
                    }
                }
                if fatal {
                    self.handle_disconnected(now);
                }
            }
            RelayFrame::Ping { nonce } => self.outbox.push_back(ClientFrame::Pong { nonce }),
            RelayFrame::Pong { .. } => {}
            RelayFrame::Bye => self.handle_disconnected(now),
        }
    }

    /// The relay's data is not what this device synced with: it was restored from a backup,
    /// and receipts it gave may name changes it lost. Every order pushes everything again
    /// (the relay takes what it lacks and ignores the rest; its own changes come back sealed),
    /// the feed is read from the start, and the device reconnects at once so its hello says
    /// so. All of it is written in the same flush as the new data id.
    fn relay_restored(&mut self, now: i64) {
        tracing::warn!("the relay's data was restored from a backup: sending every order again");
        let ids: Vec<OrderId> = self.orders.keys().copied().collect();
        for id in ids {
            if let Some(slot) = self.orders.get_mut(&id) {
                slot.record.receipted.clear();
                slot.pushed.clear();
                slot.sync = sync::State::new();
                slot.subscribed = false;
                self.effects.push_back(Effect::Record {
                    order: id,
                    record: slot.record.clone(),
                });
            }
            self.transition(id, Trigger::RelayRestored, now);
        }
        self.feed_waiting.clear();
        self.feed_seq = 0;
        self.feed_seen = 0;
        self.effects.push_back(Effect::FeedSeq(0));
        // Reconnect without waiting, to the same relay: it is there (it just answered).
        self.dialer.established();
        self.go_offline(now, now);
    }

    fn on_welcome(&mut self, now: i64) {
        self.link = Link::Online;
        self.dialer.established();
        self.storage_errors = 0;
        self.events.push_back(Event::Connected);
        let ids: Vec<OrderId> = self.orders.keys().copied().collect();
        for id in ids {
            self.transition(id, Trigger::Reconnected, now);
            // A reconnect costs what is unreceipted, not what the device holds: orders with
            // changes the relay has not acknowledged push them, fetches start over, and the
            // rest learn what changed elsewhere from the store feed (which resumes before any
            // order whose catch-up was cut, see `on_feed`).
            let Some(slot) = self.orders.get(&id) else {
                continue;
            };
            if slot.fetching {
                self.send_sync(id);
            } else if slot.record.status != LocalSyncStatus::Synced {
                self.push(id, true);
            }
        }
    }

    /// One sync message from the relay for `order` (what [`Self::handle_frame`] does with a
    /// `Sync` frame, with the outcome returned). A message for an order not on the device is
    /// ignored. A message that does not decode or that Automerge cannot take
    /// ([`crdt_model::guard`]) leaves the order's document as it was and is refused with the
    /// model's error; the order's sync with the relay starts over (a fresh sync state, and a
    /// new message to the relay), and the rest of the engine is untouched.
    pub fn handle_sync(
        &mut self,
        order: &str,
        data: &[u8],
        now: i64,
    ) -> Result<(), ReplicatorError> {
        let id = order
            .parse::<OrderId>()
            .map_err(|e| ReplicatorError::Invalid(format!("sync for order {order:?}: {e}")))?;
        let Some(slot) = self.orders.get_mut(&id) else {
            return Ok(());
        };
        let received = guard::decode_sync_message(data)
            .and_then(|msg| guard::receive_sync_message(slot.held.doc_mut(), &mut slot.sync, msg));
        let new: Vec<Vec<u8>> = match received {
            Ok(changes) => {
                learned(slot, &changes);
                changes.iter().map(|c| c.raw_bytes().to_vec()).collect()
            }
            Err(e) => {
                slot.sync = sync::State::new();
                self.send_sync(id);
                return Err(e.into());
            }
        };
        if !new.is_empty() {
            self.received(id, new, now);
        }
        self.send_sync(id);
        Ok(())
    }

    /// Changes from the relay, applied to `id`: stored, announced, and their consequences (a
    /// fetched order arrived, a number, Synced, a feed entry handled).
    fn received(&mut self, id: OrderId, new: Vec<Vec<u8>>, now: i64) {
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        let arrived = slot.fetching && crdt_model::store_of(slot.held.doc()).is_ok();
        if arrived {
            slot.fetching = false;
            self.events.push_back(Event::OrderArrived(id));
        }
        self.persist(id, new);
        self.events.push_back(Event::OrderChanged(id));
        self.refresh_number(id);
        self.transition(id, Trigger::RemoteChange, now);
        self.check_covered(id, now);
        self.feed_caught_up(id);
    }

    /// Committed changes the relay forwarded for `order` (protocol 2). They are applied as
    /// they are; if one lacks a dependency (this device missed a change), a sync round with the
    /// relay fetches what is missing. A change that does not decode or apply leaves the order
    /// as it was and starts a sync round instead.
    pub fn handle_changes(
        &mut self,
        order: &str,
        changes: &[ByteBuf],
        now: i64,
    ) -> Result<(), ReplicatorError> {
        let id = order
            .parse::<OrderId>()
            .map_err(|e| ReplicatorError::Invalid(format!("changes for order {order:?}: {e}")))?;
        let Some(slot) = self.orders.get_mut(&id) else {
            return Ok(());
        };
        let applied = changes
            .iter()
            .map(|c| guard::decode_change(c))
            .collect::<Result<Vec<_>, _>>()
            .and_then(|decoded| guard::apply_changes(slot.held.doc_mut(), decoded));
        let new = match applied {
            Ok(new) => new,
            Err(e) => {
                slot.sync = sync::State::new();
                self.send_sync(id);
                return Err(e.into());
            }
        };
        let gap = !slot.held.doc().get_missing_deps(&[]).is_empty();
        if !new.is_empty() {
            learned(slot, &new);
            self.received(
                id,
                new.iter().map(|c| c.raw_bytes().to_vec()).collect(),
                now,
            );
        }
        if gap {
            self.send_sync(id);
        }
        Ok(())
    }

    fn on_receipt(&mut self, order: &str, heads: &[ByteBuf], voucher: Option<&[u8]>, now: i64) {
        let Ok(id) = order.parse::<OrderId>() else {
            return;
        };
        let Ok(heads) = heads_from_wire(heads) else {
            return;
        };
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        if !heads
            .iter()
            .all(|h| slot.held.doc().get_change_meta_by_hash(h).is_some())
        {
            // Heads this device no longer holds (an edit undone after it was announced).
            tracing::debug!(%id, "receipt for heads not held; ignored");
            return;
        }
        // The receipt names heads this device announced: they cover everything it had then.
        // Changes from the relay that arrived since stay known.
        let later: std::collections::HashSet<ChangeHash> = slot
            .held
            .doc()
            .get_changes_meta(&heads)
            .iter()
            .map(|m| m.hash)
            .collect();
        let vouched = heads.clone();
        let mut known = heads;
        for h in to_hashes(&slot.record.receipted) {
            if later.contains(&h) && !known.contains(&h) {
                known.push(h);
            }
        }
        slot.record.receipted = from_hashes(&known);
        // The relay's voucher for the receipted heads (protocol 2.1): this device holds them,
        // so it can deliver every change under them after a restore of the relay.
        if let Some(tag) = voucher.and_then(|v| <[u8; 32]>::try_from(v).ok()) {
            self.keep_voucher(id, &vouched, tag);
        }
        self.storage_errors = 0;
        self.check_covered(id, now);
    }

    /// Synced exactly when the last receipt covers every local change.
    fn check_covered(&mut self, id: OrderId, now: i64) {
        let Some(slot) = self.orders.get(&id) else {
            return;
        };
        let receipted = to_hashes(&slot.record.receipted);
        if receipted.is_empty()
            || !receipted
                .iter()
                .all(|h| slot.held.doc().get_change_by_hash(h).is_some())
        {
            return;
        }
        let mine = slot
            .held
            .doc()
            .get_changes(&receipted)
            .iter()
            .any(|c| c.actor_id() == &self.writer.actor);
        if !mine && !slot.record.status.eq(&LocalSyncStatus::Synced) {
            self.transition(id, Trigger::ReceiptCovers, now);
        }
    }

    fn on_rejected(
        &mut self,
        order: &str,
        code: String,
        message: String,
        changes: &[ByteBuf],
        now: i64,
    ) {
        let Ok(id) = order.parse::<OrderId>() else {
            return;
        };
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        slot.sync = sync::State::new();
        slot.record.blocked = Some(Blocked {
            code: code.clone(),
            message: message.clone(),
            changes: changes
                .iter()
                .filter_map(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                .collect(),
        });
        self.events.push_back(Event::Rejected {
            order: id,
            code,
            message,
        });
        self.transition(id, Trigger::RelayRejected, now);
        // A Blocked order does not wait for its feed entry any more.
        self.advance_feed();
    }

    fn on_unavailable(&mut self, order: &str, now: i64) {
        let Ok(id) = order.parse::<OrderId>() else {
            return;
        };
        let Some(slot) = self.orders.get(&id) else {
            return;
        };
        if slot.fetching {
            self.orders.remove(&id);
            self.effects.push_back(Effect::Remove { order: id });
            return;
        }
        self.on_rejected(
            order,
            "unavailable".into(),
            "the relay does not serve this order to this device".into(),
            &[],
            now,
        );
    }

    fn on_feed(&mut self, entries: Vec<FeedEntry>, now: i64) {
        for e in entries {
            self.feed_seen = self.feed_seen.max(e.seq);
            let Ok(id) = e.order.parse::<OrderId>() else {
                continue;
            };
            let terminal = e
                .status
                .parse::<OrderStatus>()
                .map(OrderStatus::is_terminal)
                .unwrap_or(false);
            let tag: Option<[u8; 32]> = e
                .voucher
                .as_ref()
                .and_then(|t| <[u8; 32]>::try_from(t.as_slice()).ok());
            match self.orders.get(&id) {
                Some(slot) => {
                    let theirs = heads_from_wire(&e.heads).unwrap_or_default();
                    let behind = theirs
                        .iter()
                        .any(|h| slot.held.doc().get_change_meta_by_hash(h).is_none());
                    if behind && slot.record.status != LocalSyncStatus::Blocked {
                        let subscribed = slot.subscribed;
                        let seq = self.feed_waiting.get(&id).map_or(e.seq, |w| w.0.min(e.seq));
                        self.feed_waiting.insert(id, (seq, theirs, tag));
                        if !subscribed {
                            self.send_sync(id);
                        }
                    } else if !behind && let Some(tag) = tag {
                        self.keep_voucher(id, &theirs, tag);
                    }
                }
                None if !terminal && !self.removed.contains_key(&id) => {
                    self.start_fetch(id, now);
                }
                None => {}
            }
        }
        self.advance_feed();
    }

    /// Stores the feed position up to the first entry whose order has not caught up.
    fn advance_feed(&mut self) {
        let orders = &self.orders;
        // An order that left the device or is Blocked will not catch up through the feed.
        self.feed_waiting.retain(|id, _| {
            orders
                .get(id)
                .is_some_and(|s| s.record.status != LocalSyncStatus::Blocked)
        });
        let safe = match self.feed_waiting.values().map(|w| w.0).min() {
            Some(first) => first.saturating_sub(1),
            None => self.feed_seen,
        };
        if safe > self.feed_seq {
            self.feed_seq = safe;
            self.effects.push_back(Effect::FeedSeq(safe));
        }
    }

    /// The voucher a `changes` frame carried for the stored heads after its changes: kept if
    /// this device now holds those heads.
    fn voucher_with_changes(&mut self, order: &str, heads: &[ByteBuf], voucher: Option<&[u8]>) {
        let (Ok(id), Ok(heads), Some(tag)) = (
            order.parse::<OrderId>(),
            heads_from_wire(heads),
            voucher.and_then(|v| <[u8; 32]>::try_from(v).ok()),
        ) else {
            return;
        };
        let held = !heads.is_empty()
            && self.orders.get(&id).is_some_and(|s| {
                heads
                    .iter()
                    .all(|h| s.held.doc().get_change_meta_by_hash(h).is_some())
            });
        if held {
            self.keep_voucher(id, &heads, tag);
        }
    }

    /// Keeps the relay's voucher for `heads` of `id` (the device holds them all), unless the
    /// voucher it holds covers more: one for heads that do not include the kept ones (a
    /// receipt for older heads arriving after a feed entry for newer ones) is not taken, so
    /// the voucher only ever grows.
    fn keep_voucher(&mut self, id: OrderId, heads: &[ChangeHash], tag: [u8; 32]) {
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        let v = (from_hashes(heads), tag);
        if slot.record.voucher.as_ref() == Some(&v) {
            return;
        }
        if let Some((kept, _)) = &slot.record.voucher {
            let doc = slot.held.doc();
            let after: std::collections::HashSet<ChangeHash> =
                doc.get_changes_meta(heads).iter().map(|m| m.hash).collect();
            let covered = to_hashes(kept)
                .iter()
                .all(|h| doc.get_change_meta_by_hash(h).is_some() && !after.contains(h));
            if !covered {
                return;
            }
        }
        slot.record.voucher = Some(v);
        self.effects.push_back(Effect::Record {
            order: id,
            record: slot.record.clone(),
        });
    }

    /// `id` got changes from the relay: if it now holds what the feed announced, its entry is
    /// handled.
    fn feed_caught_up(&mut self, id: OrderId) {
        let Some((_, heads, _)) = self.feed_waiting.get(&id) else {
            return;
        };
        let held = self.orders.get(&id).is_some_and(|s| {
            heads
                .iter()
                .all(|h| s.held.doc().get_change_meta_by_hash(h).is_some())
        });
        if held {
            if let Some((_, heads, Some(tag))) = self.feed_waiting.remove(&id) {
                self.keep_voucher(id, &heads, tag);
            }
            self.advance_feed();
        }
    }

    fn start_fetch(&mut self, id: OrderId, now: i64) {
        self.orders.insert(
            id,
            Slot {
                held: Held::Raw(Box::new(
                    Automerge::new().with_actor(self.writer.actor.clone()),
                )),
                record: OrderRecord::new(LocalSyncStatus::Synced, now),
                pushed: Vec::new(),
                sync: sync::State::new(),
                subscribed: false,
                fetching: true,
                tail_len: 0,
                number: None,
            },
        );
        self.removed.remove(&id);
        // Remember the fetch durably: the feed position moves past this order, so a crash
        // before the order arrives must not forget to fetch it.
        self.effects.push_back(Effect::Append {
            order: id,
            changes: Vec::new(),
            record: OrderRecord::new(LocalSyncStatus::Synced, now),
        });
        self.send_sync(id);
    }

    /// Asks the relay for an order this device does not hold (evicted, or never seen).
    pub fn fetch(&mut self, id: OrderId, now: i64) {
        if !self.orders.contains_key(&id) {
            self.note(id);
            self.start_fetch(id, now);
        }
    }

    /// Sends the next sync message for `id`, if connected and there is something to say.
    fn send_sync(&mut self, id: OrderId) {
        if self.link != Link::Online {
            return;
        }
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        if slot.record.status == LocalSyncStatus::Blocked {
            return;
        }
        // The state holds what the relay said; if Automerge panics on it, the guard resets the
        // state and the second try starts the sync over.
        let mut next = guard::generate_sync_message(slot.held.doc(), &mut slot.sync);
        if let Err(e) = &next {
            tracing::warn!(%id, error = %e, "sync state reset");
            next = guard::generate_sync_message(slot.held.doc(), &mut slot.sync);
        }
        match next {
            Ok(Some(m)) => {
                slot.subscribed = true;
                self.outbox.push_back(ClientFrame::Sync {
                    order: id.to_string(),
                    data: ByteBuf::from(m.encode()),
                });
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(%id, error = %e, "no sync message for the relay"),
        }
    }

    /// Pushes the changes of `id` the relay has not acknowledged nor been sent on this
    /// connection, with the device's heads, if connected. With `announce`, sends the heads
    /// even when there is nothing to push, so the relay answers with a receipt.
    fn push(&mut self, id: OrderId, announce: bool) {
        self.push_inner(id, announce, None);
    }

    /// [`Self::push`] after a local edit that made `fresh`: when the relay was sent everything
    /// before it, the edit's change bytes are pushed as they are, instead of being rebuilt
    /// from the document (which costs ~20 µs a change in automerge 0.12).
    fn push_fresh(&mut self, id: OrderId, fresh: Option<Fresh>) {
        self.push_inner(id, false, fresh);
    }

    fn push_inner(&mut self, id: OrderId, announce: bool, fresh: Option<Fresh>) {
        if self.link != Link::Online {
            return;
        }
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        if slot.record.status == LocalSyncStatus::Blocked || slot.fetching {
            return;
        }
        let heads = slot.held.doc().get_heads();
        let mut sent = slot.pushed.clone();
        sent.sort_unstable();
        let follows = fresh.as_ref().is_some_and(|f| {
            let mut after = f.after.clone();
            after.sort_unstable();
            after == sent
        });
        let changes: Vec<ByteBuf> = if sent == heads {
            Vec::new()
        } else if let (true, Some(f)) = (follows, fresh) {
            f.changes.into_iter().map(ByteBuf::from).collect()
        } else {
            slot.held
                .doc()
                .get_changes(&slot.pushed)
                .iter()
                .map(|c| ByteBuf::from(c.raw_bytes().to_vec()))
                .collect()
        };
        if changes.is_empty() && !announce {
            return;
        }
        slot.subscribed = true;
        slot.pushed.clone_from(&heads);
        // Nothing of the order is acknowledged (after a restore, or never): the relay's
        // voucher goes along, so the other writers' changes in the push are accepted.
        let voucher = match &slot.record.voucher {
            Some((vheads, tag)) if slot.record.receipted.is_empty() => Some(Voucher {
                heads: vheads.iter().map(|h| ByteBuf::from(h.to_vec())).collect(),
                tag: ByteBuf::from(tag.to_vec()),
            }),
            _ => None,
        };
        self.outbox.push_back(ClientFrame::Changes {
            order: id.to_string(),
            changes,
            heads: crdt_model::wire::heads_to_wire(&heads),
            voucher,
        });
    }

    fn refresh_number(&mut self, id: OrderId) {
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        let number = crdt_model::number_of(slot.held.doc()).ok().flatten();
        if number.is_some() && number != slot.number {
            slot.number = number;
            if let Some(n) = number {
                self.events.push_back(Event::NumberAssigned {
                    order: id,
                    number: n,
                });
            }
        }
    }

    /// Applies a status trigger; records and announces a change.
    fn transition(&mut self, id: OrderId, trigger: Trigger, now: i64) {
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        let Some(next) = slot.record.status.next(trigger) else {
            return;
        };
        if next == slot.record.status {
            return;
        }
        slot.record.status = next;
        slot.record.updated_at = now;
        if next != LocalSyncStatus::Blocked {
            slot.record.blocked = None;
        }
        if next == LocalSyncStatus::Synced {
            let terminal =
                crdt_model::status_of(slot.held.doc()).is_ok_and(OrderStatus::is_terminal);
            if terminal && slot.record.charging.is_empty() {
                slot.record.settled_at.get_or_insert(now);
            }
        }
        self.effects.push_back(Effect::Record {
            order: id,
            record: slot.record.clone(),
        });
        self.events.push_back(Event::SyncStatusChanged {
            order: id,
            status: next,
        });
    }

    /// Queues the durable write of `changes` (plus the record); compacts when the tail is long.
    fn persist(&mut self, id: OrderId, changes: Vec<Vec<u8>>) {
        let Some(slot) = self.orders.get_mut(&id) else {
            return;
        };
        slot.tail_len += changes.len();
        if slot.tail_len > self.config.compact_every {
            slot.tail_len = 0;
            self.effects.push_back(Effect::Compact {
                order: id,
                snapshot: slot.held.doc().save(),
                record: slot.record.clone(),
            });
        } else {
            self.effects.push_back(Effect::Append {
                order: id,
                changes,
                record: slot.record.clone(),
            });
        }
    }

    // ----- local operations ------------------------------------------------------------------

    /// Starts a local operation that [`Self::rollback`] can undo whole. Every local operation
    /// up to [`Self::commit`] or [`Self::rollback`] belongs to it; feed no frame, timeout or
    /// connection change in between. The driver opens one per API call, once every earlier
    /// effect is durable.
    pub fn begin(&mut self) {
        self.undo = Some(Undo {
            outbox: self.outbox.len(),
            effects: self.effects.len(),
            events: self.events.len(),
            orders: BTreeMap::new(),
        });
    }

    /// Keeps what the operation since [`Self::begin`] did (its storage effects are durable).
    pub fn commit(&mut self) {
        self.undo = None;
    }

    /// Undoes the operation since [`Self::begin`]: its storage effects, frames and events are
    /// dropped from the queues (none of its writes may have succeeded, none of its frames may
    /// have been sent), and
    /// every order it touched gets back its document, record, sync state and local sync status;
    /// an order it created or fetched is gone again. The undone changes are in nothing this
    /// engine will ever persist or send. Without an open operation, does nothing.
    ///
    /// A document that changed is rebuilt from its heads before the operation, so it loses its
    /// parse caches, and its next write replaces the whole stored copy: a failed write may have
    /// landed after all, and the stored order must never hold an undone change next to a new
    /// one that reuses its sequence number. Changes from the relay that were waiting for a
    /// dependency are not rebuilt (they were not stored either); the order's next sync message
    /// then asks the relay to resend what this device lacks. Rebuilding cannot fail for a document that only
    /// grew; if it does anyway, the order is dropped from memory (the store still holds it as
    /// it was) and this returns [`ReplicatorError::Corrupt`]: the engine must be rebuilt from
    /// the store.
    pub fn rollback(&mut self) -> Result<(), ReplicatorError> {
        let Some(undo) = self.undo.take() else {
            return Ok(());
        };
        self.outbox.truncate(undo.outbox);
        self.effects.truncate(undo.effects);
        self.events.truncate(undo.events);
        let mut lost = Vec::new();
        for (id, touched) in undo.orders {
            match touched.removed {
                Some(at) => self.removed.insert(id, at),
                None => self.removed.remove(&id),
            };
            let Some(before) = touched.slot else {
                self.orders.remove(&id);
                continue;
            };
            let Some(slot) = self.orders.get_mut(&id) else {
                continue;
            };
            slot.record = before.record;
            slot.pushed = before.pushed;
            slot.sync = before.sync;
            slot.subscribed = before.subscribed;
            slot.fetching = before.fetching;
            slot.number = before.number;
            slot.tail_len = before.tail_len;
            if slot.held.doc().get_heads() == before.heads {
                continue;
            }
            // Changes from the relay still waiting for a dependency are not in the rebuilt
            // document; the relay counts them as sent, so it is asked to send again what this
            // device lacks.
            let waiting = !slot.held.doc().get_missing_deps(&[]).is_empty();
            match slot.held.doc().fork_at(&before.heads) {
                Ok(doc) => {
                    slot.held = Held::Raw(Box::new(doc.with_actor(self.writer.actor.clone())));
                    slot.tail_len = self.config.compact_every;
                    slot.sync.needs_reset |= waiting;
                }
                Err(e) => lost.push((id, slot.record.updated_at, e.to_string())),
            }
        }
        if lost.is_empty() {
            return Ok(());
        }
        let mut why = Vec::new();
        for (id, at, e) in lost {
            tracing::error!(%id, error = %e, "could not undo a local edit; order dropped from memory");
            // Listed as removed, so that nothing (the store feed) fetches it over the stored copy.
            self.orders.remove(&id);
            self.removed.insert(id, at);
            why.push(format!("order {id}: {e}"));
        }
        Err(ReplicatorError::Corrupt(format!(
            "could not undo a local edit: {}",
            why.join("; ")
        )))
    }

    /// Remembers `id` as it is now, the first time the open local operation touches it.
    fn note(&mut self, id: OrderId) {
        let Some(undo) = self.undo.as_mut() else {
            return;
        };
        if undo.orders.contains_key(&id) {
            return;
        }
        let slot = self.orders.get(&id).map(|s| Before {
            heads: s.held.doc().get_heads(),
            record: s.record.clone(),
            pushed: s.pushed.clone(),
            sync: s.sync.clone(),
            subscribed: s.subscribed,
            fetching: s.fetching,
            tail_len: s.tail_len,
            number: s.number,
        });
        let removed = self.removed.get(&id).copied();
        undo.orders.insert(id, Touched { slot, removed });
    }

    /// Creates an order (id made here, usable at once; the relay's number comes later).
    pub fn create_order(
        &mut self,
        now: i64,
        rng: &mut dyn Entropy,
        currency: Currency,
    ) -> Result<OrderId, ReplicatorError> {
        let at = Timestamp(now);
        let id = OrderId::generate(at, rng);
        let new = NewOrder {
            id,
            store: self.identity.store.clone(),
            currency,
        };
        let order = Order::create(new, self.writer.clone(), at, rng)?;
        self.note(id);
        let changes: Vec<Vec<u8>> = order
            .doc()
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        self.orders.insert(
            id,
            Slot {
                held: Held::Typed(Box::new(order)),
                record: OrderRecord::new(LocalSyncStatus::Syncing, now),
                pushed: Vec::new(),
                sync: sync::State::new(),
                subscribed: false,
                fetching: false,
                tail_len: 0,
                number: None,
            },
        );
        let fresh = Fresh {
            after: Vec::new(),
            changes: changes.clone(),
        };
        self.persist(id, changes);
        self.events.push_back(Event::SyncStatusChanged {
            order: id,
            status: LocalSyncStatus::Syncing,
        });
        self.events.push_back(Event::OrderChanged(id));
        self.push_fresh(id, Some(fresh));
        Ok(id)
    }

    /// Runs a typed operation on an order as one change, queues its durable write, moves the
    /// sync status by `trigger` and, when online, offers it to the relay. A refused model
    /// operation changes nothing; when `op` runs several and a later one is refused, the
    /// earlier ones stay in the document unless [`Self::rollback`] undoes them.
    pub fn edit<T>(
        &mut self,
        id: OrderId,
        now: i64,
        trigger: Trigger,
        op: impl FnOnce(&mut Order) -> Result<T, ModelError>,
    ) -> Result<T, ReplicatorError> {
        self.note(id);
        let slot = self
            .orders
            .get_mut(&id)
            .ok_or(ReplicatorError::UnknownOrder(id))?;
        if slot.fetching {
            return Err(ReplicatorError::UnknownOrder(id));
        }
        let order = slot.held.typed(&self.writer)?;
        let before = order.heads();
        let result = op(order);
        let changes: Vec<Vec<u8>> = order
            .doc()
            .get_changes(&before)
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        let value = result?;
        if !changes.is_empty() {
            self.transition(id, trigger, now);
            if self.link != Link::Online {
                // Saved on the device; the relay is out of reach for now.
                self.transition(id, Trigger::Offline, now);
            }
            let fresh = Fresh {
                after: before,
                changes: changes.clone(),
            };
            self.persist(id, changes);
            self.events.push_back(Event::OrderChanged(id));
            self.push_fresh(id, Some(fresh));
        }
        Ok(value)
    }

    /// Changes the device-only record of an order (e.g. the list of charges in flight).
    pub fn update_record(
        &mut self,
        id: OrderId,
        now: i64,
        f: impl FnOnce(&mut OrderRecord),
    ) -> Result<(), ReplicatorError> {
        self.note(id);
        let slot = self
            .orders
            .get_mut(&id)
            .ok_or(ReplicatorError::UnknownOrder(id))?;
        f(&mut slot.record);
        slot.record.updated_at = now;
        self.effects.push_back(Effect::Record {
            order: id,
            record: slot.record.clone(),
        });
        Ok(())
    }

    /// Applies a trigger that is not an edit (a charge that ended without a change, a retry of
    /// a blocked order).
    pub fn trigger(
        &mut self,
        id: OrderId,
        trigger: Trigger,
        now: i64,
    ) -> Result<(), ReplicatorError> {
        if !self.orders.contains_key(&id) {
            return Err(ReplicatorError::UnknownOrder(id));
        }
        self.note(id);
        self.transition(id, trigger, now);
        if trigger == Trigger::RetryBlocked {
            if let Some(s) = self.orders.get_mut(&id) {
                s.sync = sync::State::new();
                s.pushed = to_hashes(&s.record.receipted);
            }
            self.push(id, true);
        }
        Ok(())
    }

    // ----- reads -----------------------------------------------------------------------------

    /// The order as a typed, read-only handle (a copy).
    pub fn order(&self, id: OrderId) -> Result<Order, ReplicatorError> {
        let slot = self
            .orders
            .get(&id)
            .filter(|s| !s.fetching)
            .ok_or(ReplicatorError::UnknownOrder(id))?;
        Ok(Order::from_doc(
            slot.held.doc().clone(),
            self.writer.clone(),
        )?)
    }

    /// The order's view.
    pub fn view(&self, id: OrderId) -> Result<OrderView, ReplicatorError> {
        let slot = self
            .orders
            .get(&id)
            .filter(|s| !s.fetching)
            .ok_or(ReplicatorError::UnknownOrder(id))?;
        Ok(match &slot.held {
            Held::Typed(o) => o.view()?,
            Held::Raw(d) => crdt_model::view_of(d)?,
        })
    }

    /// The order's local sync status; Removed for an evicted order.
    pub fn sync_status(&self, id: OrderId) -> Option<LocalSyncStatus> {
        match self.orders.get(&id) {
            Some(s) => Some(s.record.status),
            None => self
                .removed
                .contains_key(&id)
                .then_some(LocalSyncStatus::Removed),
        }
    }

    /// The order's device-only record.
    pub fn record(&self, id: OrderId) -> Option<&OrderRecord> {
        self.orders.get(&id).map(|s| &s.record)
    }

    /// Every order on the device (fully present), with its id.
    pub fn order_ids(&self) -> Vec<OrderId> {
        self.orders
            .iter()
            .filter(|(_, s)| !s.fetching)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Views of the store's active (not Done/Deleted) orders on this device, including those
    /// created on other terminals.
    pub fn active_orders(&self) -> Vec<OrderView> {
        self.orders
            .iter()
            .filter(|(_, s)| !s.fetching)
            .filter_map(|(id, _)| self.view(*id).ok())
            .filter(|v| !v.status.is_terminal())
            .collect()
    }
}
