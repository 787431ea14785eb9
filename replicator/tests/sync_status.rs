//! Every (status, trigger) pair of the local sync status machine against the table in
//! `docs/sync-status.md`: the documentation is the specification, and this test holds the code
//! to it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use replicator::{LocalSyncStatus, Trigger};

fn trigger_name(t: Trigger) -> String {
    serde_json::to_value(t)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

/// Parses the transition table: first column the status, one column per trigger, `·` where the
/// trigger does not apply.
fn documented() -> Vec<(LocalSyncStatus, Trigger, Option<LocalSyncStatus>)> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/sync-status.md"
    ))
    .unwrap();
    let start = doc.find("<!-- transitions -->").expect("table marker");
    let mut lines = doc[start..].lines().skip(1).filter(|l| l.starts_with('|'));
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split('|')
        .map(|c| c.trim().trim_matches('`').to_owned())
        .collect();
    let triggers: Vec<Trigger> = header[2..header.len() - 1]
        .iter()
        .map(|name| {
            *Trigger::ALL
                .iter()
                .find(|t| trigger_name(**t) == *name)
                .unwrap_or_else(|| panic!("unknown trigger {name}"))
        })
        .collect();
    lines.next();
    let mut out = Vec::new();
    for row in lines.take(LocalSyncStatus::ALL.len()) {
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let from = LocalSyncStatus::ALL
            .iter()
            .copied()
            .find(|s| s.as_str() == cells[1].trim_matches('*'))
            .unwrap();
        for (i, t) in triggers.iter().enumerate() {
            let cell = cells[i + 2];
            let to = if cell == "·" {
                None
            } else {
                Some(
                    LocalSyncStatus::ALL
                        .iter()
                        .copied()
                        .find(|s| s.as_str() == cell)
                        .unwrap(),
                )
            };
            out.push((from, *t, to));
        }
    }
    out
}

#[test]
fn the_code_follows_the_documented_table_for_every_pair() {
    let table = documented();
    assert_eq!(
        table.len(),
        LocalSyncStatus::ALL.len() * Trigger::ALL.len(),
        "every pair is documented"
    );
    for (from, trigger, to) in table {
        assert_eq!(
            from.next(trigger),
            to,
            "{from} --{}--> ",
            trigger_name(trigger)
        );
    }
}

#[test]
fn blocked_only_leaves_by_an_explicit_retry() {
    for t in Trigger::ALL {
        let next = LocalSyncStatus::Blocked.next(t);
        assert!(next.is_none() || t == Trigger::RetryBlocked, "{t:?}");
    }
}

#[test]
fn a_refusal_blocks_from_any_live_status() {
    for s in LocalSyncStatus::ALL {
        if s != LocalSyncStatus::Removed && s != LocalSyncStatus::Blocked {
            assert_eq!(
                s.next(Trigger::RelayRejected),
                Some(LocalSyncStatus::Blocked),
                "{s}"
            );
        }
    }
}
