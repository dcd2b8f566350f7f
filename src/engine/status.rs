//! What the engine is doing, as the HTTP side sees it (`GET /slots`).
//!
//! The engine thread refreshes one copy of this after each step, and only
//! when nobody is reading it (`try_lock`), so a reader never holds the
//! engine up; a reader gets a copy at most one step old.

use serde::Serialize;

/// Every sequence and the queue.
#[derive(Debug, Clone, Default, Serialize)]
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
}

/// One sequence of the unified KV.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SlotStatus {
    pub id: usize,
    /// `idle` (its KV kept for reuse), `prefill`, `decode`, or (in
    /// `preempted`) `preempted`: its cells freed for room, it resumes when
    /// room frees up.
    pub state: &'static str,
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
