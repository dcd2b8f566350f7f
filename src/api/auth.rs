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
//! matched. (Hashing first also makes the comparison fixed-length; the
//! `sha2` crate is already here for cache keys.)

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::error::{ApiError, Protocol};
use crate::server::AppState;

/// The accepted keys, as digests.
#[derive(Clone)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ApiKeys({} keys)", self.digests.len())
    }
}

impl ApiKeys {
    /// `None` when no key is given: the server is open.
    pub fn new<I, S>(keys: I) -> Option<ApiKeys>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let digests: Vec<[u8; 32]> = keys
            .into_iter()
            .map(|k| k.as_ref().trim().to_string())
            .filter(|k| !k.is_empty())
            .map(|k| digest(k.as_bytes()))
            .collect();
        (!digests.is_empty()).then_some(ApiKeys { digests })
    }

    /// The keys from `--api-key` and the lines of `--api-key-file`
    /// (blank lines and `#` comments skipped).
    pub fn load(key: Option<&str>, file: Option<&Path>) -> Result<Option<ApiKeys>, String> {
        let mut keys: Vec<String> = key.map(str::to_string).into_iter().collect();
        if let Some(file) = file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read the API key file {}: {e}", file.display()))?;
            let from_file: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            if from_file.is_empty() {
                return Err(format!("the API key file {} holds no key", file.display()));
            }
            keys.extend(from_file);
        }
        if key.is_some_and(|k| k.trim().is_empty()) {
            return Err("--api-key is empty".into());
        }
        Ok(ApiKeys::new(keys))
    }

    /// Whether `presented` is one of the keys, in time independent of the
    /// keys' contents.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let d = digest(presented);
        let mut matched = 0u8;
        for k in &self.digests {
            let mut diff = 0u8;
            for (a, b) in d.iter().zip(k) {
                diff |= a ^ b;
            }
            // 1 when diff is 0, else 0, without a branch.
            matched |= (((diff as u16).wrapping_sub(1) >> 8) & 1) as u8;
        }
        std::hint::black_box(matched) == 1
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

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
    fn accepts_only_configured_keys() {
        let keys = ApiKeys::new(["sk-one", " sk-two "]).unwrap();
        assert!(keys.accepts(b"sk-one"));
        assert!(keys.accepts(b"sk-two"));
        for wrong in [&b""[..], b"sk-on", b"sk-one ", b"SK-ONE", b"sk-onex"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(ApiKeys::new(Vec::<String>::new()).is_none());
        assert!(ApiKeys::new([" "]).is_none());
    }

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

    #[test]
    fn loads_a_key_file() {
        let path =
            std::env::temp_dir().join(format!("hearth-keys-{}", uuid::Uuid::new_v4().simple()));
        std::fs::write(&path, "# rotated monthly\nsk-file\n\n").unwrap();
        let keys = ApiKeys::load(Some("sk-flag"), Some(&path))
            .unwrap()
            .unwrap();
        assert!(keys.accepts(b"sk-file") && keys.accepts(b"sk-flag"));
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(ApiKeys::load(None, Some(&path)).is_err());
        let _ = std::fs::remove_file(&path);
        assert!(ApiKeys::load(None, None).unwrap().is_none());
    }
}
