//! `device-bench`: the device library's figures against `docs/performance.md`.
//!
//! 1. Durable local edit latency: one till, its redb file on the temp volume, no relay reachable
//!    (so nothing but the local commit is measured); p50/p99 over many edits.
//! 2. An 8-hour offline backlog (default 200 orders, ~25 changes each) synced to a fresh embedded
//!    relay: time from the relay coming up (and from the till's connection) until every order is
//!    Synced (receipted).
//! 3. A relay restart with the till holding many synced orders (default 10,000): a sale made
//!    while the relay is down, time from the relay coming up (and from the till's connection)
//!    until it is Synced. A reconnect must cost what is unreceipted, not what the till holds.
//!
//! `--quick` (CI) shrinks all three.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use crdt_model::{Currency, FinalPayment, LineDraft, PaymentDraft, PaymentKind, StoreId};
use e2e::harness::EmbeddedRelay;
use replicator::core::EngineConfig;
use replicator::{Config, Identity, LocalSyncStatus, Replicator, SimMode, SimTerminal};

/// Device library benchmarks.
#[derive(Parser, Debug)]
struct Args {
    /// Edits timed for the local latency figure.
    #[arg(long, default_value_t = 2_000)]
    edits: usize,
    /// Orders in the offline backlog.
    #[arg(long, default_value_t = 200)]
    orders: usize,
    /// Lines per backlog order (each order also gets a status change, two payments and a close).
    #[arg(long, default_value_t = 20)]
    lines: usize,
    /// Synced orders the till holds when the relay restarts (figure 3).
    #[arg(long, default_value_t = 10_000)]
    held: usize,
    /// Small sizes, for CI.
    #[arg(long)]
    quick: bool,
}

/// When the till's next connection to the relay is up (its welcome arrived).
fn connected_at(till: &Replicator) -> tokio::task::JoinHandle<Option<Instant>> {
    let mut events = till.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(replicator::Event::Connected) => return Some(Instant::now()),
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return None,
            }
        }
    })
}

/// Time since `at` (the till's welcome), or zero if it never came.
fn since(at: Option<Instant>) -> Duration {
    at.map_or(Duration::ZERO, |t| t.elapsed())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.edits = 50;
        args.orders = 5;
        args.lines = 5;
        args.held = 100;
    }
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    // Provision on the relay's data dir while it is not running; it starts later.
    let relay_data = dir.path().join("relay");
    let (device, token) = {
        let store = relay_server::store::RelayStore::open(&relay_data)?;
        let (rec, token) = store.add_device(&StoreId::new("s1")?, "till", 0)?;
        (rec.device, token)
    };
    let identity = Identity {
        device,
        store: StoreId::new("s1")?,
        epoch: 1,
        relay_url: format!("ws://127.0.0.1:{port}/v1/sync"),
        fallback_urls: Vec::new(),
        token,
    };
    let config = Config {
        engine: EngineConfig {
            backoff_min_ms: 20,
            backoff_max_ms: 100,
            ..EngineConfig::default()
        },
        connect_timeout: Duration::from_secs(1),
    };
    let till = Replicator::open(
        &dir.path().join("till.redb"),
        identity,
        config,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await?;
    let eur = Currency::new("EUR")?;

    // 1. Durable local edits (offline: only the local commit).
    let order = till.create_order(eur).await?;
    let line = till
        .add_line(
            order,
            LineDraft {
                name: "Tea".into(),
                unit_price: 300,
                quantity: 1,
                ..Default::default()
            },
        )
        .await?;
    let mut samples = e2e::latency::Latency::new();
    for i in 0..args.edits {
        let delta = if i % 2 == 0 { 1 } else { -1 };
        let t = Instant::now();
        till.change_quantity(order, line, delta).await?;
        samples.record(t.elapsed());
    }
    println!(
        "device-bench ({} edits, {} backlog orders x {} lines{})",
        args.edits,
        args.orders,
        args.lines,
        if args.quick { ", quick" } else { "" }
    );
    println!("| figure | value | target |");
    println!("|---|---|---|");
    println!(
        "| durable local edit (change quantity, redb commit) p50 / p99 | {:.3} / {:.3} ms | p99 <= 1 ms |",
        samples.ms(0.5).unwrap_or(f64::NAN),
        samples.ms(0.99).unwrap_or(f64::NAN)
    );

    // 2. The offline backlog.
    let mut orders = vec![order];
    let mut changes = args.edits + 2;
    for _ in 0..args.orders {
        let o = till.create_order(eur).await?;
        for l in 0..args.lines {
            till.add_line(
                o,
                LineDraft {
                    name: format!("item {l}"),
                    unit_price: 100 + l as i64,
                    quantity: 1,
                    ..Default::default()
                },
            )
            .await?;
        }
        till.set_status(o, crdt_model::ActiveStatus::InDelivery)
            .await?;
        let total = till.view(o).await?.totals.total;
        till.take_payment(
            o,
            PaymentDraft {
                kind: PaymentKind::Cash,
                amount: total / 2,
                reference: String::new(),
            },
        )
        .await?;
        till.complete_sale(
            o,
            Some(FinalPayment::New(PaymentDraft {
                kind: PaymentKind::Cash,
                amount: total - total / 2,
                reference: String::new(),
            })),
        )
        .await?;
        changes += args.lines + 4;
        orders.push(o);
    }
    let start = Instant::now();
    let connected = connected_at(&till);
    let mut relay = EmbeddedRelay::start(&relay_data, port).await?;
    for o in &orders {
        till.wait_for_status(*o, LocalSyncStatus::Synced, Duration::from_secs(120))
            .await?;
    }
    let took = start.elapsed();
    let since_welcome = since(connected.await?);
    println!(
        "| offline backlog synced to a fresh relay ({} orders, {} changes): from relay start / from the till's welcome | {:.2} s / {:.2} s ({:.0} changes/s) | <= 0.3 s |",
        orders.len(),
        changes,
        took.as_secs_f64(),
        since_welcome.as_secs_f64(),
        changes as f64 / since_welcome.as_secs_f64()
    );

    // 3. A relay restart while the till holds many synced orders.
    for i in 0..args.held {
        let o = till.create_order(eur).await?;
        till.add_line(
            o,
            LineDraft {
                name: format!("held {i}"),
                unit_price: 100,
                quantity: 1,
                ..Default::default()
            },
        )
        .await?;
        orders.push(o);
    }
    for o in &orders {
        till.wait_for_status(*o, LocalSyncStatus::Synced, Duration::from_secs(600))
            .await?;
    }
    relay.stop().await?;
    let sale = till.create_order(eur).await?;
    let start = Instant::now();
    let connected = connected_at(&till);
    relay = EmbeddedRelay::start(&relay_data, port).await?;
    till.wait_for_status(sale, LocalSyncStatus::Synced, Duration::from_secs(120))
        .await?;
    let took = start.elapsed();
    let since_welcome = since(connected.await?);
    println!(
        "| first Synced after a relay restart, till holding {} orders: from relay start / from the till's welcome | {:.3} s / {:.3} s | <= 0.5 s |",
        orders.len(),
        took.as_secs_f64(),
        since_welcome.as_secs_f64()
    );
    println!(
        "\nThe relay runs in this process on the same 2 cores; the till's redb file and the relay's are on the same volume."
    );
    till.close().await;
    relay.stop().await?;
    Ok(())
}
