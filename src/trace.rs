//! `--trace FILE`: one JSON line per request, for debugging a client.
//!
//! A line holds what a person needs to see why a client got the answer it
//! got: the raw request body, the prompt text the template rendered, the
//! cache decision, the generated text and how it ended. Requests refused
//! before they reached the engine get a line with the error response.
//!
//! Lines go through a channel to a writer thread of their own, so no request
//! ever waits on the disk; the file is opened for appending and each line is
//! flushed as written, so `tail -f` shows requests as they end.
//!
//! A disk slower than the requests (or a file that blocks, such as a pipe
//! nobody reads) must not make the waiting lines grow without bound: at
//! most [`MAX_QUEUED_BYTES`] of them wait for the writer. Lines beyond that
//! are dropped and counted, the log says so once per run of drops, and the
//! writer records how many were lost in the file once it catches up.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

use serde_json::{json, Value};

/// The most bytes of trace lines that may wait for the writer. A single
/// line larger than this (a huge request body) is still taken when
/// nothing else waits.
pub const MAX_QUEUED_BYTES: usize = 64 << 20;

/// A handle on the trace file. Cheap to share; lines are written in the
/// order they are sent.
#[derive(Debug)]
pub struct TraceLog {
    lines: mpsc::Sender<Vec<u8>>,
    backlog: Arc<Backlog>,
}

/// What waits for the writer, shared by the senders and the writer.
#[derive(Debug, Default)]
struct Backlog {
    /// Bytes sent and not yet written.
    bytes: AtomicUsize,
    /// Lines dropped since the writer last noted a drop in the file.
    dropped: AtomicU64,
}

impl TraceLog {
    /// Open (or create) `path` for appending and start the writer thread.
    pub fn open(path: &Path) -> std::io::Result<TraceLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let backlog = Arc::new(Backlog::default());
        let shared = backlog.clone();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("hearth-trace".into())
            .spawn(move || {
                let mut out = BufWriter::new(file);
                for line in rx {
                    let mut written = out.write_all(&line).is_ok() && out.flush().is_ok();
                    shared.bytes.fetch_sub(line.len(), Ordering::AcqRel);
                    let dropped = shared.dropped.swap(0, Ordering::AcqRel);
                    if written && dropped > 0 {
                        let note = json!({
                            "time": crate::api::unix_now(),
                            "dropped_lines": dropped,
                            "note": "trace lines dropped: the trace file could not keep up",
                        });
                        written = serde_json::to_writer(&mut out, &note).is_ok()
                            && out.write_all(b"\n").is_ok()
                            && out.flush().is_ok();
                    }
                    if !written {
                        tracing::warn!(file = %shown, "cannot write the trace file; tracing stops");
                        return;
                    }
                }
            })?;
        Ok(TraceLog { lines: tx, backlog })
    }

    /// Append one record, stamped with the time; dropped (and counted)
    /// when the writer is [`MAX_QUEUED_BYTES`] behind.
    pub fn write(&self, mut record: Value) {
        if let Value::Object(map) = &mut record {
            map.insert("time".into(), json!(crate::api::unix_now()));
        }
        let Ok(mut line) = serde_json::to_vec(&record) else {
            return;
        };
        line.push(b'\n');
        let len = line.len();
        let room = self
            .backlog
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued == 0 || queued + len <= MAX_QUEUED_BYTES).then_some(queued + len)
            });
        if room.is_err() {
            if self.backlog.dropped.fetch_add(1, Ordering::AcqRel) == 0 {
                tracing::warn!(
                    queued_mib = MAX_QUEUED_BYTES >> 20,
                    "the trace file is not keeping up: trace lines are being dropped"
                );
            }
            return;
        }
        if self.lines.send(line).is_err() {
            // The writer stopped (it could not write): nothing will drain.
            self.backlog.bytes.fetch_sub(len, Ordering::AcqRel);
        }
    }
}

/// A request body as it arrived: its JSON when it parses (so the trace
/// stays one readable object), else the text itself.
pub fn raw_body(body: &[u8]) -> Value {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => v,
        Err(_) => Value::String(String::from_utf8_lossy(body).into_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_json_lines() {
        let dir =
            std::env::temp_dir().join(format!("hearth-trace-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.jsonl");
        std::fs::write(&path, "{\"earlier\":1}\n").unwrap();
        let log = TraceLog::open(&path).unwrap();
        log.write(json!({ "request": raw_body(b"{\"a\": [1]}") }));
        log.write(json!({ "request": raw_body(b"not json") }));
        drop(log); // the writer drains the channel and stops
        let mut lines = Vec::new();
        for _ in 0..100 {
            lines = std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(String::from)
                .collect();
            if lines.len() == 3 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(lines.len(), 3, "{lines:?}");
        let second: Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(second["request"]["a"][0], 1);
        assert!(second["time"].is_u64());
        let third: Value = serde_json::from_str(&lines[2]).unwrap();
        assert_eq!(third["request"], "not json");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
