//! `replicator`: the offline-first device library a POS terminal links.
//!
//! * [`core`]: the sans-IO sync engine (orders, sync states, local sync statuses, backoff);
//!   time and randomness are arguments, effects are returned, nothing touches a socket or disk.
//! * [`status`]: the device-only sync status machine (`docs/sync-status.md`).
//! * [`store`]: the [`Store`] trait, [`MemoryStore`], and the redb implementation.
//! * [`terminal`]: the [`PaymentTerminal`] trait and a simulated terminal.
//! * `driver` (feature `runtime-tokio`, default): [`Replicator`], the async API, and the
//!   tokio-tungstenite connection to the relay.
//!
//! Depends on [`crdt_model`] only; it speaks the relay's protocol (`crdt_model::wire`).
//!
//! ```no_run
//! # #[cfg(feature = "runtime-tokio")]
//! # async fn till(identity: replicator::Identity) -> Result<(), Box<dyn std::error::Error>> {
//! use replicator::{Config, Replicator, SimMode, SimTerminal};
//! use crdt_model::{Currency, FinalPayment, LineDraft, PaymentDraft, PaymentKind};
//!
//! let terminal = std::sync::Arc::new(SimTerminal::new(SimMode::Approve));
//! let till = Replicator::open("till.redb".as_ref(), identity, Config::default(), terminal).await?;
//! let order = till.create_order(Currency::new("EUR")?).await?;
//! till.add_line(order, LineDraft { name: "Espresso".into(), unit_price: 250, quantity: 2, ..Default::default() }).await?;
//! till.charge_card(order, 300).await?;
//! let cash = PaymentDraft { kind: PaymentKind::Cash, amount: 200, reference: String::new() };
//! till.complete_sale(order, Some(FinalPayment::New(cash))).await?;
//! println!("{:?} {:?}", till.view(order).await?.totals, till.sync_status(order).await);
//! # Ok(()) }
//! ```

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
