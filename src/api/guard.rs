//! The middleware that keeps the server standing: body limits and read
//! timeouts, admission to the generation queue, panics caught per request,
//! and per-route response counts.
//!
//! Each refusal is an error in the protocol of the route it was aimed at
//! (`Protocol::for_path`), so an SDK reads it like any error of its API.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::header::{CONNECTION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use futures::FutureExt;

use super::error::{ApiError, Protocol};
use crate::metrics::route_label;
use crate::state::AppState;
use crate::trace::{raw_body, TraceLog};

/// A response body that holds something (a queue permit) until the body is
/// finished or dropped: for a stream, until its last event is written or
/// the client leaves.
struct Holding<T> {
    inner: Body,
    _held: T,
}

impl<T: Send + Unpin + 'static> HttpBody for Holding<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Middleware on the generation routes: refuse at once when the queue is
/// full or the server is shutting down; hold a place in the queue for as
/// long as the response lasts; answer a request still waiting when the
/// shutdown grace period ends.
pub async fn admit(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let protocol = Protocol::for_path(req.uri().path());
    let service = &state.service;
    if service.shutdown.is_draining() {
        return protocol.error_response(ApiError::unavailable("the server is shutting down"));
    }
    let Some(permit) = service.admission.try_admit() else {
        let waiting = service.admission.queue_room();
        let mut resp = protocol.error_response(ApiError::overloaded(format!(
            "the server is busy: {waiting} requests are already waiting for the model; retry shortly"
        )));
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    };
    let resp = tokio::select! {
        biased;
        // Dropping the handler's future drops its job, which cancels it.
        _ = service.shutdown.aborting() => protocol.error_response(ApiError::unavailable(super::sse::SHUTDOWN_MESSAGE)),
        resp = next.run(req) => resp,
    };
    resp.map(|inner| {
        Body::new(Holding {
            inner,
            _held: permit,
        })
    })
}

/// Middleware: read the whole body within the size limit and the read
/// timeout, before any handler sees it. A declared length over the limit is
/// refused before a byte of the body is read.
pub async fn read_body(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let protocol = Protocol::for_path(req.uri().path());
    let limits = &state.service.limits;
    let too_large = || {
        let mb = limits.max_body_bytes as f64 / (1024.0 * 1024.0);
        closing(protocol.error_response(ApiError::payload_too_large(format!(
            "the request body is larger than this server's limit of {mb} MiB (--max-body-mb)"
        ))))
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        limits.read_timeout,
        axum::body::to_bytes(body, limits.max_body_bytes),
    )
    .await;
    let bytes = match read {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(err)) if is_length_limit(&err) => return too_large(),
        Ok(Err(err)) => {
            return closing(protocol.error_response(ApiError::invalid(format!(
                "cannot read the request body: {err}"
            ))))
        }
        Err(_) => {
            let secs = limits.read_timeout.as_secs_f64();
            return closing(protocol.error_response(ApiError::request_timeout(format!(
                "the request body did not arrive within {secs} s (--read-timeout-secs)"
            ))));
        }
    };
    let path = parts.uri.path().to_string();
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes.clone())))
        .await;
    match &state.service.trace {
        Some(log) if is_refusal(resp.status()) && route_label(&path) != "other" => {
            trace_refusal(log, &path, bytes, resp).await
        }
        _ => resp,
    }
}

/// A request turned away before it reached the engine: a client mistake,
/// or the queue or the server refusing work. (Failures after a job was
/// queued are traced by the job's watcher.)
fn is_refusal(status: StatusCode) -> bool {
    status.is_client_error() || status == StatusCode::SERVICE_UNAVAILABLE || status.as_u16() == 529
}

/// Write a trace line for a refused request: its body and the error sent.
async fn trace_refusal(log: &TraceLog, path: &str, raw: Bytes, resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    // Error bodies are small JSON objects built by this server.
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    log.write(serde_json::json!({
        "route": route_label(path),
        "outcome": "refused",
        "status": parts.status.as_u16(),
        "request": raw_body(&raw),
        "response": raw_body(&body),
    }));
    Response::from_parts(parts, Body::from(body))
}

fn is_length_limit(err: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// The rest of the body was not read: the connection cannot be reused.
fn closing(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Middleware: a panic in a handler answers that request with a 500 in its
/// protocol's shape; the server carries on. (tower-http's CatchPanicLayer
/// cannot see the request, so it could not pick the protocol.)
pub async fn catch_panic(req: Request, next: Next) -> Response {
    let protocol = Protocol::for_path(req.uri().path());
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(panic) => {
            tracing::error!(cause = %panic_message(&*panic), "a request handler panicked");
            protocol.error_response(ApiError::internal(
                "the server failed while handling this request",
            ))
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// Middleware: count responses by route and status.
pub async fn count_requests(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let route = route_label(req.uri().path());
    let resp = next.run(req).await;
    state.service.metrics.request(route, resp.status().as_u16());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_gets_a_500_in_its_protocol() {
        use axum::routing::post;
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        async fn boom() -> &'static str {
            panic!("handler bug")
        }
        let app = axum::Router::new()
            .route("/v1/messages", post(boom))
            .route("/v1/chat/completions", post(boom))
            .layer(axum::middleware::from_fn(catch_panic));
        for (path, shape) in [("/v1/messages", "type"), ("/v1/chat/completions", "error")] {
            let req = Request::post(path).body(Body::empty()).unwrap();
            let resp = app.clone().oneshot(req).await.unwrap();
            assert_eq!(resp.status(), 500);
            let body: serde_json::Value =
                serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes())
                    .unwrap();
            assert!(body.get(shape).is_some(), "{body}");
        }
    }
}
