// The order's view derived from an Automerge document, from the schema and the rules of
// docs/model.md ("Deriving the view") alone: an independent second implementation of the read
// side, written against the npm package @automerge/automerge.
//
// Money and quantities are computed as BigInt (the model's i64, sums clamped to i64), so
// totals are exact; the values Automerge hands back are JS numbers, exact up to 2^53.

import * as A from "@automerge/automerge";

const I64_MIN = -(2n ** 63n);
const I64_MAX = 2n ** 63n - 1n;
const clamp = (v) => (v < I64_MIN ? I64_MIN : v > I64_MAX ? I64_MAX : v);

const STATUS_CLASS = { in_progress: 0, in_delivery: 0, delayed: 0, deleted: 1, done: 2 };
const PAYMENT_RANK = { pending: 0, authorized: 1, voided: 2, captured: 3, refunded: 4 };
const terminal = (s) => s === "done" || s === "deleted";

// Code point order (Rust compares strings by bytes, which is the same thing in UTF-8).
export function cmp(a, b) {
  const x = Array.from(a);
  const y = Array.from(b);
  for (let i = 0; i < Math.min(x.length, y.length); i++) {
    const d = x[i].codePointAt(0) - y[i].codePointAt(0);
    if (d !== 0) return d < 0 ? -1 : 1;
  }
  return x.length - y.length;
}

const str = (v) => (typeof v === "string" ? v : v instanceof A.ImmutableString ? v.val : String(v));
const ms = (v) => (v instanceof Date ? v.getTime() : Number(v));
const int = (v) => (v instanceof A.Counter ? BigInt(v.value) : BigInt(v));
// Ids are UUIDs in canonical hyphenated form; the model prints them in lower case.
const id = (v) => str(v).toLowerCase();
const sortedKeys = (m) => Object.keys(m ?? {}).sort((a, b) => cmp(id(a), id(b)));

// Everything the view needs from the document at one set of heads.
function snapshot(doc) {
  const lines = new Map();
  for (const k of sortedKeys(doc.lines)) {
    const l = doc.lines[k];
    lines.set(id(k), {
      obj: l,
      sku: str(l.sku),
      name: str(l.name),
      unit_price: int(l.unit_price),
      qty: int(l.qty),
      modifiers: Array.from(l.modifiers ?? [], str),
      note: str(l.note),
      added_by: id(l.created_by),
      added_at: ms(l.created_at),
      removed: l.removed_by !== undefined,
    });
  }
  const payments = new Map();
  for (const k of sortedKeys(doc.payments)) {
    const p = doc.payments[k];
    const transitions = new Map();
    for (const t of sortedKeys(p.transitions)) {
      const e = p.transitions[t];
      transitions.set(id(t), {
        state: str(e.state),
        at: ms(e.at),
        by: id(e.by),
        reference: e.reference === undefined ? null : str(e.reference),
      });
    }
    payments.set(id(k), {
      kind: str(p.kind),
      amount: int(p.amount),
      currency: str(p.currency),
      reference: str(p.reference),
      created_by: id(p.created_by),
      created_at: ms(p.created_at),
      transitions,
    });
  }
  const status = [];
  for (const k of sortedKeys(doc.status)) {
    const s = doc.status[k];
    status.push({ id: id(k), status: str(s.status), clock: Number(s.clock), at: ms(s.at), by: id(s.by), obj: s });
  }
  const acks = [];
  for (const k of sortedKeys(doc.acks)) {
    acks.push({ id: id(k), edit: str(doc.acks[k].edit), by: id(doc.acks[k].by) });
  }
  return { lines, payments, status, acks };
}

// The status lattice: rank = (class, clock, entry id, status name).
function rankCmp(a, b) {
  return (
    STATUS_CLASS[a.status] - STATUS_CLASS[b.status] ||
    a.clock - b.clock ||
    cmp(a.id, b.id) ||
    cmp(a.status, b.status)
  );
}

const paymentState = (p) =>
  [...p.transitions.values()].reduce(
    (acc, t) => (PAYMENT_RANK[t.state] > PAYMENT_RANK[acc] ? t.state : acc),
    "pending",
  );

function latestReference(p) {
  const ts = [...p.transitions.values()].sort((a, b) => PAYMENT_RANK[a.state] - PAYMENT_RANK[b.state]);
  for (let i = ts.length - 1; i >= 0; i--) if (ts[i].reference !== null) return ts[i].reference;
  return p.reference;
}

function lineView(lid, l) {
  const quantity = l.qty > 0n ? l.qty : 0n;
  return {
    id: lid,
    sku: l.sku,
    name: l.name,
    unit_price: l.unit_price,
    quantity,
    modifiers: l.modifiers,
    note: l.note,
    line_total: clamp(l.unit_price * quantity),
    added_by: l.added_by,
    added_at: l.added_at,
    removed: l.removed,
  };
}

// The change that made object `objId` ("counter@actor"): its hash.
function changeOf(doc, objId) {
  const at = objId.indexOf("@");
  const counter = Number(objId.slice(0, at));
  const actor = objId.slice(at + 1);
  for (const bytes of A.getAllChanges(doc)) {
    const c = A.decodeChange(bytes);
    if (c.actor === actor && c.startOp <= counter && counter < c.startOp + c.ops.length) return c.hash;
  }
  throw new Error(`no change made object ${objId}`);
}

// Every value written concurrently at `key` of `obj`, as the model prints them.
function conflictValues(obj, key) {
  const all = A.getConflicts(obj, key);
  if (!all) return [];
  return Object.values(all).map((v) => (typeof v === "number" || typeof v === "bigint" ? String(v) : str(v)));
}

/** The view of the order in `doc` (docs/conformance.md, "The view"). */
export function deriveView(doc) {
  const now = snapshot(doc);
  if (now.status.length === 0) throw new Error("empty status log");
  const top = now.status.reduce((a, b) => (rankCmp(a, b) >= 0 ? a : b));
  const closedAs = terminal(top.status) ? top.status : null;

  let closed = null;
  if (closedAs) {
    const hash = changeOf(doc, A.getObjectId(top.obj));
    const heads = A.getHeads(doc);
    closed = heads.length === 1 && heads[0] === hash ? now : snapshot(A.view(doc, [hash]));
  }
  const ackedBy = (editId) => {
    const a = now.acks.find((x) => x.edit === editId);
    return a ? a.by : null;
  };
  const lateEdit = (editId, kind, message) => ({
    id: editId,
    kind,
    message,
    acknowledged: ackedBy(editId) !== null,
    acknowledged_by: ackedBy(editId),
  });

  const lateEdits = [];
  const lateLines = [];
  if (closed) {
    for (const [lid, line] of now.lines) {
      const before = closed.lines.get(lid);
      let kind;
      let message;
      if (!before) {
        if (line.removed) continue;
        kind = "line_added";
        message = `line ${line.name} x${line.qty} added concurrently with ${closedAs}: not in the total, unpaid`;
      } else if (!before.removed && line.removed) {
        kind = "line_removed";
        message = `line ${line.name} removed concurrently with ${closedAs}: it was sold as closed`;
      } else if (before.qty !== line.qty || before.unit_price !== line.unit_price || before.note !== line.note) {
        kind = "line_changed";
        message =
          `line ${line.name} changed concurrently with ${closedAs} (qty ${before.qty} -> ${line.qty}, ` +
          `unit price ${before.unit_price} -> ${line.unit_price}): the total keeps the closed values`;
      } else continue;
      lateLines.push(lineView(lid, line));
      lateEdits.push(lateEdit(`line:${lid}`, kind, message));
    }
    for (const [pid, p] of now.payments) {
      const seen = closed.payments.get(pid);
      const late = [...p.transitions.entries()]
        .filter(([tid, t]) => t.state !== "voided" && t.state !== "refunded" && !(seen && seen.transitions.has(tid)))
        .map(([, t]) => t.state);
      if (late.length === 0) continue;
      const state = paymentState(p);
      const capturedAgain = seen !== undefined && paymentState(seen) === "captured" && late.every((s) => s === "captured");
      let message;
      if (closedAs === "done" && state === "captured" && capturedAgain) {
        message = `${p.kind} payment of ${p.amount} captured twice concurrently (once with ${closedAs}): counted once, nothing to refund`;
      } else {
        const consequence =
          closedAs === "deleted" && state === "captured"
            ? "refund needed"
            : state === "captured"
              ? "overpayment: refund or hand back change"
              : state === "pending" || state === "authorized"
                ? "void or capture it"
                : "settled";
        message = `${p.kind} payment of ${p.amount} (${state}) recorded concurrently with ${closedAs}: ${consequence}`;
      }
      lateEdits.push(lateEdit(`payment:${pid}`, "payment", message));
    }
    for (const s of now.status) {
      if (s.id === top.id || closed.status.some((c) => c.id === s.id)) continue;
      if (terminal(s.status)) {
        lateEdits.push(
          lateEdit(`status:${s.id}`, "concurrent_close", `order also set ${s.status} concurrently by ${s.by}; ${closedAs} stands`),
        );
      } else {
        lateEdits.push(
          lateEdit(`status:${s.id}`, "status_ignored", `status ${s.status} set concurrently with ${closedAs} by ${s.by}; ignored`),
        );
      }
    }
  }
  lateEdits.sort((a, b) => cmp(a.id, b.id));

  const lines = [];
  const removedLines = [];
  let total = 0n;
  for (const [lid, l] of (closed ?? now).lines) {
    if (l.removed) continue;
    const v = lineView(lid, l);
    total += v.line_total;
    lines.push(v);
  }
  for (const [lid, l] of now.lines) if (l.removed) removedLines.push(lineView(lid, l));

  let paid = 0n;
  let refunded = 0n;
  const payments = [];
  const conflicts = [];
  for (const [pid, p] of now.payments) {
    const state = paymentState(p);
    if (state === "captured") paid += p.amount;
    if (state === "refunded") refunded += p.amount;
    const ts = [...p.transitions.values()];
    const captures = ts.filter((t) => t.state === "captured").length;
    const voided = ts.some((t) => t.state === "voided") && ts.some((t) => t.state === "captured" || t.state === "refunded");
    if (voided || captures > 1) {
      const values = Array(Math.max(captures, 1)).fill("captured");
      if (voided) values.push("voided");
      conflicts.push({ subject: `payment:${pid}.state`, values, chosen: state });
    }
    const history = [...p.transitions.entries()]
      .map(([tid, t]) => ({ id: tid, state: t.state, at: t.at, by: t.by }))
      .sort((a, b) => PAYMENT_RANK[a.state] - PAYMENT_RANK[b.state] || cmp(a.id, b.id));
    payments.push({
      id: pid,
      kind: p.kind,
      amount: p.amount,
      currency: p.currency,
      reference: latestReference(p),
      state,
      created_by: p.created_by,
      created_at: p.created_at,
      history,
    });
  }

  for (const [lid, l] of now.lines) {
    for (const key of ["unit_price", "note"]) {
      const values = conflictValues(l.obj, key);
      if (values.length > 1) {
        values.sort(cmp);
        const chosen = key === "unit_price" ? String(l.unit_price) : l.note;
        conflicts.push({ subject: `line:${lid}.${key}`, values, chosen });
      }
    }
    if (l.qty < 0n) conflicts.push({ subject: `line:${lid}.qty`, values: [String(l.qty)], chosen: "0" });
  }
  // Concurrent active statuses at the highest clock among active entries, order still open.
  const active = now.status.filter((s) => !terminal(s.status));
  if (active.length > 0 && !closedAs) {
    const maxClock = Math.max(...active.map((s) => s.clock));
    const tied = active.filter((s) => s.clock === maxClock);
    const values = [...new Set(tied.map((s) => s.status))].sort(cmp);
    if (tied.length > 1 && values.length > 1) conflicts.push({ subject: "status", values, chosen: top.status });
  }
  conflicts.sort((a, b) => cmp(a.subject, b.subject));

  total = top.status === "deleted" ? 0n : clamp(total);
  paid = clamp(paid);
  const sat = (v) => (v < 0n ? 0n : clamp(v));
  return {
    id: id(doc.id),
    store: str(doc.store),
    number: doc.number === undefined ? null : BigInt(doc.number),
    currency: str(doc.currency),
    created_by: id(doc.created_by),
    created_at: ms(doc.created_at),
    status: top.status,
    status_at: top.at,
    status_by: top.by,
    lines,
    removed_lines: removedLines,
    late_lines: lateLines,
    payments,
    totals: {
      total,
      paid,
      refunded: clamp(refunded),
      balance_due: sat(total - paid),
      change_due: sat(paid - total),
    },
    late_edits: lateEdits,
    conflicts,
  };
}

function writeString(s) {
  let out = '"';
  for (const ch of s) {
    const c = ch.codePointAt(0);
    if (ch === '"') out += '\\"';
    else if (ch === "\\") out += "\\\\";
    else if (ch === "\n") out += "\\n";
    else if (ch === "\r") out += "\\r";
    else if (ch === "\t") out += "\\t";
    else if (c === 8) out += "\\b";
    else if (c === 12) out += "\\f";
    else if (c < 0x20) out += "\\u" + c.toString(16).padStart(4, "0");
    else out += ch;
  }
  return out + '"';
}

/** Canonical JSON: keys in code point order, no whitespace, integers as digits. */
export function canonical(v) {
  if (v === null) return "null";
  if (typeof v === "boolean") return v ? "true" : "false";
  if (typeof v === "bigint") return v.toString();
  if (typeof v === "number") {
    if (!Number.isSafeInteger(v)) throw new Error(`not an exact integer: ${v}`);
    return String(v);
  }
  if (typeof v === "string") return writeString(v);
  if (Array.isArray(v)) return "[" + v.map(canonical).join(",") + "]";
  const keys = Object.keys(v).sort(cmp);
  return "{" + keys.map((k) => writeString(k) + ":" + canonical(v[k])).join(",") + "}";
}
