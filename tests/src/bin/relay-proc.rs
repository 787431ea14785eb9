//! `relay-proc`: the relay as a plain child process for the e2e tests that SIGKILL it (the
//! `relay-server` binary belongs to another package, whose binaries these tests cannot name).
//! Serves `--data` (or, with `--store postgres://...`, a PostgreSQL schema shared with other
//! relay processes) on `--listen` until killed or interrupted.

use anyhow::Result;
use clap::Parser;
use relay_server::RelayConfig;

/// The relay, for tests.
#[derive(Parser, Debug)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: std::net::SocketAddr,
    /// Data directory.
    #[arg(long, default_value = "relay-data")]
    data: std::path::PathBuf,
    /// A PostgreSQL URL: keep the records there instead of in --data.
    #[arg(long)]
    store: Option<String>,
    /// The PostgreSQL schema (with --store).
    #[arg(long)]
    pg_schema: Option<String>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let config = RelayConfig {
        data: args.data,
        ..RelayConfig::default()
    };
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    match args.store {
        Some(url) => {
            let mut options = relay_server::pg::PgOptions::new(url, 8);
            options.schema = args.pg_schema;
            let store = relay_server::pg::PgStore::connect_with(&options).await?;
            relay_server::server::serve_store(config, std::sync::Arc::new(store), listener, stop)
                .await?;
        }
        None => relay_server::run(config, listener, stop).await?,
    }
    Ok(())
}
