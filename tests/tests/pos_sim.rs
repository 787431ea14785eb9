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
        verbose: false,
    };
    let report = run(opts).await.unwrap();
    assert!(report.orders >= 12, "{} orders", report.orders);
    assert!(!report.faults.contains_key("relay_restart"));
    assert!(report.passed(), "{}", report.render());
}
