//! The engine (sans-IO) when the relay refuses the device's token: a fatal `revoked` error on an
//! open connection, or a refused upgrade, blocks the orders with unsent changes with that code
//! as the reason; the next attempt waits the longest backoff. (That synced orders stay synced
//! is the status table, checked by `sync_status.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crdt_model::wire::{RelayFrame, Version, codes};
use crdt_model::*;
use replicator::{Engine, EngineConfig, Identity, LocalSyncStatus};

fn engine() -> (Engine, SplitMix64) {
    let mut rng = SplitMix64::new(7);
    let identity = Identity {
        device: DeviceId::generate(Timestamp(0), &mut rng),
        store: StoreId::new("s1").unwrap(),
        epoch: 1,
        relay_url: "test".into(),
        fallback_urls: Vec::new(),
        token: "test".into(),
    };
    let config = EngineConfig {
        backoff_min_ms: 50,
        backoff_max_ms: 30_000,
        ..EngineConfig::default()
    };
    (
        Engine::new(identity, Vec::new(), 0, config, 1).unwrap(),
        rng,
    )
}

fn online(e: &mut Engine, now: i64) {
    e.handle_connected(now);
    e.handle_frame(
        RelayFrame::Welcome {
            protocol: Version::CURRENT,
            relay: "018bcfe5-73b8-76c9-9a3b-782b29572a06".into(),
            store: "s1".into(),
            feed_seq: 0,
            data: None,
        },
        now,
    );
}

#[test]
fn a_revoked_error_blocks_unsent_orders_with_its_reason() {
    let (mut e, mut rng) = engine();
    online(&mut e, 1_000);
    let eur = Currency::new("EUR").unwrap();
    let pending = e.create_order(1_000, &mut rng, eur).unwrap();
    assert_eq!(e.sync_status(pending), Some(LocalSyncStatus::Syncing));
    e.handle_frame(
        RelayFrame::error(codes::REVOKED, "this device's token was revoked", true),
        2_000,
    );
    assert_eq!(e.sync_status(pending), Some(LocalSyncStatus::Blocked));
    let blocked = e.record(pending).unwrap().blocked.clone().unwrap();
    assert_eq!(blocked.code, "revoked");
    assert!(!e.is_online());
    // The next attempt waits the longest backoff, not the shortest.
    assert!(e.poll_timeout().unwrap() >= 2_000 + 30_000);
    // The order stays readable.
    assert!(e.view(pending).is_ok());
}

#[test]
fn a_refused_upgrade_blocks_unsent_orders_and_keeps_the_first_reason() {
    let (mut e, mut rng) = engine();
    let eur = Currency::new("EUR").unwrap();
    // Offline: the order waits (delayed), then the upgrade is refused as unauthorized.
    let pending = e.create_order(1_000, &mut rng, eur).unwrap();
    e.handle_refused(codes::UNAUTHORIZED, "unauthorized", 2_000);
    assert_eq!(e.sync_status(pending), Some(LocalSyncStatus::Blocked));
    assert_eq!(
        e.record(pending).unwrap().blocked.as_ref().unwrap().code,
        "unauthorized"
    );
    // A later refusal does not touch it again, nor a blocked order's reason.
    e.handle_refused(codes::REVOKED, "revoked", 3_000);
    assert_eq!(
        e.record(pending).unwrap().blocked.as_ref().unwrap().code,
        "unauthorized"
    );
}
