//! The command line's client for a running relay's admin API (`backup --relay`,
//! `device revoke --relay`): HTTP/1.1 through `ureq`, over TLS with rustls (ring, the provider
//! the server uses) for `https://`.
//!
//! A relay with a certificate from a public authority is checked against Mozilla's roots
//! (`webpki-roots`). A relay with a self-signed certificate, or one from a private CA, is
//! trusted with `--ca-cert FILE` (PEM): then only the certificates in that file are trusted.
//! Every failure is a [`ClientError`] naming its cause: connection refused, host not found,
//! the TLS failure (an untrusted, expired or misnamed certificate; a relay that does not speak
//! TLS), or the relay's own JSON error with its HTTP status.

use std::io::ErrorKind;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::error::ClientError;

/// How long connecting (TCP and the TLS handshake) may take. The request itself has no bound:
/// a backup of a large relay takes as long as copying its file.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest piece of a non-JSON error body quoted in a [`ClientError::Http`].
const QUOTED_BODY: usize = 200;

/// Where a running relay is: `https://host:port`, `http://host:port`, or a bare `host:port`
/// (plain HTTP, as before URLs were accepted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelayUrl {
    /// `scheme://authority`, no trailing slash.
    base: String,
}

impl RelayUrl {
    /// Whether the relay is reached over TLS.
    pub fn is_tls(&self) -> bool {
        self.base.starts_with("https://")
    }

    /// The URL of `path` (which starts with `/`) on the relay.
    pub fn join(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl std::fmt::Display for RelayUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

impl FromStr for RelayUrl {
    type Err = ClientError;

    fn from_str(given: &str) -> Result<Self, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            given: given.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = match given.split_once("://") {
            Some(("https", rest)) => ("https", rest),
            Some(("http", rest)) => ("http", rest),
            Some((other, _)) => {
                return Err(bad(&format!(
                    "the scheme is {other:?}; use https:// or http://"
                )));
            }
            None => ("http", given),
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.is_empty() {
            return Err(bad("no host; give e.g. https://relay.example:7400"));
        }
        if authority.contains(['/', '?', '#', '@']) || authority.contains(char::is_whitespace) {
            return Err(bad(
                "give only the scheme, host and port, e.g. https://relay.example:7400",
            ));
        }
        let base = format!("{scheme}://{authority}");
        let uri = ureq::http::Uri::from_str(&base).map_err(|e| bad(&e.to_string()))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host; give e.g. https://relay.example:7400"));
        }
        Ok(Self { base })
    }
}

/// A client for one relay's admin API, holding the bearer token.
#[derive(Debug)]
pub struct AdminClient {
    agent: ureq::Agent,
    url: RelayUrl,
    token: String,
}

impl AdminClient {
    /// A client for `url` sending `token`; with `ca_cert`, the relay's certificate must chain
    /// to a certificate in that PEM file (and to nothing else).
    pub fn new(
        url: RelayUrl,
        token: impl Into<String>,
        ca_cert: Option<&Path>,
    ) -> Result<Self, ClientError> {
        let roots = match ca_cert {
            Some(path) => RootCerts::new_with_certs(&read_ca(path)?),
            None => RootCerts::WebPki,
        };
        let tls = TlsConfig::builder().root_certs(roots).build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            // 4xx and 5xx are read, so the relay's JSON error reaches the operator.
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Self {
            agent,
            url,
            token: token.into(),
        })
    }

    /// POSTs `body` (JSON) to `path`; returns the relay's answer (a JSON text) on a 2xx.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<String, ClientError> {
        let answer = self
            .agent
            .post(self.url.join(path))
            .header("Authorization", format!("Bearer {}", self.token))
            .content_type("application/json")
            .send(body.to_string())
            .map_err(|e| self.failed(e))?;
        let status = answer.status().as_u16();
        let text = answer
            .into_body()
            .read_to_string()
            .map_err(|e| self.failed(e))?;
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err(http_error(status, &text))
        }
    }

    /// The [`ClientError`] for a failed exchange with the relay.
    fn failed(&self, e: ureq::Error) -> ClientError {
        let url = self.url.to_string();
        let unreachable = |reason: String, e: ureq::Error| ClientError::Unreachable {
            url: url.clone(),
            reason,
            source: Some(Box::new(e)),
        };
        match e {
            ureq::Error::Io(io) => {
                if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return ClientError::Tls {
                        reason: tls_reason(tls),
                        url,
                        source: Some(Box::new(tls.clone())),
                    };
                }
                match io.kind() {
                    ErrorKind::ConnectionRefused => ClientError::Refused { url },
                    ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                        if !self.url.is_tls() =>
                    {
                        let reason = format!(
                            "the connection closed without an HTTP answer ({io}); if the relay \
                             serves TLS, use https://"
                        );
                        unreachable(reason, ureq::Error::Io(io))
                    }
                    _ => unreachable(io.to_string(), ureq::Error::Io(io)),
                }
            }
            ureq::Error::Rustls(tls) => ClientError::Tls {
                reason: tls_reason(&tls),
                url,
                source: Some(Box::new(tls)),
            },
            ureq::Error::HostNotFound => unreachable("host not found".into(), e),
            ureq::Error::Timeout(t) => unreachable(format!("no answer in time (timeout: {t})"), e),
            ureq::Error::Protocol(_) if !self.url.is_tls() => unreachable(
                format!("the answer is not HTTP ({e}); if the relay serves TLS, use https://"),
                e,
            ),
            other => unreachable(other.to_string(), other),
        }
    }
}

/// The certificates of a PEM file.
fn read_ca(path: &Path) -> Result<Vec<Certificate<'static>>, ClientError> {
    let bad = |reason: String| ClientError::CaCert {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM-encoded certificate in the file".into()));
    }
    Ok(certs
        .iter()
        .map(|c| Certificate::from_der(c.as_ref()).to_owned())
        .collect())
}

/// A TLS failure in an operator's words, the library's own message last.
fn tls_reason(e: &rustls::Error) -> String {
    use rustls::CertificateError as C;
    let why = match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => {
                "the relay's certificate is not signed by an authority this client trusts \
                 (self-signed or from a private CA? pass that certificate with --ca-cert FILE)"
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => {
                "the relay's certificate is not valid for the host name in the URL (use a \
                 name the certificate lists)"
            }
            C::Expired | C::ExpiredContext { .. } => "the relay's certificate has expired",
            C::NotValidYet | C::NotValidYetContext { .. } => {
                "the relay's certificate is not valid yet (check this machine's clock)"
            }
            C::Revoked => "the relay's certificate is revoked",
            C::BadSignature | C::BadEncoding => "the relay's certificate is damaged",
            _ => "the relay's certificate was refused",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "the relay did not answer with TLS (does it serve plain HTTP? use http://)"
        }
        rustls::Error::AlertReceived(_) => "the relay refused the TLS handshake",
        _ => "the TLS handshake failed",
    };
    format!("{why} ({e})")
}

/// A [`ClientError::Http`] from the relay's answer: its JSON error if it is one.
fn http_error(status: u16, body: &str) -> ClientError {
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let error = json.as_ref().and_then(|j| j.get("error"));
    let field = |k: &str| {
        error
            .and_then(|e| e.get(k))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    };
    match (field("code"), field("message")) {
        (Some(code), Some(message)) => ClientError::Http {
            status,
            code,
            message,
        },
        _ => {
            let quoted: String = body.trim().chars().take(QUOTED_BODY).collect();
            ClientError::Http {
                status,
                code: "http".into(),
                message: if quoted.is_empty() {
                    "(no body)".into()
                } else {
                    quoted
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_urls() {
        let url = |s: &str| s.parse::<RelayUrl>().map(|u| u.to_string());
        assert_eq!(url("127.0.0.1:7400").unwrap(), "http://127.0.0.1:7400");
        assert_eq!(url("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(
            url("https://relay.example:7400").unwrap(),
            "https://relay.example:7400"
        );
        assert!("https://h:1".parse::<RelayUrl>().unwrap().is_tls());
        assert!(!"h:1".parse::<RelayUrl>().unwrap().is_tls());
        assert_eq!(url("https://[::1]:7400").unwrap(), "https://[::1]:7400");
        for bad in [
            "ftp://h:1",
            "https://",
            "https://h:1/v1/x",
            "",
            "h 1:2",
            "https://u@h:1",
        ] {
            assert!(
                matches!(bad.parse::<RelayUrl>(), Err(ClientError::BadUrl { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn http_errors_carry_the_relays_json_error() {
        let e = http_error(
            401,
            r#"{"error":{"code":"unauthorized","message":"bad token"}}"#,
        );
        assert!(
            matches!(&e, ClientError::Http { status: 401, code, message } if code == "unauthorized" && message == "bad token"),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            "the relay answered HTTP 401 (unauthorized): bad token"
        );
        let e = http_error(502, "<html>bad gateway</html>");
        assert!(
            e.to_string().contains("502 (http): <html>bad gateway"),
            "{e}"
        );
        assert!(http_error(500, "").to_string().contains("(no body)"));
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let url: RelayUrl = "https://h:1".parse().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = AdminClient::new(url.clone(), "t", Some(&missing)).unwrap_err();
        assert!(matches!(e, ClientError::CaCert { .. }), "{e:?}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = AdminClient::new(url, "t", Some(&empty)).unwrap_err();
        assert!(e.to_string().contains("no PEM-encoded certificate"), "{e}");
    }

    #[test]
    fn refused_connections_are_named() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url: RelayUrl = format!("127.0.0.1:{port}").parse().unwrap();
        let client = AdminClient::new(url, "t", None).unwrap();
        let e = client
            .post("/v1/admin/backup", &serde_json::json!({}))
            .unwrap_err();
        assert!(matches!(e, ClientError::Refused { .. }), "{e:?}");
    }
}
