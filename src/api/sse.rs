//! Streaming responses that never go silent.
//!
//! A job's events are pumped through a protocol adapter into SSE events, and
//! axum's keep-alive merges a wall-clock timer into the same body: whenever
//! nothing was written for the heartbeat interval, it writes a heartbeat,
//! whatever the engine is doing (queued, prefilling, decoding, stalled
//! inside one llama.cpp call). No engine code path can pause it; only a
//! client that stops reading can (DESIGN invariant 2).
//!
//! The opening events are yielded before the first engine event is awaited,
//! so headers and `message_start` / the role chunk go out at once
//! (invariant 3). Dropping the body (the client left) drops the pump and
//! with it the job's [`CancelOnDrop`] guard (invariant 4).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream};

use crate::engine::{CancelOnDrop, EngineError, Event, JobHandle};

/// Turns engine events into one protocol's SSE events.
pub trait StreamAdapter: Send + 'static {
    /// Events written before the job is waited on.
    fn opening(&mut self) -> Vec<SseEvent>;
    /// Events for one engine event. `Finished` and `Failed` are the last
    /// event of a job: their output must end the protocol's stream properly.
    fn on_event(&mut self, event: Event) -> Vec<SseEvent>;
}

/// Which heartbeat a route writes.
#[derive(Debug, Clone, Copy)]
pub enum Heartbeat {
    /// An SSE comment line (`: keepalive`), ignored by every SSE parser.
    Comment,
    /// Anthropic's own keep-alive event, `event: ping`.
    AnthropicPing,
}

fn keep_alive(interval: Duration, kind: Heartbeat) -> KeepAlive {
    let ka = KeepAlive::new().interval(interval);
    match kind {
        Heartbeat::Comment => ka.text("keepalive"),
        Heartbeat::AnthropicPing => ka.event(SseEvent::default().event("ping").data(r#"{"type": "ping"}"#)),
    }
}

/// The event stream of one job, ending after its last event.
pub fn job_events<A: StreamAdapter>(job: JobHandle, mut adapter: A) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct Pump<A> {
        events: tokio::sync::mpsc::UnboundedReceiver<Event>,
        adapter: A,
        pending: VecDeque<SseEvent>,
        done: bool,
        /// Cancels the job when the stream is dropped unfinished.
        _cancel: CancelOnDrop,
    }
    let pending: VecDeque<SseEvent> = adapter.opening().into();
    let pump = Pump { events: job.events, adapter, pending, done: false, _cancel: CancelOnDrop(job.cancel) };
    stream::unfold(pump, |mut p| async move {
        loop {
            if let Some(ev) = p.pending.pop_front() {
                return Some((Ok(ev), p));
            }
            if p.done {
                return None;
            }
            let event = p.events.recv().await.unwrap_or(Event::Failed(EngineError::Stopped));
            p.done = matches!(event, Event::Finished { .. } | Event::Failed(_));
            let out = p.adapter.on_event(event);
            p.pending.extend(out);
        }
    })
}

/// A streaming response for a job, with heartbeats.
pub fn stream_job<A: StreamAdapter>(job: JobHandle, adapter: A, heartbeat: Duration, kind: Heartbeat) -> Response {
    Sse::new(job_events(job, adapter)).keep_alive(keep_alive(heartbeat, kind)).into_response()
}

/// A JSON payload as an SSE data event. Serializing a `serde_json::Value`
/// cannot fail, so there is nothing to unwrap.
pub fn data(value: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(value.to_string())
}

/// A named event with a JSON payload (Anthropic style).
pub fn named(name: &str, value: &serde_json::Value) -> SseEvent {
    SseEvent::default().event(name).data(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CancelFlag, FinishReason, Usage};
    use futures::StreamExt;
    use http_body_util::BodyExt;

    struct Echo;
    impl StreamAdapter for Echo {
        fn opening(&mut self) -> Vec<SseEvent> {
            vec![SseEvent::default().data("open")]
        }
        fn on_event(&mut self, event: Event) -> Vec<SseEvent> {
            match event {
                Event::Text(t) => vec![SseEvent::default().data(t)],
                Event::Finished { .. } => vec![SseEvent::default().data("end")],
                Event::Failed(e) => vec![SseEvent::default().event("error").data(e.to_string())],
                _ => vec![],
            }
        }
    }

    fn job() -> (tokio::sync::mpsc::UnboundedSender<Event>, JobHandle, CancelFlag) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancelFlag::default();
        (tx, JobHandle { events: rx, cancel: cancel.clone() }, cancel)
    }

    #[tokio::test]
    async fn heartbeats_flow_while_the_engine_is_silent() {
        tokio::time::pause();
        let (tx, job, _) = job();
        let resp = stream_job(job, Echo, Duration::from_secs(1), Heartbeat::AnthropicPing);
        let mut body = resp.into_body().into_data_stream();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: open\n\n");
        // Nothing from the engine for 3.5 s of (virtual) wall clock.
        for _ in 0..3 {
            let frame = body.next().await.unwrap().unwrap();
            assert_eq!(frame, "event: ping\ndata: {\"type\": \"ping\"}\n\n");
        }
        tx.send(Event::Finished { reason: FinishReason::EndOfTurn, usage: Usage::default(), timings: Default::default() }).unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: end\n\n");
        assert!(body.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_body_cancels_the_job() {
        let (_tx, job, cancel) = job();
        let resp = stream_job(job, Echo, Duration::from_secs(1), Heartbeat::Comment);
        let mut body = resp.into_body();
        let _ = body.frame().await;
        assert!(!cancel.is_cancelled());
        drop(body);
        assert!(cancel.is_cancelled());
    }

    #[tokio::test]
    async fn an_engine_that_vanishes_ends_with_an_error_event() {
        let (tx, job, _) = job();
        drop(tx);
        let frames: Vec<_> = job_events(job, Echo).collect().await;
        assert_eq!(frames.len(), 2);
    }
}
