//! `relay-load`: a load generator for the relay.
//!
//! Starts an embedded relay (in this process, on its own tokio runtime), opens `--devices`
//! WebSocket connections spread over `--stores` stores, lets every device create one order and
//! then edit it like a cashier (quantity +/-, a note now and then, a new line now and then),
//! sending each change as an Automerge sync message and keeping at most `--window` unreceipted
//! changes in flight. Devices are paired within a store: each one also follows its partner's
//! order, which gives the terminal-to-terminal propagation time.
//!
//! Devices speak the protocol over tokio-tungstenite, like the replicator does.
//!
//! With `--store postgres://...` the records are in PostgreSQL (a fresh schema, dropped at the
//! end) and `--relays N` starts N relays on it (each its own store handle: own pool, own actor
//! epoch), devices spread over them so that partners are on different relays: the
//! terminal-to-terminal figure is then the cross-relay propagation (commit on one relay,
//! NOTIFY, feed read and refresh on the other, fan-out to its device).
//!
//! The process uses mimalloc, the allocator of the `relay-server` binary, so the relay's share
//! is measured as it runs in production (the load generator gets it too).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, Change, ChangeHash, ReadDoc};
use clap::Parser;
use crdt_model::wire::{ClientFrame, RelayFrame, Version, heads_from_wire, heads_to_wire};
use crdt_model::{
    Currency, DeviceId, FinalPayment, LineDraft, LineId, NewOrder, Order, OrderId, PaymentDraft,
    PaymentKind, SplitMix64, StoreId, Timestamp, Writer,
};
use e2e::harness::EmbeddedRelay;
use e2e::latency::Latency;
use futures_util::{SinkExt, StreamExt};
use serde_bytes::ByteBuf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The relay binary's allocator (see the module docs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug, Clone)]
#[command(about = "Load generator for the relay (embedded relay, real WebSockets)")]
struct Args {
    /// Device connections.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Stores the devices are spread over.
    #[arg(long, default_value_t = 5)]
    stores: usize,
    /// Measured duration, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Total changes per second over all devices (0 = flat out).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Unreceipted changes a device may have in flight.
    #[arg(long, default_value_t = 4)]
    window: usize,
    /// Sample every k-th change for terminal-to-terminal propagation.
    #[arg(long, default_value_t = 4)]
    sample_every: u64,
    /// Realistic orders: a sale is paid and closed after about 40 changes, then the device
    /// starts a new order (its partner follows the new one through the store feed).
    #[arg(long)]
    realistic: bool,
    /// CI mode: 5 devices, 2 seconds.
    #[arg(long)]
    quick: bool,
    /// Keep the records in this PostgreSQL database (a fresh schema, dropped at the end)
    /// instead of an embedded redb file.
    #[arg(long)]
    store: Option<String>,
    /// Relays serving the devices (with --store; devices spread over them, partners on
    /// different relays).
    #[arg(long, default_value_t = 1)]
    relays: usize,
}

// ---------------------------------------------------------------------------------------------
// WebSocket client (tokio-tungstenite): a writer half, and a task that decodes incoming frames.

enum Incoming {
    Frame(RelayFrame, Instant),
    Ping(Vec<u8>),
    BadFrame(String),
    Closed(String),
}

type WsSink = futures_util::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    Message,
>;

struct WsWriter {
    sink: WsSink,
}

impl WsWriter {
    /// Answers a WebSocket ping.
    async fn pong(&mut self, payload: &[u8]) -> Result<()> {
        Ok(self
            .sink
            .send(Message::Pong(payload.to_vec().into()))
            .await?)
    }

    async fn frame(&mut self, f: &ClientFrame) -> Result<()> {
        Ok(self.sink.send(Message::Binary(f.encode().into())).await?)
    }
}

async fn ws_connect(
    addr: SocketAddr,
    token: &str,
) -> Result<(WsWriter, mpsc::UnboundedReceiver<Incoming>)> {
    let mut req = format!("ws://{addr}/v1/sync").into_client_request()?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, None, true).await?;
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let why = loop {
            let item = match stream.next().await {
                Some(Ok(Message::Binary(data))) => match RelayFrame::decode(&data) {
                    Ok(f) => Incoming::Frame(f, Instant::now()),
                    Err(e) => Incoming::BadFrame(e.to_string()),
                },
                Some(Ok(Message::Ping(p))) => Incoming::Ping(p.to_vec()),
                Some(Ok(Message::Close(_))) | None => break "close frame".to_owned(),
                Some(Ok(_)) => continue,
                Some(Err(e)) => break e.to_string(),
            };
            if tx.send(item).is_err() {
                return;
            }
        };
        let _ = tx.send(Incoming::Closed(why));
    });
    Ok((WsWriter { sink }, rx))
}

// ---------------------------------------------------------------------------------------------
// Devices.

#[derive(Default)]
struct Stats {
    sent_changes: u64,
    /// Sales closed (realistic mode).
    sales: u64,
    receipted: u64,
    receipted_in_window: u64,
    receipt_lat: Latency,
    prop_lat: Latency,
    /// Propagation samples by the second of the measured run their change was sent in (raw:
    /// one histogram per device and second would cost more than the samples).
    prop_by_sec: Vec<(u64, Duration)>,
    rejected: u64,
    unavailable: u64,
    errors: HashMap<String, u64>,
    bad_frames: u64,
    disconnects: u64,
    model_errors: u64,
    stalls: u64,
    max_receipt_gap: Duration,
    unreceipted_at_end: u64,
    first_failures: Vec<String>,
}

impl Stats {
    fn note(&mut self, s: String) {
        if self.first_failures.len() < 5 {
            self.first_failures.push(s);
        }
    }
    fn merge(&mut self, o: Stats) {
        self.sent_changes += o.sent_changes;
        self.sales += o.sales;
        self.receipted += o.receipted;
        self.receipted_in_window += o.receipted_in_window;
        self.receipt_lat.merge(&o.receipt_lat);
        self.prop_lat.merge(&o.prop_lat);
        self.prop_by_sec.extend(o.prop_by_sec);
        self.rejected += o.rejected;
        self.unavailable += o.unavailable;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.bad_frames += o.bad_frames;
        self.disconnects += o.disconnects;
        self.model_errors += o.model_errors;
        self.stalls += o.stalls;
        self.max_receipt_gap = self.max_receipt_gap.max(o.max_receipt_gap);
        self.unreceipted_at_end += o.unreceipted_at_end;
        for f in o.first_failures {
            self.note(f);
        }
    }
}

/// Sampled changes of each order, waiting to be seen by the partner: (hash, send time).
type Propagation = Arc<Mutex<HashMap<OrderId, VecDeque<(ChangeHash, Instant)>>>>;

struct Shared {
    /// The relay each device connects to, by device.
    addrs: Vec<SocketAddr>,
    order_ids: Mutex<Vec<Option<OrderId>>>,
    barrier: tokio::sync::Barrier,
    prop: Propagation,
    window: usize,
    seconds: u64,
    /// Time between two changes of one device (None = flat out).
    period: Option<Duration>,
    sample_every: u64,
    /// Device count (to stagger paced devices).
    devices: usize,
    /// Close each sale after this many changes and start a new one (0 = one order forever).
    sale_changes: u64,
}

struct Device {
    idx: usize,
    partner: Option<usize>,
    ws: WsWriter,
    rx: mpsc::UnboundedReceiver<Incoming>,
    order: Order,
    state: sync::State,
    /// Heads after the last push (or what the relay sent since).
    pushed: Vec<ChangeHash>,
    /// Changes made on the current order (realistic mode closes it after `sale_changes`).
    on_order: u64,
    /// The current sale is closed; a new order starts once its changes are receipted.
    closed: bool,
    line: LineId,
    qty: i64,
    rng: SplitMix64,
    last_ms: i64,
    in_flight: VecDeque<(ChangeHash, Instant)>,
    partner_order: Option<(OrderId, Automerge, sync::State)>,
    stats: Stats,
    deadline: Option<Instant>,
    last_receipt: Instant,
}

/// The first line of every sale.
fn espresso() -> LineDraft {
    LineDraft {
        sku: "espresso".into(),
        name: "Espresso".into(),
        unit_price: 180,
        quantity: 1,
        ..Default::default()
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Device {
    fn tick(&mut self) -> Timestamp {
        self.last_ms = (self.last_ms + 1).max(now_ms());
        Timestamp(self.last_ms)
    }

    /// Pushes the changes made since the last push (protocol 2), with the order's heads.
    async fn push(&mut self) -> Result<()> {
        let heads = self.order.heads();
        if heads == self.pushed {
            return Ok(());
        }
        let changes = self
            .order
            .doc()
            .get_changes(&self.pushed)
            .iter()
            .map(|c| ByteBuf::from(c.raw_bytes().to_vec()))
            .collect();
        let f = ClientFrame::Changes {
            order: self.order.id().to_string(),
            changes,
            heads: heads_to_wire(&heads),
            voucher: None,
        };
        self.pushed = heads;
        self.ws.frame(&f).await
    }

    /// Answers the relay's sync message for the device's own order (a catch-up round).
    async fn sync_own(&mut self) -> Result<()> {
        if let Some(m) = self.order.doc().generate_sync_message(&mut self.state) {
            let f = ClientFrame::Sync {
                order: self.order.id().to_string(),
                data: m.encode().into(),
            };
            self.ws.frame(&f).await?;
        }
        Ok(())
    }

    /// Records the propagation time of the partner's sampled changes that arrived.
    fn partner_arrivals(&mut self, at: Instant, shared: &Shared) {
        let Some((id, doc, _)) = self.partner_order.as_ref() else {
            return;
        };
        if self.deadline.is_none() {
            return;
        }
        let mut prop = shared.prop.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = prop.get_mut(id) {
            while let Some((h, t)) = q.front().copied() {
                if doc.get_change_meta_by_hash(&h).is_none() {
                    break;
                }
                let lat = at.saturating_duration_since(t);
                self.stats.prop_lat.record(lat);
                if let Some(start) = self
                    .deadline
                    .and_then(|d| d.checked_sub(Duration::from_secs(shared.seconds)))
                {
                    let sec = t.saturating_duration_since(start).as_secs();
                    self.stats.prop_by_sec.push((sec, lat));
                }
                q.pop_front();
            }
        }
    }

    async fn push_partner(&mut self) -> Result<()> {
        if let Some((id, doc, st)) = self.partner_order.as_mut()
            && let Some(m) = doc.generate_sync_message(st)
        {
            let f = ClientFrame::Sync {
                order: id.to_string(),
                data: m.encode().into(),
            };
            self.ws.frame(&f).await?;
        }
        Ok(())
    }

    /// Handles one incoming item; Err means the connection is gone.
    async fn handle(&mut self, item: Incoming, shared: &Shared) -> Result<()> {
        let (frame, at) = match item {
            Incoming::Frame(f, at) => (f, at),
            Incoming::Ping(p) => {
                self.ws.pong(&p).await?;
                return Ok(());
            }
            Incoming::BadFrame(e) => {
                self.stats.bad_frames += 1;
                self.stats.note(format!("undecodable frame: {e}"));
                return Ok(());
            }
            Incoming::Closed(why) => {
                self.stats.disconnects += 1;
                self.stats
                    .note(format!("device {} disconnected: {why}", self.idx));
                bail!("disconnected: {why}");
            }
        };
        let mine = self.order.id().to_string();
        match frame {
            RelayFrame::Sync { order, data } if order == mine => {
                let msg = sync::Message::decode(&data).context("relay sync message")?;
                if let Err(e) = self
                    .order
                    .doc_mut()
                    .receive_sync_message(&mut self.state, msg)
                {
                    self.stats.model_errors += 1;
                    self.stats.note(format!("receive_sync_message: {e}"));
                }
                if let Err(e) = self.order.refresh() {
                    self.stats.model_errors += 1;
                    self.stats.note(format!("refresh: {e}"));
                }
                self.sync_own().await?;
            }
            RelayFrame::Changes { order, changes, .. } => {
                let decoded: Vec<Change> = changes
                    .iter()
                    .filter_map(|c| Change::from_bytes(c.to_vec()).ok())
                    .collect();
                if order == mine {
                    // Changes from the relay are known to it: the next push starts after them.
                    for c in &decoded {
                        self.pushed.retain(|h| !c.deps().contains(h));
                        if !decoded.iter().any(|o| o.deps().contains(&c.hash())) {
                            self.pushed.push(c.hash());
                        }
                    }
                    if let Err(e) = self.order.doc_mut().apply_changes(decoded) {
                        self.stats.model_errors += 1;
                        self.stats.note(format!("apply_changes: {e}"));
                    }
                    if let Err(e) = self.order.refresh() {
                        self.stats.model_errors += 1;
                        self.stats.note(format!("refresh: {e}"));
                    }
                    if !self.order.doc().get_missing_deps(&[]).is_empty() {
                        self.sync_own().await?;
                    }
                } else if let Some((id, doc, _)) = self.partner_order.as_mut()
                    && order == id.to_string()
                {
                    if let Err(e) = doc.apply_changes(decoded) {
                        self.stats.model_errors += 1;
                        self.stats.note(format!("partner apply_changes: {e}"));
                    }
                    let gap = !doc.get_missing_deps(&[]).is_empty();
                    self.partner_arrivals(at, shared);
                    if gap {
                        self.push_partner().await?;
                    }
                }
            }
            RelayFrame::Sync { order, data } => {
                let Some((id, doc, st)) = self.partner_order.as_mut() else {
                    return Ok(());
                };
                if order != id.to_string() {
                    return Ok(());
                }
                let msg = sync::Message::decode(&data).context("relay sync message")?;
                if let Err(e) = doc.receive_sync_message(st, msg) {
                    self.stats.model_errors += 1;
                    self.stats
                        .note(format!("partner receive_sync_message: {e}"));
                }
                self.partner_arrivals(at, shared);
                self.push_partner().await?;
            }
            RelayFrame::Receipt { order, heads, .. } if order == mine => {
                let heads = heads_from_wire(&heads)?;
                let doc = self.order.doc();
                let covered_upto = if heads.iter().all(|h| doc.get_change_by_hash(h).is_some()) {
                    // Changes we have beyond the receipted heads are not covered.
                    let beyond: std::collections::HashSet<ChangeHash> =
                        doc.get_changes(&heads).iter().map(|c| c.hash()).collect();
                    self.in_flight
                        .iter()
                        .rposition(|(h, _)| !beyond.contains(h))
                } else {
                    // Our changes form a chain: the newest one named in the heads covers all
                    // earlier ones.
                    self.in_flight.iter().rposition(|(h, _)| heads.contains(h))
                };
                if let Some(i) = covered_upto {
                    let in_window = self.deadline.is_some_and(|d| at <= d);
                    for (_, t) in self.in_flight.drain(..=i) {
                        self.stats.receipted += 1;
                        if in_window {
                            self.stats.receipted_in_window += 1;
                        }
                        self.stats
                            .receipt_lat
                            .record(at.saturating_duration_since(t));
                    }
                    self.last_receipt = at;
                }
            }
            RelayFrame::Feed { entries } => {
                // Realistic mode: the partner's new order shows up in the feed; follow it.
                let Some(p) = self.partner else {
                    return Ok(());
                };
                let want = shared.order_ids.lock().unwrap_or_else(|e| e.into_inner())[p];
                let following = self.partner_order.as_ref().map(|(id, _, _)| *id);
                if let Some(want) = want
                    && following != Some(want)
                    && entries.iter().any(|e| e.order == want.to_string())
                {
                    self.partner_order = Some((want, Automerge::new(), sync::State::new()));
                    self.push_partner().await?;
                }
            }
            RelayFrame::Receipt { .. } | RelayFrame::Pong { .. } => {}
            RelayFrame::Welcome { .. } => {}
            RelayFrame::Ping { nonce } => self.ws.frame(&ClientFrame::Pong { nonce }).await?,
            RelayFrame::Rejected { code, message, .. } => {
                self.stats.rejected += 1;
                self.stats.note(format!("rejected {code}: {message}"));
            }
            RelayFrame::Unavailable { order } => {
                self.stats.unavailable += 1;
                self.stats.note(format!("unavailable {order}"));
            }
            RelayFrame::Error {
                code,
                message,
                fatal,
            } => {
                *self.stats.errors.entry(code.clone()).or_default() += 1;
                self.stats
                    .note(format!("error {code} (fatal {fatal}): {message}"));
            }
            RelayFrame::Bye => {
                self.stats.note("relay sent bye".into());
            }
        }
        Ok(())
    }

    /// One cashier edit, committed locally and sent; `false` when the device is waiting for its
    /// closed sale's receipts before it starts the next one.
    async fn edit(&mut self, n: u64, shared: &Shared) -> Result<bool> {
        if self.closed {
            if !self.in_flight.is_empty() {
                return Ok(false);
            }
            self.new_sale(shared).await?;
            return Ok(true);
        }
        if shared.sale_changes > 0 && self.on_order + 1 >= shared.sale_changes {
            return self.close_sale(shared).await.map(|()| true);
        }
        self.on_order += 1;
        let at = self.tick();
        let r = if n % 50 == 49 {
            let draft = LineDraft {
                sku: "coffee".into(),
                name: "Coffee".into(),
                unit_price: 250,
                quantity: 1,
                ..Default::default()
            };
            self.order.add_line(at, &mut self.rng, draft).map(|_| ())
        } else if n % 10 == 9 {
            self.order.set_note(at, self.line, &format!("note {n}"))
        } else {
            let delta = if self.qty >= 3 { -1 } else { 1 };
            let r = self.order.change_quantity(at, self.line, delta);
            if r.is_ok() {
                self.qty += delta;
            }
            r
        };
        if let Err(e) = r {
            self.stats.model_errors += 1;
            self.stats.note(format!("local edit: {e}"));
            return Ok(true);
        }
        let heads = self.order.heads();
        let Some(&h) = heads.first() else {
            return Ok(true);
        };
        let t = Instant::now();
        if shared.sample_every > 0
            && n.is_multiple_of(shared.sample_every)
            && self.partner.is_some()
        {
            // Someone follows this order: register the change before it can arrive.
            let mut prop = shared.prop.lock().unwrap_or_else(|e| e.into_inner());
            let q = prop.entry(self.order.id()).or_default();
            if q.len() < 10_000 {
                q.push_back((h, t));
            }
        }
        self.in_flight.push_back((h, t));
        self.stats.sent_changes += 1;
        self.push().await?;
        Ok(true)
    }

    /// Pays the balance in cash and closes the sale, in one change.
    async fn close_sale(&mut self, _shared: &Shared) -> Result<()> {
        let at = self.tick();
        let due = self.order.view().map(|v| v.totals.balance_due).unwrap_or(0);
        let last = (due > 0).then(|| {
            FinalPayment::New(PaymentDraft {
                kind: PaymentKind::Cash,
                amount: due,
                reference: String::new(),
            })
        });
        if let Err(e) = self.order.complete_sale(at, &mut self.rng, last) {
            self.stats.model_errors += 1;
            self.stats.note(format!("complete sale: {e}"));
        }
        self.closed = true;
        self.stats.sales += 1;
        for h in self.order.heads() {
            self.in_flight.push_back((h, Instant::now()));
        }
        self.stats.sent_changes += 1;
        self.push().await
    }

    /// Starts the next sale: a new order with one line, pushed at once.
    async fn new_sale(&mut self, shared: &Shared) -> Result<()> {
        let at = self.tick();
        let new = NewOrder {
            id: OrderId::generate(at, &mut self.rng),
            store: self.order.store().clone(),
            currency: self.order.currency(),
        };
        let mut order = Order::create(new, self.order.writer().clone(), at, &mut self.rng)?;
        let at = self.tick();
        self.line = order.add_line(at, &mut self.rng, espresso())?;
        self.qty = 1;
        self.order = order;
        self.state = sync::State::new();
        self.pushed = Vec::new();
        self.on_order = 2;
        self.closed = false;
        shared.order_ids.lock().unwrap_or_else(|e| e.into_inner())[self.idx] =
            Some(self.order.id());
        for h in self.order.heads() {
            self.in_flight.push_back((h, Instant::now()));
        }
        self.stats.sent_changes += 2;
        self.push().await
    }

    async fn next(&mut self, until: Instant) -> Option<Incoming> {
        tokio::time::timeout_at(until.into(), self.rx.recv())
            .await
            .ok()
            .flatten()
    }
}

async fn run_device(
    idx: usize,
    store: StoreId,
    partner: Option<usize>,
    device: DeviceId,
    token: String,
    shared: Arc<Shared>,
) -> Stats {
    match device_main(idx, store, partner, device, token, &shared).await {
        Ok(s) => s,
        Err((mut s, e)) => {
            s.note(format!("device {idx}: {e:#}"));
            s
        }
    }
}

async fn device_main(
    idx: usize,
    store: StoreId,
    partner: Option<usize>,
    device: DeviceId,
    token: String,
    shared: &Shared,
) -> Result<Stats, (Stats, anyhow::Error)> {
    let fail = |e: anyhow::Error| (Stats::default(), e);
    // Connect and hello.
    let addr = shared.addrs[idx];
    let (mut ws, mut rx) = ws_connect(addr, &token).await.map_err(fail)?;
    let hello = ClientFrame::Hello {
        protocol: Version::CURRENT,
        device: device.to_string(),
        agent: "relay-load".into(),
        feed_since: 0,
        highest_number: None,
    };
    ws.frame(&hello).await.map_err(fail)?;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(Incoming::Frame(RelayFrame::Welcome { .. }, _))) => break,
            Ok(Some(Incoming::Frame(f, _))) => {
                return Err(fail(anyhow::anyhow!("expected welcome, got {f:?}")));
            }
            Ok(Some(_)) => {}
            _ => return Err(fail(anyhow::anyhow!("no welcome"))),
        }
    }
    // Create the order with one line.
    let seed = u64::from_le_bytes(device.as_bytes()[..8].try_into().unwrap_or([7; 8]));
    let mut rng = SplitMix64::new(seed ^ idx as u64);
    let at = Timestamp(now_ms());
    let new = NewOrder {
        id: OrderId::generate(at, &mut rng),
        store,
        currency: Currency::new("EUR").map_err(|e| fail(e.into()))?,
    };
    let mut order =
        Order::create(new, Writer::new(device, 1), at, &mut rng).map_err(|e| fail(e.into()))?;
    let line = order
        .add_line(Timestamp(at.0 + 1), &mut rng, espresso())
        .map_err(|e| fail(e.into()))?;
    let mut d = Device {
        idx,
        partner,
        ws,
        rx,
        in_flight: order
            .heads()
            .into_iter()
            .map(|h| (h, Instant::now()))
            .collect(),
        order,
        state: sync::State::new(),
        pushed: Vec::new(),
        on_order: 0,
        closed: false,
        line,
        qty: 1,
        rng,
        last_ms: at.0 + 1,
        partner_order: None,
        stats: Stats::default(),
        deadline: None,
        last_receipt: Instant::now(),
    };
    macro_rules! tri {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) => return Err((std::mem::take(&mut d.stats), e.into())),
            }
        };
    }
    // Sync until receipted.
    tri!(d.push().await);
    let until = Instant::now() + Duration::from_secs(20);
    while !d.in_flight.is_empty() {
        let Some(item) = d.next(until).await else {
            return Err((d.stats, anyhow::anyhow!("initial order never receipted")));
        };
        tri!(d.handle(item, shared).await);
    }
    // Initial receipt is not a measured change.
    d.stats = Stats::default();
    {
        let mut ids = shared.order_ids.lock().unwrap_or_else(|e| e.into_inner());
        ids[idx] = Some(d.order.id());
    }
    shared.barrier.wait().await;
    // Fetch the partner's order.
    if let Some(p) = partner {
        let id = shared.order_ids.lock().unwrap_or_else(|e| e.into_inner())[p];
        if let Some(id) = id {
            d.partner_order = Some((id, Automerge::new(), sync::State::new()));
            tri!(d.push_partner().await);
            let until = Instant::now() + Duration::from_secs(20);
            while d
                .partner_order
                .as_ref()
                .is_some_and(|(_, doc, _)| doc.get_heads().is_empty())
            {
                let Some(item) = d.next(until).await else {
                    d.stats
                        .note(format!("device {idx}: partner order never arrived"));
                    break;
                };
                tri!(d.handle(item, shared).await);
            }
        }
    }
    shared.barrier.wait().await;
    // Measured phase.
    let start = Instant::now();
    let deadline = start + Duration::from_secs(shared.seconds);
    d.deadline = Some(deadline);
    d.last_receipt = start;
    // Paced devices are staggered over one period, so they do not send in lockstep bursts.
    let mut next_send = start
        + shared.period.map_or(Duration::ZERO, |p| {
            p.mul_f64(idx as f64 / shared.devices as f64)
        });
    let mut n: u64 = 0;
    let mut stalled = false;
    let mut waiting = false;
    loop {
        while let Ok(item) = d.rx.try_recv() {
            tri!(d.handle(item, shared).await);
            waiting = false;
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if d.in_flight.len() < shared.window && now >= next_send && !waiting {
            if tri!(d.edit(n, shared).await) {
                n += 1;
                if let Some(p) = shared.period {
                    next_send += p;
                }
                continue;
            }
            // Waiting for the closed sale's receipts before the next sale.
            waiting = true;
        }
        // Stall detection: window full and nothing receipted for 1 s.
        if d.in_flight.len() >= shared.window {
            let gap = now.saturating_duration_since(d.last_receipt);
            if gap > Duration::from_secs(1) && !stalled {
                stalled = true;
                d.stats.stalls += 1;
                d.stats.note(format!(
                    "device {idx}: no receipt for {gap:?} with a full window"
                ));
            }
        } else {
            stalled = false;
        }
        let wake = if d.in_flight.len() < shared.window && !waiting {
            next_send.min(deadline)
        } else {
            deadline.min(now + Duration::from_millis(250))
        };
        if let Some(item) = d.next(wake).await {
            tri!(d.handle(item, shared).await);
            waiting = false;
        }
    }
    // Drain: collect receipts for changes still in flight (not counted in the throughput).
    let until = Instant::now() + Duration::from_secs(2);
    while !d.in_flight.is_empty() {
        let Some(item) = d.next(until).await else {
            break;
        };
        tri!(d.handle(item, shared).await);
    }
    for (_, t) in &d.in_flight {
        d.stats.max_receipt_gap = d.stats.max_receipt_gap.max(t.elapsed());
    }
    d.stats.unreceipted_at_end = d.in_flight.len() as u64;
    let _ = d.ws.frame(&ClientFrame::Bye).await;
    Ok(d.stats)
}

// ---------------------------------------------------------------------------------------------
// Process figures.

struct Proc {
    utime: u64,
    stime: u64,
    rss_kb: u64,
    hwm_kb: u64,
    threads: u64,
}

/// Clock ticks per second for /proc stat (USER_HZ; 100 on Linux).
const HZ: f64 = 100.0;

fn read_proc() -> Proc {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // After the comm field: state is index 0, utime is field 14 overall -> index 11.
    let num = |i: usize| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0u64);
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0u64)
    };
    Proc {
        utime: num(11),
        stime: num(12),
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
        threads: kb("Threads:"),
    }
}

/// CPU ticks of this process's threads whose name starts with `prefix`.
fn thread_ticks(prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut total = 0;
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let name = head.split_once('(').map(|x| x.1).unwrap_or("");
        if !name.starts_with(prefix) {
            continue;
        }
        let f: Vec<&str> = after.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse().ok()).unwrap_or(0u64);
        total += num(11) + num(12);
    }
    total
}

/// The relay's counters, scraped from its `/metrics` endpoint (name -> value, unlabelled only).
/// The relays under load: one embedded (redb), or several on one PostgreSQL schema.
enum Relays {
    Embedded(EmbeddedRelay),
    Postgres {
        schema: e2e::pgdb::TestSchema,
        stores: Vec<Arc<relay_server::pg::PgStore>>,
        running: Vec<relay_server::RunningRelay>,
        admin: String,
    },
}

impl Relays {
    /// `n` relays on a fresh schema of `url`.
    async fn on_postgres(url: &str, n: usize) -> Result<Self> {
        let schema = e2e::pgdb::TestSchema::new(url, "relay_load");
        let mut stores = Vec::new();
        let mut running = Vec::new();
        for _ in 0..n {
            let store = schema.connect(8).await?;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            running.push(relay_server::server::serve_listener(
                relay_server::RelayConfig::default(),
                Arc::clone(&store),
                listener,
            )?);
            stores.push(store);
        }
        let admin = stores[0].add_admin_token(None, "relay-load", 0).await?;
        Ok(Self::Postgres {
            schema,
            stores,
            running,
            admin,
        })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        match self {
            Self::Embedded(r) => vec![r.addr],
            Self::Postgres { running, .. } => running.iter().map(|r| r.addr).collect(),
        }
    }

    async fn provision(&self, store: &StoreId, name: &str) -> Result<(DeviceId, String)> {
        match self {
            Self::Embedded(r) => r.provision(store, name),
            Self::Postgres { stores, .. } => {
                let (rec, token) = stores[0].add_device(store, name, 0).await?;
                Ok((rec.device, token))
            }
        }
    }

    /// The relays' counters, summed over the relays.
    async fn counters(&self) -> Result<HashMap<String, f64>> {
        match self {
            Self::Embedded(r) => relay_counters(r.addr, &r.admin).await,
            Self::Postgres { running, admin, .. } => {
                let mut sum: HashMap<String, f64> = HashMap::new();
                for r in running {
                    for (k, v) in relay_counters(r.addr, admin).await? {
                        *sum.entry(k).or_default() += v;
                    }
                }
                Ok(sum)
            }
        }
    }

    async fn stop(&mut self) -> Result<()> {
        match self {
            Self::Embedded(r) => r.stop().await,
            Self::Postgres {
                schema,
                stores,
                running,
                ..
            } => {
                for r in running.drain(..) {
                    r.stop().await?;
                }
                schema.drop_schema(&stores[0]).await
            }
        }
    }
}

async fn relay_counters(addr: SocketAddr, admin: &str) -> Result<HashMap<String, f64>> {
    let (status, body) = e2e::harness::http(addr, "GET", "/metrics", admin, None).await?;
    if status != 200 {
        bail!("/metrics answered {status}");
    }
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.contains('{'))
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_owned(), v.trim().parse().ok()?))
        })
        .collect())
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.devices = 5;
        args.seconds = 2;
        args.stores = args.stores.min(2);
    }
    let devices = args.devices.max(1);
    let stores = args.stores.clamp(1, devices);
    let relay_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("relay-rt")
        .build()?;
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("load-rt")
        .build()?;
    let dir = tempfile::tempdir()?;
    let mut relays = match &args.store {
        None => {
            anyhow::ensure!(args.relays == 1, "--relays needs --store postgres://...");
            Relays::Embedded(relay_rt.block_on(EmbeddedRelay::start(dir.path(), 0))?)
        }
        Some(url) => relay_rt.block_on(Relays::on_postgres(url, args.relays.max(1)))?,
    };
    let addrs = relays.addrs();
    let addr = addrs[0];

    // Provision: device i belongs to store i % stores; partners are consecutive devices of a
    // store (an odd one out has no partner).
    let mut per_store: Vec<Vec<usize>> = vec![Vec::new(); stores];
    let mut provisioned = Vec::with_capacity(devices);
    for i in 0..devices {
        let s = i % stores;
        let store = StoreId::new(format!("load-{}", s + 1))?;
        let (dev, token) = relay_rt.block_on(relays.provision(&store, &format!("till-{i}")))?;
        per_store[s].push(i);
        provisioned.push((store, dev, token));
    }
    let mut partner = vec![None; devices];
    // Which relay each device connects to: the two of a pair on consecutive relays (different
    // ones whenever there are several), pairs spread round the relays.
    let n_relays = addrs.len();
    let mut relay_of = vec![0; devices];
    let mut k = 0;
    for members in &per_store {
        for pair in members.chunks(2) {
            if let [a, b] = pair {
                partner[*a] = Some(*b);
                partner[*b] = Some(*a);
                relay_of[*a] = k % n_relays;
                relay_of[*b] = (k + 1) % n_relays;
            } else if let [a] = pair {
                relay_of[*a] = k % n_relays;
            }
            k += 1;
        }
    }
    let period =
        (args.rate > 0).then(|| Duration::from_secs_f64(devices as f64 / args.rate as f64));
    let shared = Arc::new(Shared {
        addrs: relay_of.iter().map(|r| addrs[*r]).collect(),
        order_ids: Mutex::new(vec![None; devices]),
        barrier: tokio::sync::Barrier::new(devices),
        prop: Arc::default(),
        window: args.window.max(1),
        seconds: args.seconds,
        period,
        sample_every: args.sample_every,
        devices,
        sale_changes: if args.realistic { 40 } else { 0 },
    });

    println!(
        "relay-load: {devices} devices, {stores} stores, {} s, rate {}, window {}, {}",
        args.seconds,
        if args.rate == 0 {
            "flat out".to_string()
        } else {
            format!("{}/s", args.rate)
        },
        shared.window,
        match &relays {
            Relays::Embedded(_) => format!(
                "relay embedded at {addr} (data in {})",
                dir.path().display()
            ),
            Relays::Postgres { .. } => format!(
                "{} relay(s) on PostgreSQL at {addrs:?} (partners on different relays)",
                addrs.len()
            ),
        }
    );
    let p0 = read_proc();
    let load0 = thread_ticks("load-rt");
    let t0 = Instant::now();
    let (stats, measured_wall) = load_rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, (store, dev, token)) in provisioned.into_iter().enumerate() {
            tasks.push(tokio::spawn(run_device(
                i,
                store,
                partner[i],
                dev,
                token,
                Arc::clone(&shared),
            )));
        }
        let mut all = Stats::default();
        for t in tasks {
            match t.await {
                Ok(s) => all.merge(s),
                Err(e) => all.note(format!("device task panicked: {e}")),
            }
        }
        (all, t0.elapsed())
    });
    let wall = t0.elapsed().as_secs_f64();
    let p1 = read_proc();
    let load1 = thread_ticks("load-rt");
    let counters = relay_rt.block_on(relays.counters());
    relay_rt.block_on(relays.stop())?;

    let cpu_total = (p1.utime + p1.stime - p0.utime - p0.stime) as f64 / HZ;
    let cpu_load = load1.saturating_sub(load0) as f64 / HZ;
    let secs = args.seconds.max(1) as f64;
    let errors: u64 = stats.errors.values().sum();

    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| changes sent (measured window) | {} |",
        stats.sent_changes
    );
    println!(
        "| receipted changes/s (receipt within the {} s window) | {:.0} |",
        args.seconds,
        stats.receipted_in_window as f64 / secs
    );
    println!(
        "| receipted changes total (incl. 2 s drain) | {} |",
        stats.receipted
    );
    println!(
        "| receipt latency p50 / p99 / p999 / max | {} / {} / {} / {} |",
        stats.receipt_lat.fmt(0.5),
        stats.receipt_lat.fmt(0.99),
        stats.receipt_lat.fmt(0.999),
        stats.receipt_lat.fmt(1.0)
    );
    println!(
        "| terminal-to-terminal p50 / p99 / max ({} samples, every {}th change) | {} / {} / {} |",
        stats.prop_lat.len(),
        args.sample_every,
        stats.prop_lat.fmt(0.5),
        stats.prop_lat.fmt(0.99),
        stats.prop_lat.fmt(1.0)
    );
    if !stats.prop_by_sec.is_empty() {
        let mut by_sec: std::collections::BTreeMap<u64, Latency> = Default::default();
        for (sec, lat) in &stats.prop_by_sec {
            by_sec.entry(*sec).or_default().record(*lat);
        }
        let cells: Vec<String> = by_sec
            .values()
            .map(|h| h.fmt(0.99).replace(" ms", ""))
            .collect();
        println!(
            "| terminal-to-terminal p99 (ms) by second of the run the change was sent in | {} |",
            cells.join(" / ")
        );
    }
    if args.realistic {
        println!(
            "| sales closed (each ~40 changes, then a new order) | {} |",
            stats.sales
        );
    }
    println!("| rejected | {} |", stats.rejected);
    println!("| unavailable | {} |", stats.unavailable);
    println!("| error frames | {errors} {:?} |", stats.errors);
    println!(
        "| undecodable frames / disconnects / local model errors | {} / {} / {} |",
        stats.bad_frames, stats.disconnects, stats.model_errors
    );
    println!(
        "| stalls (full window, no receipt > 1 s) | {} |",
        stats.stalls
    );
    println!(
        "| unreceipted after drain (oldest age) | {} ({:.0} ms) |",
        stats.unreceipted_at_end,
        stats.max_receipt_gap.as_secs_f64() * 1e3
    );
    println!(
        "| process CPU s / wall s (relay + load generator, same process) | {cpu_total:.2} / {wall:.2} = {:.2} cores |",
        cpu_total / wall
    );
    println!(
        "| of which load-generator threads / relay (rest) | {cpu_load:.2} / {:.2} s = {:.2} relay cores |",
        (cpu_total - cpu_load).max(0.0),
        (cpu_total - cpu_load).max(0.0) / wall
    );
    println!(
        "| RSS start / end / peak (process) | {:.1} / {:.1} / {:.1} MiB |",
        p0.rss_kb as f64 / 1024.0,
        p1.rss_kb as f64 / 1024.0,
        p1.hwm_kb as f64 / 1024.0
    );
    println!("| threads at end | {} |", p1.threads);
    match counters {
        Ok(c) => {
            let changes = c
                .get("relay_changes_accepted_total")
                .copied()
                .unwrap_or(0.0);
            let per = |k: &str| c.get(k).copied().unwrap_or(0.0) / changes.max(1.0);
            println!(
                "| relay CPU per accepted change (relay CPU s / relay_changes_accepted_total) | {:.0} µs ({changes:.0} changes) |",
                (cpu_total - cpu_load).max(0.0) / changes.max(1.0) * 1e6
            );
            println!(
                "| changes per group commit | {:.2} ({:.0} commits) |",
                1.0 / per("relay_commits_total").max(f64::MIN_POSITIVE),
                c.get("relay_commits_total").copied().unwrap_or(0.0)
            );
            println!(
                "| mean group commit (one write transaction, fsync included) | {:.2} ms |",
                c.get("relay_commit_seconds_sum").copied().unwrap_or(0.0)
                    / c.get("relay_commit_seconds_count")
                        .copied()
                        .unwrap_or(0.0)
                        .max(1.0)
                    * 1e3
            );
            println!(
                "| frames in / out per accepted change | {:.2} / {:.2} |",
                per("relay_frames_in_total"),
                per("relay_frames_out_total")
            );
            if c.contains_key("relay_orders_reread_total") {
                let n = |k: &str| c.get(k).copied().unwrap_or(0.0);
                println!(
                    "| several relays: commit conflicts / orders read again (of which whole) / feed reads | {:.0} / {:.0} ({:.0}) / {:.0} |",
                    n("relay_commit_conflicts_total"),
                    n("relay_orders_reread_total"),
                    n("relay_orders_reread_whole_total"),
                    n("relay_feed_reads_total")
                );
            }
            println!(
                "| relay_receipts_pending after the drain (a gauge: 0 once every write is answered) | {:.0} |",
                c.get("relay_receipts_pending").copied().unwrap_or(f64::NAN)
            );
        }
        Err(e) => println!("| relay counters | unavailable: {e} |"),
    }
    println!(
        "| run wall (connect, create, fetch, measure, drain) | {:.2} s |",
        measured_wall.as_secs_f64()
    );
    println!();
    println!(
        "The relay runs in this process: CPU and RSS are this process's (/proc/self), the relay's \
         share is the process total minus the load generator's own runtime threads (load-rt); \
         CPU ticks assume USER_HZ = 100."
    );
    if !stats.first_failures.is_empty() {
        println!("First problems seen:");
        for f in &stats.first_failures {
            println!("  - {f}");
        }
    }
    Ok(())
}
