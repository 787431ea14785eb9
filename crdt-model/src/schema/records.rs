//! The order's records as the reader parses them: header, containers, status entries, lines,
//! payments with their transitions, acknowledgements, and the whole-order snapshot.

use std::collections::BTreeMap;

use automerge::{ObjId, ObjType, ROOT};

use crate::error::ModelError;
use crate::ids::{DeviceId, EntryId, LineId, OrderId, OrderNumber, PaymentId, StoreId, Timestamp};
use crate::money::Currency;
use crate::payment::{PaymentKind, PaymentState};
use crate::status::{StatusEntry, StatusLattice};

use super::reader::*;
use super::{SCHEMA_VERSION, keys};

/// The relay-assigned number, if any.
pub(crate) fn read_number(r: &Reader<'_>) -> Result<Option<OrderNumber>, ModelError> {
    Ok(r.opt_uint(&ROOT, keys::NUMBER, "")?.map(OrderNumber))
}

/// Object ids of the root containers.
#[derive(Clone, Debug)]
pub(crate) struct Roots {
    pub(crate) lines: ObjId,
    pub(crate) payments: ObjId,
    pub(crate) status: ObjId,
    pub(crate) acks: ObjId,
}

impl Roots {
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        Self::from_fields(&r.fields(&ROOT, ""))
    }

    pub(crate) fn from_fields(f: &Fields<'_, '_>) -> Result<Self, ModelError> {
        Ok(Self {
            lines: f.container(keys::LINES, ObjType::Map)?,
            payments: f.container(keys::PAYMENTS, ObjType::Map)?,
            status: f.container(keys::STATUS, ObjType::Map)?,
            acks: f.container(keys::ACKS, ObjType::Map)?,
        })
    }
}

/// The immutable header of an order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub(crate) id: OrderId,
    pub(crate) store: StoreId,
    pub(crate) currency: Currency,
    pub(crate) created_by: DeviceId,
    pub(crate) created_at: Timestamp,
}

impl Header {
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        Self::from_fields(&r.fields(&ROOT, ""))
    }

    pub(crate) fn from_fields(f: &Fields<'_, '_>) -> Result<Self, ModelError> {
        let schema = f.uint(keys::SCHEMA)?;
        if schema != SCHEMA_VERSION {
            return Err(ModelError::NotAnOrder(format!(
                "unsupported schema version {schema}"
            )));
        }
        let currency = f.str(keys::CURRENCY)?;
        Ok(Self {
            id: f.parse(keys::ID)?,
            store: f.parse(keys::STORE)?,
            currency: Currency::new(&currency)
                .map_err(|e| ModelError::NotAnOrder(format!("currency: {e}")))?,
            created_by: f.parse(keys::CREATED_BY)?,
            created_at: f.ts(keys::CREATED_AT)?,
        })
    }
}

/// One status log entry with its metadata.
#[derive(Clone, Debug)]
pub(crate) struct StatusRec {
    pub(crate) entry: StatusEntry,
    pub(crate) at: Timestamp,
    pub(crate) by: DeviceId,
    pub(crate) obj: ObjId,
}

/// One status entry, by key.
pub(crate) fn read_status_entry(
    r: &Reader<'_>,
    status: &ObjId,
    key: &str,
) -> Result<StatusRec, ModelError> {
    let obj = r.container(status, key, ObjType::Map, &format!("status.{key}"))?;
    status_from(r, key, obj)
}

fn status_from(r: &Reader<'_>, key: &str, obj: ObjId) -> Result<StatusRec, ModelError> {
    let path = format!("status.{key}");
    let id: EntryId = parse(key, &path)?;
    let f = r.fields(&obj, &path);
    Ok(StatusRec {
        entry: StatusEntry {
            status: f.parse(keys::STATUS)?,
            clock: f.uint(keys::CLOCK)?,
            id,
        },
        at: f.ts(keys::AT)?,
        by: f.parse(keys::BY)?,
        obj,
    })
}

/// One acknowledgement, by key.
pub(crate) fn read_ack(r: &Reader<'_>, acks: &ObjId, key: &str) -> Result<AckRec, ModelError> {
    let o = r.container(acks, key, ObjType::Map, &format!("acks.{key}"))?;
    ack_from(r, key, &o)
}

fn ack_from(r: &Reader<'_>, key: &str, obj: &ObjId) -> Result<AckRec, ModelError> {
    let path = format!("acks.{key}");
    let _: EntryId = parse(key, &path)?;
    let f = r.fields(obj, &path);
    f.ts(keys::AT)?;
    f.str(keys::NOTE)?;
    Ok(AckRec {
        edit: f.str(keys::EDIT)?,
        by: f.parse(keys::BY)?,
    })
}

pub(crate) fn read_status_log(
    r: &Reader<'_>,
    status: &ObjId,
) -> Result<Vec<StatusRec>, ModelError> {
    let log = r.fields(status, "status");
    log.keys()
        .map(|k| status_from(r, k, log.container(k, ObjType::Map)?))
        .collect()
}

pub(crate) fn lattice(log: &[StatusRec]) -> StatusLattice {
    StatusLattice::from_entries(log.iter().map(|r| r.entry))
}

/// One line item.
#[derive(Clone, Debug)]
pub(crate) struct LineRec {
    pub(crate) sku: String,
    pub(crate) name: String,
    pub(crate) unit_price: i64,
    pub(crate) qty: i64,
    pub(crate) modifiers: Vec<String>,
    pub(crate) note: String,
    pub(crate) added_by: DeviceId,
    pub(crate) added_at: Timestamp,
    pub(crate) removed: Option<(DeviceId, Timestamp)>,
    /// Fields written concurrently by several replicas (`unit_price`, `note`).
    pub(crate) conflicted: Vec<&'static str>,
    pub(crate) obj: ObjId,
}

pub(crate) fn read_line(r: &Reader<'_>, lines: &ObjId, key: &str) -> Result<LineRec, ModelError> {
    let path = format!("lines.{key}");
    let obj = r.container(lines, key, ObjType::Map, &path)?;
    line_from(r, obj, &path)
}

fn line_from(r: &Reader<'_>, obj: ObjId, path: &str) -> Result<LineRec, ModelError> {
    let f = r.fields(&obj, path);
    let modifiers_obj = f.container(keys::MODIFIERS, ObjType::List)?;
    let removed = match (f.opt_str(keys::REMOVED_BY)?, f.opt_ts(keys::REMOVED_AT)?) {
        (Some(by), Some(at)) => Some((parse(&by, path)?, at)),
        (None, None) => None,
        _ => return Err(bad(path, "removed_by and removed_at together")),
    };
    let unit_price = f.int(keys::UNIT_PRICE)?;
    if unit_price < 0 {
        return Err(bad(&format!("{path}.unit_price"), "a non-negative amount"));
    }
    let conflicted = [keys::UNIT_PRICE, keys::NOTE]
        .into_iter()
        .filter(|k| f.conflicted(k))
        .collect();
    Ok(LineRec {
        sku: f.str(keys::SKU)?,
        name: f.str(keys::NAME)?,
        unit_price,
        qty: f.counter(keys::QTY)?,
        modifiers: r.list_strings(&modifiers_obj, &format!("{path}.modifiers"))?,
        note: f.str(keys::NOTE)?,
        added_by: f.parse(keys::CREATED_BY)?,
        added_at: f.ts(keys::CREATED_AT)?,
        removed,
        conflicted,
        obj,
    })
}

pub(crate) fn read_lines(
    r: &Reader<'_>,
    lines: &ObjId,
) -> Result<BTreeMap<LineId, LineRec>, ModelError> {
    let all = r.fields(lines, "lines");
    all.keys()
        .map(|k| {
            let path = format!("lines.{k}");
            let obj = all.container(k, ObjType::Map)?;
            Ok((parse(k, &path)?, line_from(r, obj, &path)?))
        })
        .collect()
}

/// One transition of a payment.
#[derive(Clone, Debug)]
pub(crate) struct TransitionRec {
    pub(crate) state: PaymentState,
    pub(crate) at: Timestamp,
    pub(crate) by: DeviceId,
    pub(crate) reference: Option<String>,
}

/// One payment transaction.
#[derive(Clone, Debug)]
pub(crate) struct PaymentRec {
    pub(crate) kind: PaymentKind,
    pub(crate) amount: i64,
    pub(crate) currency: Currency,
    pub(crate) reference: String,
    pub(crate) created_by: DeviceId,
    pub(crate) created_at: Timestamp,
    pub(crate) transitions: BTreeMap<EntryId, TransitionRec>,
}

impl PaymentRec {
    /// The effective state: the join of all transitions.
    pub(crate) fn state(&self) -> PaymentState {
        self.transitions
            .values()
            .map(|t| t.state)
            .fold(PaymentState::Pending, PaymentState::join)
    }

    /// Whether a capture and a void were recorded concurrently.
    pub(crate) fn captured_and_voided(&self) -> bool {
        let has = |s| self.transitions.values().any(|t| t.state == s);
        has(PaymentState::Voided) && (has(PaymentState::Captured) || has(PaymentState::Refunded))
    }

    /// The latest reference: from the highest-ranked transition that carries one, else the
    /// one given at creation.
    pub(crate) fn latest_reference(&self) -> String {
        let mut ts: Vec<&TransitionRec> = self.transitions.values().collect();
        ts.sort_by_key(|t| t.state);
        ts.iter()
            .rev()
            .find_map(|t| t.reference.clone())
            .unwrap_or_else(|| self.reference.clone())
    }
}

pub(crate) fn read_payment(
    r: &Reader<'_>,
    payments: &ObjId,
    key: &str,
    order_currency: Currency,
) -> Result<PaymentRec, ModelError> {
    let path = format!("payments.{key}");
    let obj = r.container(payments, key, ObjType::Map, &path)?;
    payment_from(r, &obj, &path, order_currency)
}

fn payment_from(
    r: &Reader<'_>,
    obj: &ObjId,
    path: &str,
    order_currency: Currency,
) -> Result<PaymentRec, ModelError> {
    let f = r.fields(obj, path);
    let amount = f.int(keys::AMOUNT)?;
    if amount <= 0 {
        return Err(bad(&format!("{path}.amount"), "a positive amount"));
    }
    let currency = Currency::new(&f.str(keys::CURRENCY)?)
        .map_err(|e| ModelError::NotAnOrder(format!("{path}.currency: {e}")))?;
    if currency != order_currency {
        return Err(bad(&format!("{path}.currency"), "the order's currency"));
    }
    let tpath = format!("{path}.transitions");
    let tobj = f.container(keys::TRANSITIONS, ObjType::Map)?;
    let tf = r.fields(&tobj, &tpath);
    let transitions = tf
        .keys()
        .map(|k| {
            let p = format!("{tpath}.{k}");
            let id: EntryId = parse(k, &p)?;
            let o = tf.container(k, ObjType::Map)?;
            let t = r.fields(&o, &p);
            Ok((
                id,
                TransitionRec {
                    state: t.parse(keys::STATE)?,
                    at: t.ts(keys::AT)?,
                    by: t.parse(keys::BY)?,
                    reference: t.opt_str(keys::REFERENCE)?,
                },
            ))
        })
        .collect::<Result<BTreeMap<_, _>, ModelError>>()?;
    if transitions.is_empty() {
        return Err(bad(&tpath, "at least one transition"));
    }
    Ok(PaymentRec {
        kind: f.parse(keys::KIND)?,
        amount,
        currency,
        reference: f.str(keys::REFERENCE)?,
        created_by: f.parse(keys::CREATED_BY)?,
        created_at: f.ts(keys::CREATED_AT)?,
        transitions,
    })
}

pub(crate) fn read_payments(
    r: &Reader<'_>,
    payments: &ObjId,
    currency: Currency,
) -> Result<BTreeMap<PaymentId, PaymentRec>, ModelError> {
    let all = r.fields(payments, "payments");
    all.keys()
        .map(|k| {
            let path = format!("payments.{k}");
            let obj = all.container(k, ObjType::Map)?;
            Ok((parse(k, &path)?, payment_from(r, &obj, &path, currency)?))
        })
        .collect()
}

/// A manager's acknowledgement of a late edit.
#[derive(Clone, Debug)]
pub(crate) struct AckRec {
    pub(crate) edit: String,
    pub(crate) by: DeviceId,
}

pub(crate) fn read_acks(
    r: &Reader<'_>,
    acks: &ObjId,
) -> Result<BTreeMap<EntryId, AckRec>, ModelError> {
    let all = r.fields(acks, "acks");
    all.keys()
        .map(|k| {
            Ok((
                parse(k, &format!("acks.{k}"))?,
                ack_from(r, k, &all.container(k, ObjType::Map)?)?,
            ))
        })
        .collect()
}

/// Everything in an order document, parsed and type-checked.
#[derive(Clone, Debug)]
pub(crate) struct Snapshot {
    pub(crate) header: Header,
    pub(crate) roots: Roots,
    pub(crate) number: Option<OrderNumber>,
    pub(crate) lines: BTreeMap<LineId, LineRec>,
    pub(crate) payments: BTreeMap<PaymentId, PaymentRec>,
    pub(crate) status: Vec<StatusRec>,
    pub(crate) acks: BTreeMap<EntryId, AckRec>,
}

impl Snapshot {
    /// Parses the whole order, reading the document in one pass ([`DocIndex`]).
    pub(crate) fn read(r: &Reader<'_>) -> Result<Self, ModelError> {
        if r.index.is_some() {
            return Self::parse(r);
        }
        let index = DocIndex::read(r.doc, r.heads);
        Self::parse(&index.reader(r.doc, r.heads))
    }

    /// Parses the whole order through `r` (from its index if it has one, else one range query
    /// per object).
    fn parse(r: &Reader<'_>) -> Result<Self, ModelError> {
        let root = r.fields(&ROOT, "");
        let header = Header::from_fields(&root)?;
        let roots = Roots::from_fields(&root)?;
        let status = read_status_log(r, &roots.status)?;
        if status.is_empty() {
            return Err(bad("status", "at least one entry"));
        }
        Ok(Self {
            number: root.opt_uint(keys::NUMBER)?.map(OrderNumber),
            lines: read_lines(r, &roots.lines)?,
            payments: read_payments(r, &roots.payments, header.currency)?,
            status,
            acks: read_acks(r, &roots.acks)?,
            header,
            roots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{DeviceId, Entropy, OrderId, SplitMix64, StoreId};
    use crate::money::Currency;
    use crate::order::{FinalPayment, LineDraft, NewOrder, Order, PaymentDraft, Writer};
    use crate::payment::{PaymentKind, PaymentState};
    use crate::status::{ActiveStatus, OrderStatus};
    use automerge::transaction::Transactable;
    use automerge::{Automerge, ChangeHash, ReadDoc};

    /// The one-pass parse and the per-object parse agree, result and error alike.
    fn same_parse(doc: &Automerge, heads: Option<&[ChangeHash]>) {
        let indexed = Snapshot::read(&Reader::new(doc, heads));
        let per_object = Snapshot::parse(&Reader::new(doc, heads));
        assert_eq!(format!("{indexed:?}"), format!("{per_object:?}"));
    }

    /// Every historical state of `doc` (after each change) and the current one.
    fn same_parse_everywhere(doc: &Automerge) {
        same_parse(doc, None);
        for c in doc.get_changes(&[]) {
            same_parse(doc, Some(&[c.hash()]));
        }
    }

    fn writer(seed: u64) -> (Writer, SplitMix64) {
        let mut rng = SplitMix64::new(seed);
        let device = DeviceId::generate(Timestamp(1), &mut rng);
        (Writer::new(device, 1), rng)
    }

    fn line(name: &str, qty: i64, modifiers: &[&str]) -> LineDraft {
        LineDraft {
            sku: name.to_lowercase(),
            name: name.into(),
            unit_price: 250,
            quantity: qty,
            modifiers: modifiers.iter().map(|m| (*m).to_owned()).collect(),
            note: String::new(),
        }
    }

    /// Two replicas with concurrent edits (conflicting prices and notes, concurrent statuses,
    /// counter overshoot), a payment history and a close, merged.
    fn busy_order() -> Order {
        let (wa, mut ra) = writer(1);
        let (wb, mut rb) = writer(2);
        let t = |n: i64| Timestamp(1_700_000_000_000 + n * 1_000);
        let new = NewOrder {
            id: OrderId::generate(t(0), &mut ra),
            store: StoreId::new("s1").unwrap(),
            currency: Currency::new("EUR").unwrap(),
        };
        let mut a = Order::create(new, wa, t(0), &mut ra).unwrap();
        let l1 = a.add_line(t(1), &mut ra, line("Tea", 2, &[])).unwrap();
        let l2 = a
            .add_line(t(2), &mut ra, line("Soup", 1, &["no salt", "hot"]))
            .unwrap();
        let mut b = Order::load(&a.save(), wb).unwrap();
        a.set_unit_price(t(3), l1, 300).unwrap();
        b.set_unit_price(t(3), l1, 350).unwrap();
        a.set_note(t(4), l2, "a").unwrap();
        b.set_note(t(4), l2, "b").unwrap();
        a.change_quantity(t(5), l1, -1).unwrap();
        b.change_quantity(t(5), l1, -1).unwrap();
        a.set_status(t(6), &mut ra, ActiveStatus::Delayed).unwrap();
        b.set_status(t(6), &mut rb, ActiveStatus::InDelivery)
            .unwrap();
        let p = b
            .add_payment(
                t(7),
                &mut rb,
                PaymentDraft {
                    kind: PaymentKind::CardTerminal,
                    amount: 100,
                    reference: "**** 1234".into(),
                },
                PaymentState::Pending,
            )
            .unwrap();
        b.authorize_payment(t(8), &mut rb, p, "AUTH 1").unwrap();
        b.remove_line(t(9), l2).unwrap();
        a.merge(&mut b).unwrap();
        b.merge(&mut a).unwrap();
        let due = a.view().unwrap().totals.balance_due;
        a.complete_sale(
            t(10),
            &mut ra,
            Some(FinalPayment::New(PaymentDraft {
                kind: PaymentKind::Cash,
                amount: due.max(1),
                reference: String::new(),
            })),
        )
        .unwrap();
        b.add_line(t(10), &mut rb, line("Late", 1, &["x"])).unwrap();
        b.void_payment(t(11), &mut rb, p).unwrap();
        a.merge(&mut b).unwrap();
        assert_eq!(a.status().unwrap(), OrderStatus::Done);
        a
    }

    #[test]
    fn one_pass_parse_matches_per_object_parse() {
        same_parse_everywhere(busy_order().doc());
    }

    #[test]
    fn one_pass_parse_matches_on_malformed_documents() {
        let base = busy_order();
        let v = base.view().unwrap();
        let lines = base.doc().get(ROOT, keys::LINES).unwrap().unwrap().1;
        let line = |id: &str| base.doc().get(&lines, id).unwrap().unwrap().1;
        let l1 = line(&v.lines[0].id.to_string());
        let late = line(&v.late_lines[0].id.to_string());
        type Forge = Box<dyn Fn(&mut automerge::transaction::Transaction<'_>)>;
        let (l1a, l1b, l1c, l1d, latea) = (l1.clone(), l1.clone(), l1.clone(), l1, late);
        let forgeries: Vec<Forge> = vec![
            // A text object where a string belongs.
            Box::new(move |tx| {
                tx.put_object(&l1a, keys::NOTE, ObjType::Text).unwrap();
            }),
            // A map where the modifiers list belongs.
            Box::new(move |tx| {
                tx.put_object(&l1b, keys::MODIFIERS, ObjType::Map).unwrap();
            }),
            // A modifier that is not a string.
            Box::new(move |tx| {
                let m = tx.put_object(&l1c, keys::MODIFIERS, ObjType::List).unwrap();
                tx.insert(&m, 0, "ok").unwrap();
                tx.insert(&m, 1, 7_i64).unwrap();
            }),
            // The quantity as a plain integer, and an unknown field.
            Box::new(move |tx| {
                tx.put(&l1d, keys::QTY, 3_i64).unwrap();
                tx.put(&l1d, "extra", "x").unwrap();
            }),
            // A half removal marker.
            Box::new(move |tx| {
                tx.put(&latea, keys::REMOVED_BY, "nobody").unwrap();
            }),
            // A bad entry key and a second status container.
            Box::new(|tx| {
                let s = tx.put_object(ROOT, "junk", ObjType::Map).unwrap();
                tx.put(&s, "k", 1_u64).unwrap();
            }),
        ];
        for forge in &forgeries {
            let mut doc = base.doc().clone();
            doc.transact(|tx| {
                forge(tx);
                Ok::<_, automerge::AutomergeError>(())
            })
            .unwrap();
            same_parse_everywhere(&doc);
        }
        // A container created concurrently twice: one of them is hidden.
        let mut x = base.doc().fork();
        let mut y = base.doc().fork();
        for d in [&mut x, &mut y] {
            d.transact(|tx| {
                let m = tx.put_object(ROOT, keys::ACKS, ObjType::Map)?;
                tx.put(&m, "k", "v")
            })
            .unwrap();
        }
        x.merge(&mut y).unwrap();
        same_parse_everywhere(&x);
        // Random bytes in the document's strings do not matter; random entries might.
        let mut rng = SplitMix64::new(5);
        let mut doc = base.doc().clone();
        let status = doc.get(ROOT, keys::STATUS).unwrap().unwrap().1;
        doc.transact(|tx| {
            let e = tx.put_object(&status, format!("{:x}", rng.next_u64()), ObjType::Map)?;
            tx.put(&e, keys::STATUS, "done")
        })
        .unwrap();
        same_parse_everywhere(&doc);
    }
}
