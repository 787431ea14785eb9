//! Crash safety of the real binary: a relay killed with SIGKILL at random instants, while
//! terminals keep selling and syncing, loses no change it receipted, and restarts on the same
//! data directory with no repair step (`relay-server check` passes after every kill).
//! Terminals' edits that were not receipted at a kill (in flight, or made offline while the relay
//! was down) sync after the restart, once each: no loss, no duplicate, one number per order.
//!
//! Rounds: 8 by default (a few seconds); `RELAY_CRASH_ROUNDS=200` for a long run,
//! `RELAY_CRASH_SEED` to vary the kill instants and the terminals' operations,
//! `RELAY_CRASH_LOG=1` to see the relay's log.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use automerge::ReadDoc;
use common::terminal::{Receipted, Terminal};
use crdt_model::*;
use relay_server::store::{RelayStore, StatusFilter};
use tokio::sync::watch;

const STORE: &str = "s1";
/// How long a live relay may take to receipt one order before the test calls it a hang.
const PATIENCE: Duration = Duration::from_secs(10);

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_relay-server")
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `relay-server device add` on the stopped relay's data dir; parses the id and the token.
fn provision(dir: &Path, name: &str) -> (DeviceId, String) {
    let out = Command::new(bin())
        .args(["device", "add", "--store", STORE, "--name", name, "--data"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "device add failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = text
        .lines()
        .find_map(|l| l.strip_prefix("device "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no device id in {text:?}"))
        .parse()
        .unwrap();
    let token = text
        .lines()
        .find_map(|l| l.strip_prefix("token (shown once): "))
        .unwrap_or_else(|| panic!("no token in {text:?}"))
        .trim()
        .to_owned();
    (device, token)
}

/// `relay-server check --data DIR`: exit status and output.
fn check_cli(dir: &Path) -> (bool, String) {
    let out = Command::new(bin())
        .args(["check", "--data"])
        .arg(dir)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

/// The relay binary serving `dir`.
struct Served {
    child: Child,
    addr: SocketAddr,
}

impl Served {
    /// Starts `relay-server serve` on a free port and waits until `/healthz` answers.
    fn start(dir: &Path) -> Self {
        let log = std::env::var_os("RELAY_CRASH_LOG").is_some();
        for _ in 0..5 {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let mut child = Command::new(bin())
                .args(["serve", "--listen", &addr.to_string(), "--data"])
                .arg(dir)
                .env("RUST_LOG", if log { "info" } else { "warn" })
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(if log { Stdio::inherit() } else { Stdio::null() })
                .spawn()
                .unwrap();
            let started = Instant::now();
            while started.elapsed() < Duration::from_secs(20) {
                if child.try_wait().unwrap().is_some() {
                    break; // e.g. the port was taken meanwhile: try another
                }
                if healthy(addr) {
                    return Self { child, addr };
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("the relay did not come up on {}", dir.display());
    }

    /// SIGKILL: no shutdown path runs.
    fn kill(mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "the relay had exited before the kill");
    }
}

impl Drop for Served {
    /// A failing test must not leave a relay running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Verifies the data dir of a dead relay: every receipted head is stored (with all its
/// ancestors), the store's own check passes, numbers of the store are exactly 1..=n.
/// Returns the number of orders stored.
fn verify_stored(dir: &Path, receipts: &[Receipted], when: &str) -> usize {
    let store = RelayStore::open(dir).unwrap_or_else(|e| panic!("{when}: reopen failed: {e}"));
    let report = store.check().unwrap();
    assert!(report.is_ok(), "{when}: store check: {:?}", report.errors);
    let mut by_order: BTreeMap<OrderId, Vec<automerge::ChangeHash>> = BTreeMap::new();
    for r in receipts {
        by_order
            .entry(r.order)
            .or_default()
            .extend(r.heads.iter().copied());
    }
    for (id, heads) in &by_order {
        let stored = store
            .load_order(*id)
            .unwrap()
            .unwrap_or_else(|| panic!("{when}: order {id} was receipted but is not stored"));
        let doc = stored.to_doc().unwrap();
        for h in heads {
            assert!(
                doc.get_change_by_hash(h).is_some(),
                "{when}: receipted change {h} of order {id} is lost"
            );
        }
        assert!(doc.get_missing_deps(&[]).is_empty(), "{when}: order {id}");
    }
    let metas = store
        .list_orders(
            &StoreId::new(STORE).unwrap(),
            StatusFilter::Any,
            0,
            usize::MAX,
        )
        .unwrap();
    let mut numbers: Vec<u64> = metas.iter().map(|m| m.number.0).collect();
    numbers.sort_unstable();
    assert_eq!(
        numbers,
        (1..=metas.len() as u64).collect::<Vec<_>>(),
        "{when}: numbers are not unique and gap-free"
    );
    assert_eq!(store.order_count().unwrap(), metas.len() as u64);
    metas.len()
}

/// What a terminal did, to compare with the relay at the end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Expect {
    lines: usize,
    payments: usize,
}

#[derive(Debug, Default)]
struct Stats {
    ops: u64,
    offline_ops: u64,
    /// Orders found not receipted when the terminal got back online (pushed after a restart).
    resynced: u64,
}

/// How a terminal sells: permille chance per operation of opening a new order, of closing the
/// current one. The first terminal keeps one long tab open (many changes: compaction).
#[derive(Clone, Copy)]
struct Habit {
    open: u64,
    close: u64,
}

/// One local operation on the terminal's current order (or a new one); returns that order.
fn sell(
    t: &mut Terminal,
    rng: &mut SplitMix64,
    habit: Habit,
    current: &mut Option<OrderId>,
    expect: &mut HashMap<OrderId, Expect>,
) -> OrderId {
    let roll = rng.next_u64() % 1000;
    let open = current.filter(|id| !t.orders[id].status().unwrap().is_terminal());
    let Some(id) = open.filter(|_| roll >= habit.open) else {
        let id = t.create(STORE);
        expect.insert(id, Expect::default());
        *current = Some(id);
        return id;
    };
    let at = t.tick();
    let o = t.orders.get_mut(&id).unwrap();
    let e = expect.get_mut(&id).unwrap();
    let lines = o.view().unwrap().lines;
    let pick = rng.next_u64();
    let close_at = 1000 - habit.close;
    match roll % 1000 {
        r if r >= close_at => {
            let due = o.view().unwrap().totals.balance_due;
            let last = (due > 0).then(|| {
                FinalPayment::New(PaymentDraft {
                    kind: PaymentKind::Cash,
                    amount: due,
                    reference: String::new(),
                })
            });
            let paid = o.complete_sale(at, &mut t.rng, last).unwrap();
            e.payments += usize::from(paid.is_some());
            *current = None;
        }
        r if r < 450 || lines.is_empty() => {
            o.add_line(
                at,
                &mut t.rng,
                LineDraft {
                    sku: format!("sku-{}", pick % 50),
                    name: format!("item {}", pick % 50),
                    unit_price: i64::try_from(pick % 900).unwrap() + 100,
                    quantity: i64::try_from(pick % 3).unwrap() + 1,
                    ..Default::default()
                },
            )
            .unwrap();
            e.lines += 1;
        }
        r if r < 700 => {
            let line = &lines[usize::try_from(pick).unwrap() % lines.len()];
            let delta = if line.quantity > 1 && pick.is_multiple_of(3) {
                -1
            } else {
                1
            };
            o.change_quantity(at, line.id, delta).unwrap();
        }
        r if r < 850 => {
            o.add_payment(
                at,
                &mut t.rng,
                PaymentDraft {
                    kind: PaymentKind::Cash,
                    amount: i64::try_from(pick % 500).unwrap() + 1,
                    reference: String::new(),
                },
                PaymentState::Captured,
            )
            .unwrap();
            e.payments += 1;
        }
        _ => {
            let status = [
                ActiveStatus::InProgress,
                ActiveStatus::InDelivery,
                ActiveStatus::Delayed,
            ][usize::try_from(pick % 3).unwrap()];
            o.set_status(at, &mut t.rng, status).unwrap();
        }
    }
    id
}

/// A terminal selling until `stop`: online it syncs after every operation; when the relay is
/// gone it keeps selling offline and reconnects to the next address the test publishes.
async fn run_terminal(
    mut t: Terminal,
    mut addr: watch::Receiver<SocketAddr>,
    stop: Arc<AtomicBool>,
    seed: u64,
    habit: Habit,
) -> (Terminal, HashMap<OrderId, Expect>, Stats) {
    let mut rng = SplitMix64::new(seed);
    let mut expect = HashMap::new();
    let mut current = None;
    let mut stats = Stats::default();
    while !stop.load(Ordering::Relaxed) {
        if !t.is_up() {
            let a = *addr.borrow_and_update();
            if t.connect(a).await.is_err() {
                sell(&mut t, &mut rng, habit, &mut current, &mut expect);
                stats.offline_ops += 1;
                // Relay down: wait for the test to publish the restarted relay's address (or
                // retry the same one shortly, in case the connection merely failed).
                let _ = tokio::time::timeout(Duration::from_millis(100), addr.changed()).await;
                continue;
            }
            let pending: Vec<OrderId> = t
                .orders
                .keys()
                .copied()
                .filter(|id| !t.receipted(*id))
                .collect();
            stats.resynced += pending.len() as u64;
            for id in pending {
                match t.sync_until_receipted(id, PATIENCE).await {
                    Ok(true) => {}
                    Ok(false) => panic!("{a}: a live relay did not receipt {}", stuck(&t, id)),
                    Err(_) => break,
                }
            }
            continue;
        }
        let id = sell(&mut t, &mut rng, habit, &mut current, &mut expect);
        stats.ops += 1;
        if t.sync_until_receipted(id, PATIENCE).await == Ok(false) {
            panic!("a live relay did not receipt {}", stuck(&t, id));
        }
    }
    (t, expect, stats)
}

/// What a terminal knows of an order the relay does not receipt, for a failure message.
fn stuck(t: &Terminal, id: OrderId) -> String {
    let o = &t.orders[&id];
    format!(
        "order {id} of terminal {}: our heads {:?}, last receipt {:?}, unexpected frames {:?}, \
         {} frames sent, {} received, {} connections",
        t.device,
        o.heads(),
        t.last_receipt.get(&id),
        t.unexpected,
        t.frames_out,
        t.frames_in,
        t.connects
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

fn all_receipts(logs: &[common::terminal::ReceiptLog]) -> Vec<Receipted> {
    logs.iter()
        .flat_map(|l| l.lock().unwrap().clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_instants_loses_no_receipted_change() {
    let rounds = env_u64("RELAY_CRASH_ROUNDS", 8);
    let seed = env_u64("RELAY_CRASH_SEED", 0x5EED_C0DE);
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("data");

    let habits = [
        Habit { open: 3, close: 0 },
        Habit {
            open: 20,
            close: 30,
        },
        Habit {
            open: 40,
            close: 60,
        },
    ];
    let mut terminals = Vec::new();
    for (i, _) in habits.iter().enumerate() {
        let (device, token) = provision(&dir, &format!("till-{i}"));
        let t = Terminal::new(device, token, seed ^ ((i as u64 + 1) << 32));
        terminals.push(t);
    }
    let logs: Vec<_> = terminals.iter().map(|t| Arc::clone(&t.receipts)).collect();

    let d = dir.clone();
    let mut relay = blocking(move || Served::start(&d)).await;
    let (addr_tx, addr_rx) = watch::channel(relay.addr);
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = terminals
        .into_iter()
        .zip(habits)
        .enumerate()
        .map(|(i, (t, habit))| {
            tokio::spawn(run_terminal(
                t,
                addr_rx.clone(),
                Arc::clone(&stop),
                seed.wrapping_add(i as u64),
                habit,
            ))
        })
        .collect();

    let mut rng = SplitMix64::new(seed);
    let mut stored = 0;
    let mut down = Duration::ZERO;
    for round in 1..=rounds {
        let delay = 150 + rng.next_u64() % 750;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        let killed = Instant::now();
        blocking(move || relay.kill()).await;
        // Every receipt received so far came from a relay that is dead now.
        let receipts = all_receipts(&logs);
        let d = dir.clone();
        let when = format!("after kill {round} (+{delay} ms)");
        let (cli_ok, cli_out, n) = blocking(move || {
            let (ok, out) = check_cli(&d);
            let n = verify_stored(&d, &receipts, &when);
            (ok, out, n)
        })
        .await;
        assert!(
            cli_ok,
            "after kill {round}: relay-server check failed:\n{cli_out}"
        );
        assert!(n >= stored, "orders disappeared after kill {round}");
        stored = n;
        let d = dir.clone();
        relay = blocking(move || Served::start(&d)).await;
        addr_tx.send(relay.addr).unwrap();
        down += killed.elapsed();
    }
    // Let the terminals work against the last restart a little, then stop selling.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut finished = Vec::new();
    for t in tasks {
        finished.push(t.await.unwrap());
    }

    // Everything each terminal holds reaches the relay, numbered.
    for (t, _, _) in &mut finished {
        if !t.is_up() {
            t.connect(relay.addr).await.expect("reconnect");
        }
        let ids: Vec<OrderId> = t.orders.keys().copied().collect();
        for id in ids {
            assert_eq!(t.sync_until_receipted(id, PATIENCE).await, Ok(true));
            let numbered = t
                .pump(PATIENCE, |t| {
                    t.orders[&id].number().unwrap().is_some() && t.in_step(id)
                })
                .await;
            assert_eq!(numbered, Ok(true), "order {id} never got its number");
        }
    }
    // One last kill -9 with every terminal idle and in step, then a restart with no repair
    // step: a fresh connection of each terminal finds the relay exactly at its heads.
    blocking(move || relay.kill()).await;
    let d = dir.clone();
    let relay = blocking(move || Served::start(&d)).await;
    for (t, _, _) in &mut finished {
        t.connect(relay.addr)
            .await
            .expect("reconnect after the last restart");
        let ids: Vec<OrderId> = t.orders.keys().copied().collect();
        for id in ids {
            t.last_receipt.remove(&id);
            assert!(t.push(id).await.unwrap(), "fresh sync state says something");
            assert_eq!(t.pump(PATIENCE, |t| t.in_step(id)).await, Ok(true));
        }
        t.bye().await;
    }
    blocking(move || relay.kill()).await;

    let receipts = all_receipts(&logs);
    let d = dir.clone();
    let (cli_ok, cli_out) = blocking(move || check_cli(&d)).await;
    assert!(cli_ok, "relay-server check failed:\n{cli_out}");
    assert!(cli_out.contains(" 0 errors, "), "{cli_out}");
    // The one warning allowed: the file was killed open, and the check recovered it first.
    assert!(
        cli_out
            .lines()
            .filter(|l| l.starts_with("warning:"))
            .all(|l| l.contains("was not closed cleanly")),
        "{cli_out}"
    );
    let total_orders: usize = finished.iter().map(|(t, _, _)| t.orders.len()).sum();
    let d = dir.clone();
    let n = blocking(move || verify_stored(&d, &receipts, "at the end")).await;
    assert_eq!(n, total_orders, "one stored order per order created");

    // The relay's document of every order equals the terminal's: no loss, no duplicate.
    let store = RelayStore::open(&dir).unwrap();
    let reader = store.identity().unwrap().writer();
    let mut stats = Stats::default();
    let mut kills_seen = 0;
    let mut compacted = 0;
    for (t, expect, s) in &finished {
        assert!(t.unexpected.is_empty(), "{:?}", t.unexpected);
        kills_seen = kills_seen.max(t.connects);
        stats.ops += s.ops;
        stats.offline_ops += s.offline_ops;
        stats.resynced += s.resynced;
        assert_eq!(expect.len(), t.orders.len());
        for (id, mine) in &t.orders {
            let stored = store.load_order(*id).unwrap().unwrap();
            compacted += usize::from(!stored.snapshot.is_empty());
            let relay_order = Order::from_doc(stored.to_doc().unwrap(), reader.clone()).unwrap();
            let mut a = relay_order.heads();
            let mut b = mine.heads();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "order {id}: heads differ");
            let view = relay_order.view().unwrap();
            assert_eq!(view, mine.view().unwrap(), "order {id}: views differ");
            assert_eq!(view.number, Some(stored.meta.number.0));
            let e = expect[id];
            assert_eq!(view.lines.len(), e.lines, "order {id}: lines");
            assert_eq!(view.payments.len(), e.payments, "order {id}: payments");
            assert!(view.late_lines.is_empty() && view.removed_lines.is_empty());
        }
    }
    let receipts = all_receipts(&logs).len();
    eprintln!(
        "{rounds} kills in {:.1} s (relay down {:.1} s in all): {total_orders} orders \
         ({compacted} compacted), {} online ops, {} offline ops, {} orders pushed again after a \
         restart, {receipts} receipts",
        started.elapsed().as_secs_f64(),
        down.as_secs_f64(),
        stats.ops,
        stats.offline_ops,
        stats.resynced,
    );
    assert!(
        kills_seen as u64 > rounds / 2,
        "terminals reconnected too rarely"
    );
    assert!(
        stats.resynced > 0,
        "no edit was pending at a kill: the test exercised nothing"
    );
}
