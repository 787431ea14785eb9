//! Hand-written vectors: every seed-thread story (`tests/tests/stories.rs`, the model-level
//! halves of `tests/tests/scenarios.rs`), the laws of both lattices on real documents, every
//! late-edit flag with each of its messages, and every conflict flag.

use anyhow::Result;
use crdt_model::automerge::transaction::Transactable;

use super::format::{FinalArgs, LineArgs, Op, PaymentArgs, Vector};
use super::sim::Sim;

/// `add_line` of `qty` × `name` at `price`.
pub fn line(name: &str, price: i64, qty: i64) -> Op {
    Op::AddLine {
        line: LineArgs {
            sku: name.to_lowercase(),
            name: name.to_owned(),
            unit_price: price,
            quantity: qty,
            modifiers: Vec::new(),
            note: String::new(),
        },
    }
}

/// A payment draft.
pub fn pay_args(kind: &str, amount: i64) -> PaymentArgs {
    PaymentArgs {
        kind: kind.to_owned(),
        amount,
        reference: String::new(),
    }
}

/// `add_payment` in `state`.
pub fn pay(kind: &str, amount: i64, state: &str) -> Op {
    Op::AddPayment {
        payment: pay_args(kind, amount),
        state: state.to_owned(),
    }
}

/// `advance_payment` to `to`.
pub fn advance(payment: &str, to: &str) -> Op {
    Op::AdvancePayment {
        payment: payment.to_owned(),
        to: to.to_owned(),
        reference: None,
    }
}

/// `complete_sale` with a new cash payment (or none when `amount` is 0).
pub fn complete_cash(amount: i64) -> Op {
    Op::CompleteSale {
        last: (amount > 0).then(|| FinalArgs::New(pay_args("cash", amount))),
    }
}

/// `set_status` to an active status.
pub fn status(s: &str) -> Op {
    Op::SetStatus {
        status: s.to_owned(),
    }
}

/// `set_status_any` (back office).
pub fn status_any(s: &str) -> Op {
    Op::SetStatusAny {
        status: s.to_owned(),
    }
}

/// A card payment through the terminal on replica `r`: pending, authorised (with a reference),
/// and captured unless `capture` is false. Returns the payment id.
pub fn card(sim: &mut Sim, r: usize, amount: i64, capture: bool) -> Result<String> {
    let p = sim.id(r, pay("card_terminal", amount, "pending"))?;
    sim.ok(
        r,
        Op::AdvancePayment {
            payment: p.clone(),
            to: "authorized".to_owned(),
            reference: Some("AUTH 482913".to_owned()),
        },
    )?;
    if capture {
        sim.ok(r, advance(&p, "captured"))?;
    }
    Ok(p)
}

/// Every seed-thread story.
pub fn stories() -> Result<Vec<Vector>> {
    Ok(vec![
        paid_in_two_sittings()?,
        sale_recorded_while_never_sent()?,
        close_and_sale_are_one_change()?,
        delete_concurrent_with_payment()?,
        delete_concurrent_with_sale()?,
        two_terminals_editing()?,
        server_edit_concurrent()?,
        terminal_order_never_reverts(false)?,
        terminal_order_never_reverts(true)?,
        number_once_although_answer_lost()?,
        back_office_status_tie()?,
        forged_unclose_refused()?,
    ])
}

fn paid_in_two_sittings() -> Result<Vector> {
    let mut s = Sim::new(
        "story/paid_in_two_sittings",
        "An order paid in two sittings with items added between on another terminal; closing \
         with the old balance is refused, then the sale completes.",
    );
    s.cover("story:paid_in_two_sittings");
    let a = s.device("a", 1)?;
    let b = s.device("b", 2)?;
    s.create(a)?;
    s.id(a, line("Pizza", 1_200, 1))?;
    s.send(a, b)?;
    s.id(a, pay("cash", 500, "captured"))?;
    s.id(b, line("Cola", 300, 2))?;
    s.id(b, line("Tiramisu", 450, 1))?;
    s.sync(a, b)?;
    s.step(
        a,
        Op::CompleteSale {
            last: Some(FinalArgs::New(pay_args("card_terminal", 700))),
        },
    )?;
    s.id(
        a,
        Op::CompleteSale {
            last: Some(FinalArgs::New(pay_args("card_terminal", 1_750))),
        },
    )?;
    s.sync(a, b)?;
    s.step(b, line("Coffee", 250, 1))?;
    s.finish()
}

fn sale_recorded_while_never_sent() -> Result<Vector> {
    let mut s = Sim::new(
        "story/sale_before_order_sent",
        "An order created, paid (card, gift card, cash) and sold offline; the relay's first sight \
         of it judges every change, keeps every payment, and numbers it; a device may not.",
    );
    s.cover("story:sale_before_order_sent");
    let t = s.device("till", 10)?;
    let relay = s.relay("relay", 11)?;
    s.create(t)?;
    s.id(t, line("Burger", 1_250, 1))?;
    s.id(t, line("Fries", 550, 2))?;
    card(&mut s, t, 1_000, true)?;
    s.id(t, pay("gift_card", 500, "captured"))?;
    s.id(t, complete_cash(1_000))?;
    s.push(t, relay)?;
    s.ok(relay, Op::AssignNumber { number: 1_042 })?;
    s.send(relay, t)?;
    s.finish()
}

fn close_and_sale_are_one_change() -> Result<Vector> {
    let mut s = Sim::new(
        "story/close_and_sale_one_change",
        "The final capture and Done are one change: a replica that receives only that change sees \
         both together.",
    );
    s.cover("story:close_and_sale_one_change");
    let t = s.device("till", 20)?;
    let peer = s.device("peer", 21)?;
    s.create(t)?;
    s.id(t, line("Steak", 2_400, 1))?;
    s.id(t, pay("gift_card", 900, "captured"))?;
    let c = card(&mut s, t, 1_500, false)?;
    s.send(t, peer)?;
    s.id(
        t,
        Op::CompleteSale {
            last: Some(FinalArgs::Capture(c)),
        },
    )?;
    s.send(t, peer)?;
    s.finish()
}

fn delete_concurrent_with_payment() -> Result<Vector> {
    let mut s = Sim::new(
        "story/delete_concurrent_with_payment",
        "A deletes while B, offline, captures a card payment: the relay accepts it, the order is \
         Deleted with the money due back; B then refunds, accepted after the close.",
    );
    s.cover("story:delete_concurrent_with_payment");
    s.cover("late_edit:payment");
    let a = s.device("a", 30)?;
    let b = s.device("b", 31)?;
    let relay = s.relay("relay", 39)?;
    s.create(a)?;
    s.id(a, line("Salad", 1_000, 1))?;
    s.send(a, b)?;
    s.ok(a, Op::Delete)?;
    s.push(a, relay)?;
    let p = card(&mut s, b, 1_000, true)?;
    s.push(b, relay)?;
    s.send(relay, a)?;
    s.send(relay, b)?;
    s.ok(b, advance(&p, "refunded"))?;
    s.push(b, relay)?;
    s.send(relay, a)?;
    s.finish()
}

fn delete_concurrent_with_sale() -> Result<Vector> {
    let mut s = Sim::new(
        "story/delete_concurrent_with_sale",
        "A deletes while B completes the sale: Done beats Deleted, the delete is a concurrent \
         close.",
    );
    s.cover("story:delete_concurrent_with_sale");
    s.cover("law:status.done_beats_deleted");
    let a = s.device("a", 32)?;
    let b = s.device("b", 33)?;
    s.create(a)?;
    s.id(a, line("Soup", 650, 2))?;
    s.send(a, b)?;
    s.ok(a, Op::Delete)?;
    s.id(b, complete_cash(1_300))?;
    s.sync(a, b)?;
    s.finish()
}

fn two_terminals_editing() -> Result<Vector> {
    let mut s = Sim::new(
        "story/two_terminals_editing",
        "Two terminals edit one order: concurrent adds both survive, +1 on both counts twice, \
         concurrent prices are flagged, a removal wins over a concurrent quantity change.",
    );
    s.cover("story:two_terminals_editing");
    s.cover("conflict:unit_price");
    let a = s.device("a", 40)?;
    let b = s.device("b", 41)?;
    s.create(a)?;
    let burger = s.id(a, line("Burger", 900, 1))?;
    s.send(a, b)?;
    let fries = s.id(a, line("Fries", 300, 1))?;
    let cola = s.id(b, line("Cola", 250, 1))?;
    s.sync(a, b)?;
    for r in [a, b] {
        s.ok(
            r,
            Op::ChangeQuantity {
                line: burger.clone(),
                delta: 1,
            },
        )?;
    }
    s.sync(a, b)?;
    for (r, price) in [(a, 350), (b, 380)] {
        s.ok(
            r,
            Op::SetUnitPrice {
                line: fries.clone(),
                unit_price: price,
            },
        )?;
    }
    s.sync(a, b)?;
    s.ok(a, Op::RemoveLine { line: cola.clone() })?;
    s.ok(
        b,
        Op::ChangeQuantity {
            line: cola.clone(),
            delta: 2,
        },
    )?;
    s.sync(a, b)?;
    s.step(
        b,
        Op::ChangeQuantity {
            line: cola,
            delta: 1,
        },
    )?;
    s.finish()
}

fn server_edit_concurrent() -> Result<Vector> {
    let mut s = Sim::new(
        "story/server_edit_concurrent",
        "The relay numbers the order and moves it while the device edits: both survive, a status \
         tie is flagged; later the higher clock wins; Done beats a concurrent back-office status.",
    );
    s.cover("story:server_edit_concurrent");
    s.cover("conflict:status");
    s.cover("late_edit:status_ignored");
    let t = s.device("till", 50)?;
    let relay = s.relay("relay", 51)?;
    s.create(t)?;
    s.id(t, line("Pasta", 1_100, 1))?;
    s.push(t, relay)?;
    s.ok(relay, Op::AssignNumber { number: 7 })?;
    s.ok(relay, status_any("in_delivery"))?;
    s.id(t, line("Wine", 800, 1))?;
    s.ok(t, status("delayed"))?;
    s.push(t, relay)?;
    s.send(relay, t)?;
    s.ok(relay, status_any("delayed"))?;
    s.ok(t, status("in_progress"))?;
    s.ok(t, status("in_delivery"))?;
    s.push(t, relay)?;
    s.send(relay, t)?;
    s.ok(relay, status_any("in_delivery"))?;
    s.id(t, complete_cash(2_000))?;
    s.push(t, relay)?;
    s.send(relay, t)?;
    s.finish()
}

fn terminal_order_never_reverts(deleted: bool) -> Result<Vector> {
    let (name, close) = if deleted {
        ("story/deleted_order_never_reverts", "deleted")
    } else {
        ("story/done_order_never_reverts", "done")
    };
    let mut s = Sim::new(
        name,
        "A stale terminal keeps moving a closed order with ever higher clocks: the relay accepts \
         (it had not seen the close), the order stays closed, every move is an ignored status; \
         once it has seen the close it can no longer move it.",
    );
    s.cover(if deleted {
        "story:deleted_order_never_reverts"
    } else {
        "story:done_order_never_reverts"
    });
    s.cover("law:status.terminal_never_reverts");
    s.cover("late_edit:status_ignored");
    let a = s.device("a", 60)?;
    let b = s.device("b", 61)?;
    let c = s.device("stale", 62)?;
    let relay = s.relay("relay", 63)?;
    s.create(a)?;
    s.id(a, line("Ramen", 1_350, 1))?;
    s.send(a, b)?;
    s.send(a, c)?;
    if deleted {
        s.ok(a, Op::Delete)?;
    } else {
        s.id(a, complete_cash(1_350))?;
    }
    s.push(a, relay)?;
    s.send(relay, b)?;
    for st in ["in_delivery", "delayed", "in_progress"] {
        s.ok(c, status(st))?;
    }
    s.push(c, relay)?;
    for r in [a, b, c] {
        s.send(relay, r)?;
    }
    s.step(c, status("in_delivery"))?;
    s.cover(format!("close:{close}"));
    s.finish()
}

fn number_once_although_answer_lost() -> Result<Vector> {
    let mut s = Sim::new(
        "story/number_once_answer_lost",
        "An order created offline reaches the relay, which numbers it; the answer is lost, the \
         till sends the same changes again (duplicates are no-ops: the relay judges nothing new) \
         and gets the one number.",
    );
    s.cover("story:number_once_answer_lost");
    s.cover("law:delivery.duplicates_are_noops");
    let t = s.device("till", 70)?;
    let relay = s.relay("relay", 71)?;
    s.create(t)?;
    s.id(t, line("Pizza", 1_100, 1))?;
    let all = s.missing(t, relay);
    s.deliver(t, relay, all.clone(), true)?;
    s.ok(relay, Op::AssignNumber { number: 1 })?;
    s.deliver(t, relay, all, true)?;
    s.step(relay, Op::AssignNumber { number: 1 })?;
    s.step(relay, Op::AssignNumber { number: 2 })?;
    s.send(relay, t)?;
    s.finish()
}

fn back_office_status_tie() -> Result<Vector> {
    let mut s = Sim::new(
        "story/back_office_status_tie",
        "The back office sets in_delivery through the relay while an offline till adds a line and \
         sets delayed: same clock, the entry id decides, the tie is flagged; a back-office Done \
         then closes it for the till too.",
    );
    s.cover("story:back_office_status_tie");
    s.cover("conflict:status");
    let t = s.device("till", 80)?;
    let relay = s.relay("relay", 81)?;
    s.create(t)?;
    s.id(t, line("Soup", 700, 1))?;
    s.push(t, relay)?;
    s.id(t, line("Bread", 200, 1))?;
    s.ok(t, status("delayed"))?;
    s.ok(relay, status_any("in_delivery"))?;
    s.push(t, relay)?;
    s.send(relay, t)?;
    s.ok(relay, status_any("done"))?;
    s.send(relay, t)?;
    s.step(t, line("Late", 1, 1))?;
    s.finish()
}

fn forged_unclose_refused() -> Result<Vector> {
    let mut s = Sim::new(
        "story/forged_unclose_refused",
        "A till forges a change deleting every status entry of a Done order: the relay refuses it \
         (status_rewritten) and keeps its state; the other till is unaffected.",
    );
    s.cover("story:forged_unclose_refused");
    s.cover("code:status_rewritten");
    let a = s.device("a", 90)?;
    let b = s.device("b", 91)?;
    let relay = s.relay("relay", 92)?;
    s.create(a)?;
    s.id(a, line("Tea", 300, 1))?;
    s.id(a, complete_cash(300))?;
    s.push(a, relay)?;
    s.ok(relay, Op::AssignNumber { number: 3 })?;
    s.send(relay, a)?;
    let status_obj = super::forged::obj(s.doc(a), &["status"])?;
    let keys = super::forged::keys(s.doc(a), &["status"])?;
    s.forge(a, |tx| {
        for k in &keys {
            Transactable::delete(tx, &status_obj, k.as_str())?;
        }
        Ok(())
    })?;
    s.push(a, relay)?;
    s.send(relay, b)?;
    s.finish()
}

/// Laws of the status lattice and the payment lattice, on real documents: any delivery order,
/// grouping and duplication gives the same result.
pub fn laws() -> Result<Vec<Vector>> {
    let mut out = Vec::new();
    let statuses = ["in_progress", "in_delivery", "delayed", "done", "deleted"];
    // Concurrent status pairs, delivered in both orders: the join is commutative.
    for x in statuses {
        for y in statuses {
            out.push(status_pair(x, y)?);
        }
    }
    // Three concurrent statuses, delivered in several groupings (associativity), with
    // duplicates (idempotence).
    for (i, triple) in [
        ["in_delivery", "delayed", "in_progress"],
        ["done", "deleted", "delayed"],
        ["deleted", "in_delivery", "deleted"],
        ["done", "done", "in_progress"],
    ]
    .iter()
    .enumerate()
    {
        out.push(status_triple(i, triple)?);
    }
    out.push(causal_status_wins()?);
    // Payment lattice: from each state a writer saw, two concurrent moves.
    let moves: &[(&str, &[&str])] = &[
        ("pending", &["authorized", "captured", "voided"]),
        ("authorized", &["captured", "voided"]),
        ("captured", &["refunded"]),
    ];
    for (from, tos) in moves {
        for x in *tos {
            for y in *tos {
                out.push(payment_pair(from, x, y)?);
            }
        }
    }
    for (from, tos) in moves {
        for to in *tos {
            out.push(payment_move(from, to)?);
        }
    }
    Ok(out)
}

/// Creates an order on `a` with one line and delivers it to the other replicas.
fn base(s: &mut Sim, a: usize, others: &[usize]) -> Result<String> {
    s.create(a)?;
    let l = s.id(a, line("Coffee", 300, 2))?;
    for &o in others {
        s.send(a, o)?;
    }
    Ok(l)
}

/// Moves replica `r` to status `st` (a sale when `done`).
fn set(s: &mut Sim, r: usize, st: &str) -> Result<()> {
    match st {
        "done" => {
            let due = s.view(r).map_or(0, |v| v.totals.balance_due);
            s.ok(r, complete_cash(due))?;
        }
        "deleted" => {
            s.ok(r, Op::Delete)?;
        }
        active => {
            s.ok(r, status(active))?;
        }
    }
    Ok(())
}

fn status_pair(x: &str, y: &str) -> Result<Vector> {
    let mut s = Sim::new(
        &format!("law/status_pair/{x}__{y}"),
        "Two terminals set statuses concurrently; each receives the other's change (in opposite \
         orders) and a third replica receives both in each order: all show the same join.",
    );
    s.cover("law:status.join_commutative");
    if x == "done" || y == "done" {
        s.cover("law:status.done_wins");
    }
    let a = s.device("a", 100)?;
    let b = s.device("b", 101)?;
    let c = s.device("c", 102)?;
    let d = s.device("d", 103)?;
    base(&mut s, a, &[b, c, d])?;
    set(&mut s, a, x)?;
    set(&mut s, b, y)?;
    s.send(a, c)?;
    s.send(b, c)?;
    s.send(b, d)?;
    s.send(a, d)?;
    s.sync(a, b)?;
    s.finish()
}

fn status_triple(i: usize, sts: &[&str; 3]) -> Result<Vector> {
    let mut s = Sim::new(
        &format!("law/status_triple/{i}"),
        "Three terminals set statuses concurrently; receivers get them grouped differently, out \
         of order and twice: the join is associative and idempotent.",
    );
    s.cover("law:status.join_associative");
    s.cover("law:status.join_idempotent");
    let reps = [
        s.device("a", 110)?,
        s.device("b", 111)?,
        s.device("c", 112)?,
    ];
    let x = s.device("x", 113)?;
    let y = s.device("y", 114)?;
    base(&mut s, reps[0], &[reps[1], reps[2], x, y])?;
    for (r, st) in reps.iter().zip(sts) {
        set(&mut s, *r, st)?;
    }
    // x: (a then b) then c; y: c, then b twice, then a.
    s.send(reps[0], x)?;
    s.send(reps[1], x)?;
    s.send(reps[2], x)?;
    let from_b = s.missing(reps[1], y);
    s.send(reps[2], y)?;
    s.deliver(reps[1], y, from_b.clone(), false)?;
    s.deliver(reps[1], y, from_b, false)?;
    s.send(reps[0], y)?;
    s.sync(x, reps[0])?;
    s.finish()
}

fn causal_status_wins() -> Result<Vector> {
    let mut s = Sim::new(
        "law/status_causal_later_wins",
        "A terminal moves the order twice while another moves it once concurrently: the higher \
         Lamport clock wins whatever the entry ids, and no tie is flagged.",
    );
    s.cover("law:status.causal_later_wins");
    let a = s.device("a", 120)?;
    let b = s.device("b", 121)?;
    base(&mut s, a, &[b])?;
    s.ok(a, status("delayed"))?;
    s.ok(b, status("in_delivery"))?;
    s.ok(b, status("in_progress"))?;
    s.sync(a, b)?;
    s.finish()
}

fn payment_pair(from: &str, x: &str, y: &str) -> Result<Vector> {
    let mut s = Sim::new(
        &format!("law/payment_pair/{from}__{x}__{y}"),
        "Two terminals move the same payment concurrently from the state both saw; delivered in \
         both orders: the state is the join (rank pending < authorized < voided < captured < \
         refunded), a capture beside a void or a second capture is flagged.",
    );
    s.cover("law:payment.join_commutative");
    if (x == "captured" && y == "voided") || (x == "voided" && y == "captured") {
        s.cover("conflict:payment_capture_void");
    }
    if x == "captured" && y == "captured" {
        s.cover("conflict:payment_captured_twice");
    }
    let a = s.device("a", 130)?;
    let b = s.device("b", 131)?;
    let c = s.device("c", 132)?;
    base(&mut s, a, &[])?;
    let p = s.id(a, pay("card_terminal", 600, from))?;
    s.send(a, b)?;
    s.send(a, c)?;
    s.ok(a, advance(&p, x))?;
    s.ok(b, advance(&p, y))?;
    s.send(b, c)?;
    s.send(a, c)?;
    s.sync(a, b)?;
    s.finish()
}

fn payment_move(from: &str, to: &str) -> Result<Vector> {
    let mut s = Sim::new(
        &format!("law/payment_move/{from}__{to}"),
        "A payment moved forward by one terminal; every backward or sideways move from the new \
         state is refused locally.",
    );
    s.cover("law:payment.forward_only");
    let a = s.device("a", 140)?;
    let b = s.device("b", 141)?;
    base(&mut s, a, &[])?;
    let p = s.id(a, pay("card_terminal", 600, from))?;
    s.ok(a, advance(&p, to))?;
    for back in ["pending", "authorized", "voided", "captured", "refunded"] {
        s.step(a, advance(&p, back))?;
    }
    s.send(a, b)?;
    s.finish()
}

/// One vector per late-edit flag and message, on a Done and on a Deleted order where both
/// apply, plus acknowledgements.
pub fn late_edits() -> Result<Vec<Vector>> {
    let mut out = Vec::new();
    for close in ["done", "deleted"] {
        out.push(late(close, "line_added", |s, b, _, _| {
            s.id(b, line("Dessert", 400, 1)).map(|_| ())
        })?);
        out.push(late(close, "line_removed", |s, b, l, _| {
            s.ok(b, Op::RemoveLine { line: l.to_owned() }).map(|_| ())
        })?);
        out.push(late(close, "line_changed_qty", |s, b, l, _| {
            s.ok(
                b,
                Op::ChangeQuantity {
                    line: l.to_owned(),
                    delta: 2,
                },
            )
            .map(|_| ())
        })?);
        out.push(late(close, "line_changed_price", |s, b, l, _| {
            s.ok(
                b,
                Op::SetUnitPrice {
                    line: l.to_owned(),
                    unit_price: 999,
                },
            )
            .map(|_| ())
        })?);
        out.push(late(close, "line_changed_note", |s, b, l, _| {
            s.ok(
                b,
                Op::SetNote {
                    line: l.to_owned(),
                    note: "no sugar".to_owned(),
                },
            )
            .map(|_| ())
        })?);
        out.push(late(close, "payment_captured", |s, b, _, _| {
            s.id(b, pay("cash", 250, "captured")).map(|_| ())
        })?);
        out.push(late(close, "payment_pending", |s, b, _, _| {
            s.id(b, pay("card_terminal", 250, "pending")).map(|_| ())
        })?);
        out.push(late(close, "payment_authorized", |s, b, _, _| {
            card(s, b, 250, false).map(|_| ())
        })?);
        out.push(late(close, "payment_settled", |s, b, _, _| {
            let p = s.id(b, pay("card_terminal", 250, "pending"))?;
            s.ok(b, advance(&p, "voided")).map(|_| ())
        })?);
        out.push(late(close, "status_ignored", |s, b, _, _| {
            s.ok(b, status("delayed")).map(|_| ())
        })?);
        // A delete needs the pending payment voided first.
        let close_on_b = |s: &mut Sim, b: usize, p: &str, st: &str| {
            if st == "deleted" {
                s.ok(b, advance(p, "voided"))?;
            }
            set(s, b, st)
        };
        out.push(late(close, "concurrent_close", |s, b, _, p| {
            close_on_b(s, b, p, if close == "done" { "deleted" } else { "done" })
        })?);
        out.push(late(close, "concurrent_same_close", |s, b, _, p| {
            close_on_b(s, b, p, close)
        })?);
        out.push(late(close, "several", |s, b, l, _| {
            s.id(b, line("Dessert", 400, 1))?;
            s.ok(
                b,
                Op::ChangeQuantity {
                    line: l.to_owned(),
                    delta: 1,
                },
            )?;
            s.ok(b, status("in_delivery"))?;
            s.id(b, pay("check", 100, "captured")).map(|_| ())
        })?);
    }
    // Done only: a payment pending when the order closed, captured concurrently with the
    // close (overpayment), and one authorisation captured twice (by the sale and a till).
    out.push(late(
        "done",
        "payment_captured_concurrently",
        |s, b, _, p| s.ok(b, advance(p, "captured")).map(|_| ()),
    )?);
    out.push(captured_twice()?);
    out.push(acknowledged()?);
    Ok(out)
}

/// A closes the order (`close`) while B, which had seen it open with a line and a pending card
/// payment of 200, makes `edit`; every replica merges.
fn late(
    close: &str,
    what: &str,
    edit: impl FnOnce(&mut Sim, usize, &str, &str) -> Result<()>,
) -> Result<Vector> {
    let mut s = Sim::new(
        &format!("late/{close}/{what}"),
        "A closes the order while B, which had not seen the close, edits it; the relay accepts \
         B's change (concurrent, not after the close); every replica lists the same late edits \
         and counts the order as closed.",
    );
    let kind = match what {
        w if w.starts_with("line_changed") => "line_changed",
        w if w.starts_with("payment") => "payment",
        "concurrent_same_close" => "concurrent_close",
        w => w,
    };
    if what != "several" {
        s.cover(format!("late_edit:{kind}"));
    }
    s.cover(format!("close:{close}"));
    let a = s.device("a", 150)?;
    let b = s.device("b", 151)?;
    let relay = s.relay("relay", 152)?;
    s.create(a)?;
    let l = s.id(a, line("Cake", 450, 2))?;
    let p = s.id(a, pay("card_terminal", 200, "pending"))?;
    s.send(a, b)?;
    if close == "done" {
        s.ok(a, complete_cash(900))?;
    } else {
        s.ok(a, advance(&p, "voided"))?;
        s.ok(a, Op::Delete)?;
    }
    s.push(a, relay)?;
    edit(&mut s, b, &l, &p)?;
    s.push(b, relay)?;
    s.send(relay, a)?;
    s.send(relay, b)?;
    // The vector shows what it is named for.
    let shown = s.view(a).map(|v| {
        v.late_edits
            .iter()
            .map(|e| super::json::view_json_kind(e.kind))
            .collect::<Vec<_>>()
    });
    if what != "several" && !shown.as_ref().is_some_and(|k| k.contains(&kind)) {
        anyhow::bail!("late/{close}/{what}: no {kind} late edit in {shown:?}");
    }
    s.finish()
}

fn captured_twice() -> Result<Vector> {
    let mut s = Sim::new(
        "late/done/payment_captured_twice",
        "One authorisation captured by the sale on A and, concurrently, by B: counted once, \
         flagged as a second capture with nothing to refund.",
    );
    s.cover("late_edit:payment");
    s.cover("conflict:payment_captured_twice");
    let a = s.device("a", 160)?;
    let b = s.device("b", 161)?;
    s.create(a)?;
    s.id(a, line("Menu", 1_500, 1))?;
    let p = card(&mut s, a, 1_500, false)?;
    s.send(a, b)?;
    s.ok(
        a,
        Op::CompleteSale {
            last: Some(FinalArgs::Capture(p.clone())),
        },
    )?;
    s.ok(b, advance(&p, "captured"))?;
    s.sync(a, b)?;
    s.finish()
}

fn acknowledged() -> Result<Vector> {
    let mut s = Sim::new(
        "late/done/acknowledged",
        "A late line and a late status on a Done order; a manager acknowledges the line (allowed \
         after the close, accepted by the relay); the acknowledgement shows on every replica; an \
         unknown late edit cannot be acknowledged.",
    );
    s.cover("late_edit:acknowledged");
    let a = s.device("a", 170)?;
    let b = s.device("b", 171)?;
    let relay = s.relay("relay", 172)?;
    s.create(a)?;
    s.id(a, line("Cake", 450, 1))?;
    s.send(a, b)?;
    s.ok(a, complete_cash(450))?;
    s.push(a, relay)?;
    let late = s.id(b, line("Tea", 200, 1))?;
    s.ok(b, status("in_delivery"))?;
    s.push(b, relay)?;
    s.send(relay, a)?;
    s.ok(
        a,
        Op::Acknowledge {
            edit: format!("line:{late}"),
            note: "comped".to_owned(),
        },
    )?;
    s.step(
        a,
        Op::Acknowledge {
            edit: "line:nothing".to_owned(),
            note: String::new(),
        },
    )?;
    s.push(a, relay)?;
    s.send(relay, b)?;
    s.finish()
}

/// Every conflict flag on an open order.
pub fn conflicts() -> Result<Vec<Vector>> {
    let mut out = Vec::new();
    for (name, f) in [
        (
            "unit_price",
            conflict_price as fn(&mut Sim, usize, usize, &str) -> Result<()>,
        ),
        ("note", conflict_note),
        ("qty_overshoot", conflict_qty),
        ("qty_both_count", conflict_qty_sum),
        ("set_quantity_corrections", conflict_set_qty),
        ("remove_and_edit", conflict_remove_edit),
        ("remove_twice", conflict_remove_twice),
        ("status_same_clock", conflict_status),
        ("status_same_value", conflict_status_same),
    ] {
        let mut s = Sim::new(
            &format!("conflict/{name}"),
            "Two terminals write the same line or status concurrently on an open order; every \
             replica shows the same winner and flags.",
        );
        let tag = match name {
            "qty_overshoot" => "conflict:qty",
            "status_same_clock" => "conflict:status",
            "unit_price" => "conflict:unit_price",
            "note" => "conflict:note",
            _ => "law:lww_and_counter",
        };
        s.cover(tag);
        let a = s.device("a", 180)?;
        let b = s.device("b", 181)?;
        let l = base(&mut s, a, &[b])?;
        f(&mut s, a, b, &l)?;
        s.sync(a, b)?;
        out.push(s.finish()?);
    }
    Ok(out)
}

fn conflict_price(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    for (r, p) in [(a, 350), (b, 380)] {
        s.ok(
            r,
            Op::SetUnitPrice {
                line: l.to_owned(),
                unit_price: p,
            },
        )?;
    }
    Ok(())
}

fn conflict_note(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    for (r, n) in [(a, "oat milk"), (b, "extra \"hot\"")] {
        s.ok(
            r,
            Op::SetNote {
                line: l.to_owned(),
                note: n.to_owned(),
            },
        )?;
    }
    Ok(())
}

fn conflict_qty(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    // 2 -> 3, seen by both; then each takes it to 1: merged 3 - 2 - 2 = -1, shown as 0.
    s.ok(
        a,
        Op::ChangeQuantity {
            line: l.to_owned(),
            delta: 1,
        },
    )?;
    s.sync(a, b)?;
    for r in [a, b] {
        s.ok(
            r,
            Op::ChangeQuantity {
                line: l.to_owned(),
                delta: -2,
            },
        )?;
    }
    // Below one is refused locally.
    s.step(
        a,
        Op::ChangeQuantity {
            line: l.to_owned(),
            delta: -1,
        },
    )?;
    Ok(())
}

fn conflict_qty_sum(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    s.ok(
        a,
        Op::ChangeQuantity {
            line: l.to_owned(),
            delta: 1,
        },
    )?;
    s.ok(
        b,
        Op::ChangeQuantity {
            line: l.to_owned(),
            delta: 3,
        },
    )?;
    Ok(())
}

fn conflict_set_qty(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    for r in [a, b] {
        s.ok(
            r,
            Op::SetQuantity {
                line: l.to_owned(),
                quantity: 3,
            },
        )?;
    }
    Ok(())
}

fn conflict_remove_edit(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    s.ok(a, Op::RemoveLine { line: l.to_owned() })?;
    s.ok(
        b,
        Op::SetUnitPrice {
            line: l.to_owned(),
            unit_price: 10,
        },
    )?;
    s.ok(
        b,
        Op::SetNote {
            line: l.to_owned(),
            note: "changed".to_owned(),
        },
    )?;
    Ok(())
}

fn conflict_remove_twice(s: &mut Sim, a: usize, b: usize, l: &str) -> Result<()> {
    for r in [a, b] {
        s.ok(r, Op::RemoveLine { line: l.to_owned() })?;
    }
    Ok(())
}

fn conflict_status(s: &mut Sim, a: usize, b: usize, _: &str) -> Result<()> {
    s.ok(a, status("delayed"))?;
    s.ok(b, status("in_delivery"))?;
    Ok(())
}

fn conflict_status_same(s: &mut Sim, a: usize, b: usize, _: &str) -> Result<()> {
    s.ok(a, status("delayed"))?;
    s.ok(b, status("delayed"))?;
    Ok(())
}
