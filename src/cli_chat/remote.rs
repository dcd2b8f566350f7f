//! `hearth chat --url`: a running server's OpenAI chat completions stream
//! (`stream: true` with usage), read with hyper's client. Reasoning
//! (`reasoning_content`), text and tool-call deltas become the same
//! [`ReplyEvent`]s the in-process engine gives.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::backend::{Reply, ReplyEvent, ReplyOptions};
use crate::chat::output::OutputEvent;
use crate::chat::{ChatMessage, Role, ToolSpec};
use crate::engine::Usage;

/// A server to talk to.
pub struct Remote {
    client: Client<HttpConnector, Full<Bytes>>,
    /// `http://host:port`, no trailing slash, no `/v1`.
    base: String,
    api_key: Option<String>,
    model: String,
}

/// `http://host:port[/v1][/]` to the server's base address.
pub fn base_url(url: &str) -> Result<String, String> {
    let url = url.trim();
    if url.starts_with("https://") {
        return Err(
            "https is not supported: --url speaks plain HTTP (a local server, or a tunnel to one)"
                .into(),
        );
    }
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--url must start with http://, got `{url}`"))?;
    let rest = rest.trim_end_matches('/');
    let rest = rest.strip_suffix("/v1").unwrap_or(rest);
    if rest.is_empty() {
        return Err(format!("--url has no host: `{url}`"));
    }
    let base = format!("http://{rest}");
    base.parse::<hyper::Uri>()
        .map_err(|e| format!("--url is not a URL: {e}"))?;
    Ok(base)
}

impl Remote {
    pub fn new(base: String, api_key: Option<String>, model: String) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base,
            api_key,
            model,
        }
    }

    /// Send the conversation; events follow on the returned reply.
    pub fn start(
        &self,
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        opts: &ReplyOptions,
    ) -> Reply {
        let (tx, rx) = mpsc::unbounded_channel();
        let body = request_body(&self.model, messages, tools, opts);
        let uri = format!("{}/v1/chat/completions", self.base);
        let mut req = hyper::Request::post(uri).header(CONTENT_TYPE, "application/json");
        if let Some(key) = &self.api_key {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        let client = self.client.clone();
        let task = tokio::spawn(async move {
            let fail = |tx: &mpsc::UnboundedSender<ReplyEvent>, m: String| {
                let _ = tx.send(ReplyEvent::Failed(m));
            };
            let req = match req.body(Full::new(Bytes::from(body.to_string()))) {
                Ok(r) => r,
                Err(e) => return fail(&tx, format!("bad request: {e}")),
            };
            let resp = match client.request(req).await {
                Ok(r) => r,
                Err(e) => return fail(&tx, format!("cannot reach the server: {e}")),
            };
            let status = resp.status();
            let mut body = resp.into_body();
            if !status.is_success() {
                let bytes = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return fail(&tx, error_message(status.as_u16(), &bytes));
            }
            let mut sse = SseLines::default();
            let mut reader = ChunkReader::default();
            while let Some(frame) = body.frame().await {
                let frame = match frame {
                    Ok(f) => f,
                    Err(e) => return fail(&tx, format!("the stream broke: {e}")),
                };
                let Some(data) = frame.data_ref() else {
                    continue;
                };
                for payload in sse.push(data) {
                    if payload == "[DONE]" {
                        let _ = tx.send(reader.finish());
                        return;
                    }
                    match serde_json::from_str::<Value>(&payload) {
                        Ok(v) => {
                            for ev in reader.chunk(&v) {
                                let failed = matches!(ev, ReplyEvent::Failed(_));
                                let _ = tx.send(ev);
                                if failed {
                                    return;
                                }
                            }
                        }
                        Err(e) => return fail(&tx, format!("the server sent bad JSON: {e}")),
                    }
                }
            }
            fail(&tx, "the stream ended before [DONE]".into());
        });
        Reply::new(rx, task)
    }
}

/// The chat completions request.
fn request_body(
    model: &str,
    messages: &[ChatMessage],
    tools: &[ToolSpec],
    opts: &ReplyOptions,
) -> Value {
    let msgs: Vec<Value> = messages.iter().map(wire_message).collect();
    let mut body = json!({
        "model": model,
        "messages": msgs,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": opts.temperature,
    });
    if let Some(m) = opts.max_tokens {
        body["max_tokens"] = json!(m);
    }
    if opts.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if !tools.is_empty() {
        body["tools"] = tools
            .iter()
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}}))
            .collect();
    }
    body
}

fn wire_message(m: &ChatMessage) -> Value {
    let role = match m.role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    let mut v = json!({"role": role, "content": m.content});
    if let Some(r) = &m.reasoning {
        v["reasoning_content"] = json!(r);
    }
    if !m.tool_calls.is_empty() {
        v["tool_calls"] = m
            .tool_calls
            .iter()
            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
            .collect();
    }
    if let Some(id) = &m.tool_call_id {
        v["tool_call_id"] = json!(id);
    }
    v
}

/// The server's error body, as one line.
fn error_message(status: u16, body: &[u8]) -> String {
    let detail = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    format!("the server answered {status}: {detail}")
}

/// SSE framing: bytes in, each event's `data` out (comments, such as
/// heartbeats, and other fields skipped).
#[derive(Default)]
struct SseLines {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseLines {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(d) = line.strip_prefix("data:") {
                self.data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
            }
        }
        out
    }
}

/// Chat completion chunks to reply events.
#[derive(Default)]
struct ChunkReader {
    /// Index of the tool call being streamed.
    open_call: Option<u64>,
    reason: Option<String>,
    usage: Usage,
}

impl ChunkReader {
    fn chunk(&mut self, v: &Value) -> Vec<ReplyEvent> {
        let mut out = Vec::new();
        if let Some(err) = v.get("error") {
            let m = err["message"].as_str().unwrap_or("unknown error");
            out.push(ReplyEvent::Failed(format!("the server failed: {m}")));
            return out;
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            let n = |x: &Value| x.as_u64().unwrap_or(0) as u32;
            self.usage = Usage {
                prompt_tokens: n(&u["prompt_tokens"]),
                cached_tokens: n(&u["prompt_tokens_details"]["cached_tokens"]),
                completion_tokens: n(&u["completion_tokens"]),
            };
        }
        let Some(choice) = v["choices"].get(0) else {
            return out;
        };
        let delta = &choice["delta"];
        if let Some(r) = delta["reasoning_content"]
            .as_str()
            .filter(|s| !s.is_empty())
        {
            out.push(ReplyEvent::Output(OutputEvent::Reasoning(r.into())));
        }
        if let Some(t) = delta["content"].as_str().filter(|s| !s.is_empty()) {
            self.close_call(&mut out);
            out.push(ReplyEvent::Output(OutputEvent::Text(t.into())));
        }
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = call["index"].as_u64().unwrap_or(0);
            if self.open_call != Some(index) {
                self.close_call(&mut out);
                self.open_call = Some(index);
                out.push(ReplyEvent::Output(OutputEvent::CallStart {
                    index: index as usize,
                    id: call["id"].as_str().unwrap_or_default().into(),
                    name: call["function"]["name"].as_str().unwrap_or_default().into(),
                }));
            }
            if let Some(a) = call["function"]["arguments"]
                .as_str()
                .filter(|s| !s.is_empty())
            {
                out.push(ReplyEvent::Output(OutputEvent::CallArgs {
                    index: index as usize,
                    fragment: a.into(),
                }));
            }
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            self.close_call(&mut out);
            self.reason = Some(r.into());
        }
        out
    }

    fn close_call(&mut self, out: &mut Vec<ReplyEvent>) {
        if let Some(i) = self.open_call.take() {
            out.push(ReplyEvent::Output(OutputEvent::CallEnd {
                index: i as usize,
            }));
        }
    }

    fn finish(&mut self) -> ReplyEvent {
        let mut out = Vec::new();
        self.close_call(&mut out);
        ReplyEvent::Finished {
            reason: self.reason.clone().unwrap_or_else(|| "stop".into()),
            usage: self.usage,
            timings: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:8000/v1/").unwrap(),
            "http://127.0.0.1:8000"
        );
        assert_eq!(base_url("http://h:1").unwrap(), "http://h:1");
        assert!(base_url("https://h").unwrap_err().contains("https"));
        assert!(base_url("h:1").unwrap_err().contains("http://"));
        assert!(base_url("http://").is_err());
    }

    #[test]
    fn sse_framing_skips_comments_and_joins_split_lines() {
        let mut s = SseLines::default();
        assert!(s.push(b": ping\n\ndata: {\"a\"").is_empty());
        assert_eq!(
            s.push(b":1}\n\ndata: [DONE]\n\n"),
            vec!["{\"a\":1}", "[DONE]"]
        );
    }

    #[test]
    fn chunks_become_reply_events() {
        let mut r = ChunkReader::default();
        let evs = r.chunk(&json!({"choices": [{"delta": {"reasoning_content": "hm"}}]}));
        assert!(matches!(&evs[0], ReplyEvent::Output(OutputEvent::Reasoning(t)) if t == "hm"));
        let evs = r.chunk(&json!({"choices": [{"delta": {"tool_calls": [
            {"index": 0, "id": "c1", "function": {"name": "f", "arguments": "{\"x\""}}]}}]}));
        assert!(
            matches!(&evs[0], ReplyEvent::Output(OutputEvent::CallStart { name, .. }) if name == "f")
        );
        assert!(
            matches!(&evs[1], ReplyEvent::Output(OutputEvent::CallArgs { fragment, .. }) if fragment == "{\"x\"")
        );
        let evs = r.chunk(&json!({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}));
        assert!(matches!(
            &evs[0],
            ReplyEvent::Output(OutputEvent::CallEnd { index: 0 })
        ));
        r.chunk(
            &json!({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3,
            "prompt_tokens_details": {"cached_tokens": 4}}}),
        );
        match r.finish() {
            ReplyEvent::Finished { reason, usage, .. } => {
                assert_eq!(reason, "tool_calls");
                assert_eq!(
                    (
                        usage.prompt_tokens,
                        usage.cached_tokens,
                        usage.completion_tokens
                    ),
                    (9, 4, 3)
                );
            }
            other => panic!("{other:?}"),
        }
        let evs = r.chunk(&json!({"error": {"message": "boom"}}));
        assert!(matches!(&evs[0], ReplyEvent::Failed(m) if m.contains("boom")));
        assert!(error_message(400, br#"{"error":{"message":"bad"}}"#).ends_with(": bad"));
    }
}
