//! `relay-proc`: the relay as a plain child process for the e2e tests that SIGKILL it (the
//! `relay-server` binary belongs to another package, whose binaries these tests cannot name).
//! Serves `--data` on `--listen` until killed or interrupted.

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
    #[arg(long)]
    data: std::path::PathBuf,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let config = RelayConfig {
        data: args.data,
        ..RelayConfig::default()
    };
    relay_server::run(config, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    Ok(())
}
