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
//! use std::time::Duration;
//! use replicator::{Config, Identity, LocalSyncStatus, Replicator, SimMode, SimTerminal};
//! use crdt_model::{Currency, FinalPayment, LineDraft, PaymentDraft, PaymentKind, StoreId};
//!
//! async fn till() -> Result<(), Box<dyn std::error::Error>> {
//!     // From `relay-server device add --store store-12 --name "till 1"`, which prints
//!     // "device 018b... (till 1) in store store-12" and "token (shown once): dev_...".
//!     let identity = Identity {
//!         device: "018bcfe5-73b8-76c9-9a3b-782b29572a06".parse()?,
//!         store: StoreId::new("store-12")?,
//!         // The actor epoch: pick a new one whenever this till starts over with an empty local
//!         // file (a reinstall), so its changes never reuse an earlier install's actor id. A local
//!         // file keeps the epoch it was created with.
//!         epoch: 1,
//!         relay_url: "ws://127.0.0.1:7400/v1/sync".into(),
//!         // Other relays serving the same data, tried in turn when this one is unreachable.
//!         fallback_urls: vec!["ws://127.0.0.2:7400/v1/sync".into()],
//!         token: "dev_...".into(),
//!     };
//!     // One redb file per till. A real app passes its card terminal instead of SimTerminal.
//!     let terminal = std::sync::Arc::new(SimTerminal::new(SimMode::Approve));
//!     let till = Replicator::open("till.redb".as_ref(), identity, Config::default(), terminal).await?;
//!
//!     let order = till.create_order(Currency::new("EUR")?).await?; // usable at once, offline too
//!     let espresso = LineDraft { name: "Espresso".into(), unit_price: 250, quantity: 2, ..Default::default() };
//!     till.add_line(order, espresso).await?;
//!     till.charge_card(order, 300).await?; // pending saved before the terminal is asked
//!     let cash = PaymentDraft { kind: PaymentKind::Cash, amount: 200, reference: String::new() };
//!     till.complete_sale(order, Some(FinalPayment::New(cash))).await?; // last payment + Done, one change
//!     // Durable on the till already; Synced once the relay has it on disk (if it is reachable).
//!     till.wait_for_status(order, LocalSyncStatus::Synced, Duration::from_secs(10)).await?;
//!     println!("{:?}", till.view(order).await?.totals);
//!     till.close().await;
//!     Ok(())
//! }
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
