//! The status page: `GET /`, one HTML page with a small script, served
//! from the binary (no build step, no external assets).
//!
//! The page shows the model and its memory, every live request (queued,
//! prefilling with its progress, decoding, and how long its client has
//! gone without a byte), the last requests, the sequences of the KV and
//! the KV snapshots in RAM and on disk. It stays current through
//! `GET /ui/events`, an SSE stream of [`Snapshot`]s a few times a second,
//! built from shared counters and copies only (`snapshot.rs`); each request's
//! own record is kept by the HTTP side (`activity.rs`).
//!
//! With `--api-key`, the data routes want the key like every route. A
//! browser cannot send a header from the address bar, so `/` answers
//! without a key too, with 401 and the page alone (no server data in it):
//! the page asks for the key, keeps it in `sessionStorage` and sends it as
//! a header with each `fetch` (the live stream is read with `fetch`, not
//! `EventSource`, which cannot send headers). The key never goes in a URL.
//! `--no-ui` leaves these routes out.

pub mod snapshot;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::stream::{self, Stream};
use tokio::time::MissedTickBehavior;

use crate::state::AppState;
pub use snapshot::Snapshot;

/// How often the live stream sends a snapshot.
pub const UPDATE_EVERY: Duration = Duration::from_millis(500);

/// The page's path, and its script's: both answer without a key (they
/// hold no server data; `/` says 401 when the key is missing).
pub const PAGE_PATH: &str = "/";
pub const SCRIPT_PATH: &str = "/ui/page.js";

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_JS: &str = include_str!("page.js");

/// The page's routes (merged into the app when the page is on).
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route(PAGE_PATH, get(page))
        .route(SCRIPT_PATH, get(script))
        .route("/ui/snapshot", get(snapshot_json))
        .route("/ui/events", get(events))
}

/// Whether the key middleware lets `path` through to the page's own
/// handlers when the page is on.
pub fn answers_without_key(path: &str) -> bool {
    path == PAGE_PATH || path == SCRIPT_PATH
}

/// Headers for the page and its script: nothing cached, nothing loaded
/// from elsewhere, no framing.
fn page_headers(content_type: &'static str) -> [(HeaderName, HeaderValue); 4] {
    [
        (CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (
            HeaderName::from_static("content-security-policy"),
            HeaderValue::from_static(
                "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                 form-action 'none'; frame-ancestors 'none'",
            ),
        ),
        (
            HeaderName::from_static("x-content-type-options"),
            HeaderValue::from_static("nosniff"),
        ),
    ]
}

/// `GET /`: the page. Without a valid key (when one is required) the same
/// page comes with 401, and it asks for the key before showing anything.
async fn page(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let status = match &state.service.api_keys {
        Some(keys) if !crate::api::auth::presents_key(keys, &headers) => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    };
    (status, page_headers("text/html; charset=utf-8"), PAGE_HTML).into_response()
}

/// `GET /ui/page.js`: the page's script.
async fn script() -> Response {
    (page_headers("text/javascript; charset=utf-8"), PAGE_JS).into_response()
}

/// The activity record, which exists whenever these routes are mounted.
fn activity(state: &AppState) -> Arc<crate::state::activity::Activity> {
    state.service.activity.clone().unwrap_or_default()
}

/// `GET /ui/snapshot`: one snapshot, as JSON.
async fn snapshot_json(State(state): State<Arc<AppState>>) -> Json<Snapshot> {
    Json(snapshot::build(&state, &activity(&state)))
}

/// `GET /ui/events`: a snapshot every [`UPDATE_EVERY`], as SSE `snapshot`
/// events, until the server starts shutting down (so the stream never
/// holds a drain up).
async fn events(
    State(state): State<Arc<AppState>>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let activity = activity(&state);
    let mut tick = tokio::time::interval(UPDATE_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stream = stream::unfold(
        (state, activity, tick),
        |(state, activity, mut tick)| async move {
            let shutdown = state.service.shutdown.clone();
            tokio::select! {
                biased;
                _ = shutdown.draining() => None,
                _ = tick.tick() => {
                    let event = snapshot_event(&snapshot::build(&state, &activity));
                    Some((Ok(event), (state, activity, tick)))
                }
            }
        },
    );
    Sse::new(stream)
}

fn snapshot_event(snap: &Snapshot) -> SseEvent {
    match serde_json::to_string(snap) {
        Ok(json) => SseEvent::default().event("snapshot").data(json),
        // Not reachable with these types (every map key is a string);
        // a comment keeps the stream going if it ever were.
        Err(err) => {
            tracing::warn!(cause = %err, "status snapshot not serialized");
            SseEvent::default().comment("snapshot unavailable")
        }
    }
}
