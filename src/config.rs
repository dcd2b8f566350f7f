//! Typed configuration, built from the command line (every flag is also an
//! environment variable, `HEARTH_*`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// `hearth serve` options.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// GGUF model file. Default: the embedded SmolLM2-135M-Instruct fetched
    /// by scripts/fetch-models.sh.
    #[arg(short = 'm', long, env = "HEARTH_MODEL")]
    pub model: Option<PathBuf>,
    /// Address to bind.
    #[arg(long, env = "HEARTH_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to bind (0 picks a free one and prints it).
    #[arg(long, env = "HEARTH_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Context size in tokens (0: the model's trained length).
    #[arg(long, env = "HEARTH_CTX", default_value_t = 0)]
    pub ctx: u32,
    /// CPU threads for compute (0: llama.cpp's default).
    #[arg(long, env = "HEARTH_THREADS", default_value_t = 0)]
    pub threads: i32,
    /// Prefill chunk size in tokens.
    #[arg(long, env = "HEARTH_BATCH", default_value_t = 512)]
    pub batch: u32,
    /// Layers to offload to the GPU on GPU builds.
    #[arg(long, env = "HEARTH_GPU_LAYERS", default_value_t = 999)]
    pub gpu_layers: i32,
    /// Write a heartbeat on a stream after this many seconds of silence
    /// (fractions allowed, at least 0.2).
    #[arg(long, env = "HEARTH_HEARTBEAT_SECS", default_value_t = 5.0, value_parser = parse_heartbeat)]
    pub heartbeat_secs: f64,
    /// The model id `/v1/models` reports (default: the GGUF file name).
    #[arg(long, env = "HEARTH_MODEL_ALIAS")]
    pub model_alias: Option<String>,
    /// A Jinja chat template file that replaces the GGUF's own.
    #[arg(long, env = "HEARTH_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,
    /// Allow cross-origin requests from any origin.
    #[arg(long, env = "HEARTH_CORS", default_value_t = false)]
    pub cors: bool,

    // --- KV cache ---
    /// RAM budget for KV snapshots of recent sequences, in MiB (0: none).
    #[arg(long, env = "HEARTH_CACHE_RAM_MB", default_value_t = 1024)]
    pub cache_ram_mb: u64,
    /// Directory for KV snapshots that survive restarts (off when unset).
    #[arg(long, env = "HEARTH_KV_DISK_DIR")]
    pub kv_disk_dir: Option<PathBuf>,
    /// Disk budget for KV snapshots, in MiB.
    #[arg(long, env = "HEARTH_KV_DISK_SPACE_MB", default_value_t = 8192)]
    pub kv_disk_space_mb: u64,
    /// Keep Claude Code's volatile `x-anthropic-billing-header` system line
    /// (by default it is dropped so the prompt prefix stays cacheable).
    #[arg(long, env = "HEARTH_KEEP_BILLING_HEADER", default_value_t = false)]
    pub keep_billing_header: bool,
}

impl ServeArgs {
    pub fn heartbeat(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_secs)
    }
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
    if let Some(home) = std::env::var_os("HEARTH_HOME") {
        return PathBuf::from(home).join("models");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("hearth").join("models")
}
