//! Devices and access tokens: provisioning ([`RelayStore::add_device`],
//! [`RelayStore::add_admin_token`]), [`RelayStore::authenticate`], [`RelayStore::revoke_device`]
//! and the device listings. Only a token's SHA-256 is stored; the token itself is shown once.

use crdt_model::{DeviceId, StoreId};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::codec;
use super::tables::{DEVICES, TOKENS};
use super::{
    ADMIN_TOKEN_PREFIX, DEVICE_TOKEN_PREFIX, DeviceRecord, MAX_NAME_LEN, Principal, RelayStore,
    set_immediate,
};
use crate::error::RelayError;

/// What a stored token grants (JSON in [`TOKENS`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Grant {
    Device { device: DeviceId },
    StoreAdmin { store: StoreId },
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct TokenRecord {
    grant: Grant,
    name: String,
    created_at: i64,
}

pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

pub(crate) fn new_token(prefix: &str) -> Result<String, RelayError> {
    let bytes = codec::random_bytes::<32>()?;
    Ok(format!("{prefix}{}", codec::hex(&bytes)))
}

pub(crate) fn check_name(name: &str) -> Result<(), RelayError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(RelayError::Invalid(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes of printable text"
        )));
    }
    Ok(())
}
impl RelayStore {
    /// Provisions a device of `store` and returns it with its token (`dev_` + 64 hex digits).
    /// Only the token's SHA-256 is stored: the token is shown this once.
    pub fn add_device(
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
        let grant = TokenRecord {
            grant: Grant::Device {
                device: record.device,
            },
            name: name.to_owned(),
            created_at: now_ms,
        };
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        {
            let mut devices = txn.open_table(DEVICES)?;
            let key = *record.device.as_bytes();
            if devices.get(key)?.is_some() {
                return Err(RelayError::Internal("device id collision, retry".into()));
            }
            devices.insert(key, codec::to_json(&record)?.as_slice())?;
            txn.open_table(TOKENS)?
                .insert(token_hash(&token), codec::to_json(&grant)?.as_slice())?;
        }
        txn.commit()?;
        Ok((record, token))
    }

    /// Creates an admin token (`adm_` + 64 hex digits): for one store's back office with
    /// `Some(store)`, for the relay's operator with `None`. Only its SHA-256 is stored.
    pub fn add_admin_token(
        &self,
        store: Option<&StoreId>,
        name: &str,
        now_ms: i64,
    ) -> Result<String, RelayError> {
        check_name(name)?;
        let token = new_token(ADMIN_TOKEN_PREFIX)?;
        let grant = TokenRecord {
            grant: match store {
                Some(s) => Grant::StoreAdmin { store: s.clone() },
                None => Grant::Admin,
            },
            name: name.to_owned(),
            created_at: now_ms,
        };
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        txn.open_table(TOKENS)?
            .insert(token_hash(&token), codec::to_json(&grant)?.as_slice())?;
        txn.commit()?;
        Ok(token)
    }

    /// Replaces every operator admin token (not the store back-office ones) with a new one,
    /// in one transaction: the old tokens stop working at once. Returns the new token and how
    /// many were replaced.
    pub fn rotate_admin_token(
        &self,
        name: &str,
        now_ms: i64,
    ) -> Result<(String, usize), RelayError> {
        check_name(name)?;
        let token = new_token(ADMIN_TOKEN_PREFIX)?;
        let grant = TokenRecord {
            grant: Grant::Admin,
            name: name.to_owned(),
            created_at: now_ms,
        };
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        let replaced = {
            let mut tokens = txn.open_table(TOKENS)?;
            let mut old = Vec::new();
            for entry in tokens.iter()? {
                let (k, v) = entry?;
                let record: TokenRecord = codec::from_json("token record", v.value())?;
                if matches!(record.grant, Grant::Admin) {
                    old.push(k.value());
                }
            }
            for k in &old {
                tokens.remove(k)?;
            }
            tokens.insert(token_hash(&token), codec::to_json(&grant)?.as_slice())?;
            old.len()
        };
        txn.commit()?;
        Ok((token, replaced))
    }

    /// `true` if any admin token (global or for a store) exists.
    pub fn has_admin_token(&self) -> Result<bool, RelayError> {
        let txn = self.read()?;
        let tokens = txn.open_table(TOKENS)?;
        for entry in tokens.iter()? {
            let (_, v) = entry?;
            let record: TokenRecord = codec::from_json("token record", v.value())?;
            if !matches!(record.grant, Grant::Device { .. }) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Who `token` belongs to. Unknown and malformed tokens give
    /// [`RelayError::Unauthorized`], a revoked device's token [`RelayError::Revoked`].
    pub fn authenticate(&self, token: &str) -> Result<Principal, RelayError> {
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
        let txn = self.read()?;
        let tokens = txn.open_table(TOKENS)?;
        let Some(record) = tokens
            .get(token_hash(token))?
            .map(|g| codec::from_json::<TokenRecord>("token record", g.value()))
            .transpose()?
        else {
            return Err(RelayError::Unauthorized);
        };
        match (is_device, record.grant) {
            (true, Grant::Device { device }) => {
                let devices = txn.open_table(DEVICES)?;
                let rec = devices
                    .get(*device.as_bytes())?
                    .map(|g| codec::from_json::<DeviceRecord>("device record", g.value()))
                    .transpose()?;
                match rec {
                    Some(rec) if !rec.revoked => Ok(Principal::Device {
                        device: rec.device,
                        store: rec.store,
                    }),
                    Some(_) => Err(RelayError::Revoked),
                    None => Err(RelayError::Unauthorized),
                }
            }
            (false, Grant::StoreAdmin { store }) => Ok(Principal::StoreAdmin { store }),
            (false, Grant::Admin) => Ok(Principal::Admin),
            _ => Err(RelayError::Unauthorized),
        }
    }

    /// Revokes a device: its token stops authenticating. [`RelayError::NotFound`] if unknown;
    /// revoking twice is not an error.
    pub fn revoke_device(&self, device: DeviceId) -> Result<(), RelayError> {
        let mut txn = self.db.begin_write()?;
        set_immediate(&mut txn)?;
        {
            let mut devices = txn.open_table(DEVICES)?;
            let key = *device.as_bytes();
            let rec = devices
                .get(key)?
                .map(|g| codec::from_json::<DeviceRecord>("device record", g.value()))
                .transpose()?;
            let Some(mut rec) = rec else {
                return Err(RelayError::NotFound(format!("device {device}")));
            };
            rec.revoked = true;
            devices.insert(key, codec::to_json(&rec)?.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Provisioned devices (revoked ones included), of one store or of all, oldest first.
    pub fn list_devices(&self, store: Option<&StoreId>) -> Result<Vec<DeviceRecord>, RelayError> {
        let txn = self.read()?;
        let devices = txn.open_table(DEVICES)?;
        let mut out = Vec::new();
        for entry in devices.iter()? {
            let (_, v) = entry?;
            let rec: DeviceRecord = codec::from_json("device record", v.value())?;
            if store.is_none_or(|s| *s == rec.store) {
                out.push(rec);
            }
        }
        out.sort_by_key(|d| (d.created_at, d.device));
        Ok(out)
    }

    /// One device's record, if provisioned.
    pub fn device(&self, device: DeviceId) -> Result<Option<DeviceRecord>, RelayError> {
        let txn = self.read()?;
        let devices = txn.open_table(DEVICES)?;
        let rec = devices
            .get(*device.as_bytes())?
            .map(|g| codec::from_json("device record", g.value()))
            .transpose()?;
        Ok(rec)
    }
}
