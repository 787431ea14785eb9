//! The business status lattice.
//!
//! An order's status is never one Automerge register. Every status change is a write-once entry
//! of the order's status log, and the effective status is the **join** (maximum) of all entries
//! under a total order:
//!
//! ```text
//!   Done      (class 2: money was taken; beats a concurrent Delete)
//!    |
//!   Deleted   (class 1)
//!    |
//!   active    (class 0: InProgress / InDelivery / Delayed, ordered by Lamport clock, then entry id)
//! ```
//!
//! The log only grows (entries are never changed or removed) and `max` over a total order is
//! commutative, associative and idempotent, so every replica that holds the same entries reads
//! the same status, and adding entries never lowers it: once any replica has made an order
//! terminal, every merge that contains that entry is terminal.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::ids::EntryId;

/// An order's business status, replicated in the document (contrast with the device-only
/// sync status of the `replicator` crate).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    /// Being taken or prepared.
    InProgress,
    /// Out for delivery.
    InDelivery,
    /// Postponed (for example a table order held back).
    Delayed,
    /// Sold: the sale was completed and paid. Terminal.
    Done,
    /// Cancelled. Terminal.
    Deleted,
}

impl OrderStatus {
    /// Every status, active ones first.
    pub const ALL: [Self; 5] = [
        Self::InProgress,
        Self::InDelivery,
        Self::Delayed,
        Self::Done,
        Self::Deleted,
    ];

    /// `true` for Done and Deleted: the order accepts no further edits.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Deleted)
    }

    /// The lattice class: 0 for active statuses, 1 for Deleted, 2 for Done.
    pub fn class(self) -> u8 {
        match self {
            Self::InProgress | Self::InDelivery | Self::Delayed => 0,
            Self::Deleted => 1,
            Self::Done => 2,
        }
    }

    /// The name stored in the document.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InProgress => "in_progress",
            Self::InDelivery => "in_delivery",
            Self::Delayed => "delayed",
            Self::Done => "done",
            Self::Deleted => "deleted",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| ModelError::InvalidValue {
                field: "status",
                value: s.to_owned(),
            })
    }
}

/// The statuses a cashier may move an open order between.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActiveStatus {
    /// Being taken or prepared.
    InProgress,
    /// Out for delivery.
    InDelivery,
    /// Postponed.
    Delayed,
}

impl From<ActiveStatus> for OrderStatus {
    fn from(s: ActiveStatus) -> Self {
        match s {
            ActiveStatus::InProgress => Self::InProgress,
            ActiveStatus::InDelivery => Self::InDelivery,
            ActiveStatus::Delayed => Self::Delayed,
        }
    }
}

/// One write-once entry of the status log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatusEntry {
    /// The status this entry sets.
    pub status: OrderStatus,
    /// Lamport clock: one more than the highest clock the writer had seen in the log, so a
    /// causally later active status always outranks an earlier one.
    pub clock: u64,
    /// The entry's key in the log; breaks ties between concurrent entries deterministically.
    pub id: EntryId,
}

impl StatusEntry {
    fn rank(&self) -> (u8, u64, EntryId) {
        (self.status.class(), self.clock, self.id)
    }

    /// The lattice join of two entries: the greater under [`Ord`] (rank, then status name, so
    /// even two entries sharing an id, which honest writers never produce, join the same way on
    /// every replica).
    pub fn join(self, other: Self) -> Self {
        self.max(other)
    }
}

impl PartialOrd for StatusEntry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StatusEntry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.rank()
            .cmp(&other.rank())
            .then_with(|| self.status.as_str().cmp(other.status.as_str()))
    }
}

/// The join of a set of status entries: the element of the lattice an order's log denotes.
///
/// `StatusLattice::default()` is the bottom (an empty log).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StatusLattice(Option<StatusEntry>);

impl StatusLattice {
    /// The lattice element of a single entry.
    pub fn of(entry: StatusEntry) -> Self {
        Self(Some(entry))
    }

    /// The join of all entries of a log, in any order.
    pub fn from_entries<I: IntoIterator<Item = StatusEntry>>(entries: I) -> Self {
        entries
            .into_iter()
            .fold(Self::default(), |acc, e| acc.join(Self::of(e)))
    }

    /// Least upper bound of two elements.
    pub fn join(self, other: Self) -> Self {
        match (self.0, other.0) {
            (Some(a), Some(b)) => Self(Some(a.join(b))),
            (a, b) => Self(a.or(b)),
        }
    }

    /// The lattice order: `self <= other` iff joining `other` into `self` gives `other`.
    pub fn le(self, other: Self) -> bool {
        self.join(other) == other
    }

    /// The winning entry, if the log has any.
    pub fn top(self) -> Option<StatusEntry> {
        self.0
    }

    /// The effective status; an empty log reads as InProgress.
    pub fn status(self) -> OrderStatus {
        self.0.map_or(OrderStatus::InProgress, |e| e.status)
    }

    /// `true` when the effective status is Done or Deleted.
    pub fn is_terminal(self) -> bool {
        self.status().is_terminal()
    }
}

/// The clock a new entry must carry: one more than any clock in `entries`.
pub fn next_clock<'a, I: IntoIterator<Item = &'a StatusEntry>>(entries: I) -> u64 {
    entries
        .into_iter()
        .map(|e| e.clock)
        .max()
        .unwrap_or(0)
        .saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn e(status: OrderStatus, clock: u64, id: u128) -> StatusEntry {
        StatusEntry {
            status,
            clock,
            id: EntryId(Uuid::from_u128(id)),
        }
    }

    #[test]
    fn terminal_beats_any_active_whatever_the_clock() {
        let done = e(OrderStatus::Done, 1, 1);
        let late_active = e(OrderStatus::InDelivery, 99, 2);
        assert_eq!(
            StatusLattice::from_entries([done, late_active]).status(),
            OrderStatus::Done
        );
    }

    #[test]
    fn done_beats_deleted() {
        let del = e(OrderStatus::Deleted, 50, 9);
        let done = e(OrderStatus::Done, 3, 1);
        assert_eq!(
            StatusLattice::from_entries([del, done]).status(),
            OrderStatus::Done
        );
    }

    #[test]
    fn later_active_status_wins_among_actives() {
        let a = e(OrderStatus::InProgress, 1, 5);
        let b = e(OrderStatus::Delayed, 2, 1);
        assert_eq!(
            StatusLattice::from_entries([b, a]).status(),
            OrderStatus::Delayed
        );
    }

    #[test]
    fn status_names_round_trip() {
        for s in OrderStatus::ALL {
            assert_eq!(s.as_str().parse::<OrderStatus>().unwrap(), s);
        }
        assert!("closed".parse::<OrderStatus>().is_err());
    }
}
