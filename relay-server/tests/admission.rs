//! Admission (issue 11): one device cannot take the relay's connections, sockets that never
//! finish their handshake are closed, `/healthz` answers when device slots are exhausted, a
//! revoked device's open connection is closed at once, HTTP bodies are read only after
//! authentication, and SIGTERM stops a busy relay within its bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use crdt_model::wire::{ClientFrame, RelayFrame, Version, codes};
use crdt_model::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const BIN: &str = env!("CARGO_BIN_EXE_relay-server");

/// Opens a device connection and says hello; on refusal, the HTTP status and the error code of
/// the JSON body. `Err((0, ..))` if the relay did not answer within 3 s.
async fn try_connect(addr: SocketAddr, device: DeviceId, token: &str) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{addr}/v1/sync")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let connect = tokio_tungstenite::connect_async(req);
    let mut ws = match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            let body = resp.body().clone().unwrap_or_default();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let code = v["error"]["code"].as_str().unwrap_or("").to_owned();
            return Err((resp.status().as_u16(), code));
        }
        Ok(Err(e)) => return Err((0, e.to_string())),
        Err(_) => return Err((0, "timed out".into())),
    };
    let hello = ClientFrame::Hello {
        protocol: Version::CURRENT,
        device: device.to_string(),
        agent: "test".into(),
        feed_since: 0,
        highest_number: None,
    };
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .map_err(|e| (0, e.to_string()))?;
    match recv_frame(&mut ws).await {
        Some(RelayFrame::Welcome { .. }) => Ok(ws),
        other => Err((0, format!("{other:?}"))),
    }
}

/// A raw HTTP exchange with a deadline: the status and the body, or `None` if no answer.
async fn http_within(addr: SocketAddr, request: String, within: Duration) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the head and a Content-Length body are in (the server may keep the
        // connection open).
        loop {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&out).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if body.len() >= len {
                    break;
                }
            }
        }
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text.get(9..12)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|x| x.1.to_owned())?;
        Some((status, body))
    };
    tokio::time::timeout(within, exchange).await.ok().flatten()
}

fn add_tea(c: &mut Client, order: &mut Order) {
    let at = c.tick();
    order
        .add_line(
            at,
            &mut c.rng,
            LineDraft {
                name: "Tea".into(),
                unit_price: 300,
                quantity: 1,
                ..Default::default()
            },
        )
        .unwrap();
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
}

fn code_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["error"]["code"].as_str().unwrap_or("").to_owned()
}

/// Whether the peer closed `s` within `within` (EOF or error), without us sending anything.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn one_device_gets_its_share_and_other_stores_still_connect() {
    let relay = TestRelay::start_with(tempfile::tempdir().unwrap(), |c| {
        c.max_store_connections = 6;
    })
    .await;
    let (a1, ta1) = relay.device("s1", "till 1");
    let (a2, ta2) = relay.device("s1", "till 2");
    let (b, tb) = relay.device("s2", "till");
    // The default share of one device is 4 connections; the fifth is refused with a code.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(
            try_connect(relay.addr, a1, &ta1)
                .await
                .expect("within share"),
        );
    }
    assert_eq!(
        try_connect(relay.addr, a1, &ta1).await.err(),
        Some((429, "too_many_device_connections".to_owned()))
    );
    // The store's share (6 here) bounds the store's devices together.
    for _ in 0..2 {
        held.push(
            try_connect(relay.addr, a2, &ta2)
                .await
                .expect("within store share"),
        );
    }
    assert_eq!(
        try_connect(relay.addr, a2, &ta2).await.err(),
        Some((429, "too_many_store_connections".to_owned()))
    );
    // A device of another store still connects, and syncs.
    let mut c = Client::connect(relay.addr, b, &tb).await;
    let mut order = c.create("s2");
    c.sync_until_receipted(&mut order).await;
    // A connection that ends frees its slot.
    drop(held.pop());
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(try_connect(relay.addr, a2, &ta2).await.is_ok());
    let (_, metrics) = relay.http("GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("relay_connections_refused_total{code=\"too_many_device_connections\"} 1"),
        "{metrics}"
    );
    relay.stop().await;
}

#[tokio::test]
async fn dead_connections_free_their_device_slots() {
    // A till whose network dropped four times leaves four connections the relay cannot see
    // closing; they must not lock it out.
    let relay = TestRelay::start_with(tempfile::tempdir().unwrap(), |c| {
        c.keepalive = Duration::from_millis(300);
    })
    .await;
    let (dev, token) = relay.device("s1", "till");
    // Not read from: their pings are never answered, as with a dead peer.
    let mut dead = Vec::new();
    for _ in 0..4 {
        dead.push(try_connect(relay.addr, dev, &token).await.unwrap());
    }
    assert_eq!(
        try_connect(relay.addr, dev, &token)
            .await
            .err()
            .map(|e| e.0),
        Some(429)
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A live connection (read from, so it answers pings) stays open past the same time.
    let mut live = try_connect(relay.addr, dev, &token)
        .await
        .expect("slots freed");
    let quiet = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            match live.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return other,
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "the live connection ended: {quiet:?}");
    live.send(Message::Binary(
        ClientFrame::Ping { nonce: 3 }.encode().into(),
    ))
    .await
    .unwrap();
    assert!(matches!(
        recv_frame(&mut live).await,
        Some(RelayFrame::Pong { nonce: 3 })
    ));
    drop(dead);
    relay.stop().await;
}

#[tokio::test]
async fn sockets_that_never_finish_their_handshake_are_closed() {
    let relay = TestRelay::start_with(tempfile::tempdir().unwrap(), |c| {
        c.handshake_timeout = Duration::from_secs(1);
    })
    .await;
    let (dev, token) = relay.device("s1", "till");
    // A TCP connection that never sends a byte.
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    // One that sends half a request head.
    let mut partial = TcpStream::connect(relay.addr).await.unwrap();
    partial
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // One that upgrades but never says hello.
    let mut req = format!("ws://{}/v1/sync", relay.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    let (mut mute, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
    assert!(closed_within(&mut partial, Duration::from_secs(3)).await);
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match mute.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "a WebSocket without hello stayed open");
    assert!(started.elapsed() < Duration::from_secs(4));
    // A device that completes its handshake in time is not affected, even when idle longer.
    let mut c = Client::connect(relay.addr, dev, &token).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut order = c.create("s1");
    c.sync_until_receipted(&mut order).await;
    // Nor is an HTTP client whose request arrives in time.
    let (status, metrics) = relay.http("GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    let timeouts: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("relay_handshake_timeouts_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(timeouts >= 2, "{metrics}");
    relay.stop().await;
}

#[tokio::test]
async fn a_revoked_device_is_closed_at_once_and_refused_after() {
    let relay = TestRelay::start().await;
    let (a, ta) = relay.device("s1", "till a");
    let (w, tw) = relay.device("s1", "witness");
    let admin = relay.admin();
    let store_admin = relay
        .store
        .add_admin_token(Some(&StoreId::new("s2").unwrap()), "other store", T0)
        .unwrap();
    let mut ca = Client::connect(relay.addr, a, &ta).await;
    let mut witness = Client::connect(relay.addr, w, &tw).await;
    let mut order = ca.create("s1");
    ca.sync_until_receipted(&mut order).await;
    let path = format!("/v1/admin/devices/{a}/revoke");
    // Another store's admin does not see the device; no token is unauthorized.
    let (status, _) = relay.http("POST", &path, Some(&store_admin), None).await;
    assert_eq!(status, 404);
    let (status, body) = relay.http("POST", &path, None, None).await;
    assert_eq!((status, code_of(&body).as_str()), (401, "unauthorized"));
    let (status, body) = relay.http("POST", &path, Some(&admin), None).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"closed_connections\":1"), "{body}");
    // The open connection gets a fatal `revoked` error.
    let frame = ca
        .wait_for(None, |f| matches!(f, RelayFrame::Error { .. }))
        .await;
    assert!(
        matches!(&frame, RelayFrame::Error { code, fatal: true, .. } if code == codes::REVOKED),
        "{frame:?}"
    );
    // Its next edit is not receipted: nothing but the close comes back.
    add_tea(&mut ca, &mut order);
    ca.push(&order).await;
    let mut receipted = false;
    while let Some(f) = ca.recv().await {
        receipted |= matches!(f, RelayFrame::Receipt { .. });
    }
    assert!(!receipted);
    // Reconnecting is refused with `revoked`.
    assert_eq!(
        try_connect(relay.addr, a, &ta).await.err(),
        Some((401, "revoked".to_owned()))
    );
    // An unknown token is `unauthorized`.
    let unknown = format!("dev_{}", "0".repeat(64));
    assert_eq!(
        try_connect(relay.addr, a, &unknown).await.err(),
        Some((401, "unauthorized".to_owned()))
    );
    // The witness of the same store is unaffected.
    let mut other = witness.create("s1");
    witness.sync_until_receipted(&mut other).await;
    relay.stop().await;
}

#[tokio::test]
async fn a_revoked_connection_cannot_slip_an_edit_in() {
    // The edit is sent right after the revocation, before the close frame is read: the relay
    // must not receipt it.
    let relay = TestRelay::start().await;
    let (a, ta) = relay.device("s1", "till a");
    let admin = relay.admin();
    let mut ca = Client::connect(relay.addr, a, &ta).await;
    let mut order = ca.create("s1");
    ca.sync_until_receipted(&mut order).await;
    let (status, _) = relay
        .http(
            "POST",
            &format!("/v1/admin/devices/{a}/revoke"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, 200);
    add_tea(&mut ca, &mut order);
    ca.push(&order).await;
    let mut frames = Vec::new();
    while let Some(f) = ca.recv().await {
        frames.push(f);
    }
    assert!(
        !frames
            .iter()
            .any(|f| matches!(f, RelayFrame::Receipt { .. })),
        "{frames:?}"
    );
    let stored = relay.store.load_order(order.id()).unwrap().unwrap();
    let doc = stored.to_doc().unwrap();
    let view = Order::from_doc(doc, Writer::new(a, 9))
        .unwrap()
        .view()
        .unwrap();
    assert!(
        view.lines.is_empty(),
        "the edit after revocation was stored"
    );
    relay.stop().await;
}

#[tokio::test]
async fn requests_without_a_token_get_401_before_their_body_is_read() {
    let relay = TestRelay::start().await;
    let admin = relay.admin();
    for path in [
        "/v1/admin/devices",
        "/v1/admin/backup",
        "/v1/orders/0190b5d2-0000-7000-8000-000000000000/status",
    ] {
        // A head announcing a body far over any limit, and only a few bytes of it.
        let huge = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n{{\"a\":"
        );
        let (status, body) = http_within(relay.addr, huge, Duration::from_secs(3))
            .await
            .expect("no answer: the relay waited for the body");
        assert_eq!(
            (status, code_of(&body).as_str()),
            (401, "unauthorized"),
            "{path}"
        );
        // A malformed body with a bad token.
        let bad = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer adm_nope\r\nContent-Type: application/json\r\nContent-Length: 1\r\nConnection: close\r\n\r\n{{"
        );
        let (status, body) = http_within(relay.addr, bad, Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(
            (status, code_of(&body).as_str()),
            (401, "unauthorized"),
            "{path}"
        );
    }
    // Authenticated, the body is checked: too large, then malformed, with the JSON shape.
    let big = format!(
        "POST /v1/admin/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\nContent-Length: 50000000\r\n\r\n{{\"a\":"
    );
    let (status, body) = http_within(relay.addr, big, Duration::from_secs(3))
        .await
        .unwrap();
    assert_eq!(
        (status, code_of(&body).as_str()),
        (413, "payload_too_large")
    );
    let (status, body) = relay
        .http("POST", "/v1/admin/devices", Some(&admin), Some("{"))
        .await;
    assert_eq!((status, code_of(&body).as_str()), (400, "invalid"));
    let (status, body) = relay
        .http(
            "POST",
            "/v1/admin/devices",
            Some(&admin),
            Some(r#"{"store":"s1","name":"till 9"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    relay.stop().await;
}

// ----- the relay as a process ---------------------------------------------------------------

struct Proc {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cli(data: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--data", data])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Provisions `devices` devices of store s1, then starts `relay-server serve` with `args`
/// under `ulimit -n fds` (when given). Returns the process and the devices.
fn start_process(
    devices: usize,
    fds: Option<u32>,
    args: &[&str],
) -> (Proc, Vec<(DeviceId, String)>) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let mut provisioned = Vec::new();
    for i in 0..devices {
        let out = cli(
            &data_s,
            &[
                "device",
                "add",
                "--store",
                "s1",
                "--name",
                &format!("till {i}"),
            ],
        );
        let id = out
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<DeviceId>()
            .unwrap();
        let token = out
            .lines()
            .find_map(|l| l.strip_prefix("token (shown once): "))
            .unwrap()
            .trim()
            .to_owned();
        provisioned.push((id, token));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = match fds {
        Some(n) => {
            let mut c = Command::new("bash");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let child = cmd
        .args(["serve", "--listen", &listen, "--data", &data_s])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = listen.parse().unwrap();
    let mut up = false;
    for _ in 0..200 {
        if std::net::TcpStream::connect(addr).is_ok() {
            up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(up, "relay did not start");
    (
        Proc {
            child,
            addr,
            _dir: dir,
        },
        provisioned,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_when_device_slots_are_exhausted() {
    // 160 open files: 96 sockets, 64 of them for devices. One device may take them all here
    // (its share is raised), the way a fleet of tills would.
    let (relay, devices) = start_process(
        1,
        Some(160),
        &[
            "--max-device-connections",
            "100000",
            "--max-store-connections",
            "100000",
            "--handshake-timeout-secs",
            "1",
        ],
    );
    let (dev, token) = devices[0].clone();
    let mut held = Vec::new();
    let refusal = loop {
        match try_connect(relay.addr, dev, &token).await {
            Ok(ws) => held.push(ws),
            Err(e) => break e,
        }
        assert!(held.len() <= 200, "no limit");
    };
    assert_eq!(refusal, (503, "too_many_connections".to_owned()));
    assert_eq!(held.len(), 64);
    // Health and metrics still answer at once.
    let (status, body) = http_within(relay.addr, get("/healthz"), Duration::from_secs(2))
        .await
        .expect("/healthz hung with every device slot taken");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    // 100 more sockets that never send a byte fill the remaining socket slots: they are closed
    // after the handshake timeout, so /healthz answers within a few seconds anyway.
    let mut idle = Vec::new();
    for _ in 0..100 {
        idle.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    let started = Instant::now();
    let answer = http_within(relay.addr, get("/healthz"), Duration::from_secs(8)).await;
    assert_eq!(
        answer.map(|a| a.0),
        Some(200),
        "after {:?}",
        started.elapsed()
    );
    // The devices already connected still work.
    let mut ws = held.pop().unwrap();
    ws.send(Message::Binary(
        ClientFrame::Ping { nonce: 7 }.encode().into(),
    ))
    .await
    .unwrap();
    assert!(matches!(
        recv_frame(&mut ws).await,
        Some(RelayFrame::Pong { nonce: 7 })
    ));
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_a_busy_relay_within_its_bound() {
    let (mut relay, devices) = start_process(2, None, &["--shutdown-timeout-secs", "3"]);
    // A device that keeps the workers busy with new orders.
    let (dev, token) = devices[0].clone();
    let addr = relay.addr;
    let busy = tokio::spawn(async move {
        let mut c = Client::connect(addr, dev, &token).await;
        for _ in 0..100_000 {
            let order = c.create("s1");
            let state = c.states.entry(order.id()).or_default();
            let Some(m) = automerge::sync::SyncDoc::generate_sync_message(order.doc(), state)
            else {
                continue;
            };
            let f = ClientFrame::Sync {
                order: order.id().to_string(),
                data: serde_bytes::ByteBuf::from(m.encode()),
            };
            if c.ws.send(Message::Binary(f.encode().into())).await.is_err() {
                return;
            }
        }
    });
    // An idle device connection and a client stuck in the middle of a request head.
    let (dev2, token2) = devices[1].clone();
    let _idle = Client::connect(relay.addr, dev2, &token2).await;
    let mut stuck = TcpStream::connect(relay.addr).await.unwrap();
    stuck
        .write_all(b"POST /v1/admin/backup HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = relay.child.id().to_string();
    let started = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut exited = None;
    while started.elapsed() < Duration::from_secs(15) {
        if let Some(status) = relay.child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    assert!(exited.is_some(), "still running 15 s after SIGTERM");
    // Bound 3 s, plus the process's own grace of 2 s.
    assert!(took < Duration::from_secs(6), "took {took:?}");
    busy.abort();
}
