//! Watching a job between the engine and its response, for metrics, the
//! trace and the status page.
//!
//! Every submitted job's events pass through one small task that records
//! what the metrics and the trace need (the cache decision, time to first
//! token, usage, speeds, how it ended) and forwards each event unchanged.
//! Doing it here, once, keeps the protocol adapters, the stream pump and
//! `collect` free of bookkeeping, streaming or not.
//!
//! The task ends with the job: after the last event, or as soon as the
//! response side drops its receiver (the client left), when it drops the
//! engine's receiver in turn so the engine sees the job is unwanted.

use std::sync::Arc;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::engine::{Event, FinishReason, JobHandle, PrefixSource};
use crate::metrics::{Metrics, Outcome};
use crate::shutdown::Shutdown;
use crate::state::activity::{Activity, Ending};
use crate::trace::{raw_body, TraceLog};

/// What the watcher needs besides the job.
pub struct Watch {
    /// Metrics label of the route (`chat_completions`, `messages`).
    pub route: &'static str,
    pub metrics: Arc<Metrics>,
    pub shutdown: Shutdown,
    /// Set when tracing: the trace file, the raw body, the rendered prompt.
    pub trace: Option<(Arc<TraceLog>, bytes::Bytes, Option<String>)>,
    /// Set when the status page is on: where the job's progress is shown.
    pub activity: Option<Arc<Activity>>,
}

/// Forward `job`'s events through a watcher task; returns the handle the
/// response reads instead. Must run inside the tokio runtime.
pub fn watch(job: JobHandle, w: Watch) -> JobHandle {
    let JobHandle { mut events, cancel } = job;
    let (tx, rx) = mpsc::unbounded_channel();
    // Registered before the handler can open its stream, which looks it up.
    let live = w.activity.as_ref().map(|a| a.begin(w.route, &cancel));
    tokio::spawn(async move {
        let queued = Instant::now();
        let mut text = w.trace.as_ref().map(|_| String::new());
        let mut cache: Option<(u32, u32, PrefixSource)> = None;
        let mut first_token = false;
        let mut end: Option<Value> = None;
        let mut done = None;
        let mut finish = None;
        let outcome = loop {
            let event = tokio::select! {
                biased;
                event = events.recv() => event,
                _ = tx.closed() => break if w.shutdown.is_aborting() { Outcome::Shutdown } else { Outcome::Cancelled },
            };
            let Some(event) = event else {
                break Outcome::Failed;
            };
            let last = match &event {
                Event::Started {
                    prompt_tokens,
                    cached,
                    source,
                    ..
                } => {
                    w.metrics.started(*cached, *source);
                    cache = Some((*prompt_tokens, *cached, *source));
                    if let (Some(live), Event::Started { job, .. }) = (&live, &event) {
                        live.update(|p| {
                            p.engine_job = Some(*job);
                            p.prompt_tokens = *prompt_tokens;
                            p.cached_tokens = *cached;
                            p.source = Some(*source);
                        });
                    }
                    false
                }
                Event::Text(t) => {
                    if !first_token {
                        first_token = true;
                        w.metrics.first_token(queued.elapsed());
                        if let Some(live) = &live {
                            live.update(|p| p.first_token = Some(queued.elapsed()));
                        }
                    }
                    if let Some(text) = &mut text {
                        text.push_str(t);
                    }
                    false
                }
                Event::Logprobs(_) => false,
                Event::Finished {
                    reason,
                    usage,
                    timings,
                } => {
                    done = Some((*usage, *timings));
                    finish = Some(finish_name(reason));
                    end = Some(json!({
                        "finish": finish_label(reason),
                        "usage": { "prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens,
                                   "completion_tokens": usage.completion_tokens },
                        "prefill_secs": timings.prefill.as_secs_f64(),
                        "decode_secs": timings.decode.as_secs_f64(),
                    }));
                    true
                }
                Event::Failed(err) => {
                    end = Some(json!({ "error": err.to_string() }));
                    true
                }
                Event::PrefillProgress { done, total, .. } => {
                    if let Some(live) = &live {
                        live.update(|p| (p.prefill_done, p.prefill_total) = (*done, *total));
                    }
                    false
                }
                Event::ChoiceEnd { .. } => false,
            };
            if tx.send(event).is_err() {
                break if w.shutdown.is_aborting() {
                    Outcome::Shutdown
                } else {
                    Outcome::Cancelled
                };
            }
            if last {
                break if done.is_some() {
                    Outcome::Finished
                } else {
                    Outcome::Failed
                };
            }
        };
        // Drop the engine's receiver now, not when the trace is written.
        drop(events);
        if let (Some(activity), Some(live)) = (&w.activity, &live) {
            let ending = Ending {
                outcome: outcome_label(outcome),
                finish,
                usage: done.map(|(usage, _)| usage),
            };
            activity.end(live, ending);
        }
        w.metrics.finished(
            w.route,
            outcome,
            if outcome == Outcome::Finished {
                done
            } else {
                None
            },
        );
        if let Some((log, raw, prompt)) = w.trace {
            let mut record = json!({
                "route": w.route,
                "outcome": outcome_label(outcome),
                "request": raw_body(&raw),
                "prompt": prompt,
                "cache": cache.map(|(prompt_tokens, cached, source)| json!({
                    "prompt_tokens": prompt_tokens, "cached_tokens": cached, "source": source.as_str(),
                })),
                "output": text,
                "secs": queued.elapsed().as_secs_f64(),
            });
            if let (Some(Value::Object(end)), Value::Object(rec)) = (end, &mut record) {
                rec.extend(end);
            }
            log.write(record);
        }
    });
    JobHandle { events: rx, cancel }
}

fn finish_label(reason: &FinishReason) -> Value {
    match reason {
        FinishReason::StopSequence(s) => json!({ "stop_sequence": s }),
        other => json!(finish_name(other)),
    }
}

/// Why generation ended, by name (a stop sequence without its text).
fn finish_name(reason: &FinishReason) -> &'static str {
    match reason {
        FinishReason::EndOfTurn => "end_of_turn",
        FinishReason::StopSequence(_) => "stop_sequence",
        FinishReason::MaxTokens => "max_tokens",
        FinishReason::ContextFull => "context_full",
    }
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Finished => "finished",
        Outcome::Failed => "failed",
        Outcome::Cancelled => "cancelled",
        Outcome::Shutdown => "shutdown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{CancelFlag, Timings, Usage};

    fn watch_one() -> (mpsc::UnboundedSender<Event>, JobHandle, Arc<Metrics>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new());
        let job = JobHandle {
            events: rx,
            cancel: CancelFlag::default(),
        };
        let w = Watch {
            route: "messages",
            metrics: metrics.clone(),
            shutdown: Shutdown::new(),
            trace: None,
            activity: None,
        };
        (tx, watch(job, w), metrics)
    }

    #[tokio::test]
    async fn forwards_every_event_and_counts_the_outcome() {
        let (tx, mut job, metrics) = watch_one();
        tx.send(Event::Started {
            job: 0,
            prompt_tokens: 10,
            cached: 4,
            source: PrefixSource::Ram,
        })
        .unwrap();
        tx.send(Event::Text("hi".into())).unwrap();
        let usage = Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 1,
        };
        tx.send(Event::Finished {
            reason: FinishReason::EndOfTurn,
            usage,
            timings: Timings::default(),
        })
        .unwrap();
        let mut n = 0;
        while job.events.recv().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 3);
        let text = metrics.render(&[]);
        assert!(text.contains("outcome=\"finished\"} 1"), "{text}");
        assert!(
            text.contains("hearth_cache_lookups_total{source=\"ram\"} 1"),
            "{text}"
        );
        // The engine's side is released once the job ended.
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn a_client_that_leaves_releases_the_engine_side() {
        let (tx, job, metrics) = watch_one();
        drop(job);
        tokio::time::timeout(std::time::Duration::from_secs(1), tx.closed())
            .await
            .unwrap();
        // The metrics are recorded right after the channel closes.
        for _ in 0..100 {
            if metrics.render(&[]).contains("outcome=\"cancelled\"} 1") {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("cancellation not counted: {}", metrics.render(&[]));
    }
}
