//! Simulation: several terminals' sans-IO engines and an in-memory relay core exchange frames
//! over a simulated network on a virtual clock, with cut connections, partitions, device
//! crashes (engine rebuilt from what its store had made durable) and random cashier work; then
//! the network heals and everything must be synced and identical.
//!
//! The relay double implements the protocol's relay side in memory (policy check, receipts,
//! numbers, feed), without sockets or disk, so thousands of steps run in milliseconds.
//! `PROPTEST_CASES` raises the number of seeds (default 32); `SIM_TRACE=1` prints every frame,
//! cut and crash of a run (use it with `PROPTEST_CASES=1` to replay a saved failure).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};

use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash};
use crdt_model::wire::{ClientFrame, FeedEntry, RelayFrame, Version, heads_to_wire};
use crdt_model::*;
use proptest::prelude::*;
use replicator::core::{Effect, Engine, EngineConfig};
use replicator::{Identity, LocalSyncStatus, MemoryStore, Store};
use serde_bytes::ByteBuf;

const STORE: &str = "s1";

struct RelayDoc {
    doc: Automerge,
    number: u64,
    feed_seq: u64,
}

/// The relay's side of the protocol, in memory.
struct SimRelay {
    writer: Writer,
    docs: BTreeMap<OrderId, RelayDoc>,
    next_number: u64,
    feed_seq: u64,
    /// Per connected device: sync state per order, and whether it said hello.
    conns: HashMap<usize, (DeviceId, HashMap<OrderId, sync::State>)>,
    rejections: usize,
}

impl SimRelay {
    fn new() -> Self {
        let mut rng = SplitMix64::new(999);
        let relay = DeviceId::generate(Timestamp(0), &mut rng);
        Self {
            writer: Writer::new(relay, 7),
            docs: BTreeMap::new(),
            next_number: 1,
            feed_seq: 0,
            conns: HashMap::new(),
            rejections: 0,
        }
    }

    fn feed_entry(&self, id: OrderId) -> FeedEntry {
        let d = &self.docs[&id];
        let status = Order::from_doc(d.doc.clone(), self.writer.clone())
            .unwrap()
            .status()
            .unwrap();
        FeedEntry {
            seq: d.feed_seq,
            order: id.to_string(),
            number: Some(d.number),
            status: status.as_str().into(),
            heads: heads_to_wire(&d.doc.get_heads()),
        }
    }

    fn handle(
        &mut self,
        from: usize,
        device: DeviceId,
        frame: ClientFrame,
        out: &mut Vec<(usize, RelayFrame)>,
    ) {
        match frame {
            ClientFrame::Hello { feed_since, .. } => {
                self.conns.insert(from, (device, HashMap::new()));
                out.push((
                    from,
                    RelayFrame::Welcome {
                        protocol: Version::CURRENT,
                        relay: self.writer.device.to_string(),
                        store: STORE.into(),
                        feed_seq: self.feed_seq,
                    },
                ));
                let mut entries: Vec<FeedEntry> = self
                    .docs
                    .keys()
                    .map(|id| self.feed_entry(*id))
                    .filter(|e| e.seq > feed_since)
                    .collect();
                entries.sort_by_key(|e| e.seq);
                if !entries.is_empty() {
                    out.push((from, RelayFrame::Feed { entries }));
                }
            }
            ClientFrame::Sync { order, data } => {
                self.on_sync(from, order.parse().unwrap(), &data, out)
            }
            ClientFrame::Ping { nonce } => out.push((from, RelayFrame::Pong { nonce })),
            ClientFrame::Pong { .. } | ClientFrame::Bye => {}
        }
    }

    fn on_sync(
        &mut self,
        from: usize,
        id: OrderId,
        data: &[u8],
        out: &mut Vec<(usize, RelayFrame)>,
    ) {
        let msg = sync::Message::decode(data).unwrap();
        let Some((device, states)) = self.conns.get_mut(&from) else {
            return;
        };
        let device = *device;
        let known = self.docs.contains_key(&id);
        if !known && msg.changes.is_empty() && msg.heads.is_empty() {
            out.push((
                from,
                RelayFrame::Unavailable {
                    order: id.to_string(),
                },
            ));
            return;
        }
        let state = states.entry(id).or_default();
        let current = self
            .docs
            .get(&id)
            .map(|d| d.doc.clone())
            .unwrap_or_default();
        let mut fork = current.fork();
        fork.receive_sync_message(state, msg).unwrap();
        let new = fork.get_changes(&current.get_heads());
        if !new.is_empty() {
            let author = Author {
                device,
                store: StoreId::new(STORE).unwrap(),
                role: Role::Device,
            };
            if let Err(v) = validate(&current, &fork, &author) {
                self.rejections += 1;
                *state = sync::State::new();
                let hashes: Vec<ChangeHash> = new.iter().map(|c| c.hash()).collect();
                out.push((
                    from,
                    RelayFrame::Rejected {
                        order: id.to_string(),
                        code: v.code().into(),
                        message: v.to_string(),
                        changes: heads_to_wire(&hashes),
                    },
                ));
                return;
            }
            self.feed_seq += 1;
            let feed_seq = self.feed_seq;
            let fresh = !known;
            let entry = self.docs.entry(id).or_insert_with(|| RelayDoc {
                doc: Automerge::new(),
                number: 0,
                feed_seq,
            });
            entry.doc = fork.with_actor(self.writer.actor.clone());
            entry.feed_seq = feed_seq;
            if fresh {
                entry.number = self.next_number;
                self.next_number += 1;
                let mut o =
                    Order::from_doc(std::mem::take(&mut entry.doc), self.writer.clone()).unwrap();
                o.assign_number(Timestamp(0), OrderNumber(entry.number))
                    .unwrap();
                entry.doc = o.into_doc();
            }
            // Committed: receipt to the origin, sync to everyone following, feed to the store.
            let heads = entry.doc.get_heads();
            out.push((
                from,
                RelayFrame::Receipt {
                    order: id.to_string(),
                    heads: heads_to_wire(&heads),
                },
            ));
            let feed = self.feed_entry(id);
            let doc = self.docs[&id].doc.clone();
            for (conn, (_, states)) in self.conns.iter_mut() {
                if let Some(st) = states.get_mut(&id)
                    && let Some(m) = doc.generate_sync_message(st)
                {
                    out.push((
                        *conn,
                        RelayFrame::Sync {
                            order: id.to_string(),
                            data: ByteBuf::from(m.encode()),
                        },
                    ));
                }
                out.push((
                    *conn,
                    RelayFrame::Feed {
                        entries: vec![feed.clone()],
                    },
                ));
            }
        } else {
            if let Some(m) = current.generate_sync_message(state) {
                out.push((
                    from,
                    RelayFrame::Sync {
                        order: id.to_string(),
                        data: ByteBuf::from(m.encode()),
                    },
                ));
            }
            if known {
                out.push((
                    from,
                    RelayFrame::Receipt {
                        order: id.to_string(),
                        heads: heads_to_wire(&current.get_heads()),
                    },
                ));
            }
        }
    }
}

struct Terminal {
    engine: Engine,
    store: MemoryStore,
    identity: Identity,
    link_up: bool,
    to_relay: VecDeque<ClientFrame>,
    to_device: VecDeque<RelayFrame>,
    rng: SplitMix64,
}

impl Terminal {
    fn perform_effects(&mut self) {
        while let Some(e) = self.engine.poll_effect() {
            match e {
                Effect::Append {
                    order,
                    changes,
                    record,
                } => self.store.append(order, &changes, &record).unwrap(),
                Effect::Record { order, record } => {
                    let _ = self.store.put_record(order, &record);
                }
                Effect::Compact {
                    order,
                    snapshot,
                    record,
                } => self.store.compact(order, &snapshot, &record).unwrap(),
                Effect::Remove { order } => self.store.remove(order).unwrap(),
                Effect::FeedSeq(s) => self.store.set_feed_seq(s).unwrap(),
                Effect::Connect => {
                    self.link_up = true;
                }
            }
        }
        while self.engine.poll_event().is_some() {}
    }

    /// Durable effects first, then frames onto the wire.
    fn pump(&mut self, now: i64) {
        let was_up = self.link_up;
        self.perform_effects();
        if self.link_up && !was_up {
            self.engine.handle_connected(now);
            self.perform_effects();
        }
        if self.link_up {
            while let Some(f) = self.engine.poll_transmit() {
                self.to_relay.push_back(f);
            }
        } else {
            while self.engine.poll_transmit().is_some() {}
        }
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        backoff_min_ms: 50,
        backoff_max_ms: 400,
        retention_ms: i64::MAX / 4,
        ..EngineConfig::default()
    }
}

#[derive(Clone, Debug)]
enum Step {
    Cashier(usize, u8, u64),
    Deliver(usize),
    Cut(usize),
    Crash(usize),
    Tick(i64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0usize..4, 0u8..8, any::<u64>()).prop_map(|(t, op, x)| Step::Cashier(t, op, x)),
        8 => (0usize..4).prop_map(Step::Deliver),
        1 => (0usize..4).prop_map(Step::Cut),
        1 => (0usize..4).prop_map(Step::Crash),
        2 => (1i64..500).prop_map(Step::Tick),
    ]
}

struct World {
    relay: SimRelay,
    terms: Vec<Terminal>,
    now: i64,
    captured: BTreeMap<PaymentId, i64>,
}

impl World {
    fn new(n: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let terms = (0..n)
            .map(|i| {
                let identity = Identity {
                    device: DeviceId::generate(Timestamp(0), &mut rng),
                    store: StoreId::new(STORE).unwrap(),
                    epoch: i as u32 + 1,
                    relay_url: "sim".into(),
                    token: "sim".into(),
                };
                let store = MemoryStore::new();
                store.set_identity(&identity).unwrap();
                Terminal {
                    engine: Engine::new(identity.clone(), Vec::new(), 0, config(), seed ^ i as u64)
                        .unwrap(),
                    store,
                    identity,
                    link_up: false,
                    to_relay: VecDeque::new(),
                    to_device: VecDeque::new(),
                    rng: SplitMix64::new(seed.wrapping_add(i as u64 * 7919)),
                }
            })
            .collect();
        Self {
            relay: SimRelay::new(),
            terms,
            now: 1_000_000,
            captured: BTreeMap::new(),
        }
    }

    fn cut(&mut self, t: usize) {
        let term = &mut self.terms[t];
        if term.link_up {
            term.link_up = false;
            term.to_relay.clear();
            term.to_device.clear();
            self.relay.conns.remove(&t);
            term.engine.handle_disconnected(self.now);
            term.pump(self.now);
        }
    }

    fn apply(&mut self, s: &Step) {
        let n = self.terms.len();
        match *s {
            Step::Cashier(t, op, x) => {
                let t = t % n;
                let now = self.now;
                let term = &mut self.terms[t];
                let ids = term.engine.order_ids();
                let pick = (!ids.is_empty()).then(|| ids[(x as usize) % ids.len()]);
                let eur = Currency::new("EUR").unwrap();
                let rng = &mut term.rng;
                let _ = match (op, pick) {
                    (0, _) | (_, None) => term.engine.create_order(now, rng, eur).map(|_| ()),
                    (1 | 2, Some(id)) => {
                        term.engine
                            .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                                o.add_line(
                                    Timestamp(now),
                                    rng,
                                    LineDraft {
                                        name: "item".into(),
                                        unit_price: 100 + (x % 900) as i64,
                                        quantity: 1,
                                        ..Default::default()
                                    },
                                )
                                .map(|_| ())
                            })
                    }
                    (3, Some(id)) => {
                        term.engine
                            .edit(id, now, replicator::Trigger::PaymentCaptured, |o| {
                                o.add_payment(
                                    Timestamp(now),
                                    rng,
                                    PaymentDraft {
                                        kind: PaymentKind::Cash,
                                        amount: 50 + (x % 500) as i64,
                                        reference: String::new(),
                                    },
                                    PaymentState::Captured,
                                )
                                .map(|_| ())
                            })
                    }
                    (4, Some(id)) => {
                        term.engine
                            .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                                let due = o.view()?.totals.balance_due;
                                let last = (due > 0).then(|| {
                                    FinalPayment::New(PaymentDraft {
                                        kind: PaymentKind::Cash,
                                        amount: due,
                                        reference: String::new(),
                                    })
                                });
                                o.complete_sale(Timestamp(now), rng, last).map(|_| ())
                            })
                    }
                    (5, Some(id)) => {
                        term.engine
                            .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                                o.set_status(Timestamp(now), rng, ActiveStatus::InDelivery)
                            })
                    }
                    (6, Some(id)) => {
                        term.engine
                            .edit(id, now, replicator::Trigger::LocalEdit, |o| {
                                let line = o.view()?.lines.first().map(|l| l.id);
                                match line {
                                    Some(l) => o.change_quantity(Timestamp(now), l, 1),
                                    None => Ok(()),
                                }
                            })
                    }
                    (_, Some(id)) => {
                        term.engine
                            .edit(id, now, replicator::Trigger::DeleteRequested, |o| {
                                o.delete(Timestamp(now), rng)
                            })
                    }
                };
                term.pump(now);
                self.note_captured(t);
            }
            Step::Deliver(t) => {
                let t = t % n;
                let now = self.now;
                if let Some(f) = self.terms[t].to_relay.pop_front() {
                    if std::env::var("SIM_TRACE").is_ok() {
                        let desc = match &f {
                            ClientFrame::Sync { order, data } => {
                                let m = sync::Message::decode(data).unwrap();
                                format!(
                                    "sync {} heads {} need {} changes {}",
                                    &order[30..],
                                    m.heads.len(),
                                    m.need.len(),
                                    m.changes.len()
                                )
                            }
                            other => format!("{:?}", other).chars().take(60).collect(),
                        };
                        eprintln!("T{t} -> {desc}");
                    }
                    let device = self.terms[t].identity.device;
                    let mut out = Vec::new();
                    self.relay.handle(t, device, f, &mut out);
                    for (to, frame) in out {
                        if self.terms[to].link_up {
                            self.terms[to].to_device.push_back(frame);
                        }
                    }
                }
                if let Some(f) = self.terms[t].to_device.pop_front() {
                    if std::env::var("SIM_TRACE").is_ok() {
                        let desc = match &f {
                            RelayFrame::Sync { order, data } => {
                                let m = sync::Message::decode(data).unwrap();
                                format!(
                                    "sync {} heads {} need {} changes {}",
                                    &order[30..],
                                    m.heads.len(),
                                    m.need.len(),
                                    m.changes.len()
                                )
                            }
                            RelayFrame::Feed { entries } => format!(
                                "feed {:?}",
                                entries
                                    .iter()
                                    .map(|e| (&e.order[30..], e.seq, e.status.clone()))
                                    .collect::<Vec<_>>()
                            ),
                            other => format!("{:?}", other).chars().take(60).collect(),
                        };
                        eprintln!("T{t} <- {desc}");
                    }
                    self.terms[t].engine.handle_frame(f, now);
                    self.terms[t].pump(now);
                    self.note_captured(t);
                }
            }
            Step::Cut(t) => {
                if std::env::var("SIM_TRACE").is_ok() {
                    eprintln!("T{} CUT", t % n);
                }
                self.cut(t % n)
            }
            Step::Crash(t) => {
                let t = t % n;
                if std::env::var("SIM_TRACE").is_ok() {
                    eprintln!("T{t} CRASH");
                }
                self.cut(t);
                let term = &mut self.terms[t];
                // Only what the store made durable survives.
                let store = term.store.crash_copy().unwrap();
                let orders = store.load_orders().unwrap();
                if std::env::var("SIM_TRACE").is_ok() {
                    eprintln!(
                        "  crash: store has {:?}, engine had {:?}",
                        orders
                            .iter()
                            .map(|o| (o.order.to_string()[30..].to_owned(), o.tail.len()))
                            .collect::<Vec<_>>(),
                        term.engine
                            .order_ids()
                            .iter()
                            .map(|o| o.to_string()[30..].to_owned())
                            .collect::<Vec<_>>()
                    );
                }
                let feed = store.feed_seq().unwrap();
                term.engine = Engine::new(
                    term.identity.clone(),
                    orders,
                    feed,
                    config(),
                    self.now as u64,
                )
                .unwrap();
                term.store = store;
                term.link_up = false;
                term.pump(self.now);
            }
            Step::Tick(ms) => {
                self.now += ms;
                for term in &mut self.terms {
                    term.engine.handle_timeout(self.now);
                    term.pump(self.now);
                }
            }
        }
    }

    fn note_captured(&mut self, t: usize) {
        for id in self.terms[t].engine.order_ids() {
            if let Ok(v) = self.terms[t].engine.view(id) {
                for p in v
                    .payments
                    .iter()
                    .filter(|p| p.state >= PaymentState::Captured)
                {
                    self.captured.insert(p.id, p.amount);
                }
            }
        }
    }

    /// Heals the network and runs until nothing moves.
    fn settle(&mut self) {
        for _ in 0..20_000 {
            let busy = self
                .terms
                .iter()
                .any(|t| !t.to_relay.is_empty() || !t.to_device.is_empty());
            if !busy {
                // Let reconnects happen.
                let offline = self
                    .terms
                    .iter()
                    .any(|t| !t.link_up || !t.engine.is_online());
                if !offline {
                    return;
                }
                self.apply(&Step::Tick(500));
                continue;
            }
            for t in 0..self.terms.len() {
                self.apply(&Step::Deliver(t));
            }
        }
        panic!("the simulation did not settle");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(32), ..ProptestConfig::default() })]

    #[test]
    fn terminals_converge_with_the_relay_whatever_the_network_does(seed in any::<u64>(), n in 2usize..=4, steps in prop::collection::vec(step(), 20..150)) {
        let mut w = World::new(n, seed);
        for s in &steps {
            w.apply(s);
        }
        w.settle();
        // A last round of ticks so every device has fetched what the feed announced.
        for _ in 0..3 {
            w.apply(&Step::Tick(500));
            w.settle();
        }
        prop_assert_eq!(w.relay.rejections, 0, "legal cashier work is never refused");
        let numbers: Vec<u64> = w.relay.docs.values().map(|d| d.number).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (1..=numbers.len() as u64).collect::<Vec<_>>(), "numbers unique and gap-free");
        for (id, rd) in &w.relay.docs {
            let relay_view = Order::from_doc(rd.doc.clone(), w.relay.writer.clone()).unwrap().view().unwrap();
            for term in &w.terms {
                if let Ok(v) = term.engine.view(*id) {
                    prop_assert_eq!(&v, &relay_view, "device view differs from the relay's");
                    prop_assert_eq!(term.engine.sync_status(*id), Some(LocalSyncStatus::Synced));
                }
            }
            // Active orders reached every terminal through the feed.
            if !relay_view.status.is_terminal() {
                for term in &w.terms {
                    prop_assert!(term.engine.view(*id).is_ok(), "active order {} missing on a terminal", id);
                }
            }
        }
        // Every order any terminal still holds is on the relay; every captured payment too.
        for term in &w.terms {
            for id in term.engine.order_ids() {
                prop_assert!(w.relay.docs.contains_key(&id), "order {} never reached the relay", id);
            }
        }
        let mut on_relay = BTreeMap::new();
        for rd in w.relay.docs.values() {
            for p in Order::from_doc(rd.doc.clone(), w.relay.writer.clone()).unwrap().view().unwrap().payments {
                on_relay.insert(p.id, (p.amount, p.state));
            }
        }
        for (p, amount) in &w.captured {
            // A capture made on a terminal that crashed before it was durable never existed.
            if let Some((a, state)) = on_relay.get(p) {
                prop_assert_eq!(a, amount);
                prop_assert!(*state >= PaymentState::Captured);
            }
        }
    }
}
