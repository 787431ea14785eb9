//! Cross-crate test support and `pos-sim`.
//!
//! * [`conformance`]: the merge conformance vectors (`tests/conformance/vectors`): their format,
//!   the executor that records and replays them on the model, and their generators.
//! * [`file_terminal`]: a simulated card terminal whose ledger survives the app process.
//! * [`proxy`]: a fault-injecting TCP proxy (cut, cut after N bytes, partition, delay).
//! * [`latency`]: latency histograms (hdrhistogram) for the benchmark binaries.
//! * [`pgdb`]: a fresh PostgreSQL schema per run, for tests and `pos-sim --store postgres://`.
//! * [`harness`]: an embedded relay that can be stopped and restarted on the same port and data,
//!   and terminals (the `replicator` library) behind per-terminal proxies.
//! * [`sim`]: `pos-sim`, a store of terminals with cashier behaviour under injected faults,
//!   checked end to end through the relay's HTTP API.

pub mod conformance;
pub mod file_terminal;
pub mod harness;
pub mod latency;
pub mod pgdb;
pub mod proxy;
pub mod sim;
