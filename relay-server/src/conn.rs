//! One device connection: the `hello`/`welcome` handshake, frame decoding, rate limiting, the
//! feed catch-up, and the loop that moves frames between the socket and the hub.

use std::sync::Arc;
use std::time::{Duration, Instant};

use automerge::sync;
use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket};
use crdt_model::wire::{ClientFrame, PROTOCOL_MAJOR, RelayFrame, Version, codes};

use crate::core::Incoming;
use crdt_model::{DeviceId, OrderId, StoreId};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};

use crate::admission::Ticket;
use crate::hub::{OUTBOX_CAPACITY, Peer, feed_entry};
use crate::server::AppState;

/// Feed entries per `feed` frame during catch-up.
const FEED_PAGE: usize = 500;
/// How long queued frames still go out after the hub closed a connection.
const KILL_DRAIN: Duration = Duration::from_secs(1);
/// Most queued frames written before one flush.
const OUTBOX_BATCH: u64 = 64;

/// A token bucket: `rate` frames per second with a burst of `2 * rate`. A connection over its
/// rate is not answered with a refusal (the frame would be lost, and Automerge would not send
/// it again): it waits for its next token, and its socket is not read meanwhile.
struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate * 2.0,
            last: Instant::now(),
        }
    }

    /// Takes a token; how long to wait before using it (zero if one was there).
    fn take(&mut self) -> Duration {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.rate * 2.0);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Whether a WebSocket read error is a message over the size limit.
fn too_large(e: axum::Error) -> Option<String> {
    let inner = e.into_inner();
    match inner.downcast_ref::<ws_protocol::Error>() {
        Some(ws_protocol::Error::Capacity(c)) => Some(c.to_string()),
        _ => None,
    }
}

async fn send(ws: &mut WebSocket, state: &AppState, frame: &RelayFrame) -> bool {
    state.metrics.frames_out.inc();
    ws.send(Message::Binary(frame.encode().into()))
        .await
        .is_ok()
}

async fn fail(mut ws: WebSocket, state: &AppState, code: &str, message: String) {
    state.metrics.protocol_errors.inc();
    tracing::info!(code, %message, "closing connection");
    let _ = send(&mut ws, state, &RelayFrame::error(code, message, true)).await;
    let _ = ws.close().await;
}

/// Runs one authenticated device connection until it closes. `hello` must arrive by
/// `hello_by` (the end of the handshake); `ticket` is raised when the device is revoked.
pub(crate) async fn serve(
    mut ws: WebSocket,
    device: DeviceId,
    store: StoreId,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
    ticket: &Ticket,
    hello_by: tokio::time::Instant,
) {
    let first = match tokio::time::timeout_at(hello_by, ws.recv()).await {
        Ok(Some(Ok(Message::Binary(b)))) => ClientFrame::decode(&b),
        Ok(Some(Ok(_))) => {
            return fail(
                ws,
                &state,
                codes::MALFORMED_FRAME,
                "expected a binary hello frame".into(),
            )
            .await;
        }
        _ => return fail(ws, &state, codes::PROTOCOL_VIOLATION, "no hello".into()).await,
    };
    state.metrics.frames_in.inc();
    let (claimed, since, highest) = match first {
        Ok(ClientFrame::Hello {
            protocol,
            device: claimed,
            feed_since,
            highest_number,
            ..
        }) => {
            if protocol.major != PROTOCOL_MAJOR {
                let msg = format!(
                    "this relay speaks protocol {PROTOCOL_MAJOR}.x, not {}.{}",
                    protocol.major, protocol.minor
                );
                return fail(ws, &state, codes::UNSUPPORTED_VERSION, msg).await;
            }
            (claimed, feed_since, highest_number)
        }
        Ok(_) => {
            return fail(
                ws,
                &state,
                codes::PROTOCOL_VIOLATION,
                "the first frame must be hello".into(),
            )
            .await;
        }
        Err(e) => return fail(ws, &state, codes::MALFORMED_FRAME, e.to_string()).await,
    };
    if claimed != device.to_string() {
        return fail(
            ws,
            &state,
            codes::WRONG_DEVICE,
            "hello names another device than the token".into(),
        )
        .await;
    }
    if state.hub.is_recovering(&store) {
        // After a restore: the store gives new numbers only above every till's highest.
        let heard = state
            .store
            .recovery_hello(store.clone(), device, highest.unwrap_or(0))
            .await;
        match heard {
            Ok(true) => {
                tracing::info!(%store, "every till of the store was heard from: numbering resumes");
                state.hub.recovered(&store).await;
            }
            Ok(false) => {}
            Err(e) => {
                return fail(ws, &state, codes::STORAGE, format!("recovery: {e}")).await;
            }
        }
    }
    let feed_seq = state.store.feed_head(store.clone()).await.unwrap_or(0);
    let welcome = RelayFrame::Welcome {
        protocol: Version::CURRENT,
        relay: state.hub.relay_id().to_string(),
        store: store.to_string(),
        feed_seq,
        data: Some(state.hub.data_id().to_owned()),
    };
    if !send(&mut ws, &state, &welcome).await {
        return;
    }
    let (tx, mut outbox) = mpsc::channel(OUTBOX_CAPACITY);
    let peer = state.hub.connect(device, store.clone(), tx);
    tracing::info!(%device, %store, conn = %peer.conn, "device connected");
    let catching_up = catch_up(&peer, &state, since);
    run(
        &mut ws,
        &peer,
        &state,
        &mut outbox,
        &mut shutdown,
        ticket,
        catching_up,
    )
    .await;
    state.hub.disconnect(&peer).await;
    let _ = ws.close().await;
    tracing::info!(%device, conn = %peer.conn, "device disconnected");
}

/// Sends every feed entry after `since`, in pages, then switches the connection to the live
/// feed: entries published meanwhile were held and go out after the last page, so the device
/// never sees a later feed position before an earlier one. Runs inside the connection's loop,
/// so nothing outlives the connection.
async fn catch_up(peer: &Peer, state: &AppState, mut since: u64) {
    let seal = state.store.seal_key();
    loop {
        loop {
            let page = state
                .store
                .feed_since(peer.store.clone(), since, FEED_PAGE)
                .await;
            let records = match page {
                Ok(r) => r,
                _ => {
                    // Without its catch-up the connection would miss orders: end it, the
                    // device reconnects and tries again.
                    peer.fail(codes::STORAGE, "feed catch-up failed; reconnect to retry");
                    return;
                }
            };
            let full = records.len() == FEED_PAGE;
            if let Some(last) = records.last() {
                since = last.seq;
                peer.send(RelayFrame::Feed {
                    entries: records.iter().map(|r| feed_entry(&r.meta, &seal)).collect(),
                });
            }
            if peer.is_closed() {
                return;
            }
            if !full {
                break;
            }
        }
        if state.hub.go_live(peer, since) {
            return;
        }
    }
}

async fn run(
    ws: &mut WebSocket,
    peer: &Arc<Peer>,
    state: &AppState,
    outbox: &mut mpsc::Receiver<Bytes>,
    shutdown: &mut watch::Receiver<bool>,
    ticket: &Ticket,
    catching_up: impl Future<Output = ()>,
) {
    tokio::pin!(catching_up);
    let mut caught_up = false;
    let mut limit = RateLimit::new(state.config.rate_per_sec);
    // Liveness: a connection silent for `every` is pinged (WebSocket ping; clients answer it
    // themselves); one from which nothing at all arrived for three times that is closed, so a
    // till whose network dropped does not keep one of its few connection slots.
    let every = state.config.keepalive.max(Duration::from_millis(10));
    let mut last_in = Instant::now();
    let mut keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        if ticket.is_revoked() {
            // Nothing more from a revoked device reaches the hub.
            state.metrics.revoked_closed.inc();
            tracing::info!(device = %peer.device, conn = %peer.conn, "device revoked; closing");
            let _ = send(
                ws,
                state,
                &RelayFrame::error(codes::REVOKED, "this device's token was revoked", true),
            )
            .await;
            return;
        }
        tokio::select! {
            () = ticket.notify.notified() => continue,
            () = &mut catching_up, if !caught_up => caught_up = true,
            _ = keepalive.tick() => {
                let silent = last_in.elapsed();
                if silent >= every * 3 {
                    tracing::info!(device = %peer.device, conn = %peer.conn, "connection silent; closing");
                    return;
                }
                if silent >= every && ws.send(Message::Ping(Bytes::new())).await.is_err() {
                    return;
                }
            }
            incoming = ws.next() => {
                last_in = Instant::now();
                let bytes = match incoming {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(_))) => {
                        let _ = send(ws, state, &RelayFrame::error(codes::MALFORMED_FRAME, "text messages are not frames", true)).await;
                        state.metrics.protocol_errors.inc();
                        return;
                    }
                    Some(Ok(Message::Close(_))) | None => return,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        if let Some(msg) = too_large(e) {
                            let _ = send(ws, state, &RelayFrame::error(codes::FRAME_TOO_LARGE, msg, true)).await;
                        }
                        state.metrics.protocol_errors.inc();
                        return;
                    }
                };
                state.metrics.frames_in.inc();
                let wait = limit.take();
                if !wait.is_zero() {
                    state.metrics.rate_waits.inc();
                    tokio::time::sleep(wait).await;
                }
                match ClientFrame::decode(&bytes) {
                    Ok(ClientFrame::Sync { order, data }) => {
                        let Ok(order_id) = order.parse::<OrderId>() else {
                            peer.send(RelayFrame::error(codes::BAD_ORDER_ID, format!("bad order id {order:?}"), false));
                            continue;
                        };
                        // Automerge trusts what it decodes: check the message's shape and
                        // limits first (Bloom filters, hash counts, inflated sizes).
                        if let Err(refusal) = crate::screen::screen(&data, state.hub.limits()) {
                            state.metrics.sync_refused(refusal.code());
                            tracing::info!(conn = %peer.conn, device = %peer.device, %order, code = refusal.code(), reason = refusal.message(), "sync message refused");
                            peer.send(RelayFrame::error(refusal.code(), format!("order {order}: {}", refusal.message()), false));
                            continue;
                        }
                        match sync::Message::decode(&data) {
                            Ok(_) if ticket.is_revoked() => continue,
                            Ok(msg) => {
                                if state.hub.sync(peer, order_id, Incoming::Sync(msg)).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => peer.send(RelayFrame::error(codes::BAD_SYNC_MESSAGE, format!("order {order}: {e}"), false)),
                        }
                    }
                    Ok(ClientFrame::Changes { order, changes, heads, voucher }) => {
                        let Ok(order_id) = order.parse::<OrderId>() else {
                            peer.send(RelayFrame::error(codes::BAD_ORDER_ID, format!("bad order id {order:?}"), false));
                            continue;
                        };
                        match crate::screen::decode_push(&changes, &heads, state.hub.limits()) {
                            Ok(_) if ticket.is_revoked() => continue,
                            Ok(p) => {
                                let voucher = voucher.and_then(|v| {
                                    let heads = (v.heads.len() <= state.hub.limits().max_hashes)
                                        .then(|| crdt_model::wire::heads_from_wire(&v.heads).ok())
                                        .flatten()?;
                                    Some((heads, v.tag.into_vec()))
                                });
                                let push = Incoming::Push { changes: p.changes, heads: p.heads, voucher };
                                if state.hub.sync(peer, order_id, push).await.is_err() {
                                    return;
                                }
                            }
                            Err((code, why)) => {
                                state.metrics.sync_refused(code);
                                tracing::info!(conn = %peer.conn, device = %peer.device, %order, code, reason = %why, "pushed changes refused");
                                peer.send(RelayFrame::error(code, format!("order {order}: {why}"), false));
                            }
                        }
                    }
                    Ok(ClientFrame::Ping { nonce }) => peer.send(RelayFrame::Pong { nonce }),
                    Ok(ClientFrame::Pong { .. }) => {}
                    Ok(ClientFrame::Bye) => return,
                    Ok(ClientFrame::Hello { .. }) => {
                        let _ = send(ws, state, &RelayFrame::error(codes::PROTOCOL_VIOLATION, "hello sent twice", true)).await;
                        state.metrics.protocol_errors.inc();
                        return;
                    }
                    Err(e) => {
                        let _ = send(ws, state, &RelayFrame::error(codes::MALFORMED_FRAME, e.to_string(), true)).await;
                        state.metrics.protocol_errors.inc();
                        return;
                    }
                }
            }
            Some(frame) = outbox.recv() => {
                // Write everything already queued, then flush once: one syscall for a burst
                // (receipt, sync message, feed) instead of one per frame.
                let mut batch = 1u64;
                let mut ok = ws.feed(Message::Binary(frame)).await.is_ok();
                while ok && batch < OUTBOX_BATCH {
                    match outbox.try_recv() {
                        Ok(more) => {
                            batch += 1;
                            ok = ws.feed(Message::Binary(more)).await.is_ok();
                        }
                        Err(_) => break,
                    }
                }
                state.metrics.frames_out.inc_by(batch);
                if !ok || ws.flush().await.is_err() {
                    return;
                }
            }
            () = peer.kill.notified() => {
                // The hub gave up on the connection (too slow, or a fatal error frame): send
                // what is already queued (the error frame) for a moment, then close.
                tracing::warn!(conn = %peer.conn, "the hub closed the connection");
                let drain = async {
                    while let Ok(frame) = outbox.try_recv() {
                        state.metrics.frames_out.inc();
                        if ws.send(Message::Binary(frame)).await.is_err() {
                            return;
                        }
                    }
                };
                let _ = tokio::time::timeout(KILL_DRAIN, drain).await;
                return;
            }
            _ = shutdown.changed() => {
                // The hub has flushed its commits: deliver the receipts still queued, then go.
                while let Ok(frame) = outbox.try_recv() {
                    state.metrics.frames_out.inc();
                    if ws.send(Message::Binary(frame)).await.is_err() {
                        return;
                    }
                }
                let _ = send(ws, state, &RelayFrame::Bye).await;
                return;
            }
        }
    }
}
