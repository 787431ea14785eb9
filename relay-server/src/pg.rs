//! [`PgStore`]: the relay's records in PostgreSQL, for several relay processes sharing one
//! database (issue 15). Feature `postgres` (on by default).
//!
//! It keeps what [`RelayStore`](crate::store::RelayStore) keeps, with the same meaning, and
//! exchanges the same records ([`OrderWrite`], [`CommitOutcome`], [`OrderMeta`],
//! [`StoredOrder`], [`FeedRecord`]); the redb store's semantics are its specification. The hub
//! uses it through [`Backend`](crate::backend::Backend) (`relay-server serve --store
//! postgres://...`); every commit announces its stores' new feed heads on a `LISTEN/NOTIFY`
//! channel ([`PgStore::listen`], [`FeedNotice`]) that the other relays follow (`hub::shared`).
//!
//! # Driver
//! [`tokio_postgres`] with a [`deadpool_postgres`] pool. tokio-postgres is the tokio-native
//! driver the relay's runtime already is (no second runtime, no blocking thread), it pipelines
//! statements, and it has no compile-time query checking that would need a database at build
//! time (sqlx's macros do, or an offline cache kept in step with the schema). deadpool is a
//! small, maintained pool that recycles connections and takes a per-connection setup through
//! the connection's startup options, which is how every connection gets
//! `synchronous_commit=on` and its `search_path`.
//!
//! # Schema
//! Versioned migrations ([`schema`]) in `schema_migrations`, run by [`PgStore::connect`]
//! under an advisory lock, each in its own transaction. Tables: `relay_meta` (device id, seal
//! key, data id), `relay_instances` (one actor epoch per relay process), `stores` (the number
//! counter and feed head of each store: the row every commit of the store locks), `orders`
//! (metadata, snapshot, the `unnumbered` flag; `UNIQUE (store, feed_seq)`), `order_numbers`
//! (`PRIMARY KEY (store, number)`), `changes` (the tail, `PRIMARY KEY (order_id, hash)`,
//! `UNIQUE (order_id, pos)`), `devices`, `tokens` (SHA-256 of each token, never the token).
//!
//! # Concurrency between relays
//! A commit locks, in one order every relay follows, first the `stores` rows of the batch
//! (`SELECT ... ORDER BY store FOR UPDATE`), then its `orders` rows (`ORDER BY order_id FOR
//! UPDATE`), and checks each write's base heads against the locked rows. Two relays committing
//! one order therefore run one after the other, and the second sees the first's heads and
//! gets [`RelayError::Conflict`]. Numbers and feed positions come from the locked store row in
//! the same transaction, so they are unique (also enforced by the primary key of
//! `order_numbers` and `UNIQUE (store, feed_seq)`), gap-free, and a feed position becomes
//! visible only after every smaller one of its store.
//!
//! This module holds the type, the connection and the relay's identity; the operations are
//! split by concern: `orders` (commit, reads, feed), `devices` (devices and tokens).

mod devices;
mod orders;
pub mod schema;

use std::str::FromStr;

use crdt_model::{DeviceId, OrderNumber, OrderStatus, SealKey, StoreId, Writer};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use crate::error::RelayError;
pub use crate::records::{
    CommitOutcome, FeedRecord, OrderMeta, OrderWrite, StoredOrder, StoredTail,
};
use crate::store::{RelayIdentity, codec};

/// Keys of `relay_meta`.
const META_DEVICE: &str = "device";
const META_SEAL_KEY: &str = "seal_key";
const META_DATA_ID: &str = "data_id";

/// How to reach the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PgOptions {
    /// A libpq-style URL or key=value string (`postgres://user@host:5432/db`).
    pub url: String,
    /// Connections in the pool: the most statements in flight at once.
    pub pool_size: usize,
    /// The schema holding the relay's tables (created if missing), `None` for the server's
    /// default `search_path` (usually `public`). Lower-case letters, digits and `_`.
    pub schema: Option<String>,
}

impl PgOptions {
    /// `url` with `pool_size` connections and the default schema.
    pub fn new(url: impl Into<String>, pool_size: usize) -> Self {
        Self {
            url: url.into(),
            pool_size,
            schema: None,
        }
    }

    /// The same, in `schema`.
    #[must_use]
    pub fn in_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
}

/// `true` for a schema name we put into `search_path` and DDL without quoting.
fn is_plain_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && s.len() <= 63
}

/// The relay's records in PostgreSQL. See the [module docs](self).
pub struct PgStore {
    /// Connections, each with `synchronous_commit=on` and the schema's `search_path`.
    pool: Pool,
    /// The schema, if not the default (shown in `Debug`).
    schema: Option<String>,
    /// The relay device id shared by every relay of the database, with this process's own
    /// actor epoch (registered in `relay_instances`, so no two relays write as one actor).
    identity: RelayIdentity,
    /// The key sealing the relay's changes, shared by every relay of the database.
    seal: SealKey,
    /// The data's id, shared by every relay of the database.
    data_id: [u8; 16],
    /// How to connect (for the notification listener's own connection).
    config: tokio_postgres::Config,
    /// The `LISTEN`/`NOTIFY` channel commits are announced on ([`FEED_CHANNEL`], per schema).
    channel: String,
}

/// The channel a commit announces its stores' new feed positions on (`<seq> <store>`), with
/// `_<schema>` appended outside the default schema: channels are per database, schemas are
/// not.
pub const FEED_CHANNEL: &str = "relay_feed";

/// A connection listening to every relay's commits ([`PgStore::listen`]).
#[derive(Debug)]
pub struct FeedListener {
    /// Held so the connection stays open.
    _client: tokio_postgres::Client,
    rx: tokio::sync::mpsc::UnboundedReceiver<FeedNotice>,
}

impl FeedListener {
    /// The next announcement; `None` once the connection has ended.
    pub async fn recv(&mut self) -> Option<FeedNotice> {
        self.rx.recv().await
    }

    /// An announcement already received, if any (does not wait).
    pub fn try_recv(&mut self) -> Option<FeedNotice> {
        self.rx.try_recv().ok()
    }
}

/// One commit's announcement: a store's feed reached `seq`, and, when they fit in one
/// notification, the feed entries the commit added.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedNotice {
    /// The store.
    pub store: StoreId,
    /// Its new feed position.
    pub seq: u64,
    /// The entries the commit added, when they fit: the feed position before the commit
    /// and each written order's metadata (its new position is `meta.feed_seq`; positions
    /// between `since` and `seq` that no entry names were taken and given up again within
    /// the commit). A relay that has read the feed up to `since` needs no read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added: Option<(u64, Vec<OrderMeta>)>,
}

/// The largest `NOTIFY` payload sent with its entries (PostgreSQL refuses 8,000 bytes and
/// more); a longer one goes without them, and the listeners read the feed.
pub const NOTICE_MAX: usize = 7_900;

impl FeedNotice {
    /// The `NOTIFY` payload: `<seq> <store>`, or, with the entries, the notice as JSON when
    /// that fits in [`NOTICE_MAX`] bytes.
    pub fn payload(&self) -> String {
        if self.added.is_some()
            && let Ok(json) = serde_json::to_string(self)
            && json.len() <= NOTICE_MAX
        {
            return json;
        }
        format!("{} {}", self.seq, self.store)
    }

    /// Reads a payload; `None` if it is not one.
    pub fn parse(payload: &str) -> Option<Self> {
        if payload.starts_with('{') {
            return serde_json::from_str(payload).ok();
        }
        let (seq, store) = payload.split_once(' ')?;
        Some(Self {
            seq: seq.parse().ok()?,
            store: StoreId::new(store).ok()?,
            added: None,
        })
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` with a pool of `pool_size` connections, runs the migrations and
    /// registers this process's actor epoch: [`PgStore::connect_with`] in the default schema.
    pub async fn connect(url: &str, pool_size: usize) -> Result<Self, RelayError> {
        Self::connect_with(&PgOptions::new(url, pool_size)).await
    }

    /// Connects as `options` say, creates the schema if missing, runs the migrations
    /// ([`PgStore::migrate`]), makes the shared identity, seal key and data id on the first
    /// start of the database, and registers a fresh actor epoch for this process.
    pub async fn connect_with(options: &PgOptions) -> Result<Self, RelayError> {
        let mut config = tokio_postgres::Config::from_str(&options.url)
            .map_err(|e| RelayError::Invalid(format!("PostgreSQL URL: {e}")))?;
        if options.pool_size == 0 {
            return Err(RelayError::Invalid(
                "the pool needs at least one connection".into(),
            ));
        }
        // Every connection: durable commits whatever the role or database default says, and
        // the relay's schema first in the search path.
        let mut startup = config.get_options().unwrap_or_default().to_owned();
        startup.push_str(" -c synchronous_commit=on");
        if let Some(schema) = &options.schema {
            if !is_plain_identifier(schema) {
                return Err(RelayError::Invalid(format!(
                    "schema {schema:?}: use lower-case letters, digits and _"
                )));
            }
            startup.push_str(&format!(" -c search_path={schema}"));
        }
        config.options(startup.trim_start());
        let channel = match &options.schema {
            Some(schema) => format!("{FEED_CHANNEL}_{schema}"),
            None => FEED_CHANNEL.to_owned(),
        };
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .build()
            .map_err(|e| RelayError::Internal(format!("PostgreSQL pool: {e}")))?;
        schema::migrate(&pool, options.schema.as_deref()).await?;
        let (device, seal, data_id) = init_meta(&pool).await?;
        let epoch = register_epoch(&pool).await?;
        let identity = RelayIdentity { device, epoch };
        tracing::info!(
            schema = options.schema.as_deref().unwrap_or("(default)"),
            relay = %identity.device,
            epoch,
            "PostgreSQL store ready"
        );
        Ok(Self {
            pool,
            schema: options.schema.clone(),
            identity,
            seal,
            data_id,
            config,
            channel,
        })
    }

    /// The `LISTEN`/`NOTIFY` channel of this store's commits.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// Opens a connection of its own (outside the pool) that listens to the commits of every
    /// relay of the database: each commit's [`FeedNotice`]s arrive on the returned receiver,
    /// in commit order. The receiver ends when the connection does (the caller then reads
    /// the feed from the database to catch up, and listens again).
    pub async fn listen(&self) -> Result<FeedListener, RelayError> {
        use futures_util::StreamExt as _;
        let (client, mut connection) = self.config.connect(NoTls).await?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let channel = self.channel.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(n)) if n.channel() == channel => {
                        match FeedNotice::parse(n.payload()) {
                            Some(notice) => {
                                if tx.send(notice).is_err() {
                                    break;
                                }
                            }
                            None => tracing::warn!(
                                payload = n.payload(),
                                "unreadable feed notification"
                            ),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the notification connection failed");
                        break;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN {}", self.channel))
            .await?;
        Ok(FeedListener {
            _client: client,
            rx,
        })
    }

    /// Every store's feed head (the store rows): what a relay compares with what it has
    /// read, to catch up on notifications it missed.
    pub async fn feed_heads(&self) -> Result<Vec<(StoreId, u64)>, RelayError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached("SELECT store, feed_head FROM stores")
                    .await?,
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    store_of(r.try_get(0)?)?,
                    to_u64(r.try_get(1)?, "feed head")?,
                ))
            })
            .collect()
    }

    /// Runs the migrations this build knows that the database lacks (idempotent; also run by
    /// [`PgStore::connect`]). A database migrated by a newer build is refused with
    /// [`RelayError::Corrupt`].
    pub async fn migrate(&self) -> Result<u32, RelayError> {
        schema::migrate(&self.pool, self.schema.as_deref()).await
    }

    /// The relay's identity: the database's relay device id and this process's epoch.
    pub fn identity(&self) -> RelayIdentity {
        self.identity
    }

    /// The key the relays of this database seal their own changes with.
    pub fn seal_key(&self) -> SealKey {
        self.seal.clone()
    }

    /// The writer this relay commits its own changes as: its identity, sealing.
    pub fn relay_writer(&self) -> Writer {
        self.identity.writer().with_seal(self.seal.clone())
    }

    /// The data's id (32 hex digits), made on the database's first start.
    pub fn data_id(&self) -> String {
        codec::hex(&self.data_id)
    }

    /// The pool, for tests and tools that need raw access.
    #[doc(hidden)]
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, RelayError> {
        Ok(self.pool.get().await?)
    }
}

/// Makes (first start of the database) or reads the shared device id, seal key and data id.
/// Several relays starting at once agree: the first insert wins, the others read it.
async fn init_meta(pool: &Pool) -> Result<(DeviceId, SealKey, [u8; 16]), RelayError> {
    let client = pool.get().await?;
    let device = codec::random_device_id()?;
    let fresh: [(&str, Vec<u8>); 3] = [
        (META_DEVICE, device.as_bytes().to_vec()),
        (META_SEAL_KEY, codec::random_bytes::<32>()?.to_vec()),
        (META_DATA_ID, codec::random_bytes::<16>()?.to_vec()),
    ];
    let insert = client
        .prepare("INSERT INTO relay_meta (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING")
        .await?;
    for (key, value) in &fresh {
        client.execute(&insert, &[key, value]).await?;
    }
    let rows = client
        .query(
            "SELECT key, value FROM relay_meta WHERE key = ANY($1)",
            &[&vec![META_DEVICE, META_SEAL_KEY, META_DATA_ID]],
        )
        .await?;
    let get = |key: &str| -> Result<Vec<u8>, RelayError> {
        rows.iter()
            .find(|r| r.get::<_, &str>(0) == key)
            .map(|r| r.get::<_, Vec<u8>>(1))
            .ok_or_else(|| RelayError::Corrupt(format!("relay_meta: {key} is missing")))
    };
    let device = <[u8; 16]>::try_from(get(META_DEVICE)?.as_slice())
        .map_err(|_| RelayError::Corrupt("relay_meta: the device id is not 16 bytes".into()))
        .and_then(|b| codec::device_id(&b))?;
    let seal = <[u8; 32]>::try_from(get(META_SEAL_KEY)?.as_slice())
        .map_err(|_| RelayError::Corrupt("relay_meta: the seal key is not 32 bytes".into()))?;
    let data_id = <[u8; 16]>::try_from(get(META_DATA_ID)?.as_slice())
        .map_err(|_| RelayError::Corrupt("relay_meta: the data id is not 16 bytes".into()))?;
    Ok((device, SealKey::from_bytes(seal), data_id))
}

/// A random actor epoch no other relay process of this database used, recorded.
async fn register_epoch(pool: &Pool) -> Result<u32, RelayError> {
    let client = pool.get().await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    for _ in 0..16 {
        let epoch = u32::from_be_bytes(codec::random_bytes::<4>()?);
        let inserted = client
            .execute(
                "INSERT INTO relay_instances (epoch, started_at) VALUES ($1, $2) \
                 ON CONFLICT DO NOTHING",
                &[&i64::from(epoch), &now],
            )
            .await?;
        if inserted == 1 {
            return Ok(epoch);
        }
    }
    Err(RelayError::Internal(
        "no unused actor epoch found in 16 tries".into(),
    ))
}

/// `v` as a PostgreSQL `bigint`.
fn to_i64(v: u64, what: &str) -> Result<i64, RelayError> {
    i64::try_from(v).map_err(|_| RelayError::Internal(format!("{what} {v} exceeds bigint")))
}

/// A stored `bigint` that must not be negative.
fn to_u64(v: i64, what: &str) -> Result<u64, RelayError> {
    u64::try_from(v).map_err(|_| RelayError::Corrupt(format!("stored {what} {v} is negative")))
}

/// A `usize` limit as a SQL `LIMIT` (larger than any table: no limit).
fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

/// Heads as stored: the 32-byte hashes concatenated.
fn encode_heads(heads: &[[u8; 32]]) -> Vec<u8> {
    heads.concat()
}

fn decode_heads(b: &[u8]) -> Result<Vec<[u8; 32]>, RelayError> {
    let chunks = b.chunks_exact(32);
    if !chunks.remainder().is_empty() {
        return Err(RelayError::Corrupt(format!(
            "stored heads of {} bytes are not 32-byte hashes",
            b.len()
        )));
    }
    Ok(chunks
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            h
        })
        .collect())
}

fn status_of(s: &str) -> Result<OrderStatus, RelayError> {
    OrderStatus::from_str(s).map_err(|_| RelayError::Corrupt(format!("stored status {s:?}")))
}

fn store_of(s: &str) -> Result<StoreId, RelayError> {
    StoreId::new(s).map_err(|e| RelayError::Corrupt(format!("stored store id {s:?}: {e}")))
}

fn number_of(v: i64) -> Result<OrderNumber, RelayError> {
    Ok(OrderNumber(to_u64(v, "order number")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        assert!(is_plain_identifier("relay_test_1"));
        assert!(is_plain_identifier("_x"));
        assert!(!is_plain_identifier(""));
        assert!(!is_plain_identifier("1x"));
        assert!(!is_plain_identifier("Relay"));
        assert!(!is_plain_identifier("a b"));
        assert!(!is_plain_identifier("a;drop"));
        assert!(!is_plain_identifier(&"a".repeat(64)));
    }

    #[test]
    fn heads_round_trip_and_bad_lengths_are_corrupt() {
        let heads = vec![[1u8; 32], [2u8; 32]];
        assert_eq!(decode_heads(&encode_heads(&heads)).unwrap(), heads);
        assert!(decode_heads(&[]).unwrap().is_empty());
        assert!(matches!(
            decode_heads(&[0; 33]),
            Err(RelayError::Corrupt(_))
        ));
    }

    fn meta(n: u8, seq: u64) -> OrderMeta {
        OrderMeta {
            order: crdt_model::OrderId(uuid::Uuid::from_bytes([n; 16])),
            store: StoreId::new("s1").unwrap(),
            number: OrderNumber(u64::from(n)),
            status: OrderStatus::InProgress,
            heads: vec![[n; 32]],
            created_at: 1,
            updated_at: 2,
            feed_seq: seq,
            tail_len: 3,
        }
    }

    #[test]
    fn notices_carry_their_entries_when_they_fit_and_the_short_form_otherwise() {
        let short = FeedNotice {
            store: StoreId::new("s1").unwrap(),
            seq: 12,
            added: None,
        };
        assert_eq!(short.payload(), "12 s1");
        assert_eq!(FeedNotice::parse("12 s1"), Some(short.clone()));

        let full = FeedNotice {
            added: Some((10, vec![meta(1, 11), meta(2, 12)])),
            ..short.clone()
        };
        let payload = full.payload();
        assert!(payload.starts_with('{') && payload.len() <= NOTICE_MAX);
        assert_eq!(FeedNotice::parse(&payload), Some(full));

        // Too many entries for one notification: only the position goes, the listeners read.
        let many = FeedNotice {
            added: Some((0, (1..=60).map(|i| meta(i, u64::from(i))).collect())),
            ..short.clone()
        };
        assert_eq!(many.payload(), "12 s1");

        for junk in ["", "x", "12", "{", "{\"store\":\"s1\"}", "12 bad store!"] {
            assert_eq!(FeedNotice::parse(junk), None, "{junk:?}");
        }
    }
}
