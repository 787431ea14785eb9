//! `crdt-model`: POS orders and their payments as Automerge documents.
//!
//! One order is one Automerge document ([`Order`]). It holds the header (id, store, currency,
//! creator), the relay-assigned [`OrderNumber`], line items, the sale's payment transactions, a
//! status log and late-edit acknowledgements. The crate is pure: no I/O, no clock, no OS
//! randomness. Times ([`Timestamp`]) and randomness ([`Entropy`]) are arguments.
//!
//! The rules that make merges safe:
//! * **The status lattice is ours** ([`status`]): status changes are write-once log entries and
//!   the effective status is their join; Done and Deleted win over any concurrent active status,
//!   Done beats Deleted.
//! * **Payments are append-only** ([`payment`]): each state transition is its own entry and the
//!   effective state the highest; nothing deletes a payment. Totals are derived ([`view`]).
//! * **Containers are created once**, in the order's first change; entries go under fresh ids.
//! * **Late edits are kept and surfaced** ([`view`]): edits concurrent with the close are listed,
//!   not counted, identically on every replica.
//! * **The policy** ([`policy`]) judges incoming changes with their author's identity and view.
//!
//! ```
//! use crdt_model::*;
//!
//! let mut rng = SplitMix64::new(1);
//! let at = Timestamp(1_700_000_000_000);
//! let device = DeviceId::generate(at, &mut rng);
//! let new = NewOrder {
//!     id: OrderId::generate(at, &mut rng),
//!     store: StoreId::new("store-1")?,
//!     currency: Currency::new("EUR")?,
//! };
//! let mut order = Order::create(new, Writer::new(device, 1), at, &mut rng)?;
//! let line = LineDraft { name: "Espresso".into(), unit_price: 250, quantity: 2, ..Default::default() };
//! order.add_line(at, &mut rng, line)?;
//! let cash = PaymentDraft { kind: PaymentKind::Cash, amount: 500, reference: String::new() };
//! order.complete_sale(at, &mut rng, Some(FinalPayment::New(cash)))?;
//! let view = order.view()?;
//! assert_eq!(view.status, OrderStatus::Done);
//! assert_eq!(view.totals.balance_due, 0);
//! # Ok::<(), ModelError>(())
//! ```

pub mod audit;
pub mod error;
pub mod guard;
pub mod ids;
pub mod money;
pub mod order;
pub mod payment;
pub mod policy;
pub mod schema;
pub mod seal;
pub mod status;
pub mod text;
pub mod view;
pub mod wire;

pub use audit::{AuditEntry, audit_trail};
pub use error::{ModelError, PolicyViolation};
pub use ids::{
    DeviceId, Entropy, EntryId, LineId, OrderId, OrderNumber, PaymentId, SplitMix64, StoreId,
    Timestamp,
};
pub use money::{Currency, Money};
pub use order::{
    CloseRelation, FinalPayment, LineDraft, NewOrder, Order, PaymentDraft, Writer, device_of_actor,
    id_of, number_of, status_of, store_of, view_of,
};
pub use payment::{PaymentKind, PaymentState};
pub use policy::{Author, OrderFacts, Role, validate, validate_changes, validate_changes_with};
pub use seal::{RelaySeal, SealKey};
pub use status::{ActiveStatus, OrderStatus, StatusEntry, StatusLattice};
pub use text::{TextField, check_free_text, check_text_at, holds_card_number};
pub use view::{Conflict, LateEdit, LateEditKind, LineView, OrderView, PaymentView, Totals};

/// The Automerge crate this model is built on, re-exported so callers use the same version.
pub use automerge;
