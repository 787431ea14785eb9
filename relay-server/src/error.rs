//! [`RelayError`]: the relay's one error type.

use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the relay.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The data directory or its database could not be opened.
    #[error("cannot open relay data at {path}: {reason}")]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The database is held by another process (a running relay).
    #[error("relay data at {0} is in use by another process (is the relay running?)")]
    Locked(PathBuf),
    /// A storage operation failed.
    #[error("storage: {0}")]
    Storage(String),
    /// Stored data does not decode: the file is damaged or not ours.
    #[error("corrupt relay data: {0}")]
    Corrupt(String),
    /// The model refused something.
    #[error(transparent)]
    Model(#[from] crdt_model::ModelError),
    /// A token or credential was not accepted.
    #[error("unauthorized")]
    Unauthorized,
    /// The token belongs to a revoked device.
    #[error("revoked")]
    Revoked,
    /// No such device, order or token.
    #[error("not found: {0}")]
    NotFound(String),
    /// An argument was invalid.
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// I/O on sockets or files.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The relay is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for RelayError {
            fn from(e: $t) -> Self {
                Self::Storage(e.to_string())
            }
        }
    )*};
}

storage_from!(
    redb::Error,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);
