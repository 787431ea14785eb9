//! `relay-server` binary. The relay itself is issue 3; until it lands this binary says so.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    println!(
        "relay-server {}: not built yet (issue 3). Arguments received: {:?}",
        env!("CARGO_PKG_VERSION"),
        args
    );
}
