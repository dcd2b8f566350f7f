//! Property-based fuzzing (proptest) of everything that reads untrusted
//! input or frames output: the four request parsers (chat completions,
//! Messages, Responses, legacy completions), the SSE writer, and every
//! tool-call parser.
//!
//! The properties: nothing panics; every rejected request is a client error
//! (4xx) in its protocol's shape; every accepted one is within the limits;
//! SSE frames round-trip whatever text they carry; tool-call parsers emit a
//! well-formed event sequence for any text in any split, and find a rendered
//! call again whatever the split.
//!
//! `cargo test --release` runs a short pass (256 cases per property). A
//! longer run:
//!
//! ```sh
//! PROPTEST_CASES=50000 cargo test --release --test fuzz
//! ```

use axum::response::IntoResponse;
use futures::StreamExt;
use hearth::api::completions::{self, PromptInput, MAX_CHOICES, MAX_LOGPROBS, MAX_N};
use hearth::api::error::{AnthropicError, ApiError, ErrorKind, OpenAIError, Protocol};
use hearth::api::{anthropic, openai, responses, sse, MAX_STOP_SEQUENCES};
use hearth::chat::tools::{ToolEvent, ToolFormat};
use hearth::chat::{ChatMessage, Role};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Any JSON value, a few levels deep, with keys that the request types
/// know about mixed in so the fuzzer reaches past the first field.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (-1e6f64..1e6).prop_map(|f| json!(f)),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(16),
            Just(17),
            Just(1 << 24),
            Just((1 << 24) + 1),
            Just(i64::MAX)
        ]
        .prop_map(|n| json!(n)),
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("user"),
            Just("assistant"),
            Just("system"),
            Just("developer"),
            Just("text"),
            Just("image"),
            Just("tool"),
            Just("tool_use"),
            Just("tool_result"),
            Just("function"),
            Just("auto"),
            Just("any"),
            Just("required"),
            Just("none"),
            Just("enabled"),
            Just("json_schema"),
            Just("json_object"),
            Just("{}"),
            Just("{\"a\":1}")
        ]
        .prop_map(|s| json!(s)),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "model", "messages", "role", "content", "type", "text", "max_tokens", "max_completion_tokens",
            "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_sequences", "stream",
            "stream_options", "include_usage", "n", "system", "metadata", "thinking",
            "tools", "tool_choice", "tool_calls", "tool_call_id", "function", "name", "arguments",
            "parameters", "input", "input_schema", "tool_use_id", "is_error", "response_format",
            "json_schema", "schema", "logprobs", "top_logprobs", "reasoning_effort", "budget_tokens",
            "parallel_tool_calls", "disable_parallel_tool_use", "id", "output_config", "output_format",
            "format", "effort", "instructions", "max_output_tokens", "previous_response_id", "truncation",
            "include", "reasoning", "background", "conversation", "prompt", "top_logprobs", "call_id", "output",
            "function_call", "function_call_output", "summary", "echo", "suffix", "best_of", "logit_bias",
            "presence_penalty", "frequency_penalty",
        ])
        .prop_map(str::to_string),
        1 => "[a-z_]{1,8}",
    ]
}

/// A valid request with some fields replaced by anything.
fn near_valid(base: Value) -> impl Strategy<Value = Value> {
    prop::collection::vec((key(), any_json()), 0..4).prop_map(move |edits| {
        let mut v = base.clone();
        for (k, val) in edits {
            v[k.as_str()] = val;
        }
        v
    })
}

fn openai_base() -> Value {
    json!({ "model": "m", "messages": [{ "role": "user", "content": "hi" }], "max_tokens": 8 })
}

fn responses_base() -> Value {
    json!({ "model": "m", "input": [{ "role": "user", "content": [{ "type": "input_text", "text": "hi" }] }], "max_output_tokens": 8 })
}

fn completions_base() -> Value {
    json!({ "model": "m", "prompt": ["Once upon", [1, 2, 3]], "max_tokens": 8, "n": 2, "logprobs": 2 })
}

/// The vocabulary size legacy prompts' token ids are checked against.
const N_VOCAB: i32 = 49152;

fn anthropic_base() -> Value {
    json!({ "model": "m", "max_tokens": 8, "messages": [{ "role": "user", "content": [{ "type": "text", "text": "hi" }] }] })
}

/// Request bodies: near-valid JSON, arbitrary JSON, valid JSON cut short,
/// and raw bytes.
fn bodies(base: Value) -> impl Strategy<Value = Vec<u8>> {
    let whole = base.to_string().into_bytes();
    prop_oneof![
        4 => near_valid(base).prop_map(|v| v.to_string().into_bytes()),
        2 => any_json().prop_map(|v| v.to_string().into_bytes()),
        1 => (0..whole.len()).prop_map(move |n| whole[..n].to_vec()),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn assert_client_error(err: &ApiError, protocol: Protocol) {
    assert_eq!(err.kind, ErrorKind::InvalidRequest, "{err:?}");
    let status = match protocol {
        Protocol::OpenAI => OpenAIError(err.clone()).into_response().status(),
        Protocol::Anthropic => AnthropicError(err.clone()).into_response().status(),
    };
    assert!(status.is_client_error(), "{status} for {err:?}");
    assert!(!err.message.is_empty());
}

proptest! {
    #[test]
    fn openai_requests_parse_or_are_rejected_as_4xx(body in bodies(openai_base())) {
        match ApiError::parse_json::<openai::ChatCompletionRequest>(&body).and_then(openai::convert) {
            Ok((chat, opts)) => {
                prop_assert!(!chat.messages.is_empty());
                prop_assert!(opts.logprobs.is_none_or(|n| n <= 20));
                prop_assert!(opts.max_tokens.is_none_or(|m| m >= 1 && m as i64 <= hearth::api::MAX_TOKENS_LIMIT));
                prop_assert!(opts.stop.len() <= MAX_STOP_SEQUENCES);
                prop_assert!((0.0..=2.0).contains(&opts.sampling.temperature));
            }
            Err(err) => assert_client_error(&err, Protocol::OpenAI),
        }
    }

    #[test]
    fn anthropic_requests_parse_or_are_rejected_as_4xx(body in bodies(anthropic_base()), keep_billing in any::<bool>()) {
        match ApiError::parse_json::<anthropic::MessagesRequest>(&body).and_then(|r| anthropic::convert(r, keep_billing, false, &hearth::api::betas::Betas::default())) {
            Ok((chat, opts)) => {
                prop_assert!(!chat.messages.is_empty());
                prop_assert!(opts.max_tokens.is_some_and(|m| m >= 1));
                prop_assert!(opts.stop.len() <= MAX_STOP_SEQUENCES);
                prop_assert!((0.0..=1.0).contains(&opts.sampling.temperature));
            }
            Err(err) => assert_client_error(&err, Protocol::Anthropic),
        }
    }

    #[test]
    fn responses_requests_parse_or_are_rejected_as_4xx(body in bodies(responses_base()), stored in any::<bool>()) {
        // A stored conversation (`previous_response_id`) to continue from, or none.
        let previous = [ChatMessage::new(Role::User, "earlier"), ChatMessage::new(Role::Assistant, "reply")];
        let previous = stored.then_some(&previous[..]);
        match ApiError::parse_json::<responses::ResponsesRequest>(&body).and_then(|r| responses::convert(r, previous, "m")) {
            Ok(c) => {
                prop_assert!(!c.chat.messages.is_empty());
                prop_assert!(c.stored_from <= c.chat.messages.len());
                prop_assert_eq!(c.conv_origins.len(), c.chat.messages.len());
                prop_assert!(c.opts.max_tokens.is_none_or(|m| m >= 1 && m as i64 <= hearth::api::MAX_TOKENS_LIMIT));
                prop_assert!((0.0..=2.0).contains(&c.opts.sampling.temperature));
                prop_assert!(c.opts.logprobs.is_none());
            }
            Err(err) => assert_client_error(&err, Protocol::OpenAI),
        }
    }

    #[test]
    fn completions_requests_parse_or_are_rejected_as_4xx(body in bodies(completions_base())) {
        match ApiError::parse_json::<completions::CompletionRequest>(&body).and_then(|r| completions::convert(r, N_VOCAB)) {
            Ok(p) => {
                prop_assert!(!p.prompts.is_empty());
                prop_assert!((1..=MAX_N as u32).contains(&p.n));
                prop_assert!(p.prompts.len() * p.n as usize <= MAX_CHOICES);
                for prompt in &p.prompts {
                    if let PromptInput::Tokens(ids) = prompt {
                        prop_assert!(ids.iter().all(|&t| (0..N_VOCAB).contains(&t)));
                    }
                }
                prop_assert!(p.logprobs.is_none_or(|n| n as i64 <= MAX_LOGPROBS));
                prop_assert!(!(p.echo && p.logprobs.is_some()));
                prop_assert!(p.max_tokens.is_none_or(|m| m >= 1 && m as i64 <= hearth::api::MAX_TOKENS_LIMIT));
                prop_assert!(p.stop.len() <= MAX_STOP_SEQUENCES);
                prop_assert!((0.0..=2.0).contains(&p.sampling.temperature));
            }
            Err(err) => assert_client_error(&err, Protocol::OpenAI),
        }
    }

    #[test]
    fn billing_header_stripping_never_panics(system in "(x-anthropic-billing-header: .{0,8}\n|.{0,10}\n?){0,4}") {
        let out = anthropic::strip_billing_header(&system);
        prop_assert!(!out.lines().any(|l| l.trim_start().to_ascii_lowercase().starts_with("x-anthropic-billing-header")));
    }

    #[test]
    fn sse_frames_round_trip_any_text(texts in prop::collection::vec(any::<String>(), 1..6), name in "[a-z_]{1,16}") {
        let mut events = Vec::new();
        let mut expected = Vec::new();
        for t in &texts {
            let v = json!({ "text": t });
            events.push(sse::data(&v));
            expected.push((None, v.clone()));
            events.push(sse::named(&name, &v));
            expected.push((Some(name.clone()), v));
        }
        let err = ApiError::invalid(texts.concat());
        for protocol in [Protocol::OpenAI, Protocol::Anthropic] {
            events.push(protocol.heartbeat());
            events.extend(protocol.error_events(&err));
        }
        let body = body_text(events);
        let frames: Vec<&str> = body.split("\n\n").filter(|f| !f.is_empty()).collect();
        // Each text gives exactly its two frames, whatever it contains.
        prop_assert_eq!(frames.len(), expected.len() + 5);
        for (frame, (event, value)) in frames.iter().zip(&expected) {
            let (got_event, data) = parse_frame(frame);
            prop_assert_eq!(got_event.as_deref(), event.as_deref());
            prop_assert_eq!(serde_json::from_str::<Value>(&data).unwrap(), value.clone());
        }
        let tail = &frames[expected.len()..];
        prop_assert_eq!(tail[0], ": keepalive");
        let openai_err: Value = serde_json::from_str(&parse_frame(tail[1]).1).unwrap();
        prop_assert_eq!(&openai_err["error"]["message"], &json!(texts.concat()));
        prop_assert_eq!(tail[2], "data: [DONE]");
        prop_assert_eq!(tail[3], "event: ping\ndata: {\"type\": \"ping\"}");
        let (event, data) = parse_frame(tail[4]);
        prop_assert_eq!(event.as_deref(), Some("error"));
        prop_assert_eq!(&serde_json::from_str::<Value>(&data).unwrap()["error"]["message"], &json!(texts.concat()));
    }

    #[test]
    fn tool_parsers_emit_well_formed_events_for_any_text(format in formats(), text in tool_text(), cuts in cuts()) {
        let events = run_parser(format, &text, &cuts);
        check_well_formed(&events)?;
    }

    #[test]
    fn tool_parsers_find_a_rendered_call_in_any_split(
        format in formats(),
        name in "[a-z][a-z0-9_]{0,11}",
        args in call_args(),
        cuts in cuts(),
    ) {
        let text = format.render_call(&name, &args.to_string());
        let events = run_parser(format, &text, &cuts);
        check_well_formed(&events)?;
        let calls: Vec<&ToolEvent> = events.iter().filter(|e| matches!(e, ToolEvent::CallStart { .. })).collect();
        prop_assert_eq!(calls.len(), 1, "{:?} from {:?}", events, text);
        prop_assert_eq!(calls[0], &ToolEvent::CallStart { index: 0, name: name.clone() });
        let joined: String = events.iter().filter_map(|e| match e { ToolEvent::CallArgs { fragment, .. } => Some(fragment.as_str()), _ => None }).collect();
        let parsed: Value = serde_json::from_str(&joined).map_err(|e| TestCaseError::fail(format!("{e}: {joined:?} from {text:?}")))?;
        // Compared after the same parse: serde_json reads floats to within
        // an ulp unless its float_roundtrip feature is on.
        let sent: Value = serde_json::from_str(&args.to_string()).unwrap();
        prop_assert_eq!(parsed, sent);
    }
}

fn body_text(events: Vec<axum::response::sse::Event>) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move {
        let stream =
            futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
        let mut body = axum::response::sse::Sse::new(stream)
            .into_response()
            .into_body()
            .into_data_stream();
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        String::from_utf8(out).unwrap()
    })
}

/// (event name, data joined by newlines) of one SSE frame.
fn parse_frame(frame: &str) -> (Option<String>, String) {
    let mut event = None;
    let mut data = Vec::new();
    for line in frame.split('\n') {
        if let Some(e) = line.strip_prefix("event: ") {
            event = Some(e.to_string());
        } else if let Some(d) = line.strip_prefix("data: ") {
            data.push(d);
        } else {
            panic!("unexpected SSE line {line:?} in {frame:?}");
        }
    }
    (event, data.join("\n"))
}

fn formats() -> impl Strategy<Value = ToolFormat> {
    prop::sample::select(vec![
        ToolFormat::Hermes,
        ToolFormat::Llama3Json,
        ToolFormat::Mistral,
        ToolFormat::DeepSeekV3,
        ToolFormat::DeepSeekV4Dsml,
        ToolFormat::Fallback,
    ])
}

/// Text made of the pieces tool markup is built from, plus anything.
fn tool_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        prop::sample::select(vec![
            "<tool_call>",
            "</tool_call>",
            "[TOOL_CALLS]",
            "[ARGS]",
            "<|python_tag|>",
            "{\"name\":",
            "\"arguments\":",
            "\"parameters\":",
            "{",
            "}",
            "[",
            "]",
            "\"",
            ",",
            ":",
            "\\",
            "\n",
            " ",
            "<｜tool▁calls▁begin｜>",
            "<｜tool▁call▁begin｜>",
            "<｜tool▁sep｜>",
            "<｜tool▁call▁end｜>",
            "<｜tool▁calls▁end｜>",
            "function",
            "```json",
            "```",
            "<｜DSML｜",
            "｜DSML｜>",
            "invoke",
            "parameter",
            "name=\"f\"",
            "string=\"true\"",
        ])
        .prop_map(str::to_string),
        ".{0,6}",
    ];
    prop::collection::vec(piece, 0..24).prop_map(|p| p.concat())
}

fn call_args() -> impl Strategy<Value = Value> {
    prop::collection::vec(("[a-z_]{1,8}", any_json()), 0..4)
        .prop_map(|kv| Value::Object(kv.into_iter().collect()))
}

/// Where to split the text (as fractions, so any text length works).
fn cuts() -> impl Strategy<Value = Vec<f64>> {
    prop::collection::vec(0.0f64..1.0, 0..8)
}

fn run_parser(format: ToolFormat, text: &str, cuts: &[f64]) -> Vec<ToolEvent> {
    let mut bounds: Vec<usize> = cuts
        .iter()
        .map(|c| (c * text.len() as f64) as usize)
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    bounds.push(text.len());
    bounds.sort_unstable();
    bounds.dedup();
    let mut parser = format.parser();
    let mut events = Vec::new();
    let mut at = 0;
    for b in bounds {
        events.extend(parser.push(&text[at..b]));
        at = b;
    }
    events.extend(parser.finish());
    events
}

/// Calls are numbered from 0 in order; arguments and ends refer to the open
/// call; every call that starts ends, once.
fn check_well_formed(events: &[ToolEvent]) -> Result<(), TestCaseError> {
    let mut open: Option<usize> = None;
    let mut next = 0;
    for e in events {
        match e {
            ToolEvent::Text(_) => {}
            ToolEvent::CallStart { index, name } => {
                prop_assert!(
                    open.is_none(),
                    "call {} starts inside call {:?}: {:?}",
                    index,
                    open,
                    events
                );
                prop_assert_eq!(*index, next, "{:?}", events);
                prop_assert!(!name.is_empty(), "{:?}", events);
                open = Some(*index);
                next += 1;
            }
            ToolEvent::CallArgs { index, .. } => {
                prop_assert_eq!(Some(*index), open, "{:?}", events)
            }
            ToolEvent::CallEnd { index } => {
                prop_assert_eq!(Some(*index), open, "{:?}", events);
                open = None;
            }
        }
    }
    prop_assert!(open.is_none(), "a call never ended: {:?}", events);
    Ok(())
}
