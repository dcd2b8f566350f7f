//! Streaming responses that never go silent.
//!
//! A job's events are pumped through a protocol adapter into SSE events,
//! merged with a wall-clock timer: whenever nothing was yielded for the
//! heartbeat interval, the stream yields a heartbeat, whatever the engine is
//! doing (queued, prefilling, decoding, stalled inside one llama.cpp call).
//! No engine code path can pause it; only a client that stops reading can:
//! a streaming client hears from the server at least every heartbeat
//! interval. The merge is ours rather than axum's `KeepAlive` so
//! heartbeats can be counted and the stream can also watch for shutdown.
//!
//! The opening events are yielded before the first engine event is awaited,
//! so headers and `message_start` / the role chunk go out at once, before
//! the job waits in the queue or prefills. Dropping the body (the client
//! left) drops the pump and with it the job's [`CancelOnDrop`] guard, so a
//! client that leaves cancels its work. When a shutdown
//! runs past its grace period the stream ends with the protocol's error
//! event instead of a torn body, and its job is cancelled the same way.
//!
//! With the status page on, the pump stamps every write (heartbeats
//! included) on its job's entry, so the page shows how long each client
//! has gone without hearing from the server.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream};
use serde_json::json;
use tokio::time::{Instant, Sleep};

use super::error::ApiError;
pub use super::error::Protocol;
use crate::engine::{CancelOnDrop, EngineError, Event, JobHandle};
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::state::activity::{Activity, LiveJob};

/// Turns engine events into one protocol's SSE events.
pub trait StreamAdapter: Send + 'static {
    /// Events written before the job is waited on.
    fn opening(&mut self) -> Vec<SseEvent>;
    /// Events for one engine event. `Finished` and `Failed` are the last
    /// event of a job: their output must end the protocol's stream properly.
    fn on_event(&mut self, event: Event) -> Vec<SseEvent>;
    /// The events that end the stream when the server shuts down under it:
    /// the protocol's error events unless the adapter has its own
    /// (Responses ends with `response.failed`).
    fn on_abort(&mut self, err: &ApiError, protocol: Protocol) -> Vec<SseEvent> {
        protocol.error_events(err)
    }
    /// The heartbeat written after a silence: the protocol's, unless the
    /// adapter has its own (Responses repeats `response.in_progress`).
    fn heartbeat(&mut self, protocol: Protocol) -> SseEvent {
        protocol.heartbeat()
    }
}

impl Protocol {
    /// The heartbeat this protocol's clients expect: an SSE comment
    /// (`: keepalive`, ignored by every SSE parser) on OpenAI routes,
    /// Anthropic's own `event: ping` on Anthropic routes.
    pub fn heartbeat(self) -> SseEvent {
        match self {
            Protocol::OpenAI => SseEvent::default().comment("keepalive"),
            Protocol::Anthropic => SseEvent::default()
                .event("ping")
                .data(r#"{"type": "ping"}"#),
        }
    }

    /// The events that end a stream with an error after headers were sent:
    /// OpenAI's `data: {"error": ...}` then `data: [DONE]`; Anthropic's
    /// `event: error`.
    pub fn error_events(self, err: &ApiError) -> Vec<SseEvent> {
        match self {
            Protocol::OpenAI => vec![
                data(&json!({ "error": err.openai_body() })),
                SseEvent::default().data("[DONE]"),
            ],
            Protocol::Anthropic => vec![named("error", &err.anthropic_body())],
        }
    }
}

/// How a job's stream behaves besides its adapter.
#[derive(Clone)]
pub struct StreamOptions {
    /// Write a heartbeat after this long without writing anything.
    pub heartbeat: Duration,
    pub protocol: Protocol,
    /// End the stream with an error event when the shutdown aborts.
    pub shutdown: Option<Shutdown>,
    /// Count heartbeats.
    pub metrics: Option<Arc<Metrics>>,
    /// Stamp each write on the job's status-page entry.
    pub activity: Option<Arc<Activity>>,
}

impl StreamOptions {
    pub fn new(heartbeat: Duration, protocol: Protocol) -> Self {
        Self {
            heartbeat,
            protocol,
            shutdown: None,
            metrics: None,
            activity: None,
        }
    }
}

/// The message a stream ends with when a shutdown cuts it short.
pub const SHUTDOWN_MESSAGE: &str =
    "the server is shutting down; this request was cancelled before it finished";

/// The event stream of one job, heartbeats included, ending after its
/// last event.
pub fn job_events<A: StreamAdapter>(
    job: JobHandle,
    mut adapter: A,
    opts: StreamOptions,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    let pending: VecDeque<SseEvent> = adapter.opening().into();
    let watched: Vec<Arc<LiveJob>> = opts
        .activity
        .as_ref()
        .and_then(|a| a.by_cancel(&job.cancel))
        .into_iter()
        .inspect(|j| j.streamed())
        .collect();
    let pump = Pump {
        watched,
        last_write: Instant::now(),
        events: job.events,
        adapter,
        pending,
        done: false,
        silence: Box::pin(tokio::time::sleep(opts.heartbeat)),
        beats: 0,
        opts,
        _cancel: CancelOnDrop(job.cancel),
    };
    stream::unfold(pump, |mut p| async move {
        loop {
            if let Some(ev) = p.pending.pop_front() {
                p.wrote();
                return Some((Ok(ev), p));
            }
            if p.done {
                return None;
            }
            let shutdown = p.opts.shutdown.clone();
            let aborted = async move {
                match shutdown {
                    Some(s) => s.aborting().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Shutdown first: a fast decode must not keep it waiting.
                biased;
                _ = aborted => {
                    let out = p.adapter.on_abort(&ApiError::unavailable(SHUTDOWN_MESSAGE), p.opts.protocol);
                    p.pending.extend(out);
                    p.done = true;
                }
                event = p.events.recv() => {
                    let event = event.unwrap_or(Event::Failed(EngineError::Stopped));
                    if let Event::Started { job, .. } = &event {
                        p.watch(*job);
                    }
                    p.done = matches!(event, Event::Finished { .. } | Event::Failed(_));
                    let out = p.adapter.on_event(event);
                    p.pending.extend(out);
                }
                _ = p.silence.as_mut() => {
                    p.beats += 1;
                    if let Some(m) = &p.opts.metrics {
                        m.heartbeat();
                    }
                    p.wrote();
                    let beat = p.adapter.heartbeat(p.opts.protocol);
                    return Some((Ok(beat), p));
                }
            }
        }
    })
}

/// The state behind one job's stream.
struct Pump<A> {
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    adapter: A,
    /// Adapter output not yet yielded.
    pending: VecDeque<SseEvent>,
    /// The job's last event was seen (or the stream was cut short).
    done: bool,
    /// Fires when nothing was yielded for `opts.heartbeat`; reset on every
    /// yield. Boxed: `Sleep` is not `Unpin` and the pump moves between polls.
    silence: Pin<Box<Sleep>>,
    /// Heartbeats written so far.
    beats: u64,
    opts: StreamOptions,
    /// The status-page entries of the jobs this stream writes: its job, or
    /// each choice of a multi-choice stream once it started.
    watched: Vec<Arc<LiveJob>>,
    /// When it last wrote.
    last_write: Instant,
    /// Cancels the job when the stream is dropped unfinished.
    _cancel: CancelOnDrop,
}

impl<A> Pump<A> {
    /// Something is being written: the silence starts again from now.
    fn wrote(&mut self) {
        let now = Instant::now();
        self.last_write = now;
        self.silence.as_mut().reset(now + self.opts.heartbeat);
        for job in &self.watched {
            job.wrote_at(now.into_std());
        }
    }

    /// A job of this stream started (the engine numbered it `engine_job`):
    /// watch it too if it is not watched yet.
    fn watch(&mut self, engine_job: u64) {
        let Some(activity) = &self.opts.activity else {
            return;
        };
        let Some(job) = activity.by_engine_job(engine_job) else {
            return;
        };
        if self.watched.iter().all(|w| w.id != job.id) {
            job.streamed();
            job.wrote_at(self.last_write.into_std());
            self.watched.push(job);
        }
    }
}

impl<A> Drop for Pump<A> {
    fn drop(&mut self) {
        if let Some(m) = &self.opts.metrics {
            m.stream_ended(self.beats);
        }
    }
}

/// A streaming response for a job, with heartbeats.
pub fn stream_job<A: StreamAdapter>(job: JobHandle, adapter: A, opts: StreamOptions) -> Response {
    Sse::new(job_events(job, adapter, opts)).into_response()
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

    fn job() -> (
        tokio::sync::mpsc::UnboundedSender<Event>,
        JobHandle,
        CancelFlag,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancelFlag::default();
        (
            tx,
            JobHandle {
                events: rx,
                cancel: cancel.clone(),
            },
            cancel,
        )
    }

    #[tokio::test]
    async fn heartbeats_flow_while_the_engine_is_silent() {
        tokio::time::pause();
        let (tx, job, _) = job();
        let resp = stream_job(
            job,
            Echo,
            StreamOptions::new(Duration::from_secs(1), Protocol::Anthropic),
        );
        let mut body = resp.into_body().into_data_stream();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: open\n\n");
        // Nothing from the engine for 3.5 s of (virtual) wall clock.
        for _ in 0..3 {
            let frame = body.next().await.unwrap().unwrap();
            assert_eq!(frame, "event: ping\ndata: {\"type\": \"ping\"}\n\n");
        }
        tx.send(Event::Finished {
            reason: FinishReason::EndOfTurn,
            usage: Usage::default(),
            timings: Default::default(),
        })
        .unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: end\n\n");
        assert!(body.next().await.is_none());
    }

    #[tokio::test]
    async fn dropping_the_body_cancels_the_job() {
        let (_tx, job, cancel) = job();
        let resp = stream_job(
            job,
            Echo,
            StreamOptions::new(Duration::from_secs(1), Protocol::OpenAI),
        );
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
        let frames: Vec<_> = job_events(
            job,
            Echo,
            StreamOptions::new(Duration::from_secs(1), Protocol::OpenAI),
        )
        .collect()
        .await;
        assert_eq!(frames.len(), 2);
    }

    #[tokio::test]
    async fn every_write_restarts_the_silence_timer() {
        tokio::time::pause();
        let (tx, job, _) = job();
        let metrics = Arc::new(Metrics::new());
        let opts = StreamOptions {
            metrics: Some(metrics.clone()),
            ..StreamOptions::new(Duration::from_secs(1), Protocol::OpenAI)
        };
        let mut body = stream_job(job, Echo, opts).into_body().into_data_stream();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: open\n\n");
        // Text every 0.7 s: never a full second of silence, so no heartbeat.
        for i in 0..5 {
            tokio::time::sleep(Duration::from_millis(700)).await;
            tx.send(Event::Text(format!("t{i}"))).unwrap();
            assert_eq!(
                body.next().await.unwrap().unwrap(),
                format!("data: t{i}\n\n")
            );
        }
        // Then silence: the heartbeat comes one interval after the last text,
        // not on a fixed one-second grid.
        // (The timer wheel rounds each sleep up to its next millisecond.)
        let last = tokio::time::Instant::now();
        let about = |d: Duration, secs: u64| {
            d >= Duration::from_secs(secs)
                && d < Duration::from_secs(secs) + Duration::from_millis(5)
        };
        assert_eq!(body.next().await.unwrap().unwrap(), ": keepalive\n\n");
        assert!(about(last.elapsed(), 1), "{:?}", last.elapsed());
        assert_eq!(body.next().await.unwrap().unwrap(), ": keepalive\n\n");
        assert!(about(last.elapsed(), 2), "{:?}", last.elapsed());
        tx.send(Event::Finished {
            reason: FinishReason::EndOfTurn,
            usage: Usage::default(),
            timings: Default::default(),
        })
        .unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: end\n\n");
        assert!(body.next().await.is_none());
        drop(body);
        let text = metrics.render(&[]);
        assert!(text.contains("hearth_heartbeats_total 2"), "{text}");
        assert!(
            text.contains("hearth_stream_heartbeats_bucket{le=\"2\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("hearth_stream_heartbeats_bucket{le=\"1\"} 0"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn every_write_is_stamped_on_the_jobs_status_entry() {
        let (tx, job, _) = job();
        let activity = Arc::new(Activity::new());
        let live = activity.begin("messages", &job.cancel);
        let opts = StreamOptions {
            activity: Some(activity.clone()),
            ..StreamOptions::new(Duration::from_millis(50), Protocol::Anthropic)
        };
        let mut body = stream_job(job, Echo, opts).into_body().into_data_stream();
        assert!(live.is_streaming());
        assert_eq!(body.next().await.unwrap().unwrap(), "data: open\n\n");
        let opened = live.since_last_write(std::time::Instant::now()).unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        // A heartbeat, with nothing from the engine: stamped too.
        let ping = body.next().await.unwrap().unwrap();
        assert!(ping.starts_with(b"event: ping"), "{ping:?}");
        let since = live.since_last_write(std::time::Instant::now()).unwrap();
        assert!(
            since < Duration::from_millis(20),
            "{since:?} after a heartbeat"
        );
        assert!(
            opened < Duration::from_millis(20),
            "{opened:?} after the opening"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_stream_of_several_choices_stamps_each_once_it_started() {
        let (tx, job, _) = job();
        let activity = Arc::new(Activity::new());
        // A choice submitted on its own flag, as `chain.rs` does.
        let choice = activity.begin("chat_completions", &CancelFlag::default());
        choice.update(|p| p.engine_job = Some(3));
        let opts = StreamOptions {
            activity: Some(activity.clone()),
            ..StreamOptions::new(Duration::from_secs(60), Protocol::OpenAI)
        };
        let mut body = stream_job(job, Echo, opts).into_body().into_data_stream();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: open\n\n");
        assert!(!choice.is_streaming());
        tx.send(Event::Started {
            job: 3,
            prompt_tokens: 4,
            cached: 0,
            source: crate::engine::PrefixSource::None,
        })
        .unwrap();
        tx.send(Event::Text("t".into())).unwrap();
        assert_eq!(body.next().await.unwrap().unwrap(), "data: t\n\n");
        assert!(choice.is_streaming());
        let since = choice.since_last_write(std::time::Instant::now()).unwrap();
        assert!(since < Duration::from_millis(20), "{since:?}");
    }

    #[tokio::test]
    async fn a_shutdown_ends_the_stream_with_the_protocols_error_event() {
        for (protocol, expected) in [
            (Protocol::OpenAI, vec!["data: {\"error\":", "data: [DONE]"]),
            (Protocol::Anthropic, vec!["event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\""]),
        ] {
            let (_tx, job, cancel) = job();
            let shutdown = Shutdown::new();
            let opts = StreamOptions { shutdown: Some(shutdown.clone()), ..StreamOptions::new(Duration::from_secs(60), protocol) };
            let mut body = stream_job(job, Echo, opts).into_body().into_data_stream();
            assert_eq!(body.next().await.unwrap().unwrap(), "data: open\n\n");
            shutdown.drain(); // draining alone lets the stream go on
            shutdown.abort();
            let mut rest = Vec::new();
            while let Some(frame) = body.next().await {
                rest.push(String::from_utf8(frame.unwrap().to_vec()).unwrap());
            }
            assert_eq!(rest.len(), expected.len(), "{rest:?}");
            for (frame, want) in rest.iter().zip(&expected) {
                assert!(frame.starts_with(want), "{frame:?} should start with {want:?}");
            }
            assert!(rest[0].contains("shutting down"), "{rest:?}");
            drop(body);
            assert!(cancel.is_cancelled());
        }
    }
}
