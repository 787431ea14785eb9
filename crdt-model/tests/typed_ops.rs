//! The typed API cannot write what a reader or the relay refuses (property test).
//!
//! Two tills edit one order through the typed API with random operations of every kind and
//! random arguments (arbitrary Unicode text, card numbers, out-of-range amounts, unknown ids),
//! and sync through a relay. After every operation:
//!
//! * a refused operation returned a typed error and left the document untouched (same heads);
//!   any value the writer rule refuses ([`check_free_text`]) makes the operation refused;
//! * an accepted one wrote at most one change, which the relay's policy accepts as written by
//!   that till (judged against the document before it), and the document loads from its bytes
//!   and views, with every free-text value in the view acceptable to the writer rule;
//! * a sync hands the till's new changes to the relay, whose policy accepts them as the till's,
//!   and brings the relay's changes back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use crdt_model::automerge::Automerge;
use crdt_model::order::{MAX_PAYMENT, MAX_QUANTITY, MAX_UNIT_PRICE};
use crdt_model::*;
use proptest::prelude::*;

/// A payment to record, before its kind is checked.
#[derive(Clone, Debug)]
struct Pay {
    kind: PaymentKind,
    amount: i64,
    reference: String,
}

impl Pay {
    fn draft(&self) -> PaymentDraft {
        PaymentDraft {
            kind: self.kind.clone(),
            amount: self.amount,
            reference: self.reference.clone(),
        }
    }
}

/// The last payment of a sale.
#[derive(Clone, Debug)]
enum Last {
    Nothing,
    New(Pay),
    Capture(usize),
    /// The balance due (at least 1), as a new payment, so that sales do complete.
    Balance(PaymentKind, String),
}

/// One operation of one till (the first field). Lines, payments and late edits are picked by
/// index among those the till can see ([`pick`]).
#[derive(Clone, Debug)]
enum Op {
    AddLine(usize, LineDraft),
    ChangeQuantity(usize, usize, i64),
    SetQuantity(usize, usize, i64),
    SetPrice(usize, usize, i64),
    SetNote(usize, usize, String),
    RemoveLine(usize, usize),
    AddPayment(usize, Pay, PaymentState),
    Advance(usize, usize, PaymentState, Option<String>),
    Authorize(usize, usize, String),
    Capture(usize, usize),
    Void(usize, usize),
    Refund(usize, usize),
    CompleteSale(usize, Last),
    Delete(usize),
    SetStatus(usize, ActiveStatus),
    SetStatusAny(usize, OrderStatus),
    Acknowledge(usize, usize, String),
    /// The till syncs with the relay: its new changes up, everything else down.
    Sync(usize),
}

impl Op {
    fn till(&self) -> usize {
        match self {
            Op::AddLine(t, ..)
            | Op::ChangeQuantity(t, ..)
            | Op::SetQuantity(t, ..)
            | Op::SetPrice(t, ..)
            | Op::SetNote(t, ..)
            | Op::RemoveLine(t, ..)
            | Op::AddPayment(t, ..)
            | Op::Advance(t, ..)
            | Op::Authorize(t, ..)
            | Op::Capture(t, ..)
            | Op::Void(t, ..)
            | Op::Refund(t, ..)
            | Op::CompleteSale(t, ..)
            | Op::Delete(t)
            | Op::SetStatus(t, ..)
            | Op::SetStatusAny(t, ..)
            | Op::Acknowledge(t, ..)
            | Op::Sync(t) => *t,
        }
    }

    /// The free text the operation would write, by field.
    fn texts(&self) -> Vec<(TextField, &str)> {
        match self {
            Op::AddLine(_, l) => {
                let mut v = vec![
                    (TextField::Sku, l.sku.as_str()),
                    (TextField::LineName, l.name.as_str()),
                    (TextField::LineNote, l.note.as_str()),
                ];
                v.extend(
                    l.modifiers
                        .iter()
                        .map(|m| (TextField::Modifier, m.as_str())),
                );
                v
            }
            Op::SetNote(_, _, n) => vec![(TextField::LineNote, n.as_str())],
            Op::AddPayment(_, p, _) | Op::CompleteSale(_, Last::New(p)) => vec![
                (TextField::PaymentKind, p.kind.as_str()),
                (TextField::PaymentReference, p.reference.as_str()),
            ],
            Op::CompleteSale(_, Last::Balance(k, r)) => vec![
                (TextField::PaymentKind, k.as_str()),
                (TextField::PaymentReference, r.as_str()),
            ],
            Op::Advance(_, _, _, Some(r)) | Op::Authorize(_, _, r) => {
                vec![(TextField::TransitionReference, r.as_str())]
            }
            Op::Acknowledge(_, _, n) => vec![(TextField::AckNote, n.as_str())],
            _ => Vec::new(),
        }
    }
}

/// A Luhn-valid 16-digit number.
fn card_number() -> impl Strategy<Value = String> {
    prop::collection::vec(0u32..10, 15).prop_map(|body| {
        let sum: u32 = body
            .iter()
            .rev()
            .enumerate()
            .map(|(i, &d)| {
                if i % 2 == 0 {
                    let x = d * 2;
                    if x > 9 { x - 9 } else { x }
                } else {
                    d
                }
            })
            .sum();
        let mut s: String = body.iter().map(|d| char::from(b'0' + *d as u8)).collect();
        s.push(char::from(b'0' + ((10 - sum % 10) % 10) as u8));
        s
    })
}

/// Free text: empty, arbitrary Unicode, words, a card number (plain or spaced in groups of
/// four), too long, a masked number.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just(String::new()),
        4 => ".{0,24}",
        3 => "[a-zA-Z ]{1,16}",
        1 => (".{0,4}", card_number(), prop::bool::ANY).prop_map(|(p, n, spaced)| {
            if spaced {
                let groups: Vec<String> = n
                    .as_bytes()
                    .chunks(4)
                    .map(|c| String::from_utf8_lossy(c).into_owned())
                    .collect();
                format!("{p}{}", groups.join(" "))
            } else {
                format!("{p}{n}")
            }
        }),
        1 => (495usize..506).prop_map(|n| "é".repeat(n / 2)),
        1 => "[0-9]{6} \\*{4} \\*{4} \\*{4} [0-9]{4}",
    ]
}

fn kind() -> impl Strategy<Value = PaymentKind> {
    prop_oneof![
        4 => prop::sample::select(vec![
            PaymentKind::Cash,
            PaymentKind::CardTerminal,
            PaymentKind::Check,
            PaymentKind::GiftCard,
        ]),
        2 => "[A-Za-zé0-9_-]{1,10}( [A-Za-z0-9]{1,6})?".prop_map(PaymentKind::Other),
        2 => text().prop_map(PaymentKind::Other),
    ]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 1i64..3_000,
        1 => prop::sample::select(vec![0, -1, MAX_PAYMENT, MAX_PAYMENT + 1, i64::MAX, i64::MIN]),
    ]
}

fn price() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 0i64..3_000,
        1 => prop::sample::select(vec![-1, MAX_UNIT_PRICE, MAX_UNIT_PRICE + 1, i64::MIN]),
    ]
}

fn quantity() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => 1i64..5,
        1 => prop::sample::select(vec![0, -1, MAX_QUANTITY, MAX_QUANTITY + 1, i64::MIN]),
    ]
}

fn delta() -> impl Strategy<Value = i64> {
    prop_oneof![
        8 => -3i64..4,
        1 => prop::sample::select(vec![i64::MAX, i64::MIN, MAX_QUANTITY]),
    ]
}

fn state() -> impl Strategy<Value = PaymentState> {
    prop::sample::select(PaymentState::ALL.to_vec())
}

fn pay() -> impl Strategy<Value = Pay> {
    (kind(), amount(), text()).prop_map(|(kind, amount, reference)| Pay {
        kind,
        amount,
        reference,
    })
}

fn line() -> impl Strategy<Value = LineDraft> {
    (
        text(),
        text(),
        price(),
        quantity(),
        prop::collection::vec(text(), 0..3),
        text(),
    )
        .prop_map(
            |(sku, name, unit_price, quantity, modifiers, note)| LineDraft {
                sku,
                name,
                unit_price,
                quantity,
                modifiers,
                note,
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    let t = 0usize..2;
    let i = 0usize..100;
    prop_oneof![
        8 => (t.clone(), line()).prop_map(|(t, l)| Op::AddLine(t, l)),
        4 => (t.clone(), i.clone(), delta()).prop_map(|(t, i, d)| Op::ChangeQuantity(t, i, d)),
        2 => (t.clone(), i.clone(), quantity()).prop_map(|(t, i, q)| Op::SetQuantity(t, i, q)),
        2 => (t.clone(), i.clone(), price()).prop_map(|(t, i, p)| Op::SetPrice(t, i, p)),
        2 => (t.clone(), i.clone(), text()).prop_map(|(t, i, n)| Op::SetNote(t, i, n)),
        2 => (t.clone(), i.clone()).prop_map(|(t, i)| Op::RemoveLine(t, i)),
        6 => (t.clone(), pay(), state()).prop_map(|(t, p, s)| Op::AddPayment(t, p, s)),
        2 => (t.clone(), i.clone(), state(), prop::option::of(text()))
            .prop_map(|(t, i, s, r)| Op::Advance(t, i, s, r)),
        2 => (t.clone(), i.clone(), text()).prop_map(|(t, i, r)| Op::Authorize(t, i, r)),
        4 => (t.clone(), i.clone()).prop_map(|(t, i)| Op::Capture(t, i)),
        2 => (t.clone(), i.clone()).prop_map(|(t, i)| Op::Void(t, i)),
        2 => (t.clone(), i.clone()).prop_map(|(t, i)| Op::Refund(t, i)),
        2 => (
            t.clone(),
            prop_oneof![
                Just(Last::Nothing),
                pay().prop_map(Last::New),
                i.clone().prop_map(Last::Capture),
                (kind(), text()).prop_map(|(k, r)| Last::Balance(k, r)),
            ]
        )
            .prop_map(|(t, l)| Op::CompleteSale(t, l)),
        1 => t.clone().prop_map(Op::Delete),
        2 => (
            t.clone(),
            prop::sample::select(vec![
                ActiveStatus::InProgress,
                ActiveStatus::InDelivery,
                ActiveStatus::Delayed,
            ])
        )
            .prop_map(|(t, s)| Op::SetStatus(t, s)),
        1 => (t.clone(), prop::sample::select(OrderStatus::ALL.to_vec()))
            .prop_map(|(t, s)| Op::SetStatusAny(t, s)),
        4 => (t.clone(), i, text()).prop_map(|(t, i, n)| Op::Acknowledge(t, i, n)),
        8 => t.prop_map(Op::Sync),
    ]
}

/// One till: its terminal identity and its replica.
struct Till {
    term: Term,
    order: Order,
}

/// One of the ids a till can see, or (one time in ten, or when it sees none) one nobody has.
fn pick<T: Copy>(ids: &[T], i: usize, bogus: T) -> T {
    if i % 10 == 9 || ids.is_empty() {
        bogus
    } else {
        ids[i % ids.len()]
    }
}

/// Runs one operation on its till; `Err` is the operation's refusal.
fn run(till: &mut Till, op: &Op) -> Result<(), ModelError> {
    let view = till.order.view().unwrap();
    let lines: Vec<LineId> = view
        .lines
        .iter()
        .chain(&view.removed_lines)
        .chain(&view.late_lines)
        .map(|l| l.id)
        .collect();
    let payments: Vec<PaymentId> = view.payments.iter().map(|p| p.id).collect();
    let t = &mut till.term;
    let at = t.tick();
    let bogus_line = LineId::generate(at, &mut t.rng);
    let bogus_payment = PaymentId::generate(at, &mut t.rng);
    let line = |i| pick(&lines, i, bogus_line);
    let payment = |i| pick(&payments, i, bogus_payment);
    let o = &mut till.order;
    let rng = &mut t.rng;
    match op {
        Op::AddLine(_, l) => o.add_line(at, rng, l.clone()).map(|_| ()),
        Op::ChangeQuantity(_, i, d) => o.change_quantity(at, line(*i), *d),
        Op::SetQuantity(_, i, q) => o.set_quantity(at, line(*i), *q),
        Op::SetPrice(_, i, p) => o.set_unit_price(at, line(*i), *p),
        Op::SetNote(_, i, n) => o.set_note(at, line(*i), n),
        Op::RemoveLine(_, i) => o.remove_line(at, line(*i)),
        Op::AddPayment(_, p, s) => o.add_payment(at, rng, p.draft(), *s).map(|_| ()),
        Op::Advance(_, i, s, r) => o.advance_payment(at, rng, payment(*i), *s, r.as_deref()),
        Op::Authorize(_, i, r) => o.authorize_payment(at, rng, payment(*i), r),
        Op::Capture(_, i) => o.capture_payment(at, rng, payment(*i)),
        Op::Void(_, i) => o.void_payment(at, rng, payment(*i)),
        Op::Refund(_, i) => o.refund_payment(at, rng, payment(*i)),
        Op::CompleteSale(_, last) => {
            let last = match last {
                Last::Nothing => None,
                Last::New(p) => Some(FinalPayment::New(p.draft())),
                Last::Capture(i) => Some(FinalPayment::Capture(payment(*i))),
                Last::Balance(kind, reference) => Some(FinalPayment::New(PaymentDraft {
                    kind: kind.clone(),
                    amount: view.totals.balance_due.max(1),
                    reference: reference.clone(),
                })),
            };
            o.complete_sale(at, rng, last).map(|_| ())
        }
        Op::Delete(_) => o.delete(at, rng),
        Op::SetStatus(_, s) => o.set_status(at, rng, *s),
        Op::SetStatusAny(_, s) => o.set_status_any(at, rng, *s),
        Op::Acknowledge(_, i, note) => {
            let edits: Vec<&str> = view.late_edits.iter().map(|e| e.id.as_str()).collect();
            let bogus = format!("line:{bogus_line}");
            let edit = pick(&edits, *i, bogus.as_str());
            o.acknowledge_late_edit(at, rng, edit, note)
        }
        Op::Sync(_) => Ok(()),
    }
}

/// The document loads from its bytes and views the same; every free text in the view is
/// acceptable to the writer rule.
fn sound(order: &Order) -> Result<(), TestCaseError> {
    let view = order
        .view()
        .map_err(|e| TestCaseError::fail(format!("view: {e}")))?;
    let loaded = Order::load(&order.save(), order.writer().clone())
        .map_err(|e| TestCaseError::fail(format!("load: {e}")))?;
    prop_assert_eq!(&loaded.view().unwrap(), &view);
    view.to_json().unwrap();
    for l in view
        .lines
        .iter()
        .chain(&view.removed_lines)
        .chain(&view.late_lines)
    {
        check_free_text(TextField::Sku, &l.sku).unwrap();
        check_free_text(TextField::LineName, &l.name).unwrap();
        check_free_text(TextField::LineNote, &l.note).unwrap();
        for m in &l.modifiers {
            check_free_text(TextField::Modifier, m).unwrap();
        }
    }
    for p in &view.payments {
        check_free_text(TextField::PaymentKind, &p.kind).unwrap();
        check_free_text(TextField::PaymentReference, &p.reference).unwrap();
    }
    Ok(())
}

/// Whether the refusal is one the typed API gives for bad input or a forbidden edit (not a
/// broken document or an internal failure).
fn is_typed_refusal(e: &ModelError) -> bool {
    !matches!(
        e,
        ModelError::NotAnOrder(_)
            | ModelError::Load(_)
            | ModelError::Automerge(_)
            | ModelError::Policy(_)
            | ModelError::Frame(_)
            | ModelError::Json(_)
    )
}

/// The relay's copy takes the till's new changes (judged as the till's) and gives back its own.
fn sync_with_relay(relay: &mut Automerge, till: &mut Till) -> Result<(), TestCaseError> {
    let before = relay.clone();
    relay.merge(&mut till.order.doc().clone()).unwrap();
    let judged = validate(&before, relay, &till.term.author());
    prop_assert!(judged.is_ok(), "the relay refuses a sync: {:?}", judged);
    let mut from_relay = Order::from_doc(relay.clone(), till.order.writer().clone()).unwrap();
    till.order.merge(&mut from_relay).unwrap();
    prop_assert_eq!(till.order.heads(), from_relay.heads());
    Ok(())
}

proptest! {
    #[test]
    fn typed_operations_write_only_what_readers_and_the_relay_accept(
        ops in prop::collection::vec(op(), 1..60),
    ) {
        let mut a = Term::new(70);
        let b = Term::new(71);
        let order = a.create();
        let mut relay = Automerge::new();
        let created = validate(&relay, order.doc(), &a.author());
        prop_assert_eq!(created, Ok(1));
        relay.merge(&mut order.doc().clone()).unwrap();
        let order_b = b.replica(&order);
        let mut tills = [Till { term: a, order }, Till { term: b, order: order_b }];
        for op in &ops {
            let till = &mut tills[op.till()];
            if let Op::Sync(_) = op {
                sync_with_relay(&mut relay, till)?;
                sound(&till.order)?;
                continue;
            }
            let before = till.order.doc().clone();
            let heads = till.order.heads();
            let result = run(till, op);
            let refused_text = op
                .texts()
                .into_iter()
                .find(|(field, text)| check_free_text(*field, text).is_err());
            match &result {
                Err(e) => {
                    prop_assert!(is_typed_refusal(e), "{:?}: {}", op, e);
                    prop_assert_eq!(&till.order.heads(), &heads, "{:?} refused ({}) but wrote", op, e);
                }
                Ok(()) => {
                    prop_assert!(refused_text.is_none(), "{:?} wrote {:?}", op, refused_text);
                    let judged = validate(&before, till.order.doc(), &till.term.author());
                    prop_assert!(
                        matches!(judged, Ok(n) if n <= 1),
                        "the policy refuses an honest {:?}: {:?}", op, judged
                    );
                }
            }
            sound(&till.order)?;
        }
        // Everything ends at the relay: both tills converge on what it holds.
        for i in [0, 1, 0] {
            sync_with_relay(&mut relay, &mut tills[i])?;
        }
        prop_assert_eq!(tills[0].order.view().unwrap(), tills[1].order.view().unwrap());
        sound(&tills[0].order)?;
    }
}
