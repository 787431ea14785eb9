//! `pos-sim`: runs a store of terminals against an embedded relay under injected faults and
//! verifies the result. Exit code 0 when every check passed.

use anyhow::Result;
use clap::Parser;
use e2e::sim::{SimOptions, run};

/// A store of POS terminals under a hostile network, checked end to end.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Terminals per store.
    #[arg(long, default_value_t = 4)]
    terminals: usize,
    /// Stores.
    #[arg(long, default_value_t = 1)]
    stores: usize,
    /// Orders each terminal opens.
    #[arg(long, default_value_t = 25)]
    orders: usize,
    /// Seed of the cashiers' choices and of the fault schedule. A run is real concurrency on
    /// real sockets and clocks, so the same seed makes the same choices but not the same
    /// interleaving: counts in the report may differ from run to run; the checks may not.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability of a fault every 100 ms (cut, lost answer, offline period, relay restart);
    /// with a non-zero rate each till also restarts its app now and then.
    #[arg(long, default_value_t = 0.3)]
    fault_rate: f64,
    /// Mean cashier think time between actions, ms (0: flat out).
    #[arg(long, default_value_t = 40)]
    pace_ms: u64,
    /// Use a running relay at this address (host:port) instead of an embedded one; needs
    /// --admin-token. Relay restarts are not injected then.
    #[arg(long, requires = "admin_token")]
    relay: Option<std::net::SocketAddr>,
    /// Admin token of the relay given with --relay (printed by its first start).
    #[arg(long, env = "RELAY_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Keep the records in this PostgreSQL database (postgres://...; a fresh schema, dropped
    /// at the end) and run --relays relay processes on it; the fault injector SIGKILLs them.
    #[arg(long, conflicts_with = "relay")]
    store: Option<String>,
    /// Relay processes on the --store database (every till knows them all).
    #[arg(long, default_value_t = 1, requires = "store")]
    relays: usize,
    /// Only print the report.
    #[arg(long)]
    quiet: bool,
}

/// The `relay-proc` binary next to this one (the relay processes of `--store`).
fn relay_proc() -> Result<Option<std::path::PathBuf>> {
    let bin = std::env::current_exe()?.with_file_name("relay-proc");
    Ok(bin.exists().then_some(bin))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let opts = SimOptions {
        terminals: args.terminals,
        stores: args.stores,
        orders: args.orders,
        seed: args.seed,
        fault_rate: args.fault_rate,
        pace_ms: args.pace_ms,
        relay: args.relay.zip(args.admin_token),
        store: args.store.clone(),
        relays: args.relays,
        relay_bin: relay_proc()?,
        verbose: !args.quiet,
    };
    if opts.store.is_some() && opts.relay_bin.is_none() {
        anyhow::bail!(
            "--store runs the relays as processes: build them first with \
             `cargo build --release -p e2e --bin relay-proc` (next to pos-sim)"
        );
    }
    if !args.quiet {
        eprintln!(
            "pos-sim: {} store(s) x {} terminals, {} orders each, seed {}, fault rate {}{}",
            opts.stores,
            opts.terminals,
            opts.orders,
            opts.seed,
            opts.fault_rate,
            match &opts.store {
                Some(_) => format!(", {} relay processes on PostgreSQL", opts.relays),
                None => String::new(),
            }
        );
    }
    let report = runtime.block_on(run(opts))?;
    print!("{}", report.render());
    if !report.passed() {
        std::process::exit(1);
    }
    Ok(())
}
