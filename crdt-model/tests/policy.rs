//! The relay's policy against forged changes built with raw Automerge, one test per rule.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::transaction::{Transactable, Transaction};
use automerge::{Automerge, ObjType, ROOT, ReadDoc, ScalarValue};
use common::*;
use crdt_model::*;

/// The relay's stored copy and a device replica of one order.
struct Setup {
    t: Term,
    relay: Automerge,
    order: Order,
}

fn setup() -> Setup {
    let mut t = Term::new(11);
    let mut order = t.create();
    t.add_line(&mut order, "Burger", 900, 1);
    t.pay(
        &mut order,
        PaymentKind::CardTerminal,
        400,
        PaymentState::Captured,
    )
    .unwrap();
    let relay = order.doc().clone();
    Setup { t, relay, order }
}

/// `before` plus whatever the device's replica holds.
fn after(relay: &Automerge, device: &Automerge) -> Automerge {
    let mut a = relay.clone();
    a.merge(&mut device.clone()).unwrap();
    a
}

/// A raw Automerge change on the device's replica, bypassing the typed API.
fn forge(order: &mut Order, f: impl FnOnce(&mut Transaction<'_>)) {
    let mut tx = order.doc_mut().transaction();
    f(&mut tx);
    tx.commit();
}

fn obj(doc: &Automerge, path: &[&str]) -> automerge::ObjId {
    let mut o = ROOT;
    for k in path {
        o = doc.get(&o, *k).unwrap().unwrap().1;
    }
    o
}

fn first_key(doc: &Automerge, path: &[&str]) -> String {
    doc.keys(obj(doc, path)).next().unwrap()
}

fn judge(s: &Setup) -> Result<usize, PolicyViolation> {
    validate(&s.relay, &after(&s.relay, s.order.doc()), &s.t.author())
}

#[test]
fn ordinary_edits_pass() {
    let mut s = setup();
    let l = s.t.add_line(&mut s.order, "Fries", 300, 2);
    let at = s.t.tick();
    s.order.change_quantity(at, l, -1).unwrap();
    s.order
        .set_status(at, &mut s.t.rng, ActiveStatus::InDelivery)
        .unwrap();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 800,
        reference: String::new(),
    };
    s.order
        .complete_sale(at, &mut s.t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    assert_eq!(judge(&s), Ok(4));
}

#[test]
fn a_new_order_passes_from_an_empty_relay() {
    let mut t = Term::new(12);
    let o = t.create();
    assert_eq!(validate(&Automerge::new(), o.doc(), &t.author()), Ok(1));
}

#[test]
fn immutable_fields_are_refused() {
    let mut s = setup();
    forge(&mut s.order, |tx| {
        tx.put(ROOT, "store", "store-2").unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::ImmutableField(_))));
}

#[test]
fn a_recreated_container_is_refused() {
    let mut s = setup();
    forge(&mut s.order, |tx| {
        tx.put_object(ROOT, "payments", ObjType::Map).unwrap();
    });
    let err = judge(&s).unwrap_err();
    assert!(
        matches!(
            err,
            PolicyViolation::ImmutableField(_) | PolicyViolation::NotAnOrder(_)
        ),
        "{err:?}"
    );
}

#[test]
fn a_device_may_not_write_the_number() {
    let mut s = setup();
    forge(&mut s.order, |tx| {
        tx.put(ROOT, "number", 7u64).unwrap();
    });
    assert_eq!(judge(&s), Err(PolicyViolation::NumberWrittenByDevice));
}

#[test]
fn the_relay_writes_the_number_once() {
    let mut relay_term = Term::new(99);
    let mut s = setup();
    let relay_author = Author {
        device: relay_term.device,
        store: store(),
        role: Role::Relay,
        seal: None,
        vouched: Default::default(),
    };
    let mut relay_order = Order::from_doc(s.relay.clone(), relay_term.writer.clone()).unwrap();
    let at = relay_term.tick();
    relay_order.assign_number(at, OrderNumber(1)).unwrap();
    assert_eq!(validate(&s.relay, relay_order.doc(), &relay_author), Ok(1));
    s.relay = relay_order.doc().clone();
    let mut forged = relay_order.clone();
    {
        let mut tx = forged.doc_mut().transaction();
        tx.put(ROOT, "number", 2u64).unwrap();
        tx.commit();
    }
    assert_eq!(
        validate(&s.relay, forged.doc(), &relay_author),
        Err(PolicyViolation::NumberReassigned)
    );
}

#[test]
fn un_closing_by_deleting_a_status_entry_is_refused() {
    let mut s = setup();
    let at = s.t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 500,
        reference: String::new(),
    };
    s.order
        .complete_sale(at, &mut s.t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    s.relay = s.order.doc().clone();
    let status = obj(s.order.doc(), &["status"]);
    let keys: Vec<String> = s.order.doc().keys(&status).collect();
    let done_key = keys
        .iter()
        .find(|k| {
            let e = s.order.doc().get(&status, k.as_str()).unwrap().unwrap().1;
            matches!(
                s.order.doc().get(&e, "status").unwrap().unwrap().0.as_str(),
                Some("done")
            )
        })
        .unwrap()
        .clone();
    forge(&mut s.order, |tx| {
        tx.delete(&status, done_key.as_str()).unwrap();
    });
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::StatusRewritten(_))
    ));
}

#[test]
fn rewriting_a_status_entry_is_refused() {
    let mut s = setup();
    let status = obj(s.order.doc(), &["status"]);
    let key = first_key(s.order.doc(), &["status"]);
    let entry = obj(s.order.doc(), &["status", &key]);
    forge(&mut s.order, |tx| {
        tx.put(&entry, "status", "delayed").unwrap();
    });
    let _ = status;
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::StatusRewritten(_))
    ));
}

#[test]
fn an_edit_made_after_seeing_the_close_is_refused() {
    let mut s = setup();
    let at = s.t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 500,
        reference: String::new(),
    };
    s.order
        .complete_sale(at, &mut s.t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    s.relay = s.order.doc().clone();
    let lines = obj(s.order.doc(), &["lines"]);
    let line = first_key(s.order.doc(), &["lines"]);
    let line_obj = obj(s.order.doc(), &["lines", &line]);
    forge(&mut s.order, |tx| {
        tx.increment(&line_obj, "qty", 5).unwrap();
    });
    let _ = lines;
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::EditAfterClose {
            status: OrderStatus::Done,
            ..
        })
    ));
}

#[test]
fn a_refund_after_the_close_is_accepted() {
    let mut s = setup();
    let at = s.t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 500,
        reference: String::new(),
    };
    let p = s
        .order
        .complete_sale(at, &mut s.t.rng, Some(FinalPayment::New(cash)))
        .unwrap()
        .unwrap();
    s.relay = s.order.doc().clone();
    let at = s.t.tick();
    s.order.refund_payment(at, &mut s.t.rng, p).unwrap();
    assert_eq!(judge(&s), Ok(1));
}

#[test]
fn an_edit_concurrent_with_the_close_is_accepted_and_flagged() {
    let mut s = setup();
    let mut other = Term::new(13);
    let mut replica = other.replica(&s.order);
    // The device closes; meanwhile the other terminal (offline) adds a line.
    let at = s.t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 500,
        reference: String::new(),
    };
    s.order
        .complete_sale(at, &mut s.t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    s.relay = s.order.doc().clone();
    other.add_line(&mut replica, "Dessert", 400, 1);
    let merged = after(&s.relay, replica.doc());
    assert_eq!(validate(&s.relay, &merged, &other.author()), Ok(1));
    let view = Order::from_doc(merged, other.writer.clone())
        .unwrap()
        .view()
        .unwrap();
    assert_eq!(view.status, OrderStatus::Done);
    assert_eq!(view.late_edits.len(), 1);
    assert_eq!(view.late_edits[0].kind, LateEditKind::LineAdded);
    assert_eq!(view.totals.total, 900, "the late line is not counted");
}

#[test]
fn deleting_a_payment_is_refused() {
    let mut s = setup();
    let payments = obj(s.order.doc(), &["payments"]);
    let key = first_key(s.order.doc(), &["payments"]);
    forge(&mut s.order, |tx| {
        tx.delete(&payments, key.as_str()).unwrap();
    });
    let verdict = judge(&s);
    assert!(
        matches!(verdict, Err(PolicyViolation::EntryRewritten(_))),
        "{verdict:?}"
    );
}

#[test]
fn rewriting_a_payment_amount_is_refused() {
    let mut s = setup();
    let key = first_key(s.order.doc(), &["payments"]);
    let p = obj(s.order.doc(), &["payments", &key]);
    forge(&mut s.order, |tx| {
        tx.put(&p, "amount", 1i64).unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::EntryRewritten(_))));
}

fn add_transition(s: &mut Setup, state: &str) {
    let key = first_key(s.order.doc(), &["payments"]);
    let tr = obj(s.order.doc(), &["payments", &key, "transitions"]);
    let at = s.t.tick();
    let tid = EntryId::generate(at, &mut s.t.rng).to_string();
    let me = s.t.device.to_string();
    let state = state.to_owned();
    forge(&mut s.order, |tx| {
        let e = tx.put_object(&tr, tid.as_str(), ObjType::Map).unwrap();
        tx.put(&e, "state", state.as_str()).unwrap();
        tx.put(&e, "at", ScalarValue::Timestamp(at.0)).unwrap();
        tx.put(&e, "by", me.as_str()).unwrap();
    });
}

#[test]
fn a_payment_state_moving_backwards_is_refused() {
    let mut s = setup();
    add_transition(&mut s, "pending");
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::PaymentBackwards {
            from: PaymentState::Captured,
            to: PaymentState::Pending,
            ..
        })
    ));
    let mut s = setup();
    add_transition(&mut s, "voided");
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::PaymentBackwards { .. })
    ));
    let mut s = setup();
    add_transition(&mut s, "refunded");
    assert_eq!(judge(&s), Ok(1), "a forward move passes");
}

fn forge_payment(s: &mut Setup, amount: i64, currency: &str, reference: &str) {
    let payments = obj(s.order.doc(), &["payments"]);
    let at = s.t.tick();
    let pid = PaymentId::generate(at, &mut s.t.rng).to_string();
    let tid = EntryId::generate(at, &mut s.t.rng).to_string();
    let me = s.t.device.to_string();
    let (currency, reference) = (currency.to_owned(), reference.to_owned());
    forge(&mut s.order, |tx| {
        let p = tx
            .put_object(&payments, pid.as_str(), ObjType::Map)
            .unwrap();
        tx.put(&p, "kind", "cash").unwrap();
        tx.put(&p, "amount", amount).unwrap();
        tx.put(&p, "currency", currency.as_str()).unwrap();
        tx.put(&p, "reference", reference.as_str()).unwrap();
        tx.put(&p, "created_by", me.as_str()).unwrap();
        tx.put(&p, "created_at", ScalarValue::Timestamp(at.0))
            .unwrap();
        let t = tx.put_object(&p, "transitions", ObjType::Map).unwrap();
        let e = tx.put_object(&t, tid.as_str(), ObjType::Map).unwrap();
        tx.put(&e, "state", "captured").unwrap();
        tx.put(&e, "at", ScalarValue::Timestamp(at.0)).unwrap();
        tx.put(&e, "by", me.as_str()).unwrap();
    });
}

#[test]
fn a_forged_valid_payment_passes() {
    let mut s = setup();
    forge_payment(&mut s, 100, "EUR", "");
    assert_eq!(judge(&s), Ok(1));
}

#[test]
fn negative_and_overflowing_amounts_are_refused() {
    for amount in [-5, 0, i64::MAX] {
        let mut s = setup();
        forge_payment(&mut s, amount, "EUR", "");
        assert!(
            matches!(judge(&s), Err(PolicyViolation::InvalidAmount(_))),
            "amount {amount}"
        );
    }
}

#[test]
fn unknown_or_foreign_currencies_are_refused() {
    for c in ["XXX", "USD", "eur"] {
        let mut s = setup();
        forge_payment(&mut s, 100, c, "");
        assert!(
            matches!(judge(&s), Err(PolicyViolation::InvalidCurrency(_))),
            "currency {c}"
        );
    }
}

#[test]
fn a_full_card_number_in_a_reference_is_refused() {
    let mut s = setup();
    forge_payment(&mut s, 100, "EUR", "4111 1111 1111 1111");
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::CardNumberInReference(_))
    ));
    let mut s = setup();
    forge_payment(&mut s, 100, "EUR", "**** **** **** 1111");
    assert_eq!(judge(&s), Ok(1));
}

#[test]
fn wrong_value_types_are_refused() {
    let mut s = setup();
    let line = first_key(s.order.doc(), &["lines"]);
    let l = obj(s.order.doc(), &["lines", &line]);
    forge(&mut s.order, |tx| {
        tx.put(&l, "unit_price", "free").unwrap();
    });
    assert!(matches!(
        judge(&s),
        Err(PolicyViolation::WrongType { .. } | PolicyViolation::NotAnOrder(_))
    ));
}

#[test]
fn unknown_fields_are_refused() {
    let mut s = setup();
    forge(&mut s.order, |tx| {
        tx.put(ROOT, "discount", 100i64).unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::UnknownField(_))));
}

#[test]
fn a_document_that_is_not_an_order_is_refused() {
    let t = Term::new(14);
    let mut doc = Automerge::new().with_actor(t.writer.actor.clone());
    let mut tx = doc.transaction();
    tx.put(ROOT, "hello", "world").unwrap();
    tx.commit();
    assert!(matches!(
        validate(&Automerge::new(), &doc, &t.author()),
        Err(PolicyViolation::NotAnOrder(_))
    ));
}

#[test]
fn changes_by_another_actor_are_refused() {
    let s = setup();
    let intruder = Term::new(15);
    assert!(matches!(
        validate(
            &s.relay,
            &after(&s.relay, s.order.doc()),
            &intruder.author()
        ),
        Ok(0)
    ));
    let mut s = setup();
    s.t.add_line(&mut s.order, "Cola", 200, 1);
    assert!(matches!(
        validate(
            &s.relay,
            &after(&s.relay, s.order.doc()),
            &intruder.author()
        ),
        Err(PolicyViolation::ForeignActor(_))
    ));
}

#[test]
fn an_order_of_another_store_is_refused_without_detail() {
    let mut s = setup();
    s.t.add_line(&mut s.order, "Cola", 200, 1);
    let mut author = s.t.author();
    author.store = StoreId::new("store-2").unwrap();
    let err = validate(&s.relay, &after(&s.relay, s.order.doc()), &author).unwrap_err();
    assert_eq!(err, PolicyViolation::ForeignStore);
    assert_eq!(err.to_string(), "order not found");
}

#[test]
fn impersonating_another_device_in_an_entry_is_refused() {
    let mut s = setup();
    let lines = obj(s.order.doc(), &["lines"]);
    let at = s.t.tick();
    let lid = LineId::generate(at, &mut s.t.rng).to_string();
    let other = Term::new(16).device.to_string();
    forge(&mut s.order, |tx| {
        let l = tx.put_object(&lines, lid.as_str(), ObjType::Map).unwrap();
        tx.put(&l, "sku", "x").unwrap();
        tx.put(&l, "name", "x").unwrap();
        tx.put(&l, "unit_price", 1i64).unwrap();
        tx.put(&l, "qty", ScalarValue::counter(1)).unwrap();
        tx.put_object(&l, "modifiers", ObjType::List).unwrap();
        tx.put(&l, "note", "").unwrap();
        tx.put(&l, "created_by", other.as_str()).unwrap();
        tx.put(&l, "created_at", ScalarValue::Timestamp(at.0))
            .unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::ForeignActor(_))));
}

#[test]
fn a_line_with_modifiers_passes() {
    let mut s = setup();
    let at = s.t.tick();
    s.order
        .add_line(
            at,
            &mut s.t.rng,
            LineDraft {
                sku: "burger".into(),
                name: "Burger".into(),
                unit_price: 900,
                quantity: 1,
                modifiers: vec!["no onions".into(), "extra cheese".into()],
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(judge(&s), Ok(1));
}

#[test]
fn a_modifier_that_is_not_a_string_or_added_later_is_refused() {
    let mut s = setup();
    let at = s.t.tick();
    let lines = obj(s.order.doc(), &["lines"]);
    let lid = LineId::generate(at, &mut s.t.rng).to_string();
    let me = s.t.author().device.to_string();
    forge(&mut s.order, |tx| {
        let l = tx.put_object(&lines, lid.as_str(), ObjType::Map).unwrap();
        tx.put(&l, "sku", "x").unwrap();
        tx.put(&l, "name", "x").unwrap();
        tx.put(&l, "unit_price", 1i64).unwrap();
        tx.put(&l, "qty", ScalarValue::counter(1)).unwrap();
        let m = tx.put_object(&l, "modifiers", ObjType::List).unwrap();
        tx.insert(&m, 0, 42i64).unwrap();
        tx.put(&l, "note", "").unwrap();
        tx.put(&l, "created_by", me.as_str()).unwrap();
        tx.put(&l, "created_at", ScalarValue::Timestamp(at.0))
            .unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::WrongType { .. })));

    // A modifier appended to an existing line.
    let mut s = setup();
    let line = first_key(s.order.doc(), &["lines"]);
    let mods = obj(s.order.doc(), &["lines", &line, "modifiers"]);
    forge(&mut s.order, |tx| {
        tx.insert(&mods, 0, "late").unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::ImmutableField(_))));
}

#[test]
fn an_edit_concurrent_with_a_line_removal_passes_but_one_after_seeing_it_is_refused() {
    let mut s = setup();
    let mut other = Term::new(17);
    let mut replica = other.replica(&s.order);
    let line = first_key(s.order.doc(), &["lines"]);
    let line_id: LineId = line.parse().unwrap();
    // This device removes the line; the relay stores it.
    let at = s.t.tick();
    s.order.remove_line(at, line_id).unwrap();
    s.relay = s.order.doc().clone();
    // Meanwhile the other terminal, which has not seen the removal, changes the quantity.
    let at = other.tick();
    replica.change_quantity(at, line_id, 2).unwrap();
    let merged = after(&s.relay, replica.doc());
    assert_eq!(validate(&s.relay, &merged, &other.author()), Ok(1));

    // Once it has seen the removal, the same edit (forged past the typed API) is refused.
    let mut replica =
        other.replica(&Order::from_doc(merged.clone(), other.writer.clone()).unwrap());
    let relay = merged;
    let line_obj = obj(replica.doc(), &["lines", &line]);
    forge(&mut replica, |tx| {
        tx.increment(&line_obj, "qty", 1).unwrap();
    });
    let merged = after(&relay, replica.doc());
    assert!(matches!(
        validate(&relay, &merged, &other.author()),
        Err(PolicyViolation::EntryRewritten(_))
    ));
}

#[test]
fn a_capture_concurrent_with_a_void_passes() {
    let mut s = setup();
    let at = s.t.tick();
    let p = s
        .order
        .begin_payment(
            at,
            &mut s.t.rng,
            PaymentDraft {
                kind: PaymentKind::CardTerminal,
                amount: 300,
                reference: String::new(),
            },
        )
        .unwrap();
    let at = s.t.tick();
    s.order
        .authorize_payment(at, &mut s.t.rng, p, "AUTH-1")
        .unwrap();
    let mut other = Term::new(19);
    let mut replica = other.replica(&s.order);
    let at = s.t.tick();
    s.order.void_payment(at, &mut s.t.rng, p).unwrap();
    s.relay = s.order.doc().clone();
    let at = other.tick();
    replica.capture_payment(at, &mut other.rng, p).unwrap();
    let merged = after(&s.relay, replica.doc());
    assert_eq!(validate(&s.relay, &merged, &other.author()), Ok(1));
}

#[test]
fn a_batch_that_creates_then_edits_a_line_passes() {
    let mut s = setup();
    let l = s.t.add_line(&mut s.order, "Soda", 250, 1);
    let at = s.t.tick();
    s.order.change_quantity(at, l, 3).unwrap();
    s.order.set_note(at, l, "no ice").unwrap();
    let at = s.t.tick();
    s.order.remove_line(at, l).unwrap();
    assert_eq!(judge(&s), Ok(4));
    // A write into the removed line in the same batch is refused.
    let line_obj = obj(s.order.doc(), &["lines", &l.to_string()]);
    forge(&mut s.order, |tx| {
        tx.put(&line_obj, "note", "after removal").unwrap();
    });
    assert!(matches!(judge(&s), Err(PolicyViolation::EntryRewritten(_))));
}
