//! One skeleton for every protocol's reply, streamed or whole.
//!
//! The engine's events go through one [`OutputParser`]; a finished reply
//! that made tool calls is remembered for exact replay; a failure becomes
//! an [`ApiError`], logged once when it is the server's own fault. What
//! differs between protocols is only the wire: the events that open the
//! stream, carry each piece of output, close a choice, end the reply and
//! report an error. Each protocol supplies those through [`Wire`], and
//! [`Reply`] drives it; [`collect`] is the same reading for a whole reply.

use std::sync::Arc;

use axum::response::sse::Event as SseEvent;

use super::error::{ApiError, ErrorKind, Protocol};
use super::sse::StreamAdapter;
use crate::chat::output::{Output, OutputEvent, OutputParser, OutputSpec};
use crate::chat::replay::ReplayStore;
use crate::engine::{
    CancelOnDrop, EngineError, Event, FinishReason, JobHandle, TokenLogprob, Usage,
};

/// One protocol's stream events for a reply; [`Reply`] calls them in
/// order: `opening`, `output` as the reply grows, then `ending` (or
/// `error`). A chain of several choices has `choice_end` then `opening`
/// again between them.
pub trait Wire: Send + 'static {
    /// Whose heartbeats and error shapes the stream uses.
    const PROTOCOL: Protocol;

    /// Written before the job is waited on, and again as each later
    /// choice of a chain begins.
    fn opening(&mut self) -> Vec<SseEvent>;

    /// Pieces of the reply, as the output parser reads them. `logprobs`
    /// holds those of the tokens whose text has not been written yet: a
    /// wire that reports them takes what goes out with these pieces.
    fn output(&mut self, pieces: Vec<OutputEvent>, logprobs: &mut Logprobs) -> Vec<SseEvent>;

    /// One choice of a chain ended; the next one follows. Only protocols
    /// with `n` choices are chained.
    fn choice_end(&mut self, end: Ended<'_>) -> Vec<SseEvent> {
        let _ = end;
        Vec::new()
    }

    /// The reply ended, `usage` for the whole request: what closes the
    /// protocol's stream properly.
    fn ending(&mut self, end: Ended<'_>, usage: &Usage) -> Vec<SseEvent>;

    /// The reply failed, or the server shut down under it: the protocol's
    /// error events, the last of the stream.
    fn error(&mut self, err: &ApiError) -> Vec<SseEvent> {
        Self::PROTOCOL.error_events(err)
    }

    /// What keeps a silent stream alive: the protocol's heartbeat unless
    /// the wire has its own.
    fn heartbeat(&mut self) -> SseEvent {
        Self::PROTOCOL.heartbeat()
    }
}

/// Logprobs of tokens whose text has not been written yet.
pub type Logprobs = Vec<TokenLogprob>;

/// A choice (or the whole reply) that ended, for the wire to close.
pub struct Ended<'a> {
    pub reason: &'a FinishReason,
    /// All the choice said.
    pub output: &'a Output,
    pub logprobs: &'a mut Logprobs,
}

/// How a reply ended, as the protocols tell it apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending<'a> {
    /// It made tool calls and stopped to have them run.
    ToolCalls,
    /// The model ended its turn.
    EndOfTurn,
    /// One of the request's stop sequences matched.
    StopSequence(&'a str),
    /// It was cut short: `max_tokens`, or the context is full.
    Length,
}

impl<'a> Ending<'a> {
    /// A reply that made calls ended to have them run, unless it was cut
    /// short.
    pub fn of(reason: &'a FinishReason, calls: bool) -> Self {
        match reason {
            FinishReason::EndOfTurn | FinishReason::StopSequence(_) if calls => Ending::ToolCalls,
            FinishReason::EndOfTurn => Ending::EndOfTurn,
            FinishReason::StopSequence(s) => Ending::StopSequence(s),
            FinishReason::MaxTokens | FinishReason::ContextFull => Ending::Length,
        }
    }
}

/// Remember a reply that made tool calls, for exact replay.
pub fn remember_calls(replay: &ReplayStore, output: &Output) {
    if !output.calls.is_empty() {
        replay.remember(output.calls.iter().map(|c| c.id.as_str()), &output.raw);
    }
}

/// Log a failure that is the server's own (a client's mistake is not
/// logged), and give it in the API's terms.
fn failure(err: EngineError) -> ApiError {
    let api: ApiError = err.into();
    if api.kind == ErrorKind::Internal {
        tracing::error!(cause = %api.message, "stream failed");
    }
    api
}

/// A reply streamed through a [`Wire`]: the parser, the replay store and
/// the failure handling every protocol shares.
pub struct Reply<W> {
    wire: W,
    spec: OutputSpec,
    id_prefix: &'static str,
    parser: OutputParser,
    /// Logprobs of tokens whose text has not been written yet.
    logprobs: Logprobs,
    replay: Arc<ReplayStore>,
}

impl<W: Wire> Reply<W> {
    /// A reply read as `spec` says, its calls named with `id_prefix`
    /// (`call_`, `toolu_`), remembered in `replay`.
    pub fn new(
        wire: W,
        spec: OutputSpec,
        id_prefix: &'static str,
        replay: Arc<ReplayStore>,
    ) -> Self {
        Reply {
            parser: OutputParser::new(&spec, id_prefix),
            wire,
            spec,
            id_prefix,
            logprobs: Vec::new(),
            replay,
        }
    }

    /// The wire, for tests that look at its state.
    pub fn wire(&self) -> &W {
        &self.wire
    }

    /// The generation of one choice ended: what the parser held back, and
    /// the reply remembered.
    fn finish_output(&mut self) -> Vec<SseEvent> {
        let pieces = self.parser.finish();
        let out = self.wire.output(pieces, &mut self.logprobs);
        remember_calls(&self.replay, self.parser.output());
        out
    }
}

impl<W: Wire> StreamAdapter for Reply<W> {
    fn opening(&mut self) -> Vec<SseEvent> {
        self.wire.opening()
    }

    fn heartbeat(&mut self, _: Protocol) -> SseEvent {
        self.wire.heartbeat()
    }

    fn on_event(&mut self, event: Event) -> Vec<SseEvent> {
        match event {
            Event::Text(text) => {
                let pieces = self.parser.push(&text);
                self.wire.output(pieces, &mut self.logprobs)
            }
            Event::Logprobs(lps) => {
                self.logprobs.extend(lps);
                Vec::new()
            }
            Event::ChoiceEnd { reason } => {
                let mut out = self.finish_output();
                let end = Ended {
                    reason: &reason,
                    output: self.parser.output(),
                    logprobs: &mut self.logprobs,
                };
                out.extend(self.wire.choice_end(end));
                self.parser = OutputParser::new(&self.spec, self.id_prefix);
                self.logprobs.clear();
                out.extend(self.wire.opening());
                out
            }
            Event::Finished { reason, usage, .. } => {
                let mut out = self.finish_output();
                let end = Ended {
                    reason: &reason,
                    output: self.parser.output(),
                    logprobs: &mut self.logprobs,
                };
                out.extend(self.wire.ending(end, &usage));
                out
            }
            Event::Failed(err) => self.wire.error(&failure(err)),
            Event::Started { .. } | Event::PrefillProgress { .. } => Vec::new(),
        }
    }

    fn on_abort(&mut self, err: &ApiError, _: Protocol) -> Vec<SseEvent> {
        self.wire.error(err)
    }
}

/// A finished non-streaming generation.
#[derive(Debug)]
pub struct Collected {
    pub output: Output,
    pub reason: FinishReason,
    pub usage: Usage,
    /// Every token's, in order (the engine reports none a stop sequence cut).
    pub logprobs: Vec<TokenLogprob>,
}

/// Wait for a job to finish and gather its reply, read as `spec` says.
/// Dropping the future (the client went away) cancels the job. A reply
/// with tool calls is remembered for exact replay.
pub async fn collect(
    replay: &ReplayStore,
    job: JobHandle,
    spec: &OutputSpec,
    id_prefix: &'static str,
) -> Result<Collected, EngineError> {
    let JobHandle { mut events, cancel } = job;
    let _guard = CancelOnDrop(cancel);
    let mut parser = OutputParser::new(spec, id_prefix);
    let mut logprobs = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(t) => {
                parser.push(&t);
            }
            Event::Logprobs(lp) => logprobs.extend(lp),
            Event::Finished { reason, usage, .. } => {
                parser.finish();
                let output = parser.into_output();
                remember_calls(replay, &output);
                return Ok(Collected {
                    output,
                    reason,
                    usage,
                    logprobs,
                });
            }
            Event::Failed(err) => return Err(err),
            Event::Started { .. } | Event::PrefillProgress { .. } | Event::ChoiceEnd { .. } => {}
        }
    }
    Err(EngineError::Stopped)
}
