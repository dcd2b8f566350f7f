//! OpenAI legacy completions: `POST /v1/completions`.
//!
//! The prompt is raw text, continued as is: no chat template. It may be a
//! string, an array of strings, an array of token ids or an array of such
//! arrays (as llama-server and vLLM accept); each prompt gives `n` choices,
//! indexed `prompt * n + j`. The choices are separate engine jobs, run one
//! after another; streamed, they share one SSE stream (one pump, one
//! heartbeat timer, one cancel) through [`chain`].
//!
//! Sampling (`logit_bias`, penalties, `seed`, llama-server's extensions)
//! is shared with the other routes ([`super::sampling`]). Fields hearth
//! cannot honour are refused with a 400 rather than ignored where ignoring
//! them would change the output (`suffix`, `best_of` above `n`, `echo`
//! with `logprobs`); fields that cannot change it (`user`) are accepted and
//! ignored, as on the chat route.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::chain::{add_usage, chain, ChainJob};
use super::error::{ApiError, OpenAIError, Protocol};
use super::openai::{finish_reason, usage_json, ChunkHead, StopField};
use super::pipeline;
use super::reply::{collect, Ended, Logprobs, Reply, Wire};
use super::sampling::{check_vocab, SamplingFields, COMPLETIONS_REFUSED};
use super::sse;
use super::{check_max_tokens, check_stop, new_id, unix_now};
use crate::chat::output::{OutputEvent, OutputSpec};
use crate::engine::{FinishReason, GenerateRequest, SamplingParams, Token, TokenLogprob, Usage};
use crate::state::AppState;

/// `max_tokens` when the request gives none (the official API's default).
pub const DEFAULT_MAX_TOKENS: u32 = 16;
/// Most choices (`n`) per prompt.
pub const MAX_N: i64 = 8;
/// Most alternatives per token (`logprobs`), as in the official API.
pub const MAX_LOGPROBS: i64 = 5;
/// Most choices in one request, all prompts together: each is a job.
pub const MAX_CHOICES: usize = 128;

/// Metrics label of the route.
const ROUTE: &str = "completions";

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// String, array of strings, array of token ids, or array of arrays of
    /// token ids; checked by [`parse_prompts`] for clearer errors than an
    /// untagged enum gives.
    pub prompt: Value,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub best_of: Option<i64>,
    #[serde(default)]
    pub stop: Option<StopField>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<super::openai::StreamOptions>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// `logit_bias`, penalties, `seed` and llama-server's extensions; every
    /// other field too, checked for ones that may not be ignored.
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// One prompt as the client gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<Token>),
}

/// A validated request, before tokenizing.
#[derive(Debug)]
pub struct Parsed {
    pub prompts: Vec<PromptInput>,
    pub n: u32,
    /// None: not asked ([`DEFAULT_MAX_TOKENS`], within the server's cap).
    pub max_tokens: Option<u32>,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub echo: bool,
    pub logprobs: Option<u32>,
}

const PROMPT_SHAPE: &str = "prompt must be a string, an array of strings, an array of token ids or an array of arrays of token ids";

fn token_id(param: &str, v: &Value, n_vocab: i32) -> Result<Token, ApiError> {
    let id = v
        .as_i64()
        .ok_or_else(|| ApiError::invalid_param(param, format!("{PROMPT_SHAPE}; found {v}")))?;
    if id < 0 || id >= n_vocab as i64 {
        return Err(ApiError::invalid_param(
            param,
            format!("token id {id} is not in the vocabulary (0..{n_vocab})"),
        ));
    }
    Ok(id as Token)
}

fn token_list(param: &str, items: &[Value], n_vocab: i32) -> Result<Vec<Token>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::invalid_param(
            param,
            "a token id prompt must not be empty",
        ));
    }
    items.iter().map(|v| token_id(param, v, n_vocab)).collect()
}

/// The prompts of a request; token ids must lie in `0..n_vocab`.
pub fn parse_prompts(prompt: &Value, n_vocab: i32) -> Result<Vec<PromptInput>, ApiError> {
    let shape = |found: &Value| {
        ApiError::invalid_param(
            "prompt",
            format!("{PROMPT_SHAPE}; found {}", kind_of(found)),
        )
    };
    match prompt {
        Value::String(s) => Ok(vec![PromptInput::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => Err(ApiError::invalid_param(
            "prompt",
            "prompt must not be an empty array",
        )),
        Value::Array(items) if items.iter().all(Value::is_number) => Ok(vec![PromptInput::Tokens(
            token_list("prompt", items, n_vocab)?,
        )]),
        Value::Array(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(PromptInput::Text(s.clone())),
                Value::Array(ids) => Ok(PromptInput::Tokens(token_list("prompt", ids, n_vocab)?)),
                other => Err(shape(other)),
            })
            .collect(),
        other => Err(shape(other)),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Validate a request. `n_vocab` bounds token ids.
pub fn convert(req: CompletionRequest, n_vocab: i32) -> Result<Parsed, ApiError> {
    let prompts = parse_prompts(&req.prompt, n_vocab)?;
    let n = match req.n {
        None => 1,
        Some(n) if (1..=MAX_N).contains(&n) => n as u32,
        Some(n) => {
            return Err(ApiError::invalid_param(
                "n",
                format!("n must be between 1 and {MAX_N}, got {n}"),
            ))
        }
    };
    if let Some(b) = req.best_of {
        if b < n as i64 {
            return Err(ApiError::invalid_param(
                "best_of",
                format!("best_of must be at least n ({n}), got {b}"),
            ));
        }
        if b != n as i64 {
            return Err(ApiError::invalid_param(
                "best_of",
                "best_of greater than n is not supported",
            ));
        }
    }
    if prompts.len() * n as usize > MAX_CHOICES {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "at most {MAX_CHOICES} choices per request are supported (prompts × n), got {}",
                prompts.len() * n as usize
            ),
        ));
    }
    let max_tokens = req
        .max_tokens
        .map(|v| check_max_tokens("max_tokens", v))
        .transpose()?;
    let (sampling, ignore_eos) = super::openai_sampling(
        req.temperature,
        req.top_p,
        req.sampling,
        COMPLETIONS_REFUSED,
    )?;
    check_vocab(&sampling, n_vocab)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "suffix (insertion) is not supported by this server",
        ));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(l) if (0..=MAX_LOGPROBS).contains(&l) => Some(l as u32),
        Some(l) => {
            return Err(ApiError::invalid_param(
                "logprobs",
                format!("logprobs must be between 0 and {MAX_LOGPROBS}, got {l}"),
            ))
        }
    };
    let echo = req.echo.unwrap_or(false);
    if echo && logprobs.is_some() {
        return Err(ApiError::invalid_param(
            "echo",
            "echo with logprobs is not supported: this server reports log-probabilities of generated tokens only, not of the prompt",
        ));
    }
    let stop = match req.stop {
        None => vec![],
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(v)) => v,
    };
    let stop = check_stop("stop", stop)?;
    Ok(Parsed {
        prompts,
        n,
        max_tokens,
        sampling,
        ignore_eos,
        stop,
        echo,
        logprobs,
    })
}

/// One choice's job, ready to submit.
#[derive(Debug)]
pub struct Planned {
    /// The choice's `index`.
    pub index: u32,
    pub request: GenerateRequest,
    /// Text put before the generated text (`echo`).
    pub echo: Option<String>,
    /// The first choice of its prompt: its prompt counts in the usage.
    pub first_of_prompt: bool,
}

/// Tokenize every prompt (on the blocking pool, as [`super::prepare`]
/// does), check each fits the context, and plan one job per choice.
async fn plan(state: &Arc<AppState>, parsed: Parsed) -> Result<Vec<Planned>, ApiError> {
    let state = state.clone();
    tokio::task::spawn_blocking(move || {
        let model = state.engine.model();
        let n_ctx = state.engine.n_ctx() as usize;
        let mut out = Vec::with_capacity(parsed.prompts.len() * parsed.n as usize);
        for (p, prompt) in parsed.prompts.into_iter().enumerate() {
            // Text prompts: tokenized as llama-server does (BOS as the model
            // wants, special-token markup parsed). Token prompts: as given.
            let (tokens, text, prompt_text) = match prompt {
                PromptInput::Text(text) => {
                    let mut tokens = crate::chat::prompt::tokenize_rendered(state.engine.model(), &text);
                    if tokens.is_empty() {
                        // An empty prompt starts a new document, as in the
                        // official API.
                        tokens.extend(model.bos());
                    }
                    (tokens, text.clone(), Some(text))
                }
                PromptInput::Tokens(tokens) => {
                    let bytes: Vec<u8> = tokens.iter().flat_map(|&t| model.token_text(t)).collect();
                    (tokens, String::from_utf8_lossy(&bytes).into_owned(), None)
                }
            };
            if tokens.is_empty() {
                return Err(ApiError::invalid_param("prompt", "the prompt is empty and this model has no BOS token to start from"));
            }
            if tokens.len() >= n_ctx {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!(
                        "the prompt is {} tokens long, but the context holds only {n_ctx} tokens (prompt and output together)",
                        tokens.len()
                    ),
                )
                .with_code("context_length_exceeded"));
            }
            // Within the context and `--max-tokens`, as on the chat route;
            // not asking gets the official default, not the whole room.
            let room = pipeline::output_room(&state, tokens.len(), parsed.max_tokens)?;
            let max_tokens = if parsed.max_tokens.is_some() { room } else { room.min(DEFAULT_MAX_TOKENS) };
            for j in 0..parsed.n {
                let mut sampling = parsed.sampling.clone();
                // n choices of one prompt with one seed must still differ.
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(j as u64));
                let mut req = GenerateRequest::new(tokens.clone(), sampling, max_tokens);
                req.stop = parsed.stop.clone();
                req.prompt_text = prompt_text.clone();
                req.logprobs = parsed.logprobs;
                req.ignore_eos = parsed.ignore_eos;
                out.push(Planned {
                    index: p as u32 * parsed.n + j,
                    request: req,
                    echo: parsed.echo.then(|| text.clone()),
                    first_of_prompt: j == 0,
                });
            }
        }
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::internal(format!("prompt preparation panicked: {e}")))?
}

/// The index of the character of `text` that byte `at` falls in (or
/// `text`'s length in characters when past its end).
fn char_offset(text: &str, at: usize) -> usize {
    let mut b = at.min(text.len());
    while !text.is_char_boundary(b) {
        b -= 1;
    }
    text[..b].chars().count()
}

/// The legacy `logprobs` object for `tokens`, which begin at byte `start`
/// of `text`; `text_offset`s are in characters, plus `chars_before`.
pub fn legacy_logprobs(
    tokens: &[TokenLogprob],
    text: &str,
    start: usize,
    chars_before: usize,
) -> Value {
    let mut offsets = Vec::with_capacity(tokens.len());
    let mut at = start;
    for t in tokens {
        offsets.push(chars_before + char_offset(text, at));
        at += t.bytes.len();
    }
    let top: Vec<Value> = tokens
        .iter()
        .map(|t| {
            let mut m = Map::new();
            for alt in &t.top {
                m.entry(alt.token.clone()).or_insert(json!(alt.logprob));
            }
            // The API always includes the chosen token (so up to
            // `logprobs + 1` entries).
            m.entry(t.token.clone()).or_insert(json!(t.logprob));
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": tokens.iter().map(|t| t.token.as_str()).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": top,
        "text_offset": offsets,
    })
}

/// This module's routes (the server guards them with queue admission).
pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/v1/completions", post(completions))
}

/// `POST /v1/completions`
pub async fn completions(
    State(state): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Response, OpenAIError> {
    let req: CompletionRequest = ApiError::parse_json(&body)?;
    let (model, stream, include_usage) =
        super::openai::reply_settings(&state, &req.model, req.stream, &req.stream_options);
    let parsed = convert(req, state.engine.model().n_vocab())?;
    let want_logprobs = parsed.logprobs.is_some();
    let jobs = plan(&state, parsed).await?;
    let id = new_id("cmpl-");
    let created = unix_now();
    if stream {
        let choices = jobs.iter().map(|j| (j.index, j.echo.clone())).collect();
        let jobs = jobs
            .into_iter()
            .map(|j| ChainJob {
                request: j.request,
                first_of_prompt: j.first_of_prompt,
            })
            .collect();
        let job = chain(state.clone(), ROUTE, body, jobs);
        let wire = CompletionChunks::new(id, created, model, include_usage, want_logprobs, choices);
        // Raw text: no reasoning, no tool calls to read out of it.
        let reply = Reply::new(wire, OutputSpec::default(), "call_", state.replay.clone());
        return Ok(pipeline::stream_job(&state, job, reply));
    }
    let mut choices = Vec::with_capacity(jobs.len());
    let mut usage = Usage::default();
    let meta: Vec<(Option<String>, u32)> = jobs.iter().map(|j| (j.echo.clone(), j.index)).collect();
    let chained = jobs
        .into_iter()
        .map(|j| ChainJob {
            request: j.request,
            first_of_prompt: j.first_of_prompt,
        })
        .collect();
    // All prompts and choices are queued at once and decoded together.
    let handles = super::chain::submit_all(&state, ROUTE, &body, chained);
    for ((handle, first), (echo, index)) in handles.into_iter().zip(meta) {
        let done = collect(&state.replay, handle, &OutputSpec::default(), "call_").await?;
        add_usage(&mut usage, &done.usage, first);
        let echo = echo.unwrap_or_default();
        let text = format!("{echo}{}", done.output.text);
        let logprobs = if want_logprobs {
            legacy_logprobs(&done.logprobs, &text, echo.len(), 0)
        } else {
            Value::Null
        };
        choices.push(json!({
            "text": text,
            "index": index,
            "logprobs": logprobs,
            "finish_reason": finish_reason(&done.reason, false),
        }));
    }
    Ok(Json(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": state.fingerprint,
        "choices": choices,
        "usage": usage_json(&usage),
    }))
    .into_response())
}

/// The wire of `text_completion` chunks for the chained choices, in order.
struct CompletionChunks {
    head: ChunkHead,
    want_logprobs: bool,
    /// Each job's choice index and echo text, in run order.
    choices: Vec<(u32, Option<String>)>,
    /// Position in `choices` of the choice being generated.
    current: usize,
    /// Characters written so far in the current choice's text.
    chars: usize,
}

impl CompletionChunks {
    fn new(
        id: String,
        created: u64,
        model: String,
        include_usage: bool,
        want_logprobs: bool,
        choices: Vec<(u32, Option<String>)>,
    ) -> Self {
        let head = ChunkHead {
            id,
            object: "text_completion",
            created,
            model,
            fingerprint: None,
            include_usage,
        };
        Self {
            head,
            want_logprobs,
            choices,
            current: 0,
            chars: 0,
        }
    }

    fn index(&self) -> u32 {
        self.choices.get(self.current).map_or(0, |c| c.0)
    }

    fn text_chunk(&self, text: &str, logprobs: Value, finish: Option<&str>) -> SseEvent {
        sse::data(&self.head.chunk(json!([{ "text": text, "index": self.index(), "logprobs": logprobs, "finish_reason": finish }])))
    }

    fn end_choice(&mut self, reason: &FinishReason) -> SseEvent {
        self.text_chunk("", Value::Null, Some(finish_reason(reason, false)))
    }
}

impl Wire for CompletionChunks {
    const PROTOCOL: Protocol = Protocol::OpenAI;

    /// The current choice's echo, as its first chunk.
    fn opening(&mut self) -> Vec<SseEvent> {
        self.chars = 0;
        match self.choices.get(self.current).and_then(|c| c.1.clone()) {
            Some(echo) if !echo.is_empty() => {
                self.chars = echo.chars().count();
                vec![self.text_chunk(&echo, Value::Null, None)]
            }
            _ => vec![],
        }
    }

    fn output(&mut self, pieces: Vec<OutputEvent>, logprobs: &mut Logprobs) -> Vec<SseEvent> {
        let mut out = Vec::new();
        for piece in pieces {
            // Raw text is read with no reasoning and no tools: text only.
            let OutputEvent::Text(text) = piece else {
                continue;
            };
            let logprobs = if self.want_logprobs {
                legacy_logprobs(&std::mem::take(logprobs), &text, 0, self.chars)
            } else {
                Value::Null
            };
            self.chars += text.chars().count();
            out.push(self.text_chunk(&text, logprobs, None));
        }
        out
    }

    fn choice_end(&mut self, end: Ended<'_>) -> Vec<SseEvent> {
        let fin = self.end_choice(end.reason);
        self.current += 1;
        vec![fin]
    }

    fn ending(&mut self, end: Ended<'_>, usage: &Usage) -> Vec<SseEvent> {
        let mut out = vec![self.end_choice(end.reason)];
        out.extend(self.head.tail(usage));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TopLogprob;

    fn parse(v: Value) -> Result<Parsed, ApiError> {
        convert(serde_json::from_value(v).unwrap(), 1000)
    }

    #[test]
    fn accepts_every_prompt_shape() {
        let cases = [
            (json!("hi"), vec![PromptInput::Text("hi".into())]),
            (
                json!(["a", "b"]),
                vec![PromptInput::Text("a".into()), PromptInput::Text("b".into())],
            ),
            (json!([1, 2, 3]), vec![PromptInput::Tokens(vec![1, 2, 3])]),
            (
                json!([[1], [2, 3]]),
                vec![
                    PromptInput::Tokens(vec![1]),
                    PromptInput::Tokens(vec![2, 3]),
                ],
            ),
            (
                json!(["a", [4]]),
                vec![PromptInput::Text("a".into()), PromptInput::Tokens(vec![4])],
            ),
        ];
        for (prompt, want) in cases {
            assert_eq!(parse_prompts(&prompt, 1000).unwrap(), want, "{prompt}");
        }
        let p = parse(json!({"prompt": "x"})).unwrap();
        assert_eq!(
            (p.n, p.max_tokens, p.echo, p.logprobs),
            (1, None, false, None)
        );
    }

    #[test]
    fn rejects_what_openai_rejects() {
        let cases = [
            (json!({"prompt": 5}), "prompt"),
            (json!({"prompt": null}), "prompt"),
            (json!({"prompt": []}), "prompt"),
            (json!({"prompt": [1, "a"]}), "prompt"),
            (json!({"prompt": [[]]}), "prompt"),
            (json!({"prompt": [1000]}), "prompt"),
            (json!({"prompt": [-1]}), "prompt"),
            (json!({"prompt": [1.5]}), "prompt"),
            (json!({"prompt": "x", "n": 0}), "n"),
            (json!({"prompt": "x", "n": 9}), "n"),
            (json!({"prompt": "x", "max_tokens": -1}), "max_tokens"),
            (json!({"prompt": "x", "logprobs": 6}), "logprobs"),
            (json!({"prompt": "x", "echo": true, "logprobs": 1}), "echo"),
            (json!({"prompt": "x", "suffix": "y"}), "suffix"),
            (
                json!({"prompt": "x", "frequency_penalty": 3}),
                "frequency_penalty",
            ),
            (
                json!({"prompt": "x", "logit_bias": {"1000": 5}}),
                "logit_bias",
            ),
            (
                json!({"prompt": "x", "dry_multiplier": 1}),
                "dry_multiplier",
            ),
            (json!({"prompt": "x", "best_of": 2}), "best_of"),
            (json!({"prompt": "x", "temperature": 3}), "temperature"),
        ];
        for (body, param) in cases {
            let err = parse(body.clone()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
        assert!(parse(json!({"prompt": "x", "presence_penalty": 0, "suffix": "", "logit_bias": {}, "best_of": 1, "user": "u"})).is_ok());
        let p = parse(json!({"prompt": "x", "presence_penalty": 0.5, "logit_bias": {"999": -100}, "ignore_eos": true})).unwrap();
        assert_eq!(p.sampling.presence_penalty, 0.5);
        assert_eq!(p.sampling.logit_bias, vec![(999, -100.0)]);
        assert!(p.ignore_eos);
    }

    fn tok(s: &str, lp: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            token: s.into(),
            bytes: s.as_bytes().to_vec(),
            logprob: lp,
            top: top
                .iter()
                .map(|(t, l)| TopLogprob {
                    token: (*t).into(),
                    bytes: t.as_bytes().to_vec(),
                    logprob: *l,
                })
                .collect(),
        }
    }

    #[test]
    fn legacy_logprobs_offsets_count_characters_after_the_echo() {
        let tokens = [
            tok(" é", -0.5, &[(" é", -0.5), (" a", -1.0)]),
            tok("b", -2.0, &[(" x", -0.1)]),
        ];
        let v = legacy_logprobs(&tokens, "pré éb", "pré".len(), 0);
        assert_eq!(v["tokens"], json!([" é", "b"]));
        assert_eq!(v["text_offset"], json!([3, 5]));
        assert_eq!(v["top_logprobs"][0].as_object().unwrap().len(), 2);
        // The chosen token is always among the alternatives.
        assert_eq!(v["top_logprobs"][1], json!({" x": -0.1f32, "b": -2.0}));
        let v = legacy_logprobs(&tokens[1..], "b", 0, 7);
        assert_eq!(v["text_offset"], json!([7]));
    }

    #[test]
    fn the_stream_closes_each_choice_in_order() {
        use crate::api::sse::StreamAdapter;
        use crate::chat::replay::ReplayStore;
        use crate::engine::Event;

        let choices = vec![(0, Some("P".to_string())), (1, Some("Q".to_string()))];
        let wire = CompletionChunks::new("cmpl-1".into(), 0, "m".into(), true, false, choices);
        let replay = std::sync::Arc::new(ReplayStore::new(4));
        let mut a = Reply::new(wire, OutputSpec::default(), "call_", replay);
        let frames = |evs: Vec<SseEvent>| evs.len();
        // The echo of choice 0.
        assert_eq!(frames(a.opening()), 1);
        assert_eq!(frames(a.on_event(Event::Text("x".into()))), 1);
        assert_eq!(frames(a.on_event(Event::Text("\n".into()))), 1);
        assert_eq!(a.wire().index(), 0);
        // A progress event of the next choice closes nothing.
        assert_eq!(
            frames(a.on_event(Event::PrefillProgress {
                done: 4,
                total: 4,
                elapsed: std::time::Duration::ZERO
            })),
            0
        );
        assert_eq!(a.wire().index(), 0);
        // Finish chunk of choice 0, echo chunk of choice 1.
        let end = Event::ChoiceEnd {
            reason: FinishReason::MaxTokens,
        };
        assert_eq!(frames(a.on_event(end)), 2);
        assert_eq!(a.wire().index(), 1);
        assert_eq!(a.wire().chars, 1, "choice 1 starts after its echo");
        let end = a.on_event(Event::Finished {
            reason: FinishReason::EndOfTurn,
            usage: Usage::default(),
            timings: Default::default(),
        });
        // Finish chunk, usage chunk, [DONE].
        assert_eq!(frames(end), 3);
    }
}
