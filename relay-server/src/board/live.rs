//! Live updates: `GET /board/events`, a stream of server-sent events that patch the page.
//!
//! The stream subscribes to the hub's commit announcements ([`crate::watch::Watch`]) before
//! it reads the store, so no commit falls between the read and the subscription. An
//! announcement for its store makes it read the store feed from the last position it saw
//! ([`super::data::Snapshot::advance`]) and send, for every order that moved, its rows as
//! fresh HTML (or their removal), and the section counts and the day's totals. The
//! announcement comes after the commit is durable, and the rows are read back from the store,
//! so the page never shows what is not on disk. Tills are read again every second and sent
//! when they changed.
//!
//! Event `patch`, data JSON: `{"since": N, "rows": [{"section", "key", "html"|null}],
//! "blocks": {"element id": "html"}, "reset": {"element id": "html"}?}`. `reset` replaces a
//! whole list (sent first when the store moved between the page's read and the stream's).
//!
//! The stream ends when the relay shuts down; its connection's idle deadline (see
//! `server::http_deadline`) is off while it runs and set again when it ends.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use crdt_model::OrderId;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};

use super::data::{self, Snapshot, day_start};
use super::pages::{self, fragment};
use super::{auth, problem, store_of};
use crate::admission::{Handshake, PeerInfo};
use crate::server::AppState;
use crdt_model::StoreId;

/// How often the tills are read again.
const TILLS_EVERY: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
pub(crate) struct EventsQuery {
    store: Option<String>,
    since: Option<u64>,
}

/// Sets a connection's idle deadline again when its stream ends.
struct Rearm {
    handshake: Arc<Handshake>,
    timeout: Duration,
}

impl Drop for Rearm {
    fn drop(&mut self) {
        self.handshake.arm(self.timeout);
    }
}

/// One viewer's stream.
struct Live {
    state: AppState,
    snapshot: Snapshot,
    commits: broadcast::Receiver<StoreId>,
    shutdown: watch::Receiver<bool>,
    tick: tokio::time::Interval,
    tills: String,
    first: Option<Event>,
    _permit: OwnedSemaphorePermit,
    _rearm: Rearm,
}

/// The section counts and the day's totals, as blocks to replace.
fn blocks(s: &Snapshot, now: i64) -> Map<String, Value> {
    let mut b = Map::new();
    for (id, n) in pages::counts(s, now) {
        b.insert(id.into(), Value::String(n.to_string()));
    }
    b.insert(
        "closed-totals".into(),
        Value::String(fragment(pages::closed_totals(s, now))),
    );
    b
}

/// The rows of `order` in each section: fresh HTML, or `null` where it is not (any more).
fn rows(s: &Snapshot, order: &OrderId, now: i64, out: &mut Vec<Value>) {
    let today = day_start(now);
    let row = s.rows.get(order);
    let active = row
        .filter(|r| r.is_active())
        .map(|r| fragment(pages::active_row(s, r, now)));
    let attention = row
        .filter(|r| r.needs_a_person())
        .map(|r| fragment(pages::attention_rows(r)));
    let closed = row
        .filter(|r| r.is_closed_since(today))
        .map(|r| fragment(pages::closed_row(s, r, now)));
    for (section, html) in [
        ("active", active),
        ("attention", attention),
        ("closed", closed),
    ] {
        out.push(json!({ "section": section, "key": order.to_string(), "html": html }));
    }
}

fn patch(data: &Value) -> Event {
    Event::default().event("patch").data(data.to_string())
}

/// Every list of the page, whole.
fn reset(s: &Snapshot, now: i64) -> Value {
    let today = day_start(now);
    let sorted = s.sorted();
    let join = |f: &dyn Fn(&data::Row) -> Option<String>| -> String {
        sorted.iter().filter_map(|r| f(r)).collect()
    };
    json!({
        "active-list": join(&|r| r.is_active().then(|| fragment(pages::active_row(s, r, now)))),
        "attention-list": join(&|r| r.needs_a_person().then(|| fragment(pages::attention_rows(r)))),
        "closed-list": join(&|r| r.is_closed_since(today).then(|| fragment(pages::closed_row(s, r, now)))),
    })
}

impl Live {
    async fn next(&mut self) -> Option<Event> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            if *self.shutdown.borrow() {
                return None;
            }
            tokio::select! {
                changed = self.shutdown.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                got = self.commits.recv() => {
                    match got {
                        Ok(store) if store != self.snapshot.store => continue,
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return None,
                    }
                    // Announcements already queued are covered by the one read below.
                    while let Ok(_) | Err(TryRecvError::Lagged(_)) = self.commits.try_recv() {}
                    match self.snapshot.advance(&self.state.store).await {
                        Ok(changed) if !changed.is_empty() => {
                            let now = crate::clock::now_ms();
                            let mut out = Vec::new();
                            for order in &changed {
                                rows(&self.snapshot, order, now, &mut out);
                            }
                            let data = json!({
                                "since": self.snapshot.upto,
                                "rows": out,
                                "blocks": blocks(&self.snapshot, now),
                            });
                            return Some(patch(&data));
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(store = %self.snapshot.store, error = %e, "board: cannot read the store feed");
                        }
                    }
                }
                _ = self.tick.tick() => {
                    let tills = data::tills(&self.state, &self.snapshot.store).await;
                    let html = fragment(pages::tills_block(&tills, crate::clock::now_ms()));
                    if html != self.tills {
                        self.tills = html.clone();
                        let mut b = Map::new();
                        b.insert("tills-block".into(), Value::String(html));
                        return Some(patch(&json!({ "since": self.snapshot.upto, "rows": [], "blocks": b })));
                    }
                }
            }
        }
    }
}

/// `GET /board/events?store=S&since=N`: the live stream of the store's board, from feed
/// position `N` (the page's).
pub(crate) async fn events(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Response {
    let rearm = Rearm {
        handshake: Arc::clone(&peer.handshake),
        timeout: state.config.handshake_timeout,
    };
    let viewer = match auth::viewer(&state, &headers).await {
        Ok(v) => v,
        Err(refused) => return refused.page(),
    };
    let Some(store) = store_of(&viewer, q.store.as_deref()) else {
        return problem(
            StatusCode::NOT_FOUND,
            "No such store",
            "Name a store you may see.",
        );
    };
    let Ok(permit) = Arc::clone(&state.board.streams).try_acquire_owned() else {
        return problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too many boards open",
            "Close a board in another tab, or try again later.",
        );
    };
    // Subscribed before the read: a commit after the read is announced to this receiver.
    let commits = state.hub.watch().subscribe();
    let snapshot = match Snapshot::read(&state, store).await {
        Ok(s) => s,
        Err(e) => return super::relay_problem(&e),
    };
    let now = crate::clock::now_ms();
    let tills = data::tills(&state, &snapshot.store).await;
    let tills = fragment(pages::tills_block(&tills, now));
    let first = (q.since.unwrap_or(0) != snapshot.upto).then(|| {
        let mut b = blocks(&snapshot, now);
        b.insert("tills-block".into(), Value::String(tills.clone()));
        patch(&json!({
            "since": snapshot.upto,
            "rows": [],
            "blocks": b,
            "reset": reset(&snapshot, now),
        }))
    });
    let mut tick = tokio::time::interval(TILLS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let live = Live {
        shutdown: state.shutdown.clone(),
        state,
        snapshot,
        commits,
        tick,
        tills,
        first,
        _permit: permit,
        _rearm: rearm,
    };
    let stream = futures_util::stream::unfold(live, |mut live| async move {
        let event = live.next().await?;
        Some((Ok::<Event, Infallible>(event), live))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
