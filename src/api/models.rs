//! `GET /health`, `GET /v1/models` and `GET /v1/models/{id}`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::{AnthropicError, ApiError, OpenAIError};
use crate::state::AppState;

/// This module's routes.
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(list))
        .route("/v1/models/{id}", get(retrieve))
        .route("/slots", get(slots))
}

/// 200 while the engine serves (the router only exists once the model is
/// loaded); 503 with the reason once the engine has stopped.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let pid = state.engine.stats().engine_pid.load(Ordering::Relaxed);
    // The engine process, when it runs in one (`kill -9` it to see the
    // supervisor at work).
    if state.engine.is_alive() {
        let mut body = json!({ "status": "ok", "model": state.model_id });
        if pid != 0 {
            body["engine_pid"] = pid.into();
        }
        return Json(body).into_response();
    }
    let why = state
        .engine
        .stats()
        .stopped_why
        .lock()
        .ok()
        .and_then(|w| w.clone())
        .unwrap_or_else(|| "the engine stopped".into());
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "error", "model": state.model_id, "error": why })),
    )
        .into_response()
}

/// `GET /slots`: what each sequence of the engine and the queue are doing
/// (llama-server's route name). A copy the engine refreshed after its last
/// step: reading it never holds the engine up.
pub async fn slots(State(state): State<Arc<AppState>>) -> Json<Value> {
    let status = state.engine.status();
    Json(json!({
        "parallel": status.slots.len(),
        "slots": status.slots,
        "preempted": status.preempted,
        "waiting": status.waiting,
        "queued": state.engine.stats().queued.load(std::sync::atomic::Ordering::Relaxed),
        "kv_cells": status.kv_cells,
        "kv_used": status.kv_used,
        "steps": status.steps,
        "last_step_rows": status.last_step_rows,
    }))
}

/// The one model this server serves, in a shape both SDKs read: OpenAI's
/// (`object`, `created`, `owned_by`) and Anthropic's (`type`,
/// `display_name`, `created_at`, `max_input_tokens`, `max_tokens`, and the
/// page's `has_more`, `first_id`, `last_id`), plus llama-server's `meta`.
fn model_object(state: &AppState) -> Value {
    let model = state.engine.model();
    let n_ctx = state.engine.n_ctx();
    let created_at = time::OffsetDateTime::from_unix_timestamp(state.started_at as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        });
    json!({
        "id": state.model_id,
        "object": "model",
        "created": state.started_at,
        "owned_by": "hearth",
        "type": "model",
        "display_name": state.model_id,
        "created_at": created_at,
        "max_input_tokens": n_ctx,
        "max_tokens": state.service.limits.max_tokens.unwrap_or(n_ctx).min(n_ctx),
        "meta": {
            "n_ctx": n_ctx,
            "n_ctx_train": model.n_ctx_train(),
            "n_params": model.n_params(),
            "size": model.size_bytes(),
        },
    })
}

/// `GET /v1/models`
pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [model_object(&state)],
        "has_more": false,
        "first_id": state.model_id,
        "last_id": state.model_id,
    }))
}

/// `GET /v1/models/{id}`: the served model by its id; any other id is a
/// 404 (in Anthropic's shape for a client that sends `anthropic-version`).
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if id == state.model_id {
        return Json(model_object(&state)).into_response();
    }
    let err = ApiError::not_found(format!(
        "model '{id}' not found; this server serves '{}'",
        state.model_id
    ));
    if headers.contains_key("anthropic-version") {
        AnthropicError::from(err).into_response()
    } else {
        OpenAIError::from(err).into_response()
    }
}
