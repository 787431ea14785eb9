//! [`OrderView`]: the hydrated, read-only view of an order, with derived totals, late edits
//! and conflicts.
//!
//! Everything here is derived from document state alone (never from arrival order), so every
//! replica holding the same changes produces the same view, byte for byte once serialised.
//!
//! **Late edits.** When an order is terminal, the winning terminal entry was written by one
//! change `C`. The order "as closed" is the document at heads `[C]`: exactly what the closer had
//! seen, plus the close. Anything present now but absent there was made concurrently with the
//! close (edits causally after it are refused locally and by the relay's policy), so it is kept,
//! listed as a late edit, and left out of the order total. Voids and refunds, the relay's number
//! and acknowledgements are legitimate post-close writes and are not flagged.

use std::collections::BTreeMap;

use automerge::{Automerge, ScalarValue};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::ids::{DeviceId, EntryId, LineId, PaymentId, Timestamp};
use crate::payment::PaymentState;
use crate::schema::{self, LineRec, Reader, Snapshot, StatusRec};
use crate::status::OrderStatus;

/// A line item as shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineView {
    /// Line id.
    pub id: LineId,
    /// Stock keeping unit.
    pub sku: String,
    /// Name.
    pub name: String,
    /// Unit price, minor units.
    pub unit_price: i64,
    /// Quantity (a counter; clamped at zero when concurrent decrements overshoot).
    pub quantity: i64,
    /// Modifiers.
    pub modifiers: Vec<String>,
    /// Note.
    pub note: String,
    /// `unit_price * quantity`, minor units.
    pub line_total: i64,
    /// Who added the line.
    pub added_by: DeviceId,
    /// When.
    pub added_at: Timestamp,
    /// Whether the line was removed.
    pub removed: bool,
}

/// One step of a payment's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransitionView {
    /// Entry id.
    pub id: EntryId,
    /// State entered.
    pub state: PaymentState,
    /// When.
    pub at: Timestamp,
    /// By which device.
    pub by: DeviceId,
}

/// A payment transaction as shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentView {
    /// Payment id.
    pub id: PaymentId,
    /// Kind of tender.
    pub kind: String,
    /// Amount, minor units.
    pub amount: i64,
    /// Currency code.
    pub currency: String,
    /// External reference (latest known; masked).
    pub reference: String,
    /// Effective state: the join of all transitions.
    pub state: PaymentState,
    /// Who recorded the payment.
    pub created_by: DeviceId,
    /// When.
    pub created_at: Timestamp,
    /// Every transition, oldest state first.
    pub history: Vec<TransitionView>,
}

/// Derived money figures, minor units of the order's currency. Never stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Sum of counted lines (for a closed order: as closed; late lines excluded; 0 once Deleted).
    pub total: i64,
    /// Sum of captured payments (not refunded).
    pub paid: i64,
    /// Sum of refunded payments.
    pub refunded: i64,
    /// `max(total - paid, 0)`.
    pub balance_due: i64,
    /// `max(paid - total, 0)`: change to hand back, or an overpayment to refund.
    pub change_due: i64,
}

/// What kind of late edit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LateEditKind {
    /// A line added concurrently with the close: not in the total, unpaid.
    LineAdded,
    /// A line's quantity, price or note changed concurrently with the close.
    LineChanged,
    /// A line removed concurrently with the close (it was sold as closed).
    LineRemoved,
    /// A payment recorded or moved concurrently with the close.
    Payment,
    /// An active status set concurrently with the close; the terminal status stands.
    StatusIgnored,
    /// Another close (Done or Deleted) made concurrently; the lattice picked the shown one.
    ConcurrentClose,
}

/// An edit that reached a closed order from a replica that had not seen the close.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateEdit {
    /// Stable id (same on every replica), used to acknowledge it.
    pub id: String,
    /// What happened.
    pub kind: LateEditKind,
    /// A sentence for the cashier or manager.
    pub message: String,
    /// Whether a manager acknowledged it.
    pub acknowledged: bool,
    /// Who acknowledged it first (by acknowledgement id order).
    pub acknowledged_by: Option<DeviceId>,
}

/// A concurrent write the CRDT resolved by a rule, flagged so nobody is surprised.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// What it is about, e.g. `line:<id>.unit_price`.
    pub subject: String,
    /// The values that were written concurrently, sorted.
    pub values: Vec<String>,
    /// The value shown.
    pub chosen: String,
}

/// The order as a cashier, a manager or the back office sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// Order id.
    pub id: String,
    /// Store.
    pub store: String,
    /// Relay-assigned number, once assigned.
    pub number: Option<u64>,
    /// Currency code.
    pub currency: String,
    /// Creating device.
    pub created_by: DeviceId,
    /// Creation time.
    pub created_at: Timestamp,
    /// Effective business status.
    pub status: OrderStatus,
    /// When the effective status was set.
    pub status_at: Timestamp,
    /// Who set it.
    pub status_by: DeviceId,
    /// Lines counted in the total (for a closed order: as closed).
    pub lines: Vec<LineView>,
    /// Removed lines (current values).
    pub removed_lines: Vec<LineView>,
    /// Lines touched by a late edit (current values), not counted.
    pub late_lines: Vec<LineView>,
    /// Every payment, with its history.
    pub payments: Vec<PaymentView>,
    /// Derived totals.
    pub totals: Totals,
    /// Edits concurrent with the close, kept and surfaced.
    pub late_edits: Vec<LateEdit>,
    /// Concurrent writes resolved by a rule.
    pub conflicts: Vec<Conflict>,
}

impl OrderView {
    /// Late edits nobody has acknowledged yet.
    pub fn unacknowledged_late_edits(&self) -> impl Iterator<Item = &LateEdit> {
        self.late_edits.iter().filter(|e| !e.acknowledged)
    }

    /// The view as pretty JSON.
    pub fn to_json(&self) -> Result<String, ModelError> {
        Ok(serde_json::to_string_pretty(self)?)
    }
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

fn line_view(id: LineId, l: &LineRec) -> LineView {
    let quantity = l.qty.max(0);
    LineView {
        id,
        sku: l.sku.clone(),
        name: l.name.clone(),
        unit_price: l.unit_price,
        quantity,
        modifiers: l.modifiers.clone(),
        note: l.note.clone(),
        line_total: clamp(i128::from(l.unit_price) * i128::from(quantity)),
        added_by: l.added_by,
        added_at: l.added_at,
        removed: l.removed.is_some(),
    }
}

fn render(v: &ScalarValue) -> String {
    match v {
        ScalarValue::Str(s) => s.to_string(),
        other => other.to_string(),
    }
}

/// The winning terminal entry and the hash of the change that wrote it.
pub(crate) fn close_of(
    doc: &Automerge,
    log: &[StatusRec],
) -> Option<(StatusRec, automerge::ChangeHash)> {
    let top = schema::lattice(log).top()?;
    if !top.status.is_terminal() {
        return None;
    }
    let rec = log.iter().find(|r| r.entry == top)?.clone();
    let hash = doc.hash_for_opid(&rec.obj)?;
    Some((rec, hash))
}

/// Builds the view of the order held in `doc`.
pub(crate) fn build(doc: &Automerge) -> Result<OrderView, ModelError> {
    build_from(doc, &Snapshot::read(&Reader::new(doc, None))?)
}

/// Builds the view of the order held in `doc`, whose parse at its current heads is `now`.
pub(crate) fn build_from(doc: &Automerge, now: &Snapshot) -> Result<OrderView, ModelError> {
    let r = Reader::new(doc, None);
    let lattice = schema::lattice(&now.status);
    let top = lattice
        .top()
        .ok_or_else(|| ModelError::NotAnOrder("empty status log".into()))?;
    let top_rec = now
        .status
        .iter()
        .find(|s| s.entry == top)
        .ok_or_else(|| ModelError::NotAnOrder("status entry vanished".into()))?;

    let close = close_of(doc, &now.status);
    // The order as closed is the document at heads `[C]`. When `C` is the only head, that is
    // the document now (the same set of changes), so the parse we have is reused.
    let closed_then;
    let closed = match &close {
        Some((_, hash)) if doc.get_heads().as_slice() == std::slice::from_ref(hash) => Some(now),
        Some((_, hash)) => {
            closed_then = Snapshot::read(&Reader::new(doc, Some(std::slice::from_ref(hash))))?;
            Some(&closed_then)
        }
        None => None,
    };
    let acked = |id: &str| now.acks.values().find(|a| a.edit == id).map(|a| a.by);
    let mut late_edits = Vec::new();
    let mut late_lines = Vec::new();
    let counted_source = closed.map_or(&now.lines, |c| &c.lines);

    if let Some(c) = closed {
        let closed_as = top.status;
        for (id, line) in &now.lines {
            let before = c.lines.get(id);
            let (kind, message) = match before {
                None if line.removed.is_some() => continue,
                None => (
                    LateEditKind::LineAdded,
                    format!(
                        "line {} x{} added concurrently with {closed_as}: not in the total, unpaid",
                        line.name, line.qty
                    ),
                ),
                Some(b) if b.removed.is_none() && line.removed.is_some() => (
                    LateEditKind::LineRemoved,
                    format!(
                        "line {} removed concurrently with {closed_as}: it was sold as closed",
                        line.name
                    ),
                ),
                Some(b)
                    if b.qty != line.qty
                        || b.unit_price != line.unit_price
                        || b.note != line.note =>
                {
                    (
                        LateEditKind::LineChanged,
                        format!(
                            "line {} changed concurrently with {closed_as} (qty {} -> {}, unit price {} -> {}): the total keeps the closed values",
                            line.name, b.qty, line.qty, b.unit_price, line.unit_price
                        ),
                    )
                }
                Some(_) => continue,
            };
            let lid = format!("line:{id}");
            late_lines.push(line_view(*id, line));
            late_edits.push(LateEdit {
                acknowledged: acked(&lid).is_some(),
                acknowledged_by: acked(&lid),
                id: lid,
                kind,
                message,
            });
        }
        for (pid, p) in &now.payments {
            let seen = c.payments.get(pid);
            let late: Vec<PaymentState> = p
                .transitions
                .iter()
                .filter(|(tid, t)| {
                    !t.state.allowed_after_close()
                        && seen.is_none_or(|s| !s.transitions.contains_key(tid))
                })
                .map(|(_, t)| t.state)
                .collect();
            if late.is_empty() {
                continue;
            }
            let state = p.state();
            // The order as closed already counted this payment as captured, and all that came
            // late is another capture of it: the same money, recorded twice, counted once.
            let captured_again = seen.is_some_and(|s| s.state() == PaymentState::Captured)
                && late.iter().all(|s| *s == PaymentState::Captured);
            let message = match (closed_as, state) {
                (OrderStatus::Done, PaymentState::Captured) if captured_again => format!(
                    "{} payment of {} captured twice concurrently (once with {closed_as}): \
                     counted once, nothing to refund",
                    p.kind, p.amount
                ),
                _ => {
                    let consequence = match (closed_as, state) {
                        (OrderStatus::Deleted, PaymentState::Captured) => "refund needed",
                        (_, PaymentState::Captured) => "overpayment: refund or hand back change",
                        (_, PaymentState::Pending | PaymentState::Authorized) => {
                            "void or capture it"
                        }
                        _ => "settled",
                    };
                    format!(
                        "{} payment of {} ({}) recorded concurrently with {closed_as}: \
                         {consequence}",
                        p.kind, p.amount, state
                    )
                }
            };
            let pid_s = format!("payment:{pid}");
            late_edits.push(LateEdit {
                acknowledged: acked(&pid_s).is_some(),
                acknowledged_by: acked(&pid_s),
                id: pid_s,
                kind: LateEditKind::Payment,
                message,
            });
        }
        for s in &now.status {
            if s.entry == top || c.status.iter().any(|cs| cs.entry.id == s.entry.id) {
                continue;
            }
            let sid = format!("status:{}", s.entry.id);
            let (kind, message) = if s.entry.status.is_terminal() {
                (
                    LateEditKind::ConcurrentClose,
                    format!(
                        "order also set {} concurrently by {}; {closed_as} stands",
                        s.entry.status, s.by
                    ),
                )
            } else {
                (
                    LateEditKind::StatusIgnored,
                    format!(
                        "status {} set concurrently with {closed_as} by {}; ignored",
                        s.entry.status, s.by
                    ),
                )
            };
            late_edits.push(LateEdit {
                acknowledged: acked(&sid).is_some(),
                acknowledged_by: acked(&sid),
                id: sid,
                kind,
                message,
            });
        }
    }
    late_edits.sort_by(|a, b| a.id.cmp(&b.id));

    let mut lines = Vec::new();
    let mut removed_lines = Vec::new();
    let mut total: i128 = 0;
    for (id, l) in counted_source {
        if l.removed.is_none() {
            let v = line_view(*id, l);
            total += i128::from(v.line_total);
            lines.push(v);
        }
    }
    for (id, l) in &now.lines {
        if l.removed.is_some() {
            removed_lines.push(line_view(*id, l));
        }
    }

    let mut paid: i128 = 0;
    let mut refunded: i128 = 0;
    let mut payments = Vec::new();
    let mut conflicts = Vec::new();
    for (pid, p) in &now.payments {
        let state = p.state();
        match state {
            PaymentState::Captured => paid += i128::from(p.amount),
            PaymentState::Refunded => refunded += i128::from(p.amount),
            _ => {}
        }
        // Concurrent transitions that compete: a capture and a void, or two captures of the
        // same payment (two tills capturing one authorisation; counted once).
        let captures = p
            .transitions
            .values()
            .filter(|t| t.state == PaymentState::Captured)
            .count();
        let voided = p.captured_and_voided();
        if voided || captures > 1 {
            let mut values = vec![PaymentState::Captured.to_string(); captures.max(1)];
            if voided {
                values.push(PaymentState::Voided.to_string());
            }
            conflicts.push(Conflict {
                subject: format!("payment:{pid}.state"),
                values,
                chosen: state.to_string(),
            });
        }
        let mut history: Vec<TransitionView> = p
            .transitions
            .iter()
            .map(|(id, t)| TransitionView {
                id: *id,
                state: t.state,
                at: t.at,
                by: t.by,
            })
            .collect();
        history.sort_by_key(|t| (t.state, t.id));
        payments.push(PaymentView {
            id: *pid,
            kind: p.kind.to_string(),
            amount: p.amount,
            currency: p.currency.to_string(),
            reference: p.latest_reference(),
            state,
            created_by: p.created_by,
            created_at: p.created_at,
            history,
        });
    }

    for (id, l) in &now.lines {
        for key in l.conflicted.iter().copied() {
            let values = r.scalar_values(&l.obj, key)?;
            if values.len() > 1 {
                let chosen = r
                    .opt_scalar(&l.obj, key)?
                    .map(|v| render(&v))
                    .unwrap_or_default();
                let mut values: Vec<String> = values.iter().map(render).collect();
                values.sort();
                conflicts.push(Conflict {
                    subject: format!("line:{id}.{key}"),
                    values,
                    chosen,
                });
            }
        }
        if l.qty < 0 {
            conflicts.push(Conflict {
                subject: format!("line:{id}.qty"),
                values: vec![l.qty.to_string()],
                chosen: "0".into(),
            });
        }
    }
    // Concurrent active statuses with the same clock: the tie was broken by entry id.
    let mut by_clock: BTreeMap<u64, Vec<&StatusRec>> = BTreeMap::new();
    for s in now.status.iter().filter(|s| !s.entry.status.is_terminal()) {
        by_clock.entry(s.entry.clock).or_default().push(s);
    }
    if let Some((_, tied)) = by_clock.iter().next_back()
        && tied.len() > 1
        && !top.status.is_terminal()
    {
        let mut values: Vec<String> = tied.iter().map(|s| s.entry.status.to_string()).collect();
        values.sort();
        values.dedup();
        if values.len() > 1 {
            conflicts.push(Conflict {
                subject: "status".into(),
                values,
                chosen: top.status.to_string(),
            });
        }
    }
    conflicts.sort_by(|a, b| a.subject.cmp(&b.subject));

    // A deleted order owes nothing: its lines are listed but not charged, and any captured
    // money shows as change due (to refund).
    let total = if top.status == OrderStatus::Deleted {
        0
    } else {
        clamp(total)
    };
    let paid = clamp(paid);
    Ok(OrderView {
        id: now.header.id.to_string(),
        store: now.header.store.to_string(),
        number: now.number.map(|n| n.0),
        currency: now.header.currency.to_string(),
        created_by: now.header.created_by,
        created_at: now.header.created_at,
        status: top.status,
        status_at: top_rec.at,
        status_by: top_rec.by,
        lines,
        removed_lines,
        late_lines,
        payments,
        totals: Totals {
            total,
            paid,
            refunded: clamp(refunded),
            balance_due: total.saturating_sub(paid).max(0),
            change_due: paid.saturating_sub(total).max(0),
        },
        late_edits,
        conflicts,
    })
}
