//! The device's local store: the [`Store`] trait, its records, and [`MemoryStore`].
//!
//! Every method is one durable transaction: when it returns `Ok`, the data survives a crash
//! (`kill -9`, power loss). The redb implementation lives in `store/redb_store.rs` (feature
//! `runtime-tokio`); [`MemoryStore`] serves simulations and tests.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crdt_model::{DeviceId, OrderId, PaymentId, StoreId};
use serde::{Deserialize, Serialize};

use crate::core::Effect;
use crate::error::ReplicatorError;
use crate::status::LocalSyncStatus;

#[cfg(feature = "runtime-tokio")]
pub mod redb_store;

/// Who this device is, and where its relays are. Written once when the device is set up.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The provisioned device id.
    pub device: DeviceId,
    /// The device's store.
    pub store: StoreId,
    /// Actor epoch chosen when this local store was created (a reinstall gets a new one).
    pub epoch: u32,
    /// The preferred relay's WebSocket URL (`ws://host:port/v1/sync` or `wss://...`): the
    /// first one a freshly opened device tries.
    pub relay_url: String,
    /// Further relays serving the same data (they share one database), tried in this order
    /// after [`Self::relay_url`] when a relay is unreachable or its connection drops (see
    /// [`crate::Engine::relay_url`]). Empty for a device with one relay; identities stored
    /// before the field existed load with it empty.
    #[serde(default)]
    pub fallback_urls: Vec<String>,
    /// The device token (the same on every relay: they share the device records).
    pub token: String,
}

impl Identity {
    /// Every relay URL of this device, in the order they are tried: [`Self::relay_url`] first,
    /// then [`Self::fallback_urls`], each URL once (a repeated one keeps its first place).
    pub fn relay_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = Vec::with_capacity(1 + self.fallback_urls.len());
        for url in std::iter::once(&self.relay_url).chain(&self.fallback_urls) {
            if !urls.contains(url) {
                urls.push(url.clone());
            }
        }
        urls
    }

    /// Whether `other` is the same device identity: same device, store and actor epoch. The
    /// relay's address and the token may differ (the relay moved, the token was rotated).
    pub fn same_device(&self, other: &Identity) -> bool {
        self.device == other.device && self.store == other.store && self.epoch == other.epoch
    }
}

/// Why a store's identity cannot become `new`: it was set up for another device, store or
/// epoch.
fn identity_refused(existing: &Identity, new: &Identity) -> ReplicatorError {
    ReplicatorError::Invalid(format!(
        "this local store belongs to device {} of store {} (epoch {}), not device {} of store {} \
         (epoch {}); a new relay address or token is accepted, another device or store is not",
        existing.device, existing.store, existing.epoch, new.device, new.store, new.epoch
    ))
}

/// Why the relay refused an order's changes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// Stable reason code from the relay.
    pub code: String,
    /// Human-readable reason.
    pub message: String,
    /// Hashes of the refused changes.
    pub changes: Vec<[u8; 32]>,
}

/// Device-only bookkeeping for one order. Never sent to the relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// The local sync status.
    pub status: LocalSyncStatus,
    /// Heads of the last durable receipt from the relay.
    pub receipted: Vec<[u8; 32]>,
    /// Set while the order is Blocked.
    pub blocked: Option<Blocked>,
    /// Card payments sent to the terminal whose outcome is not recorded yet.
    pub charging: Vec<PaymentId>,
    /// When the order became closed and synced (ms), for the retention window.
    pub settled_at: Option<i64>,
    /// Last local change of this record (ms).
    pub updated_at: i64,
    /// The relay's latest voucher for this order whose heads the device holds (heads, tag):
    /// pushed after a restore so the other writers' changes the device delivers are accepted
    /// (`crdt_model::seal`).
    #[serde(default)]
    pub voucher: Option<(Vec<[u8; 32]>, [u8; 32])>,
}

impl OrderRecord {
    /// A record for an order just created or fetched.
    pub fn new(status: LocalSyncStatus, now_ms: i64) -> Self {
        Self {
            status,
            receipted: Vec::new(),
            blocked: None,
            charging: Vec::new(),
            settled_at: None,
            updated_at: now_ms,
            voucher: None,
        }
    }
}

/// One order as stored on the device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredOrder {
    /// The order id.
    pub order: OrderId,
    /// The last compacted `save()` (may be empty if only the tail exists).
    pub snapshot: Vec<u8>,
    /// Raw Automerge changes (or incremental saves) since the snapshot, in order.
    pub tail: Vec<Vec<u8>>,
    /// Device-only bookkeeping.
    pub record: OrderRecord,
}

/// A device's durable local store. Implementations must make each call one atomic, durable
/// transaction, and must never overwrite a file they cannot read.
pub trait Store: Send + Sync + 'static {
    /// The device identity, if the store was set up.
    fn identity(&self) -> Result<Option<Identity>, ReplicatorError>;
    /// Sets the identity. An identity of the same device ([`Identity::same_device`]) replaces
    /// the stored one (a new relay address or token); another device's is refused (`Invalid`).
    fn set_identity(&self, identity: &Identity) -> Result<(), ReplicatorError>;
    /// Every order on the device.
    fn load_orders(&self) -> Result<Vec<StoredOrder>, ReplicatorError>;
    /// Appends changes (raw bytes) to an order's tail and writes its record, in one transaction.
    /// Creates the order if it is new.
    fn append(
        &self,
        order: OrderId,
        changes: &[Vec<u8>],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError>;
    /// Writes only the record.
    fn put_record(&self, order: OrderId, record: &OrderRecord) -> Result<(), ReplicatorError>;
    /// Replaces snapshot and tail with `snapshot` (a full save), and writes the record.
    fn compact(
        &self,
        order: OrderId,
        snapshot: &[u8],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError>;
    /// Removes an order entirely (eviction after the retention window).
    fn remove(&self, order: OrderId) -> Result<(), ReplicatorError>;
    /// The last store-feed sequence processed.
    fn feed_seq(&self) -> Result<u64, ReplicatorError>;
    /// Records the last store-feed sequence processed.
    fn set_feed_seq(&self, seq: u64) -> Result<(), ReplicatorError>;
    /// The id of the relay data this device last synced with (`welcome`'s `data`), if any.
    fn relay_data(&self) -> Result<Option<String>, ReplicatorError>;
    /// Records the relay data id.
    fn set_relay_data(&self, data: &str) -> Result<(), ReplicatorError>;

    /// Performs the engine's storage effects in order; a record for an order that is gone is
    /// skipped (it was removed meanwhile). `durable` counts the effects from the start that are
    /// durable; on failure, those after it were not performed. The default performs each in
    /// its own transaction; a store that can should make the whole batch one atomic, durable
    /// transaction (and leave `durable` at 0 on failure).
    fn write_batch(&self, effects: &[Effect], durable: &mut usize) -> Result<(), ReplicatorError> {
        for effect in effects {
            match perform(self, effect) {
                Ok(()) | Err(ReplicatorError::UnknownOrder(_)) => *durable += 1,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// One storage effect through the store's single-effect calls.
fn perform<S: Store + ?Sized>(store: &S, effect: &Effect) -> Result<(), ReplicatorError> {
    match effect {
        Effect::Append {
            order,
            changes,
            record,
        } => store.append(*order, changes, record),
        Effect::Record { order, record } => store.put_record(*order, record),
        Effect::Compact {
            order,
            snapshot,
            record,
        } => store.compact(*order, snapshot, record),
        Effect::Remove { order } => store.remove(*order),
        Effect::FeedSeq(seq) => store.set_feed_seq(*seq),
        Effect::RelayData(data) => store.set_relay_data(data),
        Effect::Connect => Ok(()),
    }
}

#[derive(Default)]
struct MemoryInner {
    identity: Option<Identity>,
    orders: BTreeMap<OrderId, StoredOrder>,
    feed_seq: u64,
    relay_data: Option<String>,
}

/// A store in memory, for simulations and tests. Cloning the data out (`snapshot`) and back
/// (`from_snapshot`) simulates a crash and restart.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<MemoryInner>,
}

fn poisoned() -> ReplicatorError {
    ReplicatorError::Storage("memory store lock poisoned".into())
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every stored order (what would survive a crash).
    pub fn orders(&self) -> Result<Vec<StoredOrder>, ReplicatorError> {
        Ok(self
            .inner
            .lock()
            .map_err(|_| poisoned())?
            .orders
            .values()
            .cloned()
            .collect())
    }

    /// A copy holding exactly what this store has durably stored.
    pub fn crash_copy(&self) -> Result<Self, ReplicatorError> {
        let g = self.inner.lock().map_err(|_| poisoned())?;
        Ok(Self {
            inner: Mutex::new(MemoryInner {
                identity: g.identity.clone(),
                orders: g.orders.clone(),
                feed_seq: g.feed_seq,
                relay_data: g.relay_data.clone(),
            }),
        })
    }
}

impl Store for MemoryStore {
    fn identity(&self) -> Result<Option<Identity>, ReplicatorError> {
        Ok(self.inner.lock().map_err(|_| poisoned())?.identity.clone())
    }

    fn set_identity(&self, identity: &Identity) -> Result<(), ReplicatorError> {
        let mut g = self.inner.lock().map_err(|_| poisoned())?;
        match &g.identity {
            Some(existing) if !existing.same_device(identity) => {
                Err(identity_refused(existing, identity))
            }
            _ => {
                g.identity = Some(identity.clone());
                Ok(())
            }
        }
    }

    fn load_orders(&self) -> Result<Vec<StoredOrder>, ReplicatorError> {
        self.orders()
    }

    fn append(
        &self,
        order: OrderId,
        changes: &[Vec<u8>],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        let mut g = self.inner.lock().map_err(|_| poisoned())?;
        let entry = g.orders.entry(order).or_insert_with(|| StoredOrder {
            order,
            snapshot: Vec::new(),
            tail: Vec::new(),
            record: record.clone(),
        });
        entry.tail.extend(changes.iter().cloned());
        entry.record = record.clone();
        Ok(())
    }

    fn put_record(&self, order: OrderId, record: &OrderRecord) -> Result<(), ReplicatorError> {
        let mut g = self.inner.lock().map_err(|_| poisoned())?;
        match g.orders.get_mut(&order) {
            Some(o) => {
                o.record = record.clone();
                Ok(())
            }
            None => Err(ReplicatorError::UnknownOrder(order)),
        }
    }

    fn compact(
        &self,
        order: OrderId,
        snapshot: &[u8],
        record: &OrderRecord,
    ) -> Result<(), ReplicatorError> {
        let mut g = self.inner.lock().map_err(|_| poisoned())?;
        g.orders.insert(
            order,
            StoredOrder {
                order,
                snapshot: snapshot.to_vec(),
                tail: Vec::new(),
                record: record.clone(),
            },
        );
        Ok(())
    }

    fn remove(&self, order: OrderId) -> Result<(), ReplicatorError> {
        self.inner
            .lock()
            .map_err(|_| poisoned())?
            .orders
            .remove(&order);
        Ok(())
    }

    fn feed_seq(&self) -> Result<u64, ReplicatorError> {
        Ok(self.inner.lock().map_err(|_| poisoned())?.feed_seq)
    }

    fn set_feed_seq(&self, seq: u64) -> Result<(), ReplicatorError> {
        self.inner.lock().map_err(|_| poisoned())?.feed_seq = seq;
        Ok(())
    }

    fn relay_data(&self) -> Result<Option<String>, ReplicatorError> {
        Ok(self
            .inner
            .lock()
            .map_err(|_| poisoned())?
            .relay_data
            .clone())
    }

    fn set_relay_data(&self, data: &str) -> Result<(), ReplicatorError> {
        self.inner.lock().map_err(|_| poisoned())?.relay_data = Some(data.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An identity as this crate stored it before it knew of several relays.
    const BEFORE_FALLBACKS: &str = r#"{"device":"018bcfe5-73b8-76c9-9a3b-782b29572a06","store":"s1","epoch":3,"relay_url":"ws://relay.local:7400/v1/sync","token":"dev_1"}"#;

    #[test]
    fn an_identity_stored_without_fallback_urls_loads_with_none() {
        let id: Identity = serde_json::from_str(BEFORE_FALLBACKS).unwrap();
        assert_eq!(id.relay_url, "ws://relay.local:7400/v1/sync");
        assert!(id.fallback_urls.is_empty());
        assert_eq!(id.relay_urls(), ["ws://relay.local:7400/v1/sync"]);
        assert_eq!((id.epoch, id.token.as_str()), (3, "dev_1"));
        // Written again, it keeps the (empty) list, and loads back the same.
        let again: Identity = serde_json::from_slice(&serde_json::to_vec(&id).unwrap()).unwrap();
        assert_eq!(again, id);
    }

    #[test]
    fn relay_urls_put_the_preferred_first_and_name_each_once() {
        let mut id: Identity = serde_json::from_str(BEFORE_FALLBACKS).unwrap();
        id.fallback_urls = vec![
            "ws://b/v1/sync".into(),
            "ws://relay.local:7400/v1/sync".into(),
            "ws://c/v1/sync".into(),
            "ws://b/v1/sync".into(),
        ];
        assert_eq!(
            id.relay_urls(),
            [
                "ws://relay.local:7400/v1/sync",
                "ws://b/v1/sync",
                "ws://c/v1/sync"
            ]
        );
        // Other relays do not make another device.
        let mut moved = id.clone();
        moved.relay_url = "ws://c/v1/sync".into();
        moved.fallback_urls.clear();
        assert!(moved.same_device(&id));
    }
}
