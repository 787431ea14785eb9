//! The rules, one operation at a time: what an operation may replace (its predecessors),
//! which keys take one value only, what a change may do once its author had seen the order
//! closed, and the per-field rules of every container (header, number, lines, payments and
//! their transitions, status entries, acknowledgements), next to each other.

use automerge::{Automerge, Change, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value, legacy};

use super::decode::{ChangeOps, OpKey, Paths, ex_id, op_key};
use super::{Author, Role, Touched, not_an_order};
use crate::error::PolicyViolation;
use crate::ids::PaymentId;
use crate::order::{MAX_PAYMENT, MAX_QUANTITY, MAX_UNIT_PRICE};
use crate::payment::{PaymentState, check_reference};
use crate::schema::{self, Header, Reader, keys};
use crate::status::{OrderStatus, StatusLattice};

/// What the author saw when it wrote a change: the document at the change's dependencies.
///
/// Historical reads are the expensive part of a check, so every question is first answered
/// from the current document where that is exact, and only then at the dependencies.
struct Seen<'a> {
    r: Reader<'a>,
    empty: bool,
    closed: Option<OrderStatus>,
}

impl Seen<'_> {
    /// Whether `path` existed at the change's dependencies (exact, historical).
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

/// What an operation does, in the terms the rules use.
enum Action {
    /// A scalar put into a map key.
    Put(ScalarValue),
    /// An object created at a map key.
    Make(ObjType),
    /// A counter increment at a map key.
    Increment,
    /// A map key's value removed. Automerge writes one when a value is put that a concurrent
    /// write already holds, so a last-writer-wins field takes it (the strict parse afterwards
    /// makes sure the field keeps a value).
    Delete,
    /// A scalar inserted as a new element of a list.
    ListInsert(ScalarValue),
}

/// Whether `key` of `obj` holds exactly one value in the merged document, written by the
/// operation `id`. An entry, a header field or a write-once marker written under a key that
/// already has a value would either hide that value (a higher operation id wins the key) or
/// sit beside it as a conflict: neither is something an honest writer does, since entries go
/// under fresh ids.
fn sole_value(
    after: &Automerge,
    obj: &ObjId,
    key: &str,
    id: &OpKey,
) -> Result<bool, PolicyViolation> {
    let all = after
        .get_all(obj, key)
        .map_err(|e| not_an_order(e.into()))?;
    Ok(match all.as_slice() {
        [(_, ObjId::Id(ctr, actor, _))] => *ctr == id.0 && *actor == id.1,
        _ => false,
    })
}

/// Fields of an existing line whose rule allows a later write: the price and the note are
/// last-writer-wins registers (concurrent values are kept and flagged), the quantity is a
/// counter that takes increments, and the removal marker may be written by two tills at once.
fn line_field_takes_more_values(field: &str) -> bool {
    matches!(
        field,
        keys::UNIT_PRICE | keys::NOTE | keys::QTY | keys::REMOVED_BY | keys::REMOVED_AT
    )
}

pub(super) fn check_change(
    after: &Automerge,
    change: &Change,
    author: &Author,
    header: &Header,
    terminal_now: bool,
    paths: &mut Paths<'_>,
    touched: &mut Touched,
) -> Result<(), PolicyViolation> {
    let deps = change.deps();
    let r = Reader::new(after, Some(deps));
    let empty = deps.is_empty();
    // Terminal status entries are write-once and nothing may hide them (every rule below
    // refuses an operation that replaces or shadows an entry), so an order that is not
    // closed in the merged document was not closed at any earlier point either. Only when it
    // is closed now is the status log read at the change's dependencies.
    let closed = if empty || !terminal_now {
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
    let ops = ChangeOps::decode(change);

    for (op, id) in ops.ops.iter().zip(&ops.ids) {
        let mut path = paths.of(&op.obj, &ops)?;
        // The object this operation writes into, and whether this change created it.
        let target = &op.obj;
        let target_new = ops.made_here(target);
        let target_ex = match target {
            legacy::ObjectId::Root => ROOT,
            legacy::ObjectId::Id(o) => ex_id(&op_key(o)),
        };
        let action = match (&op.key, &op.action) {
            (legacy::Key::Map(k), act) => {
                path.push(k.to_string());
                match act {
                    legacy::OpType::Put(v) => Action::Put(v.clone()),
                    legacy::OpType::Make(t) => Action::Make(*t),
                    legacy::OpType::Increment(_) => Action::Increment,
                    legacy::OpType::Delete => Action::Delete,
                    _ => return Err(PolicyViolation::UnknownField(path.join("."))),
                }
            }
            // Lists (a line's modifiers) only take new elements, in the change that made them.
            (legacy::Key::Seq(_), legacy::OpType::Put(v)) if op.insert => {
                Action::ListInsert(v.clone())
            }
            (legacy::Key::Seq(_), legacy::OpType::Delete) => return Err(deleted(&path)),
            (legacy::Key::Seq(_), _) => {
                return Err(PolicyViolation::ImmutableField(path.join(".")));
            }
        };
        let p: Vec<&str> = path.iter().map(String::as_str).collect();
        touched.note(&p);

        if device_role && p.as_slice() == [keys::NUMBER] {
            return Err(PolicyViolation::NumberWrittenByDevice);
        }
        // What the operation replaces, from its own predecessors: an overwrite passes only
        // where a field's rule allows one. Inside an object this change created, the change
        // may only replace its own operations.
        if !op.pred.is_empty() {
            let allowed = if target_new {
                op.pred.iter().all(|pr| ops.is_mine(&ex_id(&op_key(pr))))
            } else {
                matches!(
                    (p.as_slice(), &action),
                    (
                        [keys::LINES, _, keys::UNIT_PRICE | keys::NOTE],
                        Action::Put(_) | Action::Delete
                    ) | ([keys::LINES, _, keys::QTY], Action::Increment)
                )
            };
            if !allowed {
                return Err(rewritten(&path));
            }
        } else if !target_new
            && let (legacy::Key::Map(k), false) = (
                &op.key,
                matches!(p.as_slice(), [keys::LINES, _, f] if line_field_takes_more_values(f)),
            )
            && !sole_value(after, &target_ex, k, id)?
        {
            // A write beside an existing value of a key that takes one value only.
            return Err(rewritten(&path));
        }
        if matches!(action, Action::Increment)
            && !matches!(p.as_slice(), [keys::LINES, _, keys::QTY])
        {
            return Err(PolicyViolation::WrongType {
                path: path.join("."),
                expected: "no counter",
            });
        }
        // Free text (names, notes, sku, modifiers, kind names, references): no card number,
        // within the lengths the typed API writes.
        if let Action::Put(ScalarValue::Str(text)) | Action::ListInsert(ScalarValue::Str(text)) =
            &action
        {
            crate::text::check_text_at(&p, text)?;
        }
        let is_increment = matches!(action, Action::Increment);
        let is_list_element = matches!(action, Action::ListInsert(_));
        let value = match &action {
            Action::Put(v) | Action::ListInsert(v) => {
                Some(Value::Scalar(std::borrow::Cow::Owned(v.clone())))
            }
            Action::Make(t) => Some(Value::Object(*t)),
            Action::Increment => None,
            Action::Delete => {
                // Only a last-writer-wins field of an existing line may lose a value.
                if target_new
                    || !matches!(
                        p.as_slice(),
                        [keys::LINES, _, keys::UNIT_PRICE | keys::NOTE]
                    )
                {
                    return Err(deleted(&path));
                }
                None
            }
        };
        // The entry this operation creates: a map, made by this change, under a key that
        // holds nothing else (checked above).
        let new_entry = |rewritten_err: PolicyViolation| match action {
            Action::Make(ObjType::Map) => {
                Ok(legacy::ObjectId::Id(legacy::OpId(id.0, id.1.clone())))
            }
            Action::Make(_) => Err(PolicyViolation::WrongType {
                path: path.join("."),
                expected: "a map",
            }),
            _ => Err(rewritten_err),
        };
        if let Some(status) = seen.closed {
            let allowed = match p.as_slice() {
                // Judged below: only the relay, only once.
                [keys::NUMBER] => true,
                [keys::ACKS, ..] => true,
                [keys::PAYMENTS, _pid, keys::TRANSITIONS, tid] => {
                    // A new transition entry that voids or refunds.
                    let st = match action {
                        Action::Make(ObjType::Map) => ops
                            .field(
                                &legacy::ObjectId::Id(legacy::OpId(id.0, id.1.clone())),
                                keys::STATE,
                            )
                            .and_then(|v| match v {
                                ScalarValue::Str(s) => s.parse::<PaymentState>().ok(),
                                _ => None,
                            }),
                        _ => None,
                    };
                    st.is_some_and(PaymentState::allowed_after_close) && !tid.is_empty()
                }
                [keys::PAYMENTS, _pid, keys::TRANSITIONS, _tid, _field] => target_new,
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
                if !matches!(value, Some(Value::Scalar(ref s)) if matches!(s.as_ref(), ScalarValue::Uint(n) if *n > 0))
                {
                    return Err(PolicyViolation::WrongType {
                        path: "number".into(),
                        expected: "a positive unsigned integer",
                    });
                }
            }
            [keys::LINES, lid] => {
                entry_id::<crate::ids::LineId>(lid, &path)?;
                let line = new_entry(PolicyViolation::EntryRewritten(path.join(".")))?;
                check_by_field(&ops, &line, &p, keys::CREATED_BY, &me, device_role)?;
            }
            // An element of a line's modifiers: only while the change creates the list.
            [keys::LINES, _lid, keys::MODIFIERS] if is_list_element => {
                if !target_new {
                    return Err(PolicyViolation::ImmutableField(path.join(".")));
                }
                if !matches!(value, Some(Value::Scalar(ref v)) if matches!(v.as_ref(), ScalarValue::Str(_)))
                {
                    return Err(PolicyViolation::WrongType {
                        path: path.join("."),
                        expected: "a string",
                    });
                }
            }
            [keys::LINES, _lid, rest @ ..] if is_list_element || rest.len() > 1 => {
                return Err(PolicyViolation::UnknownField(path.join(".")));
            }
            [keys::LINES, _lid, rest @ ..] => {
                // Writes into a line: a line this change created takes any field once; an
                // existing line only its editable ones, and none once its author saw it
                // removed.
                if target_new {
                    check_line_field(rest, &value, &path)?;
                    continue;
                }
                match rest {
                    [f] if line_removed_seen(after, &seen, &ops, &target_ex, &p)? => {
                        return Err(PolicyViolation::EntryRewritten(format!(
                            "lines.{}.{f} (line removed)",
                            p[1]
                        )));
                    }
                    [keys::QTY] if is_increment => {}
                    [keys::UNIT_PRICE | keys::NOTE] if matches!(action, Action::Delete) => {}
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
            [keys::PAYMENTS, pid] => {
                let payment = new_entry(PolicyViolation::EntryRewritten(path.join(".")))?;
                check_new_payment(&ops, &payment, pid, header, &me, device_role)?;
            }
            [keys::PAYMENTS, _pid, keys::TRANSITIONS] if target_new => {
                if !matches!(action, Action::Make(ObjType::Map)) {
                    return Err(PolicyViolation::WrongType {
                        path: path.join("."),
                        expected: "a map",
                    });
                }
            }
            [keys::PAYMENTS, pid, keys::TRANSITIONS, tid] => {
                entry_id::<crate::ids::EntryId>(tid, &path)?;
                let transition = new_entry(PolicyViolation::EntryRewritten(path.join(".")))?;
                // The payment is new when this change created it (the transitions map is
                // created with it).
                let payment_is_new = target_new;
                check_transition(
                    &seen,
                    &ops,
                    &transition,
                    &p,
                    pid,
                    header,
                    payment_is_new,
                    &me,
                    device_role,
                )?;
            }
            [keys::PAYMENTS, _pid, keys::TRANSITIONS, _tid, f] => {
                if !target_new {
                    return Err(PolicyViolation::EntryRewritten(path.join(".")));
                }
                if !matches!(*f, keys::STATE | keys::REFERENCE | keys::BY | keys::AT) {
                    return Err(PolicyViolation::UnknownField(path.join(".")));
                }
            }
            [keys::PAYMENTS, _pid, f] if is_payment_field(f) => {
                if !target_new {
                    return Err(PolicyViolation::EntryRewritten(path.join(".")));
                }
            }
            [keys::PAYMENTS, ..] => return Err(PolicyViolation::UnknownField(path.join("."))),
            [keys::STATUS, eid] => {
                entry_id::<crate::ids::EntryId>(eid, &path)?;
                let entry = new_entry(PolicyViolation::StatusRewritten((*eid).to_owned()))?;
                check_status_entry(&seen, &ops, &entry, eid, &me, device_role)?;
            }
            [keys::STATUS, eid, rest @ ..] => {
                if !target_new {
                    return Err(PolicyViolation::StatusRewritten((*eid).to_owned()));
                }
                if !matches!(rest, [keys::STATUS | keys::CLOCK | keys::AT | keys::BY]) {
                    return Err(PolicyViolation::UnknownField(path.join(".")));
                }
            }
            [keys::ACKS, eid] => {
                entry_id::<crate::ids::EntryId>(eid, &path)?;
                let entry = new_entry(PolicyViolation::EntryRewritten(path.join(".")))?;
                check_by_field(&ops, &entry, &p, keys::BY, &me, device_role)?;
            }
            [keys::ACKS, _eid, rest @ ..] => {
                if !target_new {
                    return Err(PolicyViolation::EntryRewritten(path.join(".")));
                }
                if !matches!(rest, [keys::EDIT | keys::BY | keys::AT | keys::NOTE]) {
                    return Err(PolicyViolation::UnknownField(path.join(".")));
                }
            }
            _ => return Err(PolicyViolation::UnknownField(path.join("."))),
        }
    }
    Ok(())
}

/// An entry's key must be a well-formed id of its kind (the reader refuses anything else).
fn entry_id<T: std::str::FromStr>(key: &str, path: &[String]) -> Result<(), PolicyViolation> {
    key.parse::<T>()
        .map(|_| ())
        .map_err(|_| PolicyViolation::WrongType {
            path: path.join("."),
            expected: "an entry id (UUID)",
        })
}

/// The refusal for an operation that replaces or shadows what is at `path`.
fn rewritten(path: &[String]) -> PolicyViolation {
    match path {
        [k] if k == keys::NUMBER => PolicyViolation::NumberReassigned,
        _ => deleted(path),
    }
}

/// Whether the line holding `line_obj` was removed when the change's author wrote it.
fn line_removed_seen(
    after: &Automerge,
    seen: &Seen<'_>,
    ops: &ChangeOps,
    line_obj: &ObjId,
    field_path: &[&str],
) -> Result<bool, PolicyViolation> {
    // A removal marker that only this change wrote (or none) means "not removed before";
    // markers are write-once, so an order without one now had none earlier either.
    let all = after
        .get_all(line_obj, keys::REMOVED_BY)
        .map_err(|e| not_an_order(e.into()))?;
    if all.iter().all(|(_, id)| ops.is_mine(id)) {
        return Ok(false);
    }
    match field_path {
        [keys::LINES, lid, ..] => seen.has(&[keys::LINES, lid, keys::REMOVED_BY]),
        _ => Ok(false),
    }
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

/// The entry `obj`, created by this change, must name the author in field `field`.
fn check_by_field(
    ops: &ChangeOps,
    obj: &legacy::ObjectId,
    entry: &[&str],
    field: &str,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let v = ops
        .field(obj, field)
        .map(|s| Value::Scalar(std::borrow::Cow::Owned(s.clone())));
    let mut path: Vec<String> = entry.iter().map(|s| (*s).to_owned()).collect();
    path.push(field.to_owned());
    check_by_value(&v, me, device_role, &path)
}

fn resolve(r: &Reader<'_>, path: &[&str]) -> Result<ObjId, PolicyViolation> {
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

fn check_reference_field(
    ops: &ChangeOps,
    obj: &legacy::ObjectId,
    here: &str,
) -> Result<(), PolicyViolation> {
    if let Some(ScalarValue::Str(reference)) = ops.field(obj, keys::REFERENCE)
        && check_reference(reference).is_err()
    {
        return Err(PolicyViolation::CardNumberInReference(format!(
            "{here}.reference"
        )));
    }
    Ok(())
}

fn check_new_payment(
    ops: &ChangeOps,
    obj: &legacy::ObjectId,
    pid: &str,
    header: &Header,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let here = format!("payments.{pid}");
    let _: PaymentId = pid.parse().map_err(not_an_order)?;
    match ops.field(obj, keys::AMOUNT) {
        Some(ScalarValue::Int(a)) if *a > 0 && *a <= MAX_PAYMENT => {}
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
    match ops.field(obj, keys::CURRENCY) {
        Some(ScalarValue::Str(c)) if c.as_str() == header.currency.code() => {}
        Some(ScalarValue::Str(c)) => return Err(PolicyViolation::InvalidCurrency(c.to_string())),
        _ => {
            return Err(PolicyViolation::WrongType {
                path: format!("{here}.currency"),
                expected: "a currency code",
            });
        }
    }
    check_reference_field(ops, obj, &here)?;
    check_by_field(
        ops,
        obj,
        &[keys::PAYMENTS, pid],
        keys::CREATED_BY,
        me,
        device_role,
    )
}

#[allow(clippy::too_many_arguments)]
fn check_transition(
    seen: &Seen<'_>,
    ops: &ChangeOps,
    obj: &legacy::ObjectId,
    tpath: &[&str],
    pid: &str,
    header: &Header,
    payment_is_new: bool,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let here = tpath.join(".");
    let to = match ops.field(obj, keys::STATE) {
        Some(ScalarValue::Str(s)) => s.parse::<PaymentState>().ok(),
        _ => None,
    }
    .ok_or_else(|| PolicyViolation::WrongType {
        path: format!("{here}.state"),
        expected: "a payment state",
    })?;
    if payment_is_new {
        if !to.is_initial() {
            return Err(PolicyViolation::PaymentBackwards {
                payment: pid.to_owned(),
                from: PaymentState::Pending,
                to,
            });
        }
    } else {
        // Forward from the state the author saw (a historical read; transitions are rare).
        let payments = resolve(&seen.r, &[keys::PAYMENTS])?;
        let rec =
            schema::read_payment(&seen.r, &payments, pid, header.currency).map_err(not_an_order)?;
        let from = rec.state();
        if !from.can_move_to(to) {
            return Err(PolicyViolation::PaymentBackwards {
                payment: pid.to_owned(),
                from,
                to,
            });
        }
    }
    check_reference_field(ops, obj, &here)?;
    check_by_field(ops, obj, tpath, keys::BY, me, device_role)
}

fn check_status_entry(
    seen: &Seen<'_>,
    ops: &ChangeOps,
    obj: &legacy::ObjectId,
    eid: &str,
    me: &str,
    device_role: bool,
) -> Result<(), PolicyViolation> {
    let clock = match ops.field(obj, keys::CLOCK) {
        Some(ScalarValue::Uint(c)) => *c,
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
    check_by_field(ops, obj, &[keys::STATUS, eid], keys::BY, me, device_role)
}
