//! The local sync status of an order: a state machine that lives on the device only.
//!
//! It is never encoded on the wire and never written into the order document (contrast with the
//! replicated business status, `crdt_model::OrderStatus`). `docs/sync-status.md` has the full
//! transition table; [`LocalSyncStatus::next`] implements it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Where an order stands between this device and the relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocalSyncStatus {
    /// Local changes are saved on the device and on their way to the relay.
    Syncing,
    /// The relay has durably stored every local change (a receipt covers our heads).
    Synced,
    /// A card payment is recorded as pending and the terminal has been asked to charge.
    Charging,
    /// The payment was captured locally; the relay has not confirmed it yet.
    Charged,
    /// The order was deleted locally; the relay has not confirmed it yet.
    Removing,
    /// Closed, synced and evicted from the device after the retention window; fetchable again.
    Removed,
    /// The relay is unreachable: changes wait on the device and are retried with backoff.
    Delayed,
    /// The relay failed to store the changes several times; still retried, more slowly.
    Failed,
    /// The relay refused the changes (policy or auth). Not retried blindly; the reason is kept.
    Blocked,
}

impl LocalSyncStatus {
    /// Every status.
    pub const ALL: [Self; 9] = [
        Self::Syncing,
        Self::Synced,
        Self::Charging,
        Self::Charged,
        Self::Removing,
        Self::Removed,
        Self::Delayed,
        Self::Failed,
        Self::Blocked,
    ];

    /// The status name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Syncing => "syncing",
            Self::Synced => "synced",
            Self::Charging => "charging",
            Self::Charged => "charged",
            Self::Removing => "removing",
            Self::Removed => "removed",
            Self::Delayed => "delayed",
            Self::Failed => "failed",
            Self::Blocked => "blocked",
        }
    }

    /// Whether local changes still wait for the relay in this status.
    pub fn has_pending_changes(self) -> bool {
        matches!(
            self,
            Self::Syncing | Self::Charged | Self::Removing | Self::Delayed | Self::Failed
        )
    }

    /// The status after `trigger`, or `None` if the trigger does not apply in this status
    /// (the status then stays as it is).
    pub fn next(self, trigger: Trigger) -> Option<Self> {
        use LocalSyncStatus::*;
        use Trigger::*;
        let to = match (self, trigger) {
            // An evicted order only comes back by being fetched.
            (Removed, Fetched) => Synced,
            (Removed, _) => return None,
            // A refusal is final until a person retries.
            (Blocked, RetryBlocked) => Syncing,
            (Blocked, _) => return None,
            (_, RelayRejected) => Blocked,
            // Unsent changes cannot reach the relay any more; synced orders have none.
            (Syncing | Charged | Removing | Delayed | Failed, TokenRefused) => Blocked,
            // While the terminal is charging, only the charge's outcome moves the order.
            (Charging, PaymentCaptured) => Charged,
            (Charging, PaymentEnded) => Syncing,
            (Charging, _) => return None,
            (_, ChargeStarted) => Charging,
            (_, DeleteRequested) => Removing,
            (Removing, LocalEdit | PaymentCaptured | PaymentEnded) => Removing,
            // Still waiting for the relay: a new edit does not change why.
            (Delayed, LocalEdit | PaymentEnded) => Delayed,
            (Failed, LocalEdit | PaymentEnded) => Failed,
            (_, PaymentCaptured) => Charged,
            (_, LocalEdit | PaymentEnded) => Syncing,
            (Syncing | Charged | Removing | Delayed | Failed, ReceiptCovers) => Synced,
            (Syncing | Charged | Removing | Failed, Offline) => Delayed,
            (Delayed | Failed, Reconnected) => Syncing,
            (Syncing | Charged | Removing | Delayed, StorageErrors) => Failed,
            // The relay's data went back to a backup: what it held may be gone.
            (Synced, RelayRestored) => Syncing,
            (Synced, Evicted) => Removed,
            (Synced, RemoteChange | Fetched) => Synced,
            _ => return None,
        };
        Some(to)
    }
}

impl fmt::Display for LocalSyncStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What moves an order between sync statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A local edit was saved (line, status, cash payment, ...).
    LocalEdit,
    /// A card payment was recorded pending and the terminal asked to charge.
    ChargeStarted,
    /// The terminal approved and the capture was saved.
    PaymentCaptured,
    /// The charge ended without capture (declined, voided) or was reconciled.
    PaymentEnded,
    /// The order was deleted locally.
    DeleteRequested,
    /// A relay receipt covers every local head.
    ReceiptCovers,
    /// The connection dropped or could not be made (backoff).
    Offline,
    /// The connection is back.
    Reconnected,
    /// The relay answered `storage_error` repeatedly.
    StorageErrors,
    /// The relay rejected changes by policy or auth.
    RelayRejected,
    /// The relay refused this device's token (`revoked`, `unauthorized`): at the upgrade or by
    /// closing an open connection. Orders with unsent changes are blocked with that reason.
    TokenRefused,
    /// A person asked to retry a blocked order (after fixing the cause).
    RetryBlocked,
    /// Changes from other devices arrived through the relay.
    RemoteChange,
    /// A closed, synced order passed its retention window and was dropped from the device.
    Evicted,
    /// The order was fetched from the relay (again).
    Fetched,
    /// The relay's data was restored from a backup (its data id changed): receipts it gave
    /// before may name changes it no longer holds.
    RelayRestored,
}

impl Trigger {
    /// Every trigger.
    pub const ALL: [Self; 16] = [
        Self::LocalEdit,
        Self::ChargeStarted,
        Self::PaymentCaptured,
        Self::PaymentEnded,
        Self::DeleteRequested,
        Self::ReceiptCovers,
        Self::Offline,
        Self::Reconnected,
        Self::StorageErrors,
        Self::RelayRejected,
        Self::TokenRefused,
        Self::RetryBlocked,
        Self::RemoteChange,
        Self::Evicted,
        Self::Fetched,
        Self::RelayRestored,
    ];
}
