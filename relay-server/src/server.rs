//! The HTTP side: the router (WebSocket upgrade at `/v1/sync`, the back-office API, the
//! back-office board at `/board`, health and metrics), authentication (always before a request body is read), admission (see
//! [`crate::admission`]), revocation of live connections and bounded graceful shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use automerge::{Automerge, ChangeHash};
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use crdt_model::{Order, OrderId, OrderStatus, StoreId, Writer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admission::{Acceptor, Admission, Limits, PeerInfo, Refusal};
use crate::backend::Backend;
use crate::error::RelayError;
use crate::hub::{Hub, HubConfig};
use crate::metrics::Metrics;
use crate::store::{Principal, RelayStore, StatusFilter};

/// Everything `serve` needs.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// Data directory (holds `relay.redb`).
    pub data: PathBuf,
    /// Hub tunables.
    pub hub: HubConfig,
    /// Largest WebSocket message accepted, bytes.
    pub max_frame_bytes: usize,
    /// Concurrent device connections of the whole relay (lowered at start to fit the
    /// open-file limit, see [`crate::admission`]).
    pub max_connections: usize,
    /// Concurrent connections of one device.
    pub max_device_connections: usize,
    /// Concurrent device connections of one store.
    pub max_store_connections: usize,
    /// From TCP accept to the end of the handshake (HTTP request headers, or WebSocket
    /// upgrade plus `hello`); also the idle time allowed between HTTP requests.
    pub handshake_timeout: Duration,
    /// From the stop signal to the end of [`run`], whatever the workers are doing.
    pub shutdown_timeout: Duration,
    /// A device connection silent this long is pinged; silent three times this long, closed.
    pub keepalive: Duration,
    /// Frames per second a connection may send (burst twice that).
    pub rate_per_sec: u32,
    /// Serve TLS (wss:// and https://) with this certificate and key.
    pub tls: Option<crate::tls::TlsFiles>,
    /// redb page cache, bytes (see [`RelayStore::open_with_cache`]).
    pub redb_cache_bytes: usize,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            data: PathBuf::from("relay-data"),
            hub: HubConfig::default(),
            max_frame_bytes: crdt_model::wire::MAX_FRAME_BYTES,
            max_connections: 20_000,
            max_device_connections: 4,
            max_store_connections: 64,
            handshake_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(10),
            keepalive: Duration::from_secs(30),
            rate_per_sec: 2_000,
            tls: None,
            redb_cache_bytes: crate::store::DEFAULT_CACHE_BYTES,
        }
    }
}

/// Shared state of the HTTP handlers and connections.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) store: Backend,
    pub(crate) hub: Hub,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) config: Arc<RelayConfig>,
    admission: Arc<Admission>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The back-office board's own state.
    pub(crate) board: Arc<crate::board::Board>,
}

/// A JSON error with a stable code.
#[derive(Debug)]
struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.0,
            Json(json!({ "error": { "code": self.1, "message": self.2 } })),
        )
            .into_response()
    }
}

impl From<RelayError> for ApiError {
    fn from(e: RelayError) -> Self {
        use crdt_model::ModelError as M;
        match e.inner() {
            RelayError::Unauthorized => {
                Self(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string())
            }
            RelayError::Revoked => Self(StatusCode::UNAUTHORIZED, "revoked", e.to_string()),
            RelayError::NotFound(_) => Self(StatusCode::NOT_FOUND, "not_found", e.to_string()),
            RelayError::Invalid(_) => Self(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            RelayError::ShuttingDown => Self(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
            RelayError::Model(M::OrderClosed { .. }) => {
                Self(StatusCode::CONFLICT, "order_closed", e.to_string())
            }
            RelayError::Model(M::Policy(v)) => {
                Self(StatusCode::UNPROCESSABLE_ENTITY, v.code(), e.to_string())
            }
            RelayError::Model(_) => Self(StatusCode::BAD_REQUEST, "invalid", e.to_string()),
            RelayError::Conflict(_) => Self(StatusCode::CONFLICT, "conflict", e.to_string()),
            RelayError::Storage(s) if s.is_disk_full() => {
                Self(StatusCode::INSUFFICIENT_STORAGE, "disk_full", e.to_string())
            }
            _ => Self(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
        }
    }
}

fn bearer(headers: &HeaderMap, query: &BTreeMap<String, String>) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
        .or_else(|| query.get("token").cloned())
}

async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
) -> Result<Principal, ApiError> {
    let Some(token) = bearer(headers, query) else {
        state.metrics.auth_failures.inc();
        return Err(RelayError::Unauthorized.into());
    };
    state.store.authenticate(token).await.map_err(|e| {
        state.metrics.auth_failures.inc();
        e.into()
    })
}

/// The back-office scope of a principal: `Ok(None)` for a global admin, `Ok(Some(store))` for a
/// store admin; devices are refused on the HTTP API.
fn back_office(p: &Principal) -> Result<Option<StoreId>, ApiError> {
    match p {
        Principal::Admin => Ok(None),
        Principal::StoreAdmin { store } => Ok(Some(store.clone())),
        Principal::Device { .. } => Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            "device tokens cannot use the back-office API".into(),
        )),
    }
}

/// Bytes read from a device socket at a time. The default (128 KiB) is zero-filled in full
/// for every connection: 10,000 idle devices cost 1.3 GiB of RSS with it (relay-scale); frames
/// larger than this are still read, in several reads.
const WS_READ_BUFFER: usize = 8 * 1024;

async fn ws_upgrade(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (device, store) = match authenticate(&state, &headers, &query).await? {
        Principal::Device { device, store } => (device, store),
        _ => {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                "forbidden",
                "only device tokens may sync".into(),
            ));
        }
    };
    let slot = match state.admission.admit(device, &store) {
        Ok(slot) => slot,
        Err(refusal) => {
            state.metrics.refused(refusal.code());
            tracing::info!(%device, %store, code = refusal.code(), "connection refused");
            let status = match refusal {
                Refusal::Revoked => StatusCode::UNAUTHORIZED,
                Refusal::Relay => StatusCode::SERVICE_UNAVAILABLE,
                Refusal::Device | Refusal::Store => StatusCode::TOO_MANY_REQUESTS,
            };
            let message = refusal.message(state.admission.limits());
            return Err(ApiError(status, refusal.code(), message));
        }
    };
    let max = state.config.max_frame_bytes;
    let shutdown = state.shutdown.clone();
    // The WebSocket is inside the handshake until its `hello`: the same deadline goes on.
    let hello_by = peer
        .handshake
        .deadline()
        .unwrap_or_else(|| tokio::time::Instant::now() + state.config.handshake_timeout);
    Ok(upgrade
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |ws| async move {
            peer.handshake.disarm();
            let watch = Arc::clone(state.hub.watch());
            watch.connection(device, &store, true);
            let of = store.clone();
            crate::conn::serve(ws, device, store, state, shutdown, &slot.ticket, hello_by).await;
            watch.connection(device, &of, false);
            drop(slot);
        }))
}

/// `ok` while every hub worker runs; 503 once one has stopped (the relay cannot store the
/// orders that worker owns, so a supervisor should restart it).
async fn healthz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.hub.workers_alive() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: a hub worker stopped\n",
        )
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    since: Option<u64>,
    limit: Option<usize>,
    token: Option<String>,
}

#[derive(Serialize)]
struct OrderSummary {
    id: String,
    number: u64,
    status: OrderStatus,
    heads: Vec<String>,
    created_at: i64,
    updated_at: i64,
    feed_seq: u64,
}

async fn list_orders(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(store): Path<String>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut tq = BTreeMap::new();
    if let Some(t) = q.token.clone() {
        tq.insert("token".to_owned(), t);
    }
    let scope = back_office(&authenticate(&state, &headers, &tq).await?)?;
    let store = StoreId::new(store).map_err(RelayError::from)?;
    if scope.as_ref().is_some_and(|s| *s != store) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            "token is for another store".into(),
        ));
    }
    let filter = match q.status.as_deref() {
        None | Some("any") => StatusFilter::Any,
        Some("active") => StatusFilter::Active,
        Some("done") => StatusFilter::Done,
        Some("deleted") => StatusFilter::Deleted,
        Some(other) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!("unknown status filter {other:?}"),
            ));
        }
    };
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let since = q.since.unwrap_or(0);
    let metas = state.store.list_orders(store, filter, since, limit).await?;
    let next = metas.last().map(|m| m.feed_seq);
    let orders: Vec<OrderSummary> = metas
        .into_iter()
        .map(|m| OrderSummary {
            id: m.order.to_string(),
            number: m.number.0,
            status: m.status,
            heads: m.heads.iter().map(|h| ChangeHash(*h).to_string()).collect(),
            created_at: m.created_at,
            updated_at: m.updated_at,
            feed_seq: m.feed_seq,
        })
        .collect();
    Ok(Json(json!({ "orders": orders, "next_since": next })))
}

/// Loads an order the principal may see; another store's order is "not found".
async fn load_visible(
    state: &AppState,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
    id: &str,
) -> Result<(Automerge, Writer), ApiError> {
    let scope = back_office(&authenticate(state, headers, query).await?)?;
    let order: OrderId = id
        .parse()
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, "not_found", format!("order {id}")))?;
    let stored = state.store.load_order(order).await?;
    let Some(stored) = stored.filter(|s| scope.as_ref().is_none_or(|sc| *sc == s.meta.store))
    else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("order {id}"),
        ));
    };
    let mut doc =
        Automerge::load(&stored.snapshot).map_err(|e| RelayError::Corrupt(e.to_string()))?;
    for c in &stored.tail {
        doc.load_incremental(c)
            .map_err(|e| RelayError::Corrupt(e.to_string()))?;
    }
    Ok((doc, Writer::new(state.hub.relay_id(), 0)))
}

async fn get_order(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<crdt_model::OrderView>, ApiError> {
    let (doc, writer) = load_visible(&state, &headers, &query, &id).await?;
    let view = Order::from_doc(doc, writer)
        .and_then(|o| o.view())
        .map_err(RelayError::from)?;
    Ok(Json(view))
}

async fn get_history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (doc, _) = load_visible(&state, &headers, &query, &id).await?;
    let history = crdt_model::audit_trail(&doc);
    Ok(Json(json!({ "order": id, "changes": history })))
}

/// Largest back-office request body, bytes (they are small JSON objects).
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Reads and parses a JSON body. Handlers call it only after authenticating, so an
/// unauthenticated request is refused (401) before any of its body is read.
async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let announced = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body over {MAX_BODY_BYTES} bytes"),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_BODY_BYTES)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body over {MAX_BODY_BYTES} bytes or unreadable: {e}"),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("request body: {e}"),
        )
    })
}

#[derive(Deserialize)]
struct StatusBody {
    status: OrderStatus,
}

async fn post_status(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<Json<crdt_model::OrderView>, ApiError> {
    let scope = back_office(&authenticate(&state, &headers, &query).await?)?;
    let body: StatusBody = read_json(&headers, body).await?;
    let order: OrderId = id
        .parse()
        .map_err(|_| ApiError(StatusCode::NOT_FOUND, "not_found", format!("order {id}")))?;
    Ok(Json(state.hub.set_status(order, scope, body.status).await?))
}

#[derive(Deserialize)]
struct NewDevice {
    store: String,
    name: String,
}

async fn add_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    if back_office(&authenticate(&state, &headers, &query).await?)?.is_some() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only an admin token may provision devices".into(),
        ));
    }
    let body: NewDevice = read_json(&headers, body).await?;
    let store = StoreId::new(body.store).map_err(RelayError::from)?;
    let (rec, token) = state
        .store
        .add_device(store, body.name, crate::hub::now_ms())
        .await?;
    Ok(Json(
        json!({ "device": rec.device, "store": rec.store, "name": rec.name, "token": token }),
    ))
}

#[derive(Deserialize)]
struct BackupBody {
    to: PathBuf,
}

async fn backup(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<BTreeMap<String, String>>,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    if back_office(&authenticate(&state, &headers, &query).await?)?.is_some() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only an admin token may take backups".into(),
        ));
    }
    let body: BackupBody = read_json(&headers, body).await?;
    let orders = state.store.backup_to(body.to.clone()).await?;
    Ok(Json(json!({ "backup": body.to, "orders": orders })))
}

/// Revokes a device and closes its open connections (they get a fatal `revoked` error).
/// A store admin may revoke its own store's devices; the admin any device.
async fn revoke_device(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let scope = back_office(&authenticate(&state, &headers, &query).await?)?;
    let not_found = || ApiError(StatusCode::NOT_FOUND, "not_found", format!("device {id}"));
    let device: crdt_model::DeviceId = id.parse().map_err(|_| not_found())?;
    let record = state.store.device(device).await?;
    let Some(record) = record.filter(|r| scope.as_ref().is_none_or(|s| *s == r.store)) else {
        return Err(not_found());
    };
    state.store.revoke_device(device).await?;
    // Persisted first: a connection admitted from now on is refused, one admitted before is
    // in the registry and told to close.
    let closed = state.admission.revoke(device);
    tracing::info!(%device, store = %record.store, closed, "device revoked");
    Ok(Json(
        json!({ "device": device, "store": record.store, "revoked": true, "closed_connections": closed }),
    ))
}

/// A store's recovery after a restore: whether it still waits for devices before giving new
/// numbers, and which. A store admin sees its own store; the admin any.
async fn get_recovery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(store): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = scoped_store(&state, &headers, &query, &store).await?;
    let record = state.store.recovery(store.clone()).await?;
    Ok(Json(match record {
        Some(r) => json!({
            "store": store,
            "recovering": r.recovering(),
            "pending_devices": r.pending,
            "restored_at": r.restored_at,
            "backup_taken_at": r.backup_taken_at,
            "numbers_from_backup": r.numbers_from_backup,
            "released_early": r.released_early,
        }),
        None => json!({ "store": store, "recovering": false }),
    }))
}

/// Ends a store's recovery before every device was heard from (a till that will never come
/// back): its waiting new orders get their numbers now. Numbers that only the missing tills
/// hold may be given again; `docs/operations.md` says when this is safe.
async fn release_recovery(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(store): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let store = scoped_store(&state, &headers, &query, &store).await?;
    let released = state.store.release_recovery(store.clone()).await?;
    let Some(pending) = released else {
        return Ok(Json(
            json!({ "store": store, "released": false, "recovering": false }),
        ));
    };
    state.hub.recovered(&store).await;
    tracing::warn!(%store, never_heard_from = pending.len(), "recovery released by an operator");
    Ok(Json(
        json!({ "store": store, "released": true, "never_heard_from": pending }),
    ))
}

/// The store named in a back-office path, if the principal may act on it.
async fn scoped_store(
    state: &AppState,
    headers: &HeaderMap,
    query: &BTreeMap<String, String>,
    store: &str,
) -> Result<StoreId, ApiError> {
    let scope = back_office(&authenticate(state, headers, query).await?)?;
    let not_found = || ApiError(StatusCode::NOT_FOUND, "not_found", format!("store {store}"));
    let store = StoreId::new(store).map_err(|_| not_found())?;
    if scope.as_ref().is_some_and(|s| *s != store) {
        return Err(not_found());
    }
    Ok(store)
}

/// Idle HTTP connections get the handshake time again for their next request; a request in
/// progress has no deadline. The sync upgrade keeps its deadline until `hello`.
async fn http_deadline(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    request: Request,
    next: Next,
) -> Response {
    if request.uri().path() == "/v1/sync" {
        return next.run(request).await;
    }
    if request.uri().path() == crate::board::EVENTS_PATH {
        // A live stream: no idle deadline while it runs (its end sets one again).
        peer.handshake.disarm();
        return next.run(request).await;
    }
    peer.handshake.disarm();
    let response = next.run(request).await;
    peer.handshake.arm(state.config.handshake_timeout);
    response
}

/// Any path the API does not have: the documented JSON error shape, not an empty 404.
async fn unknown_path(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such endpoint: {}", uri.path()),
    )
}

/// A known path with a method it does not take.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not accepted on {}", uri.path()),
    )
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/sync", get(ws_upgrade))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/stores/{store}/orders", get(list_orders))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/history", get(get_history))
        .route("/v1/orders/{id}/status", post(post_status))
        .route("/v1/admin/devices", post(add_device))
        .route("/v1/admin/backup", post(backup))
        .route("/v1/admin/devices/{id}/revoke", post(revoke_device))
        .route("/v1/admin/stores/{store}/recovery", get(get_recovery))
        .route(
            "/v1/admin/stores/{store}/recovery/release",
            post(release_recovery),
        )
        .merge(crate::board::routes())
        .fallback(unknown_path)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http_deadline,
        ))
        .with_state(state)
}

/// A running relay: its address and a way to stop it.
pub struct RunningRelay {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), RelayError>>,
}

impl RunningRelay {
    /// Stops gracefully (flushes commits, says `bye` to devices) and waits for the end.
    pub async fn stop(mut self) -> Result<(), RelayError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task
            .await
            .map_err(|e| RelayError::Internal(e.to_string()))?
    }
}

/// Opens the data directory and serves on `listener` until `shutdown` resolves; then stops
/// accepting, flushes every accepted change to disk, sends `bye` to devices and returns.
pub async fn run(
    config: RelayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RelayError> {
    let store = Arc::new(RelayStore::open_with_cache(
        &config.data,
        config.redb_cache_bytes,
    )?);
    serve_store(config, store, listener, shutdown).await
}

/// Like [`run`] with an already opened store.
///
/// Stopping is bounded by [`RelayConfig::shutdown_timeout`]: it stops accepting, waits for
/// in-flight commits, says `bye` to devices and waits for their connections to end; whatever
/// is still running at the bound is abandoned (an uncommitted change was never receipted, so
/// the device resends it).
pub async fn serve_store(
    config: RelayConfig,
    store: impl Into<Backend>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RelayError> {
    let store: Backend = store.into();
    // Handles on the store held outside this function (the caller's, this one's).
    let held_outside = store.handles();
    let tls = config.tls.as_ref().map(crate::tls::acceptor).transpose()?;
    let metrics = Arc::new(Metrics::default());
    let fds = crate::admission::fd_limit();
    let (limits, lowered) = Limits::clamp(
        config.max_connections,
        config.max_store_connections,
        config.max_device_connections,
        config.handshake_timeout,
        fds,
    );
    if lowered {
        tracing::warn!(
            fd_limit = fds,
            max_connections = config.max_connections,
            devices = limits.devices,
            "the open-file limit (ulimit -n) is too low for --max-connections; device \
             connections are limited to {} (raise the limit to allow more)",
            limits.devices
        );
    }
    tracing::info!(
        sockets = limits.sockets,
        devices = limits.devices,
        per_store = limits.per_store,
        per_device = limits.per_device,
        handshake_timeout_ms = limits.handshake_timeout.as_millis() as u64,
        "admission limits"
    );
    let hub = Hub::start(store.clone(), Arc::clone(&metrics), &config.hub).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let bound = config.shutdown_timeout;
    let state = AppState {
        store,
        hub: hub.clone(),
        metrics: Arc::clone(&metrics),
        admission: Arc::new(Admission::new(limits)),
        config: Arc::new(config),
        shutdown: stop_rx,
        board: Arc::default(),
    };
    let acceptor = Acceptor::new(listener, &limits, metrics);
    let addr = acceptor.local_addr()?;
    tracing::info!(%addr, relay = %hub.relay_id(), "relay serving");
    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let app = router(state.clone()).into_make_service_with_connect_info::<PeerInfo>();
    let stopped = async move {
        let _ = http_stop_rx.await;
    };
    let mut server = match tls {
        Some(tls) => {
            let listener = crate::tls::TlsListener::new(acceptor, tls);
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
            })
        }
        None => tokio::spawn(async move {
            axum::serve(acceptor, app)
                .with_graceful_shutdown(stopped)
                .await
        }),
    };
    shutdown.await;
    let deadline = tokio::time::Instant::now() + bound;
    tracing::info!(
        bound_ms = bound.as_millis() as u64,
        "shutting down: flushing commits"
    );
    let _ = http_stop_tx.send(());
    let flushed = tokio::time::timeout_at(deadline, hub.flush()).await.is_ok();
    let _ = stop_tx.send(true);
    // Upgraded connections are not HTTP connections any more: wait for them to say bye.
    state.admission.drained(deadline).await;
    let stopped = tokio::time::timeout_at(deadline, async {
        hub.flush().await;
        hub.shutdown().await;
    })
    .await
    .is_ok();
    if !(flushed && stopped) {
        tracing::error!(
            bound_ms = bound.as_millis() as u64,
            "shutdown bound reached with work in flight; stopping anyway \
             (changes not committed were never receipted; devices resend them)"
        );
    }
    let served = match tokio::time::timeout_at(deadline, &mut server).await {
        Ok(Ok(r)) => r.map_err(RelayError::Io),
        Ok(Err(e)) => Err(RelayError::Internal(e.to_string())),
        Err(_) => {
            server.abort();
            tracing::warn!("HTTP connections still open at the shutdown bound; closed");
            Ok(())
        }
    };
    // Whatever still holds the store (a load or a feed page on a blocking thread) finishes
    // before this returns, so the caller can open the same data again at once.
    let store = state.store.clone();
    drop(state);
    drop(hub);
    while store.handles() > held_outside && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if store.handles() > held_outside {
        tracing::warn!("the store is still in use at the shutdown bound");
    }
    served
}

/// Serves `store` on `listener` in the background (a relay on an opened store, e.g. one of
/// several relays on a PostgreSQL database); for tests and embedding.
pub fn serve_listener(
    config: RelayConfig,
    store: impl Into<Backend>,
    listener: TcpListener,
) -> Result<RunningRelay, RelayError> {
    let addr = listener.local_addr()?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_store(config, store.into(), listener, async move {
        let _ = rx.await;
    }));
    Ok(RunningRelay {
        addr,
        stop: Some(stop),
        task,
    })
}

/// Binds `addr` and runs a relay in the background; for tests and embedding.
pub async fn spawn(config: RelayConfig, addr: &str) -> Result<RunningRelay, RelayError> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(run(config, listener, async move {
        let _ = rx.await;
    }));
    Ok(RunningRelay {
        addr,
        stop: Some(stop),
        task,
    })
}
