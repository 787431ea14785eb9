//! Payment transactions: kinds, the forward-only state lattice, and reference checks.
//!
//! A payment is an append-only entry of the order's `payments` map. Its state is never one
//! field: each transition (pending, authorized, captured, voided, refunded) is its own
//! write-once entry, and the effective state is the highest-ranked one present.
//!
//! ```text
//!   pending(0) -> authorized(1) -> captured(3) -> refunded(4)
//!      \              \
//!       `--------------`--------> voided(2)
//! ```
//!
//! Valid moves (checked locally and by the relay's policy) follow the arrows, skipping is
//! allowed forwards (cash goes straight to captured). The rank is a total order, so the join of
//! concurrent transitions is defined everywhere: a capture concurrent with a void reads as
//! captured (money is never silently dropped) and is flagged as a conflict to reconcile.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::text::{TextField, check_free_text, check_readable};

/// How a payment was made. The enum can grow: a kind written by a newer device that this build
/// does not know reads as [`PaymentKind::Other`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentKind {
    /// Notes and coins.
    Cash,
    /// A card charged through a payment terminal.
    CardTerminal,
    /// A cheque (or a paper receipt/voucher accepted as such).
    Check,
    /// A gift card; its reference holds the masked card number.
    GiftCard,
    /// Any other tender, by name (`gift card`, `voucher-2`, `Ticket Restaurant`): see
    /// [`check_kind_name`](crate::text::check_kind_name). Writing an invalid name or one that
    /// holds a card number is refused before anything is written; [`Self::other`] checks it
    /// up front.
    Other(String),
}

impl PaymentKind {
    /// The kind named `name`, refused (with the error writing it would give) when a writer may
    /// not store it: not a kind name, or a card number. A built-in name gives the built-in kind.
    pub fn other(name: &str) -> Result<Self, ModelError> {
        check_free_text(TextField::PaymentKind, name)?;
        name.parse()
    }

    /// The name stored in the document.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Cash => "cash",
            Self::CardTerminal => "card_terminal",
            Self::Check => "check",
            Self::GiftCard => "gift_card",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for PaymentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PaymentKind {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "cash" => Self::Cash,
            "card_terminal" => Self::CardTerminal,
            "check" => Self::Check,
            "gift_card" => Self::GiftCard,
            other => {
                check_readable(TextField::PaymentKind, other)?;
                Self::Other(other.to_owned())
            }
        })
    }
}

/// The state of a payment transaction. Ordered by rank (the derive follows declaration order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentState {
    /// Recorded before the tender was taken (for a card: before the terminal is asked).
    Pending,
    /// The card issuer authorised the amount; not yet captured.
    Authorized,
    /// Cancelled before money moved.
    Voided,
    /// Money taken.
    Captured,
    /// Money given back after capture (a full refund of this payment).
    Refunded,
}

impl PaymentState {
    /// Every state, by rank.
    pub const ALL: [Self; 5] = [
        Self::Pending,
        Self::Authorized,
        Self::Voided,
        Self::Captured,
        Self::Refunded,
    ];

    /// The name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Authorized => "authorized",
            Self::Voided => "voided",
            Self::Captured => "captured",
            Self::Refunded => "refunded",
        }
    }

    /// Whether a writer that sees the payment in state `self` may record `to`.
    pub fn can_move_to(self, to: Self) -> bool {
        use PaymentState::*;
        matches!(
            (self, to),
            (Pending, Authorized | Captured | Voided)
                | (Authorized, Captured | Voided)
                | (Captured, Refunded)
        )
    }

    /// States a payment may be created in.
    pub fn is_initial(self) -> bool {
        matches!(self, Self::Pending | Self::Authorized | Self::Captured)
    }

    /// Transitions allowed on a closed (Done/Deleted) order: a till must still void and refund.
    pub fn allowed_after_close(self) -> bool {
        matches!(self, Self::Voided | Self::Refunded)
    }

    /// The join of two states: the higher rank.
    pub fn join(self, other: Self) -> Self {
        self.max(other)
    }
}

impl fmt::Display for PaymentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PaymentState {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ModelError::InvalidValue {
                field: "payment state",
                value: s.to_owned(),
            })
    }
}

/// Longest external reference stored with a payment.
pub const MAX_REFERENCE_LEN: usize = 64;

/// Checks an external payment reference (terminal auth code, masked card or gift card number):
/// at most [`MAX_REFERENCE_LEN`] bytes and no full card number. The same check as
/// [`check_free_text`] with [`TextField::PaymentReference`] (see [`crate::text`] for what counts
/// as a card number); masked numbers such as `**** **** **** 1234` or `411111******1111` pass.
pub fn check_reference(reference: &str) -> Result<(), ModelError> {
    check_free_text(TextField::PaymentReference, reference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_moves_only() {
        use PaymentState::*;
        assert!(Pending.can_move_to(Captured));
        assert!(Authorized.can_move_to(Voided));
        assert!(Captured.can_move_to(Refunded));
        assert!(!Captured.can_move_to(Voided));
        assert!(!Captured.can_move_to(Pending));
        assert!(!Voided.can_move_to(Captured));
        assert!(!Refunded.can_move_to(Captured));
        for s in PaymentState::ALL {
            assert!(!s.can_move_to(s));
            for t in PaymentState::ALL {
                if s.can_move_to(t) {
                    assert!(t > s, "{s} -> {t} must raise the rank");
                }
            }
        }
    }

    #[test]
    fn full_card_numbers_are_refused() {
        assert!(check_reference("4111111111111111").is_err());
        assert!(check_reference("auth 4111 1111 1111 1111 ok").is_err());
        assert!(check_reference("4111-1111-1111-1111").is_err());
        assert!(check_reference("123456 4111111111111111").is_err());
        assert!(check_reference("**** **** **** 1111").is_ok());
        assert!(check_reference("411111******1111").is_ok());
        assert!(check_reference("AUTH 123456").is_ok());
        // 16 digits that fail Luhn (and whose shorter windows fail too) are an ordinary
        // reference number.
        assert!(check_reference("4111111111111113").is_ok());
        assert!(check_reference(&"x".repeat(65)).is_err());
    }

    #[test]
    fn kinds_round_trip_and_grow() {
        for k in ["cash", "card_terminal", "check", "gift_card", "voucher"] {
            assert_eq!(k.parse::<PaymentKind>().unwrap().as_str(), k);
        }
        assert_eq!(
            "voucher".parse::<PaymentKind>().unwrap(),
            PaymentKind::Other("voucher".into())
        );
        assert_eq!(
            "Gift card".parse::<PaymentKind>().unwrap(),
            PaymentKind::Other("Gift card".into())
        );
        assert!("Bad Kind!".parse::<PaymentKind>().is_err());
        assert!(PaymentKind::other("4111 1111 1111 1111").is_err());
        assert_eq!(PaymentKind::other("cash").unwrap(), PaymentKind::Cash);
    }
}
