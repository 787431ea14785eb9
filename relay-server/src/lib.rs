//! `relay-server`: the WebSocket relay that validates, persists and fans out orders — the single
//! source of truth.
//!
//! # Layout
//! * [`records`]: the plain records the core and the stores exchange (writes, outcomes, metadata).
//! * [`backend`]: the records as the drivers use them, in redb or PostgreSQL (chosen at start).
//! * [`store`]: redb persistence (orders as snapshot + change tail, numbers, feed, devices).
//! * [`pg`]: the same records in PostgreSQL, for several relays on one database (feature
//!   `postgres`).
//! * [`core`]: the sans-IO relay core: documents in memory, sync states, policy checks, the
//!   writes to commit, receipts, fan-out, the order cache. No I/O, no clock, no entropy.
//! * [`hub`]: the tokio driver of the core: worker tasks, the committer, the live feed (with
//!   PostgreSQL: other relays' commits, through `LISTEN`/`NOTIFY`), connection backpressure.
//! * [`clock`]: the one wall clock and entropy source the drivers pass to the core.
//! * [`admission`]: socket and device connection limits, handshake deadline, live connections
//!   per device (for revocation).
//! * `conn`: one device connection (handshake, frames, rate limit, feed catch-up).
//! * [`server`]: the HTTP router (WebSocket upgrade, back-office API, health, metrics), auth,
//!   limits and graceful shutdown.
//! * [`metrics`]: the relay's counters and gauges (`prometheus-client`), rendered as
//!   Prometheus text.
//! * [`screen`]: checks a device's sync message against [`screen::Limits`] before Automerge
//!   decodes it. Panics in one frame's work are contained with `crdt_model::guard::contain`.
//! * [`tls`]: rustls for `wss://` when a certificate is configured.
//! * [`client`]: the command line's HTTP(S) client for a running relay's admin API.
//! * [`watch`]: what the drivers tell observers in the process: durable commits per store,
//!   policy refusals, till connections.
//! * `board`: the back-office board at `/board`: server-rendered pages (maud), live updates
//!   through server-sent events, status changes and acknowledgements of late edits.
//!
//! It depends on [`crdt_model`] only; the protocol is `crdt_model::wire` (see `docs/protocol.md`).

// The core and what it needs: no I/O, no clock, no entropy, no storage engine. With
// `--no-default-features` the crate is only this (CI checks that it builds).
pub mod core;
pub mod error;
pub mod metrics;
pub mod records;
pub mod screen;

// The drivers: tokio, sockets, redb, TLS (feature `server`, on by default).
#[cfg(feature = "server")]
pub mod admission;
#[cfg(feature = "server")]
pub mod backend;
#[cfg(feature = "server")]
mod board;
#[cfg(feature = "server")]
pub mod client;
#[cfg(feature = "server")]
pub mod clock;
#[cfg(feature = "server")]
mod conn;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod store;
#[cfg(feature = "server")]
pub mod tls;
#[cfg(feature = "server")]
pub mod watch;

pub use error::RelayError;
#[cfg(feature = "server")]
pub use server::{RelayConfig, RunningRelay, run, spawn};

/// The model crate this relay builds on, re-exported for tools and tests.
pub use crdt_model;
