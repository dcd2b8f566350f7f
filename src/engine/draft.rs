//! Speculative decoding with a draft model (`--draft-model`): a small model
//! with the target's vocabulary guesses the next tokens, and the target
//! verifies them as extra rows of its step, exactly as it verifies prompt
//! lookup's guesses (`spec/`, `step.rs`).
//!
//! The draft model runs on the engine thread in a context of its own, one
//! sequence per slot in one unified KV. Its KV follows the target's by
//! tokens, not by events: before drafting for a slot, what the draft KV
//! holds for it is compared with the target sequence's tokens; the draft
//! KV is cut back to what they share (or takes a longer shared prefix from
//! another slot with `seq_cp`, as the target does) and catches up from
//! there. Cancellations, rejected drafts, prefix reuse, snapshot restores
//! and preemption so need no bookkeeping here: whatever the target holds,
//! the draft catches up to it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::llama::{Context, ContextParams, DecodeError, LlamaError, Model, Row, Token};
use super::memory::Rewind;
use super::{EngineConfig, EngineStats};

/// A token the draft model itself gives less than this probability ends
/// the draft: the target would likely reject it, and all after it.
const P_MIN: f32 = 0.5;
/// Vocabulary sizes may differ by this many (added special tokens at the
/// end), as llama.cpp's own speculative decoding allows.
const VOCAB_SLACK: i32 = 128;
/// Weight of the newest drafting round in the moving average of its cost.
const ROUND_WEIGHT: f64 = 0.2;

/// Whether `draft` can draft for `target`: the same tokenizer, the same
/// special tokens, and the same text for every token id both have.
pub fn check_compatible(target: &Model, draft: &Model) -> Result<(), String> {
    if target.vocab_kind() != draft.vocab_kind() {
        return Err(format!(
            "its tokenizer is {} and the model's is {}",
            kind_name(draft.vocab_kind()),
            kind_name(target.vocab_kind())
        ));
    }
    let (nt, nd) = (target.n_vocab(), draft.n_vocab());
    if (nt - nd).abs() > VOCAB_SLACK {
        return Err(format!(
            "its vocabulary has {nd} tokens against the model's {nt}"
        ));
    }
    if target.bos() != draft.bos() || target.eos() != draft.eos() {
        return Err("its BOS or EOS token differs from the model's".into());
    }
    if target.adds_bos() != draft.adds_bos() {
        return Err("it adds BOS where the model does not, or the other way round".into());
    }
    if let Some(id) = (0..nt.min(nd)).find(|&id| target.token_text(id) != draft.token_text(id)) {
        return Err(format!(
            "token {id} is {:?} in it and {:?} in the model",
            String::from_utf8_lossy(&draft.token_text(id)),
            String::from_utf8_lossy(&target.token_text(id)),
        ));
    }
    Ok(())
}

/// llama.cpp's names for its tokenizer kinds (`llama_vocab_type`).
fn kind_name(kind: i32) -> String {
    match kind {
        0 => "none".into(),
        1 => "SentencePiece (SPM)".into(),
        2 => "byte-level BPE".into(),
        3 => "WordPiece (WPM)".into(),
        4 => "Unigram (UGM)".into(),
        5 => "RWKV".into(),
        k => format!("of kind {k}"),
    }
}

/// One sequence that wants a draft this step.
pub(super) struct DraftWant {
    pub slot: usize,
    /// The target sequence's tokens and its pending (sampled, not yet
    /// decoded) token last: the draft continues after them.
    pub tokens: Vec<Token>,
    /// Most tokens to draft.
    pub k: usize,
}

/// The draft model's context and what its KV holds.
pub(super) struct Drafter {
    ctx: Context,
    /// Per slot: the tokens the draft KV holds for that sequence, at
    /// positions `0..len`.
    held: Vec<Vec<Token>>,
    /// Token ids both vocabularies have: the draft never proposes others.
    n_vocab: usize,
    /// Most catch-up rows one sequence gets in one step.
    chunk: usize,
    /// Seconds of one drafting round (one row per drafting sequence),
    /// moving: what each drafted token costs beside its verifying row.
    round_secs: Option<f64>,
    /// Seconds spent drafting in all (for the log).
    pub total_secs: f64,
    /// Compute threads for draft rounds and for catch-up (see `draft`).
    threads: (usize, usize),
}

impl Drafter {
    pub fn new(
        model: Arc<Model>,
        target: &Model,
        params: ContextParams,
        chunk: usize,
    ) -> Result<Drafter, LlamaError> {
        let n_vocab = model.n_vocab().min(target.n_vocab()).max(0) as usize;
        let slots = params.n_seq_max.max(1) as usize;
        // Its sequences are cut back and copied freely to follow the
        // target's: a sliding-window draft model keeps a full-size cache.
        let params = ContextParams {
            swa_full: true,
            ..params
        };
        let ctx = Context::new(model, params, Box::new(|| false))?;
        Ok(Drafter {
            ctx,
            held: vec![Vec::new(); slots],
            n_vocab,
            chunk: chunk.max(1),
            round_secs: None,
            total_secs: 0.0,
            threads: (1, 1),
        })
    }

    /// What one drafted token costs in draft compute (0 until measured).
    pub fn round_secs(&self) -> f64 {
        self.round_secs.unwrap_or(0.0)
    }

    pub fn kv_bytes(&self) -> u64 {
        self.ctx.kv_bytes()
    }

    /// Drafts for each of `wants`, in order (empty: none this step, e.g.
    /// while a long prompt is still being caught up).
    /// `threads`: compute threads for one-row-per-sequence rounds, and for
    /// catching a sequence up.
    pub fn draft(&mut self, wants: &[DraftWant], threads: (usize, usize)) -> Vec<Vec<Token>> {
        self.threads = threads;
        let t = Instant::now();
        let out = self.draft_inner(wants);
        self.total_secs += t.elapsed().as_secs_f64();
        out
    }

    fn draft_inner(&mut self, wants: &[DraftWant]) -> Vec<Vec<Token>> {
        let mut out = vec![Vec::new(); wants.len()];
        for w in wants {
            self.sync(w.slot, &w.tokens);
        }
        // Catch up every sequence to its pending token; those that get
        // there keep logits for their first guess.
        let cap = self.ctx.n_batch();
        let mut rows = Vec::new();
        let mut ready = Vec::new();
        for (q, w) in wants.iter().enumerate() {
            let held = self.held[w.slot].len();
            let take = (w.tokens.len() - held)
                .min(self.chunk)
                .min(cap - rows.len());
            for pos in held..held + take {
                rows.push(Row {
                    token: w.tokens[pos],
                    pos,
                    seq: w.slot as i32,
                    logits: pos + 1 == w.tokens.len(),
                });
            }
            if take > 0 && held + take == w.tokens.len() {
                ready.push((q, rows.len() - 1));
            }
        }
        if rows.is_empty() || !self.decode(&rows, wants) {
            return out;
        }
        for r in &rows {
            self.held[r.seq as usize].push(r.token);
        }
        let mut live = Vec::new();
        for (q, row) in ready {
            if let Some(token) = self.pick(row as i32) {
                out[q].push(token);
                if wants[q].k > 1 {
                    live.push(q);
                }
            }
        }
        // Then one row per sequence still drafting, until each has its k
        // tokens or stops being sure.
        while !live.is_empty() {
            let rows: Vec<Row> = live
                .iter()
                .map(|&q| {
                    let slot = wants[q].slot;
                    Row {
                        token: *out[q].last().expect("live drafts have a token"),
                        pos: self.held[slot].len(),
                        seq: slot as i32,
                        logits: true,
                    }
                })
                .collect();
            let t = Instant::now();
            if !self.decode(&rows, wants) {
                return out;
            }
            let secs = t.elapsed().as_secs_f64();
            self.round_secs = Some(match self.round_secs {
                Some(r) => r + ROUND_WEIGHT * (secs - r),
                None => secs,
            });
            for r in &rows {
                self.held[r.seq as usize].push(r.token);
            }
            let mut next = Vec::new();
            for (i, &q) in live.iter().enumerate() {
                if let Some(token) = self.pick(i as i32) {
                    out[q].push(token);
                    if out[q].len() < wants[q].k {
                        next.push(q);
                    }
                }
            }
            live = next;
        }
        out
    }

    /// Cut the draft KV of `slot` back to what it shares with `tokens`
    /// (keeping at least the last token to decode), or give it a longer
    /// shared prefix another slot holds.
    fn sync(&mut self, slot: usize, tokens: &[Token]) {
        let limit = tokens.len().saturating_sub(1);
        let own = common_prefix(&self.held[slot], tokens).min(limit);
        let other = (0..self.held.len())
            .filter(|&j| j != slot)
            .map(|j| (j, common_prefix(&self.held[j], tokens).min(limit)))
            .max_by_key(|&(_, n)| n);
        match other {
            Some((j, n)) if n > own => {
                self.ctx.seq_clear(slot as i32);
                self.ctx.seq_copy(j as i32, slot as i32, n);
                self.held[slot] = self.held[j][..n].to_vec();
            }
            _ if own < self.held[slot].len() => {
                if self.ctx.seq_truncate(slot as i32, own) {
                    self.held[slot].truncate(own);
                } else {
                    self.ctx.seq_clear(slot as i32);
                    self.held[slot].clear();
                }
            }
            _ => {}
        }
    }

    /// Decode `rows`; when the draft KV is full, give up the sequences
    /// nobody drafts for now and try once more. False: no drafts this
    /// step (and after a failure the draft KV starts over).
    fn decode(&mut self, rows: &[Row], wants: &[DraftWant]) -> bool {
        // More rows than sequences: some sequence is being caught up.
        let catch_up = rows.len() > wants.len();
        self.ctx.set_threads(if catch_up {
            self.threads.1
        } else {
            self.threads.0
        });
        match self.ctx.decode_rows(rows) {
            Ok(()) => return true,
            Err(DecodeError::NoSlot) => {
                let busy: Vec<usize> = wants.iter().map(|w| w.slot).collect();
                for slot in 0..self.held.len() {
                    if !busy.contains(&slot) && !self.held[slot].is_empty() {
                        self.ctx.seq_clear(slot as i32);
                        self.held[slot].clear();
                    }
                }
                if self.ctx.decode_rows(rows).is_ok() {
                    return true;
                }
                debug!(
                    rows = rows.len(),
                    "the draft KV has no room: no drafts this step"
                );
            }
            Err(err) => warn!(?err, "draft model step failed: its KV starts over"),
        }
        self.ctx.kv_clear();
        self.held.iter_mut().for_each(Vec::clear);
        false
    }

    /// The draft's most likely token at batch row `row`, if it is sure
    /// enough of it.
    fn pick(&self, row: i32) -> Option<Token> {
        let logits = self.ctx.logits(row);
        let logits = &logits[..self.n_vocab.min(logits.len())];
        let (best, &max) = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))?;
        let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
        (1.0 / sum >= P_MIN).then_some(best as Token)
    }
}

/// Length of the common prefix of two token lists.
fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Speculative decoding as configured and as the model allows, and the
/// draft model when drafts come from one.
pub(super) fn speculation(
    model: &Arc<Model>,
    config: &EngineConfig,
    params: ContextParams,
    chunk: usize,
    stats: &EngineStats,
    memory: Rewind,
) -> Result<(Option<super::spec::SpecConfig>, Option<Drafter>), LlamaError> {
    let spec = match (config.spec, memory) {
        (Some(_), Rewind::Fixed { .. }) if config.draft_model.is_some() => {
            info!(
                "speculative decoding off: a draft model does not draft for recurrent or \
                 hybrid memory (prompt lookup does, where llama.cpp can roll it back)"
            );
            None
        }
        (Some(_), Rewind::Fixed { rollback: 0 }) => {
            info!(
                "speculative decoding off: this model's memory cannot drop rejected drafts \
                 (llama.cpp has no recurrent-state rollback for its architecture)"
            );
            None
        }
        (Some(s), Rewind::Fixed { rollback }) => {
            // A rejected draft is rolled back through llama.cpp's snapshots
            // of the recurrent state, one per drafted position.
            info!(
                n_rs_seq = rollback,
                "speculative decoding: rejected drafts are rolled back through llama.cpp's \
                 recurrent-state snapshots, so drafts are at most that long"
            );
            Some(super::spec::SpecConfig {
                draft_max: s.draft_max.min(rollback),
                draft_min: s.draft_min.min(rollback),
                ..s
            })
        }
        (s, _) => s,
    };
    let drafter = match (&spec, &config.draft_model) {
        (Some(s), Some(path)) => {
            let d = start_drafter(model, path, config.n_gpu_layers, params, chunk)?;
            info!(
                draft_max = s.draft_max,
                draft_model = %path.display(),
                draft_kv_mib = format!("{:.1}", d.kv_bytes() as f64 / (1 << 20) as f64),
                "speculative decoding: draft model"
            );
            stats.kv_bytes.fetch_add(d.kv_bytes(), Ordering::Relaxed);
            Some(d)
        }
        (Some(s), None) => {
            info!(
                draft_max = s.draft_max,
                "speculative decoding: prompt lookup"
            );
            None
        }
        _ => None,
    };
    Ok((spec, drafter))
}

/// Load the draft model and give it a context like the target's: as many
/// sequences and cells, so every target sequence has its draft beside it.
fn start_drafter(
    target: &Arc<Model>,
    path: &std::path::Path,
    n_gpu_layers: i32,
    params: ContextParams,
    chunk: usize,
) -> Result<Drafter, LlamaError> {
    let model = Model::load(path, n_gpu_layers)?;
    let refuse = |reason: String| LlamaError::Draft {
        path: path.display().to_string(),
        reason,
    };
    if model.is_recurrent() {
        return Err(refuse(
            "its memory cannot drop rejected drafts (a recurrent or hybrid model)".into(),
        ));
    }
    check_compatible(target, &model).map_err(refuse)?;
    Drafter::new(model, target, params, chunk)
}

#[cfg(test)]
mod tests {
    use super::common_prefix;

    #[test]
    fn common_prefix_counts_equal_leading_tokens() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[5], &[1]), 0);
    }
}
