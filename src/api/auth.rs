//! API keys: `--api-key` and `--api-key-file`.
//!
//! When keys are configured, every route but `/health` wants one (the
//! status page at `/` asks for it itself, see `ui`), sent the
//! way either SDK sends it: `Authorization: Bearer KEY` (OpenAI) or
//! `x-api-key: KEY` (Anthropic). A missing or wrong key gets 401 in the
//! route's protocol shape.
//!
//! Keys are kept only as SHA-256 digests and a presented key is hashed and
//! compared against every configured digest with a branch-free fold, so the
//! time taken says nothing about how much of a key was right, nor which key
//! matched ([`crate::state::keys::ApiKeys`]).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use super::error::{ApiError, Protocol};
use crate::state::keys::ApiKeys;
use crate::state::AppState;

/// The keys a request presents: `x-api-key`, and the token of an
/// `Authorization: Bearer` header.
fn presented(headers: &HeaderMap) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for v in headers.get_all("x-api-key") {
        out.push(v.as_bytes());
    }
    for v in headers.get_all(AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            out.push(v[7..].trim_ascii());
        }
    }
    out
}

/// Whether the headers carry one of the keys. Every presented key is
/// checked (no early exit), so a request with one placeholder and one real
/// key passes and timing reveals nothing.
pub fn presents_key(keys: &ApiKeys, headers: &HeaderMap) -> bool {
    presented(headers)
        .iter()
        .fold(false, |ok, k| keys.accepts(k) | ok)
}

/// Middleware: refuse requests without a valid key when keys are set.
pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(keys) = &state.service.api_keys else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    // The status page checks the key itself: without one it still answers,
    // with 401 and a form asking for it.
    if path == "/health"
        || (state.service.activity.is_some() && crate::ui::answers_without_key(path))
    {
        return next.run(req).await;
    }
    if presents_key(keys, req.headers()) {
        return next.run(req).await;
    }
    let given = presented(req.headers());
    let message = if given.is_empty() {
        "this server requires an API key: send `Authorization: Bearer KEY` or `x-api-key: KEY`"
    } else {
        "invalid API key"
    };
    let mut resp =
        Protocol::for_path(req.uri().path()).error_response(ApiError::unauthorized(message));
    resp.headers_mut()
        .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_header_forms() {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("a"));
        h.insert(AUTHORIZATION, HeaderValue::from_static("bearer  b "));
        assert_eq!(presented(&h), vec![&b"a"[..], b"b"]);
        let mut basic = HeaderMap::new();
        basic.insert(AUTHORIZATION, HeaderValue::from_static("Basic Zm9v"));
        assert!(presented(&basic).is_empty());
    }
}
