//! The relay over TLS (`wss://`), with a certificate generated in the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crdt_model::wire::{ClientFrame, RelayFrame, Version};
use crdt_model::{StoreId, Timestamp};
use futures_util::{SinkExt, StreamExt};
use relay_server::RelayConfig;
use relay_server::store::RelayStore;
use relay_server::tls::TlsFiles;
use rustls::pki_types::ServerName;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn devices_sync_over_tls_and_plain_tcp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let files = TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    std::fs::write(&files.cert, cert.cert.pem()).unwrap();
    std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();

    let store = Arc::new(RelayStore::open(&dir.path().join("data")).unwrap());
    let (device, token) = store
        .add_device(&StoreId::new("s1").unwrap(), "till", Timestamp(0).0)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = RelayConfig {
        data: dir.path().join("data"),
        tls: Some(files),
        ..RelayConfig::default()
    };
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(relay_server::server::serve_store(
        config,
        Arc::clone(&store),
        listener,
        async move {
            let _ = rx.await;
        },
    ));

    // A client that trusts the generated certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut req = "wss://localhost/v1/sync".into_client_request().unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let hello = ClientFrame::Hello {
        protocol: Version::CURRENT,
        device: device.device.to_string(),
        agent: "tls".into(),
        feed_since: 0,
        highest_number: None,
    };
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    let frame = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Binary(b) = frame else {
        panic!("{frame:?}")
    };
    assert!(matches!(
        RelayFrame::decode(&b).unwrap(),
        RelayFrame::Welcome { .. }
    ));

    // Plain WebSocket to the TLS port does not get through.
    let plain = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/sync")),
    )
    .await;
    assert!(
        matches!(plain, Ok(Err(_)) | Err(_)),
        "plain TCP must not reach the relay"
    );

    // A certificate file that is not PEM is a typed error at start.
    let bad = TlsFiles {
        cert: dir.path().join("key.pem"),
        key: dir.path().join("key.pem"),
    };
    assert!(relay_server::tls::acceptor(&bad).is_err());

    drop(ws);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}
