//! Typed configuration, built from the command line (every flag is also an
//! environment variable, `HEARTH_*`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::engine::threads::{ThreadSettings, DEFAULT_POLL};
use crate::engine::EngineConfig;

/// `hearth serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Address to bind.
    #[arg(long, env = "HEARTH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one and prints it).
    #[arg(long, env = "HEARTH_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Run the engine in this process instead of a supervised child
    /// process (then an engine that aborts takes the server with it).
    #[arg(long, env = "HEARTH_ENGINE_IN_PROCESS")]
    pub engine_in_process: bool,
    /// Sequences decoded together in one batch: requests served at once
    /// (more wait in the queue).
    #[arg(long, env = "HEARTH_PARALLEL", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub parallel: u32,
    /// KV cells shared by all sequences (0: --ctx times --parallel, up to
    /// 65536 cells and at least --ctx).
    #[arg(long, env = "HEARTH_KV_SIZE", default_value_t = 0)]
    pub kv_size: u32,
    /// Speculative decoding by prompt lookup (the default; drafts are
    /// sized by what they are measured to save, README).
    #[arg(
        long,
        env = "HEARTH_SPEC",
        default_value_t = false,
        conflicts_with = "no_spec"
    )]
    pub spec: bool,
    /// Turn speculative decoding off.
    #[arg(long, env = "HEARTH_NO_SPEC", default_value_t = false)]
    pub no_spec: bool,
    /// Speculative decoding with this draft model (a small GGUF with the
    /// model's vocabulary) instead of prompt lookup.
    #[arg(long, env = "HEARTH_DRAFT_MODEL", conflicts_with = "no_spec")]
    pub draft_model: Option<std::path::PathBuf>,
    /// Fewest tokens drafted per step, even where drafts are measured not
    /// to pay (0: as many as pay).
    #[arg(long, env = "HEARTH_DRAFT_MIN", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=64))]
    pub draft_min: u32,
    /// Most tokens drafted per step.
    #[arg(long, env = "HEARTH_DRAFT_MAX", default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub draft_max: u32,
    /// Write a heartbeat on a stream after this many seconds of silence
    /// (fractions allowed, at least 0.2).
    #[arg(long, env = "HEARTH_HEARTBEAT_SECS", default_value_t = 5.0, value_parser = parse_heartbeat)]
    pub heartbeat_secs: f64,
    /// The model id `/v1/models` reports (default: the GGUF file name).
    #[arg(long, env = "HEARTH_MODEL_ALIAS")]
    pub model_alias: Option<String>,
    /// Keep Claude Code's volatile `x-anthropic-billing-header` system line
    /// (by default it is dropped so the prompt prefix stays cacheable).
    #[arg(long, env = "HEARTH_KEEP_BILLING_HEADER", default_value_t = false)]
    pub keep_billing_header: bool,

    // --- service ---
    /// Require this key on every route but /health, as
    /// `Authorization: Bearer KEY` or `x-api-key: KEY`.
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Read accepted keys from a file, one per line (`#` comments and blank
    /// lines skipped); combines with --api-key.
    #[arg(long, env = "HEARTH_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Origins allowed to call the server from a browser, comma-separated
    /// (`https://a.example,http://localhost:3000`); `*` allows any origin.
    /// Off when unset.
    #[arg(long, env = "HEARTH_CORS", value_delimiter = ',', value_parser = parse_origin)]
    pub cors: Vec<String>,
    /// Generation requests allowed to wait for the engine, beyond the
    /// --parallel ones it is running; more are refused at once (OpenAI 429,
    /// Anthropic 529).
    #[arg(long, env = "HEARTH_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body, in MiB (larger: 413).
    #[arg(long, env = "HEARTH_MAX_BODY_MB", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_body_mb: u64,
    /// A client gets this long to send a request's headers, and again its
    /// body; then the connection is closed (headers) or answered 408 (body).
    #[arg(long, env = "HEARTH_READ_TIMEOUT_SECS", default_value_t = 30.0, value_parser = parse_read_timeout)]
    pub read_timeout_secs: f64,
    /// Largest `max_tokens` a request may ask for, and the cap when it names
    /// none (0: whatever room the context has).
    #[arg(long, env = "HEARTH_MAX_TOKENS", default_value_t = 0)]
    pub max_tokens: u32,
    /// On SIGINT/SIGTERM, requests in flight get this long to finish before
    /// they are ended with an error event.
    #[arg(long, env = "HEARTH_SHUTDOWN_GRACE_SECS", default_value_t = 10.0, value_parser = parse_grace)]
    pub shutdown_grace_secs: f64,
    /// Turn the status page (`GET /` and its live stream) off: `/` is then
    /// a 404.
    #[arg(long, env = "HEARTH_NO_UI", default_value_t = false)]
    pub no_ui: bool,
    /// Append one JSON line per request to this file: the raw request, the
    /// rendered prompt, the cache decision and the generated text.
    #[arg(long, env = "HEARTH_TRACE")]
    pub trace: Option<PathBuf>,
    /// Log line format on stderr.
    #[arg(long, env = "HEARTH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// What `hearth serve` and `hearth chat` both run on: the model, the
/// context and the KV cache stores.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// GGUF model file. Default: the embedded SmolLM2-135M-Instruct fetched
    /// by scripts/fetch-models.sh.
    #[arg(short = 'm', long, env = "HEARTH_MODEL")]
    pub model: Option<PathBuf>,
    /// Context size in tokens (0: the model's trained length).
    #[arg(long, env = "HEARTH_CTX", default_value_t = 0)]
    pub ctx: u32,
    #[command(flatten)]
    pub threads: ThreadArgs,
    /// Prefill chunk size in tokens.
    #[arg(long, env = "HEARTH_BATCH", default_value_t = 512)]
    pub batch: u32,
    /// Layers to offload to the GPU on GPU builds.
    #[arg(long, env = "HEARTH_GPU_LAYERS", default_value_t = 999)]
    pub gpu_layers: i32,
    /// Spread the model's layers over llama.cpp RPC workers (`hearth
    /// rpc-worker`) at these HOST:PORT endpoints, comma-separated.
    #[arg(long, env = "HEARTH_RPC", value_delimiter = ',', value_parser = parse_rpc_endpoint)]
    pub rpc: Vec<String>,
    /// The share of the layers each device takes, comma-separated (`3,1`),
    /// in llama.cpp's order: the RPC workers' devices, then local GPUs
    /// (default: in proportion to their free memory).
    #[arg(long, env = "HEARTH_TENSOR_SPLIT", value_delimiter = ',', value_parser = parse_split)]
    pub tensor_split: Vec<f32>,
    /// How long a start waits for the --rpc workers to answer before it
    /// gives up (an engine restarted after a worker died waits as long as
    /// it takes).
    #[arg(long, env = "HEARTH_RPC_WAIT_SECS", default_value_t = 30)]
    pub rpc_wait_secs: u64,
    /// A Jinja chat template file that replaces the GGUF's own.
    #[arg(long, env = "HEARTH_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// RAM budget for KV snapshots of recent sequences, in MiB (0: none).
    #[arg(long, env = "HEARTH_CACHE_RAM_MB", default_value_t = 1024)]
    pub cache_ram_mb: u64,
    /// Models whose memory cannot be cut back (recurrent, hybrid, and
    /// sliding-window models without --swa-full): state checkpoints kept in
    /// RAM per conversation, taken before and at the end of each prompt and
    /// through long prefills (0: none).
    #[arg(long, env = "HEARTH_CTX_CHECKPOINTS", default_value_t = 8)]
    pub ctx_checkpoints: u32,
    /// Sliding-window models (Gemma 3): keep every position in the window
    /// layers' cache, so any prefix can be cut back and shared, at the cost
    /// of that cache growing from the window to the whole context.
    #[arg(long, env = "HEARTH_SWA_FULL")]
    pub swa_full: bool,
    /// Flash attention: auto (where the device has it), on or off. Off
    /// lets one CPU stream verify drafted tokens far faster at depth (see
    /// README, Speculative decoding), at some cost to plain decoding there,
    /// to several streams, and in compute memory (grows with the KV).
    #[arg(long, env = "HEARTH_FLASH_ATTN", value_enum, default_value_t = crate::engine::llama::FlashAttn::Auto)]
    pub flash_attn: crate::engine::llama::FlashAttn,
    /// Directory for KV snapshots that survive restarts (off when unset).
    #[arg(long, env = "HEARTH_KV_DISK_DIR")]
    pub kv_disk_dir: Option<PathBuf>,
    /// Disk budget for KV snapshots, in MiB.
    #[arg(long, env = "HEARTH_KV_DISK_SPACE_MB", default_value_t = 8192)]
    pub kv_disk_space_mb: u64,
    /// Start even when the weights, KV and compute buffers measure more
    /// than the free memory.
    #[arg(long, env = "HEARTH_NO_MEMORY_CHECK")]
    pub no_memory_check: bool,
}

impl EngineArgs {
    /// The engine's settings for `parallel` sequences; speculation, the KV
    /// size and fault injection are left for the caller to set.
    pub fn engine_config(&self, parallel: u32) -> EngineConfig {
        EngineConfig {
            n_ctx: self.ctx,
            n_parallel: parallel,
            spec: None,
            draft_model: None,
            kv_size: 0,
            n_batch: self.batch.max(1),
            threads: self.threads.settings(),
            n_gpu_layers: self.gpu_layers,
            fault: None,
            cache_ram_bytes: (self.cache_ram_mb as usize) << 20,
            ctx_checkpoints: self.ctx_checkpoints as usize,
            swa_full: self.swa_full,
            flash_attn: self.flash_attn,
            turn_marker: Vec::new(),
            kv_disk_dir: self.kv_disk_dir.clone(),
            kv_disk_bytes: self.kv_disk_space_mb << 20,
        }
    }
}

/// `hearth rpc-worker`: this machine's devices for a server elsewhere.
#[derive(Debug, Clone, Args)]
pub struct RpcWorkerArgs {
    /// Address to listen on. llama.cpp's RPC protocol has no
    /// authentication: whoever reaches it may use this machine's devices
    /// and memory, so keep it on loopback or a network you trust.
    #[arg(long, env = "HEARTH_RPC_HOST", default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, env = "HEARTH_RPC_PORT", default_value_t = 50052, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// CPU threads for computing (0: one per core).
    #[arg(short = 't', long, env = "HEARTH_THREADS", default_value_t = 0)]
    pub threads: u32,
    /// Keep the large tensors a server sends here, so a later load (a
    /// restarted server) sends only their hashes.
    #[arg(long, env = "HEARTH_RPC_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Compute thread options, shared by `hearth serve` and `hearth bench`.
#[derive(Debug, Clone, Copy, Args)]
pub struct ThreadArgs {
    /// Compute threads for decoding (0: one per core that other processes
    /// leave free, re-read while decoding).
    #[arg(short = 't', long, env = "HEARTH_THREADS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=512))]
    pub threads: u32,
    /// Compute threads for prompt processing (0: chosen as for decoding).
    #[arg(long, env = "HEARTH_THREADS_BATCH", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=512))]
    pub threads_batch: u32,
    /// How long idle compute threads spin waiting for the next step before
    /// they sleep: llama.cpp's poll level, 0 (sleep at once) to 100.
    #[arg(long, env = "HEARTH_POLL", default_value_t = DEFAULT_POLL, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub poll: u32,
}

impl ThreadArgs {
    pub fn settings(&self) -> ThreadSettings {
        ThreadSettings {
            decode: self.threads,
            batch: self.threads_batch,
            poll: self.poll,
        }
    }
}

impl ServeArgs {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_secs)
    }

    pub fn read_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.read_timeout_secs)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs_f64(self.shutdown_grace_secs)
    }
}

/// An allowed CORS origin: `*`, or `scheme://host[:port]` with nothing after.
fn parse_origin(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s == "*" {
        return Ok(s.to_string());
    }
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or_else(|| format!("`{s}` is not an origin: expected `*` or scheme://host[:port], e.g. https://app.example"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', ',']) {
        return Err(format!(
            "`{s}` is not an origin: expected scheme://host[:port] with no path"
        ));
    }
    Ok(s.to_string())
}

fn parse_read_timeout(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s}"))?;
    if !(0.1..=3600.0).contains(&v) {
        return Err("must be between 0.1 and 3600 seconds".into());
    }
    Ok(v)
}

fn parse_grace(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s}"))?;
    if !(0.0..=86_400.0).contains(&v) {
        return Err("must be between 0 and 86400 seconds".into());
    }
    Ok(v)
}

fn parse_heartbeat(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("not a number: {s}"))?;
    if !(0.2..=3600.0).contains(&v) {
        return Err("must be between 0.2 and 3600 seconds".into());
    }
    Ok(v)
}

/// Where the default model lives: `$HEARTH_HOME/models` (default
/// `~/.cache/hearth/models`), filled by scripts/fetch-models.sh.
pub fn default_model_path() -> PathBuf {
    models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn models_dir() -> PathBuf {
    hearth_home().join("models")
}

/// `$HEARTH_HOME`, default `~/.cache/hearth`: models, and `hearth chat`'s
/// history, saved conversations and KV snapshots.
pub fn hearth_home() -> PathBuf {
    if let Some(home) = std::env::var_os("HEARTH_HOME") {
        return PathBuf::from(home);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("hearth")
}

fn parse_rpc_endpoint(s: &str) -> Result<String, String> {
    crate::engine::rpc::parse_endpoint(s.trim())
}

fn parse_split(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("{s:?} is not a share (a number >= 0)")),
    }
}
