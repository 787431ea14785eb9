//! Merge conformance: 2-5 replicas of one order apply random operations, exchange changes in
//! random orders and groupings (partial batches out of causal order, duplicates, partitions),
//! then fully merge. Whatever happened, every replica must end identical and no money may be
//! lost or doubled.
//!
//! 256 cases per property by default; `PROPTEST_CASES=5000 cargo test -p e2e --test
//! merge_conformance` for a long run.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use crdt_model::automerge::Change;
use crdt_model::*;
// The operation alphabet and its strategy are shared with the generated conformance vectors.
use e2e::conformance::generated::{GenOp as Op, scenario};
use proptest::prelude::*;

const T0: i64 = 1_700_000_000_000;

struct Replica {
    order: Order,
    rng: SplitMix64,
    now: i64,
}

struct World {
    replicas: Vec<Replica>,
    /// Every payment some replica saw captured (or refunded after capture), with its amount.
    captured: BTreeMap<PaymentId, i64>,
}

impl World {
    fn new(n: usize, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let at = Timestamp(T0);
        let creator = Writer::new(DeviceId::generate(at, &mut rng), 0);
        let new = NewOrder {
            id: OrderId::generate(at, &mut rng),
            store: StoreId::new("store-1").unwrap(),
            currency: Currency::new("EUR").unwrap(),
        };
        let origin = Order::create(new, creator, at, &mut rng).unwrap();
        let bytes = origin.save();
        let replicas = (0..n)
            .map(|i| {
                let mut r = SplitMix64::new(seed ^ (i as u64 + 1).wrapping_mul(0x9E37));
                let device = DeviceId::generate(at, &mut r);
                let order = Order::load(&bytes, Writer::new(device, i as u32 + 1)).unwrap();
                Replica {
                    order,
                    rng: r,
                    now: T0,
                }
            })
            .collect();
        Self {
            replicas,
            captured: BTreeMap::new(),
        }
    }

    fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
        (!items.is_empty()).then(|| items[i % items.len()])
    }

    /// Applies `op` on replica `i`. Local refusals are fine but must leave no change behind.
    fn apply(&mut self, i: usize, op: &Op) {
        let n = self.replicas.len();
        let was_terminal = self.replicas[i].order.status().unwrap().is_terminal();
        match op {
            Op::Merge { from } => {
                let j = from % n;
                if j != i {
                    let mut other = self.replicas[j].order.clone();
                    self.replicas[i].order.merge(&mut other).unwrap();
                }
            }
            Op::Partial { from, seed, take } => {
                let j = from % n;
                if j != i {
                    let mine = self.replicas[i].order.heads();
                    let mut changes: Vec<Change> = self.replicas[j].order.doc().get_changes(&mine);
                    let mut rng = SplitMix64::new(*seed);
                    for k in (1..changes.len()).rev() {
                        let m = (rng.next_u64() % (k as u64 + 1)) as usize;
                        changes.swap(k, m);
                    }
                    changes.truncate(*take);
                    // Duplicates are no-ops; changes with missing dependencies wait in the queue.
                    self.replicas[i]
                        .order
                        .apply_changes(changes.clone())
                        .unwrap();
                    self.replicas[i].order.apply_changes(changes).unwrap();
                }
            }
            local => {
                let r = &mut self.replicas[i];
                r.now += 1_000;
                let at = Timestamp(r.now);
                let heads = r.order.heads();
                let view = r.order.view().unwrap();
                let lines: Vec<LineId> = view.lines.iter().map(|l| l.id).collect();
                let payments: Vec<PaymentId> = view.payments.iter().map(|p| p.id).collect();
                let o = &mut r.order;
                let rng = &mut r.rng;
                let result = match local {
                    Op::AddLine { price, qty } => o
                        .add_line(
                            at,
                            rng,
                            LineDraft {
                                sku: "sku".into(),
                                name: "item".into(),
                                unit_price: *price,
                                quantity: *qty,
                                ..Default::default()
                            },
                        )
                        .map(|_| ()),
                    Op::ChangeQty { line, delta } => match Self::pick(&lines, *line) {
                        Some(l) => o.change_quantity(at, l, *delta),
                        None => Ok(()),
                    },
                    Op::SetPrice { line, price } => match Self::pick(&lines, *line) {
                        Some(l) => o.set_unit_price(at, l, *price),
                        None => Ok(()),
                    },
                    Op::RemoveLine { line } => match Self::pick(&lines, *line) {
                        Some(l) => o.remove_line(at, l),
                        None => Ok(()),
                    },
                    Op::SetStatus(s) => o.set_status(at, rng, *s),
                    Op::Pay {
                        kind,
                        amount,
                        state,
                    } => {
                        let kind = match kind {
                            0 => PaymentKind::Cash,
                            1 => PaymentKind::CardTerminal,
                            2 => PaymentKind::Check,
                            _ => PaymentKind::GiftCard,
                        };
                        o.add_payment(
                            at,
                            rng,
                            PaymentDraft {
                                kind,
                                amount: *amount,
                                reference: String::new(),
                            },
                            *state,
                        )
                        .map(|_| ())
                    }
                    Op::Advance { payment, to } => match Self::pick(&payments, *payment) {
                        Some(p) => o.advance_payment(at, rng, p, *to, None),
                        None => Ok(()),
                    },
                    Op::CompleteSale => {
                        let due = view.totals.balance_due;
                        let last = (due > 0).then(|| {
                            FinalPayment::New(PaymentDraft {
                                kind: PaymentKind::Cash,
                                amount: due,
                                reference: String::new(),
                            })
                        });
                        o.complete_sale(at, rng, last).map(|_| ())
                    }
                    Op::Delete => o.delete(at, rng),
                    Op::Acknowledge { edit } => {
                        match view.late_edits.get(edit % view.late_edits.len().max(1)) {
                            Some(e) => o.acknowledge_late_edit(at, rng, &e.id, "seen"),
                            None => Ok(()),
                        }
                    }
                    Op::Merge { .. } | Op::Partial { .. } => unreachable!(),
                };
                if result.is_err() {
                    assert_eq!(
                        o.heads(),
                        heads,
                        "a refused {local:?} left a change behind: {result:?}"
                    );
                }
            }
        }
        let order = &self.replicas[i].order;
        if was_terminal {
            assert!(
                order.status().unwrap().is_terminal(),
                "a terminal order reverted after {op:?}"
            );
        }
        for p in order.view().unwrap().payments {
            if p.state >= PaymentState::Captured {
                self.captured.insert(p.id, p.amount);
            }
        }
    }

    /// Heals the network: everything flows to replica 0, then back out to every replica.
    fn converge(&mut self) {
        let n = self.replicas.len();
        for j in 1..n {
            let mut other = self.replicas[j].order.clone();
            self.replicas[0].order.merge(&mut other).unwrap();
        }
        for i in 1..n {
            let mut hub = self.replicas[0].order.clone();
            self.replicas[i].order.merge(&mut hub).unwrap();
        }
    }
}

proptest! {
    #[test]
    fn replicas_converge_and_money_is_never_lost((n, seed, ops) in scenario(40)) {
        let mut w = World::new(n, seed);
        for (who, op) in &ops {
            w.apply(who % n, op);
        }
        w.converge();

        let heads = w.replicas[0].order.heads();
        let view = w.replicas[0].order.view().unwrap();
        let json = serde_json::to_string(&view).unwrap();
        for r in &w.replicas[1..] {
            prop_assert_eq!(r.order.heads(), heads.clone());
            let v = r.order.view().unwrap();
            prop_assert_eq!(&v.late_edits, &view.late_edits);
            prop_assert_eq!(serde_json::to_string(&v).unwrap(), json.clone());
        }
        // Every payment any replica ever saw captured is present exactly once, still >= captured.
        for (id, amount) in &w.captured {
            let found: Vec<&PaymentView> = view.payments.iter().filter(|p| p.id == *id).collect();
            prop_assert_eq!(found.len(), 1, "captured payment {} lost or doubled", id);
            prop_assert!(found[0].state >= PaymentState::Captured);
            prop_assert_eq!(found[0].amount, *amount);
        }
        let captured_sum: i64 = view.payments.iter().filter(|p| p.state == PaymentState::Captured).map(|p| p.amount).sum();
        prop_assert_eq!(view.totals.paid, captured_sum);
        let counted: i64 = view.lines.iter().map(|l| l.line_total).sum();
        let expected_total = if view.status == OrderStatus::Deleted { 0 } else { counted };
        prop_assert_eq!(view.totals.total, expected_total);
        prop_assert_eq!(view.totals.balance_due, (view.totals.total - view.totals.paid).max(0));
        prop_assert_eq!(view.totals.change_due, (view.totals.paid - view.totals.total).max(0));
        // Late edits exist only on closed orders.
        if !view.status.is_terminal() {
            prop_assert!(view.late_edits.is_empty());
        }
        // The merged document passes the relay's structural checks (loads as an order).
        let reloaded = Order::load(&w.replicas[0].order.save(), w.replicas[0].order.writer().clone()).unwrap();
        prop_assert_eq!(reloaded.view().unwrap(), view);
    }
}
