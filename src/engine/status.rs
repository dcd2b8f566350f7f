//! What the engine is doing, as the HTTP side sees it (`GET /slots`).
//!
//! The engine thread refreshes one copy of this after each step, and only
//! when nobody is reading it (`try_lock`), so a reader never holds the
//! engine up; a reader gets a copy at most one step old.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// Every sequence and the queue.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineStatus {
    pub slots: Vec<SlotStatus>,
    /// Sequences preempted for KV room, waiting to resume (`id` unused).
    pub preempted: Vec<SlotStatus>,
    /// Jobs the engine has received and not yet given a sequence.
    pub waiting: usize,
    pub kv_cells: usize,
    pub kv_used: usize,
    /// Steps so far, and the rows of the last one.
    pub steps: u64,
    pub last_step_rows: usize,
    /// The RAM and disk KV snapshots, refreshed at most every
    /// [`STORES_EVERY`] (skipped by `/slots`).
    #[serde(skip)]
    pub stores: Vec<StoredSnapshot>,
    #[serde(skip)]
    pub stores_at: Option<std::time::Instant>,
}

/// How often the engine rebuilds the snapshot summary in its status copy.
pub const STORES_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One KV snapshot kept for reuse, in RAM or on disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredSnapshot {
    /// `ram` or `disk`.
    pub store: Cow<'static, str>,
    pub tokens: usize,
    /// Bytes of KV state (disk: the whole file).
    pub bytes: u64,
    pub hits: u64,
    /// Seconds since it was saved, and since it was last used.
    pub age_secs: u64,
    pub idle_secs: u64,
    /// The first line of its text that is not blank, at most
    /// [`FIRST_LINE_CHARS`] characters.
    pub first_line: String,
}

/// How much of a snapshot's first line is shown.
pub const FIRST_LINE_CHARS: usize = 100;

/// The first non-blank line of `text` (lossy UTF-8), cut to
/// [`FIRST_LINE_CHARS`] characters. Reads at most a few KiB.
pub fn first_line(text: &[u8]) -> String {
    let head = &text[..text.len().min(4096)];
    let head = String::from_utf8_lossy(head);
    let line = head
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars().take(FIRST_LINE_CHARS).collect()
}

/// One sequence of the unified KV.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    pub id: usize,
    /// The running job's arrival number (as in `Event::Started`).
    pub job: Option<u64>,
    /// `idle` (its KV kept for reuse), `prefill`, `decode`, or (in
    /// `preempted`) `preempted`: its cells freed for room, it resumes when
    /// room frees up.
    pub state: Cow<'static, str>,
    /// Positions its KV holds.
    pub kv_tokens: usize,
    /// The running request's prompt, how much of it was reused, and where
    /// that came from (`none`, `live`, `ram`, `disk`, `copy:N` for a prefix
    /// shared from sequence N, `fork:N` for a choice forked from N).
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub prefix: String,
    pub prefilled_tokens: usize,
    pub generated_tokens: u32,
    /// Generated tokens per second since its first token.
    pub tokens_per_second: f64,
    /// Tokens drafted by prompt lookup, and accepted.
    pub drafted_tokens: u32,
    pub accepted_tokens: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_skips_blank_lines_and_is_bounded() {
        assert_eq!(
            first_line(b"\n  \n<|im_start|>system\nYou are"),
            "<|im_start|>system"
        );
        assert_eq!(first_line(b""), "");
        let long = "x".repeat(500);
        assert_eq!(
            first_line(long.as_bytes()).chars().count(),
            FIRST_LINE_CHARS
        );
        // A cut inside a UTF-8 character is not a panic.
        assert_eq!(
            first_line(&"é".repeat(3000).into_bytes()).chars().count(),
            FIRST_LINE_CHARS
        );
    }
}
