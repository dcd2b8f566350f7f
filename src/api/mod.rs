//! The HTTP side: one module per protocol, all feeding the one engine API.
//!
//! Each protocol module parses its wire request, converts it into
//! a [`crate::chat::ChatRequest`] and [`GenOptions`], calls [`pipeline::prepare`] (render, tokenize,
//! check the context), submits the job and adapts the engine's events back
//! into its own wire format, streamed through [`sse`] or collected.

pub mod anthropic;
pub mod auth;
pub mod betas;
pub mod chain;
pub mod completions;
pub mod error;
pub mod guard;
pub mod models;
pub mod openai;
pub mod pipeline;
pub mod reply;
pub mod responses;
pub mod sampling;
pub mod sse;
pub mod tokenize;

use std::time::{SystemTime, UNIX_EPOCH};

use crate::chat::prompt::PromptError;
use crate::engine::SamplingParams;
use error::ApiError;

/// Generation options common to every protocol, already validated.
#[derive(Debug, Clone, Default)]
pub struct GenOptions {
    pub sampling: SamplingParams,
    /// None: as many as the context allows.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// Log-probabilities with this many alternatives per token.
    pub logprobs: Option<u32>,
    /// llama-server's `ignore_eos`: generate past end-of-turn tokens, up
    /// to `max_tokens` (fixed-length replies for benchmarks).
    pub ignore_eos: bool,
}

/// Largest `max_tokens` accepted; beyond it a request is a mistake.
pub const MAX_TOKENS_LIMIT: i64 = 1 << 24;

/// Validate a client's `max_tokens`.
pub fn check_max_tokens(param: &str, value: i64) -> Result<u32, ApiError> {
    if value < 1 {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be at least 1, got {value}"),
        ));
    }
    if value > MAX_TOKENS_LIMIT {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be at most {MAX_TOKENS_LIMIT}, got {value}"),
        ));
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
        return Err(ApiError::invalid_param(
            param,
            format!(
                "at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {}",
                stop.len()
            ),
        ));
    }
    if let Some(long) = stop.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(ApiError::invalid_param(
            param,
            format!(
                "a stop sequence may be at most {MAX_STOP_BYTES} bytes, got {}",
                long.len()
            ),
        ));
    }
    Ok(stop)
}

/// Validate that a sampling value lies in `lo..=hi`.
pub fn check_range(param: &str, value: f32, lo: f32, hi: f32) -> Result<f32, ApiError> {
    if !value.is_finite() || value < lo || value > hi {
        return Err(ApiError::invalid_param(
            param,
            format!("{param} must be between {lo} and {hi}, got {value}"),
        ));
    }
    Ok(value)
}

/// OpenAI's `tool_choice` modes, as chat and Responses spell them.
pub fn tool_mode(mode: &str) -> Option<crate::chat::ToolChoice> {
    use crate::chat::ToolChoice;
    match mode {
        "auto" => Some(ToolChoice::Auto),
        "none" => Some(ToolChoice::None),
        "required" => Some(ToolChoice::Required),
        _ => None,
    }
}

/// Map a prompt builder's complaint to a 400 naming the field. `messages`
/// is the protocol's name for the history (`messages`, `input`).
pub(crate) fn prompt_error(err: PromptError, messages: &str) -> ApiError {
    match err {
        PromptError::History { index, message } => {
            ApiError::invalid_param(&format!("{messages}[{index}]"), message)
        }
        PromptError::ToolChoice(message) => ApiError::invalid_param("tool_choice", message),
        PromptError::Schema(e) => ApiError::invalid_param("tools", e.0),
        PromptError::Template(e) => e.into(),
    }
}

/// OpenAI's sampling fields (chat, completions, responses), validated:
/// `temperature` and `top_p` in OpenAI's ranges, the rest as on every
/// route ([`sampling::resolve`]). Also whether to ignore end-of-turn.
pub fn openai_sampling(
    temperature: Option<f32>,
    top_p: Option<f32>,
    fields: sampling::SamplingFields,
    refused: &[sampling::Refused],
) -> Result<(SamplingParams, bool), ApiError> {
    let defaults = SamplingParams::default();
    let temperature = temperature
        .map(|t| check_range("temperature", t, 0.0, 2.0))
        .transpose()?
        .unwrap_or(defaults.temperature);
    let top_p = top_p
        .map(|p| check_range("top_p", p, 0.0, 1.0))
        .transpose()?
        .unwrap_or(defaults.top_p);
    sampling::resolve(fields, temperature, top_p, refused)
}

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh id with a protocol prefix (`chatcmpl-`, `msg_`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}
