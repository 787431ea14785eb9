//! Payment terminals: the [`PaymentTerminal`] trait the replicator charges cards through, and
//! [`SimTerminal`], a simulated terminal with configurable behaviour for tests and demos.
//!
//! A charge is keyed by the payment id, and real terminal APIs offer the same guarantee this
//! trait asks for: charging the same payment id twice never takes money twice, and `lookup`
//! tells what happened to a charge whose answer was lost.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use crdt_model::{Currency, PaymentId};

/// What the terminal says about a charge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChargeOutcome {
    /// Money taken.
    Approved {
        /// Authorisation code.
        auth_code: String,
        /// Masked card number (`**** 1234`), never the full number.
        masked_card: String,
    },
    /// Refused by the issuer; nothing taken.
    Declined {
        /// The reason shown to the cashier.
        reason: String,
    },
}

/// Why a terminal call did not give an outcome. The charge may or may not have happened:
/// reconcile with [`PaymentTerminal::lookup`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TerminalError {
    /// No answer in time.
    Timeout,
    /// The terminal is unreachable or crashed.
    Unavailable(String),
}

impl std::fmt::Display for TerminalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("terminal timed out"),
            Self::Unavailable(s) => write!(f, "terminal unavailable: {s}"),
        }
    }
}

/// A boxed future, so the trait stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A card payment terminal.
pub trait PaymentTerminal: Send + Sync + 'static {
    /// Charges `amount` minor units for `payment`. Idempotent per payment id.
    fn charge(
        &self,
        payment: PaymentId,
        amount: i64,
        currency: Currency,
    ) -> BoxFuture<'_, Result<ChargeOutcome, TerminalError>>;
    /// What happened to the charge of `payment`; `Ok(None)` if the terminal never took it.
    fn lookup(
        &self,
        payment: PaymentId,
    ) -> BoxFuture<'_, Result<Option<ChargeOutcome>, TerminalError>>;
}

/// How the simulated terminal behaves on the next charges.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimMode {
    /// Approve every charge.
    Approve,
    /// Decline every charge.
    Decline,
    /// Take nothing and answer `Timeout`.
    Timeout,
    /// Take the money, then never answer (the app is killed meanwhile in tests).
    ApproveThenHang,
    /// Take the money, then answer `Timeout` (the answer is lost).
    ApproveThenTimeout,
}

/// A simulated payment terminal that records every charge it took.
#[derive(Debug)]
pub struct SimTerminal {
    mode: Mutex<SimMode>,
    charges: Mutex<HashMap<PaymentId, ChargeOutcome>>,
    calls: Mutex<u64>,
}

impl SimTerminal {
    /// A terminal in `mode`.
    pub fn new(mode: SimMode) -> Self {
        Self {
            mode: Mutex::new(mode),
            charges: Mutex::new(HashMap::new()),
            calls: Mutex::new(0),
        }
    }

    /// Changes the behaviour for the next charges.
    pub fn set_mode(&self, mode: SimMode) {
        if let Ok(mut m) = self.mode.lock() {
            *m = mode;
        }
    }

    /// How many distinct payments were charged (money taken).
    pub fn charged(&self) -> usize {
        self.charges
            .lock()
            .map(|c| {
                c.values()
                    .filter(|o| matches!(o, ChargeOutcome::Approved { .. }))
                    .count()
            })
            .unwrap_or(0)
    }

    /// How many charge calls were made.
    pub fn calls(&self) -> u64 {
        self.calls.lock().map(|c| *c).unwrap_or(0)
    }

    fn approve(payment: PaymentId) -> ChargeOutcome {
        let tail = payment.to_string();
        ChargeOutcome::Approved {
            auth_code: format!("AUTH {}", &tail[tail.len() - 6..]),
            masked_card: "**** **** **** 4242".into(),
        }
    }
}

impl PaymentTerminal for SimTerminal {
    fn charge(
        &self,
        payment: PaymentId,
        _amount: i64,
        _currency: Currency,
    ) -> BoxFuture<'_, Result<ChargeOutcome, TerminalError>> {
        Box::pin(async move {
            if let Ok(mut c) = self.calls.lock() {
                *c += 1;
            }
            // Idempotent: a payment already charged gets the recorded outcome, never a new charge.
            if let Some(known) = self
                .charges
                .lock()
                .ok()
                .and_then(|c| c.get(&payment).cloned())
            {
                return Ok(known);
            }
            let mode = self
                .mode
                .lock()
                .map(|m| m.clone())
                .unwrap_or(SimMode::Timeout);
            let outcome = match mode {
                SimMode::Approve | SimMode::ApproveThenHang | SimMode::ApproveThenTimeout => {
                    Self::approve(payment)
                }
                SimMode::Decline => ChargeOutcome::Declined {
                    reason: "insufficient funds".into(),
                },
                SimMode::Timeout => return Err(TerminalError::Timeout),
            };
            if let Ok(mut c) = self.charges.lock() {
                c.insert(payment, outcome.clone());
            }
            match mode {
                SimMode::ApproveThenHang => std::future::pending().await,
                SimMode::ApproveThenTimeout => Err(TerminalError::Timeout),
                _ => Ok(outcome),
            }
        })
    }

    fn lookup(
        &self,
        payment: PaymentId,
    ) -> BoxFuture<'_, Result<Option<ChargeOutcome>, TerminalError>> {
        Box::pin(async move {
            Ok(self
                .charges
                .lock()
                .ok()
                .and_then(|c| c.get(&payment).cloned()))
        })
    }
}
