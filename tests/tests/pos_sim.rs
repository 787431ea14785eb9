//! A short `pos-sim` run (fixed seed) as part of the test suite: terminals with cashier
//! behaviour under injected faults, verified end to end.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use e2e::sim::{SimOptions, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_pos_sim_run_passes_every_check() {
    let opts = SimOptions {
        terminals: 3,
        stores: 2,
        orders: 8,
        seed: 7,
        fault_rate: 0.5,
        pace_ms: 15,
        relay: None,
        store: None,
        relays: 1,
        relay_bin: None,
        verbose: false,
    };
    let report = run(opts).await.unwrap();
    println!("{}", report.render());
    assert!(report.orders >= 40, "{} orders", report.orders);
    assert!(report.passed(), "{}", report.render());
}

/// `--relay`: the same simulation against a relay that is already running (here one started by
/// the test, reached only through its port: provisioning and checks go through its HTTP API).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pos_sim_runs_against_a_running_relay() {
    let dir = tempfile::tempdir().unwrap();
    let relay = e2e::harness::EmbeddedRelay::start(dir.path(), 0)
        .await
        .unwrap();
    let opts = SimOptions {
        terminals: 2,
        stores: 1,
        orders: 6,
        seed: 3,
        fault_rate: 0.3,
        pace_ms: 10,
        relay: Some((relay.addr, relay.admin.clone())),
        store: None,
        relays: 1,
        relay_bin: None,
        verbose: false,
    };
    let report = run(opts).await.unwrap();
    assert!(report.orders >= 12, "{} orders", report.orders);
    assert!(!report.faults.contains_key("relay_restart"));
    assert!(report.passed(), "{}", report.render());
}

/// Issue 15: three relay processes on one PostgreSQL database, every till knowing all three;
/// relays are SIGKILLed mid-run and started again while the cashiers sell. Every check of the
/// single relay holds (every receipted change present, numbers unique and gap-free per store,
/// every till Synced and identical to the relays), and every relay answers for every order
/// what the database holds. Runs when `RELAY_TEST_POSTGRES` names a database (CI sets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_relays_on_postgres_survive_sigkills() {
    let Some(url) = e2e::pgdb::database("three_relays_on_postgres_survive_sigkills") else {
        return;
    };
    let opts = SimOptions {
        terminals: 3,
        stores: 2,
        orders: 12,
        seed: 6,
        fault_rate: 0.6,
        pace_ms: 15,
        relay: None,
        store: Some(url),
        relays: 3,
        relay_bin: Some(env!("CARGO_BIN_EXE_relay-proc").into()),
        verbose: false,
    };
    let report = run(opts).await.unwrap();
    println!("{}", report.render());
    assert!(report.orders >= 40, "{} orders", report.orders);
    assert!(
        report.faults.get("relay_sigkill").copied().unwrap_or(0) >= 1,
        "no relay was killed: {:?}",
        report.faults
    );
    assert!(
        report
            .checks
            .iter()
            .any(|c| c.name.starts_with("every relay's view")),
        "{}",
        report.render()
    );
    assert!(report.passed(), "{}", report.render());
}
