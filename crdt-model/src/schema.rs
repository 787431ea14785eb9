//! The document schema: key names, and a strict parser from an Automerge document (at its
//! current heads or any historical heads) into typed records.
//!
//! ```text
//! ROOT
//! ├─ schema      uint   = 1                          immutable
//! ├─ id          str    order id (UUID v7)           immutable
//! ├─ store       str    store (tenant) id            immutable
//! ├─ currency    str    ISO 4217                     immutable
//! ├─ created_by  str    device id                    immutable
//! ├─ created_at  ts                                  immutable
//! ├─ number      uint   relay-assigned, write-once   relay only
//! ├─ lines       map  line id -> line                created in the first change
//! ├─ payments    map  payment id -> payment          created in the first change
//! ├─ status      map  entry id -> status entry       created in the first change
//! └─ acks        map  entry id -> acknowledgement    created in the first change
//! ```
//!
//! See `docs/model.md` for every entry's fields and who may write them.

mod reader;
mod records;

pub(crate) use reader::*;
pub(crate) use records::*;

/// The schema version written in every order's first change.
pub const SCHEMA_VERSION: u64 = 1;

/// Key names used in the document.
pub mod keys {
    /// Root: schema version.
    pub const SCHEMA: &str = "schema";
    /// Root: order id.
    pub const ID: &str = "id";
    /// Root: store id.
    pub const STORE: &str = "store";
    /// Root: currency.
    pub const CURRENCY: &str = "currency";
    /// Root and entries: creating device.
    pub const CREATED_BY: &str = "created_by";
    /// Root and entries: creation time.
    pub const CREATED_AT: &str = "created_at";
    /// Root: relay-assigned number.
    pub const NUMBER: &str = "number";
    /// Root: the lines map.
    pub const LINES: &str = "lines";
    /// Root: the payments map (the sale).
    pub const PAYMENTS: &str = "payments";
    /// Root: the status log.
    pub const STATUS: &str = "status";
    /// Root: acknowledgements of late edits.
    pub const ACKS: &str = "acks";
    /// Line: stock keeping unit.
    pub const SKU: &str = "sku";
    /// Line: display name.
    pub const NAME: &str = "name";
    /// Line: unit price in minor units.
    pub const UNIT_PRICE: &str = "unit_price";
    /// Line: quantity (a counter).
    pub const QTY: &str = "qty";
    /// Line: modifiers (a list of strings, fixed at creation).
    pub const MODIFIERS: &str = "modifiers";
    /// Line and acknowledgement: free text.
    pub const NOTE: &str = "note";
    /// Line: removal marker (device), write-once.
    pub const REMOVED_BY: &str = "removed_by";
    /// Line: removal marker (time), write-once.
    pub const REMOVED_AT: &str = "removed_at";
    /// Payment: kind of tender.
    pub const KIND: &str = "kind";
    /// Payment: amount in minor units.
    pub const AMOUNT: &str = "amount";
    /// Payment and transition: external reference.
    pub const REFERENCE: &str = "reference";
    /// Payment: its transitions log.
    pub const TRANSITIONS: &str = "transitions";
    /// Transition: the state entered.
    pub const STATE: &str = "state";
    /// Entries: writing device.
    pub const BY: &str = "by";
    /// Entries: writing time.
    pub const AT: &str = "at";
    /// Status entry: Lamport clock.
    pub const CLOCK: &str = "clock";
    /// Acknowledgement: the late edit acknowledged.
    pub const EDIT: &str = "edit";
}
