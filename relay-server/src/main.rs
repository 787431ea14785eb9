//! `relay-server` command line: serve, provision devices and tokens, back up, check.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use relay_server::backend::{Backend, StoreLocation};
use relay_server::client::{AdminClient, RelayUrl};
use relay_server::hub::{HubConfig, now_ms};
use relay_server::store::RelayStore;
use relay_server::{RelayConfig, RelayError};

/// mimalloc instead of glibc malloc: with glibc's per-thread arenas the relay's RSS kept
/// growing while its order cache churned (relay-scale: +920 MiB after 100,000 distinct orders
/// fetched through a 10,000-order cache; flat with MALLOC_ARENA_MAX=1), so freed memory was
/// spread over arenas rather than reused.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The POS relay: validates, persists (redb) and fans out orders.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve devices (WebSocket at /v1/sync) and the back-office HTTP API on one port.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "RELAY_LISTEN", default_value = "127.0.0.1:7400")]
        listen: SocketAddr,
        /// Data directory (created if missing).
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data")]
        data: PathBuf,
        /// Where the records are, instead of --data: a PostgreSQL URL
        /// (postgres://USER@HOST:PORT/DB) shared by any number of relays, or a directory.
        #[arg(long, env = "RELAY_STORE")]
        store: Option<String>,
        #[command(flatten)]
        pg: PgArgs,
        /// Document worker tasks.
        #[arg(long, env = "RELAY_WORKERS", default_value_t = 2)]
        workers: usize,
        /// Orders kept in memory; idle ones beyond this are dropped and reloaded on demand.
        #[arg(long, env = "RELAY_CACHE_ORDERS", default_value_t = 10_000)]
        cache_orders: usize,
        /// redb page cache, MiB (the hot orders themselves are cached as documents).
        #[arg(long, env = "RELAY_REDB_CACHE_MIB", default_value_t = 64)]
        redb_cache_mib: usize,
        /// Concurrent device connections of the whole relay (lowered at start to fit the
        /// open-file limit, keeping a reserve for files and the HTTP API).
        #[arg(long, env = "RELAY_MAX_CONNECTIONS", default_value_t = 20_000)]
        max_connections: usize,
        /// Concurrent connections of one device.
        #[arg(long, env = "RELAY_MAX_DEVICE_CONNECTIONS", default_value_t = 4)]
        max_device_connections: usize,
        /// Concurrent device connections of one store.
        #[arg(long, env = "RELAY_MAX_STORE_CONNECTIONS", default_value_t = 64)]
        max_store_connections: usize,
        /// Seconds from TCP accept to the end of the handshake (request headers, or upgrade
        /// plus `hello`); also the idle time allowed between HTTP requests.
        #[arg(long, env = "RELAY_HANDSHAKE_TIMEOUT_SECS", default_value_t = 5)]
        handshake_timeout_secs: u64,
        /// Seconds from SIGTERM/SIGINT to exit, whatever the workers are doing.
        #[arg(long, env = "RELAY_SHUTDOWN_TIMEOUT_SECS", default_value_t = 10)]
        shutdown_timeout_secs: u64,
        /// Seconds of silence before a device connection is pinged; after three times this
        /// without anything received, it is closed (frees the device's slot).
        #[arg(long, env = "RELAY_KEEPALIVE_SECS", default_value_t = 30)]
        keepalive_secs: u64,
        /// Largest WebSocket message, bytes.
        #[arg(long, env = "RELAY_MAX_FRAME_BYTES", default_value_t = crdt_model_max_frame())]
        max_frame_bytes: usize,
        /// Frames per second one connection may send (burst twice that).
        #[arg(long, env = "RELAY_RATE", default_value_t = 2_000)]
        rate: u32,
        /// TLS certificate chain (PEM); serve wss:// and https:// (needs --tls-key).
        #[arg(long, env = "RELAY_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// TLS private key (PEM).
        #[arg(long, env = "RELAY_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Provision and manage devices.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
        /// Data directory, or the PostgreSQL URL of a relay deployment on a database.
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data", global = true)]
        data: String,
        #[command(flatten)]
        pg: PgArgs,
    },
    /// Create a back-office token (admin, or limited to one store).
    Token {
        /// Limit the token to this store.
        #[arg(long)]
        store: Option<String>,
        /// A name to recognise the token by.
        #[arg(long)]
        name: String,
        /// Replace every operator admin token with this new one (the old ones stop working).
        #[arg(long, conflicts_with = "store")]
        replace: bool,
        /// Data directory, or the PostgreSQL URL of a relay deployment on a database.
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data")]
        data: String,
        #[command(flatten)]
        pg: PgArgs,
    },
    /// Take a consistent copy of the data. Works while the relay serves (through its admin API,
    /// with --relay and --token) or on a stopped relay's data directory.
    Backup {
        /// The backup file to create (must not exist).
        #[arg(long)]
        to: PathBuf,
        /// Data directory (stopped relay).
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data")]
        data: PathBuf,
        /// A running relay: https://HOST:PORT, http://HOST:PORT, or HOST:PORT (plain HTTP).
        /// The file is written by the relay, on the relay's machine.
        #[arg(long)]
        relay: Option<RelayUrl>,
        /// Admin token for --relay.
        #[arg(long, env = "RELAY_ADMIN_TOKEN")]
        token: Option<String>,
        /// PEM certificate(s) to trust for an https:// relay (its self-signed certificate,
        /// or the private CA that signed it) instead of the public authorities.
        #[arg(long, env = "RELAY_CA_CERT", requires = "relay")]
        ca_cert: Option<PathBuf>,
    },
    /// Restore a backup as a stopped relay's data. Nothing any till still holds is lost:
    /// the tills send everything again, and new order numbers wait until every till of a store
    /// has connected (see docs/operations.md, "Back up and restore").
    Restore {
        /// The backup file (from `relay-server backup`).
        #[arg(long)]
        from: PathBuf,
        /// Data directory to restore into (must hold no relay data).
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data")]
        data: PathBuf,
    },
    /// End a store's recovery after a restore without waiting for the tills not heard from
    /// (ones that will never come back); on a running relay use
    /// POST /v1/admin/stores/STORE/recovery/release.
    Release {
        /// The store.
        #[arg(long)]
        store: String,
        /// Data directory (stopped relay).
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data")]
        data: PathBuf,
    },
    /// Verify a data directory: every order loads and passes the model's checks.
    Check {
        /// Data directory.
        #[arg(long, env = "RELAY_DATA", default_value = "relay-data")]
        data: PathBuf,
    },
}

/// PostgreSQL settings (used when the records are in a database).
#[derive(clap::Args, Debug, Clone)]
struct PgArgs {
    /// PostgreSQL connections in this relay's pool.
    #[arg(long, env = "RELAY_PG_POOL", default_value_t = 16, global = true)]
    pg_pool: usize,
    /// PostgreSQL schema holding the relay's tables (created if missing); default: the
    /// server's search_path (public).
    #[arg(long, env = "RELAY_PG_SCHEMA", global = true)]
    pg_schema: Option<String>,
}

#[derive(Subcommand, Debug)]
enum DeviceCommand {
    /// Provision a device; prints its token once (only a hash is stored).
    Add {
        /// The store the device belongs to.
        #[arg(long)]
        store: String,
        /// A name to recognise the device by.
        #[arg(long)]
        name: String,
    },
    /// List devices.
    List {
        /// Only this store's.
        #[arg(long)]
        store: Option<String>,
    },
    /// Revoke a device's token. With --relay, through a running relay's admin API, which also
    /// closes the device's open connections at once.
    Revoke {
        /// Device id.
        device: String,
        /// A running relay: https://HOST:PORT, http://HOST:PORT, or HOST:PORT (plain HTTP).
        #[arg(long)]
        relay: Option<RelayUrl>,
        /// Admin token for --relay.
        #[arg(long, env = "RELAY_ADMIN_TOKEN")]
        token: Option<String>,
        /// PEM certificate(s) to trust for an https:// relay instead of the public authorities.
        #[arg(long, env = "RELAY_CA_CERT", requires = "relay")]
        ca_cert: Option<PathBuf>,
    },
}

const fn crdt_model_max_frame() -> usize {
    crdt_model::wire::MAX_FRAME_BYTES
}

fn open(data: &Path) -> Result<RelayStore> {
    locked_hint(RelayStore::open(data))
}

/// Opens relay data that must exist already (`check`, `backup`): a mistyped path is an
/// error, never a new empty database.
fn open_existing(data: &Path) -> Result<RelayStore> {
    locked_hint(RelayStore::open_existing(data))
}

fn locked_hint<T>(opened: Result<T, RelayError>) -> Result<T> {
    match opened {
        Ok(s) => Ok(s),
        Err(RelayError::Locked(p)) => bail!(
            "{} is in use by a running relay. Stop it, or use its HTTP admin API \
             (POST /v1/admin/devices, POST /v1/admin/devices/ID/revoke, POST /v1/admin/backup) \
             with an admin token (or --relay URL --token TOKEN)",
            p.display()
        ),
        Err(e) => Err(e.into()),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            listen,
            data,
            store,
            pg,
            workers,
            cache_orders,
            redb_cache_mib,
            max_connections,
            max_device_connections,
            max_store_connections,
            handshake_timeout_secs,
            shutdown_timeout_secs,
            keepalive_secs,
            max_frame_bytes,
            rate,
            tls_cert,
            tls_key,
        } => {
            let config = RelayConfig {
                data,
                hub: HubConfig {
                    workers,
                    cache_orders,
                },
                max_frame_bytes,
                max_connections,
                max_device_connections,
                max_store_connections,
                handshake_timeout: Duration::from_secs(handshake_timeout_secs.max(1)),
                shutdown_timeout: Duration::from_secs(shutdown_timeout_secs.max(1)),
                keepalive: Duration::from_secs(keepalive_secs.max(1)),
                rate_per_sec: rate,
                tls: tls_cert
                    .zip(tls_key)
                    .map(|(cert, key)| relay_server::tls::TlsFiles { cert, key }),
                redb_cache_bytes: redb_cache_mib.saturating_mul(1024 * 1024),
            };
            let bound = config.shutdown_timeout;
            let stop = stop_signal(bound)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let location = store.map_or_else(
                || StoreLocation::Dir(config.data.clone()),
                |s| StoreLocation::parse(&s),
            );
            let served = runtime.block_on(serve(config, location, &pg, listen, async move {
                let _ = stop.await;
            }));
            // Blocking tasks still running (a commit past the bound) do not hold the exit.
            runtime.shutdown_timeout(Duration::from_millis(500));
            served
        }
        Command::Device {
            command:
                DeviceCommand::Revoke {
                    device,
                    relay: Some(url),
                    token,
                    ca_cert,
                },
            ..
        } => {
            let token = token.context("--token (or RELAY_ADMIN_TOKEN) is required with --relay")?;
            let client = AdminClient::new(url, token, ca_cert.as_deref())?;
            let path = format!("/v1/admin/devices/{device}/revoke");
            let answer = client.post(&path, &serde_json::json!({}))?;
            println!("{answer}");
            Ok(())
        }
        Command::Device { command, data, pg } => block_on(async move {
            let store = open_backend(&StoreLocation::parse(&data), &pg).await?;
            match command {
                DeviceCommand::Add { store: s, name } => {
                    let sid = crdt_model::StoreId::new(s)?;
                    let (rec, token) = store.add_device(sid, name, now_ms()).await?;
                    println!(
                        "device {} ({}) in store {}",
                        rec.device, rec.name, rec.store
                    );
                    println!("token (shown once): {token}");
                }
                DeviceCommand::List { store: s } => {
                    let filter = s.map(crdt_model::StoreId::new).transpose()?;
                    for d in store.list_devices(filter).await? {
                        let state = if d.revoked { "revoked" } else { "active" };
                        println!("{}  {:<16} {:<24} {state}", d.device, d.store, d.name);
                    }
                }
                DeviceCommand::Revoke { device, .. } => {
                    store.revoke_device(device.parse()?).await?;
                    println!("revoked {device}");
                }
            }
            Ok(())
        }),
        Command::Token {
            store: s,
            name,
            replace,
            data,
            pg,
        } => block_on(async move {
            let store = open_backend(&StoreLocation::parse(&data), &pg).await?;
            if replace {
                let (token, n) = store.rotate_admin_token(name, now_ms()).await?;
                println!("replaced {n} admin token(s); they no longer work");
                println!("token (shown once): {token}");
                return Ok(());
            }
            let sid = s.map(crdt_model::StoreId::new).transpose()?;
            let token = store.add_admin_token(sid, name, now_ms()).await?;
            println!("token (shown once): {token}");
            Ok(())
        }),
        Command::Backup {
            to,
            data,
            relay,
            token,
            ca_cert,
        } => match relay {
            Some(url) => {
                let token =
                    token.context("--token (or RELAY_ADMIN_TOKEN) is required with --relay")?;
                let client = AdminClient::new(url, token, ca_cert.as_deref())?;
                let answer = client.post("/v1/admin/backup", &serde_json::json!({ "to": to }))?;
                println!("{answer}");
                Ok(())
            }
            None => {
                let n = open_existing(&data)?.backup_to(&to)?;
                println!("backed up {n} orders to {}", to.display());
                Ok(())
            }
        },
        Command::Restore { from, data } => {
            let (_, report) = locked_hint(RelayStore::restore(&from, &data, now_ms()))?;
            println!(
                "restored {} orders from {} into {}",
                report.orders,
                from.display(),
                data.display()
            );
            println!(
                "new data id {}: every till sends what it holds again",
                report.data_id
            );
            for (store, devices) in &report.stores {
                if *devices > 0 {
                    println!(
                        "store {store}: new order numbers wait until its {devices} till(s) have \
                         connected (or: relay-server release --store {store})"
                    );
                }
            }
            Ok(())
        }
        Command::Release { store, data } => {
            let sid = crdt_model::StoreId::new(store)?;
            match open_existing(&data)?.release_recovery(&sid)? {
                Some(pending) if pending.is_empty() => println!("store {sid}: released"),
                Some(pending) => {
                    println!(
                        "store {sid}: released; {} till(s) never heard from:",
                        pending.len()
                    );
                    for d in pending {
                        println!("  {d}");
                    }
                }
                None => println!("store {sid} is not recovering"),
            }
            Ok(())
        }
        Command::Check { data } => {
            // Read-only: checking never writes to the data it checks.
            let report = locked_hint(RelayStore::check_read_only(&data))?;
            for w in &report.warnings {
                println!("warning: {w}");
            }
            for e in &report.errors {
                println!("error: {e}");
            }
            println!(
                "{} orders checked, {} errors, {} warnings",
                report.orders,
                report.errors.len(),
                report.warnings.len()
            );
            if report.errors.is_empty() {
                Ok(())
            } else {
                bail!("data directory has errors")
            }
        }
    }
}

/// Runs `f` on a small runtime of its own (for commands that talk to a database).
fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Opens the records at `location`: the redb file in a directory, or a PostgreSQL database
/// (migrated on connect).
async fn open_backend(location: &StoreLocation, pg: &PgArgs) -> Result<Backend> {
    match location {
        StoreLocation::Dir(dir) => Ok(Backend::Redb(Arc::new(open(dir)?))),
        StoreLocation::Postgres(url) => {
            let mut options = relay_server::pg::PgOptions::new(url.clone(), pg.pg_pool);
            options.schema.clone_from(&pg.pg_schema);
            let store = relay_server::pg::PgStore::connect_with(&options)
                .await
                .with_context(|| format!("cannot use the PostgreSQL store at {location}"))?;
            Ok(Backend::Postgres(Arc::new(store)))
        }
    }
}

async fn serve(
    config: RelayConfig,
    location: StoreLocation,
    pg: &PgArgs,
    listen: SocketAddr,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = open_backend(&location, pg).await?;
    if let Some(taken) = store.backup_taken_at()? {
        bail!(
            "{location} is a backup (taken at {taken} ms since the epoch), not relay data: \
             restore it with `relay-server restore --from FILE --data DIR`, which makes sure \
             nothing the tills hold is lost"
        );
    }
    tracing::info!(store = %location, "records");
    // Everything that can refuse the start comes before the admin token is made: a start that
    // fails (port in use, a bad TLS key) must not print a "shown once" token nobody keeps.
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    if let Some(files) = &config.tls {
        relay_server::tls::acceptor(files).context("cannot use the TLS certificate or key")?;
    }
    // Whenever the relay has no admin token (also when devices were provisioned before the
    // first start), it makes one.
    if !store.has_admin_token().await? {
        let token = store
            .add_admin_token(None, "initial".into(), now_ms())
            .await?;
        eprintln!("No admin token yet: created one (shown once): {token}");
        eprintln!(
            "Provision a terminal with: relay-server device add --store STORE --name NAME (relay stopped),"
        );
        eprintln!("or POST /v1/admin/devices with the admin token while it runs.");
    }
    relay_server::server::serve_store(config, store, listener, stop).await?;
    Ok(())
}

/// Extra time after the shutdown bound before the process exits on its own.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// Waits for SIGTERM/SIGINT on a thread of its own (so busy runtime threads cannot delay it)
/// and resolves the returned channel; if the relay has not exited `bound` plus a grace after
/// the signal, the process exits anyway.
fn stop_signal(bound: Duration) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("relay-signals".into())
        .spawn(move || {
            runtime.block_on(shutdown_signal());
            let _ = tx.send(());
            std::thread::sleep(bound + EXIT_GRACE);
            eprintln!("relay did not stop within {bound:?} of the signal; exiting now");
            std::process::exit(1);
        })?;
    Ok(rx)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
