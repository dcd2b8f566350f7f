//! The HTTP side: one module per protocol, all feeding the one engine API.
//!
//! Each protocol module parses its wire request, converts it into
//! a [`ChatRequest`] and [`GenOptions`], calls [`prepare`] (render, tokenize,
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
pub mod responses;
pub mod sampling;
pub mod sse;
pub mod tokenize;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::chat::output::{Output, OutputParser, OutputSpec};
use crate::chat::prompt::{self, PromptError};
use crate::chat::ChatRequest;
use crate::engine::{
    CancelOnDrop, EngineError, Event, FinishReason, GenerateRequest, JobHandle, SamplingParams,
    TokenLogprob, Usage,
};
use crate::server::AppState;
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

/// A job ready to submit, and how to read its reply.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    pub request: GenerateRequest,
    pub output: OutputSpec,
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

/// Render the conversation and tokenize it, checking its grammar (on the
/// calling thread: callers run it on the blocking pool).
fn render(
    state: &AppState,
    chat: ChatRequest,
    messages: &'static str,
) -> Result<prompt::Prepared, ApiError> {
    let has_format = chat.response_format.is_some();
    let prepared = prompt::prepare(&state.prompt_setup(), chat).map_err(|e| {
        let mut api = prompt_error(e, messages);
        if has_format && api.param.as_deref() == Some("tools") {
            api.param = Some("response_format".into());
        }
        api
    })?;
    if let Some(g) = &prepared.grammar {
        crate::engine::grammar::validate(state.engine.model(), g).map_err(|e| {
            ApiError::invalid_param(
                if has_format {
                    "response_format"
                } else {
                    "tools"
                },
                format!("the schema gives a grammar llama.cpp rejects: {e}"),
            )
        })?;
    }
    Ok(prepared)
}

/// The prompt's length in tokens, for the token-counting routes. No
/// context check: a client counts to learn whether its conversation still
/// fits, so a count past the context is an answer, not an error.
pub async fn count_prompt(
    state: &Arc<AppState>,
    chat: ChatRequest,
    messages: &'static str,
) -> Result<usize, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || render(&state, chat, messages).map(|p| p.tokens.len()))
        .await
        .map_err(|e| ApiError::internal(format!("prompt preparation panicked: {e}")))?
}

/// Render the conversation, tokenize it and check it fits. Runs on the
/// blocking pool: a 100k-token prompt takes a while to tokenize and must
/// not hold up the async threads (which keep heartbeats flowing).
/// `messages` names the history field in errors.
pub async fn prepare(
    state: &Arc<AppState>,
    chat: ChatRequest,
    opts: GenOptions,
    messages: &'static str,
) -> Result<PreparedJob, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        sampling::check_vocab(&opts.sampling, state.engine.model().n_vocab())?;
        let prepared = render(&state, chat, messages)?;
        let mut stop = opts.stop;
        stop.extend(prepared.stops.iter().cloned());
        let prompt = prepared.tokens;
        let n_ctx = state.engine.n_ctx() as usize;
        if prompt.len() >= n_ctx {
            return Err(ApiError::invalid_param(
                messages,
                format!(
                    "the prompt is {} tokens long, but the context holds only {n_ctx} tokens (prompt and output together)",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let max_tokens = state.output_room(prompt.len(), opts.max_tokens)?;
        let mut req = GenerateRequest::new(prompt, opts.sampling, max_tokens);
        req.stop = stop;
        req.prompt_text = prepared.text_exact.then_some(prepared.text);
        req.grammar = prepared.grammar;
        req.logprobs = opts.logprobs;
        req.ignore_eos = opts.ignore_eos;
        req.reasoning_budget = prepared.reasoning_budget;
        Ok(PreparedJob { request: req, output: prepared.output })
    })
    .await
    .map_err(|e| ApiError::internal(format!("prompt preparation panicked: {e}")))?
}

/// A finished non-streaming generation.
#[derive(Debug)]
pub struct Collected {
    pub output: Output,
    pub reason: FinishReason,
    pub usage: Usage,
    pub logprobs: Vec<TokenLogprob>,
}

/// Wait for a job to finish and gather its reply, read as `spec` says.
/// Dropping the future (the client went away) cancels the job. A reply
/// with tool calls is remembered for exact replay.
pub async fn collect(
    state: &AppState,
    job: JobHandle,
    spec: &OutputSpec,
    id_prefix: &'static str,
) -> Result<Collected, EngineError> {
    let JobHandle { mut events, cancel } = job;
    let _guard = CancelOnDrop(cancel);
    let mut parser = OutputParser::new(spec, id_prefix);
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(t) => {
                parser.push(&t);
            }
            Event::Logprobs(lp) => logprobs.extend(lp),
            Event::Finished { reason, usage, .. } => {
                parser.finish();
                let output = parser.into_output();
                state.remember_calls(&output);
                return Ok(Collected {
                    output,
                    reason,
                    usage,
                    logprobs,
                });
            }
            Event::Failed(err) => return Err(err),
            Event::Started { .. } | Event::PrefillProgress { .. } => {}
        }
    }
    Err(EngineError::Stopped)
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
