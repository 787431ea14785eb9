//! `relay-server`: the WebSocket relay that validates, persists and fans out orders.
//!
//! Not built yet (see issue 3). It depends on [`crdt_model`] only.

/// The model crate this relay builds on, re-exported for tools and tests.
pub use crdt_model;
