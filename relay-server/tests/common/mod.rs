//! Test harness: a relay on 127.0.0.1:0 with a temp data dir, and a WebSocket test client.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

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
                RelayFrame::Receipt { order: o, heads } if o == order.id().to_string() => {
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
                other => kept.push(other),
            }
        }
        panic!("condition never held");
    }
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

/// An order replica for a device that does not have it yet (fetch through sync).
pub fn empty_order_doc() -> automerge::Automerge {
    automerge::Automerge::new()
}
