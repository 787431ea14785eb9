//! `pos-sim`: a store of terminals with cashier behaviour, under a hostile network, checked end
//! to end.
//!
//! It starts an embedded relay, provisions terminals (each with its own redb file, each behind
//! its own fault-injecting proxy), runs cashiers (open orders, add lines, split payments across
//! cash and card, sometimes delete, sometimes edit another terminal's order), injects faults
//! (cut connections, offline periods, answers lost after the relay applied a change, relay
//! restarts, app restarts on the same local store), heals the network, and verifies through the relay's HTTP API that everything
//! converged and no money was lost or doubled.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use crdt_model::{
    ActiveStatus, Currency, Entropy, FinalPayment, LineDraft, OrderId, OrderStatus, OrderView,
    PaymentDraft, PaymentId, PaymentKind, PaymentState, SplitMix64, StoreId,
};
use replicator::core::EngineConfig;
use replicator::{
    ChargeResult, Config, Identity, LocalSyncStatus, Replicator, SimMode, SimTerminal,
};
use tokio::sync::Mutex;

use crate::harness::{EmbeddedRelay, get_json};
use crate::proxy::{Direction, Proxy};

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Terminals per store.
    pub terminals: usize,
    /// Stores.
    pub stores: usize,
    /// Orders each terminal opens.
    pub orders: usize,
    /// Seed for every random choice of the cashiers and the fault injector.
    pub seed: u64,
    /// Probability per fault tick (every 100 ms) that a fault is injected.
    pub fault_rate: f64,
    /// Mean think time of a cashier between two actions, ms.
    pub pace_ms: u64,
    /// Run against a relay that is already running (its address and an admin token) instead
    /// of an embedded one. Relay restarts are then not injected.
    pub relay: Option<(std::net::SocketAddr, String)>,
    /// Keep the records in this PostgreSQL database (a fresh schema, dropped at the end) and
    /// run [`SimOptions::relays`] relay processes on it ([`SimOptions::relay_bin`]); the fault
    /// injector SIGKILLs them and starts them again, and every till knows every relay.
    pub store: Option<String>,
    /// Relay processes (with `store`).
    pub relays: usize,
    /// The `relay-proc` binary (with `store`).
    pub relay_bin: Option<std::path::PathBuf>,
    /// Print progress.
    pub verbose: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            terminals: 4,
            stores: 1,
            orders: 25,
            seed: 1,
            fault_rate: 0.3,
            pace_ms: 40,
            relay: None,
            store: None,
            relays: 1,
            relay_bin: None,
            verbose: true,
        }
    }
}

/// One named check and its outcome.
#[derive(Clone, Debug)]
pub struct Check {
    /// What was checked.
    pub name: &'static str,
    /// Whether it held.
    pub passed: bool,
    /// Numbers or the first counter-example.
    pub detail: String,
}

/// What happened and whether everything held.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Orders on the relay.
    pub orders: usize,
    /// Lines on the relay's orders.
    pub lines: usize,
    /// Captured payments (money taken) on the relay.
    pub captured_payments: usize,
    /// Late edits flagged.
    pub late_edits: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<&'static str, u64>,
    /// Cashier operations refused locally (closed orders etc.), expected under concurrency.
    pub refused_ops: u64,
    /// The checks.
    pub checks: Vec<Check>,
    /// Wall time.
    pub elapsed: Duration,
    /// The stores the run created, and where their relay was (its address; the data
    /// directory of an embedded one is temporary and removed at the end).
    pub stores: Vec<String>,
    /// The relay the run used.
    pub relay: String,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// A short readable report.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "pos-sim: stores {} on the relay at {}\n",
            self.stores.join(", "),
            self.relay
        ));
        s.push_str(&format!(
            "pos-sim: {} orders, {} lines, {} captured payments, {} late edits flagged, {} refused local ops\n",
            self.orders, self.lines, self.captured_payments, self.late_edits, self.refused_ops
        ));
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s.push_str(&format!(
            "faults injected: {}\n",
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            }
        ));
        for c in &self.checks {
            s.push_str(&format!(
                "  [{}] {} — {}\n",
                if c.passed { "ok" } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
        let passed = self.checks.iter().filter(|c| c.passed).count();
        s.push_str(&format!(
            "{passed} passed, {} failed in {:.1}s\n",
            self.checks.len() - passed,
            self.elapsed.as_secs_f64()
        ));
        s
    }
}

struct Till {
    /// The app; `None` for the instant of an app restart.
    rep: Mutex<Option<Replicator>>,
    /// One proxy per relay (one relay unless a fleet runs), in the till's order of relays.
    proxies: Vec<Proxy>,
    store: StoreId,
    path: std::path::PathBuf,
    identity: Identity,
    config: Config,
    terminal: Arc<SimTerminal>,
}

impl Till {
    /// Cuts every connection of the till.
    fn cut_all(&self) {
        for p in &self.proxies {
            p.cut_all();
        }
    }

    /// The relay applies what it got, the answer is lost.
    fn cut_after(&self, bytes: u64) {
        for p in &self.proxies {
            p.cut_after(Direction::Down, bytes);
        }
    }

    /// The till's network goes away (`true`) or comes back.
    fn set_blackhole(&self, on: bool) {
        for p in &self.proxies {
            p.set_blackhole(on);
        }
    }

    /// A handle to the running app (cheap clone). Hold it only briefly: a restart waits for
    /// every handle to be dropped.
    async fn rep(&self) -> Result<Replicator> {
        self.rep.lock().await.clone().context("till is restarting")
    }

    /// Closes the app and opens it again on the same local store, as after a crash or an
    /// update: only what was durable survives, and syncing resumes.
    async fn restart(&self) -> Result<()> {
        let mut slot = self.rep.lock().await;
        if let Some(old) = slot.take() {
            old.close().await;
        }
        // Another task may still hold a handle for a moment; the store is free once it drops it.
        let mut last = None;
        for _ in 0..100 {
            match Replicator::open(
                &self.path,
                self.identity.clone(),
                self.config.clone(),
                self.terminal.clone(),
            )
            .await
            {
                Ok(r) => {
                    *slot = Some(r);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(last.map_or_else(|| anyhow::anyhow!("cannot reopen"), anyhow::Error::from))
    }
}

#[derive(Default)]
struct Ledger {
    /// Payments a cashier saw captured, with amount.
    captured: BTreeMap<PaymentId, i64>,
    /// Orders a cashier saw made terminal, with the status.
    closed: BTreeMap<OrderId, OrderStatus>,
    refused: u64,
    restarts: u64,
}

fn eur() -> Result<Currency> {
    Ok(Currency::new("EUR")?)
}

const MENU: &[(&str, i64)] = &[
    ("Espresso", 250),
    ("Cappuccino", 380),
    ("Croissant", 220),
    ("Club sandwich", 890),
    ("Soup", 650),
    ("Salad", 790),
    ("Water", 200),
    ("Cake", 450),
];

async fn cashier(
    till: Arc<Till>,
    peers: Vec<Arc<Till>>,
    orders: usize,
    seed: u64,
    pace_ms: u64,
    restarts: bool,
    ledger: Arc<Mutex<Ledger>>,
) -> Result<()> {
    let mut rng = SplitMix64::new(seed);
    let think = |rng: &mut SplitMix64| {
        Duration::from_millis(if pace_ms == 0 {
            0
        } else {
            rng.next_u64() % (2 * pace_ms)
        })
    };
    let eur = eur()?;
    for _ in 0..orders {
        tokio::time::sleep(think(&mut rng) * 3).await;
        if restarts && rng.next_u64().is_multiple_of(12) {
            till.restart().await?;
            ledger.lock().await.restarts += 1;
        }
        let rep = till.rep().await?;
        let r = &rep;
        // Sometimes help on another terminal's open order (same store): real concurrency.
        if rng.next_u64().is_multiple_of(5)
            && let Some(other) = peers.get((rng.next_u64() as usize) % peers.len().max(1))
        {
            let active = match other.rep().await {
                Ok(o) => o.active_orders().await,
                Err(_) => Vec::new(),
            };
            if let Some(v) = active.get((rng.next_u64() as usize) % active.len().max(1)) {
                let id: OrderId = v.id.parse()?;
                if r.view(id).await.is_err() {
                    r.fetch(id).await?;
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                let (name, price) = MENU[(rng.next_u64() as usize) % MENU.len()];
                let res = r
                    .add_line(
                        id,
                        LineDraft {
                            sku: name.to_lowercase(),
                            name: name.into(),
                            unit_price: price,
                            quantity: 1,
                            ..Default::default()
                        },
                    )
                    .await;
                if res.is_err() {
                    ledger.lock().await.refused += 1;
                }
            }
        }
        let id = r.create_order(eur).await?;
        let mut lines = Vec::new();
        for _ in 0..1 + rng.next_u64() % 4 {
            let (name, price) = MENU[(rng.next_u64() as usize) % MENU.len()];
            let qty = 1 + (rng.next_u64() % 3) as i64;
            lines.push(
                r.add_line(
                    id,
                    LineDraft {
                        sku: name.to_lowercase(),
                        name: name.into(),
                        unit_price: price,
                        quantity: qty,
                        ..Default::default()
                    },
                )
                .await?,
            );
            tokio::time::sleep(think(&mut rng)).await;
        }
        if rng.next_u64().is_multiple_of(4) {
            r.set_status(id, ActiveStatus::InDelivery).await?;
        }
        if rng.next_u64().is_multiple_of(3) && !lines.is_empty() {
            let _ = r.change_quantity(id, lines[0], 1).await;
        }
        if rng.next_u64().is_multiple_of(10) {
            match r.delete(id).await {
                Ok(()) => {
                    ledger.lock().await.closed.insert(id, OrderStatus::Deleted);
                }
                Err(_) => ledger.lock().await.refused += 1,
            }
            continue;
        }
        // Pay: in two sittings (cash then card) or at once.
        let due = r.view(id).await?.totals.balance_due;
        let mut last_cash = due;
        if due > 100 && rng.next_u64().is_multiple_of(2) {
            let part = due / 2;
            let p = r
                .take_payment(
                    id,
                    PaymentDraft {
                        kind: PaymentKind::Cash,
                        amount: part,
                        reference: String::new(),
                    },
                )
                .await?;
            ledger.lock().await.captured.insert(p, part);
            tokio::time::sleep(think(&mut rng)).await;
            let rest = r.view(id).await?.totals.balance_due;
            match r.charge_card(id, rest).await {
                Ok(ChargeResult::Captured(p)) => {
                    ledger.lock().await.captured.insert(p, rest);
                    last_cash = 0;
                }
                _ => last_cash = r.view(id).await?.totals.balance_due,
            }
        }
        let view = r.view(id).await?;
        let last = (last_cash > 0 && view.totals.balance_due > 0).then(|| {
            FinalPayment::New(PaymentDraft {
                kind: PaymentKind::Cash,
                amount: view.totals.balance_due,
                reference: String::new(),
            })
        });
        match r.complete_sale(id, last).await {
            Ok(p) => {
                let mut l = ledger.lock().await;
                if let Some(p) = p {
                    l.captured.insert(p, view.totals.balance_due);
                }
                l.closed.insert(id, OrderStatus::Done);
            }
            Err(_) => ledger.lock().await.refused += 1,
        }
    }
    Ok(())
}

async fn faults(
    tills: Vec<Arc<Till>>,
    relay: Option<Arc<Mutex<EmbeddedRelay>>>,
    fleet: Option<Arc<Mutex<Fleet>>>,
    rate: f64,
    seed: u64,
    stop: Arc<AtomicU64>,
    counts: Arc<Mutex<BTreeMap<&'static str, u64>>>,
) -> Result<()> {
    let mut rng = SplitMix64::new(seed ^ 0xFA17);
    while stop.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let roll = (rng.next_u64() % 10_000) as f64 / 10_000.0;
        if roll >= rate || tills.is_empty() {
            continue;
        }
        let till = &tills[(rng.next_u64() as usize) % tills.len()];
        let kind = match rng.next_u64() % 10 {
            0..=3 => {
                till.cut_all();
                "cut_connection"
            }
            4..=5 => {
                // The relay applies what it got, the answer is lost.
                till.cut_after(1 + rng.next_u64() % 200);
                "answer_lost"
            }
            6..=7 => {
                till.set_blackhole(true);
                tokio::time::sleep(Duration::from_millis(200 + rng.next_u64() % 600)).await;
                till.set_blackhole(false);
                "offline_period"
            }
            8 if fleet.is_none() => {
                till.set_blackhole(true);
                tokio::time::sleep(Duration::from_millis(200 + rng.next_u64() % 600)).await;
                till.set_blackhole(false);
                "offline_period"
            }
            _ => match (&relay, &fleet) {
                (_, Some(f)) => {
                    // SIGKILL one relay; its tills move to another; it comes back later.
                    let k = (rng.next_u64() as usize) % f.lock().await.len();
                    f.lock().await.kill(k);
                    tokio::time::sleep(Duration::from_millis(200 + rng.next_u64() % 600)).await;
                    f.lock().await.launch(k).await?;
                    "relay_sigkill"
                }
                (Some(r), None) => {
                    r.lock().await.restart().await?;
                    "relay_restart"
                }
                (None, None) => {
                    till.cut_all();
                    "cut_connection"
                }
            },
        };
        *counts.lock().await.entry(kind).or_default() += 1;
    }
    Ok(())
}

/// Runs the simulation and verifies it.
pub async fn run(opts: SimOptions) -> Result<Report> {
    let started = Instant::now();
    let dir = tempfile::tempdir()?;
    let mut fleet = None;
    let (relay, addr, admin) = match (&opts.relay, &opts.store) {
        (Some((addr, admin)), _) => (None, *addr, admin.clone()),
        (None, Some(url)) => {
            let bin = opts
                .relay_bin
                .clone()
                .context("relay processes need the relay-proc binary")?;
            let f = Fleet::open(url, opts.relays.max(1), bin).await?;
            let (addr, admin) = (f.addr(0), f.admin.clone());
            fleet = Some(f);
            (None, addr, admin)
        }
        (None, None) => {
            let r = EmbeddedRelay::start(&dir.path().join("relay"), 0).await?;
            let (addr, admin) = (r.addr, r.admin.clone());
            (Some(r), addr, admin)
        }
    };
    // Fresh store names on an external relay, so earlier runs' orders do not mix in.
    let prefix = match &opts.relay {
        Some(_) => format!(
            "sim{}-",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
        ),
        None => String::new(),
    };
    let mut tills = Vec::new();
    let mut stores = Vec::new();
    for s in 0..opts.stores {
        let store = StoreId::new(format!("{prefix}store-{}", s + 1))?;
        stores.push(store.to_string());
        for t in 0..opts.terminals {
            let name = format!("till-{}", t + 1);
            let (device, token) = match &relay {
                Some(r) => r.provision(&store, &name)?,
                None => provision(addr, &admin, &store, &name).await?,
            };
            // One proxy per relay; tills are spread over the relays (each starts with a
            // different one and knows the others).
            let targets: Vec<std::net::SocketAddr> = match &fleet {
                Some(f) => {
                    let n = f.len();
                    (0..n).map(|k| f.addr((t + k) % n)).collect()
                }
                None => vec![addr],
            };
            let mut proxies = Vec::new();
            for target in targets {
                proxies.push(Proxy::start(target).await?);
            }
            let urls: Vec<String> = proxies
                .iter()
                .map(|p| format!("ws://{}/v1/sync", p.addr))
                .collect();
            let identity = Identity {
                device,
                store: store.clone(),
                epoch: 1,
                relay_url: urls[0].clone(),
                fallback_urls: urls[1..].to_vec(),
                token,
            };
            let config = Config {
                engine: EngineConfig {
                    backoff_min_ms: 50,
                    backoff_max_ms: 500,
                    ..EngineConfig::default()
                },
                connect_timeout: Duration::from_secs(2),
            };
            let terminal = Arc::new(SimTerminal::new(SimMode::Approve));
            let path = dir.path().join(format!("{store}-till-{t}.redb"));
            let rep =
                Replicator::open(&path, identity.clone(), config.clone(), terminal.clone()).await?;
            tills.push(Arc::new(Till {
                rep: Mutex::new(Some(rep)),
                proxies,
                store: store.clone(),
                path,
                identity,
                config,
                terminal,
            }));
        }
    }
    let relay = relay.map(|r| Arc::new(Mutex::new(r)));
    let fleet = fleet.map(|f| Arc::new(Mutex::new(f)));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(AtomicU64::new(0));
    let fault_counts = Arc::new(Mutex::new(BTreeMap::new()));
    let injector = tokio::spawn(faults(
        tills.clone(),
        relay.clone(),
        fleet.clone(),
        opts.fault_rate,
        opts.seed,
        Arc::clone(&stop),
        Arc::clone(&fault_counts),
    ));
    let mut cashiers = Vec::new();
    for (i, till) in tills.iter().enumerate() {
        let peers: Vec<Arc<Till>> = tills
            .iter()
            .filter(|t| t.store == till.store && !Arc::ptr_eq(t, till))
            .cloned()
            .collect();
        cashiers.push(tokio::spawn(cashier(
            Arc::clone(till),
            peers,
            opts.orders,
            opts.seed.wrapping_mul(31).wrapping_add(i as u64),
            opts.pace_ms,
            opts.fault_rate > 0.0,
            Arc::clone(&ledger),
        )));
    }
    for (i, c) in cashiers.into_iter().enumerate() {
        c.await?.with_context(|| format!("cashier {i}"))?;
        if opts.verbose {
            eprintln!(
                "pos-sim: cashier {} done ({:.1}s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    stop.store(1, Ordering::Relaxed);
    injector.await??;
    // Heal: every proxy passes traffic again; wait for every terminal to be synced.
    for t in &tills {
        t.set_blackhole(false);
    }
    if opts.verbose {
        eprintln!("pos-sim: network healed, waiting for convergence");
    }
    let restarts = ledger.lock().await.restarts;
    if restarts > 0 {
        fault_counts.lock().await.insert("app_restart", restarts);
    }
    let mut report = Report {
        faults: fault_counts.lock().await.clone(),
        refused_ops: ledger.lock().await.refused,
        stores,
        relay: match (&relay, &fleet) {
            (Some(_), _) => format!("{addr} (embedded, temporary data)"),
            (None, Some(f)) => {
                let f = f.lock().await;
                format!(
                    "{} relay processes on PostgreSQL (schema {}, dropped at the end): {}",
                    f.len(),
                    f.schema.name,
                    (0..f.len())
                        .map(|k| f.addr(k).to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
            (None, None) => addr.to_string(),
        },
        ..Report::default()
    };
    let settle = settle(&tills, Duration::from_secs(60)).await;
    report.checks.push(Check {
        name: "every terminal synced (durable receipts cover all local changes)",
        passed: settle.is_ok(),
        detail: settle
            .err()
            .unwrap_or_else(|| "all orders Synced, no charge pending".into()),
    });
    verify(
        &tills,
        addr,
        &admin,
        &ledger,
        &prefix,
        opts.stores,
        &mut report,
    )
    .await?;
    if let Some(f) = &fleet {
        f.lock().await.verify_relays(&mut report).await?;
    }
    for t in &tills {
        if let Ok(r) = t.rep().await {
            r.close().await;
        }
    }
    if let Some(r) = &relay {
        r.lock().await.stop().await?;
    }
    if let Some(f) = &fleet {
        f.lock().await.stop().await?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Relay processes (`relay-proc`) on one PostgreSQL schema.
struct Fleet {
    schema: crate::pgdb::TestSchema,
    /// This process's handle on the schema (provisioning, the database's view of orders).
    pg: Arc<relay_server::pg::PgStore>,
    bin: std::path::PathBuf,
    ports: Vec<u16>,
    children: Vec<Option<std::process::Child>>,
    admin: String,
}

impl Fleet {
    /// A fresh schema of `url` and `n` relay processes on it.
    async fn open(url: &str, n: usize, bin: std::path::PathBuf) -> Result<Self> {
        let schema = crate::pgdb::TestSchema::new(url, "pos_sim");
        let pg = schema.connect(4).await?;
        let admin = pg.add_admin_token(None, "pos-sim", 0).await?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push(
                std::net::TcpListener::bind("127.0.0.1:0")?
                    .local_addr()?
                    .port(),
            );
        }
        let mut me = Self {
            schema,
            pg,
            bin,
            children: (0..n).map(|_| None).collect(),
            ports,
            admin,
        };
        for k in 0..n {
            me.launch(k).await?;
        }
        Ok(me)
    }

    fn len(&self) -> usize {
        self.ports.len()
    }

    fn addr(&self, k: usize) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.ports[k]))
    }

    /// Starts relay `k` (again) on its port and waits until it accepts connections.
    async fn launch(&mut self, k: usize) -> Result<()> {
        let child = std::process::Command::new(&self.bin)
            .args([
                "--listen",
                &self.addr(k).to_string(),
                "--store",
                &self.schema.url,
                "--pg-schema",
                &self.schema.name,
            ])
            .env("RUST_LOG", "error")
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.children[k] = Some(child);
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(self.addr(k)).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        anyhow::bail!("relay {k} did not start")
    }

    /// SIGKILLs relay `k`.
    fn kill(&mut self, k: usize) {
        if let Some(mut c) = self.children[k].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The check only several relays have: every relay answers for every order exactly what
    /// the database holds.
    async fn verify_relays(&self, report: &mut Report) -> Result<()> {
        let mut differ = Vec::new();
        let mut compared = 0;
        for s in &report.stores {
            let store = StoreId::new(s.as_str())?;
            let metas = self
                .pg
                .list_orders(
                    &store,
                    relay_server::store::StatusFilter::Any,
                    0,
                    usize::MAX,
                )
                .await?;
            for m in metas {
                let stored = self
                    .pg
                    .load_order(m.order)
                    .await?
                    .context("listed order not stored")?;
                let doc = stored.to_doc()?;
                let want = crdt_model::view_of(&doc)?;
                for k in 0..self.len() {
                    let got: OrderView = get_json(
                        self.addr(k),
                        &format!("/v1/orders/{}", m.order),
                        &self.admin,
                    )
                    .await?;
                    compared += 1;
                    if got != want {
                        differ.push(format!("relay {k} answers otherwise for order {}", m.order));
                    }
                }
            }
        }
        report.checks.push(Check {
            name: "every relay's view of every order equals the database's",
            passed: differ.is_empty(),
            detail: differ
                .first()
                .cloned()
                .unwrap_or_else(|| format!("{compared} answers compared ({} relays)", self.len())),
        });
        Ok(())
    }

    /// Stops every relay and drops the schema.
    async fn stop(&mut self) -> Result<()> {
        for k in 0..self.len() {
            self.kill(k);
        }
        self.schema.drop_schema(&self.pg).await
    }
}

/// Provisions a device through a running relay's admin API.
async fn provision(
    addr: std::net::SocketAddr,
    admin: &str,
    store: &StoreId,
    name: &str,
) -> Result<(crdt_model::DeviceId, String)> {
    let body = serde_json::json!({ "store": store.as_str(), "name": name }).to_string();
    let (status, answer) =
        crate::harness::http(addr, "POST", "/v1/admin/devices", admin, Some(&body)).await?;
    anyhow::ensure!(status == 200, "provisioning {name}: {status} {answer}");
    let v: serde_json::Value = serde_json::from_str(&answer)?;
    let device = v["device"].as_str().context("device id")?.parse()?;
    let token = v["token"].as_str().context("token")?.to_owned();
    Ok((device, token))
}

async fn settle(tills: &[Arc<Till>], timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut pending = Vec::new();
        for (i, t) in tills.iter().enumerate() {
            let Ok(rep) = t.rep().await else {
                pending.push(format!("till {i}: restarting"));
                continue;
            };
            if !rep.pending_charges().await.is_empty() {
                pending.push(format!("till {i}: charge pending"));
            }
            for id in rep.order_ids().await {
                match rep.sync_status(id).await {
                    Some(LocalSyncStatus::Synced) => {}
                    other => pending.push(format!("till {i}: order {id} {other:?}")),
                }
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} not synced, e.g. {}", pending.len(), pending[0]));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[derive(serde::Deserialize)]
struct Listed {
    orders: Vec<ListedOrder>,
    next_since: Option<u64>,
}

#[derive(serde::Deserialize)]
struct ListedOrder {
    id: String,
    number: u64,
}

async fn verify(
    tills: &[Arc<Till>],
    addr: std::net::SocketAddr,
    admin: &str,
    ledger: &Mutex<Ledger>,
    prefix: &str,
    stores: usize,
    report: &mut Report,
) -> Result<()> {
    let ledger = ledger.lock().await;
    let mut relay_views: BTreeMap<OrderId, OrderView> = BTreeMap::new();
    let mut numbering_ok = true;
    let mut numbering_detail = String::new();
    for s in 0..stores {
        let store = format!("{prefix}store-{}", s + 1);
        let mut since = 0;
        let mut numbers = Vec::new();
        loop {
            let page: Listed = get_json(
                addr,
                &format!("/v1/stores/{store}/orders?status=any&since={since}&limit=500"),
                admin,
            )
            .await?;
            for o in &page.orders {
                numbers.push(o.number);
                let view: OrderView =
                    get_json(addr, &format!("/v1/orders/{}", o.id), admin).await?;
                relay_views.insert(o.id.parse()?, view);
            }
            match page.next_since {
                Some(n) if !page.orders.is_empty() => since = n,
                _ => break,
            }
        }
        numbers.sort_unstable();
        let expected: Vec<u64> = (1..=numbers.len() as u64).collect();
        if numbers != expected {
            numbering_ok = false;
            numbering_detail = format!("{store}: numbers {numbers:?}");
        }
    }
    report.orders = relay_views.len();
    report.lines = relay_views
        .values()
        .map(|v| v.lines.len() + v.late_lines.len())
        .sum();
    report.captured_payments = relay_views
        .values()
        .flat_map(|v| &v.payments)
        .filter(|p| p.state == PaymentState::Captured)
        .count();
    report.late_edits = relay_views.values().map(|v| v.late_edits.len()).sum();
    report.checks.push(Check {
        name: "order numbers unique and gap-free per store",
        passed: numbering_ok,
        detail: if numbering_ok {
            format!("{} orders numbered", relay_views.len())
        } else {
            numbering_detail
        },
    });

    // Every terminal holds the same document as the relay for every order it has, and every
    // active order of its store.
    let mut diverged = Vec::new();
    let mut missing = Vec::new();
    let mut compared = 0;
    for (i, t) in tills.iter().enumerate() {
        let rep = t.rep().await?;
        let held: BTreeSet<OrderId> = rep.order_ids().await.into_iter().collect();
        for (id, rv) in &relay_views {
            if rv.store != t.store.as_str() {
                continue;
            }
            match rep.view(*id).await {
                Ok(v) => {
                    compared += 1;
                    if &v != rv {
                        // Propagation is asynchronous: give the push a moment before calling it.
                        let mut same = false;
                        for _ in 0..50 {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            if rep.view(*id).await.ok().as_ref() == Some(rv) {
                                same = true;
                                break;
                            }
                        }
                        if !same {
                            let now = rep.view(*id).await.ok();
                            diverged.push(format!(
                                "till {i} order {id}: till has {} lines/{} payments/{:?}, relay {} lines/{} payments/{:?}; till online {}",
                                now.as_ref().map_or(0, |v| v.lines.len()), now.as_ref().map_or(0, |v| v.payments.len()), now.as_ref().map(|v| v.status),
                                rv.lines.len(), rv.payments.len(), rv.status, rep.is_online().await
                            ));
                        }
                    }
                }
                Err(_) if !rv.status.is_terminal() => {
                    missing.push(format!("till {i} lacks active order {id}"))
                }
                Err(_) => {}
            }
        }
        for id in held {
            if !relay_views.contains_key(&id) {
                missing.push(format!("relay lacks order {id} held by till {i}"));
            }
        }
    }
    report.checks.push(Check {
        name: "terminals and relay hold identical orders",
        passed: diverged.is_empty() && missing.is_empty(),
        detail: diverged
            .first()
            .or(missing.first())
            .cloned()
            .unwrap_or_else(|| format!("{compared} replicas compared")),
    });

    let mut money = Vec::new();
    let all_payments: BTreeMap<PaymentId, (i64, PaymentState, usize)> = {
        let mut m: BTreeMap<PaymentId, (i64, PaymentState, usize)> = BTreeMap::new();
        for v in relay_views.values() {
            for p in &v.payments {
                let e = m.entry(p.id).or_insert((p.amount, p.state, 0));
                e.2 += 1;
            }
        }
        m
    };
    for (p, amount) in &ledger.captured {
        match all_payments.get(p) {
            Some((a, state, 1)) if a == amount && *state >= PaymentState::Captured => {}
            other => money.push(format!(
                "payment {p}: cashier saw {amount} captured, relay has {other:?}"
            )),
        }
    }
    for v in relay_views.values() {
        let sum: i64 = v
            .payments
            .iter()
            .filter(|p| p.state == PaymentState::Captured)
            .map(|p| p.amount)
            .sum();
        if sum != v.totals.paid {
            money.push(format!(
                "order {}: paid {} != captured {}",
                v.id, v.totals.paid, sum
            ));
        }
    }
    report.checks.push(Check {
        name: "every captured payment exists exactly once; paid = sum of captures",
        passed: money.is_empty(),
        detail: money.first().cloned().unwrap_or_else(|| {
            format!(
                "{} captures recorded by cashiers, all present",
                ledger.captured.len()
            )
        }),
    });

    let mut reverted = Vec::new();
    for (id, status) in &ledger.closed {
        match relay_views.get(id) {
            Some(v) if v.status.is_terminal() => {
                if *status == OrderStatus::Done && v.status != OrderStatus::Done {
                    reverted.push(format!("order {id}: sold but shows {}", v.status));
                }
            }
            other => reverted.push(format!(
                "order {id}: closed as {status}, relay shows {:?}",
                other.map(|v| v.status)
            )),
        }
    }
    report.checks.push(Check {
        name: "no closed order reverted; Done beats Deleted",
        passed: reverted.is_empty(),
        detail: reverted
            .first()
            .cloned()
            .unwrap_or_else(|| format!("{} closed orders still closed", ledger.closed.len())),
    });

    let mut unflagged = Vec::new();
    for v in relay_views.values().filter(|v| v.status.is_terminal()) {
        // A closed order whose lines or payments differ from the closed state must say so.
        let extra =
            !v.late_lines.is_empty() || v.late_edits.iter().any(|e| e.id.starts_with("payment:"));
        if extra && v.late_edits.is_empty() {
            unflagged.push(v.id.clone());
        }
    }
    report.checks.push(Check {
        name: "late edits flagged (identically everywhere: compared with the replicas above)",
        passed: unflagged.is_empty(),
        detail: unflagged
            .first()
            .cloned()
            .unwrap_or_else(|| format!("{} late edits flagged", report.late_edits)),
    });
    Ok(())
}
