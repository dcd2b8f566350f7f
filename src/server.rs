//! The router and the serve loop.
//!
//! `app(state)` merges each protocol module's routes and wraps them in
//! the middleware that guards them, in one order; `run` takes an
//! already-bound listener and the server's [`Shutdown`], so tests bind
//! port 0.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::api::error::{ApiError, Protocol};
use crate::api::{anthropic, auth, completions, guard, models, openai, responses, tokenize};
use crate::shutdown::Shutdown;
use crate::state::AppState;

/// All routes, and the middleware around them. `cors` lists the origins
/// browsers may call from (`*`: any); empty turns CORS off.
///
/// A request passes, outermost first: response counting, CORS (which
/// answers preflights itself, so they need no key), panic catching, the
/// API key check, the body read (size and time limits), and on the
/// generation routes admission to the queue.
pub fn app(state: Arc<AppState>, cors: &[String]) -> Router {
    let generate = Router::new()
        .merge(openai::router())
        .merge(completions::router())
        .merge(anthropic::router())
        .merge(responses::router())
        .route_layer(from_fn_with_state(state.clone(), guard::admit));
    let router = Router::new()
        .merge(models::router())
        .route("/metrics", get(metrics))
        .merge(responses::stored_router())
        .merge(tokenize::router())
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
        ("hearth_engine_restarts_total", "Times the engine process died and was started again.", load64(&stats.restarts)),
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
