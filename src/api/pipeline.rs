//! The request pipeline every protocol shares: render and tokenize the
//! conversation (on the blocking pool), size the reply, queue the job
//! watched for the metrics and the trace, and stream what it sends back
//! (read through [`super::reply`]).

use std::sync::Arc;

use axum::body::Bytes;
use axum::response::Response;

use super::error::ApiError;
use super::reply::{Reply, Wire};
use super::sampling;
use super::sse::{self, StreamOptions};
use super::{prompt_error, GenOptions};
use crate::chat::output::OutputSpec;
use crate::chat::prompt::{self, PromptSetup};
use crate::chat::ChatRequest;
use crate::engine::{GenerateRequest, JobHandle};
use crate::observe;
use crate::state::AppState;

/// How many tokens a reply to a `prompt_len`-token prompt may have:
/// what the client asked for, within the context and `--max-tokens`.
/// Asking for more than the server's cap is a mistake; asking for
/// nothing gets the cap.
pub fn output_room(
    state: &AppState,
    prompt_len: usize,
    asked: Option<u32>,
) -> Result<u32, ApiError> {
    let n_ctx = state.engine.n_ctx() as usize;
    let room = n_ctx.saturating_sub(prompt_len) as u32;
    let cap = state.service.limits.max_tokens;
    if let (Some(cap), Some(asked)) = (cap, asked) {
        if asked > cap {
            return Err(ApiError::invalid_param(
                "max_tokens",
                format!("max_tokens must be at most {cap} on this server, got {asked}"),
            ));
        }
    }
    let room = cap.map_or(room, |c| c.min(room));
    Ok(asked.map_or(room, |m| m.min(room)))
}

/// What the prompt builder needs.
pub fn prompt_setup(state: &AppState) -> PromptSetup<'_> {
    PromptSetup {
        template: &state.template,
        format: state.tool_format,
        model: state.engine.model(),
        specials: &state.specials,
        replay: &state.replay,
    }
}

/// Queue a prepared job, watched for the metrics and the trace. `route`
/// is the metrics label; `raw` the request body as received.
pub fn submit(
    state: &AppState,
    route: &'static str,
    raw: &Bytes,
    request: GenerateRequest,
) -> JobHandle {
    let mut jobs = submit_group(state, route, raw, vec![request]);
    jobs.pop().expect("one request, one job")
}

/// Queue the choices of one prompt together (one prefill, forked), each
/// watched like [`submit`]'s.
pub fn submit_group(
    state: &AppState,
    route: &'static str,
    raw: &Bytes,
    requests: Vec<GenerateRequest>,
) -> Vec<JobHandle> {
    let texts: Vec<Option<String>> = requests.iter().map(|r| r.prompt_text.clone()).collect();
    let jobs = state.engine.submit_group(requests);
    jobs.into_iter()
        .zip(texts)
        .map(|(job, text)| {
            let trace = state
                .service
                .trace
                .as_ref()
                .map(|log| (log.clone(), raw.clone(), text));
            let watch = observe::Watch {
                route,
                metrics: state.service.metrics.clone(),
                shutdown: state.service.shutdown.clone(),
                trace,
                activity: state.service.activity.clone(),
            };
            observe::watch(job, watch)
        })
        .collect()
}

/// A streaming response for a job: heartbeats on this server's
/// interval, counted, ended cleanly by a shutdown.
pub fn stream_job<W: Wire>(state: &AppState, job: JobHandle, reply: Reply<W>) -> Response {
    let opts = StreamOptions {
        shutdown: Some(state.service.shutdown.clone()),
        metrics: Some(state.service.metrics.clone()),
        activity: state.service.activity.clone(),
        ..StreamOptions::new(state.heartbeat, W::PROTOCOL)
    };
    sse::stream_job(job, reply, opts)
}

/// A job ready to submit, and how to read its reply.
#[derive(Debug, Clone)]
pub struct PreparedJob {
    pub request: GenerateRequest,
    pub output: OutputSpec,
}

/// Render the conversation and tokenize it, checking its grammar (on the
/// calling thread: callers run it on the blocking pool).
fn render(
    state: &AppState,
    chat: ChatRequest,
    messages: &'static str,
) -> Result<prompt::Prepared, ApiError> {
    let has_format = chat.response_format.is_some();
    let prepared = prompt::prepare(&prompt_setup(state), chat).map_err(|e| {
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
        let max_tokens = output_room(&state, prompt.len(), opts.max_tokens)?;
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
