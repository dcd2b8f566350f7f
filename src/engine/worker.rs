//! The engine thread: take jobs in arrival order, reuse the live KV prefix,
//! prefill the rest in chunks, decode token by token.
//!
//! Everything here runs on one named OS thread that owns the llama.cpp
//! context. It reports through each job's unbounded event channel and never
//! waits on a client. Cancellation is checked between chunks and tokens, and
//! inside llama.cpp's compute through the abort callback.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::fault::{FaultKind, FaultPlan};
use super::llama::{Context, ContextParams, DecodeError, LlamaError, Model, Token};
use super::sampling::Sampler;
use super::text::StopScanner;
use super::{CancelFlag, EngineConfig, EngineError, Command, EngineStats, Event, FinishReason, Job, PrefixSource, Timings, Usage};

/// State the abort callback reads from inside llama.cpp's compute. Plain
/// std mutexes: the callback runs on a compute thread, never in async code,
/// and each lock is held for a few instructions.
#[derive(Default)]
struct AbortHook {
    /// The running job's cancel flag.
    cancel: Mutex<Option<CancelFlag>>,
    /// A stall armed for the next graph compute (fault injection).
    stall: Mutex<Option<Duration>>,
}

impl AbortHook {
    fn should_abort(&self) -> bool {
        let cancel = self.cancel.lock().map(|c| c.clone()).unwrap_or(None);
        let cancelled = || cancel.as_ref().is_some_and(CancelFlag::is_cancelled);
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

    fn set_job(&self, cancel: Option<CancelFlag>) {
        if let Ok(mut c) = self.cancel.lock() {
            *c = cancel;
        }
        if let Ok(mut s) = self.stall.lock() {
            *s = None;
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
    let ctx = Context::new(model, params, Box::new(move || cb_hook.should_abort()))?;
    let n_ctx = ctx.n_ctx();
    let progress = Arc::new(Progress::default());
    let epoch = Instant::now();
    spawn_watchdog(progress.clone(), epoch);
    let mut worker = Worker { ctx, live: Vec::new(), hook, config, stats, progress, epoch };
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

struct Worker {
    ctx: Context,
    /// The tokens whose KV state sequence 0 holds, positions `0..len`.
    /// Kept equal to the KV cache after every decode, aborted ones included.
    live: Vec<Token>,
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

    /// Save what should survive a restart.
    fn shutdown(&mut self) {
        info!(kv_tokens = self.live.len(), "engine shutting down");
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

    fn decode(&mut self, tokens: &[Token], want_logits: bool) -> Result<(), Stop> {
        let pos = self.live.len();
        match self.ctx.decode(tokens, pos, want_logits) {
            Ok(()) => {
                self.live.extend_from_slice(tokens);
                Ok(())
            }
            Err(err) => {
                self.resync_live();
                Err(match err {
                    DecodeError::Aborted => Stop::Cancelled,
                    DecodeError::NoSlot => Stop::Failed(EngineError::Decode(1)),
                    DecodeError::Failed(code) => Stop::Failed(EngineError::Decode(code)),
                })
            }
        }
    }

    /// Keep the longest common prefix of the live sequence and the prompt;
    /// drop the rest. At least the last prompt token is always recomputed,
    /// since its logits start the generation.
    fn reuse_prefix(&mut self, prompt: &[Token]) -> usize {
        let common = self.live.iter().zip(prompt).take_while(|(a, b)| a == b).count();
        let keep = common.min(prompt.len().saturating_sub(1));
        if keep < self.live.len() {
            if !self.ctx.kv_truncate(keep) {
                // Memory that cannot rewind partially (recurrent state).
                self.ctx.kv_clear();
                self.live.clear();
                return 0;
            }
            self.live.truncate(keep);
        }
        keep
    }

    fn run_job(&mut self, job: &Job) -> Result<(), Stop> {
        let req = &job.request;
        let prompt = &req.prompt;
        let n_ctx = self.ctx.n_ctx() as usize;
        if prompt.is_empty() || prompt.len() >= n_ctx {
            return Err(Stop::Failed(EngineError::PromptTooLong { prompt: prompt.len() as u32, ctx: n_ctx as u32 }));
        }
        let cached = self.reuse_prefix(prompt);
        let total = prompt.len();
        let source = if cached > 0 { PrefixSource::Live } else { PrefixSource::None };
        let _ = job.events.send(Event::Started { prompt_tokens: total as u32, cached: cached as u32, source });
        info!(prompt_tokens = total, cached_tokens = cached, source = source.as_str(), "job started");

        // Prefill, one chunk (one llama.cpp micro-batch) at a time.
        let batch = self.config.n_batch.max(1) as usize;
        let todo = &prompt[cached..];
        let n_chunks = todo.len().div_ceil(batch);
        let stall_chunk = if n_chunks == 1 { 0 } else { 1 };
        let prefill_fault = self.fault_for(job, FaultKind::PrefillStall);
        let t0 = Instant::now();
        self.progress.touch(self.epoch, 1, self.live.len());
        for (i, chunk) in todo.chunks(batch).enumerate() {
            self.check(job)?;
            if let (Some(stall), true) = (prefill_fault, i == stall_chunk) {
                self.hook.arm_stall(stall);
            }
            let tc = Instant::now();
            let is_last = i + 1 == n_chunks;
            self.decode(chunk, is_last)?;
            let done = self.live.len();
            let elapsed = t0.elapsed();
            self.progress.touch(self.epoch, 1, done);
            let chunk_secs = tc.elapsed().as_secs_f64();
            let new_done = done - cached;
            info!(
                "prefill {done}/{total} ({:.1}%) chunk {} tok {:.1} t/s, avg {:.1} t/s, {:.2}s",
                100.0 * done as f64 / total as f64,
                chunk.len(),
                chunk.len() as f64 / chunk_secs.max(1e-9),
                new_done as f64 / elapsed.as_secs_f64().max(1e-9),
                elapsed.as_secs_f64(),
            );
            let _ = job.events.send(Event::PrefillProgress { done: done as u32, total: total as u32, elapsed });
        }
        let prefill_secs = t0.elapsed().as_secs_f64();

        // Decode.
        let decode_fault = self.fault_for(job, FaultKind::DecodeStall);
        let mut sampler = Sampler::new(&req.sampling);
        let mut scanner = StopScanner::new(req.stop.clone());
        let model = self.ctx.model().clone();
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
            let token = sampler.sample(&self.ctx);
            generated += 1;
            if model.is_eog(token) && !req.ignore_eos {
                break FinishReason::EndOfTurn;
            }
            let out = scanner.push(&model.token_bytes(token));
            if !out.text.is_empty() {
                let _ = job.events.send(Event::Text(out.text));
            }
            if let Some(stop) = out.stop {
                break FinishReason::StopSequence(stop);
            }
            if generated >= req.max_tokens {
                // No need to compute logits nobody will read.
                break FinishReason::MaxTokens;
            }
            if let (Some(stall), 5) = (decode_fault, generated) {
                self.hook.arm_stall(stall);
            }
            self.decode(&[token], true)?;
            self.progress.touch(self.epoch, 2, self.live.len());
            if last_log.elapsed() >= DECODE_LOG_EVERY {
                last_log = Instant::now();
                info!("decode {generated} tokens, {:.1} t/s", generated as f64 / t1.elapsed().as_secs_f64().max(1e-9));
            }
        };
        let tail = scanner.finish();
        if !tail.is_empty() && !matches!(reason, FinishReason::StopSequence(_)) {
            let _ = job.events.send(Event::Text(tail));
        }
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
