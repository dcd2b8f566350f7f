//! Running hearth like a service: access, CORS, limits, overload, shutdown
//! and observability, against the real binary and the real default model.
//! Every refusal is checked for its status and its protocol's error shape.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const KEY: &str = "sk-hearth-test-7f3a";

fn chat(content: &str, extra: Value) -> String {
    let mut body = json!({ "model": "m", "max_tokens": 8, "messages": [{ "role": "user", "content": content }] });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    body.to_string()
}

fn assert_openai_error(r: &Resp, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json();
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

fn assert_anthropic_error(r: &Resp, status: u16, kind: &str) {
    assert_eq!(r.status, status, "{r:?}");
    let body = r.json();
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
}

#[test]
fn api_keys_guard_every_route_but_health() {
    let dir = temp_dir("keys");
    let file = dir.join("keys");
    std::fs::write(&file, "# second key\nsk-from-file\n").unwrap();
    let srv = Server::start(
        &["--api-key", KEY, "--api-key-file", file.to_str().unwrap()],
        &[],
    );

    assert_eq!(srv.get("/health", &[]).status, 200);
    assert_openai_error(&srv.get("/v1/models", &[]), 401, "invalid_request_error");
    assert_eq!(
        srv.get("/v1/models", &[]).json()["error"]["code"],
        "invalid_api_key"
    );
    assert_openai_error(&srv.get("/metrics", &[]), 401, "invalid_request_error");
    assert_openai_error(
        &srv.post(
            "/v1/chat/completions",
            &[("authorization", "Bearer wrong")],
            &chat("hi", json!({})),
        ),
        401,
        "invalid_request_error",
    );
    assert_anthropic_error(
        &srv.post("/v1/messages", &[], &chat("hi", json!({}))),
        401,
        "authentication_error",
    );
    assert_anthropic_error(
        &srv.post(
            "/v1/messages",
            &[("x-api-key", "sk-hearth-test-7f3")],
            &chat("hi", json!({})),
        ),
        401,
        "authentication_error",
    );
    // Unknown routes do not reveal themselves without a key either.
    assert_openai_error(&srv.get("/nope", &[]), 401, "invalid_request_error");

    let bearer = format!("Bearer {KEY}");
    assert_eq!(
        srv.get("/v1/models", &[("authorization", &bearer)]).status,
        200
    );
    assert_eq!(srv.get("/metrics", &[("x-api-key", KEY)]).status, 200);
    assert_eq!(
        srv.get("/v1/models", &[("x-api-key", "sk-from-file")])
            .status,
        200
    );
    let r = srv.post(
        "/v1/messages",
        &[("x-api-key", KEY)],
        &chat("hi", json!({})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["type"], "message");
    let r = srv.post(
        "/v1/chat/completions",
        &[("authorization", &bearer)],
        &chat("hi", json!({})),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["object"], "chat.completion");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cors_allows_only_the_listed_origins() {
    let srv = Server::start(
        &[
            "--cors",
            "https://a.example,http://localhost:3000",
            "--api-key",
            KEY,
        ],
        &[],
    );
    let preflight = |origin: &str| {
        request(
            srv.addr,
            "OPTIONS",
            "/v1/messages",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "x-api-key,content-type,anthropic-version",
                ),
            ],
            b"",
        )
    };
    // A preflight carries no key; it is answered before the key check.
    let ok = preflight("https://a.example");
    assert!(ok.status < 300, "{ok:?}");
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://a.example"),
        "{ok:?}"
    );
    assert!(
        ok.header("access-control-allow-headers")
            .is_some_and(|h| h.contains("x-api-key")),
        "{ok:?}"
    );
    assert!(
        ok.header("access-control-allow-methods")
            .is_some_and(|h| h.contains("POST")),
        "{ok:?}"
    );
    let denied = preflight("https://evil.example");
    assert_eq!(
        denied.header("access-control-allow-origin"),
        None,
        "{denied:?}"
    );

    let allowed = srv.get(
        "/v1/models",
        &[("origin", "http://localhost:3000"), ("x-api-key", KEY)],
    );
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("http://localhost:3000")
    );
    let other = srv.get(
        "/v1/models",
        &[("origin", "https://evil.example"), ("x-api-key", KEY)],
    );
    assert_eq!(
        other.header("access-control-allow-origin"),
        None,
        "{other:?}"
    );
    // Errors carry CORS headers too, so a browser app can read them.
    let unauthorized = srv.get("/v1/models", &[("origin", "https://a.example")]);
    assert_eq!(unauthorized.status, 401);
    assert_eq!(
        unauthorized.header("access-control-allow-origin"),
        Some("https://a.example")
    );
}

#[test]
fn without_cors_no_origin_is_allowed_and_bad_flags_fail_at_start() {
    let srv = Server::start(&[], &[]);
    let r = srv.get("/v1/models", &[("origin", "https://a.example")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), None);
    drop(srv);
    for args in [
        &["--cors", "a.example"][..],
        &["--api-key-file", "/nonexistent/keys"],
        &["--api-key", ""],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["serve", "--port", "0", "--model"])
            .arg(default_model())
            .args(args)
            .env_remove("HEARTH_API_KEY")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("listening"),
            "{args:?}"
        );
    }
}

#[test]
fn limits_answer_in_the_protocols_shape() {
    let srv = Server::start(&["--max-body-mb", "1", "--max-tokens", "64"], &[]);
    // A declared length over the limit is refused before the body is read.
    // (The test sends only the headers: a server that closes with unread
    // bytes in its socket makes the kernel send a reset, which could
    // swallow the answer.)
    for (path, anthropic) in [("/v1/messages", true), ("/v1/chat/completions", false)] {
        let mut s = connect(srv.addr);
        let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1100000\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = parse_response(&raw);
        if anthropic {
            assert_anthropic_error(&r, 413, "request_too_large");
        } else {
            assert_openai_error(&r, 413, "invalid_request_error");
        }
    }

    // No declared length (chunked): the limit holds while reading. Exactly
    // 1 MiB, then one byte more.
    let mut s = connect(srv.addr);
    s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n").unwrap();
    let chunk = vec![b'a'; 64 * 1024];
    for _ in 0..16 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .unwrap();
        s.write_all(&chunk).unwrap();
        s.write_all(b"\r\n").unwrap();
    }
    s.write_all(b"1\r\na\r\n").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    assert_anthropic_error(&parse_response(&raw), 413, "request_too_large");

    // Nesting past serde_json's recursion limit (128) is a clean 400.
    let deep = |field: &str| {
        format!(
            "{{\"model\":\"m\",\"max_tokens\":5,\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"{field}\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        )
    };
    assert_anthropic_error(
        &srv.post("/v1/messages", &[], &deep("metadata")),
        400,
        "invalid_request_error",
    );
    let openai_deep = format!(
        "{{\"messages\":{}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    assert_openai_error(
        &srv.post("/v1/chat/completions", &[], &openai_deep),
        400,
        "invalid_request_error",
    );
    // Fields a route does not name are read too (one that would change
    // the reply is refused), so pathological nesting there is a clean 400
    // as well.
    assert_anthropic_error(
        &srv.post("/v1/messages", &[], &deep("unknown_field")),
        400,
        "invalid_request_error",
    );

    let stops: Vec<String> = (0..17).map(|i| format!("S{i}")).collect();
    assert_anthropic_error(
        &srv.post(
            "/v1/messages",
            &[],
            &chat("hi", json!({ "stop_sequences": stops })),
        ),
        400,
        "invalid_request_error",
    );
    assert_openai_error(
        &srv.post(
            "/v1/chat/completions",
            &[],
            &chat("hi", json!({ "stop": stops })),
        ),
        400,
        "invalid_request_error",
    );
    let r = srv.post(
        "/v1/chat/completions",
        &[],
        &chat("hi", json!({ "max_tokens": 65 })),
    );
    assert_openai_error(&r, 400, "invalid_request_error");
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    assert_eq!(
        srv.post(
            "/v1/chat/completions",
            &[],
            &chat("hi", json!({ "max_tokens": 64 }))
        )
        .status,
        200
    );
    // The server is still fine.
    assert_eq!(srv.get("/health", &[]).status, 200);
}

#[test]
fn half_a_request_cannot_hold_a_connection() {
    let srv = Server::start(&["--read-timeout-secs", "1"], &[]);
    // Headers that never end: the connection is closed, without a response.
    let mut s = connect(srv.addr);
    s.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: app")
        .unwrap();
    let t0 = Instant::now();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "closed after {took:?}"
    );
    assert!(
        raw.is_empty() || String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&raw)
    );

    // An idle connection that never sends anything is closed too.
    let mut idle = connect(srv.addr);
    let t0 = Instant::now();
    let _ = idle.read_to_end(&mut Vec::new());
    assert!(t0.elapsed() < Duration::from_secs(10));

    // Headers in full, then half the body: 408 in the route's shape.
    let mut s = connect(srv.addr);
    s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"mess").unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let r = parse_response(&raw);
    assert_openai_error(&r, 408, "invalid_request_error");
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(srv.get("/health", &[]).status, 200);
}

#[test]
fn a_full_queue_refuses_at_once() {
    // The first request stalls 5 s inside prefill compute; one may wait.
    let srv = Server::start(
        &["--max-queue", "1", "--heartbeat-secs", "0.5"],
        &[("HEARTH_FAULT", "prefill_stall:5:1")],
    );
    let running = json!({ "model": "m", "max_tokens": 8, "stream": true, "messages": [{ "role": "user", "content": "Say hi." }] });
    let mut first = Streaming::post(srv.addr, "/v1/messages", &running.to_string());
    first.read_until("message_start", Duration::from_secs(10));
    let mut second = Streaming::post(
        srv.addr,
        "/v1/chat/completions",
        &chat("Say hi.", json!({ "stream": true })),
    );
    second.read_until("chat.completion.chunk", Duration::from_secs(10));

    let t0 = Instant::now();
    let r = srv.post("/v1/chat/completions", &[], &chat("hi", json!({})));
    assert_openai_error(&r, 429, "rate_limit_error");
    assert!(r.header("retry-after").is_some(), "{r:?}");
    let r = srv.post("/v1/messages", &[], &chat("hi", json!({ "stream": true })));
    assert_anthropic_error(&r, 529, "overloaded_error");
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "refusals took {:?}",
        t0.elapsed()
    );
    // Other routes still answer. (The first request's opening event goes
    // out before the engine takes it: wait until it runs.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut metrics = srv.get("/metrics", &[]).body;
    while !metrics.contains("hearth_sequences_running 1") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        metrics = srv.get("/metrics", &[]).body;
    }
    assert!(metrics.contains("hearth_requests_in_flight 2"), "{metrics}");
    assert!(metrics.contains("hearth_queue_depth 1"), "{metrics}");

    let second = second.finish();
    assert_eq!(second.status, 200);
    assert!(
        second.body.contains(": keepalive"),
        "the queued stream got no heartbeat: {}",
        second.body
    );
    assert!(
        second.body.trim_end().ends_with("data: [DONE]"),
        "{}",
        second.body
    );
    let first = first.finish();
    assert!(first.body.contains("event: message_stop"), "{}", first.body);
    // The queue drained: the next request is served.
    assert_eq!(
        srv.post("/v1/messages", &[], &chat("hi", json!({}))).status,
        200
    );
    let metrics = srv.get("/metrics", &[]).body;
    assert!(
        metrics.contains("hearth_requests_total{route=\"messages\",status=\"529\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hearth_requests_total{route=\"chat_completions\",status=\"429\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("hearth_requests_in_flight 0"), "{metrics}");
}

#[test]
fn sigterm_mid_stream_ends_it_cleanly_and_saves_the_cache() {
    let kv = temp_dir("kv");
    let kv_arg = kv.to_str().unwrap();
    // The first request stalls 30 s inside its fifth decode step.
    let mut srv = Server::start(
        &[
            "--kv-disk-dir",
            kv_arg,
            "--shutdown-grace-secs",
            "1",
            "--heartbeat-secs",
            "0.5",
        ],
        &[("HEARTH_FAULT", "decode_stall:30:1")],
    );
    let prompt = long_prompt();
    let body = json!({ "model": "m", "max_tokens": 40, "stream": true, "temperature": 0, "messages": [{ "role": "user", "content": prompt }] });
    let mut running = Streaming::post(srv.addr, "/v1/messages", &body.to_string());
    running.read_until("content_block_delta", Duration::from_secs(30));
    let mut queued = Streaming::post(
        srv.addr,
        "/v1/chat/completions",
        &chat("Say hi.", json!({ "stream": true })),
    );
    queued.read_until("chat.completion.chunk", Duration::from_secs(10));

    let t0 = Instant::now();
    srv.signal("TERM");
    let running = running.finish();
    let queued = queued.finish();
    let status = srv
        .wait_exit(Duration::from_secs(20))
        .expect("hearth still running 20 s after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        t0.elapsed()
    );

    // Anthropic: an `error` event, and no torn body.
    let events: Vec<&str> = running
        .body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    let last = events.last().unwrap();
    assert!(last.starts_with("event: error\ndata: "), "{}", running.body);
    let err: Value = serde_json::from_str(last.trim_start_matches("event: error\ndata: ")).unwrap();
    assert_eq!(err["error"]["type"], "overloaded_error", "{err}");
    // OpenAI: `data: {"error": ...}` then `data: [DONE]`.
    let frames: Vec<&str> = queued
        .body
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .collect();
    assert_eq!(frames.last(), Some(&"data: [DONE]"), "{}", queued.body);
    let err: Value =
        serde_json::from_str(frames[frames.len() - 2].trim_start_matches("data: ")).unwrap();
    assert_eq!(err["error"]["type"], "server_error", "{err}");

    // The disk cache holds the stalled sequence, and a new server reuses it.
    let list = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["cache", "list", "--kv-disk-dir", kv_arg])
        .output()
        .unwrap();
    assert!(list.status.success());
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(
        listing.lines().any(|l| l.starts_with("1 snapshots")),
        "{listing}"
    );
    assert!(!listing.contains("invalid"), "{listing}");
    let srv = Server::start(&["--kv-disk-dir", kv_arg], &[]);
    // A follow-up turn: its prompt starts with the saved one. (An identical
    // prompt recomputes its last chunk by design, which here is all of it.)
    let messages = json!([
        { "role": "user", "content": prompt },
        { "role": "assistant", "content": "A fox jumps over a dog." },
        { "role": "user", "content": "Shorter." },
    ]);
    let body = json!({ "model": "m", "max_tokens": 4, "temperature": 0, "messages": messages });
    let r = srv.post("/v1/messages", &[], &body.to_string());
    assert_eq!(r.status, 200, "{r:?}");
    let reused = r.json()["usage"]["cache_read_input_tokens"]
        .as_u64()
        .unwrap();
    assert!(
        reused >= 256,
        "the restarted server reused {reused} tokens: {}",
        r.body
    );
    let _ = std::fs::remove_dir_all(&kv);
}

#[test]
fn metrics_trace_and_json_logs() {
    let dir = temp_dir("trace");
    let trace = dir.join("trace.jsonl");
    let srv = Server::start(
        &["--trace", trace.to_str().unwrap(), "--log-format", "json"],
        &[],
    );
    let r = srv.post(
        "/v1/chat/completions",
        &[],
        &chat("Name a colour.", json!({})),
    );
    assert_eq!(r.status, 200);
    let bad = srv.post(
        "/v1/messages",
        &[],
        &chat("hi", json!({ "temperature": 5 })),
    );
    assert_eq!(bad.status, 400);
    let stream = srv.post("/v1/messages", &[], &chat("hi", json!({ "stream": true })));
    assert!(stream.body.contains("message_stop"));

    let m = srv.get("/metrics", &[]);
    assert_eq!(m.status, 200);
    assert!(m
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    for line in [
        "hearth_requests_total{route=\"chat_completions\",status=\"200\"} 1",
        "hearth_requests_total{route=\"messages\",status=\"400\"} 1",
        "hearth_generations_total{route=\"chat_completions\",outcome=\"finished\"} 1",
        "hearth_generations_total{route=\"messages\",outcome=\"finished\"} 1",
        "hearth_stream_heartbeats_count 1",
    ] {
        assert!(
            m.body.lines().any(|l| l == line),
            "missing {line}:\n{}",
            m.body
        );
    }
    let value = |name: &str| -> f64 {
        let line = m
            .body
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    };
    assert!(value("hearth_generated_tokens_total") > 0.0);
    assert!(value("hearth_prompt_tokens_total") > 0.0);
    assert!(value("hearth_time_to_first_token_seconds_count") >= 1.0);

    // Trace lines are written as requests end.
    let until = Instant::now() + Duration::from_secs(5);
    let lines: Vec<Value> = loop {
        let text = std::fs::read_to_string(&trace).unwrap_or_default();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        if lines.len() >= 3 || Instant::now() > until {
            break lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(lines.len(), 3, "{lines:?}");
    let done = lines
        .iter()
        .find(|l| l["route"] == "chat_completions")
        .unwrap();
    assert_eq!(done["outcome"], "finished");
    assert_eq!(done["request"]["messages"][0]["content"], "Name a colour.");
    assert!(
        done["prompt"].as_str().unwrap().contains("Name a colour."),
        "{done}"
    );
    assert!(done["cache"]["source"].is_string(), "{done}");
    assert!(!done["output"].as_str().unwrap().is_empty(), "{done}");
    let refused = lines.iter().find(|l| l["outcome"] == "refused").unwrap();
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["request"]["temperature"], 5);
    assert_eq!(
        refused["response"]["error"]["type"],
        "invalid_request_error"
    );

    // Logs are JSON lines.
    let log = srv.log_text();
    let ready = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "engine ready");
    assert!(ready.is_some_and(|v| v["level"] == "INFO"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}
