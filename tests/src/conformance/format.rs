//! The vector format `pos-conformance/1`, as written to JSON (`docs/conformance.md`).

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The format tag every vector carries.
pub const FORMAT: &str = "pos-conformance/1";

/// One scenario: replicas, their steps in global order, and what each replica ends with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vector {
    /// Always [`FORMAT`].
    pub format: String,
    /// Unique name; also the file's path under `tests/conformance/vectors` without `.json`.
    pub name: String,
    /// What the scenario shows.
    pub description: String,
    /// Tags naming what the vector covers (`story:…`, `law:…`, `late_edit:…`, `conflict:…`,
    /// `code:…`, `generated`).
    pub covers: Vec<String>,
    /// The replicas (terminals and relays).
    pub replicas: Vec<ReplicaSpec>,
    /// Every step, in the order they happened.
    pub steps: Vec<Step>,
    /// What every replica holds at the end, in the order of `replicas`.
    pub expected: Vec<Outcome>,
}

/// A replica: one terminal or one relay, with its own copy of the order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaSpec {
    /// Name used by steps.
    pub name: String,
    /// Device id (UUID); the Automerge actor is its 16 bytes followed by `epoch` (4 bytes, big
    /// endian).
    pub device: String,
    /// Actor epoch.
    pub epoch: u32,
    /// `device` or `relay`: the role the policy judges its changes with.
    pub role: String,
    /// The store the replica is provisioned in (the policy's author store).
    pub store: String,
    /// Seed of the replica's entropy (SplitMix64) for the ids its operations create.
    pub seed: u64,
}

/// One step: an operation by `replica`, or a delivery to it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// The replica acting (for a delivery: the receiver).
    pub replica: String,
    /// Time of the operation, ms since the epoch (absent on deliveries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<i64>,
    /// What happened.
    pub op: Op,
    /// What it gave.
    pub result: StepResult,
}

/// A line as drafted by `add_line`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineArgs {
    /// Stock keeping unit.
    pub sku: String,
    /// Name.
    pub name: String,
    /// Unit price, minor units.
    pub unit_price: i64,
    /// Quantity.
    pub quantity: i64,
    /// Modifiers.
    pub modifiers: Vec<String>,
    /// Note.
    pub note: String,
}

/// A payment as drafted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentArgs {
    /// Kind name (`cash`, `card_terminal`, `check`, `gift_card` or another kind name).
    pub kind: String,
    /// Amount, minor units.
    pub amount: i64,
    /// Reference (masked).
    pub reference: String,
}

/// The last payment of `complete_sale`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum FinalArgs {
    /// A new payment, recorded captured.
    New(PaymentArgs),
    /// The capture of an existing payment, by id.
    Capture(String),
}

/// The operations (`type`), with their arguments.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// `Order::create`.
    Create {
        /// Store of the new order.
        store: String,
        /// Currency of the new order.
        currency: String,
    },
    /// `Order::add_line`.
    AddLine {
        /// The line.
        line: LineArgs,
    },
    /// `Order::change_quantity`.
    ChangeQuantity {
        /// Line id.
        line: String,
        /// Difference.
        delta: i64,
    },
    /// `Order::set_quantity`.
    SetQuantity {
        /// Line id.
        line: String,
        /// New quantity.
        quantity: i64,
    },
    /// `Order::set_unit_price`.
    SetUnitPrice {
        /// Line id.
        line: String,
        /// New price, minor units.
        unit_price: i64,
    },
    /// `Order::set_note`.
    SetNote {
        /// Line id.
        line: String,
        /// New note.
        note: String,
    },
    /// `Order::remove_line`.
    RemoveLine {
        /// Line id.
        line: String,
    },
    /// `Order::add_payment`.
    AddPayment {
        /// The payment.
        payment: PaymentArgs,
        /// Initial state.
        state: String,
    },
    /// `Order::advance_payment`.
    AdvancePayment {
        /// Payment id.
        payment: String,
        /// Target state.
        to: String,
        /// Reference learnt at this step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
    },
    /// `Order::complete_sale`.
    CompleteSale {
        /// The last payment, if any.
        #[serde(default, rename = "final", skip_serializing_if = "Option::is_none")]
        last: Option<FinalArgs>,
    },
    /// `Order::delete`.
    Delete,
    /// `Order::set_status` (an active status).
    SetStatus {
        /// Status name.
        status: String,
    },
    /// `Order::set_status_any` (the back office through the relay).
    SetStatusAny {
        /// Status name.
        status: String,
    },
    /// `Order::assign_number` (the relay).
    AssignNumber {
        /// The number.
        number: u64,
    },
    /// `Order::acknowledge_late_edit`.
    Acknowledge {
        /// Late edit id.
        edit: String,
        /// Manager's note.
        note: String,
    },
    /// A raw change written past the typed API (base64 of the change's bytes), applied to the
    /// replica's own document.
    Forge {
        /// The change, base64.
        change: String,
    },
    /// Changes from `from` reach the step's replica, as one batch in this order (duplicates and
    /// changes it already holds are no-ops; changes whose dependencies are missing wait).
    Deliver {
        /// The sending replica.
        from: String,
        /// Change hashes (hex), taken from the sender's document.
        changes: Vec<String>,
        /// Whether the receiver judges the batch with the policy, `from` as the author.
        #[serde(default, skip_serializing_if = "is_false")]
        judge: bool,
    },
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The policy's verdict on a judged delivery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Verdict {
    /// Accepted: the number of new changes judged (and applied).
    Accepted(usize),
    /// Refused with this code; nothing was applied.
    Rejected(String),
}

/// What a step gave.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepResult {
    /// The id the operation created (order, line or payment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Hash of the change the operation made (absent when it made none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<String>,
    /// The model refused the operation locally (it made no change): the error's kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The policy's verdict on a judged delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// What one replica holds at the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outcome {
    /// The replica.
    pub replica: String,
    /// Its heads (hex), sorted.
    pub heads: Vec<String>,
    /// Its document, `save()`d, base64.
    pub saved: String,
    /// The view derived from it (canonical JSON schema of `docs/conformance.md`), or null when
    /// the replica holds no readable order.
    pub view: Value,
}
