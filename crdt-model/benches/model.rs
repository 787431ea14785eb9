//! Model benchmarks: a bench binary printing medians and p99 per operation, judged against the
//! targets in `docs/performance.md`.
//!
//! `cargo bench -p crdt-model --bench model` for the full run. `BENCH_QUICK=1` runs each
//! measurement a few times only; CI does that (`cargo test -p crdt-model --bench model`) to keep
//! the instrument compiling and working, without asserting on timings.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::hint::black_box;
use std::time::Instant;

use automerge::Automerge;
use crdt_model::*;

const T0: i64 = 1_700_000_000_000;

struct Stats {
    name: &'static str,
    median_us: f64,
    p99_us: f64,
    n: usize,
}

/// `BENCH_FILTER=substring` runs only the operations whose name contains it (for profiling).
fn selected(name: &str) -> bool {
    std::env::var("BENCH_FILTER").map_or(true, |f| name.contains(f.as_str()))
}

fn measure(name: &'static str, n: usize, mut f: impl FnMut()) -> Stats {
    if !selected(name) {
        return Stats {
            name,
            median_us: f64::NAN,
            p99_us: f64::NAN,
            n: 0,
        };
    }
    // Warm up.
    for _ in 0..(n / 10).max(1) {
        f();
    }
    let mut samples: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    let median_us = samples[samples.len() / 2];
    let p99_us = samples[((samples.len() as f64 * 0.99) as usize).min(samples.len() - 1)];
    Stats {
        name,
        median_us,
        p99_us,
        n,
    }
}

struct Fixture {
    rng: SplitMix64,
    writer: Writer,
    now: i64,
}

impl Fixture {
    fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(T0), &mut rng);
        Self {
            rng,
            writer: Writer::new(device, 1),
            now: T0,
        }
    }

    fn at(&mut self) -> Timestamp {
        self.now += 1_000;
        Timestamp(self.now)
    }

    fn order(&mut self) -> Order {
        let at = self.at();
        let new = NewOrder {
            id: OrderId::generate(at, &mut self.rng),
            store: StoreId::new("s1").unwrap(),
            currency: Currency::new("EUR").unwrap(),
        };
        Order::create(new, self.writer.clone(), at, &mut self.rng).unwrap()
    }

    /// The full lifecycle of `docs/performance.md`: 20 lines, 3 payments, 10 status changes.
    fn lifecycle(&mut self) -> Order {
        let mut o = self.order();
        let mut lines = Vec::new();
        for i in 0..20 {
            let at = self.at();
            lines.push(
                o.add_line(
                    at,
                    &mut self.rng,
                    LineDraft {
                        sku: format!("sku-{i}"),
                        name: format!("Item {i}"),
                        unit_price: 100 + i * 10,
                        quantity: 1,
                        ..Default::default()
                    },
                )
                .unwrap(),
            );
        }
        let statuses = [
            ActiveStatus::InDelivery,
            ActiveStatus::Delayed,
            ActiveStatus::InProgress,
        ];
        for i in 0..9 {
            let at = self.at();
            o.set_status(at, &mut self.rng, statuses[i % 3]).unwrap();
        }
        let total = o.view().unwrap().totals.total;
        let at = self.at();
        o.add_payment(
            at,
            &mut self.rng,
            PaymentDraft {
                kind: PaymentKind::Cash,
                amount: total / 3,
                reference: String::new(),
            },
            PaymentState::Captured,
        )
        .unwrap();
        let at = self.at();
        let card = o
            .begin_payment(
                at,
                &mut self.rng,
                PaymentDraft {
                    kind: PaymentKind::CardTerminal,
                    amount: total / 3,
                    reference: String::new(),
                },
            )
            .unwrap();
        let at = self.at();
        o.authorize_payment(at, &mut self.rng, card, "AUTH 123456 **** 4242")
            .unwrap();
        let at = self.at();
        o.capture_payment(at, &mut self.rng, card).unwrap();
        let rest = o.view().unwrap().totals.balance_due;
        let at = self.at();
        o.complete_sale(
            at,
            &mut self.rng,
            Some(FinalPayment::New(PaymentDraft {
                kind: PaymentKind::GiftCard,
                amount: rest,
                reference: "**** 9876".into(),
            })),
        )
        .unwrap();
        o
    }
}

fn main() {
    let quick = std::env::var("BENCH_QUICK").is_ok() || std::env::args().any(|a| a == "--test");
    let n = if quick { 5 } else { 2_000 };
    let mut fx = Fixture::new(1);
    let mut results = Vec::new();

    results.push(measure(
        "create order (first change: header, containers, status)",
        n,
        || {
            black_box(fx.order());
        },
    ));

    let mut o = fx.order();
    let line = o
        .add_line(
            fx.at(),
            &mut fx.rng,
            LineDraft {
                name: "Tea".into(),
                unit_price: 300,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let mut now = T0;
    results.push(measure(
        "edit line quantity + commit, one order, history growing to 2,000 changes",
        n,
        || {
            now += 1;
            o.change_quantity(Timestamp(now), line, 1).unwrap();
        },
    ));

    // The same edit on orders of a realistic size: 20 lines, ~21 changes, each order edited
    // ten times in turn (so histories stay under ~40 changes), one order per sample.
    let mut fx5 = Fixture::new(5);
    let mut typical: Vec<(Order, LineId)> = (0..n.clamp(1, 200))
        .map(|_| {
            let o = fx5.lifecycle_open();
            let line = o.view().unwrap().lines[3].id;
            (o, line)
        })
        .collect();
    let mut k = 0usize;
    results.push(measure(
        "edit line quantity + commit, 20-line order (< 40 changes)",
        n,
        || {
            let i = k % typical.len();
            k += 1;
            now += 1;
            let (o, line) = &mut typical[i];
            o.change_quantity(Timestamp(now), *line, 1).unwrap();
        },
    ));

    {
        use automerge::transaction::{CommitOptions, Transactable};
        use automerge::{ObjType, ROOT, ScalarValue};
        // The floor under "edit line quantity + commit": the same write on a bare document with
        // the same history shape. Incrementing a counter costs more as its increments pile up
        // (Automerge sums them on every access); a put on one key does not.
        for (label, inc) in [
            ("reference: bare Automerge counter increment + commit", true),
            ("reference: bare Automerge put (same key) + commit", false),
        ] {
            let mut d = Automerge::new();
            let lines = d
                .transact(|tx| {
                    let l = tx.put_object(ROOT, "lines", ObjType::Map)?;
                    let o = tx.put_object(&l, "x", ObjType::Map)?;
                    tx.put(&o, "qty", ScalarValue::counter(1))?;
                    tx.put(&o, "p", 1)?;
                    Ok::<_, automerge::AutomergeError>(o)
                })
                .unwrap()
                .result;
            let mut k = 0i64;
            results.push(measure(label, n, || {
                k += 1;
                d.transact_with(
                    |_| CommitOptions::default().with_time(k),
                    |tx| {
                        if inc {
                            tx.increment(&lines, "qty", 1)
                        } else {
                            tx.put(&lines, "p", k)
                        }
                    },
                )
                .unwrap();
            }));
        }
    }

    let mut fx2 = Fixture::new(2);
    let mut o2 = fx2.order();
    results.push(measure(
        "add a captured payment + commit",
        n.min(500),
        || {
            let at = fx2.at();
            o2.add_payment(
                at,
                &mut fx2.rng,
                PaymentDraft {
                    kind: PaymentKind::Cash,
                    amount: 100,
                    reference: String::new(),
                },
                PaymentState::Captured,
            )
            .unwrap();
        },
    ));

    let mut fx3 = Fixture::new(3);
    let bases: Vec<Order> = (0..n.min(300))
        .map(|_| {
            let mut o = fx3.order();
            let at = fx3.at();
            o.add_line(
                at,
                &mut fx3.rng,
                LineDraft {
                    name: "Menu".into(),
                    unit_price: 1_000,
                    quantity: 1,
                    ..Default::default()
                },
            )
            .unwrap();
            o
        })
        .collect();
    let mut it = bases.into_iter();
    results.push(measure(
        "complete sale (final payment + Done, one change)",
        n.min(300),
        || {
            if let Some(mut o) = it.next() {
                let at = fx3.at();
                o.complete_sale(
                    at,
                    &mut fx3.rng,
                    Some(FinalPayment::New(PaymentDraft {
                        kind: PaymentKind::Cash,
                        amount: 1_000,
                        reference: String::new(),
                    })),
                )
                .unwrap();
            }
        },
    ));

    let mut fx4 = Fixture::new(4);
    let full = fx4.lifecycle();
    let bytes = full.save();
    results.push(measure("save (full lifecycle order)", n, || {
        black_box(full.save());
    }));
    results.push(measure("load + view (full lifecycle order)", n, || {
        let o = Order::load(&bytes, fx4.writer.clone()).unwrap();
        black_box(o.view().unwrap());
    }));
    results.push(measure(
        "view (hydrate + totals + late edits), Done order",
        n,
        || {
            black_box(full.view().unwrap());
        },
    ));

    results.push(measure(
        "view_of (parse + view, no cached parse), Done order",
        n,
        || {
            black_box(view_of(full.doc()).unwrap());
        },
    ));
    // The same order after the relay wrote its number: the close is no longer the only head,
    // so the view also parses the order as closed (to list late edits).
    let mut numbered = full.clone();
    numbered.assign_number(fx4.at(), OrderNumber(42)).unwrap();
    results.push(measure(
        "view_of, Done order numbered after the close (2nd parse at close)",
        n,
        || {
            black_box(view_of(numbered.doc()).unwrap());
        },
    ));
    results.push(measure(
        "reference: Automerge::load alone (full lifecycle order)",
        n,
        || {
            black_box(Automerge::load(&bytes).unwrap());
        },
    ));

    // Two replicas diverged by one change each, merged.
    let mut fx5 = Fixture::new(5);
    let base = fx5.lifecycle_open();
    results.push(measure(
        "merge two diverged replicas (1 + 1 changes)",
        n.min(1000),
        || {
            let mut a = base.clone();
            let mut b = Order::load(
                &base.save(),
                Writer::new(
                    DeviceId::generate(Timestamp(T0), &mut SplitMix64::new(9)),
                    2,
                ),
            )
            .unwrap();
            let l = a.view().unwrap().lines[0].id;
            a.change_quantity(Timestamp(T0 + 5), l, 1).unwrap();
            b.set_note(Timestamp(T0 + 6), l, "no ice").unwrap();
            a.merge(&mut b).unwrap();
            black_box(&a);
        },
    ));

    // Policy check of a typical incoming change: one line added to a 20-line order.
    let mut fx6 = Fixture::new(6);
    let stored = fx6.lifecycle_open();
    let author = Author {
        device: fx6.writer.device,
        store: StoreId::new("s1").unwrap(),
        role: Role::Device,
        seal: None,
        vouched: Default::default(),
    };
    let mut edited = stored.clone();
    let at = fx6.at();
    edited
        .add_line(
            at,
            &mut fx6.rng,
            LineDraft {
                name: "Extra".into(),
                unit_price: 500,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
    let before: Automerge = stored.doc().clone();
    let after: Automerge = edited.doc().clone();
    results.push(measure(
        "policy check of one incoming change (add line, 20-line order)",
        n,
        || {
            black_box(validate(&before, &after, &author).unwrap());
        },
    ));

    // The guard on foreign bytes (`crdt_model::guard`): what it adds to a load, to one incoming
    // change and to one sync message carrying it. Each pair starts from a clone of the same
    // document, so the difference is the guard's copy and check.
    results.push(measure(
        "guard: clone of the document (full lifecycle order)",
        n,
        || {
            black_box(full.doc().clone());
        },
    ));
    results.push(measure(
        "guard: clone of the document (order edited 2,000 times)",
        n,
        || {
            black_box(o.doc().clone());
        },
    ));
    results.push(measure(
        "guard: get_changes(&[]), the bulk of the load check (lifecycle)",
        n,
        || {
            black_box(full.doc().get_changes(&[]));
        },
    ));
    results.push(measure("guard::load (full lifecycle order)", n, || {
        black_box(guard::load(&bytes).unwrap());
    }));
    let incoming = after.get_changes(&before.get_heads());
    results.push(measure(
        "apply one change (add line, 20-line order), bare Automerge",
        n,
        || {
            let mut d = before.clone();
            d.apply_changes(incoming.clone()).unwrap();
            black_box(d);
        },
    ));
    results.push(measure(
        "apply one change (add line, 20-line order), guard::apply_changes",
        n,
        || {
            let mut d = before.clone();
            black_box(guard::apply_changes(&mut d, incoming.clone()).unwrap());
        },
    ));
    let message = {
        use automerge::sync::{self, SyncDoc};
        let (mut peer, mut theirs) = (before.clone(), after.clone());
        let (mut sp, mut st) = (sync::State::new(), sync::State::new());
        let mut with_changes = None;
        for _ in 0..4 {
            if let Some(m) = peer.generate_sync_message(&mut sp) {
                theirs.receive_sync_message(&mut st, m).unwrap();
            }
            if let Some(m) = theirs.generate_sync_message(&mut st) {
                if !m.changes.is_empty() && with_changes.is_none() {
                    with_changes = Some((m.clone(), sp.clone()));
                }
                peer.receive_sync_message(&mut sp, m).unwrap();
            }
        }
        with_changes.unwrap()
    };
    results.push(measure(
        "receive a sync message with that change, bare Automerge",
        n,
        || {
            use automerge::sync::SyncDoc;
            let (mut d, mut st) = (before.clone(), message.1.clone());
            d.receive_sync_message(&mut st, message.0.clone()).unwrap();
            black_box(d);
        },
    ));
    results.push(measure(
        "receive a sync message with that change, guard",
        n,
        || {
            let (mut d, mut st) = (before.clone(), message.1.clone());
            black_box(guard::receive_sync_message(&mut d, &mut st, message.0.clone()).unwrap());
        },
    ));

    println!(
        "crdt-model benchmarks ({} samples each{})",
        n,
        if quick { ", quick mode" } else { "" }
    );
    println!("{:<66} {:>11} {:>11}", "operation", "median µs", "p99 µs");
    for r in &results {
        println!("{:<66} {:>11.1} {:>11.1}", r.name, r.median_us, r.p99_us);
        let _ = r.n;
    }
    println!(
        "full-lifecycle order (20 lines, 3 payments, 10 status changes): {} bytes saved, {} changes",
        bytes.len(),
        full.doc().get_changes(&[]).len()
    );
}

impl Fixture {
    /// An open order with 20 lines and a few status changes (no payments).
    fn lifecycle_open(&mut self) -> Order {
        let mut o = self.order();
        for i in 0..20 {
            let at = self.at();
            o.add_line(
                at,
                &mut self.rng,
                LineDraft {
                    sku: format!("sku-{i}"),
                    name: format!("Item {i}"),
                    unit_price: 100 + i * 10,
                    quantity: 1,
                    ..Default::default()
                },
            )
            .unwrap();
        }
        o
    }
}
