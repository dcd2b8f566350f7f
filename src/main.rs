//! The `hearth` binary: parses the command line and calls into the library.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::info;

use hearth::chat::template::ChatTemplate;
use hearth::config::{default_model_path, ServeArgs};
use hearth::engine::fault::FaultPlan;
use hearth::engine::{self, EngineConfig, Model};
use hearth::server::{self, AppState};

#[derive(Parser)]
#[command(name = "hearth", version, about = "A local LLM inference server: OpenAI and Anthropic APIs over llama.cpp")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI and Anthropic APIs over HTTP.
    Serve(ServeArgs),
    /// Measure prefill and decode speed through the engine's own code path.
    Bench(hearth::bench::BenchArgs),
    /// Inspect or clear the disk KV cache.
    Cache(hearth::engine::cache::cli::CacheArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,llama.cpp=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => hearth::bench::run(args),
        Command::Cache(args) => hearth::engine::cache::cli::run(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let fault = FaultPlan::from_env().map_err(|e| anyhow::anyhow!("HEARTH_FAULT: {e}"))?;
    let model_path = args.model.clone().unwrap_or_else(default_model_path);
    info!(path = %model_path.display(), "loading model");
    let model = Model::load(&model_path, args.gpu_layers).with_context(|| {
        if args.model.is_none() {
            "the default model is missing: run scripts/serve.sh (it fetches it) or pass --model PATH".to_string()
        } else {
            "cannot load the model".to_string()
        }
    })?;
    let template = match &args.chat_template {
        Some(file) => {
            let src = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            ChatTemplate::new(&src, &model.bos_text(), &model.eos_text())?
        }
        None => match model.chat_template() {
            Some(src) => ChatTemplate::new(&src, &model.bos_text(), &model.eos_text())?,
            None => {
                info!("the model has no chat template: using the plain-text fallback");
                ChatTemplate::fallback(&model.bos_text(), &model.eos_text())
            }
        },
    };
    let model_id = args.model_alias.clone().unwrap_or_else(|| default_alias(&model, &model_path));
    let fingerprint = format!("hearth-{}", env!("CARGO_PKG_VERSION"));
    let config = EngineConfig {
        n_ctx: args.ctx,
        n_batch: args.batch.max(1),
        n_threads: args.threads,
        n_gpu_layers: args.gpu_layers,
        fault,
        cache_ram_bytes: (args.cache_ram_mb as usize) << 20,
        kv_disk_dir: args.kv_disk_dir.clone(),
        kv_disk_bytes: args.kv_disk_space_mb << 20,
    };
    let handle = engine::start(model.clone(), config)?;
    info!(
        model = %model.description(),
        n_ctx = handle.n_ctx(),
        n_ctx_train = model.n_ctx_train(),
        batch = args.batch,
        heartbeat_secs = args.heartbeat_secs,
        "engine ready"
    );
    let state = Arc::new(AppState {
        engine: handle,
        template,
        model_id,
        heartbeat: args.heartbeat(),
        started_at: hearth::api::unix_now(),
        fingerprint,
        keep_billing_header: args.keep_billing_header,
    });
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("hearth-http").build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot bind {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        // The one line on stdout: scripts and tests wait for it.
        println!("hearth listening on http://{addr}");
        let engine = state.engine.clone();
        let router = server::app(state, args.cors);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(server::run(listener, router, async move {
            let _ = stop_rx.await;
        }));
        shutdown_signal().await;
        info!("shutting down: no new connections");
        let _ = stop_tx.send(());
        // Streams in flight get a moment to finish; a second signal or the
        // grace period ends the process.
        tokio::select! {
            _ = server => {}
            _ = shutdown_signal() => info!("second signal: exiting now"),
            _ = tokio::time::sleep(Duration::from_secs(10)) => info!("grace period over: exiting"),
        }
        // Save the KV cache for the next start.
        engine.shutdown().await;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// The GGUF's file name without `.gguf` (`general.name` is often a
/// training-run label, not a name users recognise).
fn default_alias(model: &Model, path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .or_else(|| model.meta("general.name"))
        .unwrap_or_else(|| "model".into())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
