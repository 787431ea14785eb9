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
    /// Any other tender, named by a lowercase identifier (`[a-z0-9_]{1,32}`).
    Other(String),
}

impl PaymentKind {
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
                let ok = (1..=32).contains(&other.len())
                    && other
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !ok {
                    return Err(ModelError::InvalidValue {
                        field: "payment kind",
                        value: other.to_owned(),
                    });
                }
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

/// Checks an external payment reference (terminal auth code, masked card or gift card number).
///
/// Refuses references longer than [`MAX_REFERENCE_LEN`] and any that hold a full card number:
/// a run of 13 to 19 digits (single spaces or dashes between digits allowed) that passes the
/// Luhn check. Masked numbers such as `**** **** **** 1234` or `411111******1111` pass.
pub fn check_reference(reference: &str) -> Result<(), ModelError> {
    if reference.len() > MAX_REFERENCE_LEN {
        return Err(ModelError::InvalidValue {
            field: "payment reference",
            value: format!("{} bytes (max {MAX_REFERENCE_LEN})", reference.len()),
        });
    }
    if holds_card_number(reference) {
        return Err(ModelError::CardNumberInReference);
    }
    Ok(())
}

fn holds_card_number(s: &str) -> bool {
    let bytes = s.as_bytes();
    let mut digits: Vec<u8> = Vec::new();
    let mut i = 0;
    while i <= bytes.len() {
        let b = bytes.get(i).copied();
        match b {
            Some(d) if d.is_ascii_digit() => digits.push(d - b'0'),
            // A single separator between two digits keeps the run going.
            Some(b' ' | b'-')
                if !digits.is_empty() && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) => {}
            _ => {
                if (13..=19).contains(&digits.len()) && luhn_valid(&digits) {
                    return true;
                }
                digits.clear();
            }
        }
        i += 1;
    }
    false
}

fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if !i.is_multiple_of(2) {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
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
        assert!(check_reference("**** **** **** 1111").is_ok());
        assert!(check_reference("411111******1111").is_ok());
        assert!(check_reference("AUTH 123456").is_ok());
        // 16 digits that fail Luhn are an ordinary reference number.
        assert!(check_reference("4111111111111112").is_ok());
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
        assert!("Bad Kind".parse::<PaymentKind>().is_err());
    }
}
