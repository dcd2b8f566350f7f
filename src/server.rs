//! The router and the serve loop.
//!
//! `app(state)` is the one place routes live, with the middleware that
//! guards them; `run` takes an already-bound listener and the server's
//! [`Shutdown`], so tests bind port 0.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::api::auth::{self, ApiKeys};
use crate::api::error::{ApiError, Protocol};
use crate::api::guard::{self, Admission};
use crate::api::sse::{self, StreamAdapter, StreamOptions};
use crate::api::{anthropic, models, openai, tokenize};
use crate::chat::prompt::{PromptSetup, SpecialTexts};
use crate::chat::replay::ReplayStore;
use crate::chat::template::ChatTemplate;
use crate::chat::tools::ToolFormat;
use crate::engine::{EngineHandle, GenerateRequest, JobHandle};
use crate::metrics::Metrics;
use crate::observe;
use crate::shutdown::Shutdown;
use crate::trace::TraceLog;
use crate::ui::activity::Activity;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub template: ChatTemplate,
    /// The tool-call markup this model writes.
    pub tool_format: ToolFormat,
    /// The vocabulary's control-token texts, kept out of client text.
    pub specials: SpecialTexts,
    /// The exact text of recent tool-calling replies, by call id.
    pub replay: ReplayStore,
    /// Recent Responses API responses, for `previous_response_id`.
    pub responses: crate::api::responses::ResponseStore,
    /// The id `/v1/models` reports.
    pub model_id: String,
    /// Written when nothing else was for this long on a stream.
    pub heartbeat: Duration,
    /// Unix time the server started.
    pub started_at: u64,
    /// OpenAI's `system_fingerprint`: identifies model and build.
    pub fingerprint: String,
    /// Keep Claude Code's volatile billing line in system prompts (it
    /// changes every request and would defeat prefix caching).
    pub keep_billing_header: bool,
    /// Running it as a service: access, limits, admission, shutdown,
    /// metrics, trace.
    pub service: ServiceState,
}

/// What the middleware and the streams share, besides the engine.
pub struct ServiceState {
    /// None: no key is required.
    pub api_keys: Option<ApiKeys>,
    pub limits: Limits,
    /// Places in the generation queue.
    pub admission: Admission,
    pub shutdown: Shutdown,
    /// Arc: streams hold it after their handler returned.
    pub metrics: Arc<Metrics>,
    pub trace: Option<Arc<TraceLog>>,
    /// What the status page shows of each request; None: `--no-ui`.
    pub activity: Option<Arc<Activity>>,
}

impl ServiceState {
    /// An open server with default limits (tests).
    pub fn new(max_queue: usize) -> Self {
        Self {
            api_keys: None,
            limits: Limits::default(),
            admission: Admission::new(max_queue, 1),
            shutdown: Shutdown::new(),
            metrics: Arc::new(Metrics::new()),
            trace: None,
            activity: None,
        }
    }
}

/// Bounds on what one request may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// For the headers of a request, and again for its body.
    pub read_timeout: Duration,
    /// The largest `max_tokens` a request may ask for (None: the context).
    pub max_tokens: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            read_timeout: Duration::from_secs(30),
            max_tokens: None,
        }
    }
}

impl AppState {
    /// How many tokens a reply to a `prompt_len`-token prompt may have:
    /// what the client asked for, within the context and `--max-tokens`.
    /// Asking for more than the server's cap is a mistake; asking for
    /// nothing gets the cap.
    pub fn output_room(&self, prompt_len: usize, asked: Option<u32>) -> Result<u32, ApiError> {
        let n_ctx = self.engine.n_ctx() as usize;
        let room = n_ctx.saturating_sub(prompt_len) as u32;
        let cap = self.service.limits.max_tokens;
        if let (Some(cap), Some(asked)) = (cap, asked) {
            if asked > cap {
                return Err(ApiError::invalid_param(
                    "max_tokens",
                    format!("max_tokens must be at most {cap} on this server, got {asked}"),
                ));
            }
        }
        let room = cap.map_or(room, |c| c.min(room));
        Ok(asked.map_or(room, |m| m.min(room)))
    }

    /// Remember a reply that made tool calls, for exact replay.
    pub fn remember_calls(&self, output: &crate::chat::output::Output) {
        if !output.calls.is_empty() {
            self.replay
                .remember(output.calls.iter().map(|c| c.id.as_str()), &output.raw);
        }
    }

    /// What the prompt builder needs.
    pub fn prompt_setup(&self) -> PromptSetup<'_> {
        PromptSetup {
            template: &self.template,
            format: self.tool_format,
            model: self.engine.model(),
            specials: &self.specials,
            replay: &self.replay,
        }
    }

    /// Queue a prepared job, watched for the metrics and the trace. `route`
    /// is the metrics label; `raw` the request body as received.
    pub fn submit(
        &self,
        route: &'static str,
        raw: &axum::body::Bytes,
        request: GenerateRequest,
    ) -> JobHandle {
        let mut jobs = self.submit_group(route, raw, vec![request]);
        jobs.pop().expect("one request, one job")
    }

    /// Queue the choices of one prompt together (one prefill, forked), each
    /// watched like [`AppState::submit`]'s.
    pub fn submit_group(
        &self,
        route: &'static str,
        raw: &axum::body::Bytes,
        requests: Vec<GenerateRequest>,
    ) -> Vec<JobHandle> {
        let texts: Vec<Option<String>> = requests.iter().map(|r| r.prompt_text.clone()).collect();
        let jobs = self.engine.submit_group(requests);
        jobs.into_iter()
            .zip(texts)
            .map(|(job, text)| {
                let trace = self
                    .service
                    .trace
                    .as_ref()
                    .map(|log| (log.clone(), raw.clone(), text));
                let watch = observe::Watch {
                    route,
                    metrics: self.service.metrics.clone(),
                    shutdown: self.service.shutdown.clone(),
                    trace,
                    activity: self.service.activity.clone(),
                };
                observe::watch(job, watch)
            })
            .collect()
    }

    /// A streaming response for a job: heartbeats on this server's
    /// interval, counted, ended cleanly by a shutdown.
    pub fn stream_job<A: StreamAdapter>(
        &self,
        job: JobHandle,
        adapter: A,
        protocol: Protocol,
    ) -> Response {
        let opts = StreamOptions {
            shutdown: Some(self.service.shutdown.clone()),
            metrics: Some(self.service.metrics.clone()),
            activity: self.service.activity.clone(),
            ..StreamOptions::new(self.heartbeat, protocol)
        };
        sse::stream_job(job, adapter, opts)
    }
}

/// All routes, and the middleware around them. `cors` lists the origins
/// browsers may call from (`*`: any); empty turns CORS off.
///
/// A request passes, outermost first: response counting, CORS (which
/// answers preflights itself, so they need no key), panic catching, the
/// API key check, the body read (size and time limits), and on the
/// generation routes admission to the queue.
pub fn app(state: Arc<AppState>, cors: &[String]) -> Router {
    let generate = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route(
            "/v1/completions",
            post(crate::api::completions::completions),
        )
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/responses", post(crate::api::responses::create))
        .route(
            "/v1/responses/input_tokens",
            post(crate::api::responses::input_tokens),
        )
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route_layer(from_fn_with_state(state.clone(), guard::admit));
    let router = Router::new()
        .route("/health", get(models::health))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::retrieve))
        .route("/metrics", get(metrics))
        .route("/slots", get(models::slots))
        .route(
            "/v1/responses/{id}",
            get(crate::api::responses::retrieve).delete(crate::api::responses::delete),
        )
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/apply-template", post(tokenize::apply_template))
        .merge(generate)
        .merge(
            state
                .service
                .activity
                .as_ref()
                .map(|_| crate::ui::router())
                .unwrap_or_default(),
        )
        .fallback(not_found)
        // The body is already read and bounded by `read_body`.
        .layer(DefaultBodyLimit::disable())
        .layer(from_fn_with_state(state.clone(), guard::read_body))
        .layer(from_fn_with_state(state.clone(), auth::require_key))
        .layer(axum::middleware::from_fn(guard::catch_panic));
    let router = match cors_layer(cors) {
        Some(layer) => router.layer(layer),
        None => router,
    };
    router
        .layer(from_fn_with_state(state.clone(), guard::count_requests))
        .with_state(state)
}

/// CORS for the listed origins: any method the API uses, and whatever
/// headers the browser asks to send (the SDKs send their own `x-stainless-*`,
/// `anthropic-*` and auth headers).
fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers(AllowHeaders::mirror_request())
            .max_age(Duration::from_secs(3600)),
    )
}

/// Unknown routes answer in the protocol their path suggests.
async fn not_found(method: Method, uri: Uri) -> Response {
    let err = ApiError::not_found(format!("no route for {method} {}", uri.path()));
    Protocol::for_path(uri.path()).error_response(err)
}

/// `GET /metrics`, in Prometheus' text format.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.stats();
    let load =
        |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let load64 =
        |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed) as f64;
    let kv_used = load(&stats.kv_used);
    let gauges = [
        (
            "hearth_queue_depth",
            "Jobs submitted to the engine and not yet running (waiting for a sequence or KV room).",
            load(&stats.queued) + load(&stats.waiting),
        ),
        (
            "hearth_requests_in_flight",
            "Generation requests admitted and not yet answered in full (running, waiting, tokenizing).",
            state.service.admission.in_flight() as f64,
        ),
        ("hearth_start_time_seconds", "Unix time the server started.", state.started_at as f64),
        ("hearth_sequences_running", "Sequences the engine is running (prefilling or decoding).", load(&stats.running)),
        ("hearth_sequences_waiting", "Jobs the engine holds that wait for a sequence or KV room (preempted ones included).", load(&stats.waiting)),
        ("hearth_kv_cells_used", "KV cells in use; a cell shared by several sequences counts once.", kv_used),
        ("hearth_kv_cells_free", "KV cells free.", load(&stats.kv_cells) - kv_used),
        ("hearth_engine_steps_total", "Engine steps (one llama.cpp batch each).", load64(&stats.steps)),
        ("hearth_engine_step_rows_total", "Rows (tokens) in all engine steps: divided by the steps, the mean batch size.", load64(&stats.step_rows)),
        ("hearth_engine_multi_sequence_steps_total", "Engine steps whose batch held more than one sequence.", load64(&stats.multi_steps)),
        ("hearth_prefix_shared_tokens_total", "Prompt tokens taken from another sequence by copy instead of computed.", load64(&stats.shared_tokens)),
        ("hearth_spec_drafted_tokens_total", "Tokens drafted by prompt lookup (speculative decoding).", load64(&stats.spec_drafted)),
        ("hearth_spec_accepted_tokens_total", "Drafted tokens the model accepted.", load64(&stats.spec_accepted)),
        ("hearth_preemptions_total", "Sequences preempted for KV room (resumed later).", load64(&stats.preempted)),
        ("hearth_engine_failed_steps_total", "Engine steps that failed (their requests failed; the engine went on).", load64(&stats.failed_steps)),
        ("hearth_engine_max_step_seconds", "Longest engine step.", load64(&stats.max_step_us) / 1e6),
        ("hearth_engine_max_snapshot_step_seconds", "Longest engine step that also copied a KV snapshot out.", load64(&stats.max_snapshot_step_us) / 1e6),
        ("hearth_engine_decode_threads", "Compute threads decode steps use now (chosen from the machine's load unless --threads fixes them).", load(&stats.decode_threads)),
        ("hearth_engine_batch_threads", "Compute threads prompt-processing steps use.", load(&stats.batch_threads)),
        ("hearth_engine_decode_step_seconds", "Time of a decode step, a moving average over recent steps.", load64(&stats.decode_step_us) / 1e6),
        ("hearth_machine_other_busy_cores", "CPU cores other processes kept busy at the engine's last reading.", load64(&stats.others_milli_cores) / 1e3),
        ("hearth_engine_up", "1 while the engine serves, 0 once it has stopped.", if state.engine.is_alive() { 1.0 } else { 0.0 }),
    ];
    let text = state.service.metrics.render(&gauges);
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// After an abort, how long connections get to write their last events
/// before they are closed regardless.
const FLUSH_AFTER_ABORT: Duration = Duration::from_secs(2);

/// Serve HTTP/1.1 until `shutdown` drains, then wait for the connections
/// still open: they finish their requests, or end them when the shutdown
/// aborts (and are closed [`FLUSH_AFTER_ABORT`] later if they have not).
///
/// Each connection must send a request's headers within `read_timeout`
/// (counted from when the connection opens or its previous response ends),
/// or it is closed: a client that sends half a request cannot hold a
/// connection. axum's own `serve` sets no timer, so there is no such
/// timeout there; this loop is hyper's connection builder with one.
pub async fn run(
    listener: TcpListener,
    router: Router,
    read_timeout: Duration,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.draining() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_connection(stream, router.clone(), read_timeout, shutdown.clone()));
                }
                Err(err) => {
                    // Out of file descriptors, say: back off instead of spinning.
                    tracing::warn!(cause = %err, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    tracing::info!(connections = conns.len(), "no longer accepting connections");
    let aborted = async {
        shutdown.aborting().await;
        tokio::time::sleep(FLUSH_AFTER_ABORT).await;
    };
    tokio::pin!(aborted);
    loop {
        tokio::select! {
            joined = conns.join_next() => if joined.is_none() { break },
            _ = &mut aborted, if !conns.is_empty() => {
                tracing::info!(connections = conns.len(), "closing the connections still open");
                conns.abort_all();
                while conns.join_next().await.is_some() {}
                break;
            }
        }
    }
    Ok(())
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    read_timeout: Duration,
    shutdown: Shutdown,
) {
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(err) = res {
                tracing::debug!(cause = %err, "connection ended with an error");
            }
            return;
        }
        _ = shutdown.draining() => conn.as_mut().graceful_shutdown(),
    }
    // The request in flight, if any, finishes; then the connection closes.
    let _ = conn.await;
}
