//! `replicator`: the offline-first device library a POS terminal links.
//!
//! Being built (issue 4). Depends on [`crdt_model`] only.

pub mod core;
#[cfg(feature = "runtime-tokio")]
pub mod driver;
pub mod error;
pub mod status;
pub mod store;
pub mod terminal;

pub use core::{Effect, Engine, EngineConfig, Event};
#[cfg(feature = "runtime-tokio")]
pub use driver::{ChargeResult, Config, Reconciled, Replicator};
pub use error::ReplicatorError;
pub use status::{LocalSyncStatus, Trigger};
pub use store::{Blocked, Identity, MemoryStore, OrderRecord, Store, StoredOrder};
pub use terminal::{ChargeOutcome, PaymentTerminal, SimMode, SimTerminal, TerminalError};

/// The model crate this library builds on, re-exported for applications.
pub use crdt_model;
