//! Regressions: the forged changes an attacker's review found accepted by the policy (issue
//! 10). Each writes a new object over an existing key, or beside it, with raw Automerge. They
//! are examples; `forged_history.rs` is the property that covers the whole class.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use common::*;
use crdt_model::*;

fn obj(doc: &Automerge, path: &[&str]) -> ObjId {
    let mut o = ROOT;
    for k in path {
        o = doc.get(&o, *k).unwrap().unwrap().1;
    }
    o
}

/// The key of the entry of `container` whose field `field` reads `value`.
fn entry_where(doc: &Automerge, container: &[&str], field: &str, value: &str) -> String {
    let c = obj(doc, container);
    doc.keys(&c)
        .find(|k| {
            let e = obj(doc, &[container, &[k.as_str()]].concat());
            matches!(doc.get(&e, field).unwrap(), Some((v, _)) if v.as_str() == Some(value))
        })
        .unwrap()
}

/// Copies the map `from` (scalars and nested maps) into the new map `to`, replacing the
/// scalars named in `changes`.
fn copy_map(
    doc: &Automerge,
    tx: &mut automerge::transaction::Transaction<'_>,
    from: &ObjId,
    to: &ObjId,
    changes: &[(&str, ScalarValue)],
    skip: &[&str],
) {
    for k in doc.keys(from).collect::<Vec<_>>() {
        if skip.contains(&k.as_str()) {
            continue;
        }
        match doc.get(from, k.as_str()).unwrap().unwrap() {
            (Value::Scalar(v), _) => {
                let v = changes
                    .iter()
                    .find(|(f, _)| *f == k)
                    .map_or_else(|| v.into_owned(), |(_, v)| v.clone());
                tx.put(to, k.as_str(), v).unwrap();
            }
            (Value::Object(t), id) => {
                let inner = tx.put_object(to, k.as_str(), t).unwrap();
                if t == ObjType::Map {
                    copy_map(doc, tx, &id, &inner, changes, skip);
                }
            }
        }
    }
}

/// A closed order: a line, a captured card payment and the final cash payment, then Done.
fn closed_order(t: &mut Term) -> Order {
    let mut o = t.create();
    t.add_line(&mut o, "Burger", 900, 1);
    t.pay(
        &mut o,
        PaymentKind::CardTerminal,
        400,
        PaymentState::Captured,
    )
    .unwrap();
    let at = t.tick();
    let cash = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 500,
        reference: String::new(),
    };
    o.complete_sale(at, &mut t.rng, Some(FinalPayment::New(cash)))
        .unwrap();
    o
}

/// The relay's copy with the device's forged change merged in, judged as the device.
fn judge(t: &Term, relay: &Automerge, device: &Order) -> Result<usize, PolicyViolation> {
    let mut after = relay.clone();
    after.merge(&mut device.doc().clone()).unwrap();
    validate(relay, &after, &t.author())
}

/// Writes a new object over the order's Done entry: the same entry, now `in_progress` with a
/// higher clock (the attack that reopened a Done order).
fn reopen_by_overwrite(o: &mut Order) {
    let done = entry_where(o.doc(), &["status"], "status", "done");
    let status = obj(o.doc(), &["status"]);
    let old = obj(o.doc(), &["status", &done]);
    let snapshot = o.doc().clone();
    let mut tx = o.doc_mut().transaction();
    let e = tx.put_object(&status, done.as_str(), ObjType::Map).unwrap();
    copy_map(
        &snapshot,
        &mut tx,
        &old,
        &e,
        &[
            ("status", ScalarValue::Str("in_progress".into())),
            ("clock", ScalarValue::Uint(100)),
        ],
        &[],
    );
    tx.commit();
}

#[test]
fn a_done_order_is_not_reopened_by_a_new_object_over_its_done_entry() {
    let mut t = Term::new(21);
    let mut o = closed_order(&mut t);
    let relay = o.doc().clone();
    reopen_by_overwrite(&mut o);
    let verdict = judge(&t, &relay, &o);
    assert!(
        matches!(verdict, Err(PolicyViolation::StatusRewritten(_))),
        "{verdict:?}"
    );
}

#[test]
fn a_captured_payment_is_not_rewritten_downwards_by_a_new_object() {
    let mut t = Term::new(22);
    let mut o = t.create();
    t.add_line(&mut o, "Burger", 900, 1);
    t.pay(
        &mut o,
        PaymentKind::CardTerminal,
        900,
        PaymentState::Captured,
    )
    .unwrap();
    let relay = o.doc().clone();
    let pid = entry_where(o.doc(), &["payments"], "kind", "card_terminal");
    let payments = obj(o.doc(), &["payments"]);
    let old = obj(o.doc(), &["payments", &pid]);
    let snapshot = o.doc().clone();
    let mut tx = o.doc_mut().transaction();
    let p = tx
        .put_object(&payments, pid.as_str(), ObjType::Map)
        .unwrap();
    copy_map(
        &snapshot,
        &mut tx,
        &old,
        &p,
        &[("amount", ScalarValue::Int(1))],
        &[],
    );
    tx.commit();
    let verdict = judge(&t, &relay, &o);
    assert!(
        matches!(verdict, Err(PolicyViolation::EntryRewritten(_))),
        "{verdict:?}"
    );
}

#[test]
fn a_removed_line_is_not_brought_back_with_another_price() {
    let mut t = Term::new(23);
    let mut o = t.create();
    let line = t.add_line(&mut o, "Burger", 900, 1);
    let at = t.tick();
    o.remove_line(at, line).unwrap();
    let relay = o.doc().clone();
    let lid = line.to_string();
    let lines = obj(o.doc(), &["lines"]);
    let old = obj(o.doc(), &["lines", &lid]);
    let snapshot = o.doc().clone();
    let mut tx = o.doc_mut().transaction();
    let l = tx.put_object(&lines, lid.as_str(), ObjType::Map).unwrap();
    copy_map(
        &snapshot,
        &mut tx,
        &old,
        &l,
        &[("unit_price", ScalarValue::Int(1))],
        &["removed_by", "removed_at"],
    );
    tx.commit();
    let verdict = judge(&t, &relay, &o);
    assert!(
        matches!(verdict, Err(PolicyViolation::EntryRewritten(_))),
        "{verdict:?}"
    );
}

#[test]
fn a_change_hiding_the_done_entry_is_judged_as_made_after_the_close() {
    // Two changes: the first hides Done, the second (built on it) takes a payment. Neither
    // may pass: the first replaces a status entry, and the second's author had seen Done.
    let mut t = Term::new(24);
    let mut o = closed_order(&mut t);
    let relay = o.doc().clone();
    reopen_by_overwrite(&mut o);
    let mut o = Order::from_doc(o.into_doc(), t.writer.clone()).unwrap();
    let draft = PaymentDraft {
        kind: PaymentKind::Cash,
        amount: 100,
        reference: String::new(),
    };
    let at = t.tick();
    // The typed API now reads the order as open again; that is the attack.
    o.add_payment(at, &mut t.rng, draft, PaymentState::Captured)
        .unwrap();
    let verdict = judge(&t, &relay, &o);
    assert!(verdict.is_err(), "{verdict:?}");
}

#[test]
fn an_entry_written_beside_an_existing_one_from_an_older_state_is_refused() {
    // The attacker bases its change on a state from before the payment existed, so its write
    // under the payment's key has no predecessor: a conflict Automerge would resolve by op id.
    let mut t = Term::new(25);
    let mut o = t.create();
    t.add_line(&mut o, "Burger", 900, 1);
    let early = o.heads();
    t.pay(
        &mut o,
        PaymentKind::CardTerminal,
        900,
        PaymentState::Captured,
    )
    .unwrap();
    let relay = o.doc().clone();
    let pid = entry_where(o.doc(), &["payments"], "kind", "card_terminal");
    let payments = obj(o.doc(), &["payments"]);
    let old = obj(o.doc(), &["payments", &pid]);
    let mut fork = relay.fork_at(&early).unwrap();
    let mut actor = t.device.0.as_bytes().to_vec();
    actor.extend_from_slice(&77u32.to_be_bytes());
    fork.set_actor(ActorId::from(actor));
    let mut tx = fork.transaction();
    // Pad the op counter with a valid new line so the forged object wins the key.
    let lines = obj(&relay, &["lines"]);
    let lid = LineId::generate(Timestamp(T0), &mut t.rng).to_string();
    let me = t.device.to_string();
    let l = tx.put_object(&lines, lid.as_str(), ObjType::Map).unwrap();
    for (k, v) in [
        ("sku", ScalarValue::Str("x".into())),
        ("name", ScalarValue::Str("x".into())),
        ("unit_price", ScalarValue::Int(1)),
        ("qty", ScalarValue::counter(1)),
        ("created_by", ScalarValue::Str(me.as_str().into())),
        ("created_at", ScalarValue::Timestamp(T0)),
    ] {
        tx.put(&l, k, v).unwrap();
    }
    tx.put_object(&l, "modifiers", ObjType::List).unwrap();
    for _ in 0..50 {
        tx.put(&l, "note", "pad").unwrap();
    }
    let p = tx
        .put_object(&payments, pid.as_str(), ObjType::Map)
        .unwrap();
    copy_map(
        &relay,
        &mut tx,
        &old,
        &p,
        &[("amount", ScalarValue::Int(1))],
        &[],
    );
    tx.commit();
    let mut after = relay.clone();
    after.merge(&mut fork).unwrap();
    let verdict = validate(&relay, &after, &t.author());
    assert!(verdict.is_err(), "{verdict:?}");
}

#[test]
fn a_second_first_change_cannot_replace_the_containers() {
    // A change with no dependencies that writes the same header and fresh, empty containers
    // with higher op ids: the order's payments would vanish behind the new containers.
    let mut t = Term::new(26);
    let mut o = t.create();
    t.add_line(&mut o, "Burger", 900, 1);
    t.pay(
        &mut o,
        PaymentKind::CardTerminal,
        900,
        PaymentState::Captured,
    )
    .unwrap();
    let relay = o.doc().clone();
    let mut actor = t.device.0.as_bytes().to_vec();
    actor.extend_from_slice(&78u32.to_be_bytes());
    let mut forged = Automerge::new().with_actor(ActorId::from(actor));
    let mut tx = forged.transaction();
    for _ in 0..20 {
        for k in [
            "schema",
            "id",
            "store",
            "currency",
            "created_by",
            "created_at",
        ] {
            let (v, _) = relay.get(ROOT, k).unwrap().unwrap();
            tx.put(ROOT, k, v.into_scalar().unwrap()).unwrap();
        }
    }
    for k in ["lines", "payments", "status", "acks"] {
        tx.put_object(ROOT, k, ObjType::Map).unwrap();
    }
    tx.commit();
    let mut after = relay.clone();
    after.merge(&mut forged).unwrap();
    let verdict = validate(&relay, &after, &t.author());
    assert!(verdict.is_err(), "{verdict:?}");
}

#[test]
fn an_honest_note_edit_after_a_concurrent_note_conflict_passes() {
    // Automerge writes a delete op when a put matches a value a concurrent write holds; the
    // old policy refused that honest edit (the till would have been Blocked).
    let mut a = Term::new(27);
    let mut b = Term::new(28);
    let mut oa = a.create();
    let line = a.add_line(&mut oa, "Burger", 900, 1);
    let mut relay = oa.doc().clone();
    let mut ob = b.replica(&oa);
    let at = a.tick();
    oa.set_note(at, line, "well done").unwrap();
    let at = b.tick();
    ob.set_note(at, line, "well done").unwrap();
    let mut after = relay.clone();
    after.merge(&mut ob.doc().clone()).unwrap();
    assert_eq!(validate(&relay, &after, &b.author()), Ok(1));
    relay = after;
    oa.apply_changes(relay.get_changes(&oa.heads())).unwrap();
    let at = a.tick();
    oa.set_note(at, line, "well done").unwrap();
    let mut after = relay.clone();
    after.merge(&mut oa.doc().clone()).unwrap();
    assert_eq!(validate(&relay, &after, &a.author()), Ok(2));
}
