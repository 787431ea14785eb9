//! The back-office board in a real browser: headless Chromium, driven over WebDriver
//! (chromedriver, with the `fantoccini` client), against an embedded relay and simulated tills
//! (the `replicator` library behind fault-injecting proxies).
//!
//! One browser session walks through the board: wrong and device tokens refused, sign-in, an
//! order a till creates appearing live, its total changing when a line is added, a payment
//! that reached a deleted order flagged "Refund needed" and acknowledged, a status changed on
//! an order's page, the audit trail opened. The time from a till's call to the page showing
//! its result is measured from the page's own record of when it applied the update, and must
//! be under a second. Screenshots of the main views at 1280 and 768 px wide go to
//! `target/board-screenshots/`.
//!
//! Needs `chromium` and `chromedriver` on the PATH (Debian: `apt-get install chromium
//! chromium-driver`; or `BOARD_CHROMIUM` / `BOARD_CHROMEDRIVER` naming them). Without them the
//! test prints one line saying so and passes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crdt_model::*;
use e2e::harness::EmbeddedRelay;
use e2e::proxy::Proxy;
use fantoccini::{Client, ClientBuilder, Locator};
use replicator::core::EngineConfig;
use replicator::*;

const WAIT: Duration = Duration::from_secs(10);
/// The page must show a till's change within this long (issue 16).
const LIVE_WITHIN: Duration = Duration::from_secs(1);

/// `name` from the environment variable `var`, else the first of `names` on the PATH.
fn program(var: &str, names: &[&str]) -> Option<PathBuf> {
    if let Ok(p) = std::env::var(var) {
        return Some(PathBuf::from(p)).filter(|p| p.exists());
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |n| dir.join(n)))
        .find(|p| p.is_file())
}

/// chromedriver as a child process, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver(chromedriver: &Path) -> Driver {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let driver = Driver { child, port };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return driver;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("chromedriver did not listen on port {port}");
}

async fn browser(driver: &Driver, chromium: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": chromium,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--hide-scrollbars", "--force-device-scale-factor=1",
            ],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a WebDriver session with headless Chromium")
}

struct Till {
    rep: Replicator,
    proxy: Proxy,
    token: String,
}

async fn till(relay: &EmbeddedRelay, dir: &tempfile::TempDir, name: &str) -> Till {
    let (device, token) = relay.provision(&StoreId::new("s1").unwrap(), name).unwrap();
    let proxy = Proxy::start(relay.addr).await.unwrap();
    let identity = Identity {
        device,
        store: StoreId::new("s1").unwrap(),
        epoch: 1,
        relay_url: format!("ws://{}/v1/sync", proxy.addr),
        fallback_urls: Vec::new(),
        token: token.clone(),
    };
    let config = Config {
        engine: EngineConfig {
            backoff_min_ms: 20,
            backoff_max_ms: 200,
            ..EngineConfig::default()
        },
        connect_timeout: Duration::from_secs(2),
    };
    let rep = Replicator::open(
        &dir.path().join(format!("{name}.redb")),
        identity,
        config,
        Arc::new(SimTerminal::new(SimMode::Approve)),
    )
    .await
    .unwrap();
    Till { rep, proxy, token }
}

fn line(name: &str, price: i64, qty: i64) -> LineDraft {
    LineDraft {
        sku: name.to_lowercase(),
        name: name.into(),
        unit_price: price,
        quantity: qty,
        ..Default::default()
    }
}

/// Waits until the page's text of `css` contains `text`; returns when the test first saw it
/// (polling every 10 ms: at most that, plus one WebDriver round trip, after the page had it).
async fn until_text(c: &Client, css: &str, text: &str) -> Instant {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(t) = e.text().await
            && t.contains(text)
        {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{css} never showed {text:?}; page: {}",
            c.source().await.unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until nothing matches `css`.
async fn until_gone(c: &Client, css: &str) {
    let deadline = Instant::now() + WAIT;
    while c.find(Locator::Css(css)).await.is_ok() {
        assert!(Instant::now() < deadline, "{css} never went away");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn shots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    );
    let dir = target.join("board-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Saves the page at `width` px wide (the window as tall as the page, so all of it shows).
async fn shoot(c: &Client, name: &str, width: u32) {
    c.set_window_size(width, 1000).await.unwrap();
    let height = c
        .execute("return document.documentElement.scrollHeight;", vec![])
        .await
        .unwrap()
        .as_u64()
        .unwrap_or(1000)
        .clamp(600, 3000) as u32;
    c.set_window_size(width, height).await.unwrap();
    let png = c.screenshot().await.unwrap();
    std::fs::write(shots_dir().join(format!("{name}-{width}.png")), png).unwrap();
    c.set_window_size(1280, 1000).await.unwrap();
}

async fn sign_in(c: &Client, base: &str, token: &str) {
    c.goto(&format!("{base}/board")).await.unwrap();
    c.find(Locator::Id("token"))
        .await
        .unwrap()
        .send_keys(token)
        .await
        .unwrap();
    c.find(Locator::Css("form.sign-in button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_in_a_browser() {
    let (Some(chromium), Some(chromedriver)) = (
        program(
            "BOARD_CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        ),
        program("BOARD_CHROMEDRIVER", &["chromedriver"]),
    ) else {
        // Straight to stderr, not through the test harness's capture: one line that shows.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "skipped the_board_in_a_browser: no chromium/chromedriver on the PATH \
             (apt-get install chromium chromium-driver, or set BOARD_CHROMIUM and BOARD_CHROMEDRIVER)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let s1 = StoreId::new("s1").unwrap();
    let office = relay
        .store()
        .unwrap()
        .add_admin_token(Some(&s1), "s1 office", 0)
        .unwrap();
    let a = till(&relay, &dir, "till a").await;
    let b = till(&relay, &dir, "till b").await;
    let base = format!("http://{}", relay.addr);
    let driver = start_driver(&chromedriver).await;
    let c = browser(&driver, &chromium).await;
    let mut report = Vec::new();

    // Refused: a wrong token, then a till's token.
    c.goto(&format!("{base}/board")).await.unwrap();
    shoot(&c, "sign-in", 1280).await;
    sign_in(&c, &base, "adm_0000000000000000").await;
    until_text(&c, "p.error", "not recognised").await;
    sign_in(&c, &base, &a.token).await;
    until_text(&c, "h1", "Device tokens cannot open the board").await;

    // Signed in with the store's back-office token: the board, live.
    sign_in(&c, &base, &office).await;
    until_text(&c, "h1", "Store s1").await;
    until_text(&c, "#live", "Live updates: on").await;

    // A till creates an order: it appears without a reload.
    let t0 = Instant::now();
    let order = a
        .rep
        .create_order(Currency::new("EUR").unwrap())
        .await
        .unwrap();
    a.rep
        .add_line(order, line("Steak", 2_400, 1))
        .await
        .unwrap();
    let appeared = until_text(&c, &format!("#active-{order}"), "24.00 EUR").await - t0;
    report.push(format!(
        "new order visible {} ms after the till's first call",
        appeared.as_millis()
    ));

    // A line added: the total changes in place.
    until(&b.rep, order, |v| v.lines.len() == 1).await;
    let t1 = Instant::now();
    b.rep.add_line(order, line("Wine", 1_800, 2)).await.unwrap();
    let changed = until_text(&c, &format!("#active-{order}"), "60.00 EUR").await - t1;
    report.push(format!(
        "added line visible {} ms after the till's call",
        changed.as_millis()
    ));
    let rows = c.find_all(Locator::Css("#active-list tr")).await.unwrap();
    assert_eq!(rows.len(), 1, "one row per order, patched in place");

    // A second order, left active, for the status change below.
    let other = a
        .rep
        .create_order(Currency::new("EUR").unwrap())
        .await
        .unwrap();
    a.rep.add_line(other, line("Soup", 650, 2)).await.unwrap();
    until_text(&c, &format!("#active-{other}"), "13.00 EUR").await;

    // A payment that reached a deleted order: flagged "Refund needed".
    until(&b.rep, order, |v| v.lines.len() == 2).await;
    a.proxy.set_blackhole(true);
    b.proxy.set_blackhole(true);
    a.rep.delete(order).await.unwrap();
    b.rep.charge_card(order, 6_000).await.unwrap();
    a.proxy.set_blackhole(false);
    b.proxy.set_blackhole(false);
    let attention = format!("#attention-{order}");
    until_text(&c, &attention, "Refund needed").await;
    until_gone(&c, &format!("#active-{order}")).await;
    until_text(&c, &format!("#closed-{order}"), "Deleted").await;
    until_text(&c, "#closed-totals", "card").await;
    shoot(&c, "board", 1280).await;
    shoot(&c, "board", 768).await;

    // Acknowledged from the board: authored by the back office, the flag leaves the list.
    c.find(Locator::Css(&format!("{attention} button")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_gone(&c, &attention).await;
    let view: OrderView =
        e2e::harness::get_json(relay.addr, &format!("/v1/orders/{order}"), &relay.admin)
            .await
            .unwrap();
    assert_eq!(view.late_edits.len(), 1);
    assert!(view.late_edits[0].acknowledged, "{view:?}");
    // The tills get the acknowledgement too.
    until(&a.rep, order, |v| {
        v.late_edits.iter().all(|e| e.acknowledged)
    })
    .await;

    // A status changed on the order's page; the till sees it.
    c.find(Locator::Css(&format!("#active-{other} a")))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, "h1", "Order #").await;
    c.find(Locator::Css("select#status"))
        .await
        .unwrap()
        .select_by_value("delayed")
        .await
        .unwrap();
    c.find(Locator::Css("form.inline button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, "#order-status", "Delayed").await;
    until(&a.rep, other, |v| v.status == OrderStatus::Delayed).await;

    // The audit trail: who changed what.
    c.find(Locator::Css("details#audit summary"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, "details#audit table", "till a").await;
    until_text(&c, "details#audit table", "back office").await;
    shoot(&c, "order", 1280).await;
    shoot(&c, "order", 768).await;

    // The deleted order's page: closed, no way to reopen it; the acknowledgement shows.
    c.goto(&format!("{base}/board/orders/{order}"))
        .await
        .unwrap();
    until_text(&c, "main", "cannot be reopened").await;
    until_text(&c, "main", "acknowledged by back office").await;
    assert!(c.find(Locator::Css("select#status")).await.is_err());

    // Signed out: the board asks for a token again.
    c.goto(&format!("{base}/board")).await.unwrap();
    c.find(Locator::Css("header form button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    until_text(&c, "main label", "Back-office token").await;

    let _ = c.close().await;
    drop(driver);
    let text = report.join("\n");
    {
        // Shown in every run (not captured): the figure the issue asks for.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "board live-update latency (till call -> page updated): {}",
            report.join("; ")
        );
    }
    std::fs::write(shots_dir().join("latency.txt"), format!("{text}\n")).unwrap();
    for (what, took) in [("new order", appeared), ("added line", changed)] {
        assert!(took < LIVE_WITHIN, "{what} took {took:?} to show");
    }
    a.rep.close().await;
    b.rep.close().await;
}

async fn until(r: &Replicator, order: OrderId, pred: impl Fn(&OrderView) -> bool) -> OrderView {
    for _ in 0..400 {
        if let Ok(v) = r.view(order).await
            && pred(&v)
        {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "order {order} never reached the expected state: {:?}",
        r.view(order).await
    );
}

/// The board's HTTP answers, without a browser (runs everywhere): refusals by status code, a
/// form post from another site refused, and the relay's shutdown not held up by an open live
/// stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_board_over_plain_http() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let s1 = StoreId::new("s1").unwrap();
    let (_, device) = relay.provision(&s1, "till a").unwrap();
    let office = relay
        .store()
        .unwrap()
        .add_admin_token(Some(&s1), "s1 office", 0)
        .unwrap();
    let get = |path: &'static str, token: String| {
        let addr = relay.addr;
        async move {
            e2e::harness::http(addr, "GET", path, &token, None)
                .await
                .unwrap()
        }
    };
    let (status, body) = get("/board", String::new()).await;
    assert_eq!(status, 200, "the sign-in page");
    assert!(body.contains("Back-office token"));
    assert_eq!(get("/board", "adm_nope".into()).await.0, 401);
    assert_eq!(get("/board", device.clone()).await.0, 403);
    assert_eq!(get("/board?store=s2", office.clone()).await.0, 404);
    let (status, body) = get("/board", office.clone()).await;
    assert_eq!(status, 200);
    assert!(body.contains("Store s1"), "{body}");
    assert_eq!(get("/board/assets/board.js", String::new()).await.0, 200);

    // A form post from another site's page.
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let form = "status=done";
    let req = format!(
        "POST /board/orders/01900000-0000-7000-8000-000000000000/status HTTP/1.1\r\nHost: {}\r\n\
         Origin: http://evil.example\r\nCookie: board_token={office}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{form}",
        relay.addr,
        form.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");

    // A live stream open: the relay still stops at once.
    let mut sse = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    let req = format!(
        "GET /board/events?store=s1 HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {office}\r\n\r\n"
    );
    sse.write_all(req.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 512];
    let n = sse.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_lowercase();
    assert!(
        head.contains("200 ok") && head.contains("text/event-stream"),
        "{head}"
    );
    let started = Instant::now();
    relay.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "stopping took {:?} with a board open",
        started.elapsed()
    );
}
