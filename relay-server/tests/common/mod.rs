//! Test harness: a relay on 127.0.0.1:0 with a temp data dir, and a WebSocket test client.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

pub mod hostile;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use automerge::ReadDoc;
use automerge::sync::{self, SyncDoc};
use crdt_model::wire::{ClientFrame, RelayFrame, Version, heads_from_wire};
use crdt_model::*;
use futures_util::{SinkExt, StreamExt};
use relay_server::RelayConfig;
use relay_server::store::RelayStore;
use serde_bytes::ByteBuf;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const T0: i64 = 1_700_000_000_000;

pub struct TestRelay {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub store: Arc<RelayStore>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), relay_server::RelayError>>>,
}

impl TestRelay {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir).await
    }

    pub async fn start_in(dir: tempfile::TempDir) -> Self {
        Self::start_with(dir, |_| {}).await
    }

    /// Starts with a modified configuration.
    pub async fn start_with(dir: tempfile::TempDir, tune: impl FnOnce(&mut RelayConfig)) -> Self {
        let store = Arc::new(RelayStore::open(dir.path()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = RelayConfig {
            data: dir.path().to_path_buf(),
            ..RelayConfig::default()
        };
        tune(&mut config);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&store);
        let task = tokio::spawn(relay_server::server::serve_store(
            config,
            st,
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        Self {
            dir,
            addr,
            store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    pub fn device(&self, store: &str, name: &str) -> (DeviceId, String) {
        let (rec, token) = self
            .store
            .add_device(&StoreId::new(store).unwrap(), name, T0)
            .unwrap();
        (rec.device, token)
    }

    pub fn admin(&self) -> String {
        self.store.add_admin_token(None, "test", T0).unwrap()
    }

    /// Graceful stop; returns the data dir for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        drop(self.store);
        self.dir
    }

    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text[9..12].parse().unwrap();
        let body = text
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default();
        // Chunked bodies: keep it simple by stripping chunk size lines when present.
        let body = if text
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(&body)
        } else {
            body
        };
        (status, body)
    }
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens the WebSocket with `token` (header) and returns the HTTP status on failure.
pub async fn connect_raw(addr: SocketAddr, token: Option<&str>) -> Result<Ws, u16> {
    let mut req = format!("ws://{addr}/v1/sync")
        .into_client_request()
        .unwrap();
    if let Some(t) = token {
        req.headers_mut()
            .insert("Authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("unexpected connect error: {e}"),
    }
}

/// A terminal speaking the protocol, holding its own order replicas.
pub struct Client {
    pub ws: Ws,
    pub device: DeviceId,
    pub writer: Writer,
    pub rng: SplitMix64,
    pub now: i64,
    pub states: std::collections::HashMap<OrderId, sync::State>,
    pub welcome: RelayFrame,
    /// Frames received but not consumed yet by a helper.
    pub backlog: Vec<RelayFrame>,
}

impl Client {
    pub async fn connect(addr: SocketAddr, device: DeviceId, token: &str) -> Self {
        let mut ws = connect_raw(addr, Some(token)).await.expect("upgrade");
        let hello = ClientFrame::Hello {
            protocol: Version::CURRENT,
            device: device.to_string(),
            agent: "test".into(),
            feed_since: 0,
            highest_number: None,
        };
        ws.send(Message::Binary(hello.encode().into()))
            .await
            .unwrap();
        let welcome = recv_frame(&mut ws).await.expect("welcome");
        assert!(matches!(welcome, RelayFrame::Welcome { .. }), "{welcome:?}");
        // Each client gets its own entropy (real devices use the OS), so reconnecting clients
        // never regenerate the same ids.
        static CLIENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = CLIENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = u64::from_le_bytes(device.as_bytes()[..8].try_into().unwrap())
            ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        Self {
            ws,
            device,
            writer: Writer::new(device, 1),
            rng: SplitMix64::new(seed),
            now: T0,
            states: Default::default(),
            welcome,
            backlog: Vec::new(),
        }
    }

    pub fn tick(&mut self) -> Timestamp {
        self.now += 1000;
        Timestamp(self.now)
    }

    pub fn create(&mut self, store: &str) -> Order {
        let at = self.tick();
        let new = NewOrder {
            id: OrderId::generate(at, &mut self.rng),
            store: StoreId::new(store).unwrap(),
            currency: Currency::new("EUR").unwrap(),
        };
        Order::create(new, self.writer.clone(), at, &mut self.rng).unwrap()
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.ws
            .send(Message::Binary(frame.encode().into()))
            .await
            .unwrap();
    }

    /// Sends a frame the relay may refuse by closing the connection while it is still being
    /// written: a write error is then the expected outcome, not a test failure.
    pub async fn send_may_be_cut(&mut self, frame: &ClientFrame) {
        let _ = self.ws.send(Message::Binary(frame.encode().into())).await;
    }

    pub async fn send_raw(&mut self, bytes: Vec<u8>) {
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
    }

    /// Next frame from the relay (backlog first), or None after 5 s.
    pub async fn recv(&mut self) -> Option<RelayFrame> {
        if !self.backlog.is_empty() {
            return Some(self.backlog.remove(0));
        }
        recv_frame(&mut self.ws).await
    }

    /// Sends one sync message for `order` if there is anything to say.
    pub async fn push(&mut self, order: &Order) -> bool {
        let state = self.states.entry(order.id()).or_default();
        match order.doc().generate_sync_message(state) {
            Some(m) => {
                let f = ClientFrame::Sync {
                    order: order.id().to_string(),
                    data: ByteBuf::from(m.encode()),
                };
                self.send(&f).await;
                true
            }
            None => false,
        }
    }

    /// Syncs `order` with the relay until the relay has receipted all of our heads and the sync
    /// loop is quiet. Returns the frames other than sync/receipt seen meanwhile.
    pub async fn sync_until_receipted(&mut self, order: &mut Order) -> Vec<RelayFrame> {
        let mut others = Vec::new();
        self.push(order).await;
        let mut receipted = false;
        for _ in 0..200 {
            let Some(frame) = self.recv().await else {
                break;
            };
            match frame {
                RelayFrame::Sync { order: o, data } if o == order.id().to_string() => {
                    let msg = sync::Message::decode(&data).unwrap();
                    let state = self.states.entry(order.id()).or_default();
                    order.doc_mut().receive_sync_message(state, msg).unwrap();
                    order.refresh().unwrap();
                    self.push(order).await;
                }
                RelayFrame::Changes {
                    order: o, changes, ..
                } if o == order.id().to_string() => {
                    if apply_forwarded(order, &changes) {
                        self.push(order).await;
                    }
                }
                RelayFrame::Receipt {
                    order: o, heads, ..
                } if o == order.id().to_string() => {
                    let heads = heads_from_wire(&heads).unwrap();
                    // Covered: none of our changes is missing from the receipted heads.
                    let mine = order.doc().get_changes(&heads);
                    receipted = heads
                        .iter()
                        .all(|h| order.doc().get_change_by_hash(h).is_some())
                        && mine.is_empty();
                    if receipted {
                        // Give the relay a moment for a follow-up (e.g. the number change).
                        if !self.push(order).await {
                            return others;
                        }
                    }
                }
                other => {
                    let is_rejection = matches!(
                        other,
                        RelayFrame::Rejected { .. }
                            | RelayFrame::Unavailable { .. }
                            | RelayFrame::Error { .. }
                    );
                    others.push(other);
                    if is_rejection {
                        return others;
                    }
                }
            }
        }
        assert!(receipted, "no receipt covering our heads; saw {others:?}");
        others
    }

    /// Keeps syncing until a frame matching `pred` arrives (others are applied or collected).
    pub async fn wait_for(
        &mut self,
        order: Option<&mut Order>,
        pred: impl Fn(&RelayFrame) -> bool,
    ) -> RelayFrame {
        let mut order = order;
        for _ in 0..500 {
            let frame = self.recv().await.expect("timed out waiting for a frame");
            if pred(&frame) {
                return frame;
            }
            if let (RelayFrame::Sync { order: o, data }, Some(ord)) = (&frame, order.as_deref_mut())
                && *o == ord.id().to_string()
            {
                let msg = sync::Message::decode(data).unwrap();
                let state = self.states.entry(ord.id()).or_default();
                ord.doc_mut().receive_sync_message(state, msg).unwrap();
                ord.refresh().unwrap();
                self.push(ord).await;
            }
            if let (
                RelayFrame::Changes {
                    order: o, changes, ..
                },
                Some(ord),
            ) = (&frame, order.as_deref_mut())
                && *o == ord.id().to_string()
                && apply_forwarded(ord, changes)
            {
                self.push(ord).await;
            }
        }
        panic!("frame never arrived");
    }
}

impl Client {
    /// Applies incoming frames for `order` until `done(order)` holds; other frames are kept in
    /// the backlog.
    pub async fn pump_until(&mut self, order: &mut Order, done: impl Fn(&Order) -> bool) {
        let mut kept = Vec::new();
        for _ in 0..500 {
            if done(order) {
                self.backlog.extend(kept);
                return;
            }
            let frame = self
                .recv()
                .await
                .expect("timed out before the condition held");
            match frame {
                RelayFrame::Sync { order: o, data } if o == order.id().to_string() => {
                    let msg = sync::Message::decode(&data).unwrap();
                    let state = self.states.entry(order.id()).or_default();
                    order.doc_mut().receive_sync_message(state, msg).unwrap();
                    order.refresh().unwrap();
                    self.push(order).await;
                }
                RelayFrame::Changes {
                    order: o, changes, ..
                } if o == order.id().to_string() => {
                    if apply_forwarded(order, &changes) {
                        self.push(order).await;
                    }
                }
                other => kept.push(other),
            }
        }
        panic!("condition never held");
    }
}

/// Applies committed changes the relay forwarded (protocol 2); `true` when one lacks a
/// dependency, so a sync round must fill the gap.
pub fn apply_forwarded(order: &mut Order, changes: &[ByteBuf]) -> bool {
    let changes: Vec<automerge::Change> = changes
        .iter()
        .map(|c| automerge::Change::from_bytes(c.to_vec()).expect("the relay forwards changes"))
        .collect();
    order.doc_mut().apply_changes(changes).unwrap();
    order.refresh().unwrap();
    !order.doc().get_missing_deps(&[]).is_empty()
}

pub async fn recv_frame(ws: &mut Ws) -> Option<RelayFrame> {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => return Some(RelayFrame::decode(&b).unwrap()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// A terminal that holds many orders at once, applies every frame to the order it belongs to
/// (so fan-out for one order is never dropped while another is being synced), records every
/// receipt, and survives a relay that dies under it: every network step returns
/// `Err(Down)` instead of panicking.
pub mod terminal {
    use std::collections::{BTreeMap, BTreeSet, HashMap};
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use automerge::sync::{self, SyncDoc};
    use automerge::{Automerge, ChangeHash, ReadDoc};
    use crdt_model::wire::{ClientFrame, RelayFrame, Version, heads_from_wire};
    use crdt_model::{
        Currency, DeviceId, NewOrder, Order, OrderId, SplitMix64, StoreId, Timestamp, Writer,
    };
    use futures_util::{SinkExt, StreamExt};
    use serde_bytes::ByteBuf;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    use super::{T0, Ws};

    /// The connection is gone (closed, reset, refused, or never came up).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Down;

    /// One `receipt` frame as received: the relay committed `order` up to `heads`.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Receipted {
        pub order: OrderId,
        pub heads: Vec<ChangeHash>,
    }

    /// Every receipt a terminal received, shareable with the test while the terminal runs.
    pub type ReceiptLog = Arc<Mutex<Vec<Receipted>>>;

    pub struct Terminal {
        pub device: DeviceId,
        pub token: String,
        pub writer: Writer,
        pub rng: SplitMix64,
        pub now: i64,
        /// The orders this terminal holds (created here or fetched).
        pub orders: BTreeMap<OrderId, Order>,
        /// The latest receipted heads per order (receipts only ever grow).
        pub last_receipt: HashMap<OrderId, Vec<ChangeHash>>,
        pub receipts: ReceiptLog,
        /// Orders of the store learnt from the feed.
        pub feed: BTreeSet<OrderId>,
        pub feed_seq: u64,
        /// `rejected`, `unavailable` and `error` frames.
        pub unexpected: Vec<RelayFrame>,
        /// Successful handshakes so far.
        pub connects: u32,
        /// Frames sent and received (all connections).
        pub frames_out: u64,
        pub frames_in: u64,
        fetching: HashMap<OrderId, Automerge>,
        states: HashMap<OrderId, sync::State>,
        ws: Option<Ws>,
    }

    impl Terminal {
        pub fn new(device: DeviceId, token: impl Into<String>, seed: u64) -> Self {
            Self {
                device,
                token: token.into(),
                writer: Writer::new(device, 1),
                rng: SplitMix64::new(seed),
                now: T0,
                orders: BTreeMap::new(),
                last_receipt: HashMap::new(),
                receipts: ReceiptLog::default(),
                feed: BTreeSet::new(),
                feed_seq: 0,
                unexpected: Vec::new(),
                connects: 0,
                frames_out: 0,
                frames_in: 0,
                fetching: HashMap::new(),
                states: HashMap::new(),
                ws: None,
            }
        }

        pub fn is_up(&self) -> bool {
            self.ws.is_some()
        }

        /// Opens a new connection (upgrade with the token, `hello`, `welcome`). Sync states are
        /// per connection, so they start fresh.
        pub async fn connect(&mut self, addr: SocketAddr) -> Result<(), Down> {
            self.ws = None;
            self.states.clear();
            let mut req = format!("ws://{addr}/v1/sync")
                .into_client_request()
                .map_err(|_| Down)?;
            req.headers_mut().insert(
                "Authorization",
                format!("Bearer {}", self.token).parse().map_err(|_| Down)?,
            );
            let connecting = tokio_tungstenite::connect_async(req);
            let Ok(Ok((ws, _))) = tokio::time::timeout(Duration::from_secs(5), connecting).await
            else {
                return Err(Down);
            };
            self.ws = Some(ws);
            self.send(&ClientFrame::Hello {
                protocol: Version::CURRENT,
                device: self.device.to_string(),
                agent: "terminal-test".into(),
                feed_since: self.feed_seq,
                highest_number: None,
            })
            .await?;
            match self.next_frame(Duration::from_secs(5)).await? {
                Some(RelayFrame::Welcome { .. }) => {
                    self.connects += 1;
                    Ok(())
                }
                other => {
                    self.ws = None;
                    self.unexpected.extend(other);
                    Err(Down)
                }
            }
        }

        /// Says `bye` and closes the connection.
        pub async fn bye(&mut self) {
            if let Some(mut ws) = self.ws.take() {
                let _ = ws
                    .send(Message::Binary(ClientFrame::Bye.encode().into()))
                    .await;
                let _ = ws.close(None).await;
            }
        }

        async fn send(&mut self, frame: &ClientFrame) -> Result<(), Down> {
            let Some(ws) = self.ws.as_mut() else {
                return Err(Down);
            };
            if ws
                .send(Message::Binary(frame.encode().into()))
                .await
                .is_err()
            {
                self.ws = None;
                return Err(Down);
            }
            self.frames_out += 1;
            Ok(())
        }

        /// The next frame; `Ok(None)` if none arrived within `wait` (zero: only one already
        /// received).
        pub async fn next_frame(&mut self, wait: Duration) -> Result<Option<RelayFrame>, Down> {
            let Some(ws) = self.ws.as_mut() else {
                return Err(Down);
            };
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, ws.next()).await {
                    Err(_) => return Ok(None),
                    Ok(Some(Ok(Message::Binary(b)))) => {
                        let frame = RelayFrame::decode(&b)
                            .unwrap_or_else(|e| panic!("the relay sent an undecodable frame: {e}"));
                        self.frames_in += 1;
                        return Ok(Some(frame));
                    }
                    Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                        self.ws = None;
                        return Err(Down);
                    }
                    Ok(Some(Ok(_))) => {}
                }
            }
        }

        pub fn tick(&mut self) -> Timestamp {
            self.now += 1000;
            Timestamp(self.now)
        }

        /// Creates an order locally (not sent yet).
        pub fn create(&mut self, store: &str) -> OrderId {
            let at = self.tick();
            let new = NewOrder {
                id: OrderId::generate(at, &mut self.rng),
                store: StoreId::new(store).unwrap(),
                currency: Currency::new("EUR").unwrap(),
            };
            let order = Order::create(new, self.writer.clone(), at, &mut self.rng).unwrap();
            let id = order.id();
            self.orders.insert(id, order);
            id
        }

        /// Sends one sync message for `id` (held or being fetched) if there is anything to say.
        pub async fn push(&mut self, id: OrderId) -> Result<bool, Down> {
            let state = self.states.entry(id).or_default();
            let msg = if let Some(o) = self.orders.get(&id) {
                o.doc().generate_sync_message(state)
            } else if let Some(d) = self.fetching.get(&id) {
                d.generate_sync_message(state)
            } else {
                None
            };
            let Some(m) = msg else {
                return Ok(false);
            };
            self.send(&ClientFrame::Sync {
                order: id.to_string(),
                data: ByteBuf::from(m.encode()),
            })
            .await?;
            Ok(true)
        }

        /// Applies one frame: a sync message to its order (answered at once), a receipt to the
        /// log, feed entries to the known orders; anything else unexpected is kept.
        pub async fn handle(&mut self, frame: RelayFrame) -> Result<(), Down> {
            match frame {
                RelayFrame::Sync { order, data } => {
                    let id: OrderId = order.parse().expect("relay sent a bad order id");
                    let msg = sync::Message::decode(&data).expect("relay sent a bad sync message");
                    let state = self.states.entry(id).or_default();
                    if let Some(o) = self.orders.get_mut(&id) {
                        o.doc_mut().receive_sync_message(state, msg).unwrap();
                        o.refresh().unwrap();
                    } else if let Some(d) = self.fetching.get_mut(&id) {
                        d.receive_sync_message(state, msg).unwrap();
                        if !d.get_heads().is_empty() && d.get_missing_deps(&[]).is_empty() {
                            let d = self.fetching.remove(&id).unwrap();
                            let order = Order::from_doc(d, self.writer.clone())
                                .expect("a fetched order parses");
                            self.orders.insert(id, order);
                        }
                    } else {
                        return Ok(());
                    }
                    self.push(id).await?;
                }
                RelayFrame::Changes { order, changes, .. } => {
                    // Committed changes forwarded as they are (protocol 2): applied; a gap
                    // (a missing dependency) is filled by a sync round.
                    let id: OrderId = order.parse().expect("relay sent a bad order id");
                    let changes: Vec<automerge::Change> = changes
                        .iter()
                        .map(|c| automerge::Change::from_bytes(c.to_vec()).expect("a change"))
                        .collect();
                    if let Some(o) = self.orders.get_mut(&id) {
                        // The relay sends only what it committed: these count as receipted.
                        let known = self.last_receipt.entry(id).or_default();
                        for c in &changes {
                            known.retain(|h| !c.deps().contains(h));
                            known.push(c.hash());
                        }
                        o.doc_mut().apply_changes(changes).unwrap();
                        o.refresh().unwrap();
                        if !o.doc().get_missing_deps(&[]).is_empty() {
                            self.push(id).await?;
                        }
                    }
                }
                RelayFrame::Receipt { order, heads, .. } => {
                    let id: OrderId = order.parse().expect("relay sent a bad order id");
                    let heads = heads_from_wire(&heads).expect("receipt heads are hashes");
                    self.receipts.lock().unwrap().push(Receipted {
                        order: id,
                        heads: heads.clone(),
                    });
                    // Changes the relay forwarded since the frame this receipt answers stay
                    // known (they are not ancestors of the receipted heads).
                    let mut known = heads;
                    if let (Some(o), Some(old)) = (self.orders.get(&id), self.last_receipt.get(&id))
                        && known
                            .iter()
                            .all(|h| o.doc().get_change_meta_by_hash(h).is_some())
                    {
                        let later: Vec<ChangeHash> = o
                            .doc()
                            .get_changes_meta(&known)
                            .iter()
                            .map(|m| m.hash)
                            .collect();
                        for h in old {
                            if later.contains(h) && !known.contains(h) {
                                known.push(*h);
                            }
                        }
                    }
                    self.last_receipt.insert(id, known);
                }
                RelayFrame::Feed { entries } => {
                    for e in entries {
                        self.feed_seq = self.feed_seq.max(e.seq);
                        self.feed
                            .insert(e.order.parse().expect("feed names a bad order id"));
                    }
                }
                RelayFrame::Ping { nonce } => self.send(&ClientFrame::Pong { nonce }).await?,
                RelayFrame::Pong { .. } | RelayFrame::Welcome { .. } => {}
                RelayFrame::Bye => {
                    self.ws = None;
                    return Err(Down);
                }
                RelayFrame::Unavailable { ref order } => {
                    if let Ok(id) = order.parse::<OrderId>() {
                        self.fetching.remove(&id);
                    }
                    self.unexpected.push(frame);
                }
                other @ (RelayFrame::Rejected { .. } | RelayFrame::Error { .. }) => {
                    self.unexpected.push(other);
                }
            }
            Ok(())
        }

        /// Applies frames until `done` holds (`Ok(true)`), or `patience` passes (`Ok(false)`).
        pub async fn pump(
            &mut self,
            patience: Duration,
            done: impl Fn(&Self) -> bool,
        ) -> Result<bool, Down> {
            let deadline = tokio::time::Instant::now() + patience;
            loop {
                if done(self) {
                    return Ok(true);
                }
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next_frame(left).await? {
                    Some(f) => self.handle(f).await?,
                    None => return Ok(done(self)),
                }
            }
        }

        /// Applies the frames already received, without waiting.
        pub async fn drain(&mut self) -> Result<(), Down> {
            while let Some(f) = self.next_frame(Duration::ZERO).await? {
                self.handle(f).await?;
            }
            Ok(())
        }

        /// Every change of `id` held here is covered by (in or an ancestor of) a receipt.
        pub fn receipted(&self, id: OrderId) -> bool {
            let (Some(o), Some(r)) = (self.orders.get(&id), self.last_receipt.get(&id)) else {
                return false;
            };
            let doc = o.doc();
            doc.get_heads().iter().all(|h| r.contains(h))
                || (r.iter().all(|h| doc.get_change_by_hash(h).is_some())
                    && doc.get_changes(r).is_empty())
        }

        /// The relay and we hold the same: our heads are exactly the last receipted heads (the
        /// relay holds all we hold), and the heads the relay last announced on this
        /// connection's sync are ours too (we hold all it holds). A receipt alone says only
        /// the first: a change the relay holds and we lack may still be on its way (Automerge
        /// leaves out a change the peer's Bloom filter claims, about 1 in 100, until the peer
        /// asks for it by hash in a later round).
        pub fn in_step(&self, id: OrderId) -> bool {
            let (Some(o), Some(r)) = (self.orders.get(&id), self.last_receipt.get(&id)) else {
                return false;
            };
            let mut mine = o.doc().get_heads();
            let mut theirs = r.clone();
            mine.sort_unstable();
            theirs.sort_unstable();
            let announced = self
                .states
                .get(&id)
                .and_then(|s| s.their_heads.clone())
                .map(|mut h| {
                    h.sort_unstable();
                    h
                });
            mine == theirs && announced.is_none_or(|h| h == mine)
        }

        /// Pushes `id` and applies frames until all of it is receipted.
        pub async fn sync_until_receipted(
            &mut self,
            id: OrderId,
            patience: Duration,
        ) -> Result<bool, Down> {
            self.push(id).await?;
            self.pump(patience, |t| t.receipted(id)).await
        }

        /// Reads frames (handling all others) until a sync message for `id` arrives, and returns
        /// it without applying it.
        pub async fn next_sync_for(
            &mut self,
            id: OrderId,
            patience: Duration,
        ) -> Result<Option<sync::Message>, Down> {
            let deadline = tokio::time::Instant::now() + patience;
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                match self.next_frame(left).await? {
                    None => return Ok(None),
                    Some(RelayFrame::Sync { order, data }) if order == id.to_string() => {
                        let msg = sync::Message::decode(&data).expect("a sync message");
                        return Ok(Some(msg));
                    }
                    Some(f) => self.handle(f).await?,
                }
            }
        }

        /// Applies a sync message for a held order without answering it.
        pub fn receive_only(&mut self, id: OrderId, msg: sync::Message) {
            let state = self.states.entry(id).or_default();
            let o = self.orders.get_mut(&id).expect("a held order");
            o.doc_mut().receive_sync_message(state, msg).unwrap();
            o.refresh().unwrap();
        }

        /// This connection's Automerge sync state for `id`.
        pub fn sync_state(&self, id: OrderId) -> Option<&sync::State> {
            self.states.get(&id)
        }

        /// Fetches an order this terminal does not hold, starting from an empty document.
        /// `Ok(true)` once it is held.
        pub async fn fetch(&mut self, id: OrderId, patience: Duration) -> Result<bool, Down> {
            if self.orders.contains_key(&id) {
                return Ok(true);
            }
            self.fetching.insert(id, Automerge::new());
            self.states.remove(&id);
            self.push(id).await?;
            self.pump(patience, |t| {
                t.orders.contains_key(&id) || !t.fetching.contains_key(&id)
            })
            .await?;
            Ok(self.orders.contains_key(&id))
        }
    }
}
