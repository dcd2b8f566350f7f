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

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::mpsc;

use serde_json::{json, Value};

/// A handle on the trace file. Cheap to share; lines are written in the
/// order they are sent.
#[derive(Debug)]
pub struct TraceLog {
    lines: mpsc::Sender<Value>,
}

impl TraceLog {
    /// Open (or create) `path` for appending and start the writer thread.
    pub fn open(path: &Path) -> std::io::Result<TraceLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let (tx, rx) = mpsc::channel::<Value>();
        let shown = path.display().to_string();
        std::thread::Builder::new()
            .name("hearth-trace".into())
            .spawn(move || {
                let mut out = BufWriter::new(file);
                for line in rx {
                    let written = serde_json::to_writer(&mut out, &line).is_ok()
                        && out.write_all(b"\n").is_ok()
                        && out.flush().is_ok();
                    if !written {
                        tracing::warn!(file = %shown, "cannot write the trace file; tracing stops");
                        return;
                    }
                }
            })?;
        Ok(TraceLog { lines: tx })
    }

    /// Append one record, stamped with the time.
    pub fn write(&self, mut record: Value) {
        if let Value::Object(map) = &mut record {
            map.insert("time".into(), json!(crate::api::unix_now()));
        }
        let _ = self.lines.send(record);
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
