//! The engine thread: take commands, admit waiting jobs to sequences, and
//! run one step at a time, each step one llama.cpp batch over every running
//! sequence (`step.rs`); admission, prefix choice and preemption are in
//! `admit.rs`.
//!
//! Everything here runs on one named OS thread that owns the llama.cpp
//! context. It reports through each job's unbounded event channel and never
//! waits on a client. Cancellation is checked between steps, and inside
//! llama.cpp's compute through the abort callback (`hook.rs`).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::cache::disk::now_secs;
use super::cache::disk::DiskStore;
use super::cache::sequence::Sequence;
use super::cache::RamStore;
use super::cells::CellLedger;
use super::draft::Drafter;
use super::hook::{spawn_watchdog, AbortHook, Progress};
use super::llama::{Context, ContextParams, LlamaError, Model, Token};
use super::memory::Rewind;
use super::schedule::{PrefillCredit, StepCost};
use super::sequence::{Phase, Running};
use super::status::{first_line, EngineStatus, SlotStatus, StoredSnapshot, STORES_EVERY};
use super::threads::{cores, ThreadPolicy};
use super::{Command, EngineConfig, EngineError, EngineStats, Event, Job};

/// How often a sequence's decode line is logged.
pub(super) const DECODE_LOG_EVERY: Duration = Duration::from_secs(2);
/// Sequences shorter than this are not worth a RAM snapshot.
pub(super) const MIN_RAM_TOKENS: usize = 64;
/// Sequences shorter than this are not worth a disk snapshot.
pub(super) const MIN_DISK_TOKENS: usize = 256;
/// A sequence is snapshotted before it loses this many tokens.
pub(super) const SNAPSHOT_BEFORE_LOSS: usize = 64;
/// Long prefills and generations are saved to disk every this many tokens.
pub(super) const FRONTIER: usize = 16384;
/// The first disk save of a prompt stops this many tokens short of its end.
pub(super) const SAVE_TRIM: usize = 32;
/// Memory that cannot be cut back gets a RAM checkpoint every this many
/// tokens of a long prefill (besides the one before and at its end).
pub(super) const CHECKPOINT_EVERY: usize = 8192;
/// A prompt whose last turn mark is at most this many tokens before its
/// end is checkpointed at the mark alone.
pub(super) const MARK_NEAR_END: usize = 64;

/// The RAM and disk snapshot stores.
pub(super) struct KvStores {
    pub ram: RamStore,
    pub disk: Option<DiskStore>,
}

/// One sequence id of the unified KV.
pub(super) struct Slot {
    /// The tokens (and their text) whose KV state this sequence holds,
    /// positions `0..len`. Kept equal to the KV after every step, failed
    /// and aborted ones included.
    pub seq: Sequence,
    /// The job running on it; None: idle, its KV kept for reuse.
    pub run: Option<Box<Running>>,
    /// When it last ran, for choosing which idle sequence gives way.
    pub last_used: Instant,
    /// Length of this sequence's longest prefix already on disk.
    pub disk_saved_len: usize,
    /// The finished reply's last sampled token and its position: not in
    /// the KV yet, decoded when the engine next goes idle (`decode_tails`).
    /// Stale once the slot runs again or its length changes.
    pub tail: Option<(Token, usize)>,
}

/// A job waiting for a sequence, or a sequence preempted for KV room.
pub(super) enum Waiting {
    New(Box<Job>),
    Resume(Box<Running>),
}

impl Waiting {
    pub fn is_abandoned(&self) -> bool {
        match self {
            Waiting::New(job) => job.is_abandoned(),
            Waiting::Resume(run) => run.job.is_abandoned(),
        }
    }
}

pub(super) struct Worker {
    pub ctx: Context,
    /// Told once the engine has stopped and its context (and the compute
    /// threads' pools) are freed, so a process that exits right after
    /// `EngineHandle::shutdown` never tears down threads still running.
    pub on_stopped: Option<tokio::sync::oneshot::Sender<()>>,
    pub model: Arc<Model>,
    pub slots: Vec<Slot>,
    /// The KV cells each sequence holds, shared prefixes counted once.
    pub ledger: CellLedger,
    pub kv: KvStores,
    pub hook: Arc<AbortHook>,
    pub config: EngineConfig,
    pub stats: Arc<EngineStats>,
    pub progress: Arc<Progress>,
    pub epoch: Instant,
    pub waiting: VecDeque<Waiting>,
    /// What one request may use (`--ctx`).
    pub n_ctx_seq: usize,
    /// Prefill chunk size (`--batch`): chunk ends fall on its multiples.
    pub chunk: usize,
    /// What steps cost, measured: paces prefill and sizes drafts.
    pub cost: StepCost,
    /// Time-slices prefill beside decoding.
    pub credit: PrefillCredit,
    /// Admission counter.
    pub admitted: u64,
    /// How far the memory can cut a sequence back, and whether sequences
    /// share cells.
    pub memory: Rewind,
    /// A snapshot was copied out during this iteration (for the longest
    /// step with a snapshot).
    pub snapshot_taken: bool,
    pub last_step_rows: usize,
    /// Speculative decoding (None: off, or a model that cannot rewind).
    pub spec: Option<super::spec::SpecConfig>,
    /// The draft model, when drafts come from one instead of prompt lookup.
    pub drafter: Option<Drafter>,
    /// What drafts of each kind were measured to be worth, over every
    /// sequence so far: where a new sequence's drafting starts.
    pub spec_prior: super::spec::SpecPrior,
    /// How many compute threads each step gets.
    pub threads: ThreadPolicy,
}

/// Create the context and start the engine thread. Returns what one request
/// may use of the context.
pub(super) fn spawn(
    model: Arc<Model>,
    config: EngineConfig,
    jobs: mpsc::UnboundedReceiver<Command>,
    stats: Arc<EngineStats>,
) -> Result<u32, LlamaError> {
    let hook = Arc::new(AbortHook::default());
    let threads = ThreadPolicy::new(config.threads, cores());
    let (params, n_ctx_req) = context_params(&model, &config, threads.batch());
    let parallel = params.n_seq_max;
    let chunk = config.n_batch.max(1);
    let cb_hook = hook.clone();
    let ctx = Context::new(
        model.clone(),
        params,
        Box::new(move || cb_hook.should_abort()),
    )?;
    let kv_cells = ctx.n_ctx() as usize;
    // One sequence alone gets what the context rounded up to; several
    // share it, each up to --ctx.
    let n_ctx_seq = if parallel == 1 && config.kv_size == 0 {
        kv_cells
    } else {
        (n_ctx_req as usize).min(kv_cells)
    };
    info!(
        parallel,
        kv_cells,
        kv_bytes = ctx.kv_bytes(),
        kv_mib = format!("{:.1}", ctx.kv_bytes() as f64 / (1 << 20) as f64),
        n_ctx_per_request = n_ctx_seq,
        "KV cache: one unified buffer shared by {parallel} sequences"
    );
    let progress = Arc::new(Progress::default());
    let epoch = Instant::now();
    spawn_watchdog(progress.clone(), epoch);
    let disk = open_disk(&config, &model, n_ctx_seq);
    let mut kv = KvStores {
        ram: RamStore::new(config.cache_ram_bytes),
        disk,
    };
    let memory = rewind_of(&model, &params, ctx.n_rs_seq());
    if let Rewind::Window { n_swa } = memory {
        info!(
            n_swa,
            "sliding-window cache of normal size: a sequence is cut back only within its \
             window, and prefixes are not shared between sequences (--swa-full keeps every \
             position instead)"
        );
    }
    if memory.needs_checkpoints() && config.ctx_checkpoints > 0 {
        kv.ram.keep_checkpoints(config.ctx_checkpoints);
        info!(
            per_conversation = config.ctx_checkpoints,
            every = CHECKPOINT_EVERY,
            turn_marker_tokens = config.turn_marker.len(),
            "state checkpoints: this model's memory cannot be cut back freely, so prompts \
             keep checkpoints in RAM to restart from, taken where the last assistant turn \
             opens and at the prompt's end"
        );
    }
    let now = Instant::now();
    let slots = (0..parallel)
        .map(|_| Slot {
            seq: Sequence::default(),
            run: None,
            last_used: now,
            disk_saved_len: 0,
            tail: None,
        })
        .collect();
    stats.kv_cells.store(kv_cells, Ordering::Relaxed);
    stats
        .decode_threads
        .store(threads.decode(), Ordering::Relaxed);
    stats
        .batch_threads
        .store(threads.batch(), Ordering::Relaxed);
    info!(
        cores = cores(),
        threads = %describe(config.threads.decode, "from the machine's load"),
        threads_batch = %describe(config.threads.batch, "from the machine's load"),
        poll = config.threads.poll,
        "compute threads"
    );
    stats.kv_bytes.store(ctx.kv_bytes(), Ordering::Relaxed);
    stats
        .buffer_bytes
        .store(ctx.buffer_bytes(), Ordering::Relaxed);
    stats.alive.store(true, Ordering::Release);
    let (spec, drafter) =
        super::draft::speculation(&model, &config, params, chunk as usize, &stats, memory)?;
    let mut worker = Worker {
        spec,
        drafter,
        spec_prior: Default::default(),
        memory,
        ctx,
        model,
        slots,
        ledger: CellLedger::new(kv_cells, parallel as usize),
        kv,
        hook,
        config,
        stats,
        progress,
        epoch,
        waiting: VecDeque::new(),
        n_ctx_seq,
        chunk: chunk as usize,
        cost: StepCost::default(),
        credit: PrefillCredit::default(),
        admitted: 0,
        snapshot_taken: false,
        last_step_rows: 0,
        threads,
        on_stopped: None,
    };
    // The slot table is on /slots and the status page before the first
    // request, however late the engine thread is scheduled.
    worker.publish();
    start_thread(worker, jobs);
    Ok(n_ctx_seq as u32)
}

/// What the context's memory allows (`params` as it was created with, and
/// the rollback llama.cpp kept).
fn rewind_of(model: &Model, params: &ContextParams, n_rs_seq: u32) -> Rewind {
    if model.is_recurrent() {
        Rewind::Fixed {
            rollback: n_rs_seq as usize,
        }
    } else if model.has_swa() && !params.swa_full {
        Rewind::Window {
            n_swa: model.n_swa(),
        }
    } else {
        Rewind::Free
    }
}

/// The disk cache in `--kv-disk-dir`, when it opens: without it the engine
/// serves from RAM alone.
fn open_disk(config: &EngineConfig, model: &Model, n_ctx_seq: usize) -> Option<DiskStore> {
    let dir = config.kv_disk_dir.as_ref()?;
    match DiskStore::open(
        dir,
        model.fingerprint(),
        n_ctx_seq as u32,
        config.kv_disk_bytes,
    ) {
        Ok(d) => Some(d),
        Err(err) => {
            warn!(dir = %dir.display(), cause = %err, "KV disk cache unavailable");
            None
        }
    }
}

/// Run the engine loop on its own thread until shutdown or a panic, then
/// fail what is left, record why it stopped, and free the context.
fn start_thread(mut worker: Worker, jobs: mpsc::UnboundedReceiver<Command>) {
    std::thread::Builder::new()
        .name("hearth-engine".into())
        .spawn(move || {
            let stats = worker.stats.clone();
            let why = match catch_unwind(AssertUnwindSafe(|| worker.run(jobs))) {
                Ok(()) => "the engine was shut down".to_string(),
                Err(panic) => {
                    let why = format!("the engine thread failed: {}", panic_text(&*panic));
                    tracing::error!("{why}");
                    worker.fail_all(EngineError::Crashed(why.clone()));
                    why
                }
            };
            stats.alive.store(false, Ordering::Release);
            if let Ok(mut w) = stats.stopped_why.lock() {
                *w = Some(why);
            };
            let on_stopped = worker.on_stopped.take();
            drop(worker);
            if let Some(done) = on_stopped {
                let _ = done.send(());
            }
        })
        .expect("cannot spawn the engine thread");
}

/// A thread setting for the log: the fixed count, or how it is chosen.
fn describe(n: u32, auto: &str) -> String {
    match n {
        0 => auto.to_string(),
        n => n.to_string(),
    }
}

/// KV cells when `--kv-size` is not given: room for every sequence's whole
/// context, up to [`DEFAULT_KV_CAP`] cells, and never less than one context.
/// The context `config` asks for over `model`, and the context one request
/// may use (`--ctx`, or the model's trained length).
pub(super) fn context_params(
    model: &Model,
    config: &EngineConfig,
    n_threads: usize,
) -> (ContextParams, u32) {
    let n_ctx_req = if config.n_ctx == 0 {
        model.n_ctx_train()
    } else {
        config.n_ctx
    };
    let parallel = config.n_parallel.max(1);
    let kv_size = if config.kv_size > 0 {
        config.kv_size.max(n_ctx_req)
    } else {
        default_kv_size(n_ctx_req, parallel)
    };
    let params = ContextParams {
        n_ctx: kv_size,
        // Every decoding sequence needs a row in each step.
        n_batch: config.n_batch.max(1).max(parallel),
        n_threads,
        poll: config.threads.poll,
        n_seq_max: parallel,
        swa_full: config.swa_full,
        // Recurrent and hybrid memory keeps a snapshot per position a
        // draft may have to give back (where the architecture can).
        n_rs_seq: match config.spec {
            Some(s) if model.is_recurrent() && config.draft_model.is_none() => s.draft_max as u32,
            _ => 0,
        },
        flash_attn: config.flash_attn,
    };
    (params, n_ctx_req)
}

pub(super) fn default_kv_size(n_ctx: u32, parallel: u32) -> u32 {
    n_ctx
        .saturating_mul(parallel)
        .min(DEFAULT_KV_CAP.max(n_ctx))
}

/// Beyond this many cells the default KV stops growing with `--parallel`:
/// on a long-context model, sequences then share one large buffer (and the
/// youngest waits or is preempted when they outgrow it) instead of taking
/// `--parallel` times the memory.
const DEFAULT_KV_CAP: u32 = 65536;

pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

impl Worker {
    fn run(&mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        // The status copy shows every sequence before the first step.
        self.publish();
        loop {
            if !self.has_work() {
                self.decode_tails();
                self.publish();
                self.progress.idle();
                match commands.blocking_recv() {
                    Some(c) => {
                        if !self.command(c, &mut commands) {
                            return;
                        }
                    }
                    None => break,
                }
            }
            while let Ok(c) = commands.try_recv() {
                if !self.command(c, &mut commands) {
                    return;
                }
            }
            let t = Instant::now();
            self.snapshot_taken = false;
            self.drop_abandoned();
            let admitted = self.admit_waiting();
            let stepped = self.step();
            let us = t.elapsed().as_micros() as u64;
            self.stats.max_step_us.fetch_max(us, Ordering::Relaxed);
            if self.snapshot_taken {
                self.stats
                    .max_snapshot_step_us
                    .fetch_max(us, Ordering::Relaxed);
            }
            self.publish();
            if !stepped && !admitted && self.has_work() {
                // Waiting for room that only a finishing job frees: nothing
                // to compute until a command comes.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        info!("engine thread stopping: no more jobs");
    }

    fn has_work(&self) -> bool {
        !self.waiting.is_empty() || self.slots.iter().any(|s| s.run.is_some())
    }

    /// Publish the thread counts in use and, after a decode-only step, its
    /// time (a moving average, so one slow step does not hide the trend).
    pub(super) fn record_threads(&mut self, prefill_rows: usize, secs: f64) {
        let stats = &self.stats;
        let decode = self.threads.decode();
        stats.decode_threads.store(decode, Ordering::Relaxed);
        stats
            .batch_threads
            .store(self.threads.batch(), Ordering::Relaxed);
        stats
            .others_milli_cores
            .store((self.threads.others() * 1e3) as u64, Ordering::Relaxed);
        if prefill_rows == 0 {
            let us = secs * 1e6;
            let old = stats.decode_step_us.load(Ordering::Relaxed) as f64;
            let avg = if old == 0.0 {
                us
            } else {
                old + 0.1 * (us - old)
            };
            stats.decode_step_us.store(avg as u64, Ordering::Relaxed);
        }
    }

    /// Handle one command; false: stop the thread.
    fn command(&mut self, c: Command, commands: &mut mpsc::UnboundedReceiver<Command>) -> bool {
        match c {
            Command::Run(job) => {
                self.waiting.push_back(Waiting::New(job));
                // Counted as waiting before it stops counting as queued, so
                // a reader never sees it in neither.
                self.stats
                    .waiting
                    .store(self.waiting.len(), Ordering::Relaxed);
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                true
            }
            Command::Persist(done) => {
                let _ = done.send(self.persist());
                true
            }
            Command::Shutdown(done) => {
                self.shutdown();
                self.on_stopped = Some(done);
                // Fail whatever is still queued, then stop.
                commands.close();
                while let Some(Command::Run(job)) = commands.blocking_recv() {
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    fail_job(&job, EngineError::Stopped);
                }
                false
            }
        }
    }

    /// Fail what is still running or waiting, and save what should survive
    /// a restart: every sequence, to disk.
    fn shutdown(&mut self) {
        let kv_tokens: usize = self.slots.iter().map(|s| s.seq.len()).sum();
        info!(kv_tokens, "engine shutting down");
        self.fail_all(EngineError::Stopped);
        if let Some(disk) = &self.kv.disk {
            for (i, slot) in self.slots.iter().enumerate() {
                if slot.seq.len() >= MIN_DISK_TOKENS && slot.seq.len() > slot.disk_saved_len {
                    let state = Arc::new(self.ctx.seq_state_get(i as i32));
                    disk.save_and_flush(Some((slot.seq.clone(), state)));
                }
            }
            disk.save_and_flush(None);
        }
        self.publish();
    }

    /// Write every sequence that the disk holds less of, whatever its
    /// length, and wait until it is written: asked for explicitly (a saved
    /// conversation), so even a short one comes back without a prefill.
    /// Returns the tokens written.
    fn persist(&mut self) -> usize {
        let Some(disk) = &self.kv.disk else {
            return 0;
        };
        let mut written = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let n = slot.seq.len();
            if n > slot.disk_saved_len {
                let state = Arc::new(self.ctx.seq_state_get(i as i32));
                disk.save_and_flush(Some((slot.seq.clone(), state)));
                slot.disk_saved_len = n;
                written += n;
            }
        }
        info!(tokens = written, "KV sequences written to disk on request");
        written
    }

    /// End every job the engine holds with `err`.
    fn fail_all(&mut self, err: EngineError) {
        for w in std::mem::take(&mut self.waiting) {
            match w {
                Waiting::New(job) => fail_job(&job, err.clone()),
                Waiting::Resume(run) => fail_job(&run.job, err.clone()),
            }
        }
        for slot in &mut self.slots {
            if let Some(run) = slot.run.take() {
                fail_job(&run.job, err.clone());
            }
        }
    }

    /// Jobs whose clients left: waiting ones are dropped, running ones
    /// free their sequence (its KV stays, consistent, for reuse).
    fn drop_abandoned(&mut self) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in std::mem::take(&mut self.waiting) {
            if !w.is_abandoned() {
                kept.push_back(w);
                continue;
            }
            let (job, forks) = match w {
                Waiting::New(mut job) => {
                    let forks = std::mem::take(&mut job.forks);
                    (*job, forks)
                }
                Waiting::Resume(run) => (run.job, Vec::new()),
            };
            job.span
                .in_scope(|| info!("skipped: the client left while queued"));
            // Choices of the same request whose clients are still there
            // go on as jobs of their own.
            kept.extend(
                forks
                    .into_iter()
                    .filter(|f| !f.is_abandoned())
                    .map(|f| Waiting::New(Box::new(f))),
            );
        }
        self.waiting = kept;
        for i in 0..self.slots.len() {
            let gone = self.slots[i]
                .run
                .as_ref()
                .is_some_and(|r| r.job.is_abandoned());
            if gone {
                self.end_cancelled(i);
            }
        }
    }

    /// The job on slot `i` was cancelled: free the slot, keep its KV.
    pub(super) fn end_cancelled(&mut self, i: usize) {
        if let Some(mut run) = self.slots[i].run.take() {
            let kv_tokens = self.slots[i].seq.len();
            let secs = run.t0.elapsed().as_secs_f64();
            run.job
                .span
                .in_scope(|| info!(seq = i, kv_tokens, secs, "cancelled: the client left"));
            let forks: Vec<Job> = std::mem::take(&mut run.job.forks);
            for f in forks.into_iter().rev().filter(|f| !f.is_abandoned()) {
                self.waiting.push_front(Waiting::New(Box::new(f)));
            }
            self.slots[i].last_used = Instant::now();
        }
    }

    /// Bring every slot's record (and the ledger) back in line with the KV
    /// after a failed or aborted step (llama.cpp drops the failed
    /// micro-batch's positions).
    pub(super) fn resync(&mut self) {
        for i in 0..self.slots.len() {
            let n = self.ctx.seq_len(i as i32);
            self.slots[i].seq.truncate(n);
            self.ledger.truncate(i, n);
            let slot = &mut self.slots[i];
            slot.disk_saved_len = slot.disk_saved_len.min(n);
            if let Some(run) = slot.run.as_mut() {
                if run.phase == Phase::Prefill {
                    run.next = run.next.min(n);
                }
            }
        }
    }

    /// Refresh the counters and the `/slots` copy.
    fn publish(&mut self) {
        let used = self.ledger.used();
        self.stats.kv_used.store(used, Ordering::Relaxed);
        let running = self.slots.iter().filter(|s| s.run.is_some()).count();
        self.stats.running.store(running, Ordering::Relaxed);
        self.stats
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        // Readers only clone the copy: waiting for one is short, and a
        // skipped refresh could leave the copy stale while the engine idles.
        let mut status = self
            .stats
            .status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let preempted: Vec<&Running> = self
            .waiting
            .iter()
            .filter_map(|w| match w {
                Waiting::Resume(r) => Some(&**r),
                Waiting::New(_) => None,
            })
            .collect();
        let slots = self
            .slots
            .iter()
            .enumerate()
            .map(|(id, s)| match &s.run {
                Some(r) => slot_status(
                    id,
                    s.seq.len(),
                    Some(r),
                    if r.phase == Phase::Prefill {
                        "prefill"
                    } else {
                        "decode"
                    },
                ),
                None => slot_status(id, s.seq.len(), None, "idle"),
            })
            .collect();
        let preempted = preempted
            .iter()
            .map(|r| slot_status(0, 0, Some(r), "preempted"))
            .collect();
        let due = status
            .stores_at
            .is_none_or(|at| at.elapsed() >= STORES_EVERY);
        let (stores, stores_at) = if due {
            (self.stored_snapshots(), Some(Instant::now()))
        } else {
            (std::mem::take(&mut status.stores), status.stores_at)
        };
        *status = EngineStatus {
            slots,
            preempted,
            waiting: self.waiting.len(),
            kv_cells: self.ledger.capacity(),
            kv_used: used,
            steps: self.stats.steps.load(Ordering::Relaxed),
            last_step_rows: self.last_step_rows,
            stores,
            stores_at,
        };
    }

    /// A summary of the RAM and disk snapshots, for the status page.
    fn stored_snapshots(&self) -> Vec<StoredSnapshot> {
        let mut out: Vec<StoredSnapshot> = self
            .kv
            .ram
            .items()
            .iter()
            .map(|s| StoredSnapshot {
                store: "ram".into(),
                tokens: s.seq.len(),
                bytes: s.state.len() as u64,
                hits: s.hits,
                age_secs: s.created.elapsed().as_secs(),
                idle_secs: s.last_used.elapsed().as_secs(),
                first_line: first_line(s.seq.text()),
            })
            .collect();
        if let Some(disk) = &self.kv.disk {
            let now = now_secs();
            disk.with_entries(|entries| {
                out.extend(entries.iter().map(|e| StoredSnapshot {
                    store: "disk".into(),
                    tokens: e.seq.len(),
                    bytes: e.header.file_len(),
                    hits: e.header.hits,
                    age_secs: now.saturating_sub(e.header.created),
                    idle_secs: now.saturating_sub(e.header.last_used),
                    first_line: first_line(e.seq.text()),
                }))
            });
        }
        out
    }
}

fn slot_status(
    id: usize,
    kv_tokens: usize,
    run: Option<&Running>,
    state: &'static str,
) -> SlotStatus {
    let mut s = SlotStatus {
        id,
        state: state.into(),
        kv_tokens,
        ..SlotStatus::default()
    };
    if let Some(r) = run {
        s.job = Some(r.job.arrival);
        s.prompt_tokens = r.prompt_tokens;
        s.cached_tokens = r.cached;
        s.prefix = r.source_label.clone();
        s.prefilled_tokens = r.next.min(r.prompt_tokens);
        s.generated_tokens = r.generated;
        s.tokens_per_second = (r.tokens_per_second() * 10.0).round() / 10.0;
        s.drafted_tokens = r.spec.drafted;
        s.accepted_tokens = r.spec.accepted;
    }
    s
}

/// End a job with an error event (its forks too: they never started).
pub(super) fn fail_job(job: &Job, err: EngineError) {
    for j in std::iter::once(job).chain(job.forks.iter()) {
        let _ = j.events.send(Event::Failed(err.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::default_kv_size;

    #[test]
    fn the_default_kv_grows_with_parallel_up_to_a_cap() {
        assert_eq!(default_kv_size(8192, 1), 8192);
        assert_eq!(default_kv_size(8192, 4), 32768);
        assert_eq!(default_kv_size(32768, 4), 65536);
        assert_eq!(default_kv_size(131072, 4), 131072);
    }
}
