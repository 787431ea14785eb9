//! The board's HTML, as maud templates (checked and compiled with the crate; maud escapes
//! every value it interpolates).
//!
//! The pages are plain documents: tables with captions and header cells, forms with labels,
//! links for navigation. Every action works without JavaScript; the script only applies live
//! updates ([`super::live`]) and keeps ages current. Rows are rendered by the same functions
//! for the first page and for live patches, so a patched row is exactly a fresh one.
//!
//! Money is integer minor units everywhere else; it becomes text here only
//! ([`crdt_model::Money`]'s `Display`).

use std::collections::BTreeMap;

use crdt_model::{Currency, Money, OrderStatus, PaymentState};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::auth::Viewer;
use super::data::{Detail, Row, Snapshot, Tills, day_start};

/// `minor` units of `currency`, as text ("12.50 EUR").
pub(crate) fn money(minor: i64, currency: Currency) -> String {
    Money::new(minor, currency).to_string()
}

/// A duration as a short age ("45 s", "12 min", "3 h 05 min", "2 d 4 h").
pub(crate) fn age(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86_400 => format!("{} h {:02} min", s / 3600, (s % 3600) / 60),
        _ => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// A time as `YYYY-MM-DD HH:MM:SS UTC` (the date left out for `today`'s times).
pub(crate) fn clock(ms: i64, now_ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let t = secs.rem_euclid(86_400);
    let time = format!("{:02}:{:02}:{:02}", t / 3600, (t % 3600) / 60, t % 60);
    if day_start(ms) == day_start(now_ms) {
        return format!("{time} UTC");
    }
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {time} UTC")
}

/// A status as people read it.
pub(crate) fn status_text(s: OrderStatus) -> &'static str {
    match s {
        OrderStatus::InProgress => "In progress",
        OrderStatus::InDelivery => "In delivery",
        OrderStatus::Delayed => "Delayed",
        OrderStatus::Done => "Done",
        OrderStatus::Deleted => "Deleted",
    }
}

fn status_badge(s: OrderStatus) -> Markup {
    html! { span class={"status status-" (s.as_str())} { (status_text(s)) } }
}

fn number(n: Option<u64>) -> String {
    n.map_or_else(|| "(no number yet)".into(), |n| format!("#{n}"))
}

/// The frame every page shares.
fn layout(title: &str, body_attrs: Option<(&str, u64, i64)>, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · back-office board" }
                link rel="stylesheet" href="/board/assets/board.css";
                script src="/board/assets/board.js" defer {}
            }
            @match body_attrs {
                Some((store, since, now)) => body data-store=(store) data-since=(since) data-now=(now) {
                    a class="skip" href="#main" { "Skip to the orders" }
                    (content)
                },
                None => body {
                    a class="skip" href="#main" { "Skip to the content" }
                    (content)
                },
            }
        }
    }
}

/// The sign-in page, with `message` saying why it is shown again.
pub(crate) fn sign_in(message: Option<&str>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            main id="main" class="narrow" {
                h1 { "Back-office board" }
                @if let Some(m) = message {
                    p class="error" role="alert" { (m) }
                }
                form method="post" action="/board/sign-in" class="sign-in" {
                    label for="token" { "Back-office token" }
                    input id="token" name="token" type="password" autocomplete="current-password"
                        required aria-describedby="token-help";
                    p id="token-help" class="help" {
                        "The relay's admin token, or your store's back-office token "
                        "(" code { "relay-server token --name NAME --store STORE" } "). "
                        "Till (device) tokens are not accepted."
                    }
                    button type="submit" { "Sign in" }
                }
            }
        },
    )
}

/// A page that explains a refusal or a failure.
pub(crate) fn problem(title: &str, message: &str) -> Markup {
    layout(
        title,
        None,
        html! {
            main id="main" class="narrow" {
                h1 { (title) }
                p class="error" role="alert" { (message) }
                p { a href="/board" { "Back to the board" } }
            }
        },
    )
}

fn top(viewer: &Viewer, heading: &str) -> Markup {
    html! {
        header class="top" {
            h1 { (heading) }
            p class="who" { "Signed in as " (viewer.to_string()) }
            p id="live" class="live" role="status" aria-live="polite" { "Live updates: connecting" }
            form method="post" action="/board/sign-out" {
                button type="submit" class="quiet" { "Sign out" }
            }
        }
    }
}

/// The admin's store picker.
pub(crate) fn pick_store(viewer: &Viewer, stores: &[crdt_model::StoreId]) -> Markup {
    layout(
        "Pick a store",
        None,
        html! {
            (top(viewer, "Back-office board"))
            main id="main" class="narrow" {
                h2 { "Stores" }
                @if stores.is_empty() {
                    p { "No store has a provisioned till yet." }
                } @else {
                    ul class="stores" {
                        @for s in stores {
                            li { a href={"/board?store=" (super::urlencode(s.as_str()))} { (s.as_str()) } }
                        }
                    }
                }
                form method="get" action="/board" {
                    label for="store" { "Another store" }
                    input id="store" name="store" required;
                    button type="submit" { "Open" }
                }
            }
        },
    )
}

/// A row of the active orders table.
pub(crate) fn active_row(s: &Snapshot, r: &Row, now: i64) -> Markup {
    let c = r.currency;
    html! {
        tr id={"active-" (r.id)} {
            th scope="row" { a href={"/board/orders/" (r.id)} { (number(r.number)) } }
            td { (status_badge(r.status)) }
            td class="num" { (r.lines) }
            td class="num" { (money(r.totals.total, c)) }
            td class="num" { (money(r.totals.paid, c)) }
            td class="num" { (money(r.totals.balance_due, c)) }
            td class="num" { (money(r.totals.change_due, c)) }
            td class="ellipsis" { (s.device_name(r.last_till)) }
            td class="num age" data-since=(r.created_at) { (age(now - r.created_at)) }
        }
    }
}

/// The rows of one order in the "needs a person" table (one `tbody` per order).
pub(crate) fn attention_rows(r: &Row) -> Markup {
    html! {
        tbody id={"attention-" (r.id)} {
            @for issue in &r.issues {
                tr {
                    th scope="row" { a href={"/board/orders/" (r.id)} { (number(r.number)) } }
                    td { (status_badge(r.status)) }
                    td { span class="flag" { (issue.label) } }
                    td class="message" { (issue.message) }
                    td {
                        @if let Some(edit) = &issue.edit {
                            form method="post" action={"/board/orders/" (r.id) "/acknowledge"} {
                                input type="hidden" name="edit" value=(edit);
                                input type="hidden" name="back" value="board";
                                button type="submit" aria-label={"Acknowledge: " (issue.message)} { "Acknowledge" }
                            }
                        } @else {
                            span class="help" { "no acknowledgement" }
                        }
                    }
                }
            }
        }
    }
}

/// A row of the closed-today table.
pub(crate) fn closed_row(s: &Snapshot, r: &Row, now: i64) -> Markup {
    let c = r.currency;
    html! {
        tr id={"closed-" (r.id)} {
            th scope="row" { a href={"/board/orders/" (r.id)} { (number(r.number)) } }
            td { (status_badge(r.status)) }
            td class="num" { (money(r.totals.total, c)) }
            td class="num" { (money(r.totals.paid, c)) }
            td class="num" { (money(r.totals.change_due, c)) }
            td class="num" { (clock(r.status_at, now)) }
            td class="ellipsis" { (s.device_name(r.last_till)) }
        }
    }
}

/// The day's totals by payment kind (per currency: a store may take several).
pub(crate) fn closed_totals(s: &Snapshot, now: i64) -> Markup {
    let today = day_start(now);
    // (currency, kind) -> (payments, captured, refunded); currency -> (sales, sales total).
    let mut kinds: BTreeMap<(String, String), (u64, i64, i64)> = BTreeMap::new();
    let mut sales: BTreeMap<String, (u64, i64, Currency)> = BTreeMap::new();
    for r in s.rows.values().filter(|r| r.is_closed_since(today)) {
        let code = r.currency.code().to_owned();
        if r.status == OrderStatus::Done {
            let e = sales.entry(code.clone()).or_insert((0, 0, r.currency));
            e.0 += 1;
            e.1 = e.1.saturating_add(r.totals.total);
        }
        for (kind, state, amount) in &r.payments {
            let e = kinds.entry((code.clone(), kind.clone())).or_default();
            match state {
                PaymentState::Captured => {
                    e.0 += 1;
                    e.1 = e.1.saturating_add(*amount);
                }
                PaymentState::Refunded => {
                    e.0 += 1;
                    e.2 = e.2.saturating_add(*amount);
                }
                _ => {}
            }
        }
    }
    let currency_of = |code: &str| Currency::new(code).ok();
    html! {
        @if sales.is_empty() && kinds.is_empty() {
            p { "No order closed today yet." }
        } @else {
            table class="totals" {
                caption { "Today's totals by payment kind" }
                thead { tr {
                    th scope="col" { "Kind" }
                    th scope="col" class="num" { "Payments" }
                    th scope="col" class="num" { "Captured" }
                    th scope="col" class="num" { "Refunded" }
                } }
                tbody {
                    @for ((code, kind), (n, captured, refunded)) in &kinds {
                        @if let Some(c) = currency_of(code) {
                            tr {
                                th scope="row" { (kind) }
                                td class="num" { (n) }
                                td class="num" { (money(*captured, c)) }
                                td class="num" { (money(*refunded, c)) }
                            }
                        }
                    }
                }
                tfoot {
                    @for (n, total, c) in sales.values() {
                        tr {
                            th scope="row" { "Sales (Done)" }
                            td class="num" { (n) }
                            td class="num" { (money(*total, *c)) }
                            td {}
                        }
                    }
                }
            }
        }
    }
}

/// The tills block: connections, last seen, refusals, and what the relay cannot know.
pub(crate) fn tills_block(t: &Tills, now: i64) -> Markup {
    html! {
        table {
            caption { "Tills of the store" }
            thead { tr {
                th scope="col" { "Till" }
                th scope="col" { "Connected" }
                th scope="col" { "Last seen" }
                th scope="col" { "Device id" }
            } }
            tbody {
                @for till in &t.tills {
                    tr {
                        th scope="row" { (till.name) }
                        td {
                            @if till.revoked {
                                span class="flag" { "revoked" }
                            } @else if till.connections > 0 {
                                span class="status status-online" { "connected" }
                                @if till.connections > 1 { " (" (till.connections) " connections)" }
                            } @else {
                                span class="status status-offline" { "not connected" }
                            }
                        }
                        td {
                            @match till.last_seen_ms {
                                Some(ms) if till.connections > 0 => { "now (since " (clock(ms, now)) ")" }
                                Some(ms) => { (clock(ms, now)) }
                                None => { "not since the relay started" }
                            }
                        }
                        td class="mono ellipsis" { (till.device.to_string()) }
                    }
                }
            }
        }
        @if t.tills.is_empty() {
            p { "No till is provisioned for this store." }
        }
        h3 { "Changes refused by the policy" }
        @if t.refusals.is_empty() {
            p { "None since the relay started." }
        } @else {
            table {
                caption { "Refused changes, newest first (the till shows these orders Blocked)" }
                thead { tr {
                    th scope="col" { "When" }
                    th scope="col" { "Till" }
                    th scope="col" { "Order" }
                    th scope="col" { "Reason" }
                } }
                tbody {
                    @for r in t.refusals.iter().take(50) {
                        tr {
                            td { (clock(r.at_ms, now)) }
                            td { (t.names.get(&r.device).cloned().unwrap_or_else(|| r.device.to_string())) }
                            td class="mono ellipsis" {
                                @if let Ok(id) = r.order.parse::<crdt_model::OrderId>() {
                                    a href={"/board/orders/" (id)} { (r.order) }
                                } @else { (r.order) }
                            }
                            td { code { (r.code) } ": " (r.message) }
                        }
                    }
                }
            }
        }
        p class="help" {
            "The relay knows connections and refusals since it started. A till's own sync status "
            "(Blocked, Pending) is kept on the till; the relay sees the refusals that block it."
        }
    }
}

/// The number shown next to a section's name.
pub(crate) fn counts(s: &Snapshot, now: i64) -> [(&'static str, usize); 3] {
    let today = day_start(now);
    [
        (
            "count-active",
            s.rows.values().filter(|r| r.is_active()).count(),
        ),
        (
            "count-attention",
            s.rows.values().map(|r| r.issues.len()).sum(),
        ),
        (
            "count-closed",
            s.rows.values().filter(|r| r.is_closed_since(today)).count(),
        ),
    ]
}

/// The store's board.
pub(crate) fn board(viewer: &Viewer, s: &Snapshot, tills: &Tills, now: i64) -> Markup {
    let rows = s.sorted();
    let today = day_start(now);
    let [active_n, attention_n, closed_n] = counts(s, now);
    let store = s.store.as_str();
    layout(
        &format!("Store {store}"),
        Some((store, s.upto, now)),
        html! {
            (top(viewer, &format!("Store {store}")))
            nav aria-label="Sections" {
                ul {
                    li { a href="#active" { "Active orders " span id=(active_n.0) class="count" { (active_n.1) } } }
                    li { a href="#attention" { "Needs a person " span id=(attention_n.0) class="count" { (attention_n.1) } } }
                    li { a href="#closed" { "Closed today " span id=(closed_n.0) class="count" { (closed_n.1) } } }
                    li { a href="#tills" { "Tills" } }
                    @if matches!(viewer, Viewer::Admin) {
                        li { a href="/board?store=" { "Other stores" } }
                    }
                }
            }
            main id="main" {
                @if s.truncated {
                    p class="error" role="alert" {
                        "This store has more than " (super::data::MAX_ROWS)
                        " orders in view; some are left out. The JSON API lists them all."
                    }
                }
                section id="active" aria-labelledby="active-h" {
                    h2 id="active-h" { "Active orders" }
                    div class="scroll" {
                        table {
                            caption class="visually-hidden" { "Active orders, by number" }
                            thead { tr {
                                th scope="col" { "Order" }
                                th scope="col" { "Status" }
                                th scope="col" class="num" { "Lines" }
                                th scope="col" class="num" { "Total" }
                                th scope="col" class="num" { "Paid" }
                                th scope="col" class="num" { "Balance" }
                                th scope="col" class="num" { "Change due" }
                                th scope="col" { "Last till" }
                                th scope="col" class="num" { "Age" }
                            } }
                            tbody id="active-list" {
                                @for r in rows.iter().filter(|r| r.is_active()) {
                                    (active_row(s, r, now))
                                }
                            }
                        }
                    }
                }
                section id="attention" aria-labelledby="attention-h" {
                    h2 id="attention-h" { "Needs a person" }
                    p class="help" {
                        "Late edits (a payment or a line that reached a closed order), refunds "
                        "and overpayments, and concurrent writes the model resolved. "
                        "Acknowledging records who saw it; it changes no money."
                    }
                    div class="scroll" {
                        table id="attention-list" {
                            caption class="visually-hidden" { "Orders that need a person" }
                            thead { tr {
                                th scope="col" { "Order" }
                                th scope="col" { "Status" }
                                th scope="col" { "What" }
                                th scope="col" { "Details" }
                                th scope="col" { "Action" }
                            } }
                            @for r in rows.iter().filter(|r| r.needs_a_person()) {
                                (attention_rows(r))
                            }
                        }
                    }
                }
                section id="closed" aria-labelledby="closed-h" {
                    h2 id="closed-h" { "Closed today" }
                    div id="closed-totals" { (closed_totals(s, now)) }
                    div class="scroll" {
                        table id="closed-table" {
                            caption class="visually-hidden" { "Orders closed today (UTC)" }
                            thead { tr {
                                th scope="col" { "Order" }
                                th scope="col" { "Status" }
                                th scope="col" class="num" { "Total" }
                                th scope="col" class="num" { "Paid" }
                                th scope="col" class="num" { "Change due" }
                                th scope="col" class="num" { "Closed at" }
                                th scope="col" { "Last till" }
                            } }
                            tbody id="closed-list" {
                                @for r in rows.iter().filter(|r| r.is_closed_since(today)) {
                                    (closed_row(s, r, now))
                                }
                            }
                        }
                    }
                }
                section id="tills" aria-labelledby="tills-h" {
                    h2 id="tills-h" { "Tills" }
                    div id="tills-block" { (tills_block(tills, now)) }
                }
            }
        },
    )
}

/// One order's page.
pub(crate) fn order(viewer: &Viewer, d: &Detail, now: i64) -> Markup {
    let v = &d.view;
    let Ok(c) = Currency::new(&v.currency) else {
        return problem("Unreadable order", "The order's currency is not known.");
    };
    let title = format!("Order {}", number(v.number));
    let back = format!("/board?store={}", super::urlencode(d.store.as_str()));
    layout(
        &title,
        None,
        html! {
            (top(viewer, &title))
            nav aria-label="Back" { ul { li { a href=(back) { "Back to the board of store " (d.store.as_str()) } } } }
            main id="main" {
                section aria-labelledby="summary-h" {
                    h2 id="summary-h" { "Summary" }
                    dl class="summary" {
                        dt { "Status" } dd id="order-status" { (status_badge(v.status)) " since " (clock(v.status_at.0, now)) ", by " (d.device_name(Some(v.status_by))) }
                        dt { "Store" } dd { (v.store) }
                        dt { "Created" } dd { (clock(v.created_at.0, now)) " by " (d.device_name(Some(v.created_by))) }
                        dt { "Total" } dd id="order-total" { (money(v.totals.total, c)) }
                        dt { "Paid" } dd { (money(v.totals.paid, c)) }
                        dt { "Refunded" } dd { (money(v.totals.refunded, c)) }
                        dt { "Balance" } dd { (money(v.totals.balance_due, c)) }
                        dt { "Change due" } dd { (money(v.totals.change_due, c)) }
                        dt { "Order id" } dd class="mono" { (v.id) }
                    }
                    @if v.status.is_terminal() {
                        p class="help" { "This order is " (status_text(v.status)) ": a closed order cannot be reopened." }
                    } @else {
                        form method="post" action={"/board/orders/" (d.id) "/status"} class="inline" {
                            label for="status" { "Set status" }
                            select id="status" name="status" {
                                @for s in OrderStatus::ALL {
                                    option value=(s.as_str()) selected[s == v.status] { (status_text(s)) }
                                }
                            }
                            button type="submit" { "Apply" }
                        }
                    }
                }
                @if !v.late_edits.is_empty() || !v.conflicts.is_empty() {
                    section aria-labelledby="flags-h" {
                        h2 id="flags-h" { "Needs a person" }
                        ul class="flags" {
                            @for e in &v.late_edits {
                                li {
                                    span class="flag" { (super::data::issues_of(v).iter().find(|i| i.edit.as_deref() == Some(e.id.as_str())).map_or("Late edit (acknowledged)", |i| i.label)) }
                                    " " (e.message)
                                    @if e.acknowledged {
                                        " — acknowledged by " (d.device_name(e.acknowledged_by))
                                    } @else {
                                        form method="post" action={"/board/orders/" (d.id) "/acknowledge"} class="inline" {
                                            input type="hidden" name="edit" value=(e.id);
                                            button type="submit" { "Acknowledge" }
                                        }
                                    }
                                }
                            }
                            @for cf in &v.conflicts {
                                li { span class="flag" { "Conflict" } " " (cf.subject) ": " (cf.values.join(", ")) "; " (cf.chosen) " shown" }
                            }
                        }
                    }
                }
                section aria-labelledby="lines-h" {
                    h2 id="lines-h" { "Lines" }
                    div class="scroll" {
                        table {
                            caption class="visually-hidden" { "Lines counted in the total" }
                            thead { tr {
                                th scope="col" { "Item" }
                                th scope="col" class="num" { "Qty" }
                                th scope="col" class="num" { "Unit price" }
                                th scope="col" class="num" { "Line total" }
                                th scope="col" { "Added by" }
                                th scope="col" { "Note" }
                            } }
                            tbody {
                                @for (label, lines) in [("", &v.lines), ("late: ", &v.late_lines), ("removed: ", &v.removed_lines)] {
                                    @for l in lines {
                                        tr {
                                            th scope="row" { (label) (l.name) @if !l.sku.is_empty() { " (" (l.sku) ")" } }
                                            td class="num" { (l.quantity) }
                                            td class="num" { (money(l.unit_price, c)) }
                                            td class="num" { (money(l.line_total, c)) }
                                            td { (d.device_name(Some(l.added_by))) ", " (clock(l.added_at.0, now)) }
                                            td { (l.note) @if !l.modifiers.is_empty() { " [" (l.modifiers.join(", ")) "]" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                section aria-labelledby="payments-h" {
                    h2 id="payments-h" { "Payments" }
                    @if v.payments.is_empty() { p { "No payment." } }
                    @for p in &v.payments {
                        div class="payment" {
                            h3 { (p.kind) " " (money(p.amount, c)) ": " (p.state.as_str()) }
                            p { "Recorded by " (d.device_name(Some(p.created_by))) " at " (clock(p.created_at.0, now))
                                @if !p.reference.is_empty() { ", reference " span class="mono" { (p.reference) } } }
                            ol class="history" aria-label="State history" {
                                @for t in &p.history {
                                    li { (t.state.as_str()) " — " (clock(t.at.0, now)) ", " (d.device_name(Some(t.by))) }
                                }
                            }
                        }
                    }
                }
                section aria-labelledby="statuses-h" {
                    h2 id="statuses-h" { "Status history" }
                    ol class="history" {
                        @for s in &d.statuses {
                            li { (s.status) " — " (clock(s.at, now)) ", " (d.device_name(s.by)) }
                        }
                    }
                }
                section aria-labelledby="audit-h" {
                    h2 id="audit-h" { "Audit trail" }
                    details id="audit" {
                        summary { "Every change (" (d.audit.len()) "): who, when, what" }
                        div class="scroll" {
                            table {
                                caption class="visually-hidden" { "Changes in causal order" }
                                thead { tr {
                                    th scope="col" { "When" }
                                    th scope="col" { "Who" }
                                    th scope="col" { "What it changed" }
                                    th scope="col" { "Change" }
                                } }
                                tbody {
                                    @for a in &d.audit {
                                        tr {
                                            td { (clock(a.time.saturating_mul(1000), now)) }
                                            td { (d.device_name(a.device)) }
                                            td class="paths" {
                                                @for (i, what) in changed_summary(&a.changed).iter().enumerate() {
                                                    @if i > 0 { "; " }
                                                    (what)
                                                }
                                            }
                                            td class="mono" { (a.hash.get(..12).unwrap_or(&a.hash)) }
                                        }
                                    }
                                }
                            }
                        }
                        p class="help" {
                            "Changes by \"back office\" were made through the relay (the board or "
                            "the JSON API); an acknowledgement's note says which back-office user."
                        }
                    }
                }
            }
        },
    )
}

/// What a change wrote, readable: the paths of one entry of a map of entries (a line, a
/// payment, a status entry, an acknowledgement) grouped under it, its id shortened to its
/// last 8 characters (`line …2ff5fed: name, qty`); other paths as they are.
pub(crate) fn changed_summary(paths: &[String]) -> Vec<String> {
    let mut groups: Vec<(String, Vec<String>)> = Vec::new();
    for p in paths {
        let mut parts = p.split('.');
        let first = parts.next().unwrap_or_default();
        let entry = match first {
            "lines" => Some("line"),
            "payments" => Some("payment"),
            "status" => Some("status entry"),
            "acks" => Some("acknowledgement"),
            _ => None,
        };
        let (key, field) = match (entry, parts.next()) {
            (Some(name), Some(id)) => {
                let tail: String = id
                    .chars()
                    .rev()
                    .take(8)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                (format!("{name} …{tail}"), parts.next().map(str::to_owned))
            }
            _ => (p.clone(), None),
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, fields)) => fields.extend(field),
            None => groups.push((key, field.into_iter().collect())),
        }
    }
    groups
        .into_iter()
        .map(|(key, mut fields)| {
            fields.dedup();
            if fields.is_empty() {
                key
            } else {
                format!("{key}: {}", fields.join(", "))
            }
        })
        .collect()
}

/// Raw HTML as a JSON-safe string for live patches.
pub(crate) fn fragment(m: Markup) -> String {
    let PreEscaped(s) = m;
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_short() {
        assert_eq!(age(-5), "0 s");
        assert_eq!(age(45_000), "45 s");
        assert_eq!(age(12 * 60_000 + 5), "12 min");
        assert_eq!(age(3 * 3_600_000 + 5 * 60_000), "3 h 05 min");
        assert_eq!(age(2 * 86_400_000 + 4 * 3_600_000), "2 d 4 h");
    }

    #[test]
    fn clock_times_are_utc_with_a_date_for_other_days() {
        let now = 1_700_000_000_000; // 2023-11-14 22:13:20 UTC
        assert_eq!(clock(now, now), "22:13:20 UTC");
        assert_eq!(clock(0, now), "1970-01-01 00:00:00 UTC");
        assert_eq!(clock(951_782_400_000, now), "2000-02-29 00:00:00 UTC");
    }

    #[test]
    fn money_is_formatted_from_minor_units() {
        let eur = Currency::new("EUR").unwrap();
        assert_eq!(money(1250, eur), "12.50 EUR");
        assert_eq!(money(-5, eur), "-0.05 EUR");
    }

    #[test]
    fn changed_paths_are_grouped_by_entry() {
        let paths: Vec<String> = [
            "currency",
            "lines.0190-aaaa-12345678",
            "lines.0190-aaaa-12345678.qty",
            "lines.0190-aaaa-12345678.name",
            "payments.0190-bbbb-87654321.transitions.x.state",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            changed_summary(&paths),
            [
                "currency",
                "line …12345678: qty, name",
                "payment …87654321: transitions"
            ]
        );
    }

    #[test]
    fn interpolated_text_is_escaped() {
        let html = problem("<b>", "a & <script>").into_string();
        assert!(html.contains("&lt;b&gt;"));
        assert!(!html.contains("<script>"));
    }
}
