//! An operation that returns `Err` did not happen: when the local store cannot write, the edit
//! is undone (document, record, local sync status, sync state, queued frames and events), it is
//! never stored or sent later, and retrying it records it exactly once.
//!
//! * [`FaultyStore`]: a [`MemoryStore`] whose writes fail on demand, either refused outright or
//!   written and then reported as failed (an fsync error after the data reached the disk).
//! * Through [`Replicator`]: a cash payment whose write fails, retried after the store heals;
//!   the same with a write that lands but reports failure; and a property test over random
//!   edits with random store failures, reopening the store after every call.
//! * Through the sans-IO [`Engine`], online with a relay in memory: an undone edit is never
//!   offered to the relay, and the retried one reaches it exactly once.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#![cfg(feature = "runtime-tokio")]

use std::sync::{Arc, Mutex};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ReadDoc};
use crdt_model::wire::{ClientFrame, RelayFrame, Version, heads_to_wire};
use crdt_model::{
    Currency, DeviceId, Entropy, LineDraft, Order, OrderId, OrderView, PaymentDraft, PaymentKind,
    PaymentState, SplitMix64, StoreId, Timestamp, Writer,
};
use proptest::prelude::*;
use replicator::core::{Effect, Engine, EngineConfig, Event};
use replicator::{
    Config, Identity, LocalSyncStatus, MemoryStore, OrderRecord, Replicator, ReplicatorError,
    SimMode, SimTerminal, Store, StoredOrder, Trigger,
};
use serde_bytes::ByteBuf;

const T0: i64 = 1_700_000_000_000;

/// How [`FaultyStore`] treats writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Writes go through.
    None,
    /// Writes fail and store nothing (disk full).
    Refuse,
    /// Writes are stored, then reported as failed.
    LandThenFail,
}

/// A [`MemoryStore`] whose writes fail while a [`Fault`] is set. Reads always work.
struct FaultyStore {
    inner: MemoryStore,
    fault: Mutex<Fault>,
}

impl FaultyStore {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStore::new(),
            fault: Mutex::new(Fault::None),
        })
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn write(
        &self,
        op: impl FnOnce(&MemoryStore) -> Result<(), ReplicatorError>,
    ) -> Result<(), ReplicatorError> {
        let fault = *self.fault.lock().unwrap();
        match fault {
            Fault::None => op(&self.inner),
            Fault::Refuse => Err(ReplicatorError::Storage("injected: no space left".into())),
            Fault::LandThenFail => {
                op(&self.inner)?;
                Err(ReplicatorError::Storage("injected: fsync failed".into()))
            }
        }
    }

    /// What a restart would find.
    fn crash_copy(&self) -> MemoryStore {
        self.inner.crash_copy().unwrap()
    }
}

impl Store for FaultyStore {
    fn identity(&self) -> Result<Option<Identity>, ReplicatorError> {
        self.inner.identity()
    }

    fn set_identity(&self, identity: &Identity) -> Result<(), ReplicatorError> {
        self.write(|s| s.set_identity(identity))
    }

    fn load_orders(&self) -> Result<Vec<StoredOrder>, ReplicatorError> {
        self.inner.load_orders()
    }

    fn append(
        &self,
        order: OrderId,
        changes: &[Vec<u8>],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        self.write(|s| s.append(order, changes, record))
    }

    fn put_record(&self, order: OrderId, record: &OrderRecord) -> Result<(), ReplicatorError> {
        self.write(|s| s.put_record(order, record))
    }

    fn compact(
        &self,
        order: OrderId,
        snapshot: &[u8],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        self.write(|s| s.compact(order, snapshot, record))
    }

    fn remove(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.write(|s| s.remove(order))
    }

    fn feed_seq(&self) -> Result<u64, ReplicatorError> {
        self.inner.feed_seq()
    }

    fn set_feed_seq(&self, seq: u64) -> Result<(), ReplicatorError> {
        self.write(|s| s.set_feed_seq(seq))
    }

    fn relay_data(&self) -> Result<Option<String>, ReplicatorError> {
        self.inner.relay_data()
    }

    fn set_relay_data(&self, data: &str) -> Result<(), ReplicatorError> {
        self.write(|s| s.set_relay_data(data))
    }
}

fn identity(seed: u64) -> Identity {
    Identity {
        device: DeviceId::generate(Timestamp(T0), &mut SplitMix64::new(seed)),
        store: StoreId::new("s1").unwrap(),
        epoch: 1,
        // Nothing listens there: the device stays offline.
        relay_url: "ws://127.0.0.1:9/v1/sync".into(),
        fallback_urls: Vec::new(),
        token: "t".into(),
    }
}

fn eur() -> Currency {
    Currency::new("EUR").unwrap()
}

fn line(name: &str, unit_price: i64, quantity: i64) -> LineDraft {
    LineDraft {
        sku: name.to_lowercase(),
        name: name.into(),
        unit_price,
        quantity,
        ..Default::default()
    }
}

fn cash(amount: i64) -> PaymentDraft {
    PaymentDraft {
        kind: PaymentKind::Cash,
        amount,
        reference: String::new(),
    }
}

async fn open(store: Arc<dyn Store>, seed: u64) -> Replicator {
    let terminal = Arc::new(SimTerminal::new(SimMode::Approve));
    Replicator::with_store(store, identity(seed), Config::default(), terminal)
        .await
        .unwrap()
}

/// The order as an engine rebuilt from what `store` holds durably sees it (a restart).
fn reopened_view(store: &FaultyStore, order: OrderId) -> Result<OrderView, ReplicatorError> {
    let copy = store.crash_copy();
    let engine = Engine::new(
        copy.identity()?.unwrap(),
        copy.load_orders()?,
        copy.feed_seq()?,
        EngineConfig::default(),
        0,
    )?;
    engine.view(order)
}

/// Events about `order` received so far.
fn events_about(rx: &mut tokio::sync::broadcast::Receiver<Event>, order: OrderId) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok())
        .filter(|e| match e {
            Event::OrderChanged(o) | Event::SyncStatusChanged { order: o, .. } => *o == order,
            _ => false,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cash_payment_whose_store_write_fails_is_undone_and_the_retry_records_it_once() {
    let store = FaultyStore::new();
    let till = open(store.clone(), 1).await;
    let order = till.create_order(eur()).await.unwrap();
    till.add_line(order, line("Espresso", 250, 2))
        .await
        .unwrap();
    let before = till.view(order).await.unwrap();
    let status = till.sync_status(order).await;
    assert_eq!(status, Some(LocalSyncStatus::Delayed));
    let stored = store.inner.orders().unwrap();
    let mut rx = till.subscribe();

    store.set(Fault::Refuse);
    let failed = till.take_payment(order, cash(500)).await;
    assert!(
        matches!(failed, Err(ReplicatorError::Storage(_))),
        "{failed:?}"
    );
    assert_eq!(till.view(order).await.unwrap(), before);
    assert_eq!(till.sync_status(order).await, status);
    assert_eq!(store.inner.orders().unwrap(), stored, "nothing was stored");
    assert_eq!(
        events_about(&mut rx, order),
        Vec::new(),
        "nothing announced"
    );
    // While the store fails, every operation is refused the same way.
    assert!(till.add_line(order, line("Tea", 300, 1)).await.is_err());
    assert_eq!(till.view(order).await.unwrap(), before);

    store.set(Fault::None);
    let payment = till.take_payment(order, cash(500)).await.unwrap();
    let after = till.view(order).await.unwrap();
    assert_eq!(after.payments.len(), 1);
    assert_eq!(after.payments[0].id, payment);
    assert_eq!(after.totals.paid, 500);
    assert_eq!(after.lines.len(), 1, "the refused line is not there either");
    assert!(!events_about(&mut rx, order).is_empty());
    assert_eq!(reopened_view(&store, order).unwrap(), after);

    // A real restart of the library from what the store holds.
    till.close().await;
    drop(till);
    let till = open(Arc::new(store.crash_copy()), 1).await;
    let restarted = till.view(order).await.unwrap();
    assert_eq!(restarted, after);
    assert_eq!(restarted.payments.len(), 1);
    till.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_lands_but_reports_failure_is_undone_and_never_corrupts_the_order() {
    let store = FaultyStore::new();
    let till = open(store.clone(), 2).await;
    let order = till.create_order(eur()).await.unwrap();
    till.add_line(order, line("Menu", 1_200, 1)).await.unwrap();
    let before = till.view(order).await.unwrap();

    store.set(Fault::LandThenFail);
    assert!(till.take_payment(order, cash(1_200)).await.is_err());
    assert_eq!(till.view(order).await.unwrap(), before);
    // The limit of what an error can promise: the bytes did reach the store, so a restart
    // right now would find the payment (once, and the order loads).
    assert_eq!(reopened_view(&store, order).unwrap().payments.len(), 1);

    // The retry makes a change with the same actor sequence number as the undone one; it
    // replaces the order's stored copy instead of sitting next to it.
    store.set(Fault::None);
    till.take_payment(order, cash(1_200)).await.unwrap();
    let after = till.view(order).await.unwrap();
    assert_eq!(after.payments.len(), 1);
    assert_eq!(reopened_view(&store, order).unwrap(), after);
    till.add_line(order, line("Water", 200, 1)).await.unwrap();
    let after = till.view(order).await.unwrap();
    assert_eq!(reopened_view(&store, order).unwrap(), after);

    till.close().await;
    drop(till);
    let till = open(Arc::new(store.crash_copy()), 2).await;
    let restarted = till.view(order).await.unwrap();
    assert_eq!(restarted, after);
    assert_eq!(restarted.payments.len(), 1);
    assert_eq!(restarted.totals.paid, 1_200);
    till.close().await;
}

// ----- through the engine, online -----------------------------------------------------------

/// A relay in memory for one order: its document and its sync state with the device. It
/// answers every sync message, with a receipt for its heads.
struct MiniRelay {
    doc: Automerge,
    sync: sync::State,
}

/// Performs the engine's effects as a driver that succeeds would, and delivers its frames to
/// `relay` and the answers back, until nobody has anything to say.
fn pump(engine: &mut Engine, store: &MemoryStore, relay: &mut MiniRelay, now: i64) {
    exchange(engine, store, relay, now, Vec::new());
}

/// Performs the engine's effects and drops its events.
fn perform(engine: &mut Engine, store: &MemoryStore) {
    while let Some(e) = engine.poll_effect() {
        match e {
            Effect::Append {
                order,
                changes,
                record,
            } => store.append(order, &changes, &record).unwrap(),
            Effect::Record { order, record } => store.put_record(order, &record).unwrap(),
            Effect::Compact {
                order,
                snapshot,
                record,
            } => store.compact(order, &snapshot, &record).unwrap(),
            Effect::Remove { order } => store.remove(order).unwrap(),
            Effect::FeedSeq(s) => store.set_feed_seq(s).unwrap(),
            Effect::RelayData(d) => store.set_relay_data(&d).unwrap(),
            Effect::Connect => {}
        }
    }
    while engine.poll_event().is_some() {}
}

/// [`pump`], starting with `in_flight`: frames the device sent earlier.
fn exchange(
    engine: &mut Engine,
    store: &MemoryStore,
    relay: &mut MiniRelay,
    now: i64,
    mut in_flight: Vec<ClientFrame>,
) {
    for _ in 0..100 {
        perform(engine, store);
        let mut answers = Vec::new();
        let sent: Vec<ClientFrame> = std::iter::from_fn(|| engine.poll_transmit()).collect();
        for frame in in_flight.drain(..).chain(sent) {
            if let ClientFrame::Sync { order, data } = frame {
                let msg = sync::Message::decode(&data).unwrap();
                relay
                    .doc
                    .receive_sync_message(&mut relay.sync, msg)
                    .unwrap();
                if let Some(m) = relay.doc.generate_sync_message(&mut relay.sync) {
                    answers.push(RelayFrame::Sync {
                        order: order.clone(),
                        data: ByteBuf::from(m.encode()),
                    });
                }
                answers.push(RelayFrame::Receipt {
                    order,
                    heads: heads_to_wire(&relay.doc.get_heads()),
                    voucher: None,
                });
            } else if let ClientFrame::Changes {
                order,
                changes,
                heads,
                ..
            } = frame
            {
                // A push (protocol 2): applied, receipted with the device's heads; if the
                // relay holds something the device lacks, a sync round follows.
                let changes: Vec<automerge::Change> = changes
                    .iter()
                    .map(|c| automerge::Change::from_bytes(c.to_vec()).unwrap())
                    .collect();
                relay.doc.apply_changes(changes).unwrap();
                let theirs = crdt_model::wire::heads_from_wire(&heads).unwrap();
                let ahead = !relay.doc.get_changes_meta(&theirs).is_empty();
                if ahead && let Some(m) = relay.doc.generate_sync_message(&mut relay.sync) {
                    answers.push(RelayFrame::Sync {
                        order: order.clone(),
                        data: ByteBuf::from(m.encode()),
                    });
                }
                answers.push(RelayFrame::Receipt {
                    order,
                    heads,
                    voucher: None,
                });
            }
        }
        if answers.is_empty() {
            return;
        }
        for a in answers {
            engine.handle_frame(a, now);
        }
    }
    panic!("the device and the relay are still talking after 100 rounds");
}

fn online_engine(store: &MemoryStore, relay: &mut MiniRelay) -> Engine {
    let mut engine = Engine::new(identity(3), Vec::new(), 0, EngineConfig::default(), 0).unwrap();
    engine.handle_connected(T0);
    engine.handle_frame(
        RelayFrame::Welcome {
            protocol: Version::CURRENT,
            relay: "relay".into(),
            store: "s1".into(),
            feed_seq: 0,
            data: None,
        },
        T0,
    );
    pump(&mut engine, store, relay, T0);
    engine
}

fn take_cash(
    engine: &mut Engine,
    order: OrderId,
    now: i64,
    rng: &mut dyn Entropy,
) -> Result<crdt_model::PaymentId, ReplicatorError> {
    engine.edit(order, now, Trigger::PaymentCaptured, |o| {
        o.add_payment(Timestamp(now), rng, cash(700), PaymentState::Captured)
    })
}

#[test]
fn an_undone_edit_is_never_offered_to_the_relay_and_the_retry_reaches_it_once() {
    let store = MemoryStore::new();
    let mut relay = MiniRelay {
        doc: Automerge::new(),
        sync: sync::State::new(),
    };
    let mut engine = online_engine(&store, &mut relay);
    let mut rng = SplitMix64::new(4);
    engine.begin();
    let order = engine.create_order(T0, &mut rng, eur()).unwrap();
    engine.commit();
    pump(&mut engine, &store, &mut relay, T0);
    engine.begin();
    engine
        .edit(order, T0 + 1, Trigger::LocalEdit, |o| {
            o.add_line(Timestamp(T0 + 1), &mut rng, line("Soup", 700, 1))
        })
        .unwrap();
    engine.commit();
    pump(&mut engine, &store, &mut relay, T0 + 1);
    assert_eq!(engine.sync_status(order), Some(LocalSyncStatus::Synced));
    let before = engine.view(order).unwrap();
    let stored = store.orders().unwrap();

    // The payment is made and offered to the relay (queued), then its write fails.
    engine.begin();
    take_cash(&mut engine, order, T0 + 2, &mut rng).unwrap();
    let undone = engine.order(order).unwrap().heads();
    assert_eq!(engine.sync_status(order), Some(LocalSyncStatus::Charged));
    engine.rollback().unwrap();
    assert_eq!(engine.poll_effect(), None);
    assert_eq!(engine.poll_transmit(), None);
    assert_eq!(engine.poll_event(), None);
    assert_eq!(engine.view(order).unwrap(), before);
    assert_eq!(engine.sync_status(order), Some(LocalSyncStatus::Synced));
    assert!(
        engine
            .order(order)
            .unwrap()
            .doc()
            .get_change_by_hash(&undone[0])
            .is_none()
    );

    // Later successful writes and syncs never carry it.
    engine.begin();
    let payment = take_cash(&mut engine, order, T0 + 3, &mut rng).unwrap();
    engine.commit();
    pump(&mut engine, &store, &mut relay, T0 + 3);
    assert_eq!(engine.sync_status(order), Some(LocalSyncStatus::Synced));
    assert!(relay.doc.get_change_by_hash(&undone[0]).is_none());
    assert_eq!(relay.doc.get_heads(), engine.order(order).unwrap().heads());
    let at_relay = crdt_model::view_of(&relay.doc).unwrap();
    assert_eq!(at_relay.payments.len(), 1);
    assert_eq!(at_relay.payments[0].id, payment);
    assert_eq!(at_relay, engine.view(order).unwrap());
    let now_stored = store.orders().unwrap();
    assert_ne!(now_stored, stored);
    let restarted = Engine::new(identity(3), now_stored, 0, EngineConfig::default(), 0).unwrap();
    assert_eq!(restarted.view(order).unwrap(), at_relay);
}

/// The undo rebuilds the document from its changes; a change from the relay still waiting
/// for a dependency is not among them, and the relay believes it was delivered. The device
/// gets it again, on the same connection.
#[test]
fn a_relay_change_waiting_for_a_dependency_is_not_lost_by_an_undo() {
    let store = MemoryStore::new();
    let mut relay = MiniRelay {
        doc: Automerge::new(),
        sync: sync::State::new(),
    };
    let mut engine = online_engine(&store, &mut relay);
    let mut rng = SplitMix64::new(7);
    engine.begin();
    let order = engine.create_order(T0, &mut rng, eur()).unwrap();
    engine.commit();
    pump(&mut engine, &store, &mut relay, T0);
    assert_eq!(relay.doc.get_heads(), engine.order(order).unwrap().heads());

    // Another till adds two lines at the relay, the second on top of the first. The relay
    // takes the device to have the first (a Bloom filter false positive) and sends the second
    // alone, which has to wait on the device.
    let other = Writer::new(
        DeviceId::generate(Timestamp(T0), &mut SplitMix64::new(8)),
        1,
    );
    let mut shared = Order::from_doc(relay.doc.clone(), other).unwrap();
    shared
        .add_line(Timestamp(T0 + 1), &mut rng, line("Cake", 400, 1))
        .unwrap();
    shared
        .add_line(Timestamp(T0 + 2), &mut rng, line("Tea", 300, 1))
        .unwrap();
    relay.doc = shared.into_doc();
    let second = relay.doc.get_heads();
    let waiting = relay.doc.get_change_by_hash(&second[0]).unwrap();
    relay.sync.sent_hashes.insert(second[0]);
    let msg = sync::Message {
        heads: second.clone(),
        need: Vec::new(),
        have: Vec::new(),
        changes: vec![waiting.raw_bytes().to_vec()].into(),
        flags: None,
        version: sync::MessageVersion::V1,
    };
    engine.handle_frame(
        RelayFrame::Sync {
            order: order.to_string(),
            data: ByteBuf::from(msg.encode()),
        },
        T0 + 3,
    );
    perform(&mut engine, &store);
    let in_flight: Vec<ClientFrame> = std::iter::from_fn(|| engine.poll_transmit()).collect();
    assert_eq!(engine.view(order).unwrap().lines.len(), 0, "waiting");

    engine.begin();
    take_cash(&mut engine, order, T0 + 4, &mut rng).unwrap();
    engine.rollback().unwrap();

    exchange(&mut engine, &store, &mut relay, T0 + 5, in_flight);
    assert_eq!(engine.order(order).unwrap().heads(), second);
    assert_eq!(engine.view(order).unwrap().lines.len(), 2);
    assert!(engine.view(order).unwrap().payments.is_empty());
    assert_eq!(engine.sync_status(order), Some(LocalSyncStatus::Synced));
}

#[test]
fn an_undone_create_or_fetch_leaves_no_order_behind() {
    let store = MemoryStore::new();
    let mut relay = MiniRelay {
        doc: Automerge::new(),
        sync: sync::State::new(),
    };
    let mut engine = online_engine(&store, &mut relay);
    let mut rng = SplitMix64::new(5);
    engine.begin();
    let order = engine.create_order(T0, &mut rng, eur()).unwrap();
    engine.rollback().unwrap();
    assert!(engine.order_ids().is_empty());
    assert_eq!(engine.sync_status(order), None);
    assert_eq!(engine.poll_effect(), None);
    assert_eq!(engine.poll_transmit(), None);
    assert_eq!(engine.poll_event(), None);

    engine.begin();
    engine.fetch(order, T0);
    engine.rollback().unwrap();
    assert_eq!(engine.sync_status(order), None);
    assert_eq!(engine.poll_effect(), None);
    assert_eq!(engine.poll_transmit(), None);
}

// ----- property ------------------------------------------------------------------------------

/// One call of the till's API.
#[derive(Clone, Debug)]
enum Op {
    AddLine(i64, i64),
    /// Changes the quantity of line `n % lines` (or adds one if there is none).
    ChangeQuantity(usize, i64),
    RemoveLine(usize),
    TakeCash(i64),
    CompleteSale,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1i64..2_000, 1i64..4).prop_map(|(p, q)| Op::AddLine(p, q)),
        2 => (any::<usize>(), prop_oneof![-2i64..0, 1i64..3])
            .prop_map(|(n, d)| Op::ChangeQuantity(n, d)),
        1 => any::<usize>().prop_map(Op::RemoveLine),
        3 => (1i64..3_000).prop_map(Op::TakeCash),
        1 => Just(Op::CompleteSale),
    ]
}

fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        5 => Just(Fault::None),
        3 => Just(Fault::Refuse),
        1 => Just(Fault::LandThenFail),
    ]
}

async fn call(
    till: &Replicator,
    order: OrderId,
    view: &OrderView,
    op: &Op,
) -> Result<(), ReplicatorError> {
    let pick = |n: usize| view.lines.get(n % view.lines.len().max(1)).map(|l| l.id);
    match op {
        Op::AddLine(p, q) => till.add_line(order, line("Item", *p, *q)).await.map(drop),
        Op::ChangeQuantity(n, d) => match pick(*n) {
            Some(l) => till.change_quantity(order, l, *d).await,
            None => till.add_line(order, line("Item", 100, 1)).await.map(drop),
        },
        Op::RemoveLine(n) => match pick(*n) {
            Some(l) => till.remove_line(order, l).await,
            None => till.add_line(order, line("Item", 100, 1)).await.map(drop),
        },
        Op::TakeCash(a) => till.take_payment(order, cash(*a)).await.map(drop),
        Op::CompleteSale => till.complete_sale(order, None).await.map(drop),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32),
        ..ProptestConfig::default()
    })]

    /// After every `Err`, the order is as before the call (and, unless the failed write
    /// landed, so is the store); after every `Ok`, the store holds exactly what the till
    /// shows (once a change was stored since a failed write that landed: every call here
    /// changes the order or fails). A restart at the end finds it too.
    #[test]
    fn err_means_nothing_happened_and_ok_means_durable(
        steps in prop::collection::vec((op(), fault()), 1..25),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = FaultyStore::new();
            let till = open(store.clone(), 6).await;
            let order = till.create_order(eur()).await.unwrap();
            // Offline from here on: the status stays Delayed unless a call changes it.
            till.add_line(order, line("Bread", 300, 1)).await.unwrap();
            let mut landed = false;
            for (op, fault) in &steps {
                let before = till.view(order).await.unwrap();
                let status = till.sync_status(order).await;
                let durable = reopened_view(&store, order).unwrap();
                store.set(*fault);
                let result = call(&till, order, &before, op).await;
                store.set(Fault::None);
                let now = till.view(order).await.unwrap();
                match result {
                    Ok(()) => {
                        prop_assert_eq!(*fault, Fault::None, "{:?} succeeded without a durable write", op);
                        prop_assert_ne!(&now, &before);
                        prop_assert_eq!(reopened_view(&store, order).unwrap(), now);
                        landed = false;
                    }
                    Err(e) => {
                        prop_assert_eq!(&now, &before, "{:?} failed ({}) but changed the order", op, e);
                        prop_assert_eq!(till.sync_status(order).await, status);
                        landed |= *fault == Fault::LandThenFail;
                        if !landed {
                            prop_assert_eq!(reopened_view(&store, order).unwrap(), durable);
                        }
                    }
                }
            }
            if landed && till.add_line(order, line("Last", 100, 1)).await.is_ok() {
                landed = false;
            }
            let last = till.view(order).await.unwrap();
            till.close().await;
            drop(till);
            let till = open(Arc::new(store.crash_copy()), 6).await;
            let restarted = till.view(order).await.unwrap();
            if !landed {
                prop_assert_eq!(restarted, last);
            }
            till.close().await;
            Ok(())
        })?;
    }
}
