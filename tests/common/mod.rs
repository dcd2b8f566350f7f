//! Starting the real `hearth` binary on port 0 with the real default model,
//! and a small HTTP/1.1 client over plain sockets (so the tests see status
//! lines, headers and SSE bytes exactly as sent, and can misbehave on
//! purpose: half a request, a stalled body).

#![allow(dead_code)]

pub mod rng;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The default model: `$HEARTH_HOME/models/...` or `~/.cache/hearth/models/...`.
pub fn default_model() -> PathBuf {
    let home = std::env::var_os("HEARTH_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache")
                .join("hearth")
        });
    home.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A fresh, empty directory for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "hearth-test-{tag}-{}-{}",
        std::process::id(),
        nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One `hearth serve` process. Killed when dropped; its log is printed when
/// the test fails (on drop during a panic).
pub struct Server {
    pub addr: SocketAddr,
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    pub fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        Self::try_start(args, env).unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn try_start(args: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        let log = temp_dir("log").join("server.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.args(["serve", "--port", "0", "--model"])
            .arg(default_model())
            .args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("HEARTH_") && k != "HEARTH_HOME" {
                cmd.env_remove(k);
            }
        }
        // One sequence at a time unless a test asks for more
        // (HEARTH_TEST_PARALLEL runs the suite with more).
        let parallel = std::env::var("HEARTH_TEST_PARALLEL").unwrap_or_else(|_| "1".into());
        cmd.env("NO_COLOR", "1")
            .env("HEARTH_PARALLEL", parallel)
            .envs(env.iter().copied());
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start hearth: {e}"))?;
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("hearth listening on http://") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => Ok(Server {
                addr: addr.parse().unwrap(),
                child,
                log,
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                Err(format!("hearth did not start ({status:?}):\n{text}"))
            }
        }
    }

    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Resp {
        request(self.addr, "GET", path, headers, b"")
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        let mut h = vec![("content-type", "application/json")];
        h.extend_from_slice(headers);
        request(self.addr, "POST", path, &h, body.as_bytes())
    }

    /// Send a signal by name (`TERM`, `INT`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Wait for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(60).collect();
            eprintln!("--- hearth log ({}) ---", self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        } else if let Some(dir) = self.log.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A whole response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// Open a connection with a generous read timeout (no test may hang).
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = connect(addr);
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body and close.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

/// Parse a complete HTTP/1.1 response, de-chunking the body.
pub fn parse_response(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_vec()
    };
    Resp {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

/// Undo chunked transfer encoding; a body cut short keeps what arrived.
pub fn dechunk(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        let end = (start + size).min(rest.len());
        out.extend_from_slice(&rest[start..end]);
        if end + 2 > rest.len() {
            break;
        }
        rest = &rest[end + 2..];
    }
    out
}

/// A request whose response is read as it arrives.
pub struct Streaming {
    pub sock: TcpStream,
    pub raw: Vec<u8>,
}

impl Streaming {
    pub fn post(addr: SocketAddr, path: &str, body: &str) -> Streaming {
        let mut sock = connect(addr);
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).unwrap();
        sock.write_all(body.as_bytes()).unwrap();
        Streaming {
            sock,
            raw: Vec::new(),
        }
    }

    /// Read until the bytes so far contain `needle`, or panic after `limit`.
    pub fn read_until(&mut self, needle: &str, limit: Duration) {
        let until = Instant::now() + limit;
        let mut buf = [0u8; 8192];
        while !String::from_utf8_lossy(&self.raw).contains(needle) {
            assert!(
                Instant::now() < until,
                "no {needle:?} within {limit:?}: {:?}",
                String::from_utf8_lossy(&self.raw)
            );
            match self.sock.read(&mut buf) {
                Ok(0) => panic!(
                    "connection closed before {needle:?}: {:?}",
                    String::from_utf8_lossy(&self.raw)
                ),
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e) => panic!("read failed before {needle:?}: {e}"),
            }
        }
    }

    /// Read to the end of the connection; the whole response.
    pub fn finish(mut self) -> Resp {
        let _ = self.sock.read_to_end(&mut self.raw);
        parse_response(&self.raw)
    }
}

/// A prompt long enough (> 256 tokens) for the disk KV cache to keep.
pub fn long_prompt() -> String {
    let line =
        "The quick brown fox jumps over the lazy dog while the river runs past the old mill. ";
    format!(
        "{}Summarize the text above in one sentence.",
        line.repeat(24)
    )
}
