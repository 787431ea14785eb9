//! [`RelayError`]: the relay's one error type, and [`StorageError`], the redb failure it keeps
//! whole.
//!
//! The variants a caller must tell apart are apart: a storage failure ([`RelayError::Storage`],
//! itself classified as disk full, other I/O, corruption detected by redb, or other, see
//! [`StorageError::kind`]), stored bytes that do not decode ([`RelayError::Corrupt`]), a write
//! whose base is not what is stored ([`RelayError::Conflict`]), and an internal failure of the
//! relay's own machinery ([`RelayError::Internal`]). Errors from other crates are kept as
//! sources (`#[source]`/`#[from]`), never turned into strings, so a caller can inspect them and
//! an error report shows the whole chain.

#[cfg(feature = "server")]
use std::io::ErrorKind;
use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong in the relay.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The data directory, its database or another file the relay needs (a TLS certificate)
    /// could not be opened.
    #[error("cannot open relay data at {path}: {reason}")]
    Open {
        /// The file or directory.
        path: PathBuf,
        /// Why, for an operator.
        reason: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// A TLS certificate or key file could not be read or used.
    #[error("cannot use the TLS {what} file {path}: {reason}")]
    Tls {
        /// `certificate` or `private key`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why, for an operator.
        reason: String,
    },
    /// The database is held by another process (a running relay).
    #[error("relay data at {0} is in use by another process (is the relay running?)")]
    Locked(PathBuf),
    /// A storage operation failed in redb (disk full, I/O, corruption redb detected, ...).
    #[cfg(feature = "server")]
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A PostgreSQL operation failed (the `postgres` store): connection, statement, constraint
    /// or transaction failure. The driver's error is kept whole; see
    /// [`RelayError::is_disk_full`] and [`RelayError::is_retryable`].
    #[cfg(feature = "postgres")]
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// No PostgreSQL connection could be had from the pool (the `postgres` store).
    #[cfg(feature = "postgres")]
    #[error("postgres pool: {0}")]
    PgPool(#[from] deadpool_postgres::PoolError),
    /// Stored data does not decode: the file is damaged or not ours.
    #[error("corrupt relay data: {0}")]
    Corrupt(String),
    /// A write does not build on the stored state (its base heads are not the stored heads):
    /// nothing of its batch was written.
    #[error("conflict: {0}")]
    Conflict(String),
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
    /// A failure of the relay's own machinery that is not storage: a task that panicked or was
    /// cancelled, a value that does not encode, a counter that ran out.
    #[error("internal: {0}")]
    Internal(String),
    /// The relay is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// One error answering several waiters: a failed group commit fails every write in it,
    /// a failed load every request waiting for the order.
    #[error(transparent)]
    Shared(std::sync::Arc<RelayError>),
    /// A call to a running relay's admin API (the command line's `--relay`) failed.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Why a call to a running relay's admin API failed, in words the operator can act on.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The relay address is not `https://host:port`, `http://host:port` or `host:port`.
    #[error("bad relay address {given:?}: {reason}")]
    BadUrl {
        /// What was given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The CA certificate file to trust could not be read or holds no certificate.
    #[error("cannot use the CA certificate file {path}: {reason}")]
    CaCert {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Nothing accepts connections at the relay's address.
    #[error("connection refused by {url}: is the relay running and listening there?")]
    Refused {
        /// The relay's URL.
        url: String,
    },
    /// The relay could not be reached or did not answer: host not found, timeout, a
    /// connection closed without an answer.
    #[error("cannot reach the relay at {url}: {reason}")]
    Unreachable {
        /// The relay's URL.
        url: String,
        /// Why, for an operator.
        reason: String,
        /// The client's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The TLS handshake with the relay failed (its certificate was refused, or it does not
    /// speak TLS).
    #[error("TLS with {url} failed: {reason}")]
    Tls {
        /// The relay's URL.
        url: String,
        /// The cause, for an operator.
        reason: String,
        /// The TLS library's error.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The relay answered with an HTTP error; `code` and `message` are its JSON error's.
    #[error("the relay answered HTTP {status} ({code}): {message}")]
    Http {
        /// The HTTP status.
        status: u16,
        /// The relay's error code (`unauthorized`, `invalid_argument`, ...), or `http` when
        /// the body was not the relay's JSON error.
        code: String,
        /// The relay's message, or the start of the body.
        message: String,
    },
}

impl RelayError {
    /// [`RelayError::Open`] for `path`, keeping `source`; the reason shown is its message.
    pub fn open(
        path: impl Into<PathBuf>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        let source = source.into();
        Self::Open {
            path: path.into(),
            reason: source.to_string(),
            source: Some(source),
        }
    }

    /// [`RelayError::Open`] for `path` with a reason and no underlying error.
    pub fn open_reason(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Open {
            path: path.into(),
            reason: reason.into(),
            source: None,
        }
    }

    /// `true` for a storage failure because the disk (or the relay's quota on it) is full.
    pub fn is_disk_full(&self) -> bool {
        match self {
            #[cfg(feature = "server")]
            Self::Storage(s) => s.is_disk_full(),
            #[cfg(feature = "postgres")]
            Self::Postgres(e) => e.code() == Some(&tokio_postgres::error::SqlState::DISK_FULL),
            Self::Shared(e) => e.is_disk_full(),
            _ => false,
        }
    }

    /// `true` for a failure that running the same operation again may heal: a PostgreSQL
    /// deadlock or serialization failure between relays sharing one database, or a
    /// connection lost (the outcome of a lost `COMMIT` is unknown: a retried write then meets
    /// [`RelayError::Conflict`] if the first one landed).
    pub fn is_retryable(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Self::Postgres(e) => {
                use tokio_postgres::error::SqlState;
                e.is_closed()
                    || e.code().is_some_and(|c| {
                        *c == SqlState::T_R_DEADLOCK_DETECTED
                            || *c == SqlState::T_R_SERIALIZATION_FAILURE
                    })
            }
            #[cfg(feature = "postgres")]
            Self::PgPool(_) => true,
            Self::Shared(e) => e.is_retryable(),
            _ => false,
        }
    }

    /// The error itself, or the one a [`RelayError::Shared`] shares.
    pub fn inner(&self) -> &RelayError {
        match self {
            Self::Shared(e) => e.inner(),
            e => e,
        }
    }
}

/// What kind of storage failure a [`StorageError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageErrorKind {
    /// The disk, or the relay's quota on it, is full. Freeing space heals it.
    DiskFull,
    /// Another I/O failure (including redb's "a previous I/O error occurred").
    Io,
    /// redb found the database file damaged.
    Corruption,
    /// Anything else redb reports (a value too large, a poisoned transaction, ...).
    Other,
}

impl std::fmt::Display for StorageErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::DiskFull => "disk full",
            Self::Io => "I/O failure",
            Self::Corruption => "database damaged",
            Self::Other => "failed",
        })
    }
}

#[cfg(feature = "server")]
/// A failed redb operation, kept whole (its [`source`](std::error::Error::source) is the
/// [`redb::Error`]) and classified ([`StorageError::kind`]).
#[derive(Debug, Error)]
#[error("storage {kind}: {source}")]
pub struct StorageError {
    kind: StorageErrorKind,
    #[source]
    source: redb::Error,
}

#[cfg(feature = "server")]
impl StorageError {
    /// What kind of failure this is.
    pub fn kind(&self) -> StorageErrorKind {
        self.kind
    }

    /// `true` when the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        self.kind == StorageErrorKind::DiskFull
    }

    /// `true` for an I/O failure, disk full included.
    pub fn is_io(&self) -> bool {
        matches!(self.kind, StorageErrorKind::DiskFull | StorageErrorKind::Io)
    }

    /// `true` when redb found the database file damaged.
    pub fn is_corruption(&self) -> bool {
        self.kind == StorageErrorKind::Corruption
    }

    /// The redb error.
    pub fn redb(&self) -> &redb::Error {
        &self.source
    }
}

#[cfg(feature = "server")]
fn io_kind(io: &std::io::Error) -> StorageErrorKind {
    if matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded) {
        StorageErrorKind::DiskFull
    } else {
        StorageErrorKind::Io
    }
}

#[cfg(feature = "server")]
impl From<redb::Error> for StorageError {
    fn from(source: redb::Error) -> Self {
        let kind = match &source {
            redb::Error::Io(io) => io_kind(io),
            redb::Error::PreviousIo => StorageErrorKind::Io,
            redb::Error::Corrupted(_) => StorageErrorKind::Corruption,
            _ => StorageErrorKind::Other,
        };
        Self { kind, source }
    }
}

#[cfg(feature = "server")]
macro_rules! storage_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                redb::Error::from(e).into()
            }
        }

        impl From<$t> for RelayError {
            fn from(e: $t) -> Self {
                Self::Storage(e.into())
            }
        }
    )*};
}

#[cfg(feature = "server")]
storage_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
    redb::DatabaseError
);

#[cfg(feature = "server")]
impl From<redb::Error> for RelayError {
    fn from(e: redb::Error) -> Self {
        Self::Storage(e.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[cfg(feature = "server")]
    #[test]
    fn storage_errors_are_classified_and_keep_their_source() {
        let full: RelayError =
            redb::StorageError::Io(std::io::Error::from(ErrorKind::StorageFull)).into();
        assert!(full.is_disk_full());
        assert!(full.source().is_some_and(|s| s.is::<redb::Error>()));
        let io: RelayError =
            redb::StorageError::Io(std::io::Error::from(ErrorKind::PermissionDenied)).into();
        assert!(matches!(&io, RelayError::Storage(s) if s.is_io() && !s.is_disk_full()));
        let bad: RelayError = redb::StorageError::Corrupted("bad page".into()).into();
        assert!(matches!(&bad, RelayError::Storage(s) if s.is_corruption()));
        assert!(bad.to_string().contains("bad page"), "{bad}");
        let other: RelayError = redb::CommitError::TransactionPoisoned.into();
        assert!(matches!(&other, RelayError::Storage(s) if s.kind() == StorageErrorKind::Other));
    }

    #[test]
    fn open_keeps_its_source() {
        let e = RelayError::open("/x", std::io::Error::from(ErrorKind::PermissionDenied));
        assert!(e.source().is_some_and(|s| s.is::<std::io::Error>()));
        assert!(e.to_string().contains("/x"));
        assert!(RelayError::open_reason("/x", "why").source().is_none());
    }
}
