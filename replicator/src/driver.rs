//! [`Replicator`]: the async API a POS app uses, and the tokio + tokio-tungstenite driver around
//! the sans-IO [`Engine`].
//!
//! Every write operation runs the typed operation in the engine, then performs the resulting
//! storage effects (one durable redb transaction, for the one order it touches) **before it
//! returns**, and only then lets the connection task send anything. If that transaction fails,
//! the engine is rolled back and the operation returns `Err`: an error means nothing happened
//! (see [`Replicator`]). The connection task owns the WebSocket: it connects with the device
//! token to the relay the engine names ([`Engine::relay_url`]: the device's relays in turn,
//! see [`Identity::relay_urls`]), feeds frames to the engine, performs effects, sends frames,
//! and reconnects with backoff when the link drops.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crdt_model::wire::{RelayFrame, codes};
use crdt_model::{
    ActiveStatus, Currency, Entropy, FinalPayment, LineDraft, LineId, OrderId, OrderView,
    PaymentDraft, PaymentId, PaymentKind, PaymentState,
};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Mutex, Notify, broadcast};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::core::{Effect, Engine, EngineConfig, Event};
use crate::error::ReplicatorError;
use crate::status::{LocalSyncStatus, Trigger};
use crate::store::redb_store::RedbStore;
use crate::store::{Identity, Store};
use crate::terminal::{ChargeOutcome, PaymentTerminal};

/// Settings of a replicator.
#[derive(Clone, Debug)]
pub struct Config {
    /// Engine tunables (backoff, retention, compaction).
    pub engine: EngineConfig,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            engine: EngineConfig::default(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// OS randomness for ids and jitter.
#[derive(Debug, Default)]
struct OsEntropy;

impl Entropy for OsEntropy {
    fn next_u64(&mut self) -> u64 {
        static FALLBACK: AtomicU64 = AtomicU64::new(0x5EED);
        getrandom::u64().unwrap_or_else(|_| {
            (now_ms() as u64).rotate_left(23) ^ FALLBACK.fetch_add(0x9E37_79B9, Ordering::Relaxed)
        })
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How a card charge ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeResult {
    /// Captured; the order is Charged until the relay confirms.
    Captured(PaymentId),
    /// Declined; the payment is voided.
    Declined {
        /// The payment (voided).
        payment: PaymentId,
        /// The terminal's reason.
        reason: String,
    },
}

/// What reconciliation did with a charge whose outcome had not been recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconciled {
    /// The terminal had taken the money: the payment is now captured.
    Captured(OrderId, PaymentId),
    /// The terminal never took it (or declined): the payment is voided.
    Voided(OrderId, PaymentId),
    /// The terminal could not tell yet; the payment stays pending.
    Unknown(OrderId, PaymentId),
}

struct State {
    engine: Engine,
    rng: OsEntropy,
    /// Effects not yet durable (a failed write is retried before anything else).
    pending: std::collections::VecDeque<Effect>,
    connect_requested: bool,
}

struct Shared {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    events: broadcast::Sender<Event>,
    wake: Notify,
    closed: AtomicBool,
    terminal: Arc<dyn PaymentTerminal>,
    config: Config,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The device library's handle. Cheap to clone.
///
/// # Errors
///
/// Every operation that changes something (`create_order`, `add_line`, `take_payment`,
/// `complete_sale`, ...) is persisted in the local store before it returns `Ok`. When it returns
/// `Err`, **nothing happened**: the order's content, its local sync status and its record are as
/// they were before the call, nothing of it was stored, and nothing of it will be stored or
/// sent to the relay later. The app may therefore retry the same call (after the cause is
/// fixed) without recording a payment or a line twice. In particular, if the local store
/// cannot write (disk full, I/O error), the operation is refused and undone, and so is every
/// later one until the store heals; earlier, durable operations are unaffected.
///
/// Two cases go beyond one call. [`Self::charge_card`] asks the card terminal between two local
/// writes: an `Err` from the first means the terminal was not asked; an `Err` after the terminal
/// answered ([`ReplicatorError::Terminal`], or a store failure while recording the outcome)
/// leaves the payment `pending` for [`Self::reconcile`], which never charges again. And a store
/// write that reports a failure although its data reached the disk (an fsync can fail after
/// writing) can leave the undone operation in the file, where it stays until the next change
/// to that order is stored, which replaces the order's whole stored copy; only a restart in
/// between brings it back.
#[derive(Clone)]
pub struct Replicator {
    shared: Arc<Shared>,
}

impl Replicator {
    /// Opens (or creates) the device's redb store at `path`. `identity` is written on first
    /// open; a store set up for another device is refused.
    pub async fn open(
        path: &Path,
        identity: Identity,
        config: Config,
        terminal: Arc<dyn PaymentTerminal>,
    ) -> Result<Self, ReplicatorError> {
        let p = path.to_path_buf();
        let store = tokio::task::spawn_blocking(move || RedbStore::open(&p))
            .await
            .map_err(|e| ReplicatorError::Storage(e.to_string()))??;
        Self::with_store(Arc::new(store), identity, config, terminal).await
    }

    /// Like [`Self::open`] with any [`Store`] (a `MemoryStore` in tests).
    pub async fn with_store(
        store: Arc<dyn Store>,
        identity: Identity,
        config: Config,
        terminal: Arc<dyn PaymentTerminal>,
    ) -> Result<Self, ReplicatorError> {
        let st = Arc::clone(&store);
        let id = identity.clone();
        let (identity, orders, feed, relay_data) =
            tokio::task::spawn_blocking(move || -> Result<_, ReplicatorError> {
                // The same device and store may come with new relay addresses or a new token (the
                // relay moved, the token was rotated); its actor epoch is the stored one.
                // Another device or store is refused by `set_identity`.
                let identity = match st.identity()? {
                    Some(existing)
                        if existing.device == id.device && existing.store == id.store =>
                    {
                        Identity {
                            relay_url: id.relay_url,
                            fallback_urls: id.fallback_urls,
                            token: id.token,
                            ..existing
                        }
                    }
                    _ => id,
                };
                st.set_identity(&identity)?;
                Ok((
                    identity,
                    st.load_orders()?,
                    st.feed_seq()?,
                    st.relay_data()?,
                ))
            })
            .await
            .map_err(|e| ReplicatorError::Storage(e.to_string()))??;
        let mut rng = OsEntropy;
        let engine = Engine::new(
            identity,
            orders,
            feed,
            config.engine.clone(),
            rng.next_u64(),
        )?
        .with_relay_data(relay_data);
        let (events, _) = broadcast::channel(4096);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                engine,
                rng,
                pending: Default::default(),
                connect_requested: false,
            }),
            store,
            events,
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            terminal,
            config,
            task: std::sync::Mutex::new(None),
        });
        let task = tokio::spawn(connection_task(Arc::clone(&shared)));
        if let Ok(mut t) = shared.task.lock() {
            *t = Some(task);
        }
        Ok(Self { shared })
    }

    /// Events: order changed, sync status changed, number assigned, rejected, (dis)connected.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// Stops syncing and waits for the connection to close. The store stays as it is (and is
    /// released once every clone of this handle is dropped); reopening resumes.
    pub async fn close(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.wake.notify_waiters();
        self.shared.wake.notify_one();
        let task = self.shared.task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// Runs one local operation: `Ok` once its effects are durable, `Err` with the engine as it
    /// was before (see [`Replicator`]'s "Errors").
    async fn run<T>(
        &self,
        f: impl FnOnce(&mut Engine, i64, &mut OsEntropy) -> Result<T, ReplicatorError>,
    ) -> Result<T, ReplicatorError> {
        if self.shared.closed.load(Ordering::Relaxed) {
            return Err(ReplicatorError::Closed);
        }
        let mut st = self.shared.state.lock().await;
        // Writes left by the connection task go first (a failed one is retried): if the store
        // cannot take them, the operation is not tried. After this, `pending` is empty, so
        // whatever the operation queues is its own.
        flush(&self.shared, &mut st).await?;
        st.engine.begin();
        let State { engine, rng, .. } = &mut *st;
        let result = match f(engine, now_ms(), rng) {
            Ok(v) => flush(&self.shared, &mut st).await.map(|()| v),
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => {
                st.engine.commit();
                drop(st);
                self.shared.wake.notify_one();
                Ok(v)
            }
            Err(e) => {
                // A local operation touches one order, so its effects fold into one store
                // transaction (see `fold`): the failed write was its only one, and none of it
                // is durable. Nothing was sent either: frames go out only after a whole flush.
                st.pending.clear();
                if let Err(undo) = st.engine.rollback() {
                    // Unreachable in practice (see `Engine::rollback`). The store still holds
                    // the state before the call; stop, so that nothing else is written or sent
                    // from memory, and let the app reopen.
                    self.shared.closed.store(true, Ordering::Relaxed);
                    self.shared.wake.notify_waiters();
                    self.shared.wake.notify_one();
                    return Err(undo);
                }
                Err(e)
            }
        }
    }

    async fn edit<T: Send>(
        &self,
        order: OrderId,
        trigger: Trigger,
        op: impl FnOnce(
            &mut crdt_model::Order,
            crdt_model::Timestamp,
            &mut dyn Entropy,
        ) -> Result<T, crdt_model::ModelError>,
    ) -> Result<T, ReplicatorError> {
        self.run(|e, now, rng| {
            e.edit(order, now, trigger, |o| {
                op(o, crdt_model::Timestamp(now), rng)
            })
        })
        .await
    }

    /// Runs an arbitrary operation on the order's document as one local change. An escape hatch
    /// for tools and fault tests (it can write anything, so the relay's policy may refuse the
    /// result and the order becomes Blocked); apps use the typed operations.
    #[doc(hidden)]
    pub async fn edit_raw<T: Send>(
        &self,
        order: OrderId,
        op: impl FnOnce(&mut crdt_model::Order) -> Result<T, crdt_model::ModelError>,
    ) -> Result<T, ReplicatorError> {
        self.run(|e, now, _| e.edit(order, now, Trigger::LocalEdit, op))
            .await
    }

    /// Creates an order; its id is usable at once, its number arrives later (an event).
    pub async fn create_order(&self, currency: Currency) -> Result<OrderId, ReplicatorError> {
        self.run(|e, now, rng| e.create_order(now, rng, currency))
            .await
    }

    /// Adds a line.
    pub async fn add_line(
        &self,
        order: OrderId,
        line: LineDraft,
    ) -> Result<LineId, ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, rng| {
            o.add_line(at, rng, line)
        })
        .await
    }

    /// Changes a line's quantity by `delta`.
    pub async fn change_quantity(
        &self,
        order: OrderId,
        line: LineId,
        delta: i64,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, _| {
            o.change_quantity(at, line, delta)
        })
        .await
    }

    /// Sets a line's quantity.
    pub async fn set_quantity(
        &self,
        order: OrderId,
        line: LineId,
        quantity: i64,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, _| {
            o.set_quantity(at, line, quantity)
        })
        .await
    }

    /// Overrides a line's unit price.
    pub async fn set_unit_price(
        &self,
        order: OrderId,
        line: LineId,
        price: i64,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, _| {
            o.set_unit_price(at, line, price)
        })
        .await
    }

    /// Replaces a line's note.
    pub async fn set_note(
        &self,
        order: OrderId,
        line: LineId,
        note: String,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, move |o, at, _| {
            o.set_note(at, line, &note)
        })
        .await
    }

    /// Removes a line.
    pub async fn remove_line(&self, order: OrderId, line: LineId) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, _| {
            o.remove_line(at, line)
        })
        .await
    }

    /// Moves the order between active statuses.
    pub async fn set_status(
        &self,
        order: OrderId,
        status: ActiveStatus,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, rng| {
            o.set_status(at, rng, status)
        })
        .await
    }

    /// Records a payment already taken (cash in the drawer, a cheque, a gift card redeemed):
    /// captured in one change.
    pub async fn take_payment(
        &self,
        order: OrderId,
        payment: PaymentDraft,
    ) -> Result<PaymentId, ReplicatorError> {
        self.edit(order, Trigger::PaymentCaptured, |o, at, rng| {
            o.add_payment(at, rng, payment, PaymentState::Captured)
        })
        .await
    }

    /// Charges a card through the terminal, crash-safe: the payment is recorded `pending` (and
    /// the order Charging) durably **before** the terminal is asked; the outcome is recorded
    /// after. If the app dies in between, [`Self::pending_charges`] lists the payment and
    /// [`Self::reconcile`] settles it with the terminal — never charged twice, never forgotten.
    /// The same holds when recording the outcome fails (the store cannot write): the error
    /// says so and the payment stays pending; when the pending payment itself cannot be
    /// recorded, nothing happened and the terminal is not asked.
    pub async fn charge_card(
        &self,
        order: OrderId,
        amount: i64,
    ) -> Result<ChargeResult, ReplicatorError> {
        let (payment, currency) = self
            .run(|e, now, rng| {
                let draft = PaymentDraft {
                    kind: PaymentKind::CardTerminal,
                    amount,
                    reference: String::new(),
                };
                let currency = e.order(order)?.currency();
                let p = e.edit(order, now, Trigger::ChargeStarted, |o| {
                    o.add_payment(
                        crdt_model::Timestamp(now),
                        rng,
                        draft,
                        PaymentState::Pending,
                    )
                })?;
                e.update_record(order, now, |r| r.charging.push(p))?;
                Ok((p, currency))
            })
            .await?;
        let outcome = self.shared.terminal.charge(payment, amount, currency).await;
        match outcome {
            Ok(outcome) => self.record_outcome(order, payment, outcome).await,
            Err(e) => Err(ReplicatorError::Terminal(format!(
                "{e}; payment {payment} stays pending for reconciliation"
            ))),
        }
    }

    async fn record_outcome(
        &self,
        order: OrderId,
        payment: PaymentId,
        outcome: ChargeOutcome,
    ) -> Result<ChargeResult, ReplicatorError> {
        self.run(|e, now, rng| {
            let at = crdt_model::Timestamp(now);
            let result = match outcome {
                ChargeOutcome::Approved {
                    auth_code,
                    masked_card,
                } => {
                    let reference = format!("{auth_code} {masked_card}");
                    e.edit(order, now, Trigger::PaymentCaptured, |o| {
                        let state = o
                            .view()?
                            .payments
                            .iter()
                            .find(|p| p.id == payment)
                            .map(|p| p.state);
                        if state == Some(PaymentState::Pending) {
                            o.authorize_payment(at, rng, payment, &reference)?;
                        }
                        if matches!(
                            state,
                            Some(PaymentState::Pending | PaymentState::Authorized)
                        ) {
                            o.capture_payment(at, rng, payment)?;
                        }
                        Ok(())
                    })?;
                    ChargeResult::Captured(payment)
                }
                ChargeOutcome::Declined { reason } => {
                    e.edit(order, now, Trigger::PaymentEnded, |o| {
                        o.void_payment(at, rng, payment)
                    })?;
                    ChargeResult::Declined { payment, reason }
                }
            };
            e.update_record(order, now, |r| r.charging.retain(|p| *p != payment))?;
            Ok(result)
        })
        .await
    }

    /// Card payments sent to the terminal whose outcome was never recorded (the app died or
    /// the terminal did not answer).
    pub async fn pending_charges(&self) -> Vec<(OrderId, PaymentId)> {
        let st = self.shared.state.lock().await;
        st.engine
            .order_ids()
            .into_iter()
            .filter_map(|id| st.engine.record(id).map(|r| (id, r.charging.clone())))
            .flat_map(|(id, ps)| ps.into_iter().map(move |p| (id, p)))
            .collect()
    }

    /// Settles every pending charge by asking the terminal what happened (`lookup`, never a new
    /// charge).
    pub async fn reconcile(&self) -> Result<Vec<Reconciled>, ReplicatorError> {
        let mut done = Vec::new();
        for (order, payment) in self.pending_charges().await {
            match self.shared.terminal.lookup(payment).await {
                Ok(Some(outcome @ ChargeOutcome::Approved { .. })) => {
                    self.record_outcome(order, payment, outcome).await?;
                    done.push(Reconciled::Captured(order, payment));
                }
                Ok(Some(outcome @ ChargeOutcome::Declined { .. })) => {
                    self.record_outcome(order, payment, outcome).await?;
                    done.push(Reconciled::Voided(order, payment));
                }
                Ok(None) => {
                    self.record_outcome(
                        order,
                        payment,
                        ChargeOutcome::Declined {
                            reason: "never reached the terminal".into(),
                        },
                    )
                    .await?;
                    done.push(Reconciled::Voided(order, payment));
                }
                Err(_) => done.push(Reconciled::Unknown(order, payment)),
            }
        }
        Ok(done)
    }

    /// Completes the sale: the final payment (if any) and Done in one change.
    pub async fn complete_sale(
        &self,
        order: OrderId,
        last: Option<FinalPayment>,
    ) -> Result<Option<PaymentId>, ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, rng| {
            o.complete_sale(at, rng, last)
        })
        .await
    }

    /// Deletes (cancels) the order.
    pub async fn delete(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::DeleteRequested, |o, at, rng| {
            o.delete(at, rng)
        })
        .await
    }

    /// Voids a pending or authorised payment (also on a closed order).
    pub async fn void_payment(
        &self,
        order: OrderId,
        payment: PaymentId,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::PaymentEnded, |o, at, rng| {
            o.void_payment(at, rng, payment)
        })
        .await
    }

    /// Refunds a captured payment (also on a closed order).
    pub async fn refund_payment(
        &self,
        order: OrderId,
        payment: PaymentId,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, |o, at, rng| {
            o.refund_payment(at, rng, payment)
        })
        .await
    }

    /// A manager acknowledges a late edit.
    pub async fn acknowledge_late_edit(
        &self,
        order: OrderId,
        edit: String,
        note: String,
    ) -> Result<(), ReplicatorError> {
        self.edit(order, Trigger::LocalEdit, move |o, at, rng| {
            o.acknowledge_late_edit(at, rng, &edit, &note)
        })
        .await
    }

    /// Retries a Blocked order's changes (after whatever caused the refusal was fixed).
    pub async fn retry_blocked(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.run(|e, now, _| e.trigger(order, Trigger::RetryBlocked, now))
            .await
    }

    /// Fetches an order from the relay (evicted, or created elsewhere and not yet here).
    pub async fn fetch(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.run(|e, now, _| {
            e.fetch(order, now);
            Ok(())
        })
        .await
    }

    /// The order's view.
    pub async fn view(&self, order: OrderId) -> Result<OrderView, ReplicatorError> {
        self.shared.state.lock().await.engine.view(order)
    }

    /// The order's local sync status.
    pub async fn sync_status(&self, order: OrderId) -> Option<LocalSyncStatus> {
        self.shared.state.lock().await.engine.sync_status(order)
    }

    /// Why the relay refused the order, while it is Blocked.
    pub async fn blocked_reason(&self, order: OrderId) -> Option<crate::store::Blocked> {
        self.shared
            .state
            .lock()
            .await
            .engine
            .record(order)
            .and_then(|r| r.blocked.clone())
    }

    /// Active orders of the store held on this device (including other terminals' orders).
    pub async fn active_orders(&self) -> Vec<OrderView> {
        self.shared.state.lock().await.engine.active_orders()
    }

    /// Every order id on the device.
    pub async fn order_ids(&self) -> Vec<OrderId> {
        self.shared.state.lock().await.engine.order_ids()
    }

    /// Whether the relay connection is up.
    pub async fn is_online(&self) -> bool {
        self.shared.state.lock().await.engine.is_online()
    }

    /// Waits until `order` reaches `status` (or the timeout passes).
    pub async fn wait_for_status(
        &self,
        order: OrderId,
        status: LocalSyncStatus,
        timeout: Duration,
    ) -> Result<(), ReplicatorError> {
        let mut rx = self.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.sync_status(order).await == Some(status) {
                return Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => {
                    return Err(ReplicatorError::Closed);
                }
                Err(_) => {
                    let now = self.sync_status(order).await;
                    return Err(ReplicatorError::Invalid(format!(
                        "order {order} is {now:?}, not {status} after {timeout:?}"
                    )));
                }
            }
        }
    }
}

/// Folds `next` into `last` when both write the same order, so that they are one store
/// transaction; gives `next` back when they cannot be folded. Every record is a whole copy and
/// every snapshot holds every change queued before it, so a later record or snapshot replaces
/// an earlier one, and changes after a snapshot are change chunks appended to it (Automerge
/// loads a saved document followed by changes).
fn fold(last: &mut Effect, next: Effect) -> Option<Effect> {
    let same = match (&*last, &next) {
        (
            Effect::Record { order: a, .. }
            | Effect::Append { order: a, .. }
            | Effect::Compact { order: a, .. },
            Effect::Record { order: b, .. }
            | Effect::Append { order: b, .. }
            | Effect::Compact { order: b, .. },
        ) => a == b,
        _ => false,
    };
    if !same {
        return Some(next);
    }
    match (last, next) {
        (
            Effect::Append { record, .. } | Effect::Compact { record, .. },
            Effect::Record { record: newer, .. },
        ) => *record = newer,
        (
            Effect::Append {
                changes, record, ..
            },
            Effect::Append {
                changes: more,
                record: newer,
                ..
            },
        ) => {
            changes.extend(more);
            *record = newer;
        }
        (
            Effect::Compact {
                snapshot, record, ..
            },
            Effect::Append {
                changes: more,
                record: newer,
                ..
            },
        ) => {
            snapshot.extend(more.concat());
            *record = newer;
        }
        (last, next) => *last = next,
    }
    None
}

/// Performs queued effects durably, in order; then publishes events. Stops at the first
/// failed write, keeping it (and everything after it) for the next flush.
async fn flush(shared: &Shared, st: &mut State) -> Result<(), ReplicatorError> {
    while let Some(e) = st.engine.poll_effect() {
        let unfolded = match st.pending.back_mut() {
            Some(last) => fold(last, e),
            None => Some(e),
        };
        if let Some(e) = unfolded {
            st.pending.push_back(e);
        }
    }
    // Every queued write goes to the store in one batch (one transaction, one fsync, for a
    // store that can): receipts and changes for many orders arriving together cost one commit.
    if st.pending.iter().any(|e| *e == Effect::Connect) {
        st.connect_requested = true;
        st.pending.retain(|e| *e != Effect::Connect);
    }
    if !st.pending.is_empty() {
        let store = Arc::clone(&shared.store);
        let batch: Vec<Effect> = st.pending.iter().cloned().collect();
        let (done, result) = tokio::task::spawn_blocking(move || {
            let mut done = 0;
            let result = store.write_batch(&batch, &mut done);
            (done, result)
        })
        .await
        .map_err(|e| ReplicatorError::Storage(e.to_string()))?;
        match result {
            Ok(()) => st.pending.clear(),
            Err(e) => {
                // What is durable goes; the rest stays for the next flush.
                st.pending.drain(..done.min(st.pending.len()));
                tracing::error!(error = %e, "local store write failed; will retry");
                return Err(e);
            }
        }
    }
    while let Some(ev) = st.engine.poll_event() {
        let _ = shared.events.send(ev);
    }
    Ok(())
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Why a connection attempt failed.
enum ConnectFailure {
    /// The relay refused the token (HTTP 401/403): its error code and message.
    Refused { code: String, message: String },
    /// Anything else (unreachable, timeout, another HTTP answer): retried with backoff.
    Other(String),
}

/// The error code and message of the relay's JSON error body
/// (`{"error": {"code", "message"}}`), with `fallback` as the code when there is none.
fn refusal(body: Option<&[u8]>, fallback: &str) -> (String, String) {
    let v: serde_json::Value = body
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    let code = v["error"]["code"].as_str().unwrap_or(fallback).to_owned();
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or("the relay refused this device's token")
        .to_owned();
    (code, message)
}

/// Opens the WebSocket to the relay at `url` with the device's token.
async fn connect(url: &str, token: &str, timeout: Duration) -> Result<Ws, ConnectFailure> {
    let mut req = url
        .into_client_request()
        .map_err(|e| ConnectFailure::Other(e.to_string()))?;
    let auth = format!("Bearer {token}")
        .parse()
        .map_err(|_| ConnectFailure::Other("token is not a valid header value".to_owned()))?;
    req.headers_mut().insert("Authorization", auth);
    match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(req)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp)))
            if matches!(resp.status().as_u16(), 401 | 403) =>
        {
            let (code, message) = refusal(resp.body().as_deref(), codes::UNAUTHORIZED);
            Err(ConnectFailure::Refused { code, message })
        }
        Ok(Err(e)) => Err(ConnectFailure::Other(e.to_string())),
        Err(_) => Err(ConnectFailure::Other("connect timed out".into())),
    }
}

/// Sends every queued frame; false if the socket failed.
async fn send_all(ws: &mut Ws, frames: Vec<crdt_model::wire::ClientFrame>) -> bool {
    for f in frames {
        if ws.send(Message::Binary(f.encode().into())).await.is_err() {
            return false;
        }
    }
    true
}

/// Flushes effects, then takes the frames to send (only once every effect is durable).
async fn step(shared: &Shared, st: &mut State) -> Vec<crdt_model::wire::ClientFrame> {
    if flush(shared, st).await.is_err() || !st.pending.is_empty() {
        return Vec::new();
    }
    std::iter::from_fn(|| st.engine.poll_transmit()).collect()
}

fn sleep_for(deadline: Option<i64>) -> Duration {
    deadline.map_or(Duration::from_secs(3600), |d| {
        Duration::from_millis((d - now_ms()).clamp(0, 3_600_000) as u64)
    })
}

async fn connection_task(shared: Arc<Shared>) {
    loop {
        if shared.closed.load(Ordering::Relaxed) {
            return;
        }
        let (connect_now, deadline, url, token) = {
            let mut st = shared.state.lock().await;
            st.engine.handle_timeout(now_ms());
            let _ = flush(&shared, &mut st).await;
            let c = std::mem::take(&mut st.connect_requested);
            // The engine chose the relay of this attempt; it changes only when the attempt
            // ends (`handle_disconnected`, `handle_refused`), which this task alone calls.
            (
                c,
                st.engine.poll_timeout(),
                st.engine.relay_url().to_owned(),
                st.engine.identity().token.clone(),
            )
        };
        if !connect_now {
            tokio::select! {
                () = tokio::time::sleep(sleep_for(deadline)) => {}
                () = shared.wake.notified() => {}
            }
            continue;
        }
        tracing::debug!(relay = %url, "connecting to the relay");
        let mut ws = match connect(&url, &token, shared.config.connect_timeout).await {
            Ok(ws) => {
                tracing::info!(relay = %url, "connected to the relay");
                ws
            }
            Err(ConnectFailure::Refused { code, message }) => {
                tracing::warn!(
                    relay = %url,
                    %code,
                    %message,
                    "the relay refused this device's token",
                );
                let mut st = shared.state.lock().await;
                st.engine.handle_refused(&code, &message, now_ms());
                let _ = flush(&shared, &mut st).await;
                continue;
            }
            Err(ConnectFailure::Other(e)) => {
                let mut st = shared.state.lock().await;
                st.engine.handle_disconnected(now_ms());
                tracing::info!(
                    relay = %url,
                    error = %e,
                    next = %st.engine.relay_url(),
                    failed_attempts = st.engine.failed_attempts(),
                    "relay unreachable",
                );
                let _ = flush(&shared, &mut st).await;
                continue;
            }
        };
        let frames = {
            let mut st = shared.state.lock().await;
            st.engine.handle_connected(now_ms());
            step(&shared, &mut st).await
        };
        let mut alive = send_all(&mut ws, frames).await;
        while alive && !shared.closed.load(Ordering::Relaxed) {
            let deadline = shared.state.lock().await.engine.poll_timeout();
            let frames = tokio::select! {
                incoming = ws.next() => {
                    match incoming {
                        Some(Ok(Message::Binary(b))) => match RelayFrame::decode(&b) {
                            Ok(frame) => {
                                let mut st = shared.state.lock().await;
                                st.engine.handle_frame(frame, now_ms());
                                step(&shared, &mut st).await
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "undecodable frame from relay");
                                alive = false;
                                Vec::new()
                            }
                        },
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                            alive = false;
                            Vec::new()
                        }
                        Some(Ok(_)) => Vec::new(),
                    }
                }
                () = shared.wake.notified() => {
                    let mut st = shared.state.lock().await;
                    step(&shared, &mut st).await
                }
                () = tokio::time::sleep(sleep_for(deadline)) => {
                    let mut st = shared.state.lock().await;
                    st.engine.handle_timeout(now_ms());
                    step(&shared, &mut st).await
                }
            };
            if alive {
                alive = send_all(&mut ws, frames).await;
            }
            // The engine went offline (the relay said bye, refused the token, or its data
            // was restored and the engine wants a fresh hello): this socket is done.
            let st = shared.state.lock().await;
            if (!st.engine.is_online() && !alive) || st.engine.is_offline() {
                break;
            }
        }
        let _ = ws.close(None).await;
        let mut st = shared.state.lock().await;
        if st.engine.is_online() || !alive {
            st.engine.handle_disconnected(now_ms());
            let _ = flush(&shared, &mut st).await;
        }
        tracing::info!(
            relay = %url,
            next = %st.engine.relay_url(),
            "connection to the relay closed",
        );
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ROOT, ReadDoc};
    use crdt_model::{SplitMix64, Timestamp};

    use super::*;
    use crate::store::OrderRecord;

    fn record(at: i64) -> OrderRecord {
        OrderRecord::new(LocalSyncStatus::Syncing, at)
    }

    /// A document with keys `0..n`, one change each, and those changes' bytes.
    fn doc(n: i64) -> (Automerge, Vec<Vec<u8>>) {
        let mut doc = Automerge::new();
        for i in 0..n {
            let mut tx = doc.transaction();
            tx.put(ROOT, i.to_string(), i).unwrap();
            tx.commit();
        }
        let changes = doc
            .get_changes(&[])
            .iter()
            .map(|c| c.raw_bytes().to_vec())
            .collect();
        (doc, changes)
    }

    #[test]
    fn writes_of_one_order_fold_into_one_and_others_do_not() {
        let mut rng = SplitMix64::new(1);
        let a = OrderId::generate(Timestamp(0), &mut rng);
        let b = OrderId::generate(Timestamp(0), &mut rng);
        let (full, changes) = doc(3);
        let append = |order, range: std::ops::Range<usize>, at| Effect::Append {
            order,
            changes: changes[range].to_vec(),
            record: record(at),
        };

        let mut last = Effect::Record {
            order: a,
            record: record(1),
        };
        assert_eq!(fold(&mut last, append(a, 0..1, 2)), None);
        assert_eq!(fold(&mut last, append(a, 1..2, 3)), None);
        let record_4 = Effect::Record {
            order: a,
            record: record(4),
        };
        assert_eq!(fold(&mut last, record_4), None);
        assert_eq!(last, append(a, 0..2, 4));
        // Another order, a removal, the feed position: separate transactions.
        assert_eq!(
            fold(&mut last, append(b, 2..3, 5)),
            Some(append(b, 2..3, 5))
        );
        let remove = Effect::Remove { order: a };
        assert_eq!(fold(&mut last, remove.clone()), Some(remove));
        assert_eq!(
            fold(&mut last, Effect::FeedSeq(7)),
            Some(Effect::FeedSeq(7))
        );

        // A snapshot replaces what came before it; changes after it are appended to it.
        let mut first_two = Automerge::new();
        for c in &changes[..2] {
            first_two.load_incremental(c).unwrap();
        }
        let compact = Effect::Compact {
            order: a,
            snapshot: first_two.save(),
            record: record(6),
        };
        assert_eq!(fold(&mut last, compact.clone()), None);
        assert_eq!(last, compact);
        assert_eq!(fold(&mut last, append(a, 2..3, 7)), None);
        let Effect::Compact {
            snapshot,
            record: r,
            ..
        } = &last
        else {
            panic!("not a compaction: {last:?}");
        };
        assert_eq!(r, &record(7));
        let loaded = Automerge::load(snapshot).unwrap();
        assert_eq!(loaded.get_heads(), full.get_heads());
        assert_eq!(loaded.keys(ROOT).count(), 3);
    }
}
