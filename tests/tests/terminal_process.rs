//! Story 6 with a real process: a till (`pos-terminal`) is killed with SIGKILL between "charge
//! sent" and "result recorded". On restart the pending payment is surfaced, reconciled with the
//! terminal (whose ledger outlived the app), and synced — charged once, never forgotten.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crdt_model::{OrderStatus, OrderView, StoreId};
use e2e::file_terminal::FileTerminal;
use e2e::harness::{EmbeddedRelay, get_json};

const BIN: &str = env!("CARGO_BIN_EXE_pos-terminal");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_till_killed_between_charge_and_record_reconciles_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let relay = EmbeddedRelay::start(&dir.path().join("relay"), 0)
        .await
        .unwrap();
    let (device, token) = relay
        .provision(&StoreId::new("s1").unwrap(), "till")
        .unwrap();
    let data = dir.path().join("till.redb");
    let ledger = dir.path().join("terminal.json");
    let common = |cmd: &mut Command| {
        cmd.arg("--data")
            .arg(&data)
            .arg("--ledger")
            .arg(&ledger)
            .arg("--relay")
            .arg(format!("ws://{}/v1/sync", relay.addr));
        cmd.arg("--device")
            .arg(device.to_string())
            .arg("--store")
            .arg("s1")
            .arg("--token")
            .arg(&token);
        cmd.env("RUST_LOG", "error");
    };
    let mut sell = Command::new(BIN);
    common(&mut sell);
    let mut child = sell
        .args(["sell", "--amount", "1500", "--hang"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let order = line
        .trim()
        .strip_prefix("order ")
        .expect("order id line")
        .to_owned();
    // Wait until the terminal has taken the money, then kill the app.
    let mut charged = false;
    for _ in 0..200 {
        if FileTerminal::ledger(&ledger).len() == 1 {
            charged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(charged, "the terminal never charged");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let mut recover = Command::new(BIN);
    common(&mut recover);
    let output = tokio::task::spawn_blocking(move || recover.arg("recover").output().unwrap())
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["order"], order);
    assert_eq!(
        summary["pending_before"], 1,
        "the pending payment was surfaced after the kill"
    );
    assert!(
        summary["reconciled"].as_str().unwrap().contains("Captured"),
        "{summary}"
    );
    assert_eq!(summary["paid"], 1500);
    assert_eq!(summary["payments"], 1);
    assert_eq!(
        FileTerminal::ledger(&ledger).len(),
        1,
        "charged exactly once"
    );
    // The relay holds the sale.
    let view: OrderView = get_json(relay.addr, &format!("/v1/orders/{order}"), &relay.admin)
        .await
        .unwrap();
    assert_eq!(view.status, OrderStatus::Done);
    assert_eq!(view.totals.paid, 1500);
    assert_eq!(view.payments.len(), 1);
}
