//! The router and the serve loop.
//!
//! `app(state)` is the one place routes live; `run` takes an already-bound
//! listener and a shutdown future, so tests bind port 0.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::cors::CorsLayer;

use crate::api::error::{AnthropicError, ApiError, OpenAIError};
use crate::api::{anthropic, models, openai};
use crate::chat::template::ChatTemplate;
use crate::engine::{EngineHandle, Token};

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub template: ChatTemplate,
    /// The id `/v1/models` reports.
    pub model_id: String,
    /// Written when nothing else was for this long on a stream.
    pub heartbeat: Duration,
    /// Unix time the server started.
    pub started_at: u64,
    /// OpenAI's `system_fingerprint`: identifies model and build.
    pub fingerprint: String,
    /// Keep Claude Code's volatile billing line in system prompts (it
    /// changes every request and would defeat prefix caching).
    pub keep_billing_header: bool,
}

impl AppState {
    /// Tokenize rendered prompt text. The template's markup becomes special
    /// tokens; BOS is added only when the tokenizer wants one and the
    /// template did not already write it.
    pub fn tokenize_prompt(&self, text: &str) -> Vec<Token> {
        let model = self.engine.model();
        let bos = model.bos_text();
        let add_bos = model.adds_bos() && (bos.is_empty() || !text.starts_with(&bos));
        model.tokenize(text, add_bos, true)
    }
}

/// All routes.
pub fn app(state: Arc<AppState>, cors: bool) -> Router {
    let router = Router::new()
        .route("/health", get(models::health))
        .route("/v1/models", get(models::list))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .fallback(not_found)
        .with_state(state);
    if cors {
        router.layer(CorsLayer::permissive())
    } else {
        router
    }
}

/// Unknown routes answer in the protocol their path suggests.
async fn not_found(method: Method, uri: Uri) -> Response {
    let err = ApiError::not_found(format!("no route for {method} {}", uri.path()));
    if uri.path().starts_with("/v1/messages") {
        AnthropicError(err).into_response()
    } else {
        OpenAIError(err).into_response()
    }
}

/// Serve until `shutdown` resolves.
pub async fn run(listener: TcpListener, router: Router, shutdown: impl Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}
