//! The executor: replicas of one order, each step run on the real model (`crdt-model`).
//!
//! The same code records a vector (the generators call [`Sim`]'s helpers, which run each step
//! and note what it gave) and replays one ([`replay`]: every step again from the file alone,
//! each result and the final state compared with what the file says).

use std::collections::BTreeSet;

use anyhow::{Context, Result, anyhow, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use crdt_model::automerge::transaction::{CommitOptions, Transaction};
use crdt_model::automerge::{Automerge, AutomergeError, Change, ChangeHash, ReadDoc};
use crdt_model::{
    ActiveStatus, Author, Currency, DeviceId, FinalPayment, LineDraft, LineId, ModelError,
    NewOrder, Order, OrderId, OrderNumber, OrderStatus, PaymentDraft, PaymentId, PaymentKind,
    PaymentState, Role, SplitMix64, StoreId, Timestamp, Writer, validate_changes,
};

use super::format::{
    FORMAT, FinalArgs, LineArgs, Op, Outcome, PaymentArgs, ReplicaSpec, Step, StepResult, Vector,
    Verdict,
};
use super::json::{canonical, view_json};

/// The time every vector starts at (ms since the epoch, 2023-11-14).
pub const T0: i64 = 1_700_000_000_000;

/// The store every replica belongs to unless a vector says otherwise.
pub const STORE: &str = "store-1";

/// A replica's copy: raw bytes until it holds a readable order, then the order.
enum Slot {
    Raw(Box<Automerge>),
    Order(Box<Order>),
}

struct Rep {
    spec: ReplicaSpec,
    writer: Writer,
    author: Author,
    rng: SplitMix64,
    slot: Slot,
    /// The replica's clock for recorded steps (ms).
    now: i64,
}

impl Rep {
    fn new(spec: ReplicaSpec) -> Result<Self> {
        let device: DeviceId = spec.device.parse()?;
        let writer = Writer::new(device, spec.epoch);
        let role = match spec.role.as_str() {
            "device" => Role::Device,
            "relay" => Role::Relay,
            other => bail!("unknown role {other:?}"),
        };
        let author = Author {
            device,
            store: StoreId::new(spec.store.clone())?,
            role,
            seal: None,
            vouched: BTreeSet::new(),
        };
        Ok(Self {
            rng: SplitMix64::new(spec.seed),
            slot: Slot::Raw(Box::new(Automerge::new().with_actor(writer.actor.clone()))),
            writer,
            author,
            spec,
            now: T0,
        })
    }

    fn doc(&self) -> &Automerge {
        match &self.slot {
            Slot::Raw(d) => d,
            Slot::Order(o) => o.doc(),
        }
    }

    /// Takes a raw copy to an order once it reads as one.
    fn promote(&mut self) {
        let slot = std::mem::replace(&mut self.slot, Slot::Raw(Box::default()));
        self.slot = match slot {
            Slot::Raw(doc) => match Order::try_from_doc(*doc, self.writer.clone()) {
                Ok(o) => Slot::Order(Box::new(o)),
                Err(e) => Slot::Raw(Box::new(e.0)),
            },
            o => o,
        };
    }

    fn apply(&mut self, changes: Vec<Change>) -> Result<(), ModelError> {
        match &mut self.slot {
            Slot::Order(o) => o.apply_changes(changes),
            Slot::Raw(d) => {
                d.apply_changes(changes)?;
                self.promote();
                Ok(())
            }
        }
    }

    fn outcome(&self) -> Outcome {
        let doc = self.doc();
        let mut heads: Vec<String> = doc.get_heads().iter().map(ToString::to_string).collect();
        heads.sort();
        let view = match &self.slot {
            Slot::Order(o) => o.view().ok().map(|v| view_json(&v)),
            Slot::Raw(_) => None,
        };
        Outcome {
            replica: self.spec.name.clone(),
            heads,
            saved: B64.encode(doc.save()),
            view: view.unwrap_or(serde_json::Value::Null),
        }
    }
}

/// The kind of a local refusal, as vectors name it.
pub fn error_kind(e: &ModelError) -> &'static str {
    match e {
        ModelError::InvalidId { .. } => "invalid_id",
        ModelError::InvalidValue { .. } => "invalid_value",
        ModelError::UnknownCurrency(_) => "unknown_currency",
        ModelError::CurrencyMismatch { .. } => "currency_mismatch",
        ModelError::AmountOverflow => "amount_overflow",
        ModelError::InvalidAmount(_) => "invalid_amount",
        ModelError::CardNumber { .. } => "card_number",
        ModelError::OrderClosed { .. } => "order_closed",
        ModelError::LineNotFound(_) => "line_not_found",
        ModelError::LineRemoved(_) => "line_removed",
        ModelError::PaymentNotFound(_) => "payment_not_found",
        ModelError::InvalidTransition { .. } => "invalid_transition",
        ModelError::BalanceDue { .. } => "balance_due",
        ModelError::OutstandingPayments(_) => "outstanding_payments",
        ModelError::NumberAlreadyAssigned(_) => "number_already_assigned",
        ModelError::LateEditNotFound(_) => "late_edit_not_found",
        ModelError::NotAnOrder(_) => "not_an_order",
        ModelError::Load(_) | ModelError::Malformed { .. } => "malformed",
        ModelError::Automerge(_) => "automerge",
        ModelError::Policy(_) => "policy",
        _ => "other",
    }
}

fn line_draft(a: &LineArgs) -> LineDraft {
    LineDraft {
        sku: a.sku.clone(),
        name: a.name.clone(),
        unit_price: a.unit_price,
        quantity: a.quantity,
        modifiers: a.modifiers.clone(),
        note: a.note.clone(),
    }
}

fn payment_draft(a: &PaymentArgs) -> Result<PaymentDraft> {
    Ok(PaymentDraft {
        kind: a.kind.parse::<PaymentKind>()?,
        amount: a.amount,
        reference: a.reference.clone(),
    })
}

fn active(s: &str) -> Result<ActiveStatus> {
    Ok(match s.parse::<OrderStatus>()? {
        OrderStatus::InProgress => ActiveStatus::InProgress,
        OrderStatus::InDelivery => ActiveStatus::InDelivery,
        OrderStatus::Delayed => ActiveStatus::Delayed,
        other => bail!("{other} is not an active status"),
    })
}

/// Runs a typed operation: `Ok(Err(_))` is the model's refusal, `Err(_)` a bad vector.
fn typed(
    o: &mut Order,
    rng: &mut SplitMix64,
    at: Timestamp,
    op: &Op,
) -> Result<Result<Option<String>, ModelError>> {
    let none = |r: Result<(), ModelError>| r.map(|()| None);
    Ok(match op {
        Op::AddLine { line } => o
            .add_line(at, rng, line_draft(line))
            .map(|id| Some(id.to_string())),
        Op::ChangeQuantity { line, delta } => {
            none(o.change_quantity(at, line.parse::<LineId>()?, *delta))
        }
        Op::SetQuantity { line, quantity } => {
            none(o.set_quantity(at, line.parse::<LineId>()?, *quantity))
        }
        Op::SetUnitPrice { line, unit_price } => {
            none(o.set_unit_price(at, line.parse::<LineId>()?, *unit_price))
        }
        Op::SetNote { line, note } => none(o.set_note(at, line.parse::<LineId>()?, note)),
        Op::RemoveLine { line } => none(o.remove_line(at, line.parse::<LineId>()?)),
        Op::AddPayment { payment, state } => o
            .add_payment(
                at,
                rng,
                payment_draft(payment)?,
                state.parse::<PaymentState>()?,
            )
            .map(|id| Some(id.to_string())),
        Op::AdvancePayment {
            payment,
            to,
            reference,
        } => none(o.advance_payment(
            at,
            rng,
            payment.parse::<PaymentId>()?,
            to.parse::<PaymentState>()?,
            reference.as_deref(),
        )),
        Op::CompleteSale { last } => {
            let last = match last {
                None => None,
                Some(FinalArgs::New(p)) => Some(FinalPayment::New(payment_draft(p)?)),
                Some(FinalArgs::Capture(p)) => Some(FinalPayment::Capture(p.parse()?)),
            };
            o.complete_sale(at, rng, last)
                .map(|p| p.map(|id| id.to_string()))
        }
        Op::Delete => none(o.delete(at, rng)),
        Op::SetStatus { status } => none(o.set_status(at, rng, active(status)?)),
        Op::SetStatusAny { status } => none(o.set_status_any(at, rng, status.parse()?)),
        Op::AssignNumber { number } => o.assign_number(at, OrderNumber(*number)).map(|_| None),
        Op::Acknowledge { edit, note } => none(o.acknowledge_late_edit(at, rng, edit, note)),
        Op::Create { .. } | Op::Forge { .. } | Op::Deliver { .. } => {
            bail!("not a typed operation on an order")
        }
    })
}

/// Replicas of one order and the steps they took: records a vector, or replays one.
pub struct Sim {
    name: String,
    description: String,
    covers: Vec<String>,
    reps: Vec<Rep>,
    steps: Vec<Step>,
}

impl Sim {
    /// An empty scenario.
    pub fn new(name: &str, description: &str) -> Self {
        Self {
            name: name.to_owned(),
            description: description.to_owned(),
            covers: Vec::new(),
            reps: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// Notes what the vector covers (a tag of `docs/conformance.md`).
    pub fn cover(&mut self, tag: impl Into<String>) {
        let tag = tag.into();
        if !self.covers.contains(&tag) {
            self.covers.push(tag);
        }
    }

    /// Adds a replica; returns its index.
    pub fn add_replica(&mut self, spec: ReplicaSpec) -> Result<usize> {
        ensure!(
            self.reps.iter().all(|r| r.spec.name != spec.name),
            "two replicas named {}",
            spec.name
        );
        self.reps.push(Rep::new(spec)?);
        Ok(self.reps.len() - 1)
    }

    /// Adds a replica of `role` in `store` whose device id and entropy come from `seed`.
    pub fn replica_in(&mut self, name: &str, seed: u64, role: &str, store: &str) -> Result<usize> {
        let device = DeviceId::generate(
            Timestamp(T0),
            &mut SplitMix64::new(seed.wrapping_add(0x5EED)),
        );
        self.add_replica(ReplicaSpec {
            name: name.to_owned(),
            device: device.to_string(),
            epoch: 1,
            role: role.to_owned(),
            store: store.to_owned(),
            seed,
        })
    }

    /// A terminal of the default store.
    pub fn device(&mut self, name: &str, seed: u64) -> Result<usize> {
        self.replica_in(name, seed, "device", STORE)
    }

    /// A relay (its changes are judged with the relay's role).
    pub fn relay(&mut self, name: &str, seed: u64) -> Result<usize> {
        self.replica_in(name, seed, "relay", STORE)
    }

    /// The device id of replica `r`.
    pub fn device_of(&self, r: usize) -> String {
        self.reps[r].spec.device.clone()
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.reps
            .iter()
            .position(|r| r.spec.name == name)
            .ok_or_else(|| anyhow!("no replica {name:?}"))
    }

    /// The view of replica `r` now (for generators that pick what to do next).
    pub fn view(&self, r: usize) -> Option<crdt_model::OrderView> {
        match &self.reps[r].slot {
            Slot::Order(o) => o.view().ok(),
            Slot::Raw(_) => None,
        }
    }

    /// The document of replica `r` now.
    pub fn doc(&self, r: usize) -> &Automerge {
        self.reps[r].doc()
    }

    /// Runs one step on replica `r` and returns what it gave.
    fn run(&mut self, r: usize, at: Option<i64>, op: &Op) -> Result<StepResult> {
        let mut result = StepResult::default();
        match op {
            Op::Create { store, currency } => {
                let at = Timestamp(at.context("create needs a time")?);
                let rep = &mut self.reps[r];
                ensure!(
                    matches!(&rep.slot, Slot::Raw(d) if d.get_heads().is_empty()),
                    "create on a replica that holds a document"
                );
                let new = NewOrder {
                    id: OrderId::generate(at, &mut rep.rng),
                    store: StoreId::new(store.clone())?,
                    currency: Currency::new(currency)?,
                };
                let id = new.id.to_string();
                match Order::create(new, rep.writer.clone(), at, &mut rep.rng) {
                    Ok(o) => {
                        result.change = o.heads().first().map(ToString::to_string);
                        result.id = Some(id);
                        rep.slot = Slot::Order(Box::new(o));
                    }
                    Err(e) => result.error = Some(error_kind(&e).to_owned()),
                }
            }
            Op::Forge { change } => {
                let change = Change::from_bytes(B64.decode(change)?)?;
                result.change = Some(change.hash().to_string());
                let rep = &mut self.reps[r];
                match &mut rep.slot {
                    Slot::Order(o) => {
                        o.doc_mut().apply_changes([change])?;
                        // A forgery may leave no readable header; the document is kept as is.
                        let _ = o.refresh();
                    }
                    Slot::Raw(d) => {
                        d.apply_changes([change])?;
                        rep.promote();
                    }
                }
            }
            Op::Deliver {
                from,
                changes,
                judge,
            } => {
                let from = self.index(from)?;
                ensure!(from != r, "a replica delivers to itself");
                let sender = self.reps[from].doc();
                let batch = changes
                    .iter()
                    .map(|h| {
                        let hash: ChangeHash = h.parse()?;
                        sender
                            .get_change_by_hash(&hash)
                            .ok_or_else(|| anyhow!("the sender lacks change {h}"))
                    })
                    .collect::<Result<Vec<Change>>>()?;
                if *judge {
                    let author = self.reps[from].author.clone();
                    let before = self.reps[r].doc().clone();
                    let mut after = before.clone();
                    after.apply_changes(batch.clone())?;
                    let new = after.get_changes(&before.get_heads());
                    match validate_changes(&before, &after, &new, &author) {
                        Ok(n) => {
                            result.verdict = Some(Verdict::Accepted(n));
                            if let Err(e) = self.reps[r].apply(batch) {
                                bail!("an accepted batch did not apply: {e}");
                            }
                        }
                        Err(v) => result.verdict = Some(Verdict::Rejected(v.code().to_owned())),
                    }
                } else if let Err(e) = self.reps[r].apply(batch) {
                    result.error = Some(error_kind(&e).to_owned());
                }
            }
            typed_op => {
                let at = Timestamp(at.context("an operation needs a time")?);
                let rep = &mut self.reps[r];
                let Slot::Order(o) = &mut rep.slot else {
                    result.error = Some("no_order".to_owned());
                    return Ok(result);
                };
                let before = o.heads();
                match typed(o, &mut rep.rng, at, typed_op)? {
                    Ok(id) => {
                        result.id = id;
                        let made = o.doc().get_changes(&before);
                        ensure!(made.len() <= 1, "an operation made {} changes", made.len());
                        result.change = made.first().map(|c| c.hash().to_string());
                    }
                    Err(e) => {
                        ensure!(o.heads() == before, "a refused operation left a change");
                        result.error = Some(error_kind(&e).to_owned());
                    }
                }
            }
        }
        Ok(result)
    }

    /// Runs `op` on replica `r` at its next tick (deliveries take no time) and records it.
    pub fn step(&mut self, r: usize, op: Op) -> Result<StepResult> {
        let at = match op {
            Op::Deliver { .. } => None,
            _ => {
                self.reps[r].now += 1_000;
                Some(self.reps[r].now)
            }
        };
        let result = self.run(r, at, &op)?;
        self.steps.push(Step {
            replica: self.reps[r].spec.name.clone(),
            at,
            op,
            result: result.clone(),
        });
        Ok(result)
    }

    /// Runs a typed operation that must succeed; returns the id it created, if any.
    pub fn ok(&mut self, r: usize, op: Op) -> Result<Option<String>> {
        let res = self.step(r, op.clone())?;
        if let Some(e) = res.error {
            bail!(
                "{}: {op:?} on {} was refused: {e}",
                self.name,
                self.reps[r].spec.name
            );
        }
        Ok(res.id)
    }

    /// Runs a typed operation that must succeed and create an id.
    pub fn id(&mut self, r: usize, op: Op) -> Result<String> {
        self.ok(r, op)?
            .ok_or_else(|| anyhow!("the operation created no id"))
    }

    /// Replica `r` creates the order (store `store-1`, EUR); returns its id.
    pub fn create(&mut self, r: usize) -> Result<String> {
        self.id(
            r,
            Op::Create {
                store: STORE.to_owned(),
                currency: "EUR".to_owned(),
            },
        )
    }

    /// The changes `from` holds and `to` lacks, in `from`'s causal order.
    pub fn missing(&self, from: usize, to: usize) -> Vec<String> {
        self.doc(from)
            .get_changes(&self.doc(to).get_heads())
            .iter()
            .map(|c| c.hash().to_string())
            .filter(|h| {
                h.parse::<ChangeHash>()
                    .is_ok_and(|h| self.doc(to).get_change_by_hash(&h).is_none())
            })
            .collect()
    }

    /// Delivers explicit changes from `from` to `to`.
    pub fn deliver(
        &mut self,
        from: usize,
        to: usize,
        changes: Vec<String>,
        judge: bool,
    ) -> Result<StepResult> {
        let from = self.reps[from].spec.name.clone();
        self.step(
            to,
            Op::Deliver {
                from,
                changes,
                judge,
            },
        )
    }

    /// Delivers everything `from` has and `to` lacks (nothing recorded when that is nothing).
    pub fn send(&mut self, from: usize, to: usize) -> Result<()> {
        let changes = self.missing(from, to);
        if !changes.is_empty() {
            self.deliver(from, to, changes, false)?;
        }
        Ok(())
    }

    /// Both ways.
    pub fn sync(&mut self, a: usize, b: usize) -> Result<()> {
        self.send(a, b)?;
        self.send(b, a)
    }

    /// `from` pushes what `to` lacks and `to` judges it with the policy; returns the verdict.
    pub fn push(&mut self, from: usize, to: usize) -> Result<Verdict> {
        let changes = self.missing(from, to);
        self.deliver(from, to, changes, true)?
            .verdict
            .ok_or_else(|| anyhow!("a judged delivery gave no verdict"))
    }

    /// Replica `r` writes a raw change past the typed API (`f` on a copy of its document, with
    /// its own actor) and applies it to its document; returns the change's hash.
    pub fn forge(
        &mut self,
        r: usize,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<(), AutomergeError>,
    ) -> Result<String> {
        let at = self.reps[r].now + 1_000;
        let mut doc = self.reps[r].doc().clone();
        doc.set_actor(self.reps[r].writer.actor.clone());
        let hash = doc
            .transact_with(
                |_| CommitOptions::default().with_time(at.div_euclid(1_000)),
                f,
            )
            .map_err(|e| anyhow!("forging: {:?}", e.error))?
            .hash
            .context("the forgery wrote nothing")?;
        let change = doc
            .get_change_by_hash(&hash)
            .context("the forged change vanished")?;
        self.step(
            r,
            Op::Forge {
                change: B64.encode(change.raw_bytes()),
            },
        )?;
        Ok(hash.to_string())
    }

    /// The vector: every step and each replica's final state.
    pub fn finish(self) -> Result<Vector> {
        ensure!(!self.covers.is_empty(), "{}: no coverage tag", self.name);
        Ok(Vector {
            format: FORMAT.to_owned(),
            expected: self.reps.iter().map(Rep::outcome).collect(),
            name: self.name,
            description: self.description,
            covers: self.covers,
            replicas: self.reps.into_iter().map(|r| r.spec).collect(),
            steps: self.steps,
        })
    }
}

/// Replays `v` from its steps alone and checks every recorded result and the final state, then
/// loads each saved document on its own and checks the view read from it.
pub fn replay(v: &Vector) -> Result<()> {
    let mut sim = Sim::new(&v.name, &v.description);
    for spec in &v.replicas {
        sim.add_replica(spec.clone())?;
    }
    for (i, step) in v.steps.iter().enumerate() {
        let r = sim.index(&step.replica)?;
        let got = sim
            .run(r, step.at, &step.op)
            .with_context(|| format!("step {i}"))?;
        ensure!(
            got == step.result,
            "step {i} ({:?}) gave {got:?}, the vector says {:?}",
            step.op,
            step.result
        );
    }
    ensure!(
        v.expected.len() == sim.reps.len(),
        "expected states for {} replicas, the vector has {}",
        v.expected.len(),
        sim.reps.len()
    );
    for (rep, want) in sim.reps.iter().zip(&v.expected) {
        let got = rep.outcome();
        let who = &rep.spec.name;
        ensure!(
            got.replica == want.replica,
            "replica order differs at {who}"
        );
        ensure!(got.heads == want.heads, "{who}: heads differ");
        ensure!(got.saved == want.saved, "{who}: saved document differs");
        ensure!(
            canonical(&got.view) == canonical(&want.view),
            "{who}: view differs:\n got  {}\n want {}",
            canonical(&got.view),
            canonical(&want.view)
        );
        // The read side on its own: the saved bytes load to the same heads and view.
        let loaded = Order::load(&B64.decode(&want.saved)?, rep.writer.clone());
        match (&want.view, loaded.and_then(|o| Ok((o.heads(), o.view()?)))) {
            (serde_json::Value::Null, Err(_)) => {}
            (serde_json::Value::Null, Ok(_)) => bail!("{who}: the saved document reads"),
            (_, Err(e)) => bail!("{who}: the saved document does not read: {e}"),
            (view, Ok((heads, got))) => {
                let mut heads: Vec<String> = heads.iter().map(ToString::to_string).collect();
                heads.sort();
                ensure!(heads == want.heads, "{who}: loaded heads differ");
                ensure!(
                    canonical(&view_json(&got)) == canonical(view),
                    "{who}: the view read from the saved document differs"
                );
            }
        }
    }
    Ok(())
}
