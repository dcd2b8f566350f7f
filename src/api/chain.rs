//! Several engine jobs as one job, for one stream: the `n` choices of a
//! request (and the prompts of a legacy completion) share one SSE stream,
//! one pump, one heartbeat timer and one cancel.
//!
//! All the jobs are queued at once, each prompt's choices as one group (one
//! prefill, forked), so the engine decodes them together. Their events are
//! forwarded one job after another: a later job's events wait in its own
//! channel until the jobs before it have ended.
//!
//! Between two jobs the chain sends [`Event::ChoiceEnd`] with the finished
//! job's reason. Every event of a job comes before it, so a stream that
//! closes a choice there keeps each choice's events under its own index.
//! Only the last job's `Finished` is forwarded, with the whole request's
//! usage; a failure ends the chain.

use std::sync::Arc;

use axum::body::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::engine::{
    CancelFlag, CancelOnDrop, EngineError, Event, GenerateRequest, JobHandle, Usage,
};
use crate::state::AppState;

/// One job of a chain.
#[derive(Debug)]
pub struct ChainJob {
    pub request: GenerateRequest,
    /// The first job of its prompt: its prompt counts in the usage.
    pub first_of_prompt: bool,
}

/// Add one job's usage to a request's: a prompt counts once, however many
/// choices it has; every choice's output counts.
pub fn add_usage(total: &mut Usage, u: &Usage, first_of_prompt: bool) {
    if first_of_prompt {
        total.prompt_tokens += u.prompt_tokens;
        total.cached_tokens += u.cached_tokens;
    }
    total.completion_tokens += u.completion_tokens;
}

/// Queue `jobs`, each prompt's choices (a job with `first_of_prompt` and
/// the ones after it) as one group. One handle per job, in order.
pub fn submit_all(
    state: &AppState,
    route: &'static str,
    body: &Bytes,
    jobs: Vec<ChainJob>,
) -> Vec<(JobHandle, bool)> {
    let mut handles = Vec::with_capacity(jobs.len());
    let mut group: Vec<GenerateRequest> = Vec::new();
    let flush = |group: &mut Vec<GenerateRequest>, handles: &mut Vec<(JobHandle, bool)>| {
        if !group.is_empty() {
            let hs = super::pipeline::submit_group(state, route, body, std::mem::take(group));
            handles.extend(hs.into_iter().enumerate().map(|(i, h)| (h, i == 0)));
        }
    };
    for job in jobs {
        if job.first_of_prompt {
            flush(&mut group, &mut handles);
        }
        group.push(job.request);
    }
    flush(&mut group, &mut handles);
    handles
}

/// Run `jobs` as one job. When the stream is dropped (client gone,
/// shutdown), the task sees its receiver closed and drops every job's
/// guard, which cancels them.
pub fn chain(
    state: Arc<AppState>,
    route: &'static str,
    body: Bytes,
    jobs: Vec<ChainJob>,
) -> JobHandle {
    let (tx, rx) = mpsc::unbounded_channel();
    let handles = submit_all(&state, route, &body, jobs);
    let task = async move {
        let count = handles.len();
        let mut total = Usage::default();
        let (handles, guards): (Vec<_>, Vec<_>) = handles
            .into_iter()
            .map(|(h, first)| ((h.events, first), CancelOnDrop(h.cancel)))
            .unzip();
        let _guards = guards;
        for (k, (mut events, first_of_prompt)) in handles.into_iter().enumerate() {
            loop {
                let event = tokio::select! {
                    biased;
                    _ = tx.closed() => return,
                    event = events.recv() => event.unwrap_or(Event::Failed(EngineError::Stopped)),
                };
                match event {
                    Event::Finished {
                        reason,
                        usage,
                        timings,
                    } => {
                        add_usage(&mut total, &usage, first_of_prompt);
                        if k + 1 == count {
                            let _ = tx.send(Event::Finished {
                                reason,
                                usage: total,
                                timings,
                            });
                            return;
                        }
                        if tx.send(Event::ChoiceEnd { reason }).is_err() {
                            return;
                        }
                        break;
                    }
                    Event::Failed(err) => {
                        let _ = tx.send(Event::Failed(err));
                        return;
                    }
                    other => {
                        if tx.send(other).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    tokio::spawn(task.instrument(tracing::Span::current()));
    // The pump's own cancel guard sets this flag; the chain watches its
    // channel instead, which closes at the same moment.
    JobHandle {
        events: rx,
        cancel: CancelFlag::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_counts_once_and_every_output_counts() {
        let mut total = Usage::default();
        let u = Usage {
            prompt_tokens: 10,
            cached_tokens: 4,
            completion_tokens: 3,
        };
        add_usage(&mut total, &u, true);
        add_usage(&mut total, &u, false);
        assert_eq!(
            (
                total.prompt_tokens,
                total.cached_tokens,
                total.completion_tokens
            ),
            (10, 4, 6)
        );
    }
}
