//! The status page over HTTP, with the real binary and model: what `/`
//! answers with and without a key, `--no-ui`, and the live stream of
//! snapshots (the browser side is tests/node/status_page.test.mjs).

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{connect, Server};
use serde_json::{json, Value};

const KEY: &str = "sk-hearth-page-test";

/// Open `GET path` and read SSE `snapshot` events until `want` returns
/// true for one (or panic after `limit`); returns the events read.
fn read_snapshots(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    limit: Duration,
    mut want: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut sock = connect(addr);
    let mut head = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    sock.write_all(head.as_bytes()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let until = Instant::now() + limit;
    let mut raw = String::new();
    let mut seen = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        assert!(
            Instant::now() < until,
            "no wanted snapshot within {limit:?}; last: {:?}",
            seen.last()
        );
        let n = sock.read(&mut buf).expect("the stream went quiet");
        assert!(n > 0, "the stream closed: {raw:?}");
        raw.push_str(&String::from_utf8_lossy(&buf[..n]));
        // Chunked framing aside, each event's data is one JSON line.
        while let Some(at) = raw.find("event: snapshot\ndata: ") {
            let rest = &raw[at + "event: snapshot\ndata: ".len()..];
            let Some(end) = rest.find('\n') else { break };
            let snap: Value = serde_json::from_str(&rest[..end]).expect("a snapshot is JSON");
            raw = rest[end..].to_string();
            let done = want(&snap);
            seen.push(snap);
            if done {
                return seen;
            }
        }
    }
}

fn chat(prompt: &str, max_tokens: u32) -> String {
    json!({
        "model": "any", "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": prompt}],
    })
    .to_string()
}

#[test]
fn the_page_needs_the_key_and_asks_for_it() {
    let srv = Server::start(&["--api-key", KEY], &[]);
    let auth = format!("Bearer {KEY}");

    // From the address bar: 401, and the page alone (it asks for the key).
    let bare = srv.get("/", &[]);
    assert_eq!(bare.status, 401);
    assert!(bare
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(bare.body.contains("id=\"login\""), "{}", bare.body);
    // The page itself holds no server data.
    assert!(!bare.body.contains("SmolLM2"), "{}", bare.body);
    let with_key = srv.get("/", &[("authorization", &auth)]);
    assert_eq!(with_key.status, 200);
    assert_eq!(with_key.body, bare.body);
    assert_eq!(
        srv.get("/", &[("authorization", "Bearer wrong")]).status,
        401
    );
    // Its script is the same for everyone.
    let script = srv.get("/ui/page.js", &[]);
    assert_eq!(script.status, 200);
    assert!(script
        .header("content-type")
        .unwrap()
        .starts_with("text/javascript"));
    assert!(script.body.contains("sessionStorage"));

    // The data wants the key, like every other route.
    for path in ["/ui/snapshot", "/ui/events"] {
        let r = srv.get(path, &[]);
        assert_eq!(r.status, 401, "{path}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], "invalid_api_key", "{path}");
    }
    let snap = srv.get("/ui/snapshot", &[("x-api-key", KEY)]);
    assert_eq!(snap.status, 200, "{}", snap.body);
    let snap = snap.json();
    assert!(
        snap["server"]["model"].as_str().unwrap().contains("llama"),
        "{snap}"
    );
    assert!(
        snap["server"]["memory"]["weights"].as_u64().unwrap() > 1 << 20,
        "{snap}"
    );
    assert!(
        snap["server"]["memory"]["kv"].as_u64().unwrap() > 0,
        "{snap}"
    );
    assert!(
        snap["server"]["memory"]["buffers"].as_u64().unwrap() > 0,
        "{snap}"
    );
    assert_eq!(snap["server"]["parallel"], 1, "{snap}");
}

#[test]
fn no_ui_turns_the_page_off() {
    let srv = Server::start(&["--no-ui"], &[]);
    for path in ["/", "/ui/page.js", "/ui/snapshot", "/ui/events"] {
        assert_eq!(srv.get(path, &[]).status, 404, "{path}");
    }
    let srv = Server::start(&[], &[("HEARTH_NO_UI", "true")]);
    assert_eq!(srv.get("/", &[]).status, 404);
    // The API is unchanged.
    assert_eq!(
        srv.post("/v1/chat/completions", &[], &chat("Hi", 4)).status,
        200
    );
}

#[test]
fn the_event_stream_sends_snapshots_with_each_request() {
    let srv = Server::start(
        &["--heartbeat-secs", "1"],
        &[("HEARTH_FAULT", "prefill_stall:4:1")],
    );
    let started = Instant::now();
    let first = read_snapshots(srv.addr, "/ui/events", &[], Duration::from_secs(10), |_| {
        true
    });
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the first snapshot waited"
    );
    assert!(
        first[0]["requests"].as_array().unwrap().is_empty(),
        "{}",
        first[0]
    );

    // A stalled prefill shows as a running request whose stream keeps
    // writing (heartbeats), then as a finished one.
    let addr = srv.addr;
    let body = json!({
        "model": "any", "max_tokens": 8, "temperature": 0, "stream": true,
        "messages": [{"role": "user", "content": common::long_prompt()}],
    })
    .to_string();
    let client = std::thread::spawn(move || {
        common::request(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    });
    let mut last_write = None;
    let seen = read_snapshots(srv.addr, "/ui/events", &[], Duration::from_secs(30), |s| {
        let r = &s["requests"];
        if let Some(live) = r.as_array().and_then(|a| a.first()) {
            if live["phase"] == "prefill" && live["streaming"] == true {
                last_write = live["since_write_secs"].as_f64();
                return live["age_secs"].as_f64().unwrap() > 2.5;
            }
        }
        false
    });
    let live = &seen.last().unwrap()["requests"][0];
    assert_eq!(live["route"], "chat_completions", "{live}");
    assert!(live["prefill_total"].as_u64().unwrap() > 256, "{live}");
    // Heartbeats every second: never more than about one second of silence.
    let since = last_write.expect("the stream's writes are stamped");
    assert!(
        since < 1.6,
        "{since} s since the last byte during the stall: {live}"
    );
    // Snapshots come a few times a second, not faster.
    assert!(seen.len() >= 4, "{} snapshots in 2.5 s", seen.len());

    let resp = client.join().unwrap();
    assert_eq!(resp.status, 200, "{}", resp.body);
    let seen = read_snapshots(srv.addr, "/ui/events", &[], Duration::from_secs(10), |s| {
        s["recent"].as_array().is_some_and(|a| !a.is_empty())
    });
    let snap = seen.last().unwrap();
    assert!(snap["requests"].as_array().unwrap().is_empty(), "{snap}");
    let done = &snap["recent"][0];
    assert_eq!(done["outcome"], "finished", "{done}");
    assert_eq!(done["route"], "chat_completions", "{done}");
    assert!(done["prompt_tokens"].as_u64().unwrap() > 256, "{done}");
    assert!(done["generated_tokens"].as_u64().unwrap() > 0, "{done}");
    assert!(
        done["ttft_secs"].as_f64().unwrap() > 3.5,
        "the stall is in the time to first token: {done}"
    );
    // The idle sequence still holds the conversation.
    assert!(
        snap["slots"][0]["kv_tokens"].as_u64().unwrap() > 256,
        "{snap}"
    );
}

#[test]
fn the_snapshot_lists_the_kv_stores() {
    let dir = common::temp_dir("page-kv");
    let srv = Server::start(&["--kv-disk-dir", dir.to_str().unwrap()], &[]);
    // Two long conversations on one sequence: the second displaces the
    // first, which is kept in RAM; long prompts are also saved to disk.
    let first = format!("Ledger of the mill.\n{}", common::long_prompt());
    let second = format!("Diary of the lighthouse.\n{}", common::long_prompt());
    for prompt in [&first, &second] {
        let r = srv.post("/v1/chat/completions", &[], &chat(prompt, 4));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The engine refreshes its summary at most once a second, after a step.
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        srv.post("/v1/chat/completions", &[], &chat("Hi", 2)).status,
        200
    );
    let snap = srv.get("/ui/snapshot", &[]).json();
    let stores = snap["stores"].as_array().unwrap();
    let ram: Vec<&Value> = stores.iter().filter(|s| s["store"] == "ram").collect();
    let disk: Vec<&Value> = stores.iter().filter(|s| s["store"] == "disk").collect();
    assert!(!ram.is_empty(), "{snap}");
    assert!(!disk.is_empty(), "{snap}");
    for s in ram.iter().chain(&disk) {
        assert!(s["tokens"].as_u64().unwrap() > 256, "{s}");
        assert!(s["bytes"].as_u64().unwrap() > 0, "{s}");
        assert!(!s["first_line"].as_str().unwrap().is_empty(), "{s}");
    }
    assert_eq!(snap["recent"].as_array().unwrap().len(), 3, "{snap}");
}

#[test]
fn an_open_page_does_not_hold_a_shutdown_up() {
    let mut srv = Server::start(&["--shutdown-grace-secs", "30"], &[]);
    let mut sock = connect(srv.addr);
    let head = format!("GET /ui/events HTTP/1.1\r\nhost: {}\r\n\r\n", srv.addr);
    sock.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 65536];
    let n = sock.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    let asked = Instant::now();
    srv.signal("TERM");
    let status = srv.wait_exit(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "exit took {:?}",
        asked.elapsed()
    );
    // The stream ended rather than being cut: its last chunk came.
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    assert!(
        String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
}
