//! TLS for the relay's port: a rustls acceptor from PEM files, and a listener that hands axum
//! streams whose handshake has completed (slow handshakes never block the accept loop).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::admission::{Acceptor, Guarded, Handshake, PeerInfo};
use crate::error::RelayError;

/// How long a client has to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Certificate chain and private key, PEM files.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

const CERT: &str = "certificate";
const KEY: &str = "private key";

/// [`RelayError::Tls`] for a TLS file, in words an operator can act on.
fn bad(what: &'static str, path: &Path, e: impl std::fmt::Display) -> RelayError {
    let raw = e.to_string();
    let reason = if raw.contains("no items found") {
        format!("no PEM-encoded {what} in the file")
    } else {
        raw
    };
    RelayError::Tls {
        what,
        path: path.to_path_buf(),
        reason,
    }
}

/// Builds the rustls acceptor (TLS 1.2 and 1.3, ring crypto).
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, RelayError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| bad(CERT, &files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(CERT, &files.cert, e))?;
    if certs.is_empty() {
        return Err(bad(CERT, &files.cert, "no items found"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| bad(KEY, &files.key, e))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(CERT, &files.cert, e))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| {
        bad(
            KEY,
            &files.key,
            format!("does not match the certificate ({e})"),
        )
    })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener yielding TLS streams whose handshake succeeded. Sockets come from the
/// [`Acceptor`] (socket limit, handshake deadline, which also bounds the TLS handshake).
pub(crate) struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<Guarded<TcpStream>>, PeerInfo)>,
    addr: PeerInfo,
}

impl TlsListener {
    pub(crate) fn new(tcp: Acceptor, acceptor: TlsAcceptor) -> Self {
        let addr = PeerInfo {
            addr: tcp
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
            handshake: Arc::new(Handshake::disarmed()),
        };
        let (tx, ready) = mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = tcp.accept().await;
                if tx.is_closed() {
                    return;
                }
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %peer.addr, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(peer = %peer.addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        Self { ready, addr }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<Guarded<TcpStream>>;
    type Addr = PeerInfo;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(x) => x,
            // The accept task ended: nothing more will come; graceful shutdown ends the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr.clone())
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for PeerInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        stream.remote_addr().clone()
    }
}
