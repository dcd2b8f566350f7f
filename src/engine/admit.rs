//! Admission: giving a waiting job a sequence and its prompt's prefix, and
//! giving KV room back (idle sequences first, then preemption).
//!
//! A job takes the longest prefix on offer ([`prefix::choose`]): an idle
//! sequence's own KV (it takes that slot), a running sequence's prefix
//! shared by `seq_cp` (no compute, no new cells), or a RAM or disk
//! snapshot restored into a free slot. A job is admitted only when the KV
//! has room for its uncached prompt; idle sequences' cells are reclaimed
//! for it first (snapshotted to RAM and disk the way a replaced sequence
//! always is). When running sequences together outgrow the KV, the one
//! admitted last is preempted: its cells are snapshotted and freed, and it
//! waits at the head of the queue to resume where it was; its stream
//! only pauses.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use super::cache::sequence::Sequence;
use super::cache::{match_prompt, Match};
use super::fault::FaultKind;
use super::prefix::{self, Choice, Offers, Source};
use super::schedule::{preemption_victim, turn_marks};
use super::sequence::{self, Faults, Phase, Start};
use super::worker::{
    fail_job, Waiting, Worker, MIN_DISK_TOKENS, MIN_RAM_TOKENS, SNAPSHOT_BEFORE_LOSS,
};
use super::{EngineError, Event, Job, PrefixSource};
use crate::engine::llama::Token;

/// KV cells a job must find free beyond its uncached prompt before it is
/// admitted beside running sequences: room for its first replies.
const GROWTH_RESERVE: usize = 64;

impl Worker {
    /// Admit waiting jobs in order while sequences and KV room allow.
    /// Returns whether any was admitted (or ended).
    pub(super) fn admit_waiting(&mut self) -> bool {
        let mut any = false;
        while let Some(w) = self.waiting.pop_front() {
            if !self.slots.iter().any(|s| s.run.is_none()) {
                self.waiting.push_front(w);
                break;
            }
            if let (Waiting::New(job), Some(plan)) = (&w, &self.config.fault) {
                if plan.kind == FaultKind::EnginePanic && plan.applies_to(job.arrival) {
                    // Outside any catch: the engine thread ends here.
                    panic!("injected fault: engine_panic");
                }
            }
            let outcome = catch(|| self.try_admit(w));
            match outcome {
                Ok(Ok(())) => any = true,
                Ok(Err(w)) => {
                    self.waiting.push_front(w);
                    break;
                }
                Err(why) => {
                    // The job is lost inside the panic: its channel closed
                    // with it, which its stream reads as a failure.
                    warn!(cause = %why, "admission failed");
                    self.resync();
                    any = true;
                }
            }
        }
        // Before the step, which may take long (a stall).
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.stats.running.store(
            self.slots.iter().filter(|s| s.run.is_some()).count(),
            Ordering::Relaxed,
        );
        any
    }

    /// Give `w` a slot and its prefix, or hand it back when the KV has no
    /// room for it yet.
    fn try_admit(&mut self, w: Waiting) -> Result<(), Waiting> {
        let (tokens, text, resume) = match &w {
            Waiting::New(job) => {
                let n = job.request.prompt.len();
                if n == 0 || n >= self.n_ctx_seq {
                    let err = EngineError::PromptTooLong {
                        prompt: n as u32,
                        ctx: self.n_ctx_seq as u32,
                    };
                    job.span.in_scope(|| warn!(cause = %err, "job failed"));
                    if let Waiting::New(job) = w {
                        fail_job(&job, err);
                    }
                    return Ok(());
                }
                (
                    job.request.prompt.clone(),
                    job.request.prompt_text.clone(),
                    false,
                )
            }
            Waiting::Resume(run) => (run.tokens.clone(), None, true),
        };
        let span = match &w {
            Waiting::New(job) => job.span.clone(),
            Waiting::Resume(run) => run.job.span.clone(),
        };
        let _enter = span.enter();
        let offers = self.offers(&tokens, text.as_deref());
        let mut choice = prefix::choose(&offers, tokens.len(), self.chunk);
        if resume {
            // Its own tokens come back exactly: only the last is recomputed.
            choice.usable = choice.m.tokens.min(tokens.len() - 1);
        }
        let target = match choice.source {
            Source::Own(s) => s,
            _ => match self.pick_target() {
                Some(t) => t,
                None => return Err(w),
            },
        };
        let running = self.slots.iter().any(|s| s.run.is_some());
        let restored = match &choice.source {
            Source::Ram(_) | Source::Disk(_) => choice.m.tokens,
            _ => 0,
        };
        let need =
            tokens.len() - choice.usable + restored + if running { GROWTH_RESERVE } else { 0 };
        if !self.make_room(need, target, &choice) && running {
            return Err(w);
        }
        let (prompt, keep, source, label) =
            self.place_prefix(target, &choice, &tokens, text.as_deref(), resume);
        self.slots[target].last_used = Instant::now();
        let order = self.admitted;
        self.admitted += 1;
        let reused = keep;
        info!(
            seq = target,
            source = label.as_str(),
            reused,
            by_text = choice.m.by_text,
            prompt_tokens = prompt.len(),
            "prefix: KV best own {} copy {}, RAM best {} of {} snapshots, disk best {} of {}",
            offers.own.iter().map(|(_, m)| m.tokens).max().unwrap_or(0),
            offers.copy.iter().map(|(_, m)| m.tokens).max().unwrap_or(0),
            offers.ram.map_or(0, |(_, m)| m.tokens),
            self.kv.ram.len(),
            offers.disk.as_ref().map_or(0, |(_, m)| m.tokens),
            self.kv
                .disk
                .as_ref()
                .map_or(0, |d| d.with_entries(|e| e.len())),
        );
        let run = match w {
            Waiting::New(job) => {
                let faults = self.faults_for(&job, keep, prompt.len());
                let _ = job.events.send(Event::Started {
                    job: job.arrival,
                    prompt_tokens: prompt.len() as u32,
                    cached: keep as u32,
                    source,
                });
                let marks = if self.memory.needs_checkpoints() {
                    turn_marks(&prompt, &self.config.turn_marker, keep)
                } else {
                    Vec::new()
                };
                let start = Start {
                    order,
                    tokens: prompt,
                    cached: keep,
                    source_label: label,
                    faults,
                    batch: self.chunk,
                    marks,
                };
                sequence::start(&self.model, *job, start)
            }
            Waiting::Resume(mut run) => {
                info!(
                    seq = target,
                    reused,
                    tokens = run.tokens.len(),
                    "resumed after preemption"
                );
                run.order = order;
                run.next = keep;
                run.prefill_from = keep;
                run.chunk_t = Instant::now();
                *run
            }
        };
        self.slots[target].tail = None;
        self.slots[target].run = Some(Box::new(run));
        Ok(())
    }

    /// The prefixes on offer for a prompt: idle slots' own, running slots'
    /// (copyable), RAM and disk snapshots.
    fn offers(&self, tokens: &[Token], text: Option<&str>) -> Offers<std::path::PathBuf> {
        // Memory that cannot be cut back freely reuses snapshots only
        // whole: a sequence or checkpoint the prompt repeats to its end,
        // with a token left to compute (after a text match, text left to
        // tokenize). An idle sequence of a window cache may also be cut
        // back as far as its window still reaches.
        let rest_after = |m: &Match| match (m.by_text, text) {
            (true, Some(t)) => m.text_bytes < t.len(),
            _ => m.tokens + 1 < tokens.len(),
        };
        let whole = |len: usize, m: Match| {
            if !self.memory.whole_snapshots_only() || (m.tokens == len && rest_after(&m)) {
                m
            } else {
                Match::default()
            }
        };
        let mut own = Vec::new();
        let mut copy = Vec::new();
        for (i, s) in self.slots.iter().enumerate() {
            if s.seq.is_empty() {
                continue;
            }
            let m = match_prompt(&s.seq, tokens, text);
            if s.run.is_none() {
                let keep = prefix::usable_prefix(m.tokens, tokens.len(), self.chunk);
                let floor = self.memory.cut_floor(self.ctx.seq_pos_min(i as i32));
                let cut = floor.is_some_and(|f| keep >= f);
                own.push((i, if cut { m } else { whole(s.seq.len(), m) }));
            } else if self.memory.shares_cells() {
                copy.push((i, m));
            }
        }
        let ram = self.kv.ram.best_with(tokens, text, whole);
        let disk = self.kv.disk.as_ref().and_then(|d| {
            d.with_entries(|es| {
                es.iter()
                    .filter(|e| (e.header.token_count as usize) < self.n_ctx_seq)
                    .map(|e| {
                        let m = match_prompt(&e.seq, tokens, text);
                        (e.path.clone(), whole(e.seq.len(), m))
                    })
                    .max_by_key(|(_, m)| m.tokens)
            })
        });
        Offers {
            own,
            copy,
            ram,
            disk,
        }
    }

    /// A slot for a job that does not take an idle sequence's own KV: an
    /// empty one, else the idle one used longest ago.
    fn pick_target(&self) -> Option<usize> {
        let free = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.run.is_none());
        free.min_by_key(|(_, s)| (!s.seq.is_empty(), s.last_used))
            .map(|(i, _)| i)
    }

    /// Free cells until `need` fit, reclaiming idle sequences other than
    /// `target` (least recently used first). The target's own cells count
    /// as free when the choice replaces them. False if they still do not fit.
    fn make_room(
        &mut self,
        need: usize,
        target: usize,
        choice: &Choice<std::path::PathBuf>,
    ) -> bool {
        let target_frees = match choice.source {
            Source::Own(_) => self.ledger.exclusive(target).saturating_sub(choice.usable),
            _ => self.ledger.exclusive(target),
        };
        let fits = |w: &Worker| w.ledger.free() + target_frees >= need;
        while !fits(self) {
            let copy_from = match choice.source {
                Source::Copy(s) => Some(s),
                _ => None,
            };
            let victim = self
                .slots
                .iter()
                .enumerate()
                .filter(|(i, s)| {
                    *i != target && Some(*i) != copy_from && s.run.is_none() && !s.seq.is_empty()
                })
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            match victim {
                Some(v) => self.reclaim(v),
                None => return false,
            }
        }
        true
    }

    /// An idle sequence gives its cells back: snapshot it, then clear it.
    pub(super) fn reclaim(&mut self, i: usize) {
        info!(
            seq = i,
            kv_tokens = self.slots[i].seq.len(),
            "reclaiming an idle sequence's KV for room"
        );
        self.snapshot_slot(i, true);
        self.clear_slot(i);
    }

    pub(super) fn clear_slot(&mut self, i: usize) {
        self.ctx.seq_clear(i as i32);
        self.ledger.clear(i);
        self.slots[i].seq.clear();
        self.slots[i].disk_saved_len = 0;
        self.slots[i].tail = None;
    }

    /// Copy slot `i`'s sequence out: to RAM, and to disk when it is long.
    pub(super) fn snapshot_slot(&mut self, i: usize, for_disk: bool) {
        let slot = &self.slots[i];
        let n = slot.seq.len();
        let to_ram = self.kv.ram.is_enabled() && n >= MIN_RAM_TOKENS;
        let to_disk =
            for_disk && self.kv.disk.is_some() && n >= MIN_DISK_TOKENS && n > slot.disk_saved_len;
        if !to_ram && !to_disk {
            return;
        }
        self.snapshot_taken = true;
        let state = Arc::new(self.ctx.seq_state_get(i as i32));
        if to_ram {
            self.kv.ram.insert(slot.seq.clone(), state.clone());
        }
        if let (true, Some(disk)) = (to_disk, &self.kv.disk) {
            disk.save(slot.seq.clone(), state);
            self.slots[i].disk_saved_len = n;
        }
    }

    /// Put the chosen prefix into `target`. Returns the prompt to run
    /// (re-tokenized after a text match), the tokens reused, the source and
    /// its label.
    fn place_prefix(
        &mut self,
        target: usize,
        choice: &Choice<std::path::PathBuf>,
        tokens: &[Token],
        text: Option<&str>,
        resume: bool,
    ) -> (Vec<Token>, usize, PrefixSource, String) {
        let mut m = choice.m;
        let mut source = PrefixSource::Live;
        let mut label = "live".to_string();
        match &choice.source {
            Source::None => m = Match::default(),
            Source::Own(_) => {}
            Source::Copy(src) => {
                label = format!("copy:{src}");
            }
            Source::Ram(i) => {
                m = Match::default();
                if let Some((seq, state)) = self.kv.ram.take_hit(*i) {
                    if self.restore(target, seq, &state) {
                        m = choice.m;
                        source = PrefixSource::Ram;
                        label = "ram".into();
                    }
                }
            }
            Source::Disk(path) => {
                m = Match::default();
                let loaded = self.kv.disk.as_ref().and_then(|d| d.load(path));
                if let Some((seq, state)) = loaded {
                    let n = seq.len();
                    if self.restore(target, seq, &state) {
                        m = choice.m;
                        source = PrefixSource::Disk;
                        label = "disk".into();
                        self.slots[target].disk_saved_len = n;
                    } else if let Some(d) = &self.kv.disk {
                        d.discard(path, "llama.cpp refused its state");
                    }
                }
            }
        }
        let from = match choice.source {
            Source::Copy(src) => src,
            _ => target,
        };
        let prompt = match (m.by_text, text) {
            (true, Some(text)) if m.tokens > 0 => {
                let mut p = self.slots[from].seq.tokens()[..m.tokens].to_vec();
                p.extend(self.model.tokenize(&text[m.text_bytes..], false, true));
                p
            }
            _ => tokens.to_vec(),
        };
        let keep = if m.tokens == 0 {
            0
        } else if resume {
            m.tokens.min(prompt.len() - 1)
        } else {
            prefix::usable_prefix(m.tokens, prompt.len(), self.chunk)
        };
        match choice.source {
            Source::Copy(src) => {
                if self.slots[target].seq.len() >= SNAPSHOT_BEFORE_LOSS {
                    self.snapshot_slot(target, true);
                }
                self.clear_slot(target);
                self.ctx.seq_copy(src as i32, target as i32, keep);
                self.ledger.copy(src, target, keep);
                let mut seq = self.slots[src].seq.clone();
                seq.truncate(keep);
                self.slots[target].seq = seq;
                self.stats
                    .shared_tokens
                    .fetch_add(keep as u64, Ordering::Relaxed);
            }
            _ => {
                let len = self.slots[target].seq.len();
                if len >= keep + SNAPSHOT_BEFORE_LOSS
                    && matches!(choice.source, Source::Own(_) | Source::None)
                {
                    self.snapshot_slot(target, true);
                }
                self.truncate_slot(target, keep);
            }
        }
        let reused = self.slots[target].seq.len();
        if reused == 0 {
            (prompt, 0, PrefixSource::None, "none".into())
        } else {
            (prompt, reused, source, label)
        }
    }

    /// Cut slot `i` back to `keep` positions (clearing it when the memory
    /// cannot cut back).
    pub(super) fn truncate_slot(&mut self, i: usize, keep: usize) {
        if keep >= self.slots[i].seq.len() {
            return;
        }
        let len = self.slots[i].seq.len();
        let cut = self
            .memory
            .can_cut(len, keep, self.ctx.seq_pos_min(i as i32));
        if cut && self.ctx.seq_truncate(i as i32, keep) {
            self.slots[i].seq.truncate(keep);
            self.ledger.truncate(i, keep);
            let slot = &mut self.slots[i];
            slot.disk_saved_len = slot.disk_saved_len.min(keep);
        } else {
            // Memory that cannot rewind this far (recurrent state, a
            // window that no longer reaches back to `keep`).
            self.clear_slot(i);
        }
    }

    /// Replace slot `i`'s sequence with a snapshot's, snapshotting what it
    /// held first.
    fn restore(&mut self, i: usize, seq: Sequence, state: &[u8]) -> bool {
        if self.slots[i].seq.len() >= MIN_RAM_TOKENS {
            self.snapshot_slot(i, true);
        }
        self.clear_slot(i);
        let n = seq.len();
        if !self.ctx.seq_state_set(i as i32, state) || self.ctx.seq_len(i as i32) != n {
            self.ctx.seq_clear(i as i32);
            return false;
        }
        self.ledger.append(i, n);
        self.slots[i].seq = seq;
        true
    }

    /// The faults `HEARTH_FAULT` arms for this job.
    fn faults_for(&self, job: &Job, cached: usize, total: usize) -> Faults {
        let Some(plan) = self
            .config
            .fault
            .as_ref()
            .filter(|p| p.applies_to(job.arrival))
        else {
            return Faults::default();
        };
        let chunk = self.chunk;
        match plan.kind {
            FaultKind::PrefillStall => {
                // Inside the second prefill chunk (the first when there is
                // only one): the position that chunk starts at.
                let first_end = ((cached / chunk + 1) * chunk).min(total);
                let at = if first_end >= total {
                    cached
                } else {
                    first_end
                };
                Faults {
                    prefill_stall: Some((plan.stall, at)),
                    ..Faults::default()
                }
            }
            FaultKind::DecodeStall => Faults {
                decode_stall: Some(plan.stall),
                ..Faults::default()
            },
            FaultKind::DecodeError => Faults {
                decode_error: true,
                ..Faults::default()
            },
            FaultKind::StepPanic => Faults {
                step_panic: true,
                ..Faults::default()
            },
            FaultKind::EngineAbort => Faults {
                engine_abort: true,
                ..Faults::default()
            },
            // Served before admission (`admit_waiting`).
            FaultKind::EnginePanic => Faults::default(),
        }
    }

    /// Free KV room by preempting the sequence admitted last. False when
    /// there is at most one running sequence (it always fits alone).
    pub(super) fn preempt_youngest(&mut self) -> bool {
        let running: Vec<(usize, u64)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.run.as_ref().map(|r| (i, r.order)))
            .collect();
        if running.len() <= 1 {
            return false;
        }
        let Some(victim) = preemption_victim(&running) else {
            return false;
        };
        let Some(mut run) = self.slots[victim].run.take() else {
            return false;
        };
        let mut seq = self.slots[victim].seq.clone();
        if let Phase::Decode { pending } = run.phase {
            seq.push(pending, &self.model.token_text(pending));
        } else {
            // A prefill keeps its remaining prompt.
            for pos in seq.len()..run.tokens.len() {
                let piece = run.piece(&self.model, pos);
                seq.push(run.tokens[pos], &piece);
            }
        }
        run.job.span.in_scope(|| {
            info!(
                seq = victim,
                kv_tokens = self.slots[victim].seq.len(),
                "preempted: the KV is full; it resumes when room frees up"
            )
        });
        self.snapshot_slot(victim, false);
        self.clear_slot(victim);
        run.tokens = seq.tokens().to_vec();
        run.pieces = Some(seq);
        run.phase = Phase::Prefill;
        run.resumed = true;
        self.stats.preempted.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(Waiting::Resume(run));
        true
    }
}

/// Run `f`, turning a panic into its message.
pub(super) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .map_err(|p| super::worker::panic_text(&*p))
}
