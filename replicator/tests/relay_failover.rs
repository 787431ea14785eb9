//! The driver with several relays, over real sockets: the first relay of the list is a closed
//! port, the second and third are fake relays (a WebSocket listener that answers `hello` with
//! `welcome`). The device reaches the second; when that one is killed (its socket and listener
//! gone without a close frame), the device is on the third well under a second later, with
//! its token and its device id.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use crdt_model::wire::{ClientFrame, RelayFrame, Version};
use crdt_model::*;
use futures_util::{SinkExt, StreamExt};
use replicator::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const TOKEN: &str = "dev_failover";

/// Accepts one device on `listener`, checks its token, reads its `hello` and answers
/// `welcome`, like a relay; the open socket and the device id the hello named.
async fn serve_one(listener: &TcpListener) -> (WebSocketStream<TcpStream>, String) {
    let (tcp, _) = listener.accept().await.unwrap();
    // The signature (and its large error type) is tungstenite's handshake callback.
    #[allow(clippy::result_large_err)]
    let check_token = |req: &Request, resp: Response| {
        let auth = req.headers().get("Authorization").unwrap();
        assert_eq!(auth.to_str().unwrap(), format!("Bearer {TOKEN}"));
        Ok(resp)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, check_token)
        .await
        .unwrap();
    let device = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => match ClientFrame::decode(&b).unwrap() {
                ClientFrame::Hello { device, .. } => break device,
                other => panic!("expected hello, got {other:?}"),
            },
            Some(Ok(_)) => {}
            other => panic!("the device went away before hello: {other:?}"),
        }
    };
    let welcome = RelayFrame::Welcome {
        protocol: Version::CURRENT,
        relay: "018bcfe5-73b8-76c9-9a3b-782b29572a06".into(),
        store: "s1".into(),
        feed_seq: 0,
        data: None,
    };
    ws.send(Message::Binary(welcome.encode().into()))
        .await
        .unwrap();
    (ws, device)
}

async fn wait_online(till: &Replicator) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !till.is_online().await {
        assert!(Instant::now() < deadline, "the device never came online");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_relay_is_skipped_and_a_killed_one_replaced_within_a_second() {
    // A port nothing listens on: bound, then released.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let second = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let third = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = |addr: std::net::SocketAddr| format!("ws://{addr}/v1/sync");
    let mut rng = SplitMix64::new(11);
    let device = DeviceId::generate(Timestamp(0), &mut rng);
    let identity = Identity {
        device,
        store: StoreId::new("s1").unwrap(),
        epoch: 1,
        relay_url: url(dead),
        fallback_urls: vec![
            url(second.local_addr().unwrap()),
            url(third.local_addr().unwrap()),
        ],
        token: TOKEN.into(),
    };
    // The default backoff: what a till in a shop gets.
    let till = Replicator::with_store(
        Arc::new(MemoryStore::new()),
        identity,
        Config::default(),
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await
    .unwrap();

    // The preferred relay is down: the device is on the second one soon after it starts.
    let started = Instant::now();
    let (ws, hello_from) = tokio::time::timeout(Duration::from_secs(5), serve_one(&second))
        .await
        .expect("the device never reached the second relay");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(hello_from, device.to_string());
    wait_online(&till).await;

    // The second relay is killed: no close frame, and nothing listens there any more.
    drop(ws);
    drop(second);
    let killed = Instant::now();
    let (_ws, hello_from) = tokio::time::timeout(Duration::from_secs(5), serve_one(&third))
        .await
        .expect("the device never reached the third relay");
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(1), "a dead relay cost {took:?}");
    assert_eq!(hello_from, device.to_string());
    wait_online(&till).await;
    till.close().await;
}
