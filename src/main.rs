//! The `hearth` binary: parses the command line and calls into the library.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing::info;

use hearth::config::{LogFormat, ServeArgs};
use hearth::engine::fault::FaultPlan;
use hearth::engine::{self, EngineConfig};
use hearth::metrics::Metrics;
use hearth::server;
use hearth::shutdown::Shutdown;
use hearth::state::admission::Admission;
use hearth::state::keys::ApiKeys;
use hearth::state::{Limits, ServiceState};
use hearth::trace::TraceLog;

#[derive(Parser)]
#[command(
    name = "hearth",
    version,
    about = "A local LLM inference server: OpenAI and Anthropic APIs over llama.cpp"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the `serve` arguments does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI and Anthropic APIs over HTTP.
    Serve(ServeArgs),
    /// Measure prefill and decode speed through the engine's own code path.
    Bench(hearth::bench::BenchArgs),
    /// Inspect or clear the disk KV cache.
    Cache(hearth::engine::cache::cli::CacheArgs),
    /// Chat with the model in the terminal, in-process or with a running
    /// server (--url); -p answers one question and exits.
    Chat(hearth::cli_chat::ChatArgs),
    /// Lend this machine's devices to a `hearth serve --rpc` elsewhere
    /// (llama.cpp's RPC backend).
    RpcWorker(hearth::config::RpcWorkerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(args) => args.log_format,
        _ => LogFormat::Text,
    };
    // The chat's screen is for the conversation: only warnings by default
    // (llama.cpp reports every stopped reply as a failed compute).
    let default_filter = match &cli.command {
        Command::Chat(_) => "warn,llama.cpp=off",
        _ => "info,llama.cpp=warn",
    };
    init_tracing(log_format, default_filter);
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Bench(args) => hearth::bench::run(args),
        Command::Cache(args) => hearth::engine::cache::cli::run(args),
        Command::Chat(args) => hearth::cli_chat::run(args),
        Command::RpcWorker(args) => hearth::engine::rpc::run_worker(&args),
    }
}

/// Logs go to stderr, as text for people or JSON lines for collectors;
/// `HEARTH_LOG` takes a tracing filter.
fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("HEARTH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let fault = FaultPlan::from_env().map_err(|e| anyhow::anyhow!("HEARTH_FAULT: {e}"))?;
    if let Some(socket) = std::env::var_os(engine::remote::SOCKET_ENV) {
        // The engine process of a server that supervises it.
        let mut link = engine::remote::child::Link::connect(std::path::Path::new(&socket))?;
        let config = engine_config(&args, fault);
        let restart = std::env::var_os(engine::remote::RESTART_ENV).is_some();
        let patience = (!restart).then(|| Duration::from_secs(args.engine.rpc_wait_secs));
        let started =
            hearth::setup::load_with_workers(&args.engine, &config, patience, &mut |what| {
                // The supervisor logs it, and says it on /health.
                if !link.starting(what) {
                    // The server has gone: nobody waits for this engine.
                    std::process::exit(1);
                }
            })
            .and_then(|loaded| Ok(loaded.start_engine(config)?));
        return match started {
            Ok(handle) => engine::remote::child::serve(handle, link),
            // The server says why (once); say it here only when it cannot.
            Err(e) if link.cannot_start(&e) => std::process::exit(1),
            Err(e) => Err(e),
        };
    }
    // Service settings first: a bad key file or trace path fails before the
    // model takes seconds to load.
    let api_keys = ApiKeys::load(args.api_key.as_deref(), args.api_key_file.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    let trace = match &args.trace {
        Some(path) => Some(Arc::new(TraceLog::open(path).with_context(|| {
            format!("cannot open the trace file {}", path.display())
        })?)),
        None => None,
    };
    let shutdown = Shutdown::new();
    let service = ServiceState {
        api_keys,
        limits: Limits {
            max_body_bytes: (args.max_body_mb as usize) << 20,
            read_timeout: args.read_timeout(),
            max_tokens: (args.max_tokens > 0).then_some(args.max_tokens),
        },
        admission: Admission::new(args.max_queue, args.parallel as usize),
        shutdown: shutdown.clone(),
        metrics: Arc::new(Metrics::new()),
        trace,
        activity: (!args.no_ui).then(|| Arc::new(hearth::state::activity::Activity::new())),
    };
    let config = engine_config(&args, fault);
    let (loaded, handle) = if args.engine_in_process {
        let loaded = hearth::setup::load(&args.engine, &config)?;
        let handle = loaded.start_engine(config)?;
        (loaded, handle)
    } else {
        let loaded = hearth::setup::load_vocab(&args.engine)?;
        let spec = engine::remote::supervisor::ChildSpec::this_process()?;
        let handle = engine::remote::supervisor::start(loaded.model.clone(), spec)?;
        (loaded, handle)
    };
    let model = loaded.model.clone();
    let model_id = args
        .model_alias
        .clone()
        .unwrap_or_else(|| loaded.default_alias());
    info!(
        model = %model.description(),
        n_ctx = handle.n_ctx(),
        n_ctx_train = model.n_ctx_train(),
        batch = args.engine.batch,
        parallel = args.parallel,
        heartbeat_secs = args.heartbeat_secs,
        "engine ready"
    );
    let state = Arc::new(loaded.into_state(
        handle,
        model_id,
        args.heartbeat(),
        args.keep_billing_header,
        service,
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("hearth-http")
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot bind {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        if state.service.api_keys.is_none() && !is_loopback(&addr) {
            tracing::warn!(%addr, "listening beyond this machine with no API key: anyone who can reach it can use it (--api-key)");
        }
        // Installed before the server is announced, so a signal that comes
        // right after is handled, not fatal; from here on a second signal
        // exits at once, whatever is running.
        let mut signals = Signals::new()?;
        // The one line on stdout: scripts and tests wait for it.
        println!("hearth listening on http://{addr}");
        let engine = state.engine.clone();
        let router = server::app(state, &args.cors);
        let mut server = tokio::spawn(server::run(listener, router, args.read_timeout(), shutdown.clone()));
        tokio::select! {
            _ = signals.next() => {}
            res = &mut server => {
                res??;
                anyhow::bail!("the server stopped by itself");
            }
        }
        let grace = args.shutdown_grace();
        info!(grace_secs = grace.as_secs_f64(), "shutting down: no new connections; requests in flight may finish");
        shutdown.drain();
        let stopping = async {
            if tokio::time::timeout(grace, &mut server).await.is_err() {
                info!("grace period over: ending the requests still running");
                shutdown.abort();
                let _ = (&mut server).await;
            }
            // Save the KV cache for the next start.
            engine.shutdown().await;
        };
        tokio::select! {
            _ = stopping => info!("stopped"),
            _ = signals.next() => {
                tracing::warn!("second signal: exiting now, without saving the KV cache");
                std::process::exit(130);
            }
        }
        anyhow::Ok(())
    })?;
    Ok(())
}

fn engine_config(args: &ServeArgs, fault: Option<FaultPlan>) -> EngineConfig {
    EngineConfig {
        spec: (!args.no_spec).then(|| hearth::engine::spec::SpecConfig {
            draft_max: args.draft_max as usize,
            draft_min: args.draft_min.min(args.draft_max) as usize,
            ..Default::default()
        }),
        draft_model: args.draft_model.clone(),
        kv_size: args.kv_size,
        fault,
        ..args.engine.engine_config(args.parallel)
    }
}

fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// SIGINT and SIGTERM, as a stream. Installed once, so a second signal
/// that arrives while the first is being handled is not lost.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                int: signal(SignalKind::interrupt())?,
                term: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
