//! One running sequence: a job's whole state between steps, owned (the
//! sampler, the stop scanner, the reasoning budget, counters and timings),
//! so the step loop can hold many of them and advance each by its rows.
//!
//! A sequence is in one of two phases. `Prefill`: prompt positions
//! `next..` are still to be computed. `Decode`: its last sampled token has
//! been sent and goes into the KV at the next step. The logits of the last
//! prompt row, or of a decode row, come back through [`Running::sample`],
//! which picks the next token and decides whether the job is done.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::debug;

use super::cache::sequence::Sequence;
use super::llama::{Model, Token};
use super::output::{token_logprob, Budget, TextEmitter, MAX_TOP_LOGPROBS};
use super::sampling::Sampler;
use super::spec::SpecState;
use super::{Event, FinishReason, Job, Timings, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Prompt positions from `Running::next` on are not in the KV yet.
    Prefill,
    /// `pending` was sampled and sent; it is decoded at the next step.
    Decode { pending: Token },
}

/// Faults armed for this job (`HEARTH_FAULT`).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Faults {
    /// Stall inside the step that computes this prompt chunk (by index
    /// among the job's chunks).
    pub prefill_stall: Option<(Duration, usize)>,
    /// Stall inside the step that decodes the fifth generated token.
    pub decode_stall: Option<Duration>,
    /// Fail the step that decodes the fifth generated token.
    pub decode_error: bool,
    /// Panic in the step that samples the fifth generated token.
    pub step_panic: bool,
    /// End the process (`abort()`) inside the compute of the step that
    /// decodes the fifth generated token.
    pub engine_abort: bool,
}

/// Generation is over for this sequence.
pub(super) enum Done {
    Finished(FinishReason),
    Cancelled,
}

pub(super) struct Running {
    pub job: Job,
    /// Admission order: the oldest sequences decode first and are
    /// preempted last.
    pub order: u64,
    /// The tokens to have in the KV before sampling: the prompt (after a
    /// text match, re-tokenized), or for a sequence resumed after
    /// preemption, everything it had plus its pending token.
    pub tokens: Vec<Token>,
    /// Each token's text, when the tokens come from a previous sequence
    /// record (a resumed sequence); else it comes from the prompt.
    pub pieces: Option<Sequence>,
    /// The prompt's length and reused part, for usage.
    pub prompt_tokens: usize,
    pub cached: usize,
    /// Where the prefix came from, for the log and `/slots` (`copy:2`).
    pub source_label: String,
    /// First position not in the KV (prefill).
    pub next: usize,
    /// Where this run's prefill started (its first chunk).
    pub prefill_from: usize,
    pub phase: Phase,
    pub sampler: Sampler,
    pub out: TextEmitter,
    pub budget: Option<Budget>,
    /// Tokens the engine writes itself (the end of an over-long reasoning
    /// section), fed one per step as if sampled.
    pub forced: VecDeque<Token>,
    pub top_n: Option<usize>,
    pub generated: u32,
    /// Tokens drafted for the next step (prompt lookup), verified after its
    /// pending token.
    pub draft: Vec<Token>,
    pub spec: SpecState,
    pub faults: Faults,
    /// The first disk save of a long prompt: a chunk end a little short of
    /// its end, or for memory kept by checkpoints its last turn mark.
    pub first_save: usize,
    /// Turn marks of the prompt past the reused part (`turn_marks`):
    /// prefill pieces end there.
    pub marks: Vec<usize>,
    /// Preempted once: it resumes without a second `Started`.
    pub resumed: bool,
    pub t0: Instant,
    /// When the first token was sampled.
    pub t1: Option<Instant>,
    /// When the current prefill chunk started, for its log line.
    pub chunk_t: Instant,
    pub last_log: Instant,
    /// The token sampled by the call that ended the job, which no step
    /// decoded: the reply's last token, the one that completed a stop
    /// sequence, or the end-of-turn token the
    /// template renders after it. The worker decodes it into the idle
    /// sequence, so the next turn finds the whole reply in the KV.
    pub last_sampled: Option<Token>,
}

impl Running {
    /// Whether the prompt is all in the KV.
    pub fn prefilled(&self) -> bool {
        self.next >= self.tokens.len()
    }

    /// The text token `pos` adds to the sequence record. A BOS that the
    /// tokenizer added (it is not in the rendered text) adds nothing.
    pub fn piece(&self, model: &Model, pos: usize) -> Vec<u8> {
        if let Some(p) = &self.pieces {
            if pos < p.len() {
                return p.piece(pos).to_vec();
            }
            return model.token_text(self.tokens[pos]);
        }
        let token = self.tokens[pos];
        let piece = model.token_text(token);
        let text = self.job.request.prompt_text.as_deref();
        if pos == 0
            && Some(token) == model.bos()
            && text.is_some_and(|t| !t.as_bytes().starts_with(&piece))
        {
            return Vec::new();
        }
        piece
    }

    /// A decode step's or the last prompt row's logits are in: pick the
    /// next token, send its text, and say whether the job is done. `kv_len`
    /// is the sequence's length; `n_ctx` what one request may use.
    pub fn sample(
        &mut self,
        model: &Arc<Model>,
        logits: &[f32],
        kv_len: usize,
        n_ctx: usize,
    ) -> Option<Done> {
        let req = &self.job.request;
        if self.t1.is_none() {
            self.t1 = Some(Instant::now());
        }
        if self.generated >= req.max_tokens {
            return Some(Done::Finished(FinishReason::MaxTokens));
        }
        if kv_len >= n_ctx {
            return Some(Done::Finished(FinishReason::ContextFull));
        }
        if self.job.is_abandoned() {
            return Some(Done::Cancelled);
        }
        if let Some(tokens) = self.budget.as_mut().and_then(|b| b.due(self.generated)) {
            debug!(
                generated = self.generated,
                "reasoning budget spent: closing the reasoning"
            );
            self.forced.extend(tokens);
        }
        let (token, was_forced) = match self.forced.pop_front() {
            Some(t) => {
                self.sampler.accept_forced(t, logits);
                (t, true)
            }
            None => match self.sampler.sample(logits) {
                Some(t) => (t, false),
                // The grammar allows nothing more: treat it as the end.
                None => return Some(Done::Finished(FinishReason::EndOfTurn)),
            },
        };
        self.generated += 1;
        if self.generated == 5 && std::mem::take(&mut self.faults.step_panic) {
            panic!("injected fault: step_panic");
        }
        let eog = model.is_eog(token);
        if eog && !was_forced && !req.ignore_eos {
            self.last_sampled = Some(token);
            return Some(Done::Finished(FinishReason::EndOfTurn));
        }
        // Special tokens keep their text (tool-call markers must reach the
        // tool parsers); end-of-generation tokens are never text.
        let bytes = if eog {
            Vec::new()
        } else {
            model.token_text(token)
        };
        let logprob = self
            .top_n
            .map(|n| token_logprob(model, self.sampler.distribution(logits), token, &bytes, n));
        if let Some(b) = self.budget.as_mut() {
            b.observe(&bytes);
        }
        if let Some(stop) = self.out.push(&bytes, logprob) {
            self.last_sampled = Some(token);
            return Some(Done::Finished(FinishReason::StopSequence(stop)));
        }
        if self.generated >= req.max_tokens {
            // No need to compute logits nobody will read.
            self.last_sampled = Some(token);
            return Some(Done::Finished(FinishReason::MaxTokens));
        }
        self.phase = Phase::Decode { pending: token };
        None
    }

    /// The job ended well: release held text, send `Finished`.
    pub fn finish(&mut self, reason: FinishReason) -> (Usage, Timings) {
        self.out
            .finish(matches!(reason, FinishReason::StopSequence(_)));
        let usage = Usage {
            prompt_tokens: self.prompt_tokens as u32,
            cached_tokens: self.cached as u32,
            completion_tokens: self.generated,
        };
        let t1 = self.t1.unwrap_or_else(Instant::now);
        let timings = Timings {
            prefill: t1.saturating_duration_since(self.t0),
            decode: t1.elapsed(),
        };
        let _ = self.job.events.send(Event::Finished {
            reason,
            usage,
            timings,
        });
        (usage, timings)
    }

    /// Decode speed since the first token.
    pub fn tokens_per_second(&self) -> f64 {
        self.t1.map_or(0.0, |t1| {
            self.generated as f64 / t1.elapsed().as_secs_f64().max(1e-9)
        })
    }
}

/// Build a job's sampler: its grammar, when llama.cpp takes it.
pub(super) fn sampler_for(model: &Model, job: &Job) -> Sampler {
    let req = &job.request;
    match Sampler::new(&req.sampling, model, req.grammar.as_ref(), req.max_tokens) {
        Ok(s) => s,
        Err(err) => {
            // The HTTP side validates grammars (`grammar::validate`) before
            // queueing, with the same call: not reached.
            tracing::warn!(cause = %err, "grammar refused; generating without it");
            Sampler::new(&req.sampling, model, None, req.max_tokens)
                .unwrap_or_else(|_| unreachable!("no grammar, no error"))
        }
    }
}

/// The state of a job that starts running now.
pub(super) struct Start {
    pub order: u64,
    pub tokens: Vec<Token>,
    pub cached: usize,
    pub source_label: String,
    pub faults: Faults,
    pub batch: usize,
    pub marks: Vec<usize>,
}

pub(super) fn start(model: &Model, job: Job, s: Start) -> Running {
    let req = &job.request;
    let top_n = req.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS) as usize);
    let budget = req.reasoning_budget.as_ref().map(|b| Budget::new(model, b));
    let sampler = sampler_for(model, &job);
    let out = TextEmitter::new(job.events.clone(), req.stop.clone());
    let total = s.tokens.len();
    let now = Instant::now();
    Running {
        order: s.order,
        prompt_tokens: total,
        cached: s.cached,
        source_label: s.source_label,
        next: s.cached,
        prefill_from: s.cached,
        phase: Phase::Prefill,
        sampler,
        out,
        budget,
        forced: VecDeque::new(),
        top_n,
        generated: 0,
        draft: Vec::new(),
        spec: SpecState::default(),
        faults: s.faults,
        first_save: s.marks.last().copied().unwrap_or(
            (total.saturating_sub(super::worker::SAVE_TRIM) / s.batch.max(1)) * s.batch.max(1),
        ),
        marks: s.marks,
        resumed: false,
        t0: now,
        t1: None,
        chunk_t: now,
        last_log: now,
        last_sampled: None,
        pieces: None,
        tokens: s.tokens,
        job,
    }
}
