//! The HTTP side: one module per protocol, all feeding the one engine API.
//!
//! Each protocol module parses its wire request, converts it into
//! [`ChatMessage`]s and [`GenOptions`], calls [`prepare`] (render, tokenize,
//! check the context), submits the job and adapts the engine's events back
//! into its own wire format, streamed through [`sse`] or collected.

pub mod anthropic;
pub mod auth;
pub mod error;
pub mod guard;
pub mod models;
pub mod openai;
pub mod sse;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::chat::ChatMessage;
use crate::engine::{CancelOnDrop, EngineError, Event, FinishReason, GenerateRequest, JobHandle, SamplingParams, Usage};
use crate::server::AppState;
use error::ApiError;

/// Generation options common to every protocol, already validated.
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    pub sampling: SamplingParams,
    /// None: as many as the context allows.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
}

/// Largest `max_tokens` accepted; beyond it a request is a mistake.
pub const MAX_TOKENS_LIMIT: i64 = 1 << 24;

/// Validate a client's `max_tokens`.
pub fn check_max_tokens(param: &str, value: i64) -> Result<u32, ApiError> {
    if value < 1 {
        return Err(ApiError::invalid_param(param, format!("{param} must be at least 1, got {value}")));
    }
    if value > MAX_TOKENS_LIMIT {
        return Err(ApiError::invalid_param(param, format!("{param} must be at most {MAX_TOKENS_LIMIT}, got {value}")));
    }
    Ok(value as u32)
}

/// Most stop sequences a request may give (OpenAI's own limit is 4; other
/// servers allow more, and agents send a handful).
pub const MAX_STOP_SEQUENCES: usize = 16;

/// Longest stop sequence, in bytes: the stop scanner holds back this much
/// text, so a huge one would delay every token.
pub const MAX_STOP_BYTES: usize = 1024;

/// Validate a request's stop sequences.
pub fn check_stop(param: &str, stop: Vec<String>) -> Result<Vec<String>, ApiError> {
    if stop.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid_param(param, format!("at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {}", stop.len())));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_param(param, format!("a stop sequence may be at most {MAX_STOP_BYTES} bytes, got {}", long.len())));
    }
    Ok(stop)
}

/// Validate that a sampling value lies in `lo..=hi`.
pub fn check_range(param: &str, value: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if !value.is_finite() || value < lo || value > hi {
        return Err(ApiError::invalid_param(param, format!("{param} must be between {lo} and {hi}, got {value}")));
    }
    Ok(value)
}

/// Render the conversation, tokenize it and check it fits. Runs on the
/// blocking pool: a 100k-token prompt takes a while to tokenize and must
/// not hold up the async threads (which keep heartbeats flowing).
pub async fn prepare(state: &Arc<AppState>, messages: Vec<ChatMessage>, opts: GenOptions) -> Result<GenerateRequest, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let mut stop = opts.stop;
        let template = &state.template;
        let text = template.render(&messages, true)?;
        stop.extend(template.fallback_stops().iter().cloned());
        let prompt = state.tokenize_prompt(&text);
        let n_ctx = state.engine.n_ctx() as usize;
        if prompt.len() >= n_ctx {
            return Err(ApiError::invalid_param(
                "messages",
                format!(
                    "the prompt is {} tokens long, but the context holds only {n_ctx} tokens (prompt and output together)",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let room = (n_ctx - prompt.len()) as u32;
        // The server's own cap (`--max-tokens`): asking for more is a mistake;
        // asking for nothing gets the cap.
        let cap = state.service.limits.max_tokens;
        if let (Some(cap), Some(asked)) = (cap, opts.max_tokens) {
            if asked > cap {
                return Err(ApiError::invalid_param("max_tokens", format!("max_tokens must be at most {cap} on this server, got {asked}")));
            }
        }
        let room = cap.map_or(room, |c| c.min(room));
        let max_tokens = opts.max_tokens.map_or(room, |m| m.min(room));
        Ok(GenerateRequest { prompt, sampling: opts.sampling, max_tokens, stop, ignore_eos: false, prompt_text: Some(text) })
    })
    .await
    .map_err(|e| ApiError::internal(format!("prompt preparation panicked: {e}")))?
}

/// A finished non-streaming generation.
#[derive(Debug)]
pub struct Collected {
    pub text: String,
    pub reason: FinishReason,
    pub usage: Usage,
}

/// Wait for a job to finish and gather its text. Dropping the future (the
/// client went away) cancels the job.
pub async fn collect(job: JobHandle) -> Result<Collected, EngineError> {
    let JobHandle { mut events, cancel } = job;
    let _guard = CancelOnDrop(cancel);
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(t) => text.push_str(&t),
            Event::Finished { reason, usage, .. } => return Ok(Collected { text, reason, usage }),
            Event::Failed(err) => return Err(err),
            Event::Started { .. } | Event::PrefillProgress { .. } => {}
        }
    }
    Err(EngineError::Stopped)
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh id with a protocol prefix (`chatcmpl-`, `msg_`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}
