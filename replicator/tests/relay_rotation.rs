//! The engine (sans-IO) with several relays: which relay each connection attempt goes to, and
//! how long it waits first. A failed attempt or a dropped connection moves to the next relay of
//! the list promptly; the backoff grows only when the whole list has failed; a relay that
//! answers is kept; a refused token still waits the longest backoff. With one relay it is plain
//! exponential backoff with jitter.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crdt_model::wire::{RelayFrame, Version, codes};
use crdt_model::*;
use proptest::prelude::*;
use replicator::{Effect, Engine, EngineConfig, Event, Identity};

const MIN: i64 = 100;
const MAX: i64 = 5_000;

fn identity(urls: &[&str]) -> Identity {
    let mut rng = SplitMix64::new(7);
    Identity {
        device: DeviceId::generate(Timestamp(0), &mut rng),
        store: StoreId::new("s1").unwrap(),
        epoch: 1,
        relay_url: urls[0].into(),
        fallback_urls: urls[1..].iter().map(|u| (*u).to_owned()).collect(),
        token: "test".into(),
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        backoff_min_ms: MIN,
        backoff_max_ms: MAX,
        ..EngineConfig::default()
    }
}

fn engine(urls: &[&str], seed: u64) -> Engine {
    Engine::new(identity(urls), Vec::new(), 0, config(), seed).unwrap()
}

fn welcome(data: Option<&str>) -> RelayFrame {
    RelayFrame::Welcome {
        protocol: Version::CURRENT,
        relay: "018bcfe5-73b8-76c9-9a3b-782b29572a06".into(),
        store: "s1".into(),
        feed_seq: 0,
        data: data.map(str::to_owned),
    }
}

/// Runs the engine's timeout at `now` and drains its effects and events; whether it asked to
/// connect.
fn tick(e: &mut Engine, now: i64) -> bool {
    e.handle_timeout(now);
    let mut connect = false;
    while let Some(effect) = e.poll_effect() {
        connect |= effect == Effect::Connect;
    }
    while e.poll_event().is_some() {}
    connect
}

/// Waits for the next attempt (no orders: the only timeout is the reconnect); its time and the
/// relay it goes to.
fn next_attempt(e: &mut Engine, now: i64) -> (i64, String) {
    let at = e.poll_timeout().expect("an attempt is scheduled").max(now);
    assert!(tick(e, at), "no connect request at {at}");
    (at, e.relay_url().to_owned())
}

fn online(e: &mut Engine, now: i64) {
    e.handle_connected(now);
    e.handle_frame(welcome(None), now);
    assert!(e.is_online());
}

/// The wait scheduled after something happened at `now`.
fn delay(e: &Engine, now: i64) -> i64 {
    e.poll_timeout().expect("an attempt is scheduled") - now
}

#[test]
fn relay_urls_keep_their_order_and_drop_repeats() {
    let id = identity(&["ws://a", "ws://b", "ws://a", "ws://c", "ws://b"]);
    assert_eq!(id.relay_urls(), ["ws://a", "ws://b", "ws://c"]);
    assert_eq!(identity(&["ws://a"]).relay_urls(), ["ws://a"]);
    let e = engine(&["ws://a", "ws://b", "ws://a"], 1);
    assert_eq!(e.relay_urls(), ["ws://a", "ws://b"]);
    assert_eq!((e.relay_index(), e.relay_url()), (0, "ws://a"));
}

#[test]
fn failed_attempts_move_to_the_next_relay_at_once_and_wrap_around() {
    let mut e = engine(&["ws://a", "ws://b", "ws://c"], 2);
    let mut now = 0;
    let mut tried = Vec::new();
    for _ in 0..7 {
        let (at, url) = next_attempt(&mut e, now);
        now = at;
        tried.push(url);
        e.handle_disconnected(now);
    }
    assert_eq!(
        tried,
        [
            "ws://a", "ws://b", "ws://c", "ws://a", "ws://b", "ws://c", "ws://a"
        ]
    );
    assert_eq!(e.failed_attempts(), 7);
}

#[test]
fn the_backoff_grows_only_when_a_whole_round_has_failed() {
    let mut e = engine(&["ws://a", "ws://b", "ws://c"], 3);
    let mut now = 0;
    for failure in 1..=12u32 {
        now = next_attempt(&mut e, now).0;
        e.handle_disconnected(now);
        let waited = delay(&e, now);
        let base = if failure.is_multiple_of(3) {
            (MIN << (failure / 3)).min(MAX)
        } else {
            MIN
        };
        assert!(
            (base / 2..=base).contains(&waited),
            "failure {failure}: waits {waited} ms, expected {}..={base}",
            base / 2
        );
    }
}

#[test]
fn a_dropped_connection_tries_the_next_relay_within_the_shortest_backoff() {
    let mut e = engine(&["ws://a", "ws://b"], 4);
    // Every relay fails for a while: the backoff has grown.
    let mut now = 0;
    for _ in 0..8 {
        now = next_attempt(&mut e, now).0;
        e.handle_disconnected(now);
    }
    assert!(delay(&e, now) > MIN);
    let (at, url) = next_attempt(&mut e, now);
    assert_eq!(url, "ws://a");
    online(&mut e, at);
    assert_eq!(e.failed_attempts(), 0);
    // Relay a is killed: the device is told, and tries b soon after.
    let killed = at + 60_000;
    e.handle_disconnected(killed);
    assert!(std::iter::from_fn(|| e.poll_event()).any(|ev| ev == Event::Disconnected));
    assert_eq!(e.relay_url(), "ws://b");
    let waited = delay(&e, killed);
    assert!((MIN / 2..=MIN).contains(&waited), "{waited} ms");
    // b is dead too: a again (it may have come back), still without growing.
    now = next_attempt(&mut e, killed).0;
    e.handle_disconnected(now);
    assert_eq!(e.relay_url(), "ws://a");
    assert!(delay(&e, now) <= MIN);
}

#[test]
fn a_relay_that_answers_is_kept_until_its_connection_drops() {
    let urls = ["ws://a", "ws://b", "ws://c"];
    let mut e = engine(&urls, 5);
    let (at, _) = next_attempt(&mut e, 0);
    e.handle_disconnected(at);
    let (at, url) = next_attempt(&mut e, at);
    assert_eq!(url, "ws://b");
    online(&mut e, at);
    // Staying online, and going through timeouts, does not move it.
    assert!(!tick(&mut e, at + 1_000_000));
    assert_eq!(e.relay_url(), "ws://b");
    // Its connection drops: c next. A handshake that fails after the socket opened counts as
    // c failing: a next.
    e.handle_disconnected(at + 1_000_000);
    let (at, url) = next_attempt(&mut e, at + 1_000_000);
    assert_eq!(url, "ws://c");
    e.handle_connected(at);
    e.handle_disconnected(at);
    assert_eq!((e.relay_url(), e.failed_attempts()), ("ws://a", 1));
    // A fresh engine (the app restarted) starts again from the preferred relay.
    assert_eq!(engine(&urls, 5).relay_url(), "ws://a");
}

#[test]
fn a_refused_token_waits_the_longest_backoff_whichever_relay_is_next() {
    let mut e = engine(&["ws://a", "ws://b"], 6);
    let (at, _) = next_attempt(&mut e, 0);
    e.handle_refused(codes::REVOKED, "revoked", at);
    assert_eq!(delay(&e, at), MAX);
    assert_eq!(e.relay_url(), "ws://b");
    // Refused on an open connection too.
    let (at, url) = next_attempt(&mut e, at);
    assert_eq!(url, "ws://b");
    online(&mut e, at);
    e.handle_frame(RelayFrame::error(codes::REVOKED, "revoked", true), at + 10);
    assert_eq!(delay(&e, at + 10), MAX);
    assert_eq!(e.relay_url(), "ws://a");
}

#[test]
fn one_relay_backs_off_exponentially_with_jitter() {
    let mut e = engine(&["ws://a"], 7);
    let (at, _) = next_attempt(&mut e, 0);
    online(&mut e, at);
    // A drop: the shortest backoff.
    let mut now = at + 1_000;
    e.handle_disconnected(now);
    let waited = delay(&e, now);
    assert!((MIN / 2..=MIN).contains(&waited), "{waited} ms");
    // Then every failure doubles it, up to the cap.
    let mut waits = Vec::new();
    for k in 1..=10u32 {
        let (at, url) = next_attempt(&mut e, now);
        assert_eq!(url, "ws://a");
        now = at;
        e.handle_disconnected(now);
        let waited = delay(&e, now);
        let base = (MIN << k).min(MAX);
        assert!(
            (base / 2..=base).contains(&waited),
            "failure {k}: {waited} ms"
        );
        waits.push(waited);
    }
    // The jitter spreads the waits: they are not all the same once capped.
    assert!(waits[6..].iter().any(|w| *w != waits[5]), "{waits:?}");
}

#[test]
fn a_restored_relay_is_reconnected_at_once_and_kept() {
    let mut e = engine(&["ws://a", "ws://b"], 8).with_relay_data(Some("before".into()));
    let (at, _) = next_attempt(&mut e, 0);
    e.handle_disconnected(at);
    let (at, url) = next_attempt(&mut e, at);
    assert_eq!(url, "ws://b");
    e.handle_connected(at);
    e.handle_frame(welcome(Some("after")), at);
    // The engine asks for a fresh hello: same relay, no wait, no failure counted.
    assert!(e.is_offline());
    assert_eq!(e.poll_timeout(), Some(at));
    assert_eq!((e.relay_url(), e.failed_attempts()), ("ws://b", 0));
}

#[test]
fn disconnected_while_offline_changes_neither_the_relay_nor_the_time() {
    let mut e = engine(&["ws://a", "ws://b", "ws://c"], 9);
    let (at, _) = next_attempt(&mut e, 0);
    e.handle_disconnected(at);
    let due = e.poll_timeout();
    e.handle_disconnected(at + 1);
    assert_eq!(e.poll_timeout(), due);
    assert_eq!((e.relay_url(), e.failed_attempts()), ("ws://b", 1));
}

/// What happens to one connection attempt.
#[derive(Clone, Debug)]
enum Outcome {
    /// Unreachable, timed out, or refused by a limit: the socket never opened.
    Unreachable,
    /// The socket opened, but the relay went away before `welcome`.
    HandshakeFails,
    /// The relay answered; the connection lives this long (ms), then drops.
    Welcome(u16),
    /// The relay refused the token.
    Refused,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Unreachable),
        1 => Just(Outcome::HandshakeFails),
        2 => any::<u16>().prop_map(Outcome::Welcome),
        1 => Just(Outcome::Refused),
    ]
}

proptest! {
    /// For any run of failures, drops, successes and refusals, with any list (repeats
    /// included): every attempt goes to the relay after the previous attempt's one, so any `N`
    /// consecutive attempts (failed ones among them) try all `N` relays; and the wait before an
    /// attempt is never more than `backoff_max_ms`, and more than `backoff_min_ms` only after a
    /// refusal or a whole round of failures.
    #[test]
    fn no_relay_is_starved_and_no_wait_exceeds_the_maximum(
        urls in prop::collection::vec(0u8..6, 1..6),
        outcomes in prop::collection::vec(outcome(), 1..80),
        seed in any::<u64>(),
    ) {
        let urls: Vec<String> = urls.iter().map(|u| format!("ws://relay-{u}/v1/sync")).collect();
        let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
        let mut e = engine(&refs, seed);
        let n = e.relay_urls().len();
        let mut now = 0;
        let mut tried: Vec<usize> = Vec::new();
        let mut failed_in_a_row = 0usize;
        for o in outcomes {
            let (at, url) = next_attempt(&mut e, now);
            now = at;
            let index = e.relay_index();
            prop_assert_eq!(&url, &e.relay_urls()[index]);
            if let Some(previous) = tried.last() {
                prop_assert_eq!(
                    index,
                    (previous + 1) % n,
                    "attempt {} skipped a relay",
                    tried.len()
                );
            }
            tried.push(index);
            // Within any N consecutive failed attempts, every relay was tried.
            failed_in_a_row += 1;
            if failed_in_a_row >= n {
                let mut window: Vec<usize> = tried[tried.len() - n..].to_vec();
                window.sort_unstable();
                window.dedup();
                prop_assert_eq!(window.len(), n);
            }
            let refused = matches!(o, Outcome::Refused);
            match o {
                Outcome::Unreachable => e.handle_disconnected(now),
                Outcome::HandshakeFails => {
                    e.handle_connected(now);
                    e.handle_disconnected(now);
                }
                Outcome::Welcome(lives) => {
                    online(&mut e, now);
                    failed_in_a_row = 0;
                    now += i64::from(lives);
                    prop_assert!(!tick(&mut e, now));
                    e.handle_disconnected(now);
                }
                Outcome::Refused => e.handle_refused(codes::UNAUTHORIZED, "unauthorized", now),
            }
            let waited = delay(&e, now);
            prop_assert!((0..=MAX).contains(&waited), "waits {} ms", waited);
            let failed = e.failed_attempts() as usize;
            let round_over = failed > 0 && failed.is_multiple_of(n);
            if refused {
                prop_assert_eq!(waited, MAX);
            } else if !round_over {
                prop_assert!(waited <= MIN, "waits {} ms inside a round", waited);
            }
        }
    }
}
