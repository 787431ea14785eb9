//! Devices and access tokens in PostgreSQL, with the meaning of the redb store's
//! (`crate::store`): provisioning ([`PgStore::add_device`], [`PgStore::add_admin_token`]),
//! [`PgStore::authenticate`], [`PgStore::revoke_device`], [`PgStore::rotate_admin_token`] and
//! the listings. Tokens are made and checked by the same code as the redb store's; only their
//! SHA-256 reaches the database.

use crdt_model::{DeviceId, StoreId};
use tokio_postgres::Row;

use super::{PgStore, store_of};
use crate::error::RelayError;
use crate::store::{
    ADMIN_TOKEN_PREFIX, DEVICE_TOKEN_PREFIX, DeviceRecord, Principal, check_name, codec, new_token,
    token_hash,
};

const KIND_DEVICE: &str = "device";
const KIND_STORE_ADMIN: &str = "store_admin";
const KIND_ADMIN: &str = "admin";

fn device_from_row(row: &Row) -> Result<DeviceRecord, RelayError> {
    Ok(DeviceRecord {
        device: DeviceId(row.try_get(0)?),
        store: store_of(row.try_get(1)?)?,
        name: row.try_get(2)?,
        created_at: row.try_get(3)?,
        revoked: row.try_get(4)?,
    })
}

impl PgStore {
    /// Provisions a device of `store` and returns it with its token (`dev_` + 64 hex digits).
    /// Only the token's SHA-256 is stored: the token is shown this once.
    pub async fn add_device(
        &self,
        store: &StoreId,
        name: &str,
        now_ms: i64,
    ) -> Result<(DeviceRecord, String), RelayError> {
        check_name(name)?;
        let record = DeviceRecord {
            device: codec::random_device_id()?,
            store: store.clone(),
            name: name.to_owned(),
            created_at: now_ms,
            revoked: false,
        };
        let token = new_token(DEVICE_TOKEN_PREFIX)?;
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let inserted = txn
            .execute(
                &txn.prepare_cached(
                    "INSERT INTO devices (device_id, store, name, created_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                )
                .await?,
                &[&record.device.0, &store.as_str(), &name, &now_ms],
            )
            .await?;
        if inserted != 1 {
            txn.rollback().await?;
            return Err(RelayError::Internal("device id collision, retry".into()));
        }
        txn.execute(
            &txn.prepare_cached(
                "INSERT INTO tokens (hash, kind, device_id, name, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            )
            .await?,
            &[
                &token_hash(&token).as_slice(),
                &KIND_DEVICE,
                &record.device.0,
                &name,
                &now_ms,
            ],
        )
        .await?;
        txn.commit().await?;
        Ok((record, token))
    }

    /// Creates an admin token (`adm_` + 64 hex digits): for one store's back office with
    /// `Some(store)`, for the relay's operator with `None`. Only its SHA-256 is stored.
    pub async fn add_admin_token(
        &self,
        store: Option<&StoreId>,
        name: &str,
        now_ms: i64,
    ) -> Result<String, RelayError> {
        check_name(name)?;
        let token = new_token(ADMIN_TOKEN_PREFIX)?;
        let kind = if store.is_some() {
            KIND_STORE_ADMIN
        } else {
            KIND_ADMIN
        };
        let client = self.client().await?;
        client
            .execute(
                &client
                    .prepare_cached(
                        "INSERT INTO tokens (hash, kind, store, name, created_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                    )
                    .await?,
                &[
                    &token_hash(&token).as_slice(),
                    &kind,
                    &store.map(StoreId::as_str),
                    &name,
                    &now_ms,
                ],
            )
            .await?;
        Ok(token)
    }

    /// Replaces every operator admin token (not the store back-office ones) with a new one,
    /// in one transaction: the old tokens stop working at once. Returns the new token and how
    /// many were replaced.
    pub async fn rotate_admin_token(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<(String, usize), RelayError> {
        check_name(name)?;
        let token = new_token(ADMIN_TOKEN_PREFIX)?;
        let mut client = self.client().await?;
        let txn = client.transaction().await?;
        let replaced = txn
            .execute(
                &txn.prepare_cached("DELETE FROM tokens WHERE kind = $1")
                    .await?,
                &[&KIND_ADMIN],
            )
            .await?;
        txn.execute(
            &txn.prepare_cached(
                "INSERT INTO tokens (hash, kind, name, created_at) VALUES ($1, $2, $3, $4)",
            )
            .await?,
            &[&token_hash(&token).as_slice(), &KIND_ADMIN, &name, &now_ms],
        )
        .await?;
        txn.commit().await?;
        Ok((token, usize::try_from(replaced).unwrap_or(usize::MAX)))
    }

    /// `true` if any admin token (global or for a store) exists.
    pub async fn has_admin_token(&self) -> Result<bool, RelayError> {
        let client = self.client().await?;
        let row = client
            .query_one(
                &client
                    .prepare_cached("SELECT EXISTS (SELECT 1 FROM tokens WHERE kind <> $1)")
                    .await?,
                &[&KIND_DEVICE],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Who `token` belongs to. Unknown and malformed tokens give
    /// [`RelayError::Unauthorized`], a revoked device's token [`RelayError::Revoked`].
    pub async fn authenticate(&self, token: &str) -> Result<Principal, RelayError> {
        let (is_device, secret) = if let Some(rest) = token.strip_prefix(DEVICE_TOKEN_PREFIX) {
            (true, rest)
        } else if let Some(rest) = token.strip_prefix(ADMIN_TOKEN_PREFIX) {
            (false, rest)
        } else {
            return Err(RelayError::Unauthorized);
        };
        if !codec::is_lower_hex(secret, 64) {
            return Err(RelayError::Unauthorized);
        }
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT t.kind, t.store, d.device_id, d.store, d.revoked \
                 FROM tokens t LEFT JOIN devices d ON d.device_id = t.device_id \
                 WHERE t.hash = $1",
                    )
                    .await?,
                &[&token_hash(token).as_slice()],
            )
            .await?;
        let Some(row) = row else {
            return Err(RelayError::Unauthorized);
        };
        let kind: &str = row.try_get(0)?;
        match (is_device, kind) {
            (true, KIND_DEVICE) => {
                let device: Option<uuid::Uuid> = row.try_get(2)?;
                let store: Option<&str> = row.try_get(3)?;
                let revoked: Option<bool> = row.try_get(4)?;
                match (device, store, revoked) {
                    (Some(device), Some(store), Some(false)) => Ok(Principal::Device {
                        device: DeviceId(device),
                        store: store_of(store)?,
                    }),
                    (Some(_), Some(_), Some(true)) => Err(RelayError::Revoked),
                    _ => Err(RelayError::Unauthorized),
                }
            }
            (false, KIND_STORE_ADMIN) => {
                let store: Option<&str> = row.try_get(1)?;
                let store = store.ok_or_else(|| {
                    RelayError::Corrupt("a store admin token without a store".into())
                })?;
                Ok(Principal::StoreAdmin {
                    store: store_of(store)?,
                })
            }
            (false, KIND_ADMIN) => Ok(Principal::Admin),
            _ => Err(RelayError::Unauthorized),
        }
    }

    /// Revokes a device: its token stops authenticating. [`RelayError::NotFound`] if unknown;
    /// revoking twice is not an error.
    pub async fn revoke_device(&self, device: DeviceId) -> Result<(), RelayError> {
        let client = self.client().await?;
        let n = client
            .execute(
                &client
                    .prepare_cached("UPDATE devices SET revoked = true WHERE device_id = $1")
                    .await?,
                &[&device.0],
            )
            .await?;
        if n == 0 {
            return Err(RelayError::NotFound(format!("device {device}")));
        }
        Ok(())
    }

    /// Provisioned devices (revoked ones included), of one store or of all, oldest first.
    pub async fn list_devices(
        &self,
        store: Option<&StoreId>,
    ) -> Result<Vec<DeviceRecord>, RelayError> {
        let client = self.client().await?;
        let rows = client
            .query(
                &client
                    .prepare_cached(
                        "SELECT device_id, store, name, created_at, revoked FROM devices \
                 WHERE $1::text IS NULL OR store = $1 ORDER BY created_at, device_id",
                    )
                    .await?,
                &[&store.map(StoreId::as_str)],
            )
            .await?;
        rows.iter().map(device_from_row).collect()
    }

    /// One device's record, if provisioned.
    pub async fn device(&self, device: DeviceId) -> Result<Option<DeviceRecord>, RelayError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &client
                    .prepare_cached(
                        "SELECT device_id, store, name, created_at, revoked FROM devices \
                 WHERE device_id = $1",
                    )
                    .await?,
                &[&device.0],
            )
            .await?;
        row.as_ref().map(device_from_row).transpose()
    }
}
