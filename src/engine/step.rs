//! One engine step: plan the rows (`schedule::plan_step`), make KV room,
//! decode them in one llama.cpp batch, then advance every sequence in it:
//! record what its KV now holds, report prefill progress, sample where
//! logits came back, and end the jobs that are done.
//!
//! A step that fails (a decode error, an abort nobody asked for, a panic
//! inside the decode) fails the requests with rows in it, with their
//! protocol's error events; every sequence's record is then re-read from
//! the KV and the engine carries on. A panic while advancing one sequence
//! after a good decode fails that request alone. An abort that every request in the step asked for (their
//! clients left) just ends those requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tracing::{debug, info, warn};

use super::admit::catch;
use super::draft::DraftWant;
use super::hook::StepPhase;
use super::llama::{DecodeError, Row};
use super::schedule::{plan_step, Candidate, Planned, StepLimits, Want};
use super::sequence::{self, Done, Phase, Running, Start};
use super::spec;
use super::worker::{
    fail_job, Waiting, Worker, CHECKPOINT_EVERY, DECODE_LOG_EVERY, FRONTIER, MARK_NEAR_END,
    MIN_DISK_TOKENS, MIN_RAM_TOKENS, SNAPSHOT_BEFORE_LOSS,
};
use super::{EngineError, Event, FinishReason, PrefixSource};

/// A sequence's part of the step's batch.
struct Part {
    slot: usize,
    /// Its first row in the batch, and how many.
    first: usize,
    rows: usize,
    decode: bool,
}

impl Worker {
    /// Candidates in admission order.
    fn candidates(&self) -> Vec<Candidate> {
        let mut c: Vec<(u64, Candidate)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let r = s.run.as_ref()?;
                let want = match r.phase {
                    Phase::Decode { .. } => Want::Decode {
                        draft: r.draft.len(),
                    },
                    // A piece ends at the next turn mark, if any.
                    Phase::Prefill => Want::Prefill {
                        next: r.next,
                        total: r
                            .marks
                            .iter()
                            .copied()
                            .find(|&m| m > r.next)
                            .unwrap_or(r.tokens.len()),
                    },
                };
                Some((r.order, Candidate { slot, want }))
            })
            .collect();
        c.sort_by_key(|(o, _)| *o);
        c.into_iter().map(|(_, c)| c).collect()
    }

    /// The rows of the next step, with the KV room they need made.
    fn plan(&mut self) -> Vec<Planned> {
        loop {
            let candidates = self.candidates();
            let decode_rows: usize = candidates
                .iter()
                .map(|c| match c.want {
                    Want::Decode { draft } => 1 + draft,
                    Want::Prefill { .. } => 0,
                })
                .sum();
            let lim = StepLimits {
                max_rows: self.ctx.n_batch(),
                chunk: self.chunk,
                prefill_cap: if decode_rows == 0 || self.credit.allows_prefill() {
                    self.ctx.n_batch()
                } else {
                    0
                },
            };
            let plan = plan_step(&candidates, &lim);
            let need: usize = plan.iter().map(|p| p.rows).sum();
            if plan.is_empty() || self.ledger.free() >= need {
                return plan;
            }
            let idle = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.run.is_none() && !s.seq.is_empty())
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, _)| i);
            if let Some(i) = idle {
                self.reclaim(i);
            } else if !self.preempt_youngest() {
                // One sequence alone always fits; let llama.cpp say if not.
                return plan;
            }
        }
    }

    /// Draft tokens for each decoding sequence that wants them: the draft
    /// model's guesses when there is one, else prompt lookup over the
    /// sequence's own tokens.
    fn prepare_drafts(&mut self) {
        let Some(cfg) = self.spec else { return };
        let n_ctx = self.n_ctx_seq;
        let cost = self.cost.fit();
        let decoding = self
            .slots
            .iter()
            .filter(|s| s.run.as_ref().is_some_and(|r| r.phase != Phase::Prefill))
            .count();
        // Where rows are dear (a CPU), a drafted row beside a prefill takes
        // the place of a prompt row in the paced step, and the prompt waits
        // for guesses. Where they are nearly free, both fit.
        let prefilling = self
            .slots
            .iter()
            .any(|s| s.run.as_ref().is_some_and(|r| r.phase == Phase::Prefill));
        let dear = cost.is_some_and(|(base, per_row)| per_row > 0.1 * base);
        let price = self.drafter.as_ref().map_or(0.0, |d| d.round_secs());
        let mut wants = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(run) = slot.run.as_mut() else {
                continue;
            };
            run.draft.clear();
            if prefilling && dear {
                continue;
            }
            let Phase::Decode { pending } = run.phase else {
                continue;
            };
            run.spec.seed(&self.spec_prior);
            // Forced tokens (a closing reasoning marker) ignore the logits.
            if !run.forced.is_empty() {
                continue;
            }
            let room = (run.job.request.max_tokens.saturating_sub(run.generated) as usize)
                .min(n_ctx.saturating_sub(slot.seq.len() + 2))
                .min(cfg.draft_max);
            let tokens = slot.seq.tokens();
            if self.drafter.is_some() {
                let want = run
                    .spec
                    .draft_len(None, room, decoding, cost, price)
                    .max(cfg.draft_min.min(room));
                if want == 0 {
                    continue;
                }
                let mut all = tokens.to_vec();
                all.push(pending);
                wants.push(DraftWant {
                    slot: i,
                    tokens: all,
                    k: want,
                });
                continue;
            }
            let mut tail = tokens[tokens.len().saturating_sub(spec::LOOKBACK)..].to_vec();
            tail.push(pending);
            let guesses = spec::VOTE_DEPTHS.map(|depth| spec::guess(&tail, &cfg, depth));
            let usable = |g: &Option<spec::Guess>| g.filter(|g| g.majority || cfg.draft_min > 0);
            // The longest match is the same at every depth.
            let Some(matched) = guesses.iter().find_map(usable).map(|g| g.matched) else {
                continue;
            };
            // How far a guess of this match length has been right decides
            // how much of it to verify.
            let want = run
                .spec
                .draft_len(Some(matched), room, decoding, cost, price)
                .max(cfg.draft_min.min(room));
            let drafts = std::array::from_fn(|d| match usable(&guesses[d]) {
                Some(g) => spec::draft(
                    &mut tail,
                    &cfg,
                    spec::VOTE_DEPTHS[d],
                    g.token,
                    want,
                    cfg.draft_min,
                ),
                None => Vec::new(),
            });
            run.draft = drafts[run.spec.lookup()].clone();
            // Steps that draft nothing teach nothing about the depths.
            if drafts.iter().any(|d| !d.is_empty()) {
                run.spec.proposed(tokens.len() + 1, drafts, cost);
            }
        }
        let Some(drafter) = self.drafter.as_mut() else {
            return;
        };
        if wants.is_empty() {
            return;
        }
        let threads = (self.threads.for_step(0), self.threads.batch());
        let drafts = drafter.draft(&wants, threads);
        for (w, draft) in wants.iter().zip(drafts) {
            if let Some(run) = self.slots[w.slot].run.as_mut() {
                run.draft = draft;
            }
        }
    }

    /// Run one step. False when there was nothing to compute.
    pub(super) fn step(&mut self) -> bool {
        self.prepare_drafts();
        let plan = self.plan();
        if plan.is_empty() {
            return false;
        }
        let mut rows = Vec::new();
        let mut parts = Vec::with_capacity(plan.len());
        let mut flags = Vec::with_capacity(plan.len());
        let (mut stall, mut fail, mut abort) = (None, false, false);
        for p in &plan {
            let slot = &mut self.slots[p.slot];
            let run = slot.run.as_mut().expect("planned slots run a job");
            let first = rows.len();
            flags.push(run.job.cancel.clone());
            match run.phase {
                Phase::Decode { pending } => {
                    let pos = slot.seq.len();
                    rows.push(Row {
                        token: pending,
                        pos,
                        seq: p.slot as i32,
                        logits: true,
                    });
                    // The drafted tokens after it, as far as the plan allows.
                    run.draft.truncate(p.rows - 1);
                    for (k, &token) in run.draft.iter().enumerate() {
                        rows.push(Row {
                            token,
                            pos: pos + 1 + k,
                            seq: p.slot as i32,
                            logits: true,
                        });
                    }
                    // The step that decodes the fifth generated token (the
                    // pending one, or a drafted one after it).
                    let first_token = run.generated as usize;
                    if (first_token..first_token + p.rows).contains(&5) {
                        stall = stall.or(run.faults.decode_stall.take());
                        fail |= std::mem::take(&mut run.faults.decode_error);
                        abort |= std::mem::take(&mut run.faults.engine_abort);
                    }
                    parts.push(Part {
                        slot: p.slot,
                        first,
                        rows: p.rows,
                        decode: true,
                    });
                }
                Phase::Prefill => {
                    let (start, end) = (run.next, run.next + p.rows);
                    for pos in start..end {
                        let logits = pos + 1 == run.tokens.len();
                        rows.push(Row {
                            token: run.tokens[pos],
                            pos,
                            seq: p.slot as i32,
                            logits,
                        });
                    }
                    if let Some((secs, at)) = run.faults.prefill_stall {
                        if (start..end).contains(&at) {
                            stall = stall.or(Some(secs));
                            run.faults.prefill_stall = None;
                        }
                    }
                    parts.push(Part {
                        slot: p.slot,
                        first,
                        rows: p.rows,
                        decode: false,
                    });
                }
            }
        }
        if let Some(s) = stall {
            self.hook.arm_stall(s);
        }
        if fail {
            self.hook.arm_failure();
        }
        if abort {
            self.hook.arm_abort();
        }
        self.hook.set_step(flags);
        let decode_rows: usize = parts.iter().filter(|p| p.decode).map(|p| p.rows).sum();
        let prefill_rows = rows.len() - decode_rows;
        let threads = self.threads.for_step(prefill_rows);
        self.ctx.set_threads(threads);
        let t = Instant::now();
        let decoded = catch(|| self.ctx.decode_rows(&rows));
        self.hook.set_step(Vec::new());
        let secs = t.elapsed().as_secs_f64();
        tracing::trace!(
            rows = rows.len(),
            sequences = parts.len(),
            threads,
            secs,
            "step"
        );
        self.record_threads(prefill_rows, secs);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats
            .step_rows
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        if parts.len() > 1 {
            self.stats.multi_steps.fetch_add(1, Ordering::Relaxed);
        }
        self.last_step_rows = rows.len();
        self.progress.touch(
            self.epoch,
            if prefill_rows > 0 {
                StepPhase::Prefill
            } else {
                StepPhase::Decode
            },
            rows.len(),
        );
        match decoded {
            Ok(Ok(())) => {
                self.cost.observe(rows.len(), secs);
                self.credit.observe(decode_rows, prefill_rows, secs);
                self.advance(&parts, &rows);
            }
            Ok(Err(DecodeError::Aborted)) if self.all_cancelled(&parts) => {
                self.resync();
                for p in &parts {
                    self.end_cancelled(p.slot);
                }
            }
            Ok(Err(DecodeError::NoSlot)) if self.preempt_youngest() => {
                warn!(
                    rows = rows.len(),
                    "the KV had no room for the step: a sequence was preempted"
                );
                self.resync();
            }
            Ok(Err(err)) => {
                let code = match err {
                    // An abort nobody asked for is a failure of the compute.
                    DecodeError::Aborted => 2,
                    DecodeError::NoSlot => 1,
                    DecodeError::Failed(code) => code,
                };
                self.fail_step(&parts, EngineError::Decode(code));
            }
            Err(why) => self.fail_step(&parts, EngineError::Crashed(why)),
        }
        true
    }

    fn all_cancelled(&self, parts: &[Part]) -> bool {
        parts.iter().all(|p| {
            self.slots[p.slot]
                .run
                .as_ref()
                .is_none_or(|r| r.job.cancel.is_cancelled())
        })
    }

    /// The step failed: its requests end with `err`; the others go on.
    fn fail_step(&mut self, parts: &[Part], err: EngineError) {
        self.stats.failed_steps.fetch_add(1, Ordering::Relaxed);
        warn!(cause = %err, requests = parts.len(), "engine step failed");
        self.resync();
        for p in parts {
            if let Some(run) = self.slots[p.slot].run.take() {
                run.job
                    .span
                    .in_scope(|| warn!(cause = %err, seq = p.slot, "job failed"));
                fail_job(&run.job, err.clone());
            }
            self.slots[p.slot].last_used = Instant::now();
        }
    }

    /// The step's rows are in the KV: advance each sequence.
    fn advance(&mut self, parts: &[Part], rows: &[Row]) {
        for part in parts {
            let i = part.slot;
            let Some(mut run) = self.slots[i].run.take() else {
                continue;
            };
            // A panic while advancing one sequence (a bug in sampling, say)
            // fails that request alone: the step's KV is consistent.
            match catch(|| self.advance_one(part, rows, &mut run)) {
                Ok(None) => self.slots[i].run = Some(run),
                Ok(Some(done)) => self.end(i, run, done),
                Err(why) => {
                    self.stats.failed_steps.fetch_add(1, Ordering::Relaxed);
                    let err = EngineError::Crashed(why);
                    run.job
                        .span
                        .in_scope(|| warn!(cause = %err, seq = i, "job failed"));
                    fail_job(&run.job, err);
                    self.resync();
                }
            }
        }
    }

    /// Advance one sequence of the step; Some when its job is over.
    fn advance_one(&mut self, part: &Part, rows: &[Row], run: &mut Running) -> Option<Done> {
        let i = part.slot;
        for row in &rows[part.first..part.first + part.rows] {
            let piece = if part.decode {
                self.model.token_text(row.token)
            } else {
                run.piece(&self.model, row.pos)
            };
            self.slots[i].seq.push(row.token, &piece);
        }
        self.ledger.append(i, part.rows);
        if part.decode {
            return self.verify(part, run);
        }
        let logits_row = (part.first + part.rows - 1) as i32;
        {
            run.next += part.rows;
            self.prefill_progress(i, run);
            if !run.prefilled() {
                return None;
            }
            self.prefill_done(i, run);
            self.fork(i, run, logits_row);
        }
        let logits = self.ctx.logits(logits_row);
        run.sample(&self.model, logits, self.slots[i].seq.len(), self.n_ctx_seq)
    }

    /// A decode part is in: sample its pending token's row, then each
    /// drafted row for as long as the sampled token equals the draft; the
    /// first that differs is the correction, and the positions after the
    /// accepted drafts are dropped from the KV and the record.
    fn verify(&mut self, part: &Part, run: &mut Running) -> Option<Done> {
        let i = part.slot;
        let base = self.slots[i].seq.len() - part.rows;
        let drafted = part.rows - 1;
        let mut accepted = 0;
        let mut done = None;
        for j in 0..part.rows {
            let logits = self.ctx.logits((part.first + j) as i32);
            done = run.sample(&self.model, logits, base + j + 1, self.n_ctx_seq);
            if done.is_some() {
                break;
            }
            match run.phase {
                Phase::Decode { pending } if j < drafted && run.draft.get(j) == Some(&pending) => {
                    accepted += 1
                }
                _ => break,
            }
        }
        if drafted > 0 {
            run.spec.record(drafted, accepted);
            self.spec_prior.learn(run.spec.kind(), drafted, accepted);
            self.stats
                .spec_drafted
                .fetch_add(drafted as u64, Ordering::Relaxed);
            self.stats
                .spec_accepted
                .fetch_add(accepted as u64, Ordering::Relaxed);
            let keep = base + 1 + accepted;
            if keep < self.slots[i].seq.len() {
                self.truncate_slot(i, keep);
            }
        }
        let next = match (&done, run.phase) {
            (None, Phase::Decode { pending }) => Some(pending),
            _ => None,
        };
        run.spec.judge_lookups(self.slots[i].seq.tokens(), next);
        self.spec_prior.learn_depths(&run.spec);
        run.draft.clear();
        if done.is_some() {
            return done;
        }
        let len = self.slots[i].seq.len();
        if len / FRONTIER > (len - 1 - accepted) / FRONTIER {
            self.save_frontier(i);
        }
        if run.last_log.elapsed() >= DECODE_LOG_EVERY {
            run.last_log = Instant::now();
            let tps = run.tokens_per_second();
            let batch_rows = self.last_step_rows;
            let threads = self.threads.decode();
            let step_ms = self.stats.decode_step_us.load(Ordering::Relaxed) as f64 / 1e3;
            let others = self.threads.others();
            run.job.span.in_scope(|| {
                info!(
                    "decode {} tokens, {tps:.1} t/s (seq {i}, step {batch_rows} rows {step_ms:.1} ms on {threads} threads, \
                     other work {others:.1} cores, drafts accepted {}/{})",
                    run.generated, run.spec.accepted, run.spec.drafted
                )
            });
        }
        None
    }

    /// A prefill piece is in: at each chunk end, a log line, a progress
    /// event and the disk save points.
    fn prefill_progress(&mut self, i: usize, run: &mut Running) {
        let done = run.next;
        let total = run.tokens.len();
        if !done.is_multiple_of(self.chunk) && done != total && done != run.first_save {
            return;
        }
        let elapsed = run.t0.elapsed();
        let chunk_len =
            done - (done.saturating_sub(1) / self.chunk * self.chunk).max(run.prefill_from);
        let chunk_secs = run.chunk_t.elapsed().as_secs_f64();
        run.chunk_t = Instant::now();
        run.job.span.in_scope(|| {
            info!(
                "prefill {done}/{total} ({:.1}%) chunk {chunk_len} tok {:.1} t/s, avg {:.1} t/s, {:.2}s (seq {i})",
                100.0 * done as f64 / total as f64,
                chunk_len as f64 / chunk_secs.max(1e-9),
                (done - run.prefill_from) as f64 / elapsed.as_secs_f64().max(1e-9),
                elapsed.as_secs_f64(),
            )
        });
        if !run.resumed {
            let _ = run.job.events.send(Event::PrefillProgress {
                done: done as u32,
                total: total as u32,
                elapsed,
            });
        }
        let saved = self.slots[i].disk_saved_len;
        // Memory that cannot be cut back restarts a prompt that leaves
        // this one later from a checkpoint, in RAM and on disk.
        // The prompt's end needs none of its own when its last turn mark
        // was checkpointed a few tokens before it.
        let mark_at_end = !run.marks.is_empty()
            && run.first_save >= MIN_RAM_TOKENS
            && total - run.first_save <= MARK_NEAR_END;
        let checkpoint = self.kv.ram.keeps_checkpoints()
            && done >= MIN_RAM_TOKENS
            && (done == run.first_save
                || (done == total && !mark_at_end)
                || done.is_multiple_of(CHECKPOINT_EVERY));
        let to_disk = done >= MIN_DISK_TOKENS
            && (checkpoint || done == run.first_save || done / FRONTIER > saved / FRONTIER);
        self.keep_state(i, to_disk, checkpoint);
    }

    /// The prompt is all in: check its text against the record.
    fn prefill_done(&mut self, i: usize, run: &mut Running) {
        if run.resumed {
            return;
        }
        if let Some(t) = run.job.request.prompt_text.as_deref() {
            let seq = &mut self.slots[i].seq;
            if seq.text_ok() && seq.text() != t.as_bytes() {
                // The tokens do not spell the rendered text back (a
                // tokenizer quirk): match this sequence by tokens only.
                debug!("sequence text differs from the rendered prompt; text matching off for it");
                seq.mark_text_unknown();
            }
        }
        let secs = run.t0.elapsed().as_secs_f64();
        let computed = run.tokens.len() - run.cached;
        run.job
            .span
            .in_scope(|| debug!(seq = i, computed, secs, "prefill done"));
    }

    /// One prefill, `n` choices: each other choice of the job takes a copy
    /// of this sequence into a free slot and samples from the same logits.
    /// Choices that find no free slot wait as jobs of their own (and find
    /// the prompt cached).
    fn fork(&mut self, leader: usize, run: &mut Running, logits_row: i32) {
        let forks = std::mem::take(&mut run.job.forks);
        let n = self.slots[leader].seq.len();
        for fork in forks {
            if fork.is_abandoned() {
                continue;
            }
            let free = self
                .slots
                .iter()
                .enumerate()
                .filter(|(j, s)| *j != leader && s.run.is_none())
                .min_by_key(|(_, s)| (!s.seq.is_empty(), s.last_used))
                .map(|(j, _)| j);
            let Some(j) = free else {
                self.waiting.push_front(Waiting::New(Box::new(fork)));
                continue;
            };
            if self.slots[j].seq.len() >= SNAPSHOT_BEFORE_LOSS {
                self.snapshot_slot(j, true);
            }
            self.clear_slot(j);
            if self.memory.shares_cells() {
                self.ctx.seq_copy(leader as i32, j as i32, n);
                self.ledger.copy(leader, j, n);
            } else {
                // A window cache (deepseek4's included) never reuses a
                // shared cell: the fork gets cells and state of its own.
                let state = self.ctx.seq_state_get(leader as i32);
                if !self.ctx.seq_state_set(j as i32, &state) {
                    fork.span
                        .in_scope(|| warn!(seq = j, "a fork's state copy was refused"));
                    self.waiting.push_front(Waiting::New(Box::new(fork)));
                    continue;
                }
                self.ledger.append(j, n);
            }
            self.slots[j].seq = self.slots[leader].seq.clone();
            self.slots[j].last_used = Instant::now();
            self.stats
                .shared_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
            let label = format!("fork:{leader}");
            fork.span.in_scope(|| {
                info!(
                    seq = j,
                    reused = n,
                    source = label.as_str(),
                    "forked from the prefilled prompt"
                )
            });
            let _ = fork.events.send(Event::Started {
                job: fork.arrival,
                prompt_tokens: n as u32,
                cached: n as u32,
                source: PrefixSource::Live,
            });
            let order = self.admitted;
            self.admitted += 1;
            let start = Start {
                order,
                tokens: run.tokens.clone(),
                cached: n,
                source_label: label,
                faults: Default::default(),
                batch: self.chunk,
                marks: Vec::new(),
            };
            let mut f = sequence::start(&self.model, fork, start);
            let done = {
                let logits = self.ctx.logits(logits_row);
                f.sample(&self.model, logits, n, self.n_ctx_seq)
            };
            match done {
                None => self.slots[j].run = Some(Box::new(f)),
                Some(done) => self.end(j, Box::new(f), done),
            }
        }
    }

    /// A job is over: report it and free its slot (the KV stays).
    fn end(&mut self, i: usize, mut run: Box<Running>, done: Done) {
        self.slots[i].last_used = Instant::now();
        let reason = match done {
            Done::Cancelled => {
                self.slots[i].run = Some(run);
                self.end_cancelled(i);
                return;
            }
            Done::Finished(reason) => reason,
        };
        let (usage, timings) = run.finish(reason.clone());
        let kv_tokens = self.slots[i].seq.len();
        // Decoded when the engine goes idle (`decode_tails`). After a stop
        // sequence too: a template that writes the stop text after the
        // reply (the plain-text format's `\nUser:`) then finds it in the KV.
        self.slots[i].tail = run.last_sampled.map(|t| (t, kv_tokens));
        let source = run.source_label.as_str();
        let prefill_secs = timings.prefill.as_secs_f64();
        let decode_secs = timings.decode.as_secs_f64();
        run.job.span.in_scope(|| {
            info!(
                seq = i,
                prefix = source,
                prompt_tokens = usage.prompt_tokens,
                cached_tokens = usage.cached_tokens,
                completion_tokens = usage.completion_tokens,
                drafted = run.spec.drafted,
                accepted = run.spec.accepted,
                reason = ?reason,
                "done: prefill {:.2}s ({:.1} t/s), decode {:.2}s ({:.1} t/s)",
                prefill_secs,
                (usage.prompt_tokens - usage.cached_tokens) as f64 / prefill_secs.max(1e-9),
                decode_secs,
                usage.completion_tokens as f64 / decode_secs.max(1e-9),
            );
            debug!(kv_tokens, "sequence kept");
        });
        if matches!(reason, FinishReason::ContextFull) {
            debug!(seq = i, "context full");
        }
    }

    /// The engine is going idle: decode each finished reply's last token
    /// into its sequence (one batch, no logits), so a client that sends
    /// the conversation back finds all of the reply in the KV instead of
    /// prefilling its last token again. A failure only drops the tails.
    pub(super) fn decode_tails(&mut self) {
        let mut rows = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some((token, pos)) = slot.tail.take() else {
                continue;
            };
            if slot.run.is_none() && slot.seq.len() == pos && pos > 0 {
                rows.push(Row {
                    token,
                    pos,
                    seq: i as i32,
                    logits: false,
                });
            }
        }
        if rows.is_empty() || rows.len() > self.ledger.free() {
            return;
        }
        // A few rows: decode's thread count.
        self.ctx.set_threads(self.threads.for_step(0));
        match catch(|| self.ctx.decode_rows(&rows)) {
            Ok(Ok(())) => {
                for r in &rows {
                    let i = r.seq as usize;
                    let piece = self.model.token_text(r.token);
                    self.slots[i].seq.push(r.token, &piece);
                    self.ledger.append(i, 1);
                }
                debug!(rows = rows.len(), "finished replies' last tokens decoded");
            }
            _ => self.resync(),
        }
    }

    /// Save slot `i` to disk at a prefill or generation frontier.
    fn save_frontier(&mut self, i: usize) {
        self.keep_state(i, true, false);
    }

    /// Copy slot `i`'s state out once for what wants it here: the disk (a
    /// frontier not saved yet) and the RAM store (a checkpoint).
    fn keep_state(&mut self, i: usize, to_disk: bool, to_ram: bool) {
        let slot = &self.slots[i];
        let to_disk = to_disk && self.kv.disk.is_some() && slot.seq.len() > slot.disk_saved_len;
        if !to_disk && !to_ram {
            return;
        }
        let state = Arc::new(self.ctx.seq_state_get(i as i32));
        self.snapshot_taken = true;
        let slot = &mut self.slots[i];
        if let Some(disk) = self.kv.disk.as_ref().filter(|_| to_disk) {
            disk.save(slot.seq.clone(), state.clone());
            slot.disk_saved_len = slot.seq.len();
        }
        if to_ram {
            let tokens = slot.seq.len();
            debug!(seq = i, tokens, bytes = state.len(), "state checkpoint");
            self.kv.ram.insert(slot.seq.clone(), state);
        }
    }
}
