//! [`ReplicatorError`]: the crate's one error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the replicator.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ReplicatorError {
    /// The model refused the operation (closed order, invalid amount, ...).
    #[error(transparent)]
    Model(#[from] crdt_model::ModelError),
    /// The local store file could not be opened: missing, locked, corrupt or not ours.
    #[error("cannot open local store {path}: {reason}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A read or write of the local store failed.
    #[error("local store: {0}")]
    Storage(String),
    /// Stored data does not decode.
    #[error("corrupt local data: {0}")]
    Corrupt(String),
    /// No such order on this device.
    #[error("order {0} is not on this device")]
    UnknownOrder(crdt_model::OrderId),
    /// The payment terminal failed; the payment stays pending for reconciliation.
    #[error("payment terminal: {0}")]
    Terminal(String),
    /// The replicator was shut down.
    #[error("replicator is closed")]
    Closed,
    /// An argument was invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
}
