//! An embedded relay that can be stopped and restarted in place, and helpers to talk to its
//! HTTP API.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use crdt_model::{DeviceId, StoreId};
use relay_server::RelayConfig;
use relay_server::store::RelayStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running relay: how to stop it, and its task.
type Running = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), relay_server::RelayError>>,
);

/// A relay running in this process on a fixed port, restartable on the same data directory.
pub struct EmbeddedRelay {
    data: PathBuf,
    /// The relay's address (stable across restarts).
    pub addr: SocketAddr,
    store: Option<Arc<RelayStore>>,
    running: Option<Running>,
    /// An admin token for the HTTP API.
    pub admin: String,
}

impl EmbeddedRelay {
    /// Opens `data` and serves on `127.0.0.1:port` (0 picks a port).
    pub async fn start(data: &Path, port: u16) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let store = Arc::new(RelayStore::open(data)?);
        let admin = store.add_admin_token(None, "pos-sim", 0)?;
        let mut me = Self {
            data: data.to_path_buf(),
            addr,
            store: None,
            running: None,
            admin,
        };
        me.serve(listener, store);
        Ok(me)
    }

    fn serve(&mut self, listener: tokio::net::TcpListener, store: Arc<RelayStore>) {
        let config = RelayConfig {
            data: self.data.clone(),
            ..RelayConfig::default()
        };
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(relay_server::server::serve_store(
            config,
            Arc::clone(&store),
            listener,
            async move {
                let _ = rx.await;
            },
        ));
        self.store = Some(store);
        self.running = Some((stop, task));
    }

    /// The relay's store (while running).
    pub fn store(&self) -> Result<&Arc<RelayStore>> {
        self.store.as_ref().context("relay is stopped")
    }

    /// Provisions a device; returns its id and token.
    pub fn provision(&self, store: &StoreId, name: &str) -> Result<(DeviceId, String)> {
        let (rec, token) = self.store()?.add_device(store, name, 0)?;
        Ok((rec.device, token))
    }

    /// Stops gracefully (flush, bye) and releases the data directory.
    pub async fn stop(&mut self) -> Result<()> {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            task.await??;
        }
        self.store = None;
        Ok(())
    }

    /// Stops and starts again on the same port and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await?;
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let store = Arc::new(RelayStore::open(&self.data)?);
        self.serve(listener, store);
        Ok(())
    }
}

/// One HTTP/1.1 request to a local server; returns (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<&str>,
) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status: u16 = text.get(9..12).context("short HTTP answer")?.parse()?;
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Ok((status, body))
}

fn dechunk(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail.get(n + 2..).unwrap_or("");
    }
    out
}

/// GET a JSON document from the relay's API.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    addr: SocketAddr,
    path: &str,
    token: &str,
) -> Result<T> {
    let (status, body) = http(addr, "GET", path, token, None).await?;
    if status != 200 {
        bail!("GET {path}: {status} {body}");
    }
    Ok(serde_json::from_str(&body)?)
}
