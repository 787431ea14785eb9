//! Vectors drawn from the merge conformance property test's generators (`GenOp`, [`op`], shared
//! with `tests/tests/merge_conformance.rs`) with a fixed seed, so regenerating gives the same
//! vectors: 2-5 replicas, random operations, partial shuffled deliveries (each twice) and full
//! merges, then everything flows to replica 0 and back out.
//!
//! Duplicates are dropped: a scenario whose shape (who did which operation, with which outcome)
//! equals an earlier one's adds nothing. There is no shrinking: scenarios are kept short instead.

use std::collections::BTreeSet;

use anyhow::{Result, anyhow};
use crdt_model::{ActiveStatus, Entropy, PaymentState, SplitMix64};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use super::format::{FinalArgs, LineArgs, Op, PaymentArgs, Vector};
use super::sim::Sim;

/// How many scenarios are drawn (before duplicates are dropped).
pub const DRAWN: usize = 180;

/// One random step of a replica (the property test's alphabet).
#[derive(Clone, Debug)]
pub enum GenOp {
    /// Add a line.
    AddLine {
        /// Unit price.
        price: i64,
        /// Quantity.
        qty: i64,
    },
    /// Change the quantity of the `line`-th counted line (modulo).
    ChangeQty {
        /// Which line.
        line: usize,
        /// Difference.
        delta: i64,
    },
    /// Set the price of a counted line.
    SetPrice {
        /// Which line.
        line: usize,
        /// New price.
        price: i64,
    },
    /// Remove a counted line.
    RemoveLine {
        /// Which line.
        line: usize,
    },
    /// Set an active status.
    SetStatus(ActiveStatus),
    /// Record a payment.
    Pay {
        /// 0 cash, 1 card terminal, 2 check, 3 gift card.
        kind: u8,
        /// Amount.
        amount: i64,
        /// Initial state.
        state: PaymentState,
    },
    /// Move the `payment`-th payment (modulo).
    Advance {
        /// Which payment.
        payment: usize,
        /// Target state.
        to: PaymentState,
    },
    /// Complete the sale, paying the balance in cash.
    CompleteSale,
    /// Delete the order.
    Delete,
    /// Acknowledge the `edit`-th late edit (modulo).
    Acknowledge {
        /// Which late edit.
        edit: usize,
    },
    /// Merge everything replica `from` has.
    Merge {
        /// Sender (modulo the replica count).
        from: usize,
    },
    /// Apply a shuffled, possibly incomplete subset of `from`'s new changes, twice.
    Partial {
        /// Sender (modulo the replica count).
        from: usize,
        /// Shuffle seed.
        seed: u64,
        /// How many changes.
        take: usize,
    },
}

/// The property test's operation strategy.
pub fn op() -> impl Strategy<Value = GenOp> {
    let active = prop::sample::select(vec![
        ActiveStatus::InProgress,
        ActiveStatus::InDelivery,
        ActiveStatus::Delayed,
    ]);
    let state = prop::sample::select(PaymentState::ALL.to_vec());
    prop_oneof![
        4 => (1i64..2_000, 1i64..4).prop_map(|(price, qty)| GenOp::AddLine { price, qty }),
        2 => (any::<usize>(), -2i64..3).prop_map(|(line, delta)| GenOp::ChangeQty { line, delta }),
        1 => (any::<usize>(), 0i64..3_000).prop_map(|(line, price)| GenOp::SetPrice { line, price }),
        1 => any::<usize>().prop_map(|line| GenOp::RemoveLine { line }),
        1 => active.prop_map(GenOp::SetStatus),
        3 => (0u8..4, 1i64..3_000, state.clone())
            .prop_map(|(kind, amount, state)| GenOp::Pay { kind, amount, state }),
        2 => (any::<usize>(), state).prop_map(|(payment, to)| GenOp::Advance { payment, to }),
        2 => Just(GenOp::CompleteSale),
        1 => Just(GenOp::Delete),
        1 => any::<usize>().prop_map(|edit| GenOp::Acknowledge { edit }),
        3 => any::<usize>().prop_map(|from| GenOp::Merge { from }),
        3 => (any::<usize>(), any::<u64>(), 0usize..8)
            .prop_map(|(from, seed, take)| GenOp::Partial { from, seed, take }),
    ]
}

/// A scenario of the property test: replica count, a seed, and `(replica, op)` steps.
pub fn scenario(max_ops: usize) -> impl Strategy<Value = (usize, u64, Vec<(usize, GenOp)>)> {
    (
        2usize..=5,
        any::<u64>(),
        prop::collection::vec((any::<usize>(), op()), 1..max_ops),
    )
}

fn pick<T: Clone>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()].clone())
}

/// Shuffles `items` with SplitMix64 (Fisher-Yates from the end, as the property test does).
pub fn shuffle<T>(items: &mut [T], seed: u64) {
    let mut rng = SplitMix64::new(seed);
    for k in (1..items.len()).rev() {
        let m = (rng.next_u64() % (k as u64 + 1)) as usize;
        items.swap(k, m);
    }
}

/// Runs one generated step of replica `i` in `sim`, as the property test's `World::apply` does.
fn apply(s: &mut Sim, n: usize, i: usize, g: &GenOp) -> Result<()> {
    match g {
        GenOp::Merge { from } => {
            let j = from % n;
            if j != i {
                s.send(j, i)?;
            }
            return Ok(());
        }
        GenOp::Partial { from, seed, take } => {
            let j = from % n;
            if j != i {
                let mine = s.doc(i).get_heads();
                let mut changes: Vec<String> = s
                    .doc(j)
                    .get_changes(&mine)
                    .iter()
                    .map(|c| c.hash().to_string())
                    .collect();
                shuffle(&mut changes, *seed);
                changes.truncate(*take);
                if !changes.is_empty() {
                    s.deliver(j, i, changes.clone(), false)?;
                    s.deliver(j, i, changes, false)?;
                }
            }
            return Ok(());
        }
        _ => {}
    }
    let view = s
        .view(i)
        .ok_or_else(|| anyhow!("replica {i} holds no order"))?;
    let lines: Vec<String> = view.lines.iter().map(|l| l.id.to_string()).collect();
    let payments: Vec<String> = view.payments.iter().map(|p| p.id.to_string()).collect();
    let op = match g {
        GenOp::AddLine { price, qty } => Some(Op::AddLine {
            line: LineArgs {
                sku: "sku".into(),
                name: "item".into(),
                unit_price: *price,
                quantity: *qty,
                modifiers: Vec::new(),
                note: String::new(),
            },
        }),
        GenOp::ChangeQty { line, delta } => pick(&lines, *line).map(|line| Op::ChangeQuantity {
            line,
            delta: *delta,
        }),
        GenOp::SetPrice { line, price } => pick(&lines, *line).map(|line| Op::SetUnitPrice {
            line,
            unit_price: *price,
        }),
        GenOp::RemoveLine { line } => pick(&lines, *line).map(|line| Op::RemoveLine { line }),
        GenOp::SetStatus(st) => Some(Op::SetStatus {
            status: crdt_model::OrderStatus::from(*st).as_str().to_owned(),
        }),
        GenOp::Pay {
            kind,
            amount,
            state,
        } => Some(Op::AddPayment {
            payment: PaymentArgs {
                kind: ["cash", "card_terminal", "check", "gift_card"][usize::from(*kind % 4)]
                    .to_owned(),
                amount: *amount,
                reference: String::new(),
            },
            state: state.as_str().to_owned(),
        }),
        GenOp::Advance { payment, to } => {
            pick(&payments, *payment).map(|payment| Op::AdvancePayment {
                payment,
                to: to.as_str().to_owned(),
                reference: None,
            })
        }
        GenOp::CompleteSale => {
            let due = view.totals.balance_due;
            Some(Op::CompleteSale {
                last: (due > 0).then(|| {
                    FinalArgs::New(PaymentArgs {
                        kind: "cash".into(),
                        amount: due,
                        reference: String::new(),
                    })
                }),
            })
        }
        GenOp::Delete => Some(Op::Delete),
        GenOp::Acknowledge { edit } => view
            .late_edits
            .get(edit % view.late_edits.len().max(1))
            .map(|e| Op::Acknowledge {
                edit: e.id.clone(),
                note: "seen".into(),
            }),
        GenOp::Merge { .. } | GenOp::Partial { .. } => None,
    };
    if let Some(op) = op {
        s.step(i, op)?;
    }
    Ok(())
}

/// The shape of a vector: who did which operation, with which outcome (ids and values aside).
fn shape(v: &Vector) -> String {
    v.steps
        .iter()
        .map(|s| {
            let op = serde_json::to_value(&s.op)
                .ok()
                .and_then(|o| o.get("type").and_then(|t| t.as_str().map(str::to_owned)))
                .unwrap_or_default();
            let out = s
                .result
                .error
                .clone()
                .or_else(|| s.result.verdict.as_ref().map(|v| format!("{v:?}")))
                .unwrap_or_else(|| "ok".into());
            format!("{}:{op}:{out}", s.replica)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The generated vectors (`generated/NNNN`).
pub fn vectors() -> Result<Vec<Vector>> {
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[0x17; 32]),
    );
    let strategy = scenario(24);
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for k in 0..DRAWN {
        let (n, _, ops) = strategy
            .new_tree(&mut runner)
            .map_err(|e| anyhow!("drawing scenario {k}: {e}"))?
            .current();
        let mut s = Sim::new(
            &format!("generated/{k:04}"),
            "Drawn from the merge conformance generators (fixed seed): random operations on 2-5 \
             replicas, partial shuffled deliveries (each twice), full merges, then everything \
             to replica r0 and back out.",
        );
        s.cover("generated");
        let base = 10_000 + 100 * k as u64;
        let reps = (0..n)
            .map(|i| s.device(&format!("r{i}"), base + i as u64))
            .collect::<Result<Vec<_>>>()?;
        s.create(reps[0])?;
        for &r in &reps[1..] {
            s.send(reps[0], r)?;
        }
        for (who, g) in &ops {
            apply(&mut s, n, who % n, g)?;
        }
        for &r in &reps[1..] {
            s.send(r, reps[0])?;
        }
        for &r in &reps[1..] {
            s.send(reps[0], r)?;
        }
        let v = s.finish()?;
        if seen.insert(shape(&v)) {
            out.push(v);
        }
    }
    Ok(out)
}
