//! The engine: the only code that touches llama.cpp.
//!
//! One dedicated OS thread (`worker`) owns the context, the KV cache and the
//! sampler. The async side holds an [`EngineHandle`]: it submits [`Job`]s on
//! a channel and reads each job's [`Event`]s from an unbounded channel of its
//! own, so the engine never blocks on a client (DESIGN invariant 1). The
//! model weights are shared read-only through [`llama::Model`], which the
//! HTTP side also uses to tokenize before a job is queued.

pub mod cache;
pub mod fault;
pub mod llama;
pub mod sampling;
pub mod text;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

pub use llama::{Model, Token};
pub use sampling::SamplingParams;

/// What a caller asks of the engine: a prompt already tokenized, and how to
/// continue it.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The full prompt. The engine reuses whatever prefix of it the KV
    /// cache already holds.
    pub prompt: Vec<Token>,
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens; generation also ends when the
    /// context is full.
    pub max_tokens: u32,
    /// Stop sequences: generation ends at the first one, which is never
    /// emitted.
    pub stop: Vec<String>,
    /// Keep generating past end-of-generation tokens (benchmarks).
    pub ignore_eos: bool,
    /// The rendered text the prompt was tokenized from. Lets the engine
    /// match a cached sequence by text where token ids diverge.
    pub prompt_text: Option<String>,
}

/// Where a job's reused prompt prefix came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixSource {
    /// Nothing reused.
    None,
    /// The live sequence in the context.
    Live,
    /// A snapshot kept in RAM.
    Ram,
    /// A snapshot file on disk.
    Disk,
}

impl PrefixSource {
    pub fn as_str(self) -> &'static str {
        match self {
            PrefixSource::None => "none",
            PrefixSource::Live => "live",
            PrefixSource::Ram => "ram",
            PrefixSource::Disk => "disk",
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    /// The model emitted an end-of-generation token.
    EndOfTurn,
    /// A stop sequence matched; it is carried here, not in the text.
    StopSequence(String),
    /// `max_tokens` was reached.
    MaxTokens,
    /// The context window filled up before the model finished.
    ContextFull,
}

/// Token accounting for one job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV state was reused rather than computed.
    pub cached_tokens: u32,
    pub completion_tokens: u32,
}

/// Where a job's time went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Computing the uncached prompt tokens.
    pub prefill: Duration,
    /// Generating, from the first sampled token to the last.
    pub decode: Duration,
}

/// Everything a job reports, in order. Protocol adapters turn these into
/// their wire events.
#[derive(Debug, Clone)]
pub enum Event {
    /// The engine picked the job up. `cached` prompt tokens are reused,
    /// found in `source`.
    Started { prompt_tokens: u32, cached: u32, source: PrefixSource },
    /// A prefill chunk finished: `done` of `total` prompt tokens are in the
    /// KV cache.
    PrefillProgress { done: u32, total: u32, elapsed: Duration },
    /// Generated text: always whole UTF-8, never part of a stop sequence.
    Text(String),
    /// The last event of a successful job.
    Finished { reason: FinishReason, usage: Usage, timings: Timings },
    /// The last event of a failed job.
    Failed(EngineError),
}

/// Failures inside the engine. None of them is the client's fault: the
/// HTTP layer validates requests before they get here.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    #[error("llama.cpp decode failed with status {0}")]
    Decode(i32),
    #[error("the prompt ({prompt} tokens) does not fit the context ({ctx} tokens)")]
    PromptTooLong { prompt: u32, ctx: u32 },
    #[error("the engine stopped")]
    Stopped,
}

/// Shared cancel flag. Set by the HTTP side when a client goes away; read by
/// the worker between chunks and tokens and by llama.cpp's abort callback
/// inside graph compute.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Sets its flag when dropped: held by a response stream, so a client that
/// disconnects (hyper drops the body) cancels its job without any code path
/// having to remember to.
#[derive(Debug)]
pub struct CancelOnDrop(pub CancelFlag);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What the engine thread is asked to do, in order.
pub(crate) enum Command {
    Run(Job),
    /// Save what the KV cache keeps across restarts, then stop taking work.
    /// Answered when done.
    Shutdown(tokio::sync::oneshot::Sender<()>),
}

/// A queued unit of work.
pub(crate) struct Job {
    /// Arrival order, from 0; fault injection counts requests with it.
    pub seq: u64,
    pub request: GenerateRequest,
    pub events: mpsc::UnboundedSender<Event>,
    pub cancel: CancelFlag,
    pub span: tracing::Span,
}

/// Counters the HTTP side can read without asking the engine thread.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Jobs submitted and not yet picked up.
    pub queued: AtomicUsize,
    /// Jobs ever submitted.
    pub submitted: AtomicU64,
}

/// The async side's handle on the engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::UnboundedSender<Command>,
    model: Arc<Model>,
    stats: Arc<EngineStats>,
    n_ctx: u32,
}

/// What a submitted job gives back: its events, and the flag that cancels it.
pub struct JobHandle {
    pub events: mpsc::UnboundedReceiver<Event>,
    pub cancel: CancelFlag,
}

impl EngineHandle {
    /// The loaded model, for tokenizing and reading metadata.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The context size the engine runs with.
    pub fn n_ctx(&self) -> u32 {
        self.n_ctx
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Queue a job. Never waits: the queue is unbounded and the engine
    /// thread drains it in arrival order.
    pub fn submit(&self, request: GenerateRequest) -> JobHandle {
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = CancelFlag::default();
        let seq = self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            seq,
            request,
            events: tx,
            cancel: cancel.clone(),
            span: tracing::Span::current(),
        };
        if let Err(err) = self.jobs.send(Command::Run(job)) {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            if let Command::Run(job) = err.0 {
                let _ = job.events.send(Event::Failed(EngineError::Stopped));
            }
        }
        JobHandle { events: rx, cancel }
    }

    /// Ask the engine to save its KV state for the next start and stop.
    /// Resolves once it has (after the job in progress, if any, ends; cancel
    /// jobs first for a quick stop). Later jobs fail with `Stopped`.
    pub async fn shutdown(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.jobs.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// How the engine thread is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Context size in tokens; 0 means the model's trained length.
    pub n_ctx: u32,
    /// Prefill chunk size (llama.cpp's n_batch and n_ubatch).
    pub n_batch: u32,
    /// CPU threads; 0 lets llama.cpp decide.
    pub n_threads: i32,
    /// GPU layers to offload (ignored on a CPU build).
    pub n_gpu_layers: i32,
    /// Fault injection plan, from `HEARTH_FAULT`.
    pub fault: Option<fault::FaultPlan>,
    /// RAM budget for KV snapshots, in bytes (0: none).
    pub cache_ram_bytes: usize,
    /// Where disk KV snapshots live (None: no disk cache).
    pub kv_disk_dir: Option<std::path::PathBuf>,
    /// Disk budget for KV snapshots, in bytes.
    pub kv_disk_bytes: u64,
}

/// Start the engine thread over a loaded model.
pub fn start(model: Arc<Model>, config: EngineConfig) -> Result<EngineHandle, llama::LlamaError> {
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let stats = Arc::new(EngineStats::default());
    let n_ctx = worker::spawn(model.clone(), config, jobs_rx, stats.clone())?;
    Ok(EngineHandle { jobs: jobs_tx, model, stats, n_ctx })
}
