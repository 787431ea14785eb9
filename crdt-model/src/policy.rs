//! The policy: which changes an order accepts, judged with the author's identity.
//!
//! The relay applies incoming changes to a fork of its stored document and calls [`validate`]
//! with the document before and after; it persists and fans out only on `Ok`. Each new change
//! is judged **from its author's point of view**: the document at the change's dependencies is
//! what the author had seen, and `diff(deps, [change])` is exactly what it did. So
//!
//! * a change whose author had already seen the order Done/Deleted may only void or refund a
//!   payment or acknowledge a late edit (the relay may also write the number): anything else is
//!   [`PolicyViolation::EditAfterClose`];
//! * a change *concurrent* with the close passes here and is flagged as a late edit by the view;
//! * a payment transition must move forward from the state its author saw.
//!
//! Structure and types are checked on the merged result with the same strict parser the view
//! uses, so a document that passes always loads and views.

use automerge::{
    Automerge, Change, ChangeHash, ObjType, PatchAction, Prop, ROOT, ScalarValue, Value,
};

use crate::error::{ModelError, PolicyViolation};
use crate::ids::{DeviceId, PaymentId, StoreId};
use crate::order::{MAX_PAYMENT, MAX_QUANTITY, MAX_UNIT_PRICE, device_of_actor};
use crate::payment::{PaymentState, check_reference};
use crate::schema::{self, Header, Reader, Snapshot, keys};
use crate::status::{OrderStatus, StatusLattice};

/// What the author of a batch of changes is allowed to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A terminal of a store.
    Device,
    /// The relay itself (order numbers, back-office status changes).
    Relay,
}

/// The authenticated author of incoming changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Author {
    /// The device the connection authenticated as; every change's actor must belong to it.
    pub device: DeviceId,
    /// The store the device belongs to.
    pub store: StoreId,
    /// Device or relay.
    pub role: Role,
}

/// Judges the changes `after` has and `before` lacks, as written by `author`.
///
/// `before` is the relay's stored document (empty for an order it has never seen); `after` is
/// `before` with the incoming changes applied. Returns the number of new changes judged.
pub fn validate(
    before: &Automerge,
    after: &Automerge,
    author: &Author,
) -> Result<usize, PolicyViolation> {
    let new_changes = after.get_changes(&before.get_heads());
    if new_changes.is_empty() {
        return Ok(0);
    }
    let mut touched = Touched::default();
    for change in &new_changes {
        match device_of_actor(change.actor_id()) {
            Some(d) if d == author.device => {}
            _ => {
                return Err(PolicyViolation::ForeignActor(
                    change.actor_id().to_hex_string(),
                ));
            }
        }
    }
    let header = Header::read(&Reader::new(after, None)).map_err(not_an_order)?;
    if !before.get_heads().is_empty() {
        let old = Header::read(&Reader::new(before, None)).map_err(not_an_order)?;
        if old != header {
            return Err(PolicyViolation::ImmutableField("header".into()));
        }
    }
    if author.role == Role::Device && header.store != author.store {
        return Err(PolicyViolation::ForeignStore);
    }
    for change in &new_changes {
        check_change(after, change, author, &header, &mut touched)?;
    }
    // Structure and types of the merged result, with the parser the view uses. The stored
    // order was valid, so only the entries the new changes touched need parsing; a new order
    // is parsed whole.
    let r = Reader::new(after, None);
    if before.get_heads().is_empty() {
        Snapshot::read(&r).map_err(not_an_order)?;
    } else {
        touched.check(&r, header.currency).map_err(not_an_order)?;
    }
    Ok(new_changes.len())
}

/// The entries (by root container and key) that new changes wrote to.
#[derive(Default)]
struct Touched {
    entries: std::collections::BTreeSet<(String, String)>,
}

impl Touched {
    fn note(&mut self, path: &[&str]) {
        if let [container, key, ..] = path {
            self.entries
                .insert(((*container).to_owned(), (*key).to_owned()));
        }
    }

    /// Parses every touched entry of the merged order strictly.
    fn check(&self, r: &Reader<'_>, currency: crate::money::Currency) -> Result<(), ModelError> {
        let roots = schema::Roots::read(r)?;
        for (container, key) in &self.entries {
            match container.as_str() {
                keys::LINES => {
                    schema::read_line(r, &roots.lines, key)?;
                }
                keys::PAYMENTS => {
                    schema::read_payment(r, &roots.payments, key, currency)?;
                }
                keys::STATUS => schema::read_status_entry(r, &roots.status, key).map(|_| ())?,
                keys::ACKS => schema::read_ack(r, &roots.acks, key).map(|_| ())?,
                _ => {}
            }
        }
        Ok(())
    }
}

fn not_an_order(e: ModelError) -> PolicyViolation {
    PolicyViolation::NotAnOrder(e.to_string())
}

/// What the author saw when it wrote a change.
struct Seen<'a> {
    r: Reader<'a>,
    empty: bool,
    closed: Option<OrderStatus>,
}

impl Seen<'_> {
    fn has(&self, path: &[&str]) -> Result<bool, PolicyViolation> {
        let mut obj = ROOT;
        for (i, key) in path.iter().enumerate() {
            match self.r.get(&obj, key).map_err(not_an_order)? {
                None => return Ok(false),
                Some((Value::Object(_), id)) => obj = id,
                Some((Value::Scalar(_), _)) => return Ok(i + 1 == path.len()),
            }
        }
        Ok(true)
    }
}

fn check_change(
    after: &Automerge,
    change: &Change,
    author: &Author,
    header: &Header,
    touched: &mut Touched,
) -> Result<(), PolicyViolation> {
    let deps = change.deps();
    let hash: ChangeHash = change.hash();
    let r = Reader::new(after, Some(deps));
    let empty = deps.is_empty();
    let closed = if empty {
        None
    } else {
        let roots = schema::Roots::read(&r).map_err(not_an_order)?;
        let log = schema::read_status_log(&r, &roots.status).map_err(not_an_order)?;
        let l: StatusLattice = schema::lattice(&log);
        l.is_terminal().then(|| l.status())
    };
    let seen = Seen { r, empty, closed };
    let me = author.device.to_string();
    let device_role = author.role == Role::Device;
    let after_change = Reader::new(after, Some(std::slice::from_ref(&hash)));

    for patch in after.diff(deps, std::slice::from_ref(&hash)) {
        let mut path: Vec<String> = patch
            .path
            .iter()
            .map(|(_, p)| match p {
                Prop::Map(k) => k.clone(),
                Prop::Seq(i) => i.to_string(),
            })
            .collect();
        let value = match &patch.action {
            PatchAction::PutMap { key, value, .. } => {
                path.push(key.clone());
                Some(value.0.clone())
            }
            PatchAction::Increment {
                prop: Prop::Map(k), ..
            } => {
                path.push(k.clone());
                None
            }
            PatchAction::Insert { .. } | PatchAction::PutSeq { .. } => None,
            PatchAction::DeleteMap { key } => {
                path.push(key.clone());
                return Err(deleted(&path));
            }
            PatchAction::DeleteSeq { .. } => return Err(deleted(&path)),
            _ => return Err(PolicyViolation::UnknownField(path.join("."))),
        };
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        touched.note(&p);
        let is_insert = matches!(
            patch.action,
            PatchAction::Insert { .. } | PatchAction::PutSeq { .. }
        );
        let is_increment = matches!(patch.action, PatchAction::Increment { .. });
        if let Some(status) = seen.closed {
            let allowed = match p.as_slice() {
                // Judged below: only the relay, only once.
                [keys::NUMBER] => true,
                [keys::ACKS, ..] => true,
                [keys::PAYMENTS, _pid, keys::TRANSITIONS, tid, ..] => {
                    let st = transition_state(&after_change, &p[..4])?;
                    !seen.has(&p[..4])?
                        && st.is_some_and(PaymentState::allowed_after_close)
                        && !tid.is_empty()
                }
                _ => false,
            };
            if !allowed {
                return Err(PolicyViolation::EditAfterClose {
                    status,
                    what: path.join("."),
                });
            }
        }
        match p.as_slice() {
            [field] if is_root_header(field) || is_root_container(field) => {
                if !seen.empty {
                    return Err(PolicyViolation::ImmutableField((*field).to_owned()));
                }
            }
            [keys::NUMBER] => {
                if device_role {
                    return Err(PolicyViolation::NumberWrittenByDevice);
                }
                if seen.has(&[keys::NUMBER])? {
                    return Err(PolicyViolation::NumberReassigned);
                }
                if !matches!(value, Some(Value::Scalar(ref s)) if matches!(s.as_ref(), ScalarValue::Uint(n) if *n > 0))
                {
                    return Err(PolicyViolation::WrongType {
                        path: "number".into(),
                        expected: "a positive unsigned integer",
                    });
                }
            }
            [keys::LINES, lid, rest @ ..] => {
                let fresh = !seen.has(&[keys::LINES, lid])?;
                match rest {
                    [] if fresh => check_by(&after_change, &p, keys::CREATED_BY, &me, device_role)?,
                    [] => return Err(PolicyViolation::EntryRewritten(path.join("."))),
                    _ if fresh => check_line_field(rest, &value, &path)?,
                    [f] if seen.has(&[keys::LINES, lid, keys::REMOVED_BY])? => {
                        return Err(PolicyViolation::EntryRewritten(format!(
                            "lines.{lid}.{f} (line removed)"
                        )));
                    }
                    [keys::QTY] if is_increment => {}
                    [keys::UNIT_PRICE | keys::NOTE] => check_line_field(rest, &value, &path)?,
                    [keys::REMOVED_BY] => {
                        check_line_field(rest, &value, &path)?;
                        check_by_value(&value, &me, device_role, &path)?;
                    }
                    [keys::REMOVED_AT] => check_line_field(rest, &value, &path)?,
                    [f, ..] if is_line_field(f) => {
                        return Err(PolicyViolation::ImmutableField(path.join(".")));
                    }
                    _ => return Err(PolicyViolation::UnknownField(path.join("."))),
                }
            }
            [keys::PAYMENTS, pid, rest @ ..] => {
                let fresh = !seen.has(&[keys::PAYMENTS, pid])?;
                match rest {
                    [] if fresh => check_new_payment(&after_change, pid, header, &me, device_role)?,
                    [] => return Err(PolicyViolation::EntryRewritten(path.join("."))),
                    [keys::TRANSITIONS] if fresh => {}
                    [keys::TRANSITIONS, tid, ..] => {
                        let tpath = [keys::PAYMENTS, *pid, keys::TRANSITIONS, *tid];
                        if seen.has(&tpath)? {
                            return Err(PolicyViolation::EntryRewritten(path.join(".")));
                        }
                        if rest.len() == 2 {
                            check_transition(
                                &seen,
                                &after_change,
                                &tpath,
                                fresh,
                                &me,
                                device_role,
                            )?;
                        }
                    }
                    [f, ..] if fresh && is_payment_field(f) => {}
                    [f, ..] if is_payment_field(f) => {
                        return Err(PolicyViolation::EntryRewritten(path.join(".")));
                    }
                    _ => return Err(PolicyViolation::UnknownField(path.join("."))),
                }
            }
            [keys::STATUS, eid, rest @ ..] => {
                if seen.has(&[keys::STATUS, eid])? {
                    return Err(PolicyViolation::StatusRewritten((*eid).to_owned()));
                }
                if rest.is_empty() {
                    check_status_entry(&seen, &after_change, eid, &me, device_role)?;
                } else if !matches!(rest, [keys::STATUS | keys::CLOCK | keys::AT | keys::BY]) {
                    return Err(PolicyViolation::UnknownField(path.join(".")));
                }
            }
            [keys::ACKS, eid, rest @ ..] => {
                if seen.has(&[keys::ACKS, eid])? {
                    return Err(PolicyViolation::EntryRewritten(path.join(".")));
                }
                if rest.is_empty() {
                    check_by(&after_change, &p, keys::BY, &me, device_role)?;
                } else if !matches!(rest, [keys::EDIT | keys::BY | keys::AT | keys::NOTE]) {
                    return Err(PolicyViolation::UnknownField(path.join(".")));
                }
            }
            _ if is_insert => return Err(PolicyViolation::UnknownField(path.join("."))),
            _ => return Err(PolicyViolation::UnknownField(path.join("."))),
        }
    }
    Ok(())
}

fn deleted(path: &[String]) -> PolicyViolation {
    match path.first().map(String::as_str) {
        Some(keys::STATUS) => PolicyViolation::StatusRewritten(path.join(".")),
        Some(k)
            if path.len() == 1
                && (is_root_header(k) || is_root_container(k) || k == keys::NUMBER) =>
        {
            PolicyViolation::ImmutableField(path.join("."))
        }
        _ => PolicyViolation::EntryRewritten(path.join(".")),
    }
}

fn is_root_header(k: &str) -> bool {
    matches!(
        k,
        keys::SCHEMA
            | keys::ID
            | keys::STORE
            | keys::CURRENCY
            | keys::CREATED_BY
            | keys::CREATED_AT
    )
}

fn is_root_container(k: &str) -> bool {
    matches!(k, keys::LINES | keys::PAYMENTS | keys::STATUS | keys::ACKS)
}

fn is_line_field(k: &str) -> bool {
    matches!(
        k,
        keys::SKU
            | keys::NAME
            | keys::UNIT_PRICE
            | keys::QTY
            | keys::MODIFIERS
            | keys::NOTE
            | keys::CREATED_BY
            | keys::CREATED_AT
            | keys::REMOVED_BY
            | keys::REMOVED_AT
    )
}

fn is_payment_field(k: &str) -> bool {
    matches!(
        k,
        keys::KIND
            | keys::AMOUNT
            | keys::CURRENCY
            | keys::REFERENCE
            | keys::CREATED_BY
            | keys::CREATED_AT
    )
}

fn scalar<'v>(v: &'v Option<Value<'_>>) -> Option<&'v ScalarValue> {
    match v {
        Some(Value::Scalar(s)) => Some(s.as_ref()),
        _ => None,
    }
}

fn check_line_field(
    rest: &[&str],
    value: &Option<Value<'_>>,
    path: &[String],
) -> Result<(), PolicyViolation> {
    let here = path.join(".");
    let wrong = |expected| PolicyViolation::WrongType {
        path: here.clone(),
        expected,
    };
    match rest {
        [keys::UNIT_PRICE] => match scalar(value) {
            Some(ScalarValue::Int(p)) if (0..=MAX_UNIT_PRICE).contains(p) => Ok(()),
            Some(ScalarValue::Int(_)) => Err(PolicyViolation::InvalidAmount(here)),
            _ => Err(wrong("an integer price in minor units")),
        },
        [keys::QTY] => match scalar(value) {
            Some(ScalarValue::Counter(c)) if (1..=MAX_QUANTITY).contains(&i64::from(c)) => Ok(()),
            Some(ScalarValue::Counter(_)) => Err(PolicyViolation::InvalidAmount(here)),
            // An increment inside the change that created the line.
            None => Ok(()),
            _ => Err(wrong("a counter")),
        },
        [keys::MODIFIERS] => match value {
            Some(Value::Object(ObjType::List)) => Ok(()),
            _ => Err(wrong("a list")),
        },
        [keys::MODIFIERS, ..] => Ok(()),
        [keys::SKU | keys::NAME | keys::NOTE | keys::CREATED_BY | keys::REMOVED_BY] => {
            match scalar(value) {
                Some(ScalarValue::Str(_)) => Ok(()),
                _ => Err(wrong("a string")),
            }
        }
        [keys::CREATED_AT | keys::REMOVED_AT] => match scalar(value) {
            Some(ScalarValue::Timestamp(_)) => Ok(()),
            _ => Err(wrong("a timestamp")),
        },
        _ => Err(PolicyViolation::UnknownField(here)),
    }
}

fn check_by_value(
    value: &Option<Value<'_>>,
    me: &str,
    device_role: bool,
    path: &[String],
) -> Result<(), PolicyViolation> {
    match scalar(value) {
        Some(ScalarValue::Str(s)) if !device_role || s.as_str() == me => Ok(()),
        Some(ScalarValue::Str(s)) => Err(PolicyViolation::ForeignActor(format!(
            "{} claims device {s}",
            path.join(".")
        ))),
        _ => Err(PolicyViolation::WrongType {
            path: path.join("."),
            expected: "a device id",
        }),
    }
}

/// The entry at `entry` (as of the change) must name the author in field `field`.
fn check_by(
    r: &Reader<'_>,
    entry: &[&str],
    field: &str,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let obj = resolve(r, entry)?;
    let v = r
        .opt_scalar(&obj, field)
        .map_err(not_an_order)?
        .map(|s| Value::Scalar(std::borrow::Cow::Owned(s)));
    let mut path: Vec<String> = entry.iter().map(|s| (*s).to_owned()).collect();
    path.push(field.to_owned());
    check_by_value(&v, me, device_role, &path)
}

fn resolve(r: &Reader<'_>, path: &[&str]) -> Result<automerge::ObjId, PolicyViolation> {
    let mut obj = ROOT;
    for key in path {
        match r.get(&obj, key).map_err(not_an_order)? {
            Some((Value::Object(_), id)) => obj = id,
            _ => {
                return Err(PolicyViolation::WrongType {
                    path: path.join("."),
                    expected: "a map",
                });
            }
        }
    }
    Ok(obj)
}

fn transition_state(
    r: &Reader<'_>,
    tpath: &[&str],
) -> Result<Option<PaymentState>, PolicyViolation> {
    let obj = resolve(r, tpath)?;
    Ok(
        match r.opt_scalar(&obj, keys::STATE).map_err(not_an_order)? {
            Some(ScalarValue::Str(s)) => s.parse().ok(),
            _ => None,
        },
    )
}

fn check_new_payment(
    r: &Reader<'_>,
    pid: &str,
    header: &Header,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let here = format!("payments.{pid}");
    let _: PaymentId = pid.parse().map_err(not_an_order)?;
    let obj = resolve(r, &[keys::PAYMENTS, pid])?;
    match r.opt_scalar(&obj, keys::AMOUNT).map_err(not_an_order)? {
        Some(ScalarValue::Int(a)) if a > 0 && a <= MAX_PAYMENT => {}
        Some(ScalarValue::Int(_)) => {
            return Err(PolicyViolation::InvalidAmount(format!("{here}.amount")));
        }
        _ => {
            return Err(PolicyViolation::WrongType {
                path: format!("{here}.amount"),
                expected: "an integer amount",
            });
        }
    }
    match r.opt_scalar(&obj, keys::CURRENCY).map_err(not_an_order)? {
        Some(ScalarValue::Str(c)) if c.as_str() == header.currency.code() => {}
        Some(ScalarValue::Str(c)) => return Err(PolicyViolation::InvalidCurrency(c.to_string())),
        _ => {
            return Err(PolicyViolation::WrongType {
                path: format!("{here}.currency"),
                expected: "a currency code",
            });
        }
    }
    if let Some(ScalarValue::Str(reference)) =
        r.opt_scalar(&obj, keys::REFERENCE).map_err(not_an_order)?
        && check_reference(&reference).is_err()
    {
        return Err(PolicyViolation::CardNumberInReference(format!(
            "{here}.reference"
        )));
    }
    check_by(r, &[keys::PAYMENTS, pid], keys::CREATED_BY, me, device_role)
}

fn check_transition(
    seen: &Seen<'_>,
    r: &Reader<'_>,
    tpath: &[&str; 4],
    payment_is_new: bool,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let here = tpath.join(".");
    let to = transition_state(r, tpath)?.ok_or_else(|| PolicyViolation::WrongType {
        path: format!("{here}.state"),
        expected: "a payment state",
    })?;
    if payment_is_new {
        if !to.is_initial() {
            return Err(PolicyViolation::PaymentBackwards {
                payment: tpath[1].to_owned(),
                from: PaymentState::Pending,
                to,
            });
        }
    } else {
        let payments = resolve(&seen.r, &[keys::PAYMENTS])?;
        let currency = Header::read(&seen.r).map_err(not_an_order)?.currency;
        let rec =
            schema::read_payment(&seen.r, &payments, tpath[1], currency).map_err(not_an_order)?;
        let from = rec.state();
        if !from.can_move_to(to) {
            return Err(PolicyViolation::PaymentBackwards {
                payment: tpath[1].to_owned(),
                from,
                to,
            });
        }
    }
    let obj = resolve(r, tpath)?;
    if let Some(ScalarValue::Str(reference)) =
        r.opt_scalar(&obj, keys::REFERENCE).map_err(not_an_order)?
        && check_reference(&reference).is_err()
    {
        return Err(PolicyViolation::CardNumberInReference(format!(
            "{here}.reference"
        )));
    }
    check_by(r, tpath, keys::BY, me, device_role)
}

fn check_status_entry(
    seen: &Seen<'_>,
    r: &Reader<'_>,
    eid: &str,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let path = [keys::STATUS, eid];
    let obj = resolve(r, &path)?;
    let clock = match r.opt_scalar(&obj, keys::CLOCK).map_err(not_an_order)? {
        Some(ScalarValue::Uint(c)) => c,
        _ => {
            return Err(PolicyViolation::WrongType {
                path: format!("status.{eid}.clock"),
                expected: "a clock",
            });
        }
    };
    if !seen.empty {
        let roots = schema::Roots::read(&seen.r).map_err(not_an_order)?;
        let log = schema::read_status_log(&seen.r, &roots.status).map_err(not_an_order)?;
        let max = log.iter().map(|s| s.entry.clock).max().unwrap_or(0);
        if clock <= max {
            return Err(PolicyViolation::WrongType {
                path: format!("status.{eid}.clock"),
                expected: "a clock above every clock its author had seen",
            });
        }
    }
    check_by(r, &path, keys::BY, me, device_role)
}
