//! `relay-scale`: the relay's scale figures, with the relay as a separate child process
//! (`relay-server serve`) so that its memory is measured alone (VmRSS / VmHWM from
//! `/proc/<pid>/status`).
//!
//! * `connections`: provisions `--devices` devices (default 10,000, ten per store) in a fresh
//!   data directory, starts the relay, opens one WebSocket per device (hello/welcome), then lets
//!   every device create one order and wait for its durable receipt. Reports relay RSS idle,
//!   after connect and after all orders are receipted, per-connection and per-order KiB, the
//!   time to connect and every failure.
//! * `orders`: fills a data directory with `--orders` orders (default 1,000,000) written
//!   straight through `RelayStore::commit` in big batches (the documents carry the number the
//!   store assigns, as if the relay had numbered them), reports fill time and file size, then
//!   starts the relay with `--cache-orders` and fetches `--touch` distinct random orders over
//!   WebSocket sync (as a terminal fetching an order it lacks; this goes through the relay's
//!   in-memory order cache, unlike `GET /v1/orders/{id}` which reads redb directly), sampling
//!   relay RSS every `--sample-every` orders.
//!
//! ```sh
//! cargo build --release -p e2e -p relay-server      # relay-scale runs target/release/relay-server
//! target/release/relay-scale connections            # 10,000 devices
//! target/release/relay-scale orders                 # 1,000,000 orders, touch 100,000
//! target/release/relay-scale --quick                # both, small (CI)
//! # refill once, then touch again (and measure redb alone first) without refilling:
//! target/release/relay-scale orders --data /tmp/relay-scale-1m
//! target/release/relay-scale orders --data /tmp/relay-scale-1m --skip-fill --probe-redb 100000
//! ```
//!
//! The relay binary uses mimalloc; with glibc malloc its RSS kept growing in `orders` (see
//! docs/performance.md). The child inherits the environment (e.g. `RUST_LOG`).
//!
//! The load generator holds one socket per device: it needs `ulimit -n` above `--devices`
//! (it checks and says so). The relay child gets the same limit.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use automerge::sync::{self, SyncDoc};
use automerge::{Automerge, ChangeHash, ReadDoc};
use clap::{Parser, Subcommand};
use crdt_model::wire::{ClientFrame, RelayFrame, Version, heads_from_wire};
use crdt_model::{
    Currency, DeviceId, Entropy, LineDraft, NewOrder, Order, OrderId, OrderNumber, OrderStatus,
    SplitMix64, StoreId, Timestamp, Writer,
};
use futures_util::{SinkExt, StreamExt};
use relay_server::store::{OrderWrite, RelayStore};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser, Debug)]
#[command(about = "Relay scale figures: connections, orders on disk (relay as a child process)")]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// CI mode: small sizes; without a subcommand, runs both measurements.
    #[arg(long, global = true)]
    quick: bool,
    /// The relay binary (default: `relay-server` next to this executable).
    #[arg(long, global = true)]
    relay_bin: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// N concurrent device connections, each creating one order.
    Connections(ConnArgs),
    /// Many orders on disk, many distinct orders touched through a bounded cache.
    Orders(OrderArgs),
}

#[derive(clap::Args, Debug, Clone)]
struct ConnArgs {
    /// Device connections.
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Devices per store.
    #[arg(long, default_value_t = 10)]
    per_store: usize,
    /// WebSocket handshakes in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds to wait after each phase before sampling RSS.
    #[arg(long, default_value_t = 3)]
    settle: u64,
}

#[derive(clap::Args, Debug, Clone)]
struct OrderArgs {
    /// Orders to write.
    #[arg(long, default_value_t = 1_000_000)]
    orders: usize,
    /// Stores the orders are spread over (one touching device per store).
    #[arg(long, default_value_t = 10)]
    stores: usize,
    /// Orders per redb write transaction while filling.
    #[arg(long, default_value_t = 5_000)]
    batch: usize,
    /// Threads building order documents while filling.
    #[arg(long, default_value_t = 2)]
    builders: usize,
    /// The relay's `--cache-orders`.
    #[arg(long, default_value_t = 10_000)]
    cache: usize,
    /// Distinct random orders fetched through the relay.
    #[arg(long, default_value_t = 100_000)]
    touch: usize,
    /// Sample relay RSS every this many fetched orders.
    #[arg(long, default_value_t = 10_000)]
    sample_every: usize,
    /// Fetches in flight per device connection.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Data directory (kept); default: a temporary one.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Reuse the orders already in `--data` (same `--orders`/`--stores`) instead of filling.
    #[arg(long)]
    skip_fill: bool,
    /// With `--skip-fill`: first load this many random orders with `RelayStore` directly in
    /// this process (no hub, no document cache) and report this process's RSS: what redb alone
    /// costs.
    #[arg(long, default_value_t = 0)]
    probe_redb: usize,
}

// ---------------------------------------------------------------------------------------------
// The relay child process.

struct RelayChild {
    child: Child,
    addr: SocketAddr,
}

impl RelayChild {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RelayChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn relay_bin(cli: &Option<PathBuf>) -> Result<PathBuf> {
    let bin = match cli {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("relay-server"),
    };
    if !bin.is_file() {
        bail!(
            "relay binary {} not found: build it with `cargo build --release -p relay-server` \
             (same target dir) or pass --relay-bin",
            bin.display()
        );
    }
    Ok(bin)
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Starts `relay-server serve` on `data` and waits until `/healthz` answers.
async fn spawn_relay(bin: &Path, data: &Path, extra: &[String]) -> Result<RelayChild> {
    let addr = free_port()?;
    let log = std::fs::File::create(data.join("relay-scale-relay.log"))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data")
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let mut relay = RelayChild { child, addr };
    let started = Instant::now();
    loop {
        if let Ok((200, _)) = e2e::harness::http(addr, "GET", "/healthz", "", None).await {
            return Ok(relay);
        }
        if let Some(status) = relay.child.try_wait()? {
            bail!(
                "relay exited with {status} (log: {})",
                data.join("relay-scale-relay.log").display()
            );
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("relay did not answer /healthz within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Mem {
    rss_kb: u64,
    hwm_kb: u64,
    anon_kb: u64,
    file_kb: u64,
    threads: u64,
}

fn mem_of(pid: u32) -> Mem {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0u64)
    };
    Mem {
        rss_kb: kb("VmRSS:"),
        hwm_kb: kb("VmHWM:"),
        anon_kb: kb("RssAnon:"),
        file_kb: kb("RssFile:") + kb("RssShmem:"),
        threads: kb("Threads:"),
    }
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// The relay's unlabelled metrics.
async fn counters(addr: SocketAddr, admin: &str) -> HashMap<String, f64> {
    match e2e::harness::http(addr, "GET", "/metrics", admin, None).await {
        Ok((200, body)) => body
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains('{'))
            .filter_map(|l| {
                let (k, v) = l.split_once(' ')?;
                Some((k.to_owned(), v.trim().parse().ok()?))
            })
            .collect(),
        _ => HashMap::new(),
    }
}

fn counter(c: &HashMap<String, f64>, k: &str) -> String {
    c.get(k).map_or_else(|| "?".into(), |v| format!("{v:.0}"))
}

/// The soft limit on open files, raised to the hard limit when that is higher.
fn nofile_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// WebSocket client.

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(addr: SocketAddr, token: &str) -> Result<Ws> {
    let mut req = format!("ws://{addr}/v1/sync").into_client_request()?;
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse()?);
    // Small buffers: the generator holds thousands of these.
    let config = WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(req, Some(config), true).await?;
    Ok(ws)
}

async fn send(ws: &mut Ws, f: &ClientFrame) -> Result<()> {
    Ok(ws.send(Message::Binary(f.encode().into())).await?)
}

/// The next relay frame (control frames are answered by tungstenite); `None` on timeout.
async fn recv(ws: &mut Ws, until: Instant) -> Result<Option<RelayFrame>> {
    loop {
        let next = match tokio::time::timeout_at(until.into(), ws.next()).await {
            Ok(n) => n,
            Err(_) => return Ok(None),
        };
        match next {
            Some(Ok(Message::Binary(b))) => return Ok(Some(RelayFrame::decode(&b)?)),
            Some(Ok(Message::Close(_))) | None => bail!("connection closed"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

async fn hello(ws: &mut Ws, device: DeviceId, feed_since: u64) -> Result<()> {
    send(
        ws,
        &ClientFrame::Hello {
            protocol: Version::CURRENT,
            device: device.to_string(),
            agent: "relay-scale".into(),
            feed_since,
            highest_number: None,
        },
    )
    .await?;
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        match recv(ws, until).await? {
            Some(RelayFrame::Welcome { .. }) => return Ok(()),
            Some(RelayFrame::Error { code, message, .. }) => bail!("error {code}: {message}"),
            Some(_) => {}
            None => bail!("no welcome within 30 s"),
        }
    }
}

fn now_ms() -> i64 {
    relay_server::hub::now_ms()
}

/// `h` at quantile `q`, as "1.2 ms".
fn pct(h: &e2e::latency::Latency, q: f64) -> String {
    h.ms(q).map_or_else(|| "-".into(), |v| format!("{v:.1} ms"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

// ---------------------------------------------------------------------------------------------
// connections

enum Event {
    Connected(Duration),
    Receipted(Duration),
    Failed(&'static str, String),
}

struct Phase {
    go: watch::Receiver<bool>,
    stop: watch::Receiver<bool>,
}

async fn conn_device(
    addr: SocketAddr,
    store: StoreId,
    device: DeviceId,
    token: String,
    gate: Arc<Semaphore>,
    mut phase: Phase,
    events: mpsc::UnboundedSender<Event>,
) {
    // Connect and hello, a bounded number at once.
    let t0 = Instant::now();
    let permit = gate.acquire().await;
    let connected = async {
        let mut ws = ws_connect(addr, &token).await.context("connect")?;
        hello(&mut ws, device, 0).await.context("hello")?;
        anyhow::Ok(ws)
    }
    .await;
    drop(permit);
    let mut ws = match connected {
        Ok(ws) => ws,
        Err(e) => {
            let _ = events.send(Event::Failed("connect", format!("{e:#}")));
            return;
        }
    };
    let _ = events.send(Event::Connected(t0.elapsed()));
    // Idle until every device is connected (answering whatever comes, e.g. feed entries).
    loop {
        tokio::select! {
            r = phase.go.changed() => { if r.is_err() || *phase.go.borrow() { break; } }
            n = ws.next() => {
                if !matches!(n, Some(Ok(_))) {
                    let _ = events.send(Event::Failed("idle", "connection closed while idle".into()));
                    return;
                }
            }
        }
    }
    match create_order(&mut ws, store, device).await {
        Ok(d) => {
            let _ = events.send(Event::Receipted(d));
        }
        Err(e) => {
            let _ = events.send(Event::Failed("order", format!("{e:#}")));
            return;
        }
    }
    // Hold the connection until told to stop.
    loop {
        tokio::select! {
            r = phase.stop.changed() => { if r.is_err() || *phase.stop.borrow() { break; } }
            n = ws.next() => {
                if !matches!(n, Some(Ok(_))) {
                    let _ = events.send(Event::Failed("hold", "connection closed while held".into()));
                    return;
                }
            }
        }
    }
    let _ = send(&mut ws, &ClientFrame::Bye).await;
    let _ = ws.close(None).await;
}

/// Creates one order with one line, syncs it and waits for the durable receipt.
async fn create_order(ws: &mut Ws, store: StoreId, device: DeviceId) -> Result<Duration> {
    let seed = u64::from_le_bytes(device.as_bytes()[..8].try_into().unwrap_or([3; 8]));
    let mut rng = SplitMix64::new(seed);
    let at = Timestamp(now_ms());
    let new = NewOrder {
        id: OrderId::generate(at, &mut rng),
        store,
        currency: Currency::new("EUR")?,
    };
    let mut order = Order::create(new, Writer::new(device, 1), at, &mut rng)?;
    let draft = LineDraft {
        sku: "espresso".into(),
        name: "Espresso".into(),
        unit_price: 180,
        quantity: 1,
        ..Default::default()
    };
    order.add_line(Timestamp(at.0 + 1), &mut rng, draft)?;
    let mine = order.heads();
    let id = order.id().to_string();
    let mut state = sync::State::new();
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(120);
    let push = |order: &Order, state: &mut sync::State| {
        order
            .doc()
            .generate_sync_message(state)
            .map(|m| ClientFrame::Sync {
                order: id.clone(),
                data: m.encode().into(),
            })
    };
    if let Some(f) = push(&order, &mut state) {
        send(ws, &f).await?;
    }
    loop {
        let Some(frame) = recv(ws, until).await? else {
            bail!("no receipt within 120 s");
        };
        match frame {
            RelayFrame::Sync { order: o, data } if o == order.id().to_string() => {
                let msg = sync::Message::decode(&data)?;
                order.doc_mut().receive_sync_message(&mut state, msg)?;
                order.refresh()?;
                if let Some(f) = push(&order, &mut state) {
                    send(ws, &f).await?;
                }
            }
            RelayFrame::Receipt {
                order: o, heads, ..
            } if o == order.id().to_string() => {
                let heads = heads_from_wire(&heads)?;
                if covers(order.doc(), &heads, &mine) {
                    return Ok(t0.elapsed());
                }
            }
            RelayFrame::Rejected { code, message, .. } => bail!("rejected {code}: {message}"),
            RelayFrame::Error { code, message, .. } => bail!("error {code}: {message}"),
            RelayFrame::Ping { nonce } => send(ws, &ClientFrame::Pong { nonce }).await?,
            _ => {}
        }
    }
}

/// Whether receipted `heads` cover every one of `mine` (equal to, or an ancestor of, a head).
fn covers(doc: &Automerge, heads: &[ChangeHash], mine: &[ChangeHash]) -> bool {
    if mine.iter().all(|h| heads.contains(h)) {
        return true;
    }
    if !heads.iter().all(|h| doc.get_change_by_hash(h).is_some()) {
        return false;
    }
    let beyond: std::collections::HashSet<ChangeHash> =
        doc.get_changes(heads).iter().map(|c| c.hash()).collect();
    mine.iter().all(|h| !beyond.contains(h))
}

fn run_connections(bin: &Path, a: &ConnArgs) -> Result<()> {
    let n = a.devices.max(1);
    let per_store = a.per_store.max(1);
    let limit = nofile_limit();
    if limit < n as u64 + 100 {
        bail!(
            "open-file limit {limit} is too low for {n} connections: raise it (ulimit -n {})",
            n + 1000
        );
    }
    let dir = tempfile::tempdir()?;
    println!(
        "relay-scale connections: {n} devices, {per_store} per store ({} stores), data in {}",
        n.div_ceil(per_store),
        dir.path().display()
    );
    // Provision before the relay starts (one redb transaction per device, as the CLI does).
    let t = Instant::now();
    let (admin, devices) = {
        let store = RelayStore::open(dir.path())?;
        let admin = store.add_admin_token(None, "relay-scale", 0)?;
        let mut devices = Vec::with_capacity(n);
        for i in 0..n {
            let sid = StoreId::new(format!("s{:05}", i / per_store))?;
            let (rec, token) = store.add_device(&sid, &format!("till-{i}"), 0)?;
            devices.push((sid, rec.device, token));
        }
        (admin, devices)
    };
    let provision = t.elapsed();
    println!(
        "provisioned {n} devices in {:.1} s",
        provision.as_secs_f64()
    );

    let rt = runtime()?;
    rt.block_on(async move {
        let max_conn = (n + 1000).max(20_000);
        let relay = spawn_relay(
            bin,
            dir.path(),
            &["--max-connections".into(), max_conn.to_string()],
        )
        .await?;
        let addr = relay.addr;
        let pid = relay.pid();
        tokio::time::sleep(Duration::from_secs(a.settle)).await;
        let idle = mem_of(pid);
        let gen_idle = mem_of(std::process::id());

        let (go_tx, go_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ev_tx, mut ev_rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Semaphore::new(a.connect_concurrency.max(1)));
        let t_connect = Instant::now();
        for (sid, dev, token) in devices {
            tokio::spawn(conn_device(
                addr,
                sid,
                dev,
                token,
                Arc::clone(&gate),
                Phase {
                    go: go_rx.clone(),
                    stop: stop_rx.clone(),
                },
                ev_tx.clone(),
            ));
        }
        drop(ev_tx);
        let mut failures: HashMap<&'static str, (u64, String)> = HashMap::new();
        let mut note = |stage: &'static str, why: String| {
            let e = failures.entry(stage).or_insert((0, why));
            e.0 += 1;
        };
        let mut connect_lat = e2e::latency::Latency::new();
        let mut seen = 0;
        while seen < n {
            match ev_rx.recv().await {
                Some(Event::Connected(d)) => connect_lat.record(d),
                Some(Event::Failed(s, w)) => note(s, w),
                Some(Event::Receipted(_)) | None => {}
            }
            seen += 1;
        }
        let connect_wall = t_connect.elapsed();
        let connected = connect_lat.len() as usize;
        tokio::time::sleep(Duration::from_secs(a.settle)).await;
        let after_connect = mem_of(pid);
        let gen_connect = mem_of(std::process::id());
        let c1 = counters(addr, &admin).await;

        let _ = go_tx.send(true);
        let t_orders = Instant::now();
        let mut receipt_lat = e2e::latency::Latency::new();
        let mut seen = 0;
        while seen < connected {
            match ev_rx.recv().await {
                Some(Event::Receipted(d)) => receipt_lat.record(d),
                Some(Event::Failed(s, w)) => note(s, w),
                Some(Event::Connected(_)) => continue,
                None => break,
            }
            seen += 1;
        }
        let orders_wall = t_orders.elapsed();
        tokio::time::sleep(Duration::from_secs(a.settle)).await;
        let after_orders = mem_of(pid);
        let c2 = counters(addr, &admin).await;
        let _ = stop_tx.send(true);
        tokio::time::sleep(Duration::from_millis(500)).await;
        while let Ok(ev) = ev_rx.try_recv() {
            if let Event::Failed(s, w) = ev {
                note(s, w);
            }
        }
        drop(relay);

        let receipted = receipt_lat.len() as usize;
        let per = |a: u64, b: u64, k: usize| {
            if k == 0 {
                "-".to_string()
            } else {
                format!("{:.1} KiB", b.saturating_sub(a) as f64 / k as f64)
            }
        };
        println!();
        println!("| figure | value |");
        println!("|---|---|");
        println!("| devices / connected / orders receipted | {n} / {connected} / {receipted} |");
        println!(
            "| relay RSS idle (VmRSS; anon + file) | {} ({} + {}) |",
            mib(idle.rss_kb),
            mib(idle.anon_kb),
            mib(idle.file_kb)
        );
        println!(
            "| relay RSS after {connected} connections | {} ({} + {}), {} threads |",
            mib(after_connect.rss_kb),
            mib(after_connect.anon_kb),
            mib(after_connect.file_kb),
            after_connect.threads
        );
        println!(
            "| relay RSS after {receipted} orders receipted (connections held) | {} ({} + {}) |",
            mib(after_orders.rss_kb),
            mib(after_orders.anon_kb),
            mib(after_orders.file_kb)
        );
        println!("| relay VmHWM (peak) | {} |", mib(after_orders.hwm_kb));
        println!(
            "| load generator RSS before / after connect, per connection (client WebSocket read buffer 8 KiB) | {} / {}, {} |",
            mib(gen_idle.rss_kb),
            mib(gen_connect.rss_kb),
            per(gen_idle.rss_kb, gen_connect.rss_kb, connected)
        );
        println!(
            "| per connection / per open order | {} / {} |",
            per(idle.rss_kb, after_connect.rss_kb, connected),
            per(after_connect.rss_kb, after_orders.rss_kb, receipted)
        );
        println!(
            "| connect wall ({} handshakes in flight at most) | {:.2} s = {:.0} connections/s |",
            a.connect_concurrency,
            connect_wall.as_secs_f64(),
            connected as f64 / connect_wall.as_secs_f64().max(1e-9)
        );
        println!(
            "| connect + hello latency p50 / p99 / max (incl. wait for a slot) | {} / {} / {} |",
            pct(&connect_lat, 0.5),
            pct(&connect_lat, 0.99),
            pct(&connect_lat, 1.0)
        );
        println!(
            "| create order -> durable receipt, all at once: wall, p50 / p99 / max | {:.2} s, {} / {} / {} |",
            orders_wall.as_secs_f64(),
            pct(&receipt_lat, 0.5),
            pct(&receipt_lat, 0.99),
            pct(&receipt_lat, 1.0)
        );
        println!(
            "| relay_connections / relay_orders_in_memory after orders | {} / {} |",
            counter(&c2, "relay_connections"),
            counter(&c2, "relay_orders_in_memory")
        );
        println!(
            "| relay_connections after connect | {} |",
            counter(&c1, "relay_connections")
        );
        println!(
            "| changes accepted / commits / protocol errors / auth failures | {} / {} / {} / {} |",
            counter(&c2, "relay_changes_accepted_total"),
            counter(&c2, "relay_commits_total"),
            counter(&c2, "relay_protocol_errors_total"),
            counter(&c2, "relay_auth_failures_total")
        );
        println!(
            "| provisioning ({n} devices, one transaction each, before the relay starts) | {:.1} s |",
            provision.as_secs_f64()
        );
        let failed: u64 = failures.values().map(|f| f.0).sum();
        println!("| failures | {failed} |");
        for (stage, (count, first)) in &failures {
            println!("  - {stage}: {count}, first: {first}");
        }
        anyhow::Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// orders

fn store_name(s: usize) -> Result<StoreId> {
    Ok(StoreId::new(format!("o{s:03}"))?)
}

/// Builds order `i` (one line, numbered as the store will number it) as a compacted write.
fn build_order(
    i: usize,
    stores: usize,
    relay: &Writer,
    devices: &[DeviceId],
    at: Timestamp,
) -> Result<OrderWrite> {
    let s = i % stores;
    let store = store_name(s)?;
    let mut rng = SplitMix64::new(0x5CA1_E000 ^ i as u64);
    let new = NewOrder {
        id: OrderId::generate(Timestamp(at.0 + i as i64), &mut rng),
        store: store.clone(),
        currency: Currency::new("EUR")?,
    };
    let device = devices[s % devices.len()];
    let mut order = Order::create(new, Writer::new(device, 1), at, &mut rng)?;
    let draft = LineDraft {
        sku: "espresso".into(),
        name: "Espresso".into(),
        unit_price: 180,
        quantity: 1 + (rng.next_u64() % 3) as i64,
        ..Default::default()
    };
    order.add_line(Timestamp(at.0 + 1), &mut rng, draft)?;
    let id = order.id();
    let mut numbered = Order::from_doc(order.into_doc(), relay.clone())?;
    numbered.assign_number(Timestamp(at.0 + 2), OrderNumber((i / stores + 1) as u64))?;
    Ok(OrderWrite {
        order: id,
        store,
        changes: Vec::new(),
        compacted: Some(numbered.save()),
        status: OrderStatus::InProgress,
        // A new order: it builds on nothing stored.
        base: Vec::new(),
        number: None,
        heads: numbered.heads().iter().map(|h| h.0).collect(),
        at: at.0,
    })
}

struct Filled {
    /// Order ids by store.
    ids: Vec<Vec<OrderId>>,
    wall: Duration,
    /// Of which in `RelayStore::commit` (the builders run meanwhile).
    commit: Duration,
    mismatched_numbers: u64,
}

fn fill(dir: &Path, a: &OrderArgs) -> Result<Filled> {
    let store = RelayStore::open(dir)?;
    let relay = store.identity()?.writer();
    let stores = a.stores.max(1);
    let mut rng = SplitMix64::new(42);
    let devices: Vec<DeviceId> = (0..stores)
        .map(|_| DeviceId::generate(Timestamp(now_ms()), &mut rng))
        .collect();
    let at = Timestamp(now_ms());
    let batch = a.batch.max(1);
    let batches = a.orders.div_ceil(batch);
    let builders = a.builders.max(1);
    let t0 = Instant::now();
    let mut ids: Vec<Vec<OrderId>> = vec![Vec::new(); stores];
    let mut mismatched = 0u64;
    let next = Arc::new(AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(usize, Vec<OrderWrite>)>>(builders * 2);
    let commit = std::thread::scope(|scope| -> Result<Duration> {
        for _ in 0..builders {
            let tx = tx.clone();
            let next = Arc::clone(&next);
            let (relay, devices) = (relay.clone(), devices.clone());
            scope.spawn(move || {
                loop {
                    let b = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if b >= batches {
                        return;
                    }
                    let range = b * batch..((b + 1) * batch).min(a.orders);
                    let built: Result<Vec<OrderWrite>> = range
                        .map(|i| build_order(i, stores, &relay, &devices, at))
                        .collect();
                    if tx.send(built.map(|w| (b, w))).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        // Commit in batch order, so the numbers the store assigns are the ones in the documents.
        let mut waiting: HashMap<usize, Vec<OrderWrite>> = HashMap::new();
        let mut want = 0;
        let mut written = 0usize;
        let mut commit_time = Duration::ZERO;
        let mut last_report = Instant::now();
        while want < batches {
            let (b, writes) = match rx.recv() {
                Ok(r) => r?,
                Err(_) => bail!("builders stopped early"),
            };
            waiting.insert(b, writes);
            while let Some(writes) = waiting.remove(&want) {
                let tc = Instant::now();
                let out = store.commit(&writes)?;
                commit_time += tc.elapsed();
                for (w, o) in writes.iter().zip(&out) {
                    let s = written % stores;
                    if o.number.0 != (written / stores + 1) as u64 || !o.newly_numbered {
                        mismatched += 1;
                    }
                    ids[s].push(w.order);
                    written += 1;
                }
                want += 1;
                if last_report.elapsed() > Duration::from_secs(10) {
                    last_report = Instant::now();
                    let done = written;
                    eprintln!(
                        "  filled {done} orders in {:.0} s ({:.0}/s, {:.0} s in redb commits)",
                        t0.elapsed().as_secs_f64(),
                        done as f64 / t0.elapsed().as_secs_f64(),
                        commit_time.as_secs_f64()
                    );
                }
            }
        }
        Ok(commit_time)
    })?;
    Ok(Filled {
        ids,
        wall: t0.elapsed(),
        commit,
        mismatched_numbers: mismatched,
    })
}

/// The ids of an already filled directory, by store (from each store's feed).
fn read_ids(dir: &Path, stores: usize) -> Result<Vec<Vec<OrderId>>> {
    let store = RelayStore::open(dir)?;
    let mut ids = Vec::with_capacity(stores);
    for s in 0..stores {
        let recs = store.feed_since(&store_name(s)?, 0, usize::MAX)?;
        ids.push(recs.into_iter().map(|r| r.meta.order).collect());
    }
    Ok(ids)
}

/// Fetches `orders` (each unknown to this device) over one connection, `window` at a time.
async fn fetch_orders(
    ws: &mut Ws,
    orders: &[OrderId],
    window: usize,
    done: &AtomicU64,
) -> Result<(u64, u64)> {
    let mut pending: HashMap<String, (Automerge, sync::State)> = HashMap::new();
    let mut queue: VecDeque<OrderId> = orders.iter().copied().collect();
    let mut unavailable = 0u64;
    let mut errors = 0u64;
    loop {
        while pending.len() < window {
            let Some(id) = queue.pop_front() else { break };
            let doc = Automerge::new();
            let mut st = sync::State::new();
            if let Some(m) = doc.generate_sync_message(&mut st) {
                let key = id.to_string();
                send(
                    ws,
                    &ClientFrame::Sync {
                        order: key.clone(),
                        data: m.encode().into(),
                    },
                )
                .await?;
                pending.insert(key, (doc, st));
            }
        }
        if pending.is_empty() {
            return Ok((unavailable, errors));
        }
        let Some(frame) = recv(ws, Instant::now() + Duration::from_secs(60)).await? else {
            bail!("no answer for 60 s with {} fetches pending", pending.len());
        };
        match frame {
            RelayFrame::Sync { order, data } => {
                if let Some((doc, st)) = pending.get_mut(&order) {
                    let msg = sync::Message::decode(&data)?;
                    doc.receive_sync_message(st, msg)?;
                    if !doc.get_heads().is_empty() {
                        pending.remove(&order);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            RelayFrame::Unavailable { order } if pending.remove(&order).is_some() => {
                unavailable += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            RelayFrame::Error { code, message, .. } => {
                errors += 1;
                if errors == 1 {
                    eprintln!("  relay error {code}: {message}");
                }
                if code == "rate_limited" {
                    // The frame was dropped: resend later by failing the round loudly.
                    bail!("rate limited by the relay: lower --window or add stores");
                }
            }
            RelayFrame::Ping { nonce } => send(ws, &ClientFrame::Pong { nonce }).await?,
            _ => {}
        }
    }
}

/// Opens the store in this process (before it has allocated anything else) and loads `n`
/// random orders, found by number, the way the relay does on a cache miss (`load_order`, then
/// the document is built and dropped), sampling this process's RSS: what redb alone costs.
fn probe_redb(dir: &Path, stores: usize, per_store: usize, n: usize, every: usize) -> Result<()> {
    let me = std::process::id();
    let before = mem_of(me);
    let t = Instant::now();
    let store = RelayStore::open(dir)?;
    let opened = mem_of(me);
    let names: Vec<StoreId> = (0..stores).map(store_name).collect::<Result<_>>()?;
    println!();
    println!(
        "redb probe (this process, RelayStore only): RSS before open {}, after open {} ({:.2} s)",
        mib(before.rss_kb),
        mib(opened.rss_kb),
        t.elapsed().as_secs_f64()
    );
    println!();
    println!(
        "| orders loaded (load_order + to_doc, dropped) | RSS of this process | growth since open |"
    );
    println!("|---|---|---|");
    let mut rng = SplitMix64::new(11);
    for loaded in 1..=n {
        let s = loaded % stores;
        let number = 1 + rng.next_u64() % per_store.max(1) as u64;
        let id = store
            .order_by_number(&names[s], OrderNumber(number))?
            .context("order number missing")?;
        let stored = store.load_order(id)?.context("order missing")?;
        drop(stored.to_doc()?);
        if loaded % every == 0 || loaded == n {
            let m = mem_of(me);
            println!(
                "| {loaded} | {} | {} |",
                mib(m.rss_kb),
                mib(m.rss_kb.saturating_sub(opened.rss_kb))
            );
        }
    }
    println!();
    Ok(())
}

fn run_orders(bin: &Path, a: &OrderArgs) -> Result<()> {
    let tmp;
    let dir: PathBuf = match &a.data {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let stores = a.stores.max(1);
    println!(
        "relay-scale orders: {} orders over {stores} stores, cache {} orders, touch {} distinct orders, data in {}",
        a.orders,
        a.cache,
        a.touch,
        dir.display()
    );
    if a.probe_redb > 0 && a.skip_fill {
        probe_redb(
            &dir,
            stores,
            a.orders / stores,
            a.probe_redb,
            a.sample_every.max(1),
        )?;
    }
    let (ids, fill_line) = if a.skip_fill {
        let ids = read_ids(&dir, stores)?;
        (ids, "reused an existing fill".to_string())
    } else {
        let f = fill(&dir, a)?;
        let line = format!(
            "{} orders in {:.1} s = {:.0} orders/s ({:.1} s in RelayStore::commit; {} per transaction, {} builder threads); numbers differing from the documents': {}",
            a.orders,
            f.wall.as_secs_f64(),
            a.orders as f64 / f.wall.as_secs_f64().max(1e-9),
            f.commit.as_secs_f64(),
            a.batch,
            a.builders,
            f.mismatched_numbers
        );
        (f.ids, line)
    };
    println!("fill: {fill_line}");
    let total: usize = ids.iter().map(Vec::len).sum();
    let file_bytes = std::fs::metadata(dir.join("relay.redb"))?.len();
    // Consistency and the touching devices (one per store), while the relay is stopped.
    let (admin, devices, count, feed_ok) = {
        let store = RelayStore::open(&dir)?;
        let count = store.order_count()?;
        let mut feed_ok = true;
        for (s, v) in ids.iter().enumerate() {
            feed_ok &= store.feed_head(&store_name(s)?)? == v.len() as u64;
        }
        let admin = store.add_admin_token(None, "relay-scale", 0)?;
        let mut devices = Vec::with_capacity(stores);
        for s in 0..stores {
            let (rec, token) = store.add_device(&store_name(s)?, "relay-scale", 0)?;
            devices.push((rec.device, token));
        }
        (admin, devices, count, feed_ok)
    };
    println!(
        "store: {count} orders (ids known: {total}), feed heads match: {feed_ok}, relay.redb {:.1} MiB ({:.0} B/order)",
        file_bytes as f64 / 1048576.0,
        file_bytes as f64 / count.max(1) as f64
    );

    // Which orders to touch: distinct, random, spread over the stores.
    let mut rng = SplitMix64::new(7);
    let touch = a.touch.min(total);
    let mut picks: Vec<Vec<OrderId>> = vec![Vec::new(); stores];
    {
        let mut all: Vec<(usize, usize)> = ids
            .iter()
            .enumerate()
            .flat_map(|(s, v)| (0..v.len()).map(move |k| (s, k)))
            .collect();
        for i in 0..touch {
            let j = i + (rng.next_u64() % (all.len() - i) as u64) as usize;
            all.swap(i, j);
            let (s, k) = all[i];
            picks[s].push(ids[s][k]);
        }
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let t_open = Instant::now();
        let relay = spawn_relay(bin, &dir, &["--cache-orders".into(), a.cache.to_string()]).await?;
        let open_wall = t_open.elapsed();
        let (addr, pid) = (relay.addr, relay.pid());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle = mem_of(pid);
        let mut conns = Vec::with_capacity(stores);
        for (s, (dev, token)) in devices.iter().enumerate() {
            let mut ws = ws_connect(addr, token).await?;
            hello(&mut ws, *dev, ids[s].len() as u64).await?;
            conns.push(ws);
        }
        let connected = mem_of(pid);
        println!();
        println!(
            "relay started in {:.2} s (opens redb with an integrity check); RSS idle {}, with {stores} connections {}",
            open_wall.as_secs_f64(),
            mib(idle.rss_kb),
            mib(connected.rss_kb)
        );
        println!();
        println!("| orders fetched | relay RSS (anon + file) | VmHWM | relay_orders_in_memory | fetched/s (this step) |");
        println!("|---|---|---|---|---|");
        let step = a.sample_every.max(1);
        let done = Arc::new(AtomicU64::new(0));
        let mut offsets = vec![0usize; stores];
        let mut fetched = 0usize;
        let (mut unavailable, mut errors) = (0u64, 0u64);
        let t_all = Instant::now();
        while fetched < touch {
            let t = Instant::now();
            let target = (fetched + step).min(touch);
            // This round: `target - fetched` orders, taken from the stores in proportion.
            let mut jobs = Vec::new();
            let mut left = target - fetched;
            let mut s = fetched % stores;
            let mut slices: Vec<Vec<OrderId>> = vec![Vec::new(); stores];
            let mut exhausted = 0;
            while left > 0 && exhausted < stores {
                if offsets[s] < picks[s].len() {
                    slices[s].push(picks[s][offsets[s]]);
                    offsets[s] += 1;
                    left -= 1;
                    exhausted = 0;
                } else {
                    exhausted += 1;
                }
                s = (s + 1) % stores;
            }
            let round: usize = slices.iter().map(Vec::len).sum();
            if round == 0 {
                break;
            }
            for (ws, slice) in conns.iter_mut().zip(slices) {
                let done = Arc::clone(&done);
                let window = a.window.max(1);
                jobs.push(async move { fetch_orders(ws, &slice, window, &done).await });
            }
            for r in futures_util::future::join_all(jobs).await {
                let (u, e) = r?;
                unavailable += u;
                errors += e;
            }
            fetched += round;
            let m = mem_of(pid);
            let c = counters(addr, &admin).await;
            println!(
                "| {fetched} | {} ({} + {}) | {} | {} | {:.0} |",
                mib(m.rss_kb),
                mib(m.anon_kb),
                mib(m.file_kb),
                mib(m.hwm_kb),
                counter(&c, "relay_orders_in_memory"),
                round as f64 / t.elapsed().as_secs_f64().max(1e-9)
            );
        }
        let c = counters(addr, &admin).await;
        println!();
        println!(
            "fetched {fetched} distinct orders in {:.1} s; unavailable {unavailable}, error frames {errors}; relay commits during the fetches {} (numbers already in the documents: expect 0)",
            t_all.elapsed().as_secs_f64(),
            counter(&c, "relay_commits_total")
        );
        for mut ws in conns {
            let _ = send(&mut ws, &ClientFrame::Bye).await;
        }
        drop(relay);
        anyhow::Ok(())
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = relay_bin(&cli.relay_bin)?;
    let quick_conn = ConnArgs {
        devices: 200,
        per_store: 10,
        connect_concurrency: 64,
        settle: 1,
    };
    let quick_orders = OrderArgs {
        orders: 5_000,
        stores: 5,
        batch: 1_000,
        builders: 2,
        cache: 500,
        touch: 2_000,
        sample_every: 500,
        window: 16,
        data: None,
        skip_fill: false,
        probe_redb: 0,
    };
    match cli.command {
        Some(Cmd::Connections(a)) => {
            run_connections(&bin, if cli.quick { &quick_conn } else { &a })
        }
        Some(Cmd::Orders(a)) => {
            let a = if cli.quick {
                OrderArgs {
                    data: a.data,
                    ..quick_orders
                }
            } else {
                a
            };
            run_orders(&bin, &a)
        }
        None => {
            if !cli.quick {
                bail!("choose `connections` or `orders`, or pass --quick to run both small");
            }
            run_connections(&bin, &quick_conn)?;
            println!();
            run_orders(&bin, &quick_orders)
        }
    }
}
