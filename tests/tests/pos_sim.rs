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
        verbose: false,
    };
    let report = run(opts).await.unwrap();
    println!("{}", report.render());
    assert!(report.orders >= 40, "{} orders", report.orders);
    assert!(report.passed(), "{}", report.render());
}
