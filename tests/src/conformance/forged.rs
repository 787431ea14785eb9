//! Forged changes against the relay's policy: at least one vector per rejection code (the
//! conformance test checks every code of `PolicyViolation::CODES` appears), and forgeries that
//! the policy must accept. Each forgery is a raw Automerge change shipped as base64, so a
//! client in another language can offer the same bytes to its own judge.

use anyhow::{Context, Result, bail};
use crdt_model::automerge::transaction::Transactable;
use crdt_model::automerge::{Automerge, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use crdt_model::{EntryId, LineId, PaymentId, SplitMix64, Timestamp};

use super::format::{Op, Vector, Verdict};
use super::scenarios::{complete_cash, line, pay};
use super::sim::{Sim, T0};

/// The object at `path` from the root of `doc`.
pub fn obj(doc: &Automerge, path: &[&str]) -> Result<ObjId> {
    let mut o = ROOT;
    for k in path {
        match doc.get(&o, *k)? {
            Some((Value::Object(_), id)) => o = id,
            _ => bail!("no object at {}", path.join(".")),
        }
    }
    Ok(o)
}

/// The keys of the map at `path`.
pub fn keys(doc: &Automerge, path: &[&str]) -> Result<Vec<String>> {
    Ok(doc.keys(obj(doc, path)?).collect())
}

/// The forger's setup: a till `t` with an order (one line, a captured card payment of 400)
/// that the relay holds.
struct Setup {
    s: Sim,
    t: usize,
    relay: usize,
    line: String,
    payment: String,
}

fn setup(name: &str, description: &str, code: &str) -> Result<Setup> {
    let mut s = Sim::new(&format!("policy/{name}"), description);
    s.cover(format!("code:{code}"));
    let t = s.device("till", 200)?;
    let relay = s.relay("relay", 201)?;
    s.create(t)?;
    let line = s.id(t, line("Burger", 900, 1))?;
    let payment = s.id(t, pay("card_terminal", 400, "captured"))?;
    s.push(t, relay)?;
    Ok(Setup {
        s,
        t,
        relay,
        line,
        payment,
    })
}

/// Ids a forger makes up (deterministic, not from any replica's entropy).
fn fresh(n: u64) -> (String, String) {
    let mut rng = SplitMix64::new(0xF0_0000 + n);
    let at = Timestamp(T0 + 500_000);
    (
        PaymentId::generate(at, &mut rng).to_string(),
        EntryId::generate(at, &mut rng).to_string(),
    )
}

/// The till forges `f` and pushes; the verdict must be `expect` (a code, or `None` for
/// accepted).
fn forged(
    mut st: Setup,
    expect: Option<&str>,
    f: impl FnOnce(&mut Setup) -> Result<()>,
) -> Result<Vector> {
    f(&mut st)?;
    let verdict = st.s.push(st.t, st.relay)?;
    match (expect, &verdict) {
        (Some(code), Verdict::Rejected(got)) if got == code => {}
        (None, Verdict::Accepted(_)) => {}
        _ => bail!("expected {expect:?}, the policy said {verdict:?}"),
    }
    st.s.finish()
}

/// A forged payment map with every field, written by `by` with `amount`, `currency`,
/// `reference` and one transition `state`.
#[allow(clippy::too_many_arguments)]
fn forge_payment(
    st: &mut Setup,
    n: u64,
    key: Option<&str>,
    amount: i64,
    currency: &str,
    reference: &str,
    state: &str,
) -> Result<()> {
    let payments = obj(st.s.doc(st.t), &["payments"])?;
    let (pid, tid) = fresh(n);
    let pid = key.map_or(pid, str::to_owned);
    let me = st.s.device_of(st.t);
    let at = T0 + 500_000;
    st.s.forge(st.t, |tx| {
        let p = tx.put_object(&payments, pid.as_str(), ObjType::Map)?;
        tx.put(&p, "kind", "cash")?;
        tx.put(&p, "amount", amount)?;
        tx.put(&p, "currency", currency)?;
        tx.put(&p, "reference", reference)?;
        tx.put(&p, "created_by", me.as_str())?;
        tx.put(&p, "created_at", ScalarValue::Timestamp(at))?;
        let t = tx.put_object(&p, "transitions", ObjType::Map)?;
        let e = tx.put_object(&t, tid.as_str(), ObjType::Map)?;
        tx.put(&e, "state", state)?;
        tx.put(&e, "at", ScalarValue::Timestamp(at))?;
        tx.put(&e, "by", me.as_str())?;
        Ok(())
    })?;
    Ok(())
}

/// A forged line with every field; `name`, `by` and the modifier are the forger's choice.
fn forge_line(
    st: &mut Setup,
    n: u64,
    name: &str,
    by: Option<&str>,
    modifier: Option<ScalarValue>,
) -> Result<()> {
    let lines = obj(st.s.doc(st.t), &["lines"])?;
    let mut rng = SplitMix64::new(0xE0_0000 + n);
    let lid = LineId::generate(Timestamp(T0 + 500_000), &mut rng).to_string();
    let me = st.s.device_of(st.t);
    let by = by.map_or(me, str::to_owned);
    st.s.forge(st.t, |tx| {
        let l = tx.put_object(&lines, lid.as_str(), ObjType::Map)?;
        tx.put(&l, "sku", "x")?;
        tx.put(&l, "name", name)?;
        tx.put(&l, "unit_price", 100_i64)?;
        tx.put(&l, "qty", ScalarValue::counter(1))?;
        let m = tx.put_object(&l, "modifiers", ObjType::List)?;
        if let Some(v) = modifier {
            tx.insert(&m, 0, v)?;
        }
        tx.put(&l, "note", "")?;
        tx.put(&l, "created_by", by.as_str())?;
        tx.put(&l, "created_at", ScalarValue::Timestamp(T0 + 500_000))?;
        Ok(())
    })?;
    Ok(())
}

/// A new transition entry in `state` on the setup's payment.
fn forge_transition(st: &mut Setup, n: u64, state: &str) -> Result<()> {
    let tr = obj(st.s.doc(st.t), &["payments", &st.payment, "transitions"])?;
    let (_, tid) = fresh(n);
    let me = st.s.device_of(st.t);
    st.s.forge(st.t, |tx| {
        let e = tx.put_object(&tr, tid.as_str(), ObjType::Map)?;
        tx.put(&e, "state", state)?;
        tx.put(&e, "at", ScalarValue::Timestamp(T0 + 500_000))?;
        tx.put(&e, "by", me.as_str())?;
        Ok(())
    })?;
    Ok(())
}

/// Closes the setup's order on the till and has the relay store the close.
fn close(st: &mut Setup) -> Result<()> {
    st.s.ok(st.t, complete_cash(500))?;
    st.s.push(st.t, st.relay)?;
    Ok(())
}

/// A scalar put on the setup's line.
fn put_on_line(st: &mut Setup, field: &'static str, v: ScalarValue) -> Result<()> {
    let l = obj(st.s.doc(st.t), &["lines", &st.line])?;
    st.s.forge(st.t, |tx| tx.put(&l, field, v))?;
    Ok(())
}

/// Every rejection code, and forgeries that pass.
pub fn rejections() -> Result<Vec<Vector>> {
    let mut out = Vec::new();
    let d = "A till forges a raw change past the typed API and pushes it; the relay's policy \
             judges it (the verdict and code are in the delivery step) and keeps its state when \
             it refuses.";

    out.push(not_an_order_from_scratch()?);
    out.push(forged(
        setup("not_an_order/payment_key", d, "not_an_order")?,
        Some("not_an_order"),
        |st| forge_payment(st, 1, Some("not-a-payment-id"), 100, "EUR", "", "captured"),
    )?);
    out.push(forged(
        setup("immutable_field/store", d, "immutable_field")?,
        Some("immutable_field"),
        |st| {
            st.s.forge(st.t, |tx| tx.put(ROOT, "store", "store-2"))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("immutable_field/modifier_added_later", d, "immutable_field")?,
        Some("immutable_field"),
        |st| {
            let m = obj(st.s.doc(st.t), &["lines", &st.line, "modifiers"])?;
            st.s.forge(st.t, |tx| tx.insert(&m, 0, "late"))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("number_written_by_device", d, "number_written_by_device")?,
        Some("number_written_by_device"),
        |st| {
            st.s.forge(st.t, |tx| tx.put(ROOT, "number", 7_u64))?;
            Ok(())
        },
    )?);
    out.push(number_reassigned()?);
    out.push(forged(
        setup("status_rewritten/entry_field", d, "status_rewritten")?,
        Some("status_rewritten"),
        |st| {
            let k = keys(st.s.doc(st.t), &["status"])?;
            let key = k.first().context("no status entry")?.clone();
            let e = obj(st.s.doc(st.t), &["status", &key])?;
            st.s.forge(st.t, |tx| tx.put(&e, "status", "delayed"))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("status_rewritten/done_deleted", d, "status_rewritten")?,
        Some("status_rewritten"),
        |st| {
            close(st)?;
            let status = obj(st.s.doc(st.t), &["status"])?;
            let mut done = None;
            for k in keys(st.s.doc(st.t), &["status"])? {
                let e = obj(st.s.doc(st.t), &["status", &k])?;
                if let Some((v, _)) = st.s.doc(st.t).get(&e, "status")?
                    && v.as_str() == Some("done")
                {
                    done = Some(k);
                }
            }
            let done = done.context("no done entry")?;
            st.s.forge(st.t, |tx| tx.delete(&status, done.as_str()))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("edit_after_close/qty", d, "edit_after_close")?,
        Some("edit_after_close"),
        |st| {
            close(st)?;
            let l = obj(st.s.doc(st.t), &["lines", &st.line])?;
            st.s.forge(st.t, |tx| tx.increment(&l, "qty", 5))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("edit_after_close/new_line", d, "edit_after_close")?,
        Some("edit_after_close"),
        |st| {
            close(st)?;
            forge_line(st, 2, "After", None, None)
        },
    )?);
    out.push(forged(
        setup("entry_rewritten/payment_deleted", d, "entry_rewritten")?,
        Some("entry_rewritten"),
        |st| {
            let p = obj(st.s.doc(st.t), &["payments"])?;
            let key = st.payment.clone();
            st.s.forge(st.t, |tx| tx.delete(&p, key.as_str()))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("entry_rewritten/amount", d, "entry_rewritten")?,
        Some("entry_rewritten"),
        |st| {
            let p = obj(st.s.doc(st.t), &["payments", &st.payment])?;
            st.s.forge(st.t, |tx| tx.put(&p, "amount", 1_i64))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("entry_rewritten/edit_after_removal", d, "entry_rewritten")?,
        Some("entry_rewritten"),
        |st| {
            st.s.ok(
                st.t,
                Op::RemoveLine {
                    line: st.line.clone(),
                },
            )?;
            st.s.push(st.t, st.relay)?;
            let l = obj(st.s.doc(st.t), &["lines", &st.line])?;
            st.s.forge(st.t, |tx| tx.increment(&l, "qty", 1))?;
            Ok(())
        },
    )?);
    for (n, state) in [(3, "pending"), (4, "voided"), (5, "authorized")] {
        out.push(forged(
            setup(
                &format!("payment_backwards/{state}"),
                d,
                "payment_backwards",
            )?,
            Some("payment_backwards"),
            |st| forge_transition(st, n, state),
        )?);
    }
    // Above the largest payment (10^15), still an exact number in every JSON reader.
    for (n, amount) in [(6, -5_i64), (7, 0), (8, 1_000_000_000_000_001)] {
        out.push(forged(
            setup(&format!("invalid_amount/payment_{n}"), d, "invalid_amount")?,
            Some("invalid_amount"),
            |st| forge_payment(st, n, None, amount, "EUR", "", "captured"),
        )?);
    }
    out.push(forged(
        setup("invalid_amount/negative_price", d, "invalid_amount")?,
        Some("invalid_amount"),
        |st| put_on_line(st, "unit_price", ScalarValue::Int(-1)),
    )?);
    for (n, c) in [(9, "USD"), (10, "XXX"), (11, "eur")] {
        out.push(forged(
            setup(&format!("invalid_currency/{c}"), d, "invalid_currency")?,
            Some("invalid_currency"),
            |st| forge_payment(st, n, None, 100, c, "", "captured"),
        )?);
    }
    out.push(forged(
        setup("card_number_in_reference", d, "card_number_in_reference")?,
        Some("card_number_in_reference"),
        |st| forge_payment(st, 12, None, 100, "EUR", "4111 1111 1111 1111", "captured"),
    )?);
    out.push(forged(
        setup("card_number_in_text/line_name", d, "card_number_in_text")?,
        Some("card_number_in_text"),
        |st| forge_line(st, 13, "4111111111111111", None, None),
    )?);
    out.push(forged(
        setup("card_number_in_text/note", d, "card_number_in_text")?,
        Some("card_number_in_text"),
        |st| {
            put_on_line(
                st,
                "note",
                ScalarValue::Str("card 4111.1111.1111.1111".into()),
            )
        },
    )?);
    out.push(forged(
        setup("wrong_type/price_string", d, "wrong_type")?,
        Some("wrong_type"),
        |st| put_on_line(st, "unit_price", ScalarValue::Str("free".into())),
    )?);
    out.push(forged(
        setup("wrong_type/modifier_not_string", d, "wrong_type")?,
        Some("wrong_type"),
        |st| forge_line(st, 14, "Soup", None, Some(ScalarValue::Int(42))),
    )?);
    out.push(forged(
        setup("unknown_field/root", d, "unknown_field")?,
        Some("unknown_field"),
        |st| {
            st.s.forge(st.t, |tx| tx.put(ROOT, "discount", 100_i64))?;
            Ok(())
        },
    )?);
    out.push(forged(
        setup("foreign_actor/impersonation", d, "foreign_actor")?,
        Some("foreign_actor"),
        |st| {
            let other = st.s.device_of(st.relay);
            forge_line(st, 15, "Soup", Some(&other), None)
        },
    )?);
    out.push(foreign_actor_relayed()?);
    out.push(foreign_store()?);
    // Forgeries that are honest in substance pass.
    let ok = "A till writes raw changes that follow every rule; the policy accepts them.";
    out.push(forged(
        setup("accepted/forged_valid_payment", ok, "accepted")?,
        None,
        |st| forge_payment(st, 16, None, 100, "EUR", "**** **** **** 1111", "captured"),
    )?);
    out.push(forged(
        setup("accepted/refund_transition", ok, "accepted")?,
        None,
        |st| forge_transition(st, 17, "refunded"),
    )?);
    out.push(forged(
        setup("accepted/refund_after_close", ok, "accepted")?,
        None,
        |st| {
            close(st)?;
            st.s.ok(
                st.t,
                super::scenarios::advance(&st.payment.clone(), "refunded"),
            )?;
            Ok(())
        },
    )?);
    Ok(out)
}

fn not_an_order_from_scratch() -> Result<Vector> {
    let mut s = Sim::new(
        "policy/not_an_order/from_scratch",
        "A device sends a first change that writes no order header: the relay, which has never \
         seen the order, refuses it as not an order.",
    );
    s.cover("code:not_an_order");
    let t = s.device("till", 210)?;
    let relay = s.relay("relay", 211)?;
    s.forge(t, |tx| tx.put(ROOT, "hello", "world"))?;
    let v = s.push(t, relay)?;
    if v != Verdict::Rejected("not_an_order".into()) {
        bail!("expected not_an_order, got {v:?}");
    }
    s.finish()
}

fn number_reassigned() -> Result<Vector> {
    let mut s = Sim::new(
        "policy/number_reassigned",
        "The relay numbers the order; a second number written over it (forged on the relay's \
         copy) is refused by another relay holding the order.",
    );
    s.cover("code:number_reassigned");
    let t = s.device("till", 220)?;
    let relay = s.relay("relay", 221)?;
    let hub = s.relay("stored", 222)?;
    s.create(t)?;
    s.id(t, line("Burger", 900, 1))?;
    s.push(t, relay)?;
    s.push(t, hub)?;
    s.ok(relay, Op::AssignNumber { number: 1 })?;
    s.push(relay, hub)?;
    s.forge(relay, |tx| tx.put(ROOT, "number", 2_u64))?;
    let v = s.push(relay, hub)?;
    if v != Verdict::Rejected("number_reassigned".into()) {
        bail!("expected number_reassigned, got {v:?}");
    }
    s.finish()
}

fn foreign_actor_relayed() -> Result<Vector> {
    let mut s = Sim::new(
        "policy/foreign_actor/relayed_change",
        "Till A passes on a change written by till B (no voucher): the relay refuses a change \
         whose actor is not the connected device's.",
    );
    s.cover("code:foreign_actor");
    let a = s.device("a", 230)?;
    let b = s.device("b", 231)?;
    let relay = s.relay("relay", 232)?;
    s.create(a)?;
    s.push(a, relay)?;
    s.send(a, b)?;
    s.id(b, line("Cola", 200, 1))?;
    s.send(b, a)?;
    let v = s.push(a, relay)?;
    if v != Verdict::Rejected("foreign_actor".into()) {
        bail!("expected foreign_actor, got {v:?}");
    }
    s.push(b, relay)?;
    s.finish()
}

fn foreign_store() -> Result<Vector> {
    let mut s = Sim::new(
        "policy/not_found/foreign_store",
        "A till of another store edits an order it got hold of: the relay answers not_found, \
         revealing nothing.",
    );
    s.cover("code:not_found");
    let t = s.device("till", 240)?;
    let relay = s.relay("relay", 241)?;
    let other = s.replica_in("other_store", 242, "device", "store-2")?;
    s.create(t)?;
    s.id(t, line("Burger", 900, 1))?;
    s.push(t, relay)?;
    s.send(t, other)?;
    s.id(other, line("Cola", 200, 1))?;
    let v = s.push(other, relay)?;
    if v != Verdict::Rejected("not_found".into()) {
        bail!("expected not_found, got {v:?}");
    }
    s.finish()
}
