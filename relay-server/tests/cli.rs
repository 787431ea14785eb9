//! The `relay-server` command line on a real data directory: provisioning, tokens, backup
//! (offline and through a running relay), check, and the clear error when the data is in use.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Output};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_relay-server");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr.
fn refused(args: &[&str], why: &str) -> String {
    let out = run(args);
    assert!(!out.status.success(), "{args:?} succeeded {why}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !stdout.contains("token"),
        "{args:?} printed a token: {stdout}"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Whether something listens on `listen` within 5 s.
fn comes_up(listen: &str) -> bool {
    for _ in 0..100 {
        if std::net::TcpStream::connect(listen).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Whether the relay at `listen` answers HTTP (plain) within 5 s: its start went through,
/// past everything it prints first (the socket accepts connections a little earlier, while
/// the start may still print the admin token).
fn answers_http(listen: &str) -> bool {
    use std::io::{Read, Write};
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(listen) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut reply = Vec::new();
            if s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").is_ok()
                && s.read_to_end(&mut reply).is_ok()
                && reply.starts_with(b"HTTP/1.")
            {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A local address no one listens on (yet).
fn free_listen() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

fn token_of(stdout: &str) -> String {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("token (shown once): "))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn provisioning_tokens_check_and_offline_backup() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let out = ok(&[
        "device", "add", "--store", "s1", "--name", "till 1", "--data", data,
    ]);
    assert!(out.contains("in store s1"), "{out}");
    let token = token_of(&out);
    assert!(token.starts_with("dev_"));
    let device = out.split_whitespace().nth(1).unwrap().to_owned();
    let list = ok(&["device", "list", "--data", data]);
    assert!(list.contains(&device) && list.contains("active"), "{list}");
    ok(&["device", "revoke", &device, "--data", data]);
    assert!(ok(&["device", "list", "--store", "s1", "--data", data]).contains("revoked"));
    assert!(token_of(&ok(&["token", "--name", "ops", "--data", data])).starts_with("adm_"));
    assert!(ok(&["check", "--data", data]).contains("0 errors"));
    let backup = dir.path().join("backup.redb");
    let out = ok(&["backup", "--to", backup.to_str().unwrap(), "--data", data]);
    assert!(out.contains("backed up 0 orders"), "{out}");
    assert!(backup.exists());
    // Refuses to overwrite.
    assert!(
        !run(&["backup", "--to", backup.to_str().unwrap(), "--data", data])
            .status
            .success()
    );
    // Bad input: a typed error, non-zero exit, nothing changed.
    assert!(
        !run(&[
            "device",
            "add",
            "--store",
            "not a store",
            "--name",
            "x",
            "--data",
            data
        ])
        .status
        .success()
    );
    assert!(
        !run(&["device", "revoke", "not-a-uuid", "--data", data])
            .status
            .success()
    );
}

#[test]
fn a_running_relay_backs_up_online_and_locks_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let admin = token_of(&ok(&["token", "--name", "ops", "--data", &data_s]));
    let listen = free_listen();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &listen, "--data", &data_s])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let up = comes_up(&listen);
    assert!(up, "relay did not start");
    // The data file is held by the relay: the CLI says so instead of corrupting anything.
    let out = run(&[
        "device", "add", "--store", "s1", "--name", "x", "--data", &data_s,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in use by a running relay"),
        "{out:?}"
    );
    // Online backup through the admin API.
    let backup = dir.path().join("online.redb");
    let out = ok(&[
        "backup",
        "--relay",
        &listen,
        "--token",
        &admin,
        "--to",
        backup.to_str().unwrap(),
    ]);
    assert!(out.contains("\"orders\":0"), "{out}");
    assert!(backup.exists());
    // A wrong token is refused, with the relay's JSON error.
    let other = dir.path().join("other.redb");
    let other_s = other.to_str().unwrap();
    let err = refused(
        &[
            "backup", "--relay", &listen, "--token", "adm_bad", "--to", other_s,
        ],
        "with a wrong token",
    );
    assert!(err.contains("HTTP 401 (unauthorized)"), "{err}");
    // https:// to a relay serving plain HTTP: said so.
    let https = format!("https://{listen}");
    let err = refused(
        &[
            "backup", "--relay", &https, "--token", &admin, "--to", other_s,
        ],
        "over TLS to a plain relay",
    );
    assert!(err.contains("did not answer with TLS"), "{err}");
    assert!(!other.exists());
    // The URL form of the same address works too.
    let http = format!("http://{listen}/");
    let out = ok(&[
        "backup", "--relay", &http, "--token", &admin, "--to", other_s,
    ]);
    assert!(out.contains("\"orders\":0"), "{out}");
    child.kill().unwrap();
    child.wait().unwrap();
    // The backup is a valid data directory.
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(&backup, restored.join("relay.redb")).unwrap();
    assert!(ok(&["check", "--data", restored.to_str().unwrap()]).contains("0 errors"));
}

/// `check` and `backup` cannot report success on nothing: a mistyped data path is an error
/// (non-zero exit) and creates nothing; a zero-byte `relay.redb` is not a relay database for
/// `check`, `backup` or `serve`, and none of them initialises over it.
#[test]
fn check_backup_and_serve_refuse_missing_or_empty_data() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    let missing_s = missing.to_str().unwrap().to_owned();
    let backup = dir.path().join("b.redb");
    let backup_s = backup.to_str().unwrap().to_owned();
    for args in [
        vec!["check", "--data", &missing_s],
        vec!["backup", "--data", &missing_s, "--to", &backup_s],
    ] {
        let err = refused(&args, "on a missing path");
        assert!(err.contains("no relay data"), "{args:?}: {err}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
        assert!(!backup.exists());
    }

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let file = empty.join("relay.redb");
    std::fs::write(&file, b"").unwrap();
    let empty_s = empty.to_str().unwrap().to_owned();
    let listen = free_listen();
    for args in [
        vec!["check", "--data", &empty_s],
        vec!["backup", "--data", &empty_s, "--to", &backup_s],
        vec!["serve", "--listen", &listen, "--data", &empty_s],
    ] {
        let err = refused(&args, "on a zero-byte file");
        assert!(err.contains("empty (0 bytes)"), "{args:?}: {err}");
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            0,
            "{args:?} wrote the file"
        );
    }

    // A valid relay with no orders is told apart from a missing one.
    let fresh = dir.path().join("fresh");
    let fresh_s = fresh.to_str().unwrap().to_owned();
    ok(&["token", "--name", "ops", "--data", &fresh_s]);
    let before = std::fs::read(fresh.join("relay.redb")).unwrap();
    let report = ok(&["check", "--data", &fresh_s]);
    assert!(report.contains("0 orders checked, 0 errors"), "{report}");
    // `check` opens the data read-only: not one byte of it changes.
    let after = std::fs::read(fresh.join("relay.redb")).unwrap();
    assert!(before == after, "check wrote to the data it checked");
}

/// The admin token is made by a start that goes through, not by one that fails, and also
/// when devices were provisioned before the first start.
#[test]
fn the_first_admin_token_comes_from_a_start_that_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    // Devices first: no admin token yet.
    ok(&[
        "device", "add", "--store", "s1", "--name", "till", "--data", &data_s,
    ]);
    // A start that fails: the port is taken. No token printed, none stored.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let err = refused(
        &["serve", "--listen", &busy, "--data", &data_s],
        "on a busy port",
    );
    assert!(err.contains("cannot listen"), "{err}");
    assert!(
        !err.contains("shown once"),
        "a failed start printed a token: {err}"
    );
    // A bad TLS key: the same.
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, "not a certificate").unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let args = [
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data",
        &data_s,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let err = refused(&args, "with a bad certificate");
    // Said in words about the TLS file, not as "cannot open relay data".
    assert!(
        err.contains("TLS certificate file") && err.contains("no PEM-encoded certificate"),
        "{err}"
    );
    assert!(!err.contains("relay data"), "{err}");
    assert!(
        !err.contains("shown once"),
        "a failed start printed a token: {err}"
    );
    // A start that succeeds prints one, once.
    let listen = free_listen();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &listen, "--data", &data_s])
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let up = answers_http(&listen);
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(up, "the relay did not come up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("shown once").count(), 1, "{err}");
}

/// `token --replace` replaces the operator's admin tokens with a new one, shown once; it does
/// not combine with `--store`.
#[test]
fn the_admin_token_can_be_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let first = token_of(&ok(&["token", "--name", "ops", "--data", &data_s]));
    let out = ok(&["token", "--name", "ops", "--replace", "--data", &data_s]);
    assert!(out.contains("replaced 1 admin token(s)"), "{out}");
    let second = token_of(&out);
    assert_ne!(first, second);
    refused(
        &[
            "token",
            "--name",
            "x",
            "--replace",
            "--store",
            "s1",
            "--data",
            &data_s,
        ],
        "with --store",
    );
}

/// `backup --relay https://...` through a relay serving TLS with a self-signed certificate:
/// with `--ca-cert` the backup is taken and opens as relay data; without it, or with the wrong
/// scheme or token, the command fails with a message naming the cause.
#[test]
fn backup_through_a_relay_serving_tls() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_s = data.to_str().unwrap().to_owned();
    let admin = token_of(&ok(&["token", "--name", "ops", "--data", &data_s]));
    let added = ok(&[
        "device", "add", "--store", "s1", "--name", "till", "--data", &data_s,
    ]);
    let device = added.split_whitespace().nth(1).unwrap().to_owned();
    // A certificate for the address the client dials.
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = dir.path().join("cert.pem");
    let key_pem = dir.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let listen = free_listen();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &listen,
            "--data",
            &data_s,
            "--tls-cert",
            cert_pem.to_str().unwrap(),
            "--tls-key",
            key_pem.to_str().unwrap(),
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let up = comes_up(&listen);
    let https = format!("https://{listen}");
    let ca = cert_pem.to_str().unwrap();
    let backup = dir.path().join("tls.redb");
    let backup_s = backup.to_str().unwrap();
    let backup_args = |relay: &str, token: &str, ca: Option<&str>| {
        let mut args = vec![
            "backup", "--relay", relay, "--token", token, "--to", backup_s,
        ];
        args.extend(ca.map(|ca| ["--ca-cert", ca]).into_iter().flatten());
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let attempt = |args: Vec<String>| run(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Without --ca-cert the self-signed certificate is not trusted.
    let untrusted = attempt(backup_args(&https, &admin, None));
    // Plain HTTP to the TLS port, and a wrong token.
    let plain = attempt(backup_args(&format!("http://{listen}"), &admin, Some(ca)));
    let wrong_token = attempt(backup_args(&https, "adm_wrong", Some(ca)));
    // With the certificate trusted.
    let trusted = attempt(backup_args(&https, &admin, Some(ca)));
    // Revocation through the same client.
    let revoked = run(&[
        "device",
        "revoke",
        &device,
        "--relay",
        &https,
        "--token",
        &admin,
        "--ca-cert",
        ca,
    ]);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(up, "the TLS relay did not start");

    let err = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!untrusted.status.success());
    let e = err(&untrusted);
    assert!(
        e.contains("TLS with") && e.contains("certificate is not signed by an authority"),
        "{e}"
    );
    assert!(e.contains("--ca-cert"), "{e}");
    assert!(!plain.status.success());
    assert!(err(&plain).contains("use https://"), "{}", err(&plain));
    assert!(!wrong_token.status.success());
    assert!(
        err(&wrong_token).contains("HTTP 401 (unauthorized)"),
        "{}",
        err(&wrong_token)
    );
    assert!(
        trusted.status.success(),
        "backup over TLS: {}",
        err(&trusted)
    );
    let out = String::from_utf8_lossy(&trusted.stdout);
    assert!(out.contains("\"orders\":0"), "{out}");
    assert!(
        revoked.status.success(),
        "revoke over TLS: {}",
        err(&revoked)
    );
    let out = String::from_utf8_lossy(&revoked.stdout);
    assert!(out.contains("\"revoked\":true"), "{out}");

    // The file is relay data.
    let restored = dir.path().join("restored");
    std::fs::create_dir(&restored).unwrap();
    std::fs::copy(&backup, restored.join("relay.redb")).unwrap();
    assert!(ok(&["check", "--data", restored.to_str().unwrap()]).contains("0 errors"));

    // https:// to a relay that does not serve TLS, and a relay that is not there.
    let nothing = free_listen();
    let e = err(&attempt(backup_args(
        &format!("https://{nothing}"),
        &admin,
        None,
    )));
    assert!(e.contains("connection refused"), "{e}");
}

/// A backup is not served by mistake: `serve` refuses it until `restore` made it relay data;
/// `restore` refuses a directory that holds relay data, puts the store in recovery, and
/// `release` ends it.
#[test]
fn a_backup_is_restored_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    ok(&[
        "device", "add", "--store", "s1", "--name", "till 1", "--data", data,
    ]);
    let backup = dir.path().join("backup.redb");
    let backup = backup.to_str().unwrap();
    ok(&["backup", "--to", backup, "--data", data]);

    // Copied by hand into a data directory and served: refused, naming `restore`.
    let copied = dir.path().join("copied");
    std::fs::create_dir_all(&copied).unwrap();
    std::fs::copy(backup, copied.join("relay.redb")).unwrap();
    let listen = free_listen();
    let err = refused(
        &[
            "serve",
            "--listen",
            &listen,
            "--data",
            copied.to_str().unwrap(),
        ],
        "on a backup file",
    );
    assert!(
        err.contains("is a backup") && err.contains("relay-server restore"),
        "{err}"
    );

    // Restore: not over existing data, then into a new directory.
    let err = refused(
        &["restore", "--from", backup, "--data", data],
        "over relay data",
    );
    assert!(err.contains("exists"), "{err}");
    let restored = dir.path().join("restored");
    let restored = restored.to_str().unwrap();
    let out = ok(&["restore", "--from", backup, "--data", restored]);
    assert!(out.contains("restored 0 orders"), "{out}");
    assert!(
        out.contains("store s1: new order numbers wait until its 1 till(s)"),
        "{out}"
    );
    assert!(ok(&["check", "--data", restored]).contains("0 errors"));
    let out = ok(&["release", "--store", "s1", "--data", restored]);
    assert!(
        out.contains("released; 1 till(s) never heard from"),
        "{out}"
    );
    assert!(ok(&["release", "--store", "s1", "--data", restored]).contains("not recovering"));
    // The restored data serves.
    let listen = free_listen();
    let mut child = Command::new(BIN)
        .args(["serve", "--listen", &listen, "--data", restored])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = comes_up(&listen);
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "the restored relay serves");
}
