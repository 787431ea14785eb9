//! `replicator`: the offline-first device library a POS terminal links.
//!
//! Not built yet (see issue 4). It depends on [`crdt_model`] only; the relay is reached
//! through the shared wire types, never through the `relay-server` crate.

/// The model crate this library builds on, re-exported for applications.
pub use crdt_model;
