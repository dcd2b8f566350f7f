//! OpenAI Responses: `POST /v1/responses` and `GET /v1/responses/{id}`
//! (what Codex CLI speaks).
//!
//! The request's `instructions` and `input` items become one conversation:
//! messages as they are, consecutive `function_call` items (and the
//! assistant message before them) as one assistant turn with several calls,
//! `function_call_output` items as tool results, `reasoning` items as the
//! next assistant turn's reasoning. `previous_response_id` puts a stored
//! response's conversation (without its instructions, as the official API
//! does) before the new input. The reply comes back as output items
//! (reasoning, message, function calls), whole or as the official stream of
//! typed events with sequence numbers. With `truncation: auto`, a
//! conversation too long for the context loses its oldest whole turns.
//!
//! Hosted tools hearth cannot run (`web_search`, `local_shell`, `custom`,
//! ...) are left out of the prompt with a log line instead of failing the
//! request: Codex sends some of them with every request.

mod input;
mod output;
mod request;
mod stream;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::{ApiError, OpenAIError};
use super::pipeline::{self, count_prompt, prepare};
use super::reply::{collect, Reply};
use super::{new_id, unix_now, GenOptions};
use crate::chat::{ChatMessage, ChatRequest, Role};
use crate::state::responses::StoredResponse;
use crate::state::AppState;
use output::*;
use request::*;
use stream::*;

pub use input::{conversation, Conversation};
pub use request::{convert, Converted, Echo, ReasoningParam, ResponsesRequest};

/// The routes that read a request into a prompt (the server guards them
/// with queue admission).
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/input_tokens", post(input_tokens))
}

/// The routes over stored responses, which queue nothing.
pub fn stored_router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/responses/{id}", get(retrieve).delete(delete))
}

/// Parse and validate a request body, after the stored conversation its
/// `previous_response_id` names.
fn read_request(state: &AppState, body: &[u8]) -> Result<Converted, ApiError> {
    let req: ResponsesRequest = ApiError::parse_json(body)?;
    let previous = previous_response(state, req.previous_response_id.as_deref())?;
    convert(
        req,
        previous.as_ref().map(|p| p.messages.as_slice()),
        &state.model_id,
    )
}

/// `POST /v1/responses`
pub async fn create(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let converted = read_request(&state, &body)?;
    let Converted {
        chat,
        opts,
        conv_origins,
        stored_from,
        echo,
        stream,
    } = converted;
    let conversation: Vec<ChatMessage> = if echo.store {
        chat.messages[stored_from..].to_vec()
    } else {
        Vec::new()
    };
    let prepared = if echo.truncation == "auto" {
        prepare_truncated(&state, chat, opts, &conv_origins).await?
    } else {
        prepare(&state, chat, opts, "input")
            .await
            .map_err(|e| rename_param(e, &conv_origins))?
    };
    let job = pipeline::submit(&state, "responses", &body, prepared.request);
    let id = new_id("resp_");
    let created_at = unix_now();
    if stream {
        let wire = ResponseEvents {
            id,
            created_at,
            echo,
            items: Items::default(),
            conversation,
            state: state.clone(),
        };
        let reply = Reply::new(wire, prepared.output, "call_", state.replay.clone());
        return Ok(pipeline::stream_job(&state, job, reply));
    }
    let done = collect(&state.replay, job, &prepared.output, "call_").await?;
    let cut_short = incomplete(&done.reason);
    let output = output_items(&done.output, cut_short);
    let usage = usage_json(
        &done.usage,
        reasoning_tokens(&state, &done.output.reasoning, &done.usage),
    );
    let (status, details) = if cut_short {
        ("incomplete", json!({"reason": "max_output_tokens"}))
    } else {
        ("completed", Value::Null)
    };
    let object = echo.object(&id, created_at, status, output, usage, details, Value::Null);
    store(&state, &echo, &id, &object, conversation, &done.output);
    Ok(Json(object).into_response())
}

/// Where the conversation may be cut for `truncation: auto`: the start of
/// each user turn after the first message that is not a system message
/// (the instructions stay). Cutting at `cuts[k]` drops the `k + 1` oldest
/// turns whole (a call's results go with it) and keeps the last user turn.
fn turn_cuts(messages: &[ChatMessage]) -> (usize, Vec<usize>) {
    let first = messages
        .iter()
        .position(|m| m.role != Role::System)
        .unwrap_or(messages.len());
    let cuts = messages
        .iter()
        .enumerate()
        .skip(first + 1)
        .filter(|(_, m)| m.role == Role::User)
        .map(|(i, _)| i)
        .collect();
    (first, cuts)
}

/// `truncation: auto`: prepare the conversation as it is if it fits, else
/// with the fewest oldest turns dropped that make it fit, leaving room for
/// `max_output_tokens` (at most half the context). Found by bisection, so
/// a long history costs a few renderings, not one per turn.
async fn prepare_truncated(
    state: &Arc<AppState>,
    chat: ChatRequest,
    opts: GenOptions,
    origins: &[String],
) -> Result<pipeline::PreparedJob, ApiError> {
    let n_ctx = state.engine.n_ctx() as usize;
    let reserve = opts.max_tokens.map_or(0, |m| (m as usize).min(n_ctx / 2));
    let (first, cuts) = turn_cuts(&chat.messages);
    // Some(job) when the conversation cut before `cuts[k - 1]` (k = 0: whole) fits.
    let last = cuts.len();
    let attempt = |k: usize| {
        let mut chat = chat.clone();
        let mut origins = origins.to_vec();
        if k > 0 {
            chat.messages.drain(first..cuts[k - 1]);
            origins.drain(first..cuts[k - 1]);
        }
        let opts = opts.clone();
        async move {
            match prepare(state, chat, opts, "input").await {
                Ok(job) if job.request.prompt.len() + reserve <= n_ctx || k == last => {
                    Ok(Some(job))
                }
                Ok(_) => Ok(None),
                Err(e) if e.code == Some("context_length_exceeded") && k < last => Ok(None),
                Err(e) => Err(rename_param(e, &origins)),
            }
        }
    };
    if let Some(job) = attempt(0).await? {
        return Ok(job);
    }
    // Dropping every turn but the last fits (or fails with the error a
    // client must see); find the fewest that fit.
    let (mut lo, mut hi) = (0, cuts.len());
    let Some(mut best) = attempt(hi).await? else {
        return Err(ApiError::internal(
            "truncation: the last attempt neither fitted nor failed",
        ));
    };
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        match attempt(mid).await? {
            Some(job) => (hi, best) = (mid, job),
            None => lo = mid,
        }
    }
    // `hi` is at least 1 here: the whole conversation did not fit.
    tracing::info!(
        dropped = cuts[hi - 1] - first,
        of = chat.messages.len(),
        prompt_tokens = best.request.prompt.len(),
        "truncation: dropped the oldest messages to fit the context"
    );
    Ok(best)
}

/// The stored response `previous_response_id` names.
fn previous_response(
    state: &AppState,
    id: Option<&str>,
) -> Result<Option<Arc<StoredResponse>>, ApiError> {
    match id {
        None | Some("") => Ok(None),
        Some(id) => state.responses.get(id).map(Some).ok_or_else(|| {
            ApiError::invalid_param(
                "previous_response_id",
                format!("Previous response with id '{id}' not found."),
            )
            .with_code("previous_response_not_found")
        }),
    }
}

/// `POST /v1/responses/input_tokens`: the input's length in tokens, from
/// the same rendering as `POST /v1/responses` (whole: `truncation` is not
/// applied, and a count past the context is still a count).
pub async fn input_tokens(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let converted = read_request(&state, &body)?;
    let n = count_prompt(&state, converted.chat, "input")
        .await
        .map_err(|e| rename_param(e, &converted.conv_origins))?;
    Ok(Json(json!({ "object": "response.input_tokens", "input_tokens": n })).into_response())
}

/// `GET /v1/responses/{id}`
pub async fn retrieve(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, OpenAIError> {
    match state.responses.get(&id) {
        Some(stored) => Ok(Json(stored.object.clone()).into_response()),
        None => Err(ApiError::not_found(format!("Response with id '{id}' not found.")).into()),
    }
}

/// `DELETE /v1/responses/{id}`
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Response, OpenAIError> {
    if state.responses.remove(&id) {
        Ok(
            Json(json!({ "id": id, "object": "response.deleted", "deleted": true }))
                .into_response(),
        )
    } else {
        Err(ApiError::not_found(format!("Response with id '{id}' not found.")).into())
    }
}
