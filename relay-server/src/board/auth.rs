//! Who is looking at the board, and what they may see.
//!
//! A back-office token (the admin's, or a store's back-office token) is accepted from the
//! `Authorization: Bearer` header or from the board's cookie, which the sign-in form sets:
//! `HttpOnly` (no script reads it), `SameSite=Strict` (no other site's page sends it, so no
//! other site can post the board's forms), `Path=/board`, and `Secure` when the relay serves
//! TLS. The cookie holds the token itself, as the header would: the relay keeps no sessions,
//! and revoking or replacing the token ends every sign-in made with it. A device token is
//! refused with a page that says so. Writes also check a present `Origin` header against
//! `Host`.

use std::fmt;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use crdt_model::StoreId;
use serde::Deserialize;

use super::{html, pages, problem, read_form};
use crate::error::RelayError;
use crate::server::AppState;
use crate::store::Principal;

/// The board's cookie.
const COOKIE: &str = "board_token";
/// How long a sign-in lasts, seconds (a long shift).
const SIGN_IN_SECS: u32 = 12 * 3600;
/// Longest token accepted from the form or the cookie, bytes (tokens are 68).
const MAX_TOKEN_LEN: usize = 256;

/// A signed-in back-office user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Viewer {
    /// The relay's operator: every store.
    Admin,
    /// The back office of one store.
    Store(StoreId),
}

impl Viewer {
    /// The store restriction of the hub's back-office path.
    pub(crate) fn scope(&self) -> Option<StoreId> {
        match self {
            Self::Admin => None,
            Self::Store(s) => Some(s.clone()),
        }
    }

    /// Whether the viewer may see `store`'s orders.
    pub(crate) fn sees(&self, store: &StoreId) -> bool {
        match self {
            Self::Admin => true,
            Self::Store(s) => s == store,
        }
    }

    /// The store named `asked`, if it is a valid id the viewer may see.
    pub(crate) fn store(&self, asked: &str) -> Option<StoreId> {
        StoreId::new(asked).ok().filter(|s| self.sees(s))
    }
}

impl fmt::Display for Viewer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin => f.write_str("the relay admin"),
            Self::Store(s) => write!(f, "the back office of store {s}"),
        }
    }
}

/// Why a request does not get the board.
#[derive(Debug)]
pub(crate) enum Refused {
    /// No token at all: sign in.
    NoToken,
    /// A token the relay does not know.
    Wrong,
    /// A revoked device's token.
    Revoked,
    /// A till's token: tills sync, they do not look at the board.
    Device,
    /// A write whose `Origin` is another site.
    CrossSite,
    /// The token could not be checked (storage failed).
    Failed(RelayError),
}

impl Refused {
    /// The page that says so.
    pub(crate) fn page(self) -> Response {
        match self {
            Self::NoToken => html(
                StatusCode::UNAUTHORIZED,
                pages::sign_in(Some("Sign in first.")),
            ),
            Self::Wrong => html(
                StatusCode::UNAUTHORIZED,
                pages::sign_in(Some(
                    "That token was not recognised. Use the admin token or your store's \
                     back-office token.",
                )),
            ),
            Self::Revoked => html(
                StatusCode::UNAUTHORIZED,
                pages::sign_in(Some("That token was revoked.")),
            ),
            Self::Device => problem(
                StatusCode::FORBIDDEN,
                "Device tokens cannot open the board",
                "This is a till's token: tills sync orders, they do not sign in to the board. \
                 Use the admin token or the store's back-office token \
                 (relay-server token --name NAME --store STORE).",
            ),
            Self::CrossSite => problem(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form was sent from another site.",
            ),
            Self::Failed(e) => super::relay_problem(&e),
        }
    }
}

/// The token of a request: the `Authorization` header first, then the board's cookie.
fn token_of(headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
    };
    bearer
        .or_else(cookie)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
}

/// Whether `token` could be a token at all (letters, digits, `_`; never put in a cookie
/// otherwise).
fn plausible(token: &str) -> bool {
    token.len() <= MAX_TOKEN_LEN
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Who `token` is, as the board sees it.
async fn check(state: &AppState, token: String) -> Result<Viewer, Refused> {
    if !plausible(&token) {
        state.metrics.auth_failures.inc();
        return Err(Refused::Wrong);
    }
    match state.store.authenticate(token).await {
        Ok(Principal::Admin) => Ok(Viewer::Admin),
        Ok(Principal::StoreAdmin { store }) => Ok(Viewer::Store(store)),
        Ok(Principal::Device { .. }) => Err(Refused::Device),
        Err(e) => {
            state.metrics.auth_failures.inc();
            Err(match e.inner() {
                RelayError::Unauthorized => Refused::Wrong,
                RelayError::Revoked => Refused::Revoked,
                _ => Refused::Failed(e),
            })
        }
    }
}

/// The signed-in viewer of a request.
pub(crate) async fn viewer(state: &AppState, headers: &HeaderMap) -> Result<Viewer, Refused> {
    let token = token_of(headers).ok_or(Refused::NoToken)?;
    check(state, token).await
}

/// The viewer of a request that changes something: also refused when its `Origin` is not
/// this relay (browsers send `Origin` with every form post).
pub(crate) async fn writer(state: &AppState, headers: &HeaderMap) -> Result<Viewer, Refused> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, rest)| rest);
        if host.is_none() || origin_host != host {
            return Err(Refused::CrossSite);
        }
    }
    viewer(state, headers).await
}

#[derive(Deserialize)]
pub(crate) struct SignInForm {
    token: String,
}

/// The board's `Set-Cookie` value; `value` is a [`plausible`] token (or empty).
fn cookie(state: &AppState, value: &str, max_age: u32) -> Response {
    let secure = if state.config.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let header = HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/board; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ));
    match header {
        Ok(c) => ([(header::SET_COOKIE, c)], Redirect::to("/board")).into_response(),
        Err(_) => problem(
            StatusCode::BAD_REQUEST,
            "Unusable token",
            "That token cannot be kept.",
        ),
    }
}

/// `POST /board/sign-in`: checks the token, keeps it in the board's cookie, goes to the board.
pub(crate) async fn sign_in(State(state): State<AppState>, body: Body) -> Response {
    let form: SignInForm = match read_form(body).await {
        Ok(f) => f,
        Err(page) => return page,
    };
    let token = form.token.trim().to_owned();
    if token.is_empty() {
        return Refused::NoToken.page();
    }
    match check(&state, token.clone()).await {
        Ok(viewer) => {
            tracing::info!(by = %viewer, "signed in to the board");
            cookie(&state, &token, SIGN_IN_SECS)
        }
        Err(refused) => refused.page(),
    }
}

/// `POST /board/sign-out`: forgets the cookie.
pub(crate) async fn sign_out(State(state): State<AppState>) -> Response {
    cookie(&state, "", 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_header_wins_over_the_cookie() {
        let h = headers(&[
            (header::COOKIE, "a=b; board_token=adm_cookie"),
            (header::AUTHORIZATION, "Bearer adm_header"),
        ]);
        assert_eq!(token_of(&h).as_deref(), Some("adm_header"));
        let h = headers(&[(header::COOKIE, "a=b; board_token=adm_cookie; c=d")]);
        assert_eq!(token_of(&h).as_deref(), Some("adm_cookie"));
        let h = headers(&[(header::COOKIE, "board_token_x=1; board_token=")]);
        assert_eq!(token_of(&h), None);
    }

    #[test]
    fn only_token_shaped_strings_are_checked() {
        assert!(plausible("adm_0123abcdef"));
        assert!(!plausible("adm_0; Path=/"));
        assert!(!plausible(&"a".repeat(MAX_TOKEN_LEN + 1)));
    }
}
