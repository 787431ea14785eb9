//! Local operations on one order: what a cashier can and cannot do.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use crdt_model::*;

#[test]
fn a_fresh_order_is_in_progress_and_empty() {
    let mut t = Term::new(1);
    let o = t.create();
    let v = o.view().unwrap();
    assert_eq!(v.status, OrderStatus::InProgress);
    assert_eq!(v.number, None);
    assert!(v.lines.is_empty() && v.payments.is_empty());
    assert_eq!(v.totals, Totals::default());
}

#[test]
fn lines_quantities_and_totals() {
    let mut t = Term::new(1);
    let mut o = t.create();
    let a = t.add_line(&mut o, "Espresso", 250, 2);
    let b = t.add_line(&mut o, "Croissant", 180, 1);
    let at = t.tick();
    o.change_quantity(at, a, 1).unwrap();
    let at = t.tick();
    o.set_quantity(at, b, 4).unwrap();
    let at = t.tick();
    o.set_unit_price(at, b, 150).unwrap();
    let v = o.view().unwrap();
    assert_eq!(v.totals.total, 3 * 250 + 4 * 150);
    let at = t.tick();
    o.remove_line(at, a).unwrap();
    let v = o.view().unwrap();
    assert_eq!(v.totals.total, 600);
    assert_eq!(v.removed_lines.len(), 1);
    let at = t.tick();
    assert!(matches!(
        o.change_quantity(at, a, 1),
        Err(ModelError::LineRemoved(_))
    ));
    assert!(matches!(
        o.set_quantity(at, b, 0),
        Err(ModelError::InvalidValue { .. })
    ));
    assert!(matches!(
        o.change_quantity(at, b, -4),
        Err(ModelError::InvalidValue { .. })
    ));
}

#[test]
fn payment_states_only_move_forward() {
    let mut t = Term::new(2);
    let mut o = t.create();
    t.add_line(&mut o, "Menu", 1_000, 1);
    let p = t
        .pay(
            &mut o,
            PaymentKind::CardTerminal,
            1_000,
            PaymentState::Pending,
        )
        .unwrap();
    let at = t.tick();
    o.authorize_payment(at, &mut t.rng, p, "AUTH 123456")
        .unwrap();
    let at = t.tick();
    o.capture_payment(at, &mut t.rng, p).unwrap();
    let at = t.tick();
    let err = o.void_payment(at, &mut t.rng, p).unwrap_err();
    assert!(matches!(
        err,
        ModelError::InvalidTransition {
            from: PaymentState::Captured,
            to: PaymentState::Voided,
            ..
        }
    ));
    let v = o.view().unwrap();
    assert_eq!(v.payments[0].state, PaymentState::Captured);
    assert_eq!(v.payments[0].reference, "AUTH 123456");
    assert_eq!(v.payments[0].history.len(), 3);
    assert_eq!(v.totals.paid, 1_000);
    assert_eq!(v.totals.balance_due, 0);
}

#[test]
fn bad_payments_are_refused_and_change_nothing() {
    let mut t = Term::new(3);
    let mut o = t.create();
    let heads = o.heads();
    assert!(matches!(
        t.pay(&mut o, PaymentKind::Cash, 0, PaymentState::Captured),
        Err(ModelError::InvalidAmount(0))
    ));
    assert!(matches!(
        t.pay(&mut o, PaymentKind::Cash, -5, PaymentState::Captured),
        Err(ModelError::InvalidAmount(-5))
    ));
    assert!(
        t.pay(&mut o, PaymentKind::Cash, 5, PaymentState::Refunded)
            .is_err()
    );
    let at = t.tick();
    let card = PaymentDraft {
        kind: PaymentKind::GiftCard,
        amount: 100,
        reference: "6011 1111 1111 1117".into(),
    };
    assert!(matches!(
        o.add_payment(at, &mut t.rng, card, PaymentState::Captured),
        Err(ModelError::CardNumber { .. })
    ));
    assert_eq!(
        o.heads(),
        heads,
        "refused operations leave no change behind"
    );
}

#[test]
fn completing_a_sale_is_one_change_and_needs_the_balance_paid() {
    let mut t = Term::new(4);
    let mut o = t.create();
    t.add_line(&mut o, "Pizza", 1_200, 1);
    t.pay(&mut o, PaymentKind::GiftCard, 500, PaymentState::Captured)
        .unwrap();
    let at = t.tick();
    let short = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 600,
        reference: String::new(),
    };
    let err = o
        .complete_sale(at, &mut t.rng, Some(FinalPayment::New(short)))
        .unwrap_err();
    assert!(matches!(err, ModelError::BalanceDue { due_minor: 100, .. }));
    let changes_before = o.doc().get_changes(&[]).len();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 1_000,
        reference: String::new(),
    };
    let at = t.tick();
    o.complete_sale(at, &mut t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    assert_eq!(
        o.doc().get_changes(&[]).len(),
        changes_before + 1,
        "payment and Done in one change"
    );
    let v = o.view().unwrap();
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.totals.paid, 1_500);
    assert_eq!(v.totals.change_due, 300);
}

#[test]
fn a_closed_order_refuses_edits_but_allows_refunds() {
    let mut t = Term::new(5);
    let mut o = t.create();
    let l = t.add_line(&mut o, "Tea", 300, 1);
    let at = t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 300,
        reference: String::new(),
    };
    let p = o
        .complete_sale(at, &mut t.rng, Some(FinalPayment::New(cash)))
        .unwrap()
        .unwrap();
    let at = t.tick();
    assert!(matches!(
        o.change_quantity(at, l, 1),
        Err(ModelError::OrderClosed {
            status: OrderStatus::Done
        })
    ));
    assert!(matches!(
        o.set_status(at, &mut t.rng, ActiveStatus::Delayed),
        Err(ModelError::OrderClosed { .. })
    ));
    assert!(matches!(
        o.delete(at, &mut t.rng),
        Err(ModelError::OrderClosed { .. })
    ));
    assert!(
        t.pay(&mut o, PaymentKind::Cash, 1, PaymentState::Captured)
            .is_err()
    );
    o.refund_payment(at, &mut t.rng, p).unwrap();
    let v = o.view().unwrap();
    assert_eq!(v.status, OrderStatus::Done);
    assert_eq!(v.totals.refunded, 300);
    assert_eq!(v.totals.paid, 0);
}

#[test]
fn delete_needs_money_settled() {
    let mut t = Term::new(6);
    let mut o = t.create();
    t.add_line(&mut o, "Tea", 300, 1);
    let p = t
        .pay(
            &mut o,
            PaymentKind::CardTerminal,
            300,
            PaymentState::Pending,
        )
        .unwrap();
    let at = t.tick();
    assert!(matches!(
        o.delete(at, &mut t.rng),
        Err(ModelError::OutstandingPayments(1))
    ));
    o.void_payment(at, &mut t.rng, p).unwrap();
    let at = t.tick();
    o.delete(at, &mut t.rng).unwrap();
    assert_eq!(o.status().unwrap(), OrderStatus::Deleted);
}

#[test]
fn the_number_is_written_once() {
    let mut t = Term::new(7);
    let mut o = t.create();
    let at = t.tick();
    assert!(o.assign_number(at, OrderNumber(41)).unwrap());
    assert!(
        !o.assign_number(at, OrderNumber(41)).unwrap(),
        "same number again is a no-op"
    );
    assert!(matches!(
        o.assign_number(at, OrderNumber(42)),
        Err(ModelError::NumberAlreadyAssigned(41))
    ));
    assert_eq!(o.view().unwrap().number, Some(41));
}

#[test]
fn save_and_load_round_trip() {
    let mut t = Term::new(8);
    let mut o = t.create();
    t.add_line(&mut o, "Soup", 450, 2);
    t.pay(&mut o, PaymentKind::Check, 900, PaymentState::Captured)
        .unwrap();
    let loaded = Order::load(&o.save(), t.writer.clone()).unwrap();
    assert_eq!(loaded.view().unwrap(), o.view().unwrap());
    assert_eq!(loaded.heads(), o.heads());
}

#[test]
fn loading_garbage_is_a_typed_error() {
    let w = Term::new(9).writer;
    assert!(matches!(
        Order::load(b"", w.clone()),
        Err(ModelError::NotAnOrder(_) | ModelError::Load(_))
    ));
    assert!(matches!(
        Order::load(b"\x85\x6f\x4a\x83garbage", w.clone()),
        Err(ModelError::Load(_))
    ));
    let mut doc = automerge::AutoCommit::new();
    use automerge::transaction::Transactable;
    doc.put(automerge::ROOT, "hello", "world").unwrap();
    assert!(matches!(
        Order::load(&doc.save(), w),
        Err(ModelError::NotAnOrder(_))
    ));
}
