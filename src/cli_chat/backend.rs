//! Where `hearth chat`'s replies come from: the engine in this process
//! (the same prompt pipeline and KV stores as `hearth serve`), or a
//! running server over its OpenAI chat completions stream ([`remote`]).
//! Both give one stream of [`ReplyEvent`]s, so the terminal side does not
//! care which it talks to.
//!
//! [`remote`]: super::remote

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::api::{self, GenOptions};
use crate::chat::output::{OutputEvent, OutputParser};
use crate::chat::ChatRequest;
use crate::engine::{CancelOnDrop, Event, Usage};
use crate::state::AppState;

/// One thing a reply did, in order.
#[derive(Debug, Clone)]
pub enum ReplyEvent {
    /// The engine took the prompt: `cached` of its tokens were reused,
    /// from `source` (in-process only).
    Started {
        prompt_tokens: u32,
        cached: u32,
        source: &'static str,
    },
    /// `done` of `total` prompt tokens are in the KV (in-process only).
    Prefill {
        done: u32,
        total: u32,
        elapsed: Duration,
    },
    /// Reasoning, text or a piece of a tool call.
    Output(OutputEvent),
    /// The last event of a reply. `timings`: prefill and decode time as
    /// the engine measured them (None: a server, timed here).
    Finished {
        reason: String,
        usage: Usage,
        timings: Option<(Duration, Duration)>,
    },
    /// The last event of a reply that failed.
    Failed(String),
}

/// A reply being generated. Dropping it (or [`Reply::stop`]) stops the
/// generation: in-process the job is cancelled, with a server the
/// connection is closed, which the server takes as cancelling.
pub struct Reply {
    pub events: mpsc::UnboundedReceiver<ReplyEvent>,
    task: JoinHandle<()>,
}

impl Reply {
    pub fn new(events: mpsc::UnboundedReceiver<ReplyEvent>, task: JoinHandle<()>) -> Self {
        Self { events, task }
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a reply is asked for, beyond the conversation.
#[derive(Debug, Clone, Default)]
pub struct ReplyOptions {
    pub temperature: f32,
    pub max_tokens: Option<u32>,
    pub ignore_eos: bool,
}

/// The engine in this process, under the same state the server builds.
pub struct Local {
    pub state: Arc<AppState>,
}

impl Local {
    /// Render, tokenize and submit; events follow on the returned reply.
    pub fn start(&self, chat: ChatRequest, opts: &ReplyOptions) -> Reply {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = self.state.clone();
        let gen = GenOptions {
            sampling: crate::engine::SamplingParams {
                temperature: opts.temperature,
                ..Default::default()
            },
            max_tokens: opts.max_tokens,
            ignore_eos: opts.ignore_eos,
            ..Default::default()
        };
        let task = tokio::spawn(async move {
            let job = match api::pipeline::prepare(&state, chat, gen, "messages").await {
                Ok(job) => job,
                Err(e) => {
                    let _ = tx.send(ReplyEvent::Failed(e.message));
                    return;
                }
            };
            let spec = job.output;
            let handle = state.engine.submit(job.request);
            let mut events = handle.events;
            // Aborting this task drops the guard: the engine frees the
            // sequence at its next step and keeps its KV.
            let _cancel = CancelOnDrop(handle.cancel);
            let mut parser = OutputParser::new(&spec, "call_");
            let send = |evs: Vec<OutputEvent>| {
                for e in evs {
                    let _ = tx.send(ReplyEvent::Output(e));
                }
            };
            while let Some(ev) = events.recv().await {
                match ev {
                    Event::Started {
                        prompt_tokens,
                        cached,
                        source,
                        ..
                    } => {
                        let _ = tx.send(ReplyEvent::Started {
                            prompt_tokens,
                            cached,
                            source: source.as_str(),
                        });
                    }
                    Event::PrefillProgress {
                        done,
                        total,
                        elapsed,
                    } => {
                        let _ = tx.send(ReplyEvent::Prefill {
                            done,
                            total,
                            elapsed,
                        });
                    }
                    Event::Text(t) => send(parser.push(&t)),
                    Event::Logprobs(_) | Event::ChoiceEnd { .. } => {}
                    Event::Finished {
                        reason,
                        usage,
                        timings,
                    } => {
                        send(parser.finish());
                        crate::api::reply::remember_calls(&state.replay, parser.output());
                        let _ = tx.send(ReplyEvent::Finished {
                            reason: finish_name(&reason).into(),
                            usage,
                            timings: Some((timings.prefill, timings.decode)),
                        });
                        return;
                    }
                    Event::Failed(e) => {
                        let _ = tx.send(ReplyEvent::Failed(e.to_string()));
                        return;
                    }
                }
            }
            let _ = tx.send(ReplyEvent::Failed("the engine stopped".into()));
        });
        Reply::new(rx, task)
    }
}

/// OpenAI's names for why a reply ended.
pub fn finish_name(reason: &crate::engine::FinishReason) -> &'static str {
    use crate::engine::FinishReason;
    match reason {
        FinishReason::EndOfTurn | FinishReason::StopSequence(_) => "stop",
        FinishReason::MaxTokens | FinishReason::ContextFull => "length",
    }
}
