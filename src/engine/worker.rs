//! The engine thread: take jobs in arrival order, reuse the live KV prefix,
//! prefill the rest in chunks, decode token by token.
//!
//! Everything here runs on one named OS thread that owns the llama.cpp
//! context. It reports through each job's unbounded event channel and never
//! waits on a client. Cancellation is checked between chunks and tokens, and
//! inside llama.cpp's compute through the abort callback.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::cache::disk::DiskStore;
use super::cache::sequence::Sequence;
use super::cache::{match_prompt, Match, RamStore};
use super::fault::{FaultKind, FaultPlan};
use super::llama::{Context, ContextParams, DecodeError, LlamaError, Model, Token};
use super::sampling::{logprobs, Sampler};
use super::text::StopScanner;
use super::{
    CancelFlag, Command, EngineConfig, EngineError, EngineStats, Event, FinishReason, GenerateRequest, Job, PrefixSource, ReasoningBudget,
    Timings, TokenLogprob, TopLogprob, Usage,
};

/// State the abort callback reads from inside llama.cpp's compute. Plain
/// std mutexes: the callback runs on a compute thread, never in async code,
/// and each lock is held for a few instructions.
#[derive(Default)]
struct AbortHook {
    /// The running job's cancel flag.
    cancel: Mutex<Option<CancelFlag>>,
    /// A stall armed for the next graph compute (fault injection).
    stall: Mutex<Option<Duration>>,
    /// A failure armed for the next graph compute (fault injection).
    fail: Mutex<bool>,
}

impl AbortHook {
    fn should_abort(&self) -> bool {
        let cancel = self.cancel.lock().map(|c| c.clone()).unwrap_or(None);
        let cancelled = || cancel.as_ref().is_some_and(CancelFlag::is_cancelled);
        if self.fail.lock().map(|mut f| std::mem::take(&mut *f)).unwrap_or(false) {
            return true;
        }
        let stall = self.stall.lock().ok().and_then(|mut s| s.take());
        if let Some(stall) = stall {
            // The injected fault: compute goes quiet, as a hung kernel or a
            // slow memory wait would. Only cancellation ends it early.
            let until = Instant::now() + stall;
            while Instant::now() < until {
                if cancelled() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
            }
        }
        cancelled()
    }

    fn arm_stall(&self, stall: Duration) {
        if let Ok(mut s) = self.stall.lock() {
            *s = Some(stall);
        }
    }

    fn arm_failure(&self) {
        if let Ok(mut f) = self.fail.lock() {
            *f = true;
        }
    }

    /// Whether the running job's client has gone.
    fn job_cancelled(&self) -> bool {
        self.cancel.lock().ok().and_then(|c| c.as_ref().map(CancelFlag::is_cancelled)).unwrap_or(false)
    }

    fn set_job(&self, cancel: Option<CancelFlag>) {
        if let Ok(mut c) = self.cancel.lock() {
            *c = cancel;
        }
        if let Ok(mut s) = self.stall.lock() {
            *s = None;
        }
        if let Ok(mut f) = self.fail.lock() {
            *f = false;
        }
    }
}

/// What the job is doing, for the watchdog.
#[derive(Default)]
struct Progress {
    /// 0 idle, 1 prefill, 2 decode.
    phase: AtomicU8,
    /// Current position in the sequence.
    pos: AtomicUsize,
    /// Milliseconds since `epoch` of the last completed chunk or token.
    last_ms: AtomicU64,
}

const PHASES: [&str; 3] = ["idle", "prefill", "decode"];

impl Progress {
    fn touch(&self, epoch: Instant, phase: u8, pos: usize) {
        self.phase.store(phase, Ordering::Relaxed);
        self.pos.store(pos, Ordering::Relaxed);
        self.last_ms.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// A job that has made no progress for this long gets a warning line.
const WATCHDOG_AFTER: Duration = Duration::from_secs(30);
/// How often a decode line is logged.
const DECODE_LOG_EVERY: Duration = Duration::from_secs(2);
/// Sequences shorter than this are not worth a RAM snapshot.
const MIN_RAM_TOKENS: usize = 64;
/// Sequences shorter than this are not worth a disk snapshot.
const MIN_DISK_TOKENS: usize = 256;
/// The live sequence is snapshotted before it loses this many tokens.
const SNAPSHOT_BEFORE_LOSS: usize = 64;
/// A snapshot is restored only when it beats the live sequence by this
/// many tokens: restoring costs a state copy.
const RESTORE_GAIN: usize = 16;
/// Long prefills and generations are saved to disk every this many tokens.
const FRONTIER: usize = 16384;
/// The first disk save of a prompt stops this many tokens short of its end.
const SAVE_TRIM: usize = 32;

/// The RAM and disk snapshot stores.
struct KvStores {
    ram: RamStore,
    disk: Option<DiskStore>,
    /// Length of the live sequence's longest prefix already on disk.
    disk_saved_len: usize,
}

/// Create the context and start the engine thread. Returns the context size.
pub(super) fn spawn(
    model: Arc<Model>,
    config: EngineConfig,
    jobs: mpsc::UnboundedReceiver<Command>,
    stats: Arc<EngineStats>,
) -> Result<u32, LlamaError> {
    let hook = Arc::new(AbortHook::default());
    let n_ctx = if config.n_ctx == 0 { model.n_ctx_train() } else { config.n_ctx };
    // llama.cpp's own default is a fixed 4 threads; one per core is right
    // for compute-bound CPU inference.
    let n_threads = if config.n_threads > 0 {
        config.n_threads
    } else {
        std::thread::available_parallelism().map(|n| n.get() as i32).unwrap_or(4)
    };
    let params = ContextParams { n_ctx, n_batch: config.n_batch.max(1), n_threads };
    let cb_hook = hook.clone();
    let ctx = Context::new(model.clone(), params, Box::new(move || cb_hook.should_abort()))?;
    let n_ctx = ctx.n_ctx();
    let progress = Arc::new(Progress::default());
    let epoch = Instant::now();
    spawn_watchdog(progress.clone(), epoch);
    let disk = match &config.kv_disk_dir {
        Some(dir) => match DiskStore::open(dir, model.fingerprint(), n_ctx, config.kv_disk_bytes) {
            Ok(d) => Some(d),
            Err(err) => {
                warn!(dir = %dir.display(), cause = %err, "KV disk cache unavailable");
                None
            }
        },
        None => None,
    };
    let kv = KvStores { ram: RamStore::new(config.cache_ram_bytes), disk, disk_saved_len: 0 };
    let mut worker = Worker { ctx, model, live: Sequence::default(), kv, hook, config, stats, progress, epoch };
    std::thread::Builder::new()
        .name("hearth-engine".into())
        .spawn(move || worker.run(jobs))
        .expect("cannot spawn the engine thread");
    Ok(n_ctx)
}

fn spawn_watchdog(progress: Arc<Progress>, epoch: Instant) {
    let _ = std::thread::Builder::new().name("hearth-watchdog".into()).spawn(move || {
        let mut warned_at = 0u64;
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let phase = progress.phase.load(Ordering::Relaxed);
            if phase == 0 {
                continue;
            }
            let last = progress.last_ms.load(Ordering::Relaxed);
            let stalled = (epoch.elapsed().as_millis() as u64).saturating_sub(last);
            // Warn once per 30 s of silence, again if it goes on.
            if stalled >= WATCHDOG_AFTER.as_millis() as u64 && stalled / 30_000 != warned_at {
                warned_at = stalled / 30_000;
                warn!(
                    phase = PHASES[phase as usize],
                    pos = progress.pos.load(Ordering::Relaxed),
                    stalled_secs = stalled / 1000,
                    "watchdog: job has made no progress"
                );
            } else if stalled < WATCHDOG_AFTER.as_millis() as u64 {
                warned_at = 0;
            }
        }
    });
}

/// How many tokens of a `matched` prefix a prompt of `len` tokens can
/// reuse. The last prompt token is always recomputed: its logits start the
/// generation. When the cache holds the whole prompt (a retry, a restart),
/// its whole last chunk is recomputed: that token computed in a batch of one
/// can round differently from the cold run, and a repeated greedy request
/// must answer exactly as the first time did.
fn usable_prefix(matched: usize, len: usize, batch: usize) -> usize {
    if matched + 1 >= len {
        (len.saturating_sub(1) / batch) * batch
    } else {
        matched
    }
}

struct Worker {
    ctx: Context,
    model: Arc<Model>,
    /// The tokens (and their text) whose KV state sequence 0 holds,
    /// positions `0..len`. Kept equal to the KV cache after every decode,
    /// aborted ones included.
    live: Sequence,
    kv: KvStores,
    hook: Arc<AbortHook>,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    progress: Arc<Progress>,
    epoch: Instant,
}

/// How a job's run ended early.
enum Stop {
    Cancelled,
    Failed(EngineError),
}

impl Worker {
    fn run(&mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        while let Some(command) = commands.blocking_recv() {
            let job = match command {
                Command::Run(job) => job,
                Command::Shutdown(done) => {
                    self.shutdown();
                    let _ = done.send(());
                    // Fail whatever is still queued, then stop.
                    commands.close();
                    while let Some(Command::Run(job)) = commands.blocking_recv() {
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                        let _ = job.events.send(Event::Failed(super::EngineError::Stopped));
                    }
                    break;
                }
            };
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            let span = job.span.clone();
            let _enter = span.enter();
            if job.cancel.is_cancelled() || job.events.is_closed() {
                info!("skipped: the client left while queued");
                continue;
            }
            self.hook.set_job(Some(job.cancel.clone()));
            let started = Instant::now();
            match self.run_job(&job) {
                Ok(()) => {}
                Err(Stop::Cancelled) => {
                    info!(kv_tokens = self.live.len(), secs = started.elapsed().as_secs_f64(), "cancelled: the client left")
                }
                Err(Stop::Failed(err)) => {
                    warn!(cause = %err, "job failed");
                    let _ = job.events.send(Event::Failed(err));
                }
            }
            self.hook.set_job(None);
            self.progress.phase.store(0, Ordering::Relaxed);
        }
        info!("engine thread stopping: no more jobs");
    }

    /// Save what should survive a restart: the live sequence, to disk.
    fn shutdown(&mut self) {
        info!(kv_tokens = self.live.len(), "engine shutting down");
        if let Some(disk) = &self.kv.disk {
            let save = (self.live.len() >= MIN_DISK_TOKENS && self.live.len() > self.kv.disk_saved_len)
                .then(|| (self.live.clone(), Arc::new(self.ctx.state_get())));
            disk.save_and_flush(save);
        }
    }

    /// Copy the live sequence out before it loses `losing` tokens: to RAM,
    /// and to disk when it is long.
    fn snapshot_live(&mut self, for_disk: bool) {
        let n = self.live.len();
        let to_ram = self.kv.ram.is_enabled() && n >= MIN_RAM_TOKENS;
        let to_disk = for_disk && self.kv.disk.is_some() && n >= MIN_DISK_TOKENS && n > self.kv.disk_saved_len;
        if !to_ram && !to_disk {
            return;
        }
        let state = Arc::new(self.ctx.state_get());
        if to_ram {
            self.kv.ram.insert(self.live.clone(), state.clone());
        }
        if let (true, Some(disk)) = (to_disk, &self.kv.disk) {
            disk.save(self.live.clone(), state);
            self.kv.disk_saved_len = n;
        }
    }

    /// Replace the live sequence with a snapshot's.
    fn restore(&mut self, seq: Sequence, state: &[u8]) -> bool {
        self.live.clear();
        if !self.ctx.state_set(state) || self.ctx.kv_len() != seq.len() {
            self.ctx.kv_clear();
            return false;
        }
        self.live = seq;
        true
    }

    /// Find the longest cached prefix of the prompt (live, RAM, disk), make
    /// it the live sequence, and return the prompt to run (re-tokenized
    /// after a text match), the tokens reused and where they came from.
    fn take_prefix(&mut self, req: &GenerateRequest) -> (Vec<Token>, usize, PrefixSource) {
        let text = req.prompt_text.as_deref();
        let live_m = match_prompt(&self.live, &req.prompt, text);
        let ram_m = self.kv.ram.best(&req.prompt, text);
        let disk_m = self.kv.disk.as_ref().and_then(|d| {
            d.with_entries(|es| {
                es.iter()
                    .filter(|e| (e.header.token_count as usize) < self.ctx.n_ctx() as usize)
                    .map(|e| (e.path.clone(), match_prompt(&e.seq, &req.prompt, text)))
                    .max_by_key(|(_, m)| m.tokens)
            })
        });
        let batch = self.config.n_batch.max(1) as usize;
        let usable = |m: &Match| usable_prefix(m.tokens, req.prompt.len(), batch);
        let live_n = usable(&live_m);
        let (ram_n, disk_n) = (ram_m.map_or(0, |(_, m)| usable(&m)), disk_m.as_ref().map_or(0, |(_, m)| usable(m)));
        let (mut m, mut source) = (live_m, PrefixSource::Live);
        if ram_n >= live_n + RESTORE_GAIN && ram_n >= disk_n {
            if let Some((seq, state)) = ram_m.and_then(|(i, _)| self.kv.ram.take_hit(i)) {
                self.snapshot_live(true);
                if self.restore(seq, &state) {
                    m = ram_m.map(|(_, m)| m).unwrap_or_default();
                    source = PrefixSource::Ram;
                    self.kv.disk_saved_len = 0;
                }
            }
        } else if disk_n >= live_n.max(ram_n) + RESTORE_GAIN {
            let (path, dm) = disk_m.clone().unwrap_or_default();
            let loaded = self.kv.disk.as_ref().and_then(|d| d.load(&path));
            if let Some((seq, state)) = loaded {
                self.snapshot_live(true);
                let n = seq.len();
                if self.restore(seq, &state) {
                    m = dm;
                    source = PrefixSource::Disk;
                    self.kv.disk_saved_len = n;
                } else if let Some(d) = &self.kv.disk {
                    d.discard(&path, "llama.cpp refused its state");
                }
            }
        }
        if source != PrefixSource::Live && self.live.is_empty() {
            // A failed restore emptied the context.
            m = Match::default();
        }
        let prompt = match (m.by_text, text) {
            (true, Some(text)) => {
                let mut p = self.live.tokens()[..m.tokens].to_vec();
                p.extend(self.model.tokenize(&text[m.text_bytes..], false, true));
                p
            }
            _ => req.prompt.clone(),
        };
        let keep = usable_prefix(m.tokens, prompt.len(), batch);
        if source == PrefixSource::Live && self.live.len() >= keep + SNAPSHOT_BEFORE_LOSS {
            self.snapshot_live(true);
        }
        if keep < self.live.len() {
            if self.ctx.kv_truncate(keep) {
                self.live.truncate(keep);
            } else {
                // Memory that cannot rewind partially (recurrent state).
                self.ctx.kv_clear();
                self.live.clear();
            }
        }
        self.kv.disk_saved_len = self.kv.disk_saved_len.min(self.live.len());
        let reused = self.live.len();
        info!(
            source = if reused == 0 { "none" } else { source.as_str() },
            reused,
            by_text = m.by_text,
            prompt_tokens = prompt.len(),
            "prefix: live usable {live_n}, RAM best {ram_n} of {} snapshots, disk best {disk_n} of {}",
            self.kv.ram.len(),
            self.kv.disk.as_ref().map_or(0, |d| d.with_entries(|e| e.len())),
        );
        (prompt, reused, if reused == 0 { PrefixSource::None } else { source })
    }

    /// The text a prompt token adds to the live sequence. A BOS that the
    /// tokenizer added (it is not in the rendered text) adds nothing.
    fn prompt_piece(&self, pos: usize, token: Token, text: Option<&str>) -> Vec<u8> {
        let piece = self.model.token_text(token);
        if pos == 0 && Some(token) == self.model.bos() && text.is_some_and(|t| !t.as_bytes().starts_with(&piece)) {
            return Vec::new();
        }
        piece
    }

    /// Save the live sequence to disk at a prefill or generation frontier.
    fn save_frontier(&mut self) {
        if let Some(disk) = &self.kv.disk {
            if self.live.len() > self.kv.disk_saved_len {
                disk.save(self.live.clone(), Arc::new(self.ctx.state_get()));
                self.kv.disk_saved_len = self.live.len();
            }
        }
    }

    fn fault_for(&self, job: &Job, kind: FaultKind) -> Option<Duration> {
        let plan: &FaultPlan = self.config.fault.as_ref()?;
        (plan.kind == kind && plan.applies_to(job.seq)).then_some(plan.stall)
    }

    /// Bring `live` back in line with the KV cache after a failed or aborted
    /// decode (llama.cpp drops the failed micro-batch's positions).
    fn resync_live(&mut self) {
        let kv = self.ctx.kv_len();
        self.live.truncate(kv);
    }

    fn check(&self, job: &Job) -> Result<(), Stop> {
        if job.cancel.is_cancelled() {
            Err(Stop::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Evaluate tokens at the end of the live sequence. `pieces` are their
    /// texts, appended to the live text.
    fn decode(&mut self, tokens: &[Token], pieces: Vec<Vec<u8>>, want_logits: bool) -> Result<(), Stop> {
        let pos = self.live.len();
        match self.ctx.decode(tokens, pos, want_logits) {
            Ok(()) => {
                for (&t, p) in tokens.iter().zip(pieces) {
                    self.live.push(t, &p);
                }
                Ok(())
            }
            Err(err) => {
                self.resync_live();
                Err(match err {
                    DecodeError::Aborted if self.hook.job_cancelled() => Stop::Cancelled,
                    // An abort nobody asked for is a failure of the compute.
                    DecodeError::Aborted => Stop::Failed(EngineError::Decode(2)),
                    DecodeError::NoSlot => Stop::Failed(EngineError::Decode(1)),
                    DecodeError::Failed(code) => Stop::Failed(EngineError::Decode(code)),
                })
            }
        }
    }

    fn run_job(&mut self, job: &Job) -> Result<(), Stop> {
        let req = &job.request;
        let n_ctx = self.ctx.n_ctx() as usize;
        if req.prompt.is_empty() || req.prompt.len() >= n_ctx {
            return Err(Stop::Failed(EngineError::PromptTooLong { prompt: req.prompt.len() as u32, ctx: n_ctx as u32 }));
        }
        let (prompt, cached, source) = self.take_prefix(req);
        let prompt = &prompt;
        let text = req.prompt_text.as_deref();
        let total = prompt.len();
        let _ = job.events.send(Event::Started { prompt_tokens: total as u32, cached: cached as u32, source });

        // Prefill, one chunk (one llama.cpp micro-batch) at a time. Chunk
        // ends fall on multiples of the batch size, as on a cold start, so
        // a resumed prompt is computed in the same chunks as a fresh one.
        let batch = self.config.n_batch.max(1) as usize;
        let ends: Vec<usize> = (cached / batch + 1..).map(|k| (k * batch).min(total)).take_while(|&e| e > cached).scan(cached, |prev, e| {
            if *prev >= total {
                None
            } else {
                *prev = e;
                Some(e)
            }
        }).collect();
        let n_chunks = ends.len();
        let stall_chunk = if n_chunks == 1 { 0 } else { 1 };
        let prefill_fault = self.fault_for(job, FaultKind::PrefillStall);
        // A long prompt is saved to disk once prefilled up to a chunk end a
        // little short of its end: a later request that appends text (the
        // next turn) still matches it, whatever the last tokens become.
        let first_save = (total.saturating_sub(SAVE_TRIM) / batch) * batch;
        let t0 = Instant::now();
        self.progress.touch(self.epoch, 1, self.live.len());
        let mut start = cached;
        for (i, &end) in ends.iter().enumerate() {
            self.check(job)?;
            if let (Some(stall), true) = (prefill_fault, i == stall_chunk) {
                self.hook.arm_stall(stall);
            }
            let chunk = &prompt[start..end];
            let pieces = (start..end).map(|pos| self.prompt_piece(pos, prompt[pos], text)).collect();
            let tc = Instant::now();
            self.decode(chunk, pieces, end == total)?;
            start = end;
            let done = self.live.len();
            let elapsed = t0.elapsed();
            self.progress.touch(self.epoch, 1, done);
            let chunk_secs = tc.elapsed().as_secs_f64();
            info!(
                "prefill {done}/{total} ({:.1}%) chunk {} tok {:.1} t/s, avg {:.1} t/s, {:.2}s",
                100.0 * done as f64 / total as f64,
                chunk.len(),
                chunk.len() as f64 / chunk_secs.max(1e-9),
                (done - cached) as f64 / elapsed.as_secs_f64().max(1e-9),
                elapsed.as_secs_f64(),
            );
            let _ = job.events.send(Event::PrefillProgress { done: done as u32, total: total as u32, elapsed });
            if done >= MIN_DISK_TOKENS && (done == first_save || done / FRONTIER > self.kv.disk_saved_len / FRONTIER) {
                self.save_frontier();
            }
        }
        if let Some(t) = text {
            if self.live.text_ok() && self.live.text() != t.as_bytes() {
                // The tokens do not spell the rendered text back (a
                // tokenizer quirk): match this sequence by tokens only.
                debug!("live text differs from the rendered prompt; text matching off for it");
                self.live.mark_text_unknown();
            }
        }
        let prefill_secs = t0.elapsed().as_secs_f64();

        // Decode.
        let decode_fault = self.fault_for(job, FaultKind::DecodeStall);
        let decode_error = self.fault_for(job, FaultKind::DecodeError).is_some();
        let model = self.ctx.model().clone();
        let mut sampler = match Sampler::new(&req.sampling, &model, req.grammar.as_ref()) {
            Ok(s) => s,
            Err(err) => {
                // The HTTP side validates grammars (`grammar::validate`)
                // before queueing, with the same call: not reached.
                warn!(cause = %err, "grammar refused; generating without it");
                Sampler::new(&req.sampling, &model, None).unwrap_or_else(|_| unreachable!("no grammar, no error"))
            }
        };
        let mut out = Output::new(&job.events, req.stop.clone());
        let top_n = req.logprobs.map(|n| n.min(MAX_TOP_LOGPROBS) as usize);
        let mut budget = req.reasoning_budget.as_ref().map(|b| Budget::new(&model, b));
        // Tokens the engine writes itself (the end of an over-long
        // reasoning section), fed one per step as if sampled.
        let mut forced: VecDeque<Token> = VecDeque::new();
        let t1 = Instant::now();
        let mut last_log = t1;
        let mut generated = 0u32;
        let reason = loop {
            if generated >= req.max_tokens {
                break FinishReason::MaxTokens;
            }
            if self.live.len() >= n_ctx {
                break FinishReason::ContextFull;
            }
            self.check(job)?;
            if let Some(tokens) = budget.as_mut().and_then(|b| b.due(generated)) {
                debug!(generated, "reasoning budget spent: closing the reasoning");
                forced.extend(tokens);
            }
            let (token, was_forced) = match forced.pop_front() {
                Some(t) => {
                    sampler.accept_forced(t);
                    (t, true)
                }
                None => match sampler.sample(&self.ctx) {
                    Some(t) => (t, false),
                    // The grammar allows nothing more: treat it as the end.
                    None => break FinishReason::EndOfTurn,
                },
            };
            generated += 1;
            let eog = model.is_eog(token);
            if eog && !was_forced && !req.ignore_eos {
                break FinishReason::EndOfTurn;
            }
            // Special tokens keep their text (tool-call markers must reach
            // the tool parsers); end-of-generation tokens are never text.
            let bytes = if eog { Vec::new() } else { model.token_text(token) };
            let logprob = top_n.map(|n| token_logprob(&model, self.ctx.last_logits(), token, &bytes, n));
            if let Some(b) = budget.as_mut() {
                b.observe(&bytes);
            }
            if let Some(stop) = out.push(&bytes, logprob) {
                break FinishReason::StopSequence(stop);
            }
            if generated >= req.max_tokens {
                // No need to compute logits nobody will read.
                break FinishReason::MaxTokens;
            }
            if let (Some(stall), 5) = (decode_fault, generated) {
                self.hook.arm_stall(stall);
            }
            if decode_error && generated == 5 {
                self.hook.arm_failure();
            }
            self.decode(&[token], vec![model.token_text(token)], true)?;
            self.progress.touch(self.epoch, 2, self.live.len());
            if self.live.len() % FRONTIER == 0 {
                self.save_frontier();
            }
            if last_log.elapsed() >= DECODE_LOG_EVERY {
                last_log = Instant::now();
                info!("decode {generated} tokens, {:.1} t/s", generated as f64 / t1.elapsed().as_secs_f64().max(1e-9));
            }
        };
        out.finish(matches!(reason, FinishReason::StopSequence(_)));
        let usage = Usage { prompt_tokens: total as u32, cached_tokens: cached as u32, completion_tokens: generated };
        let decode_secs = t1.elapsed().as_secs_f64();
        info!(
            prompt_tokens = total,
            cached_tokens = cached,
            completion_tokens = generated,
            reason = ?reason,
            "done: prefill {:.2}s ({:.1} t/s), decode {:.2}s ({:.1} t/s)",
            prefill_secs,
            (total - cached) as f64 / prefill_secs.max(1e-9),
            decode_secs,
            generated as f64 / decode_secs.max(1e-9),
        );
        debug!(kv_tokens = self.live.len(), "live sequence");
        let timings = Timings { prefill: t1 - t0, decode: t1.elapsed() };
        let _ = job.events.send(Event::Finished { reason, usage, timings });
        Ok(())
    }
}

/// At most this many alternatives per token are reported (OpenAI's cap).
const MAX_TOP_LOGPROBS: u32 = 20;

/// Generated tokens to a job's events: their text through the stop
/// scanner, and their logprobs (when asked for) just before the `Text`
/// that first holds some of their text.
struct Output<'a> {
    events: &'a mpsc::UnboundedSender<Event>,
    scanner: StopScanner,
    /// Logprobs of tokens none of whose text is released yet, each with the
    /// offset of its text in the generated bytes.
    pending: VecDeque<(usize, TokenLogprob)>,
    /// Generated bytes pushed so far.
    pushed: usize,
    /// Text bytes released so far (equal to the bytes pushed and released,
    /// except where invalid UTF-8 became U+FFFD).
    released: usize,
}

impl<'a> Output<'a> {
    fn new(events: &'a mpsc::UnboundedSender<Event>, stops: Vec<String>) -> Self {
        Output { events, scanner: StopScanner::new(stops), pending: VecDeque::new(), pushed: 0, released: 0 }
    }

    /// One generated token's text and logprob. Returns the stop sequence
    /// when one matched: generation ends, and the tokens inside or after
    /// it are dropped.
    fn push(&mut self, bytes: &[u8], logprob: Option<TokenLogprob>) -> Option<String> {
        if let Some(lp) = logprob {
            self.pending.push_back((self.pushed, lp));
        }
        self.pushed += bytes.len();
        let out = self.scanner.push(bytes);
        if !out.text.is_empty() {
            self.released += out.text.len();
            let released = self.released;
            self.send_logprobs(|start| start < released);
            let _ = self.events.send(Event::Text(out.text));
        }
        if out.stop.is_some() {
            self.pending.clear();
        }
        out.stop
    }

    /// Generation ended: release what the scanner held (unless a stop
    /// sequence ended it), preceded by the logprobs still pending.
    fn finish(&mut self, stopped: bool) {
        let tail = self.scanner.finish();
        if stopped {
            self.pending.clear();
            return;
        }
        self.send_logprobs(|_| true);
        if !tail.is_empty() {
            self.released += tail.len();
            let _ = self.events.send(Event::Text(tail));
        }
    }

    /// Send the pending logprobs whose text starts where `released` says.
    fn send_logprobs(&mut self, released: impl Fn(usize) -> bool) {
        let n = self.pending.iter().take_while(|(start, _)| released(*start)).count();
        if n > 0 {
            let batch = self.pending.drain(..n).map(|(_, lp)| lp).collect();
            let _ = self.events.send(Event::Logprobs(batch));
        }
    }
}

/// A chosen token's logprob and the `n` most likely alternatives, from the
/// raw logits it was sampled from.
fn token_logprob(model: &Model, logits: &[f32], token: Token, bytes: &[u8], n: usize) -> TokenLogprob {
    let (logprob, top) = logprobs(logits, token, n);
    let top = top
        .into_iter()
        .map(|(t, logprob)| {
            let bytes = model.token_text(t);
            TopLogprob { token: String::from_utf8_lossy(&bytes).into_owned(), bytes, logprob }
        })
        .collect();
    TokenLogprob { token: String::from_utf8_lossy(bytes).into_owned(), bytes: bytes.to_vec(), logprob, top }
}

/// A reasoning budget being spent.
struct Budget {
    max_tokens: u32,
    close: Vec<u8>,
    /// `close` tokenized with its markup as special tokens.
    tokens: Vec<Token>,
    /// The last generated bytes, enough to see `close` arrive split over
    /// tokens.
    window: Vec<u8>,
    /// The reasoning is closed (by the model or by us): nothing more to do.
    done: bool,
}

impl Budget {
    fn new(model: &Model, b: &ReasoningBudget) -> Budget {
        let tokens = model.tokenize(&b.close, false, true);
        let done = b.close.is_empty() || tokens.is_empty();
        Budget { max_tokens: b.max_tokens, close: b.close.as_bytes().to_vec(), tokens, window: Vec::new(), done }
    }

    /// The close marker's tokens, once, when `generated` tokens spend the
    /// budget before the model closed its reasoning itself.
    fn due(&mut self, generated: u32) -> Option<Vec<Token>> {
        if self.done || generated < self.max_tokens {
            return None;
        }
        self.done = true;
        Some(self.tokens.clone())
    }

    /// A generated token's text: the model may close its reasoning itself.
    fn observe(&mut self, bytes: &[u8]) {
        if self.done {
            return;
        }
        self.window.extend_from_slice(bytes);
        if self.window.windows(self.close.len()).any(|w| w == self.close.as_slice()) {
            self.done = true;
            self.window = Vec::new();
            return;
        }
        let keep = self.close.len() - 1;
        if self.window.len() > keep {
            self.window.drain(..self.window.len() - keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::usable_prefix;

    #[test]
    fn a_fully_cached_prompt_recomputes_its_last_chunk() {
        assert_eq!(usable_prefix(1403, 1403, 512), 1024);
        assert_eq!(usable_prefix(1500, 1403, 512), 1024);
        assert_eq!(usable_prefix(1402, 1403, 512), 1024);
        assert_eq!(usable_prefix(1024, 1024, 512), 512);
    }

    #[test]
    fn a_partial_match_is_used_whole() {
        assert_eq!(usable_prefix(1416, 1439, 512), 1416);
        assert_eq!(usable_prefix(0, 10, 512), 0);
    }

    use super::{Budget, Output, TokenLogprob};
    use crate::engine::Event;
    use tokio::sync::mpsc;

    fn lp(t: &str) -> Option<TokenLogprob> {
        Some(TokenLogprob { token: t.into(), bytes: t.as_bytes().to_vec(), logprob: -1.0, top: vec![] })
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<String> {
        let mut v = Vec::new();
        while let Ok(e) = rx.try_recv() {
            v.push(match e {
                Event::Text(t) => format!("T:{t}"),
                Event::Logprobs(l) => format!("L:{}", l.iter().map(|x| x.token.as_str()).collect::<Vec<_>>().join("|")),
                _ => "?".into(),
            });
        }
        v
    }

    #[test]
    fn logprobs_come_just_before_the_text_that_holds_them() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut out = Output::new(&tx, vec!["STOP".into()]);
        assert_eq!(out.push(b"Hi", lp("Hi")), None);
        assert_eq!(out.push(b" S", lp(" S")), None);
        assert_eq!(out.push(b"T", lp("T")), None);
        assert_eq!(out.push(b"ar", lp("ar")), None);
        out.finish(false);
        assert_eq!(drain(&mut rx), vec!["L:Hi", "T:Hi", "L: S", "T: ", "L:T|ar", "T:STar"]);
    }

    #[test]
    fn tokens_in_a_stop_sequence_are_dropped() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut out = Output::new(&tx, vec!["STOP".into()]);
        assert_eq!(out.push(b"ab S", lp("ab S")), None);
        assert_eq!(out.push(b"TO", lp("TO")), None);
        assert_eq!(out.push(b"Pzz", lp("Pzz")).as_deref(), Some("STOP"));
        out.finish(true);
        assert_eq!(drain(&mut rx), vec!["L:ab S", "T:ab "]);
    }

    #[test]
    fn split_characters_and_leftovers_are_flushed_at_the_end() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut out = Output::new(&tx, vec![]);
        let euro = "€".as_bytes();
        out.push(&euro[..2], lp("a"));
        out.push(&euro[2..], lp("b"));
        out.push(&[0xE2], lp("c"));
        out.finish(false);
        assert_eq!(drain(&mut rx), vec!["L:a|b", "T:€", "L:c", "T:\u{FFFD}"]);
    }

    #[test]
    fn no_logprobs_means_text_only() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut out = Output::new(&tx, vec![]);
        out.push(b"x", None);
        out.finish(false);
        assert_eq!(drain(&mut rx), vec!["T:x"]);
    }

    fn budget(max: u32) -> Budget {
        Budget { max_tokens: max, close: b"</think>".to_vec(), tokens: vec![7, 8], window: vec![], done: false }
    }

    #[test]
    fn a_budget_closes_once_when_spent() {
        let mut b = budget(2);
        assert_eq!(b.due(0), None);
        b.observe(b"hmm");
        assert_eq!(b.due(2), Some(vec![7, 8]));
        assert_eq!(b.due(3), None);
        assert_eq!(budget(0).due(0), Some(vec![7, 8]));
    }

    #[test]
    fn a_budget_closed_by_the_model_does_nothing() {
        let mut b = budget(5);
        for piece in [&b"so </th"[..], b"in", b"k>", b" answer"] {
            b.observe(piece);
        }
        assert!(b.done);
        assert_eq!(b.due(10), None);
        let mut b = budget(5);
        b.observe(b"</thi");
        b.observe(b"nk");
        assert!(!b.done);
    }
}
