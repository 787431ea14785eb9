//! The back-office board: a web page of a store's orders at `/board`, served by the relay.
//!
//! It lives in the HTTP driver, next to the JSON API ([`crate::server`]), and reads what the API
//! reads: the store feed and the stored orders ([`crate::backend::Backend`]). It writes only
//! through the hub's back-office path ([`crate::hub::Hub::back_office`]): a status change or
//! an acknowledgement of a late edit, authored by the relay and checked by the policy like a
//! device's change.
//!
//! * `auth`: sign-in (a back-office token in an `HttpOnly`, `SameSite=Strict` cookie, or the
//!   `Authorization` header), and who may see which store.
//! * `data`: what the board shows, read from the store: one row per order, the day's closed
//!   orders, tills.
//! * `pages`: the HTML (maud templates, checked when the crate compiles).
//! * `live`: the server-sent events that patch the page when the hub announces a durable
//!   commit of the store ([`crate::watch`]).
//!
//! The CSS and the JavaScript are compiled into the binary (`include_str!`): nothing to build
//! or install besides the relay.

// Handlers answer a refusal with a page: a `Response` as the error of a few helpers, made
// once per request.
#![allow(clippy::result_large_err)]

mod auth;
mod data;
mod live;
mod pages;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use crdt_model::{OrderId, OrderStatus, StoreId};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::core::BackOfficeOp;
use crate::error::RelayError;
use crate::server::AppState;
use auth::Viewer;

/// The board's stylesheet.
const CSS: &str = include_str!("board/board.css");
/// The board's script: live updates, ages, nothing else (every action is a plain form).
const JS: &str = include_str!("board/board.js");

/// Largest form body the board reads, bytes (a token or a status: a few dozen bytes).
const MAX_FORM_BYTES: usize = 4 * 1024;
/// Live event streams open at once, over every viewer; more are answered `503`.
pub(crate) const MAX_STREAMS: usize = 64;

/// The board's own state, shared by its handlers.
#[derive(Debug)]
pub(crate) struct Board {
    /// Permits for live event streams ([`MAX_STREAMS`]).
    streams: Arc<Semaphore>,
}

impl Default for Board {
    fn default() -> Self {
        Self {
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }
}

/// The board's routes, merged into the relay's router.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/board", get(board))
        .route("/board/sign-in", post(auth::sign_in))
        .route("/board/sign-out", post(auth::sign_out))
        .route("/board/events", get(live::events))
        .route("/board/orders/{id}", get(order))
        .route("/board/orders/{id}/status", post(set_status))
        .route("/board/orders/{id}/acknowledge", post(acknowledge))
        .route("/board/assets/board.css", get(css))
        .route("/board/assets/board.js", get(js))
}

/// The path of the live event stream: its connection keeps no idle deadline while it runs.
pub(crate) const EVENTS_PATH: &str = "/board/events";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

/// An HTML page with the board's headers (no caching: it holds live data; no framing).
fn html(status: StatusCode, markup: maud::Markup) -> Response {
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'self'; style-src 'self'; script-src 'self'; \
                     form-action 'self'; frame-ancestors 'none'",
                ),
            ),
        ],
        markup.into_string(),
    )
        .into_response()
}

/// A page that says what went wrong, with the status code that says it to machines.
fn problem(status: StatusCode, title: &str, message: &str) -> Response {
    html(status, pages::problem(title, message))
}

/// A failure from the relay, as a page.
fn relay_problem(e: &RelayError) -> Response {
    use crdt_model::ModelError as M;
    match e.inner() {
        RelayError::NotFound(what) => problem(StatusCode::NOT_FOUND, "Not found", what),
        RelayError::Model(M::OrderClosed { .. }) => problem(
            StatusCode::CONFLICT,
            "The order is closed",
            "A Done or Deleted order cannot be reopened.",
        ),
        RelayError::Model(M::Policy(v)) => problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Refused by the policy",
            &format!("{v} ({})", v.code()),
        ),
        RelayError::Model(m) => problem(StatusCode::BAD_REQUEST, "Refused", &m.to_string()),
        RelayError::ShuttingDown => problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "The relay is stopping",
            "Try again in a moment.",
        ),
        _ => {
            tracing::warn!(error = %e, "board request failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something failed",
                &e.to_string(),
            )
        }
    }
}

/// Reads a small urlencoded form body.
async fn read_form<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(body, MAX_FORM_BYTES)
        .await
        .map_err(|_| {
            problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Form too large",
                "The form sent more than the board reads.",
            )
        })?;
    serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| problem(StatusCode::BAD_REQUEST, "Unreadable form", &e.to_string()))
}

#[derive(Deserialize)]
struct BoardQuery {
    store: Option<String>,
}

/// `GET /board`: the sign-in form, the store picker (admin), or the store's board.
async fn board(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<BoardQuery>,
) -> Response {
    let viewer = match auth::viewer(&state, &headers).await {
        Ok(v) => v,
        Err(auth::Refused::NoToken) => return html(StatusCode::OK, pages::sign_in(None)),
        Err(refused) => return refused.page(),
    };
    let store = match (&viewer, q.store.as_deref().map(str::trim)) {
        (Viewer::Store(own), None) => own.clone(),
        (_, Some(asked)) if !asked.is_empty() => match viewer.store(asked) {
            Some(s) => s,
            None => {
                return problem(
                    StatusCode::NOT_FOUND,
                    "No such store",
                    "This token does not open that store.",
                );
            }
        },
        (Viewer::Admin, _) => {
            let stores = match data::known_stores(&state).await {
                Ok(s) => s,
                Err(e) => return relay_problem(&e),
            };
            return html(StatusCode::OK, pages::pick_store(&viewer, &stores));
        }
        (Viewer::Store(own), Some(_)) => own.clone(),
    };
    match data::Snapshot::read(&state, store).await {
        Ok(snapshot) => {
            let tills = data::tills(&state, &snapshot.store).await;
            html(
                StatusCode::OK,
                pages::board(&viewer, &snapshot, &tills, crate::clock::now_ms()),
            )
        }
        Err(e) => relay_problem(&e),
    }
}

/// The order named in a path, if `viewer` may see it; a page saying why not otherwise.
async fn visible_order(
    state: &AppState,
    viewer: &Viewer,
    id: &str,
) -> Result<data::Detail, Response> {
    let not_found = || problem(StatusCode::NOT_FOUND, "No such order", id);
    let order: OrderId = id.parse().map_err(|_| not_found())?;
    match data::Detail::read(state, order).await {
        Ok(Some(d)) if viewer.sees(&d.store) => Ok(d),
        Ok(_) => Err(not_found()),
        Err(e) => Err(relay_problem(&e)),
    }
}

/// `GET /board/orders/{id}`: one order: lines, payments, statuses, flags, audit trail.
async fn order(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let viewer = match auth::viewer(&state, &headers).await {
        Ok(v) => v,
        Err(refused) => return refused.page(),
    };
    match visible_order(&state, &viewer, &id).await {
        Ok(detail) => html(
            StatusCode::OK,
            pages::order(&viewer, &detail, crate::clock::now_ms()),
        ),
        Err(page) => page,
    }
}

#[derive(Deserialize)]
struct StatusForm {
    status: String,
}

/// `POST /board/orders/{id}/status`: the back-office status change, then back to the order.
async fn set_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let viewer = match auth::writer(&state, &headers).await {
        Ok(v) => v,
        Err(refused) => return refused.page(),
    };
    let form: StatusForm = match read_form(body).await {
        Ok(f) => f,
        Err(page) => return page,
    };
    let Ok(status) = form.status.parse::<OrderStatus>() else {
        return problem(
            StatusCode::BAD_REQUEST,
            "Unknown status",
            "Pick one of the statuses offered.",
        );
    };
    let detail = match visible_order(&state, &viewer, &id).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    let op = BackOfficeOp::Status(status);
    match state.hub.back_office(detail.id, viewer.scope(), op).await {
        Ok(_) => {
            tracing::info!(order = %detail.id, %status, by = %viewer, "status set on the board");
            Redirect::to(&format!("/board/orders/{}", detail.id)).into_response()
        }
        Err(e) => relay_problem(&e),
    }
}

#[derive(Deserialize)]
struct AckForm {
    edit: String,
    /// Where to go afterwards: `board` (the store's board) or the order's page.
    #[serde(default)]
    back: String,
}

/// `POST /board/orders/{id}/acknowledge`: the model's acknowledgement of a late edit,
/// authored by the back office (its note says who), then back where the button was.
async fn acknowledge(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Response {
    let viewer = match auth::writer(&state, &headers).await {
        Ok(v) => v,
        Err(refused) => return refused.page(),
    };
    let form: AckForm = match read_form(body).await {
        Ok(f) => f,
        Err(page) => return page,
    };
    let detail = match visible_order(&state, &viewer, &id).await {
        Ok(d) => d,
        Err(page) => return page,
    };
    let op = BackOfficeOp::Acknowledge {
        edit: form.edit.chars().take(200).collect(),
        note: format!("acknowledged on the board by {viewer}"),
    };
    match state.hub.back_office(detail.id, viewer.scope(), op).await {
        Ok(_) => {
            tracing::info!(order = %detail.id, edit = %form.edit, by = %viewer, "late edit acknowledged on the board");
            let to = if form.back == "board" {
                format!(
                    "/board?store={}#attention",
                    urlencode(detail.store.as_str())
                )
            } else {
                format!("/board/orders/{}", detail.id)
            };
            Redirect::to(&to).into_response()
        }
        Err(e) => relay_problem(&e),
    }
}

/// Percent-encodes a query value (store ids are printable, but may hold any of `&=#?%+`).
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The store a page is about, as the viewer may name it.
fn store_of(viewer: &Viewer, asked: Option<&str>) -> Option<StoreId> {
    match (viewer, asked) {
        (Viewer::Store(own), None) => Some(own.clone()),
        (_, Some(asked)) => viewer.store(asked),
        (Viewer::Admin, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(urlencode("store-12"), "store-12");
        assert_eq!(urlencode("a b&c=d#"), "a%20b%26c%3Dd%23");
    }
}
