//! `GET /metrics` of a real relay, scraped while devices push bursts and drop their
//! connections mid-flight (issue 14, finding 6: `relay_receipts_pending` read -81 on a fresh
//! relay). Every scrape: no gauge is negative, each family has its HELP and TYPE lines, and
//! the commit histogram's buckets are cumulative. At the end: the in-flight gauges are back
//! at zero, and the names rendered are exactly those `docs/operations.md` lists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Client, TestRelay, connect_raw};
use crdt_model::wire::{ClientFrame, heads_to_wire};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One scrape: the `Content-Type` and the body.
async fn scrape(addr: SocketAddr) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap();
    (content_type, body.to_owned())
}

/// A parsed exposition: family name -> (type, help present), and the samples in order.
struct Exposition {
    families: BTreeMap<String, (String, bool)>,
    samples: Vec<(String, String, f64)>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut families: BTreeMap<String, (String, bool)> = BTreeMap::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(!help.trim().is_empty(), "empty help: {line}");
                families.entry(name.to_owned()).or_default().1 = true;
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                families.entry(name.to_owned()).or_default().0 = kind.to_owned();
            } else if !line.is_empty() && !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let (name, labels) = match series.split_once('{') {
                    Some((n, l)) => (n, l.trim_end_matches('}')),
                    None => (series, ""),
                };
                let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
                samples.push((name.to_owned(), labels.to_owned(), value));
            }
        }
        Self { families, samples }
    }

    /// The family a sample belongs to (a histogram's `_bucket`, `_sum`, `_count`).
    fn family_of<'a>(&'a self, sample: &str) -> Option<&'a str> {
        if let Some((name, _)) = self.families.get_key_value(sample) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = sample.strip_suffix(suffix)?;
            let (name, (kind, _)) = self.families.get_key_value(base)?;
            (kind == "histogram").then_some(name.as_str())
        })
    }

    fn value(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .find(|(n, l, _)| n == name && l.is_empty())
            .unwrap_or_else(|| panic!("no sample {name}"))
            .2
    }

    /// What every scrape must satisfy.
    fn check(&self, text: &str) {
        for (name, (kind, help)) in &self.families {
            assert!(*help, "{name} has no HELP line:\n{text}");
            assert!(
                ["gauge", "counter", "histogram"].contains(&kind.as_str()),
                "{name} has TYPE {kind:?}:\n{text}"
            );
        }
        for (name, labels, value) in &self.samples {
            let family = self
                .family_of(name)
                .unwrap_or_else(|| panic!("{name} has no TYPE line:\n{text}"));
            assert!(
                *value >= 0.0,
                "{name}{{{labels}}} = {value} (a {} below zero):\n{text}",
                self.families[family].0
            );
            if self.families[family].0 == "counter" {
                assert!(name.ends_with("_total"), "counter {name}");
            }
        }
        // The commit histogram: bounds rising, counts cumulative, +Inf last and equal to
        // the count.
        let buckets: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(n, _, _)| n == "relay_commit_seconds_bucket")
            .map(|(_, l, v)| {
                let le = l.strip_prefix("le=\"").unwrap().trim_end_matches('"');
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                (le, *v)
            })
            .collect();
        assert!(buckets.len() >= 2, "{text}");
        for pair in buckets.windows(2) {
            assert!(pair[0].0 < pair[1].0, "bucket bounds not rising: {pair:?}");
            assert!(pair[0].1 <= pair[1].1, "buckets not cumulative: {pair:?}");
        }
        let (last_le, last) = *buckets.last().unwrap();
        assert_eq!(last_le, f64::INFINITY);
        assert_eq!(last, self.value("relay_commit_seconds_count"));
    }
}

const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs");

/// The Monitor section of `docs/operations.md`.
fn monitor_section() -> String {
    let doc = std::fs::read_to_string(format!("{DOCS}/operations.md")).unwrap();
    let start = doc.find("## Monitor").unwrap();
    let end = doc[start + 1..]
        .find("\n## ")
        .map_or(doc.len(), |i| start + 1 + i);
    doc[start..end].to_owned()
}

/// The alerting rules (the YAML block) of the Monitor section.
fn alert_rules() -> String {
    let section = monitor_section();
    let rules = section.split("```yaml\n").nth(1).unwrap();
    rules[..rules.find("```").unwrap()].to_owned()
}

/// The metric names `docs/operations.md` lists in its Monitor section (labels dropped).
fn documented_names() -> BTreeSet<String> {
    let section = monitor_section();
    let list = section.split("`/metrics` exposes:").nth(1).unwrap();
    let list = &list[..list.find("\n\n").unwrap()];
    list.split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("relay_"))
        .map(|s| s.split('{').next().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_never_go_negative_through_pushes_and_disconnects() {
    let relay = TestRelay::start().await;
    let addr = relay.addr;
    let devices: Vec<_> = (0..4)
        .map(|i| relay.device("s1", &format!("till {i}")))
        .collect();

    // Scrapes all along, checking each.
    let done = Arc::new(AtomicBool::new(false));
    let scraper = {
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            let mut scrapes = 0u32;
            while !done.load(Ordering::Relaxed) {
                let (content_type, text) = scrape(addr).await;
                assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
                Exposition::parse(&text).check(&text);
                scrapes += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            scrapes
        })
    };

    for _round in 0..3 {
        let mut tasks = Vec::new();
        for (device, token) in devices.clone() {
            tasks.push(tokio::spawn(async move {
                let mut c = Client::connect(addr, device, &token).await;
                let mut first = c.create("s1");
                c.sync_until_receipted(&mut first).await;
                // A burst pushed without waiting for receipts, then the connection is dropped
                // with its writes in flight.
                for _ in 0..15 {
                    let order = c.create("s1");
                    let changes = order.doc().get_changes(&[]);
                    c.send(&ClientFrame::Changes {
                        order: order.id().to_string(),
                        changes: changes
                            .iter()
                            .map(|ch| ByteBuf::from(ch.raw_bytes().to_vec()))
                            .collect(),
                        heads: heads_to_wire(&order.heads()),
                        voucher: None,
                    })
                    .await;
                }
                drop(c);
            }));
        }
        // Bad tokens meanwhile: refused upgrades.
        for _ in 0..3 {
            assert_eq!(connect_raw(addr, Some("dev_bad")).await.err(), Some(401));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    // Everything answered and every connection gone: the in-flight gauges return to zero.
    let mut settled = None;
    for _ in 0..200 {
        let (_, text) = scrape(addr).await;
        let exposition = Exposition::parse(&text);
        exposition.check(&text);
        if exposition.value("relay_receipts_pending") == 0.0
            && exposition.value("relay_connections") == 0.0
        {
            settled = Some((exposition, text));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (exposition, text) = settled.expect("receipts_pending and connections return to 0");
    done.store(true, Ordering::Relaxed);
    let scrapes = scraper.await.unwrap();
    assert!(scrapes > 3, "only {scrapes} scrapes during the burst");

    assert!(
        exposition.value("relay_receipts_sent_total") >= 12.0,
        "{text}"
    );
    // Some of each burst was stored (a dropped connection's unread frames are not): more than
    // the 12 orders synced one by one and their numbers.
    assert!(
        exposition.value("relay_changes_accepted_total") > 24.0,
        "{text}"
    );
    assert!(exposition.value("relay_commits_total") >= 1.0, "{text}");
    assert!(
        exposition.value("relay_commit_seconds_count") >= 1.0,
        "{text}"
    );
    assert!(
        exposition.value("relay_auth_failures_total") >= 9.0,
        "{text}"
    );
    // The scrape's own socket is open.
    assert!(exposition.value("relay_sockets") >= 1.0, "{text}");

    // The names rendered are those the operations guide lists; per-code families appear once
    // they count something.
    let documented = documented_names();
    let rendered: BTreeSet<String> = exposition.families.keys().cloned().collect();
    let labelled = [
        "relay_changes_rejected_total",
        "relay_connections_refused_total",
        "relay_sync_refused_total",
    ];
    let undocumented: Vec<_> = rendered.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "not in docs/operations.md: {undocumented:?}"
    );
    let missing: Vec<_> = documented
        .difference(&rendered)
        .filter(|n| !labelled.contains(&n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "documented but not rendered: {missing:?}\n{text}"
    );
    relay.stop().await;
}

/// The alerts the operations guide documents name only metrics the relay exports (an alert on
/// a misspelt metric never fires), and, where promtool is installed, the rules load and pass
/// their unit tests (`docs/relay-alerts.test.yml`: each alert fires on the failure it is for
/// and stays quiet on a healthy busy relay).
#[test]
fn documented_alerts_use_exported_metrics_and_pass_promtool() {
    let rules = alert_rules();
    let documented = documented_names();
    let mut named = BTreeSet::new();
    for (i, _) in rules.match_indices("relay_") {
        let name: String = rules[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        named.insert(name);
    }
    assert!(named.len() >= 10, "{named:?}");
    for name in &named {
        let base = name
            .strip_suffix("_bucket")
            .or_else(|| name.strip_suffix("_sum"))
            .or_else(|| name.strip_suffix("_count"))
            .unwrap_or(name);
        assert!(
            documented.contains(name) || documented.contains(base),
            "an alert uses {name}, which the relay does not export"
        );
    }

    let promtool = std::process::Command::new("promtool")
        .arg("--version")
        .output();
    if !promtool.is_ok_and(|o| o.status.success()) {
        eprintln!("promtool not installed: alert rules not loaded (apt-get install prometheus)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.yml"), &rules).unwrap();
    std::fs::copy(
        format!("{DOCS}/relay-alerts.test.yml"),
        dir.path().join("test.yml"),
    )
    .unwrap();
    for args in [
        ["check", "rules", "rules.yml"],
        ["test", "rules", "test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
