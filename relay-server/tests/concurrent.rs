//! Concurrent terminals of one store through one relay (property test): each terminal applies
//! random legal operations — creating orders, adding and removing lines, changing quantities
//! and prices, paying, moving payments and statuses, completing sales — to its own orders and
//! to orders other terminals created (learnt from the feed and fetched), syncing at random
//! moments, all at the same time. Afterwards:
//!
//! * nothing was rejected, refused or unavailable (every operation was legal);
//! * the relay's stored document of each order holds every receipted head and nothing beyond
//!   the union of what was receipted;
//! * once every terminal has synced every order it holds, all of them and the relay have the
//!   same heads and the same `OrderView`;
//! * numbers are exactly 1..=n, one per order.
//!
//! 8 cases by default; `PROPTEST_CASES=200` for a long run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use automerge::sync::SyncDoc;
use automerge::{ChangeHash, ReadDoc};
use common::TestRelay;
use common::terminal::Terminal;
use crdt_model::*;
use proptest::prelude::*;
use relay_server::store::RelayStore;

const STORE: &str = "s1";
/// How long a live relay may take to answer before the test calls it a hang.
const PATIENCE: Duration = Duration::from_secs(10);

/// One step of one terminal. `pick`s select among what the terminal holds at that moment.
#[derive(Clone, Debug)]
enum Op {
    Create,
    AddLine {
        pick: u8,
        price: i64,
        qty: i64,
    },
    ChangeQty {
        pick: u8,
        line: u8,
        delta: i64,
    },
    RemoveLine {
        pick: u8,
        line: u8,
    },
    SetPrice {
        pick: u8,
        line: u8,
        price: i64,
    },
    Pay {
        pick: u8,
        amount: i64,
        card: bool,
    },
    MovePayment {
        pick: u8,
        payment: u8,
        to: u8,
    },
    SetStatus {
        pick: u8,
        status: u8,
    },
    CompleteSale {
        pick: u8,
    },
    /// Fetch an order another terminal created (from the feed) and add a line to it.
    FetchOther {
        pick: u8,
        price: i64,
    },
    /// Sync one order now (until receipted).
    Sync {
        pick: u8,
    },
    /// Apply whatever the relay has sent meanwhile.
    Drain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        4 => (any::<u8>(), 0i64..2_000, 1i64..4)
            .prop_map(|(pick, price, qty)| Op::AddLine { pick, price, qty }),
        3 => (any::<u8>(), any::<u8>(), prop_oneof![Just(-1i64), Just(1), Just(2)])
            .prop_map(|(pick, line, delta)| Op::ChangeQty { pick, line, delta }),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(pick, line)| Op::RemoveLine { pick, line }),
        2 => (any::<u8>(), any::<u8>(), 0i64..2_000)
            .prop_map(|(pick, line, price)| Op::SetPrice { pick, line, price }),
        2 => (any::<u8>(), 1i64..3_000, any::<bool>())
            .prop_map(|(pick, amount, card)| Op::Pay { pick, amount, card }),
        2 => (any::<u8>(), any::<u8>(), 0u8..3)
            .prop_map(|(pick, payment, to)| Op::MovePayment { pick, payment, to }),
        1 => (any::<u8>(), 0u8..3).prop_map(|(pick, status)| Op::SetStatus { pick, status }),
        1 => any::<u8>().prop_map(|pick| Op::CompleteSale { pick }),
        3 => (any::<u8>(), 0i64..2_000).prop_map(|(pick, price)| Op::FetchOther { pick, price }),
        5 => any::<u8>().prop_map(|pick| Op::Sync { pick }),
        1 => Just(Op::Drain),
    ]
}

/// Two to four terminals, each with its own list of operations.
fn scenario() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 5..30), 2..=4)
}

fn nth<T: Copy>(items: impl IntoIterator<Item = T>, pick: u8) -> Option<T> {
    let items: Vec<T> = items.into_iter().collect();
    (!items.is_empty()).then(|| items[usize::from(pick) % items.len()])
}

/// Applies one operation. Local refusals by the model (a closed order, a quantity below one, a
/// backwards payment move) leave no change and are fine: the op simply does nothing.
async fn apply(t: &mut Terminal, op: &Op, store: &RelayStore) {
    let order = |t: &Terminal, pick: u8| nth(t.orders.keys().copied(), pick);
    match *op {
        Op::Create => {
            t.create(STORE);
        }
        Op::AddLine { pick, price, qty } => {
            let Some(id) = order(t, pick) else { return };
            add_line(t, id, price, qty);
        }
        Op::ChangeQty { pick, line, delta } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let lines = o.view().unwrap().lines;
            if let Some(l) = nth(lines.iter().map(|l| l.id), line) {
                let _ = o.change_quantity(at, l, delta);
            }
        }
        Op::RemoveLine { pick, line } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let lines = o.view().unwrap().lines;
            if let Some(l) = nth(lines.iter().map(|l| l.id), line) {
                let _ = o.remove_line(at, l);
            }
        }
        Op::SetPrice { pick, line, price } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let lines = o.view().unwrap().lines;
            if let Some(l) = nth(lines.iter().map(|l| l.id), line) {
                let _ = o.set_unit_price(at, l, price);
            }
        }
        Op::Pay { pick, amount, card } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let (kind, state) = if card {
                (PaymentKind::CardTerminal, PaymentState::Pending)
            } else {
                (PaymentKind::Cash, PaymentState::Captured)
            };
            let draft = PaymentDraft {
                kind,
                amount,
                reference: String::new(),
            };
            let _ = o.add_payment(at, &mut t.rng, draft, state);
        }
        Op::MovePayment { pick, payment, to } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let payments = o.view().unwrap().payments;
            let Some(p) = nth(payments.iter().map(|p| p.id), payment) else {
                return;
            };
            let _ = match to {
                0 => o.authorize_payment(at, &mut t.rng, p, "AUTH-OK"),
                1 => o.capture_payment(at, &mut t.rng, p),
                _ => o.void_payment(at, &mut t.rng, p),
            };
        }
        Op::SetStatus { pick, status } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let status = [
                ActiveStatus::InProgress,
                ActiveStatus::InDelivery,
                ActiveStatus::Delayed,
            ][usize::from(status % 3)];
            let _ = o.set_status(at, &mut t.rng, status);
        }
        Op::CompleteSale { pick } => {
            let Some(id) = order(t, pick) else { return };
            let at = t.tick();
            let o = t.orders.get_mut(&id).unwrap();
            let due = o.view().unwrap().totals.balance_due;
            let last = (due > 0).then(|| {
                FinalPayment::New(PaymentDraft {
                    kind: PaymentKind::Cash,
                    amount: due,
                    reference: String::new(),
                })
            });
            let _ = o.complete_sale(at, &mut t.rng, last);
        }
        Op::FetchOther { pick, price } => {
            t.drain().await.expect("relay connection");
            let held: BTreeSet<OrderId> = t.orders.keys().copied().collect();
            let Some(id) = nth(t.feed.difference(&held).copied(), pick) else {
                return;
            };
            assert_eq!(t.fetch(id, PATIENCE).await, Ok(true), "fetch {id}");
            add_line(t, id, price, 1);
        }
        Op::Sync { pick } => {
            let Some(id) = order(t, pick) else { return };
            if t.sync_until_receipted(id, PATIENCE).await != Ok(true) {
                panic!("sync: {}", diagnose(store, t, id));
            }
        }
        Op::Drain => t.drain().await.expect("relay connection"),
    }
}

fn add_line(t: &mut Terminal, id: OrderId, price: i64, qty: i64) {
    let at = t.tick();
    let o = t.orders.get_mut(&id).unwrap();
    let draft = LineDraft {
        sku: format!("sku-{price}"),
        name: format!("item {price}"),
        unit_price: price,
        quantity: qty,
        ..Default::default()
    };
    let _ = o.add_line(at, &mut t.rng, draft);
}

/// What the terminal and the relay hold of `id`, for a failure message.
fn diagnose(store: &RelayStore, t: &Terminal, id: OrderId) -> String {
    let mine = &t.orders[&id];
    let stored = store.load_order(id).unwrap();
    let relay_doc = stored.as_ref().map(|s| s.to_doc().unwrap());
    let mine_missing_at_relay: Vec<ChangeHash> = mine
        .doc()
        .get_changes(&[])
        .iter()
        .map(|c| c.hash())
        .filter(|h| {
            relay_doc
                .as_ref()
                .is_none_or(|d| d.get_change_by_hash(h).is_none())
        })
        .collect();
    let relay_missing_here: Vec<ChangeHash> = relay_doc
        .as_ref()
        .map(|d| {
            d.get_changes(&[])
                .iter()
                .map(|c| c.hash())
                .filter(|h| mine.doc().get_change_by_hash(h).is_none())
                .collect()
        })
        .unwrap_or_default();
    format!(
        "terminal {} order {id}: our heads {:?}, last receipt {:?}, stored heads {:?}; \
         ours missing at the relay {mine_missing_at_relay:?}, relay's missing here \
         {relay_missing_here:?}, our queued changes missing deps {:?}, unexpected {:?}, \
         frames out {} in {}",
        t.device,
        mine.heads(),
        t.last_receipt.get(&id),
        stored.map(|s| s
            .meta
            .heads
            .iter()
            .map(|h| ChangeHash(*h))
            .collect::<Vec<_>>()),
        mine.doc().get_missing_deps(&[]),
        t.unexpected,
        t.frames_out,
        t.frames_in,
    )
}

fn sorted(mut heads: Vec<ChangeHash>) -> Vec<ChangeHash> {
    heads.sort_unstable();
    heads
}

async fn run(scenario: Vec<Vec<Op>>) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let relay = TestRelay::start().await;
    let mut tasks = Vec::new();
    for (i, ops) in scenario.into_iter().enumerate() {
        let (device, token) = relay.device(STORE, &format!("till-{i}"));
        let addr = relay.addr;
        let store = std::sync::Arc::clone(&relay.store);
        tasks.push(tokio::spawn(async move {
            let mut t = Terminal::new(device, token, 0xC0FFEE + i as u64);
            t.connect(addr).await.expect("connect");
            // Every terminal starts with an order of its own, known to the relay.
            let first = t.create(STORE);
            assert_eq!(t.sync_until_receipted(first, PATIENCE).await, Ok(true));
            for op in &ops {
                apply(&mut t, op, &store).await;
            }
            t
        }));
    }
    let mut terminals = Vec::new();
    for task in tasks {
        terminals.push(task.await.unwrap());
    }

    // Settle: every terminal pushes everything it holds (each until receipted and numbered),
    // so afterwards nobody has anything the relay lacks and nothing more is committed.
    for t in &mut terminals {
        let ids: Vec<OrderId> = t.orders.keys().copied().collect();
        for id in ids {
            if t.sync_until_receipted(id, PATIENCE).await != Ok(true) {
                panic!("settle: {}", diagnose(&relay.store, t, id));
            }
            let numbered = t
                .pump(PATIENCE, |t| t.orders[&id].number().unwrap().is_some())
                .await;
            assert_eq!(numbered, Ok(true), "order {id} never got its number");
        }
    }
    // Converge: a fresh connection per terminal syncs every order it holds to the relay's heads.
    for t in &mut terminals {
        t.bye().await;
        t.connect(relay.addr).await.expect("reconnect");
        let ids: Vec<OrderId> = t.orders.keys().copied().collect();
        for id in ids {
            t.last_receipt.remove(&id);
            t.push(id).await.unwrap();
            assert_eq!(t.pump(PATIENCE, |t| t.in_step(id)).await, Ok(true));
        }
        t.bye().await;
    }

    for t in &terminals {
        assert!(
            t.unexpected.is_empty(),
            "legal operations got {:?}",
            t.unexpected
        );
    }
    let mut receipted: BTreeMap<OrderId, Vec<ChangeHash>> = BTreeMap::new();
    for t in &terminals {
        for r in t.receipts.lock().unwrap().iter() {
            receipted
                .entry(r.order)
                .or_default()
                .extend(r.heads.iter().copied());
        }
    }
    let held: BTreeSet<OrderId> = terminals
        .iter()
        .flat_map(|t| t.orders.keys().copied())
        .collect();
    for t in &terminals {
        for o in t.orders.values() {
            let creator = o.view().unwrap().created_by;
            assert!(
                terminals
                    .iter()
                    .any(|c| c.device == creator && c.orders.contains_key(&o.id())),
                "order {} is held by its creating terminal",
                o.id()
            );
        }
    }
    assert_eq!(relay.store.order_count().unwrap(), held.len() as u64);

    let reader = relay.store.identity().unwrap().writer();
    let mut numbers = Vec::new();
    let (mut shared, mut late, mut conflicts) = (0, 0, 0);
    for id in &held {
        let stored = relay
            .store
            .load_order(*id)
            .unwrap()
            .unwrap_or_else(|| panic!("order {id} is not stored"));
        let doc = stored.to_doc().unwrap();
        // Every receipted head is there, and nothing that no receipt covered.
        let heads = &receipted[id];
        for h in heads {
            assert!(
                doc.get_change_by_hash(h).is_some(),
                "receipted {h} of {id} lost"
            );
        }
        assert!(
            doc.get_changes(heads).is_empty(),
            "order {id}: the relay holds changes no receipt covered"
        );
        let relay_order = Order::from_doc(doc, reader.clone()).unwrap();
        let view = relay_order.view().unwrap();
        let authors: BTreeSet<_> = relay_order
            .doc()
            .get_changes(&[])
            .iter()
            .filter_map(|c| device_of_actor(c.actor_id()))
            .filter(|d| *d != reader.device)
            .collect();
        shared += usize::from(authors.len() > 1);
        late += view.late_edits.len();
        conflicts += view.conflicts.len();
        assert_eq!(view.number, Some(stored.meta.number.0));
        assert_eq!(
            sorted(relay_order.heads()),
            sorted(stored.meta.heads.iter().map(|h| ChangeHash(*h)).collect())
        );
        numbers.push(stored.meta.number.0);
        for t in &terminals {
            if let Some(mine) = t.orders.get(id) {
                // Which changes differ, by whom, and what they say, for the failure message.
                let lacking: Vec<String> = relay_order
                    .doc()
                    .get_changes(&[])
                    .iter()
                    .filter(|c| mine.doc().get_change_by_hash(&c.hash()).is_none())
                    .map(|c| {
                        format!(
                            "{} by {:?} at {} seq {} ({} ops, deps {:?})",
                            c.hash(),
                            device_of_actor(c.actor_id()),
                            c.timestamp(),
                            c.seq(),
                            c.len(),
                            c.deps()
                        )
                    })
                    .collect();
                assert_eq!(
                    sorted(mine.heads()),
                    sorted(relay_order.heads()),
                    "order {id}: terminal {} is not at the relay's heads; it lacks {lacking:?}; \
                     terminals: {:?}",
                    t.device,
                    terminals.iter().map(|t| t.device).collect::<Vec<_>>()
                );
                assert_eq!(mine.view().unwrap(), view, "order {id}: views differ");
            }
        }
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=held.len() as u64).collect::<Vec<_>>());
    let frames: u64 = terminals.iter().map(|t| t.frames_out).sum();
    eprintln!(
        "{} terminals, {} orders ({shared} edited by several terminals), {late} late edits, \
         {conflicts} conflicts, {frames} frames sent",
        terminals.len(),
        held.len()
    );
    let report = relay.store.check().unwrap();
    assert!(report.is_ok(), "{:?}", report.errors);
    relay.stop().await;
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        max_shrink_iters: 32,
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::WithSource("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn concurrent_terminals_converge_on_the_relay(scenario in scenario()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(run(scenario));
    }
}

/// A change that reaches the relay before its dependency must not be lost.
///
/// Automerge's sync protocol lets a sender leave out a change that the receiver's Bloom filter
/// claims to hold (a false positive, roughly 1 change in 100), so one message can carry a change
/// whose dependency only comes in a later round: a receiver keeps such a change queued until the
/// dependency arrives. This replays that case with a standard sync loop: the terminal's
/// dependency `c2` happens to be a false positive of the relay's filter, so Automerge sends `c3`
/// (which depends on `c2`) first. The relay must end up storing and receipting both.
#[tokio::test]
async fn a_change_sent_before_its_dependency_is_stored() {
    // Building the case needs the relay's filter in a given state; about one run in fifteen
    // the sync rounds leave it otherwise (c2 then travels with c3). Such a run proves nothing
    // and is tried again with another terminal seed.
    for seed in 42..52 {
        if change_before_dependency(seed).await {
            return;
        }
    }
    panic!("the case could not be built in ten tries");
}

/// One try of [`a_change_sent_before_its_dependency_is_stored`]; `false` if c3 would not
/// travel alone.
async fn change_before_dependency(seed: u64) -> bool {
    let relay = TestRelay::start().await;
    let (device, token) = relay.device(STORE, "till");
    let mut t = Terminal::new(device, token, seed);
    t.connect(relay.addr).await.unwrap();
    let id = t.create(STORE);
    assert!(t.push(id).await.unwrap());
    // The relay commits the order, then its number, and sends the number change with a Bloom
    // filter of what it holds beyond our common heads.
    let msg = loop {
        let m = t
            .next_sync_for(id, PATIENCE)
            .await
            .unwrap()
            .expect("relay sync");
        if !m.changes.is_empty() {
            break m;
        }
        t.receive_only(id, m);
        t.push(id).await.unwrap();
    };
    t.receive_only(id, msg);
    let have = t.sync_state(id).unwrap().their_have.clone().unwrap();
    let bloom = have[0].bloom.clone();

    // The cashier adds a line (c2) that the filter happens to claim, then one more (c3).
    let mut tries = 0u32;
    let c2 = loop {
        tries += 1;
        assert!(tries < 1_000_000, "no false positive found");
        let mut o = t.orders[&id].clone();
        let at = t.tick();
        let draft = LineDraft {
            name: format!("item {tries}"),
            unit_price: 100,
            quantity: 1,
            ..Default::default()
        };
        o.add_line(at, &mut t.rng, draft).unwrap();
        let h = o.doc().get_last_local_change().unwrap().hash();
        if bloom.contains_hash(&h) {
            t.orders.insert(id, o);
            break h;
        }
    };
    add_line(&mut t, id, 250, 1);
    let c3 = t.orders[&id].doc().get_last_local_change().unwrap().hash();

    // Automerge's own next message carries c3 but not c2: applied to the relay's document it
    // leaves c3 waiting for c2.
    let mut probe = t.sync_state(id).unwrap().clone();
    let next = t.orders[&id]
        .doc()
        .generate_sync_message(&mut probe)
        .unwrap();
    let mut at_relay = relay
        .store
        .load_order(id)
        .unwrap()
        .unwrap()
        .to_doc()
        .unwrap();
    for chunk in next.changes.iter() {
        at_relay.load_incremental(chunk).unwrap();
    }
    if at_relay.get_missing_deps(&[]) != vec![c2] {
        eprintln!("seed {seed}: c3 {c3} would not travel alone; trying another seed");
        relay.stop().await;
        return false;
    }

    // The standard sync loop from here on must get both stored and receipted.
    assert!(t.push(id).await.unwrap());
    let done = t.pump(Duration::from_secs(5), |t| t.receipted(id)).await;
    assert_eq!(
        done,
        Ok(true),
        "c3 was never receipted: {}",
        diagnose(&relay.store, &t, id)
    );
    relay.stop().await;
    true
}
