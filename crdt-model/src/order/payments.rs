//! Payments of the sale: new payments in their initial state and forward-only transitions
//! (authorize, capture, void, refund), each under a fresh entry id.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, ScalarValue};

use super::*;

impl Order {
    pub(super) fn payment(&self, payment: PaymentId) -> Result<schema::PaymentRec, ModelError> {
        let r = Reader::new(&self.doc, None);
        let key = payment.to_string();
        if r.get(&self.roots.payments, &key)?.is_none() {
            return Err(ModelError::PaymentNotFound(payment));
        }
        schema::read_payment(&r, &self.roots.payments, &key, self.header.currency)
    }

    /// Records a payment in state `initial` (pending before a card terminal is asked; captured
    /// for cash already in the drawer).
    pub fn add_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        draft: PaymentDraft,
        initial: PaymentState,
    ) -> Result<PaymentId, ModelError> {
        self.ensure_open()?;
        let id = PaymentId::generate(at, rng);
        let tid = EntryId::generate(at, rng);
        self.check_payment_draft(&draft, initial)?;
        let args = PaymentArgs {
            id,
            tid,
            draft,
            initial,
            at,
            currency: self.header.currency,
        };
        let payments = self.roots.payments.clone();
        let device = self.writer.device.to_string();
        // Payments are not cached.
        self.commit(
            at,
            |tx| put_payment(tx, &payments, &args, &device),
            |_, _| {},
        )?;
        Ok(id)
    }

    pub(super) fn check_payment_draft(
        &self,
        draft: &PaymentDraft,
        initial: PaymentState,
    ) -> Result<(), ModelError> {
        if draft.amount <= 0 || draft.amount > MAX_PAYMENT {
            return Err(ModelError::InvalidAmount(draft.amount));
        }
        if !initial.is_initial() {
            return Err(ModelError::InvalidValue {
                field: "initial payment state",
                value: initial.to_string(),
            });
        }
        check_free_text(TextField::PaymentKind, draft.kind.as_str())?;
        check_free_text(TextField::PaymentReference, &draft.reference)
    }

    /// Records `pending` for a payment about to be taken.
    pub fn begin_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        draft: PaymentDraft,
    ) -> Result<PaymentId, ModelError> {
        self.add_payment(at, rng, draft, PaymentState::Pending)
    }

    /// Moves a payment forward to `to`, optionally with the reference learnt at that step (an
    /// authorisation code). On a closed order only voids and refunds are accepted.
    pub fn advance_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
        to: PaymentState,
        reference: Option<&str>,
    ) -> Result<(), ModelError> {
        let status = self.status_state()?.lattice.status();
        if status.is_terminal() && !to.allowed_after_close() {
            return Err(ModelError::OrderClosed { status });
        }
        if let Some(r) = reference {
            check_free_text(TextField::TransitionReference, r)?;
        }
        let rec = self.payment(payment)?;
        let from = rec.state();
        if !from.can_move_to(to) {
            return Err(ModelError::InvalidTransition { payment, from, to });
        }
        let tid = EntryId::generate(at, rng);
        let transitions = self.transitions_obj(payment)?;
        let device = self.writer.device.to_string();
        self.commit(
            at,
            |tx| put_transition(tx, &transitions, tid, to, at, &device, reference),
            |_, _| {},
        )
    }

    pub(super) fn transitions_obj(&self, payment: PaymentId) -> Result<ObjId, ModelError> {
        let r = Reader::new(&self.doc, None);
        let p = r.container(
            &self.roots.payments,
            &payment.to_string(),
            ObjType::Map,
            "payment",
        )?;
        r.container(&p, keys::TRANSITIONS, ObjType::Map, "payment.transitions")
    }

    /// pending -> authorized, with the terminal's authorisation reference.
    pub fn authorize_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
        reference: &str,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Authorized, Some(reference))
    }

    /// -> captured: the money is taken.
    pub fn capture_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Captured, None)
    }

    /// -> voided: cancelled before money moved (also allowed on a closed order).
    pub fn void_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Voided, None)
    }

    /// captured -> refunded (also allowed on a closed order).
    pub fn refund_payment(
        &mut self,
        at: Timestamp,
        rng: &mut dyn Entropy,
        payment: PaymentId,
    ) -> Result<(), ModelError> {
        self.advance_payment(at, rng, payment, PaymentState::Refunded, None)
    }
}

pub(super) struct PaymentArgs {
    pub(super) id: PaymentId,
    pub(super) tid: EntryId,
    pub(super) draft: PaymentDraft,
    pub(super) initial: PaymentState,
    pub(super) at: Timestamp,
    pub(super) currency: Currency,
}

pub(super) fn put_payment(
    tx: &mut Transaction<'_>,
    payments: &ObjId,
    a: &PaymentArgs,
    device: &str,
) -> Result<(), ModelError> {
    let p = tx.put_object(payments, a.id.to_string(), ObjType::Map)?;
    tx.put(&p, keys::KIND, a.draft.kind.as_str())?;
    tx.put(&p, keys::AMOUNT, a.draft.amount)?;
    tx.put(&p, keys::CURRENCY, a.currency.code())?;
    tx.put(&p, keys::REFERENCE, a.draft.reference.as_str())?;
    tx.put(&p, keys::CREATED_BY, device)?;
    tx.put(&p, keys::CREATED_AT, ScalarValue::Timestamp(a.at.0))?;
    let t = tx.put_object(&p, keys::TRANSITIONS, ObjType::Map)?;
    put_transition(tx, &t, a.tid, a.initial, a.at, device, None)
}

pub(super) fn put_transition(
    tx: &mut Transaction<'_>,
    transitions: &ObjId,
    tid: EntryId,
    state: PaymentState,
    at: Timestamp,
    device: &str,
    reference: Option<&str>,
) -> Result<(), ModelError> {
    let o = tx.put_object(transitions, tid.to_string(), ObjType::Map)?;
    tx.put(&o, keys::STATE, state.as_str())?;
    tx.put(&o, keys::AT, ScalarValue::Timestamp(at.0))?;
    tx.put(&o, keys::BY, device)?;
    if let Some(r) = reference {
        tx.put(&o, keys::REFERENCE, r)?;
    }
    Ok(())
}
