//! The order's lifecycle: active status changes, closing (complete the sale, delete), the
//! relay's number, and acknowledgements of late edits.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ROOT, ScalarValue};

use super::*;

impl Order {
    /// Moves an open order between active statuses (a new status log entry).
    pub fn set_status(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        status: ActiveStatus,
    ) -> Result<(), ModelError> {
        self.ensure_open()?;
        self.push_status(at, rng, status.into())
    }

    pub(super) fn push_status(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        status: OrderStatus,
    ) -> Result<(), ModelError> {
        let (obj, entry, clock, device) = self.status_entry_args(at, rng)?;
        self.commit(
            at,
            |tx| put_status(tx, &obj, entry, status, clock, at, &device),
            // A new status entry: read the log again when next needed.
            |c, _| c.status = None,
        )
    }

    pub(super) fn status_entry_args(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
    ) -> Result<(ObjId, EntryId, u64, String), ModelError> {
        let clock = self.status_state()?.next_clock;
        Ok((
            self.roots.status.clone(),
            EntryId::generate(at, rng),
            clock,
            self.writer.device.to_string(),
        ))
    }

    /// Completes the sale: records the final payment (if any) and makes the order Done in
    /// **one** change, so there is no moment where the order is closed but unpaid or paid but
    /// open. Refused while a balance would remain due.
    pub fn complete_sale(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        last: Option<FinalPayment>,
    ) -> Result<Option<PaymentId>, ModelError> {
        self.ensure_open()?;
        let view = self.view()?;
        let currency = self.header.currency;
        let extra = match &last {
            None => 0,
            Some(FinalPayment::New(d)) => {
                self.check_payment_draft(d, PaymentState::Captured)?;
                d.amount
            }
            Some(FinalPayment::Capture(pid)) => {
                let rec = self.payment(*pid)?;
                let from = rec.state();
                if !from.can_move_to(PaymentState::Captured) {
                    return Err(ModelError::InvalidTransition {
                        payment: *pid,
                        from,
                        to: PaymentState::Captured,
                    });
                }
                rec.amount
            }
        };
        let paid =
            Money::new(view.totals.paid, currency).checked_add(Money::new(extra, currency))?;
        let due = Money::new(view.totals.total, currency).checked_sub(paid)?;
        if due.minor > 0 {
            return Err(ModelError::BalanceDue {
                due_minor: due.minor,
                currency: currency.code().to_owned(),
            });
        }
        let (status_obj, entry, clock, device) = self.status_entry_args(at, rng)?;
        let payments = self.roots.payments.clone();
        let plan = match last {
            None => None,
            Some(FinalPayment::New(draft)) => Some(Ok(PaymentArgs {
                id: PaymentId::generate(at, rng),
                tid: EntryId::generate(at, rng),
                draft,
                initial: PaymentState::Captured,
                at,
                currency,
            })),
            Some(FinalPayment::Capture(pid)) => Some(Err((
                pid,
                self.transitions_obj(pid)?,
                EntryId::generate(at, rng),
            ))),
        };
        self.commit(
            at,
            |tx| {
                let paid_with = match &plan {
                    None => None,
                    Some(Ok(args)) => {
                        put_payment(tx, &payments, args, &device)?;
                        Some(args.id)
                    }
                    Some(Err((pid, transitions, tid))) => {
                        put_transition(
                            tx,
                            transitions,
                            *tid,
                            PaymentState::Captured,
                            at,
                            &device,
                            None,
                        )?;
                        Some(*pid)
                    }
                };
                put_status(
                    tx,
                    &status_obj,
                    entry,
                    OrderStatus::Done,
                    clock,
                    at,
                    &device,
                )?;
                Ok(paid_with)
            },
            // A new status entry (payments are not cached).
            |c, _| c.status = None,
        )
    }

    /// Deletes (cancels) the order. Refused while a payment is captured and not refunded, or
    /// pending/authorised and not voided: money is settled first.
    pub fn delete(&mut self, at: Timestamp, rng: &mut dyn Entropy) -> Result<(), ModelError> {
        self.ensure_open()?;
        let view = self.view()?;
        let open = view
            .payments
            .iter()
            .filter(|p| {
                matches!(
                    p.state,
                    PaymentState::Pending | PaymentState::Authorized | PaymentState::Captured
                )
            })
            .count();
        if open > 0 {
            return Err(ModelError::OutstandingPayments(open));
        }
        self.push_status(at, rng, OrderStatus::Deleted)
    }

    /// Writes the relay-assigned number. Only the relay calls this (its policy refuses a number
    /// written by a device); allowed on closed orders. Returns `false` if the same number was
    /// already there.
    pub fn assign_number(
        &mut self,
        at: Timestamp,
        number: OrderNumber,
    ) -> Result<bool, ModelError> {
        match self.number()? {
            Some(n) if n == number => Ok(false),
            Some(n) => Err(ModelError::NumberAlreadyAssigned(n.0)),
            // The number is not cached.
            None => self.commit(
                at,
                |tx| {
                    tx.put(ROOT, keys::NUMBER, number.0)?;
                    Ok(true)
                },
                |_, _| {},
            ),
        }
    }

    /// A back-office status change, applied through the lattice: an active status is refused on
    /// a closed order, Done/Deleted are recorded as entries (a terminal order stays terminal).
    pub fn set_status_any(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        status: OrderStatus,
    ) -> Result<(), ModelError> {
        self.ensure_open()?;
        self.push_status(at, rng, status)
    }

    /// A manager acknowledges a late edit (allowed on closed orders).
    pub fn acknowledge_late_edit(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        edit: &str,
        note: &str,
    ) -> Result<(), ModelError> {
        check_free_text(TextField::AckNote, note)?;
        let view = self.view()?;
        if !view.late_edits.iter().any(|e| e.id == edit) {
            return Err(ModelError::LateEditNotFound(edit.to_owned()));
        }
        let id = EntryId::generate(at, rng);
        let acks = self.roots.acks.clone();
        let device = self.writer.device.to_string();
        // Acknowledgements are not cached.
        self.commit(
            at,
            |tx| {
                let o = tx.put_object(&acks, id.to_string(), ObjType::Map)?;
                tx.put(&o, keys::EDIT, edit)?;
                tx.put(&o, keys::BY, device.as_str())?;
                tx.put(&o, keys::AT, ScalarValue::Timestamp(at.0))?;
                tx.put(&o, keys::NOTE, note)?;
                Ok(())
            },
            |_, _| {},
        )
    }
}

pub(super) fn put_status(
    tx: &mut Transaction<'_>,
    status: &ObjId,
    entry: EntryId,
    st: OrderStatus,
    clock: u64,
    at: Timestamp,
    device: &str,
) -> Result<(), ModelError> {
    let o = tx.put_object(status, entry.to_string(), ObjType::Map)?;
    tx.put(&o, keys::STATUS, st.as_str())?;
    tx.put(&o, keys::CLOCK, clock)?;
    tx.put(&o, keys::AT, ScalarValue::Timestamp(at.0))?;
    tx.put(&o, keys::BY, device)?;
    Ok(())
}
