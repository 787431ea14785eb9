//! `pos-terminal`: one till as its own process, for tests that kill it (SIGKILL) mid-operation.
//!
//! `sell` opens an order, adds a line and charges a card through a file-backed terminal; with
//! `--hang` the terminal takes the money and never answers, so the test can kill the process
//! between "charge sent" and "result recorded". `recover` reopens the same local store,
//! reports the pending charges, reconciles them with the terminal, completes the sale, waits
//! until the relay has receipted it, and prints a JSON summary.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use crdt_model::{Currency, DeviceId, LineDraft, StoreId};
use e2e::file_terminal::{FileMode, FileTerminal};
use replicator::{Config, Identity, LocalSyncStatus, Replicator};

/// One till as a process.
#[derive(Parser, Debug)]
struct Args {
    /// The till's redb file.
    #[arg(long)]
    data: PathBuf,
    /// The card terminal's ledger file.
    #[arg(long)]
    ledger: PathBuf,
    /// Relay WebSocket URL; repeat it for relays serving the same data, tried in turn when one
    /// is unreachable (the first is preferred).
    #[arg(long, required = true)]
    relay: Vec<String>,
    /// Device id.
    #[arg(long)]
    device: String,
    /// Store id.
    #[arg(long)]
    store: String,
    /// Device token.
    #[arg(long)]
    token: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Open an order and charge it by card.
    Sell {
        /// Amount in minor units.
        #[arg(long)]
        amount: i64,
        /// The terminal takes the money and never answers.
        #[arg(long)]
        hang: bool,
    },
    /// Reconcile pending charges, complete the sale, wait for the relay.
    Recover,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let mut relays = args.relay.clone().into_iter();
    let relay_url = relays.next().context("at least one --relay is needed")?;
    let identity = Identity {
        device: args.device.parse::<DeviceId>()?,
        store: StoreId::new(args.store.clone())?,
        epoch: 1,
        relay_url,
        fallback_urls: relays.collect(),
        token: args.token.clone(),
    };
    let mode = match &args.command {
        Cmd::Sell { hang: true, .. } => FileMode::ApproveThenHang,
        _ => FileMode::Approve,
    };
    let terminal = Arc::new(FileTerminal::new(&args.ledger, mode));
    let till = Replicator::open(&args.data, identity, Config::default(), terminal).await?;
    match args.command {
        Cmd::Sell { amount, .. } => {
            let order = till.create_order(Currency::new("EUR")?).await?;
            till.add_line(
                order,
                LineDraft {
                    name: "Menu".into(),
                    unit_price: amount,
                    quantity: 1,
                    ..Default::default()
                },
            )
            .await?;
            println!("order {order}");
            let result = till.charge_card(order, amount).await?;
            println!("charged {result:?}");
        }
        Cmd::Recover => {
            let pending = till.pending_charges().await;
            let order = pending
                .first()
                .map(|(o, _)| *o)
                .context("no pending charge to recover")?;
            let reconciled = till.reconcile().await?;
            till.complete_sale(order, None).await?;
            till.wait_for_status(order, LocalSyncStatus::Synced, Duration::from_secs(20))
                .await?;
            let view = till.view(order).await?;
            let summary = serde_json::json!({
                "order": order,
                "pending_before": pending.len(),
                "reconciled": format!("{reconciled:?}"),
                "paid": view.totals.paid,
                "status": view.status,
                "payments": view.payments.len(),
            });
            println!("{summary}");
            till.close().await;
        }
    }
    Ok(())
}
