//! The view as JSON for conformance vectors, field by field (`docs/conformance.md`, "The view"),
//! and canonical JSON: object keys sorted by code point, no whitespace, integers only.
//!
//! The mapping is written out here rather than taken from `OrderView`'s serde derive, so the
//! format stays what the document says even if the Rust type's serialisation changes.

use crdt_model::{Conflict, LateEdit, LateEditKind, LineView, OrderView, PaymentView};
use serde_json::{Value, json};

/// The name of a late edit kind in the view JSON.
pub fn view_json_kind(k: LateEditKind) -> &'static str {
    match k {
        LateEditKind::LineAdded => "line_added",
        LateEditKind::LineChanged => "line_changed",
        LateEditKind::LineRemoved => "line_removed",
        LateEditKind::Payment => "payment",
        LateEditKind::StatusIgnored => "status_ignored",
        LateEditKind::ConcurrentClose => "concurrent_close",
    }
}

fn line(l: &LineView) -> Value {
    json!({
        "id": l.id.to_string(),
        "sku": l.sku,
        "name": l.name,
        "unit_price": l.unit_price,
        "quantity": l.quantity,
        "modifiers": l.modifiers,
        "note": l.note,
        "line_total": l.line_total,
        "added_by": l.added_by.to_string(),
        "added_at": l.added_at.0,
        "removed": l.removed,
    })
}

fn payment(p: &PaymentView) -> Value {
    let history: Vec<Value> = p
        .history
        .iter()
        .map(|t| {
            json!({
                "id": t.id.to_string(),
                "state": t.state.as_str(),
                "at": t.at.0,
                "by": t.by.to_string(),
            })
        })
        .collect();
    json!({
        "id": p.id.to_string(),
        "kind": p.kind,
        "amount": p.amount,
        "currency": p.currency,
        "reference": p.reference,
        "state": p.state.as_str(),
        "created_by": p.created_by.to_string(),
        "created_at": p.created_at.0,
        "history": history,
    })
}

fn late_edit(e: &LateEdit) -> Value {
    json!({
        "id": e.id,
        "kind": view_json_kind(e.kind),
        "message": e.message,
        "acknowledged": e.acknowledged,
        "acknowledged_by": e.acknowledged_by.map(|d| d.to_string()),
    })
}

fn conflict(c: &Conflict) -> Value {
    json!({
        "subject": c.subject,
        "values": c.values,
        "chosen": c.chosen,
    })
}

/// The view of `docs/conformance.md` for `v`.
pub fn view_json(v: &OrderView) -> Value {
    json!({
        "id": v.id,
        "store": v.store,
        "number": v.number,
        "currency": v.currency,
        "created_by": v.created_by.to_string(),
        "created_at": v.created_at.0,
        "status": v.status.as_str(),
        "status_at": v.status_at.0,
        "status_by": v.status_by.to_string(),
        "lines": v.lines.iter().map(line).collect::<Vec<_>>(),
        "removed_lines": v.removed_lines.iter().map(line).collect::<Vec<_>>(),
        "late_lines": v.late_lines.iter().map(line).collect::<Vec<_>>(),
        "payments": v.payments.iter().map(payment).collect::<Vec<_>>(),
        "totals": {
            "total": v.totals.total,
            "paid": v.totals.paid,
            "refunded": v.totals.refunded,
            "balance_due": v.totals.balance_due,
            "change_due": v.totals.change_due,
        },
        "late_edits": v.late_edits.iter().map(late_edit).collect::<Vec<_>>(),
        "conflicts": v.conflicts.iter().map(conflict).collect::<Vec<_>>(),
    })
}

/// Canonical JSON of `v`: keys sorted by code point, no whitespace, strings escaped as JSON
/// requires (`"`, `\`, control characters) and nothing else.
pub fn canonical(v: &Value) -> String {
    let mut out = String::new();
    write_canonical(v, &mut out);
    out
}

fn write_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            // Code point order is byte order in UTF-8.
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(&map[k.as_str()], out);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_sorts_keys_and_escapes_only_what_json_requires() {
        let v = json!({"b": [1, -2, "x\"y\\z\n\u{1}é"], "a": {"d": null, "c": true}});
        assert_eq!(
            canonical(&v),
            r#"{"a":{"c":true,"d":null},"b":[1,-2,"x\"y\\z\n\u0001é"]}"#
        );
    }
}
