//! The redb tables of the relay store, defined in one place, with their key encodings.
//!
//! | table | key | value |
//! |---|---|---|
//! | [`META`] | `&str` name | bytes: `format` = u32 BE [`FORMAT_VERSION`], `identity` = 16-byte device id + u32 BE epoch |
//! | [`ORDERS`] | order id, 16 bytes | [`OrderMeta`](super::OrderMeta), compact binary (`codec`) |
//! | [`SNAPSHOTS`] | order id | the last compacted Automerge `save()` (empty until the first compaction) |
//! | [`TAIL`] | (order id, index u32) | one raw Automerge change appended after the snapshot |
//! | [`FEED`] | (store, feed seq u64) | order id: the order's latest feed entry |
//! | [`NUMBERS`] | (store, order number u64) | order id: the number index |
//! | [`STORES`] | store | (last assigned order number, feed head) |
//! | [`DEVICES`] | device id, 16 bytes | [`DeviceRecord`](super::DeviceRecord) as JSON |
//! | [`TOKENS`] | sha256 of the token, 32 bytes | the grant (device / store admin / admin) as JSON |
//!
//! Tuple keys sort component by component, so a range over `(store, ..)` or `(order, ..)` reads
//! exactly one store's or one order's entries, in order.

use redb::TableDefinition;

/// The database file inside the relay's data directory.
pub const DB_FILE: &str = "relay.redb";

/// The on-disk format this build reads and writes. Any other value is refused as corrupt.
pub const FORMAT_VERSION: u32 = 1;

/// Key in [`META`] of the format version.
pub const META_FORMAT: &str = "format";
/// Key in [`META`] of the relay's identity.
pub const META_IDENTITY: &str = "identity";
/// Key in [`META`] of the key sealing the relay's own changes (32 bytes, made on first open;
/// backups carry it, see `crdt_model::seal`).
pub const META_SEAL_KEY: &str = "seal_key";
/// Key in [`META`] of the data's id (16 random bytes): made on first open and again by every
/// restore, so devices can tell a relay whose data went back in time.
pub const META_DATA_ID: &str = "data_id";
/// Key in [`META`] present only in a backup file (the time it was taken, ms, 8 bytes): `serve`
/// refuses such a file until `restore` has made it relay data again.
pub const META_BACKUP: &str = "backup";

/// Store-wide values: format version and identity.
pub const META: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("meta");
/// Order id -> encoded order metadata.
pub const ORDERS: TableDefinition<'static, [u8; 16], &[u8]> = TableDefinition::new("orders");
/// Order id -> compacted Automerge document (possibly empty).
pub const SNAPSHOTS: TableDefinition<'static, [u8; 16], &[u8]> = TableDefinition::new("snapshots");
/// (order id, index) -> raw Automerge change bytes, appended after the snapshot.
pub const TAIL: TableDefinition<'static, ([u8; 16], u32), &[u8]> = TableDefinition::new("tail");
/// (store, feed seq) -> order id; one entry per order (its latest).
pub const FEED: TableDefinition<'static, (&str, u64), [u8; 16]> = TableDefinition::new("feed");
/// (store, order number) -> order id.
pub const NUMBERS: TableDefinition<'static, (&str, u64), [u8; 16]> =
    TableDefinition::new("numbers");
/// Store -> (last assigned order number, feed head).
pub const STORES: TableDefinition<'static, &str, (u64, u64)> = TableDefinition::new("stores");
/// Device id -> JSON device record.
pub const DEVICES: TableDefinition<'static, [u8; 16], &[u8]> = TableDefinition::new("devices");
/// sha256(token) -> JSON token grant. The token itself is never stored.
pub const TOKENS: TableDefinition<'static, [u8; 32], &[u8]> = TableDefinition::new("tokens");

/// Orders stored with a number their document does not carry yet (the relay's number change
/// is not durable): the relay writes those numbers at start. Absent in older files: empty.
pub const UNNUMBERED: TableDefinition<'static, [u8; 16], ()> = TableDefinition::new("unnumbered");

/// Store -> JSON recovery record of the last restore (devices not heard from since, the
/// numbers the restore reserved). Absent in older files and for stores never restored.
pub const RECOVERY: TableDefinition<'static, &str, &[u8]> = TableDefinition::new("recovery");

/// Names of every table above, to tell our database from a foreign redb file.
pub const ALL_TABLES: [&str; 9] = [
    "meta",
    "orders",
    "snapshots",
    "tail",
    "feed",
    "numbers",
    "stores",
    "devices",
    "tokens",
];
