//! The crate's error type, [`ModelError`], and the policy's narrower [`PolicyViolation`].

use thiserror::Error;

use crate::ids::{LineId, PaymentId};
use crate::payment::PaymentState;
use crate::status::OrderStatus;

/// Everything that can go wrong in `crdt-model`.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An id did not parse.
    #[error("invalid {what}: {value:?}")]
    InvalidId {
        /// Which kind of id.
        what: &'static str,
        /// The text that did not parse.
        value: String,
    },
    /// A field holds a value outside its domain.
    #[error("invalid {field}: {value}")]
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The offending value, rendered.
        value: String,
    },
    /// Not an ISO 4217 currency this build knows.
    #[error("unknown currency {0:?}")]
    UnknownCurrency(String),
    /// Two amounts in different currencies were combined, or a payment's currency is not the
    /// order's.
    #[error("currency mismatch: expected {expected}, found {found}")]
    CurrencyMismatch {
        /// The order's (or left operand's) currency.
        expected: String,
        /// The other currency.
        found: String,
    },
    /// A sum of money overflowed `i64` minor units.
    #[error("amount overflow")]
    AmountOverflow,
    /// A payment amount must be positive; prices and quantities within their bounds.
    #[error("invalid amount {0}")]
    InvalidAmount(i64),
    /// A free-text field (a reference, a note, a name, a payment kind...) holds what looks
    /// like a full card number (see [`crate::text`]). The value is not repeated here.
    #[error("{field} holds a full card number; store it masked")]
    CardNumber {
        /// The field.
        field: &'static str,
    },
    /// The order is Done or Deleted and accepts no such edit.
    #[error("order is {status} and accepts no further edits")]
    OrderClosed {
        /// The effective terminal status.
        status: OrderStatus,
    },
    /// No line with this id.
    #[error("line {0} not found")]
    LineNotFound(LineId),
    /// The line was removed; it can no longer be edited.
    #[error("line {0} was removed")]
    LineRemoved(LineId),
    /// No payment with this id.
    #[error("payment {0} not found")]
    PaymentNotFound(PaymentId),
    /// A payment state may only move forward along the lattice.
    #[error("payment {payment} cannot move from {from} to {to}")]
    InvalidTransition {
        /// The payment.
        payment: PaymentId,
        /// Its current state.
        from: PaymentState,
        /// The refused target state.
        to: PaymentState,
    },
    /// Completing the sale needs the balance paid.
    #[error("balance due: {due_minor} minor units of {currency}")]
    BalanceDue {
        /// What is still owed, in minor units.
        due_minor: i64,
        /// The order's currency.
        currency: String,
    },
    /// Deleting needs every captured payment refunded and every open one voided first.
    #[error("order has {0} payment(s) that are not voided or refunded")]
    OutstandingPayments(usize),
    /// The relay gives an order exactly one number.
    #[error("order already has number {0}")]
    NumberAlreadyAssigned(u64),
    /// An acknowledgement named a late edit the order does not have.
    #[error("no late edit {0:?} on this order")]
    LateEditNotFound(String),
    /// The document is not a well-formed order.
    #[error("not an order: {0}")]
    NotAnOrder(String),
    /// The bytes are not an Automerge document.
    #[error("cannot load order bytes: {0}")]
    Load(String),
    /// An Automerge operation failed.
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// Bytes from outside (a saved order, a change, a sync message) that Automerge could not
    /// take: it panicked on them, or they are not a sync message. Whatever they were offered to
    /// was left as it was ([`crate::guard`]).
    #[error("malformed {what}: {detail}")]
    Malformed {
        /// What the bytes were meant to be ("document", "change", "sync message").
        what: &'static str,
        /// What went wrong (the panic's message, or the decoder's error).
        detail: String,
    },
    /// The relay's policy refused a change.
    #[error(transparent)]
    Policy(#[from] PolicyViolation),
    /// A protocol frame did not decode.
    #[error("malformed frame: {0}")]
    Frame(String),
    /// Encoding or decoding JSON failed.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The relay could not seal a change it made ([`crate::seal`]).
    #[error("cannot seal a change: {0}")]
    Seal(String),
}

/// Why the policy refused a change. Each variant has a stable [`code`](Self::code) for the
/// wire and for metrics.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PolicyViolation {
    /// The document (or the change) does not describe a well-formed order.
    #[error("not an order: {0}")]
    NotAnOrder(String),
    /// An immutable field (id, store, currency, creation data, schema) was written after creation.
    #[error("immutable field {0} written after creation")]
    ImmutableField(String),
    /// Only the relay writes the order number.
    #[error("order number written by a device")]
    NumberWrittenByDevice,
    /// The relay assigns one number per order, once.
    #[error("order number already assigned")]
    NumberReassigned,
    /// A status log entry was changed or removed (which could un-close an order).
    #[error("status entry {0} changed or removed")]
    StatusRewritten(String),
    /// A change made by an author who had already seen the order closed.
    #[error("edit made after the order was {status}: {what}")]
    EditAfterClose {
        /// The terminal status the author had seen.
        status: OrderStatus,
        /// What the change tried to do.
        what: String,
    },
    /// An append-only entry (payment, transition, ack) or a write-once field was changed or deleted.
    #[error("append-only entry rewritten or deleted at {0}")]
    EntryRewritten(String),
    /// A payment transition that does not move the state forward from what its author saw.
    #[error("payment {payment}: {from} -> {to} is not a forward move")]
    PaymentBackwards {
        /// The payment id.
        payment: String,
        /// The state the author saw.
        from: PaymentState,
        /// The state written.
        to: PaymentState,
    },
    /// An amount that is negative, zero where it must be positive, or out of range.
    #[error("invalid amount at {0}")]
    InvalidAmount(String),
    /// A currency that is unknown or not the order's.
    #[error("invalid currency {0:?}")]
    InvalidCurrency(String),
    /// A payment reference that holds a full card number.
    #[error("full card number in payment reference at {0}")]
    CardNumberInReference(String),
    /// A free-text field (name, note, sku, modifier, payment kind, acknowledgement note) that
    /// holds a full card number.
    #[error("full card number in free text at {0}")]
    CardNumberInText(String),
    /// A value of the wrong type or domain.
    #[error("wrong value at {path}: expected {expected}")]
    WrongType {
        /// Where in the order.
        path: String,
        /// What the schema wants there.
        expected: &'static str,
    },
    /// A field or key the schema does not have.
    #[error("unknown field at {0}")]
    UnknownField(String),
    /// The order belongs to another store than the author's. Reveals nothing about the order.
    #[error("order not found")]
    ForeignStore,
    /// A change authored by an actor that is not the connected device's.
    #[error("change authored by foreign actor {0}")]
    ForeignActor(String),
}

impl PolicyViolation {
    /// Every code [`Self::code`] can return, so clients and conformance vectors can enumerate
    /// them (`tests/conformance` has at least one vector per code).
    pub const CODES: [&'static str; 16] = [
        "not_an_order",
        "immutable_field",
        "number_written_by_device",
        "number_reassigned",
        "status_rewritten",
        "edit_after_close",
        "entry_rewritten",
        "payment_backwards",
        "invalid_amount",
        "invalid_currency",
        "card_number_in_reference",
        "card_number_in_text",
        "wrong_type",
        "unknown_field",
        "not_found",
        "foreign_actor",
    ];

    /// A stable, machine-readable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotAnOrder(_) => "not_an_order",
            Self::ImmutableField(_) => "immutable_field",
            Self::NumberWrittenByDevice => "number_written_by_device",
            Self::NumberReassigned => "number_reassigned",
            Self::StatusRewritten(_) => "status_rewritten",
            Self::EditAfterClose { .. } => "edit_after_close",
            Self::EntryRewritten(_) => "entry_rewritten",
            Self::PaymentBackwards { .. } => "payment_backwards",
            Self::InvalidAmount(_) => "invalid_amount",
            Self::InvalidCurrency(_) => "invalid_currency",
            Self::CardNumberInReference(_) => "card_number_in_reference",
            Self::CardNumberInText(_) => "card_number_in_text",
            Self::WrongType { .. } => "wrong_type",
            Self::UnknownField(_) => "unknown_field",
            Self::ForeignStore => "not_found",
            Self::ForeignActor(_) => "foreign_actor",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One violation of every variant. The match has no wildcard, so a new variant does not
    /// compile until it is listed here, and the test then asks for its code in `CODES`.
    fn one_of_each() -> Vec<PolicyViolation> {
        let all = vec![
            PolicyViolation::NotAnOrder(String::new()),
            PolicyViolation::ImmutableField(String::new()),
            PolicyViolation::NumberWrittenByDevice,
            PolicyViolation::NumberReassigned,
            PolicyViolation::StatusRewritten(String::new()),
            PolicyViolation::EditAfterClose {
                status: OrderStatus::Done,
                what: String::new(),
            },
            PolicyViolation::EntryRewritten(String::new()),
            PolicyViolation::PaymentBackwards {
                payment: String::new(),
                from: PaymentState::Captured,
                to: PaymentState::Pending,
            },
            PolicyViolation::InvalidAmount(String::new()),
            PolicyViolation::InvalidCurrency(String::new()),
            PolicyViolation::CardNumberInReference(String::new()),
            PolicyViolation::CardNumberInText(String::new()),
            PolicyViolation::WrongType {
                path: String::new(),
                expected: "",
            },
            PolicyViolation::UnknownField(String::new()),
            PolicyViolation::ForeignStore,
            PolicyViolation::ForeignActor(String::new()),
        ];
        for v in &all {
            match v {
                PolicyViolation::NotAnOrder(_)
                | PolicyViolation::ImmutableField(_)
                | PolicyViolation::NumberWrittenByDevice
                | PolicyViolation::NumberReassigned
                | PolicyViolation::StatusRewritten(_)
                | PolicyViolation::EditAfterClose { .. }
                | PolicyViolation::EntryRewritten(_)
                | PolicyViolation::PaymentBackwards { .. }
                | PolicyViolation::InvalidAmount(_)
                | PolicyViolation::InvalidCurrency(_)
                | PolicyViolation::CardNumberInReference(_)
                | PolicyViolation::CardNumberInText(_)
                | PolicyViolation::WrongType { .. }
                | PolicyViolation::UnknownField(_)
                | PolicyViolation::ForeignStore
                | PolicyViolation::ForeignActor(_) => {}
            }
        }
        all
    }

    #[test]
    fn codes_lists_every_code_once() {
        let codes: Vec<&str> = one_of_each().iter().map(PolicyViolation::code).collect();
        assert_eq!(codes, PolicyViolation::CODES);
    }
}
