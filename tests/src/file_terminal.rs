//! A simulated card terminal whose ledger lives in a file, so it outlives the app process: a
//! test can kill the app (SIGKILL) after the terminal took the money and check, after a
//! restart, that reconciliation finds the charge and nothing is charged twice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crdt_model::{Currency, PaymentId};
use replicator::terminal::BoxFuture;
use replicator::{ChargeOutcome, PaymentTerminal, TerminalError};

/// What the terminal does on a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileMode {
    /// Approve and answer.
    Approve,
    /// Approve (the ledger records it), then never answer.
    ApproveThenHang,
}

/// A terminal with a JSON ledger file: payment id -> auth code of each approved charge.
#[derive(Debug)]
pub struct FileTerminal {
    path: PathBuf,
    mode: FileMode,
    lock: Mutex<()>,
}

impl FileTerminal {
    /// A terminal keeping its ledger at `path`.
    pub fn new(path: &Path, mode: FileMode) -> Self {
        Self {
            path: path.to_path_buf(),
            mode,
            lock: Mutex::new(()),
        }
    }

    /// The charges recorded in the ledger at `path`.
    pub fn ledger(path: &Path) -> BTreeMap<String, String> {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn record(&self, payment: PaymentId, auth: &str) -> std::io::Result<()> {
        let _g = self
            .lock
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let mut ledger = Self::ledger(&self.path);
        ledger.insert(payment.to_string(), auth.to_owned());
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&ledger)?)?;
        f.sync_all()?;
        std::fs::rename(tmp, &self.path)
    }
}

fn approved(auth: String) -> ChargeOutcome {
    ChargeOutcome::Approved {
        auth_code: auth,
        masked_card: "**** **** **** 4242".into(),
    }
}

impl PaymentTerminal for FileTerminal {
    fn charge(
        &self,
        payment: PaymentId,
        _amount: i64,
        _currency: Currency,
    ) -> BoxFuture<'_, Result<ChargeOutcome, TerminalError>> {
        Box::pin(async move {
            if let Some(auth) = Self::ledger(&self.path).get(&payment.to_string()) {
                return Ok(approved(auth.clone()));
            }
            let id = payment.to_string();
            let auth = format!("AUTH {}", &id[id.len() - 6..]);
            self.record(payment, &auth)
                .map_err(|e| TerminalError::Unavailable(e.to_string()))?;
            match self.mode {
                FileMode::Approve => Ok(approved(auth)),
                FileMode::ApproveThenHang => std::future::pending().await,
            }
        })
    }

    fn lookup(
        &self,
        payment: PaymentId,
    ) -> BoxFuture<'_, Result<Option<ChargeOutcome>, TerminalError>> {
        Box::pin(async move {
            Ok(Self::ledger(&self.path)
                .get(&payment.to_string())
                .cloned()
                .map(approved))
        })
    }
}
