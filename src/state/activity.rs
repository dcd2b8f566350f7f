//! What the HTTP side knows about each generation job, for the status page.
//!
//! `observe.rs` registers every job when it is submitted and reports its
//! events here (started, prefill progress, first text, end); the stream
//! pump (`api/sse.rs`) stamps the moment it last wrote to the client,
//! heartbeats included. A finished job moves to a bounded ring of recent
//! requests. Everything here lives on the async side: the engine thread
//! never sees it.
//!
//! The registry is one std `Mutex` over a short list (at most the queue
//! and the running jobs): it is held for a push, a removal or a copy, never
//! across an await. A job's own progress sits behind its own lock, and its
//! last write is an atomic, so a streaming token costs one atomic store.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::engine::{CancelFlag, PrefixSource, Usage};

/// How many finished requests the page lists.
pub const RECENT_REQUESTS: usize = 50;

/// Every live job and the last finished ones.
pub struct Activity {
    registry: Mutex<Registry>,
    /// How many finished requests are kept.
    keep: usize,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    live: Vec<Arc<LiveJob>>,
    recent: VecDeque<RecentRequest>,
}

/// One job from its submission to its end.
pub struct LiveJob {
    /// Ours, in submission order (the engine's arrival number is learnt
    /// when it starts the job).
    pub id: u64,
    pub route: &'static str,
    pub arrived: Instant,
    /// The job's cancel flag: how its stream finds it.
    cancel: CancelFlag,
    /// A stream is writing this job's events to its client.
    streaming: AtomicBool,
    /// When the stream last wrote, as microseconds after `arrived`, plus
    /// one (0: never).
    last_write: AtomicU64,
    progress: Mutex<Progress>,
}

/// What the job's events have said so far.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// The engine's arrival number, once it started the job.
    pub engine_job: Option<u64>,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub source: Option<PrefixSource>,
    /// Prompt tokens in the KV, of `prefill_total` (from the last chunk).
    pub prefill_done: u32,
    pub prefill_total: u32,
    /// From arrival to the first generated text.
    pub first_token: Option<Duration>,
}

/// A finished request, as the page lists it.
#[derive(Debug, Clone, Serialize)]
pub struct RecentRequest {
    pub id: u64,
    pub route: &'static str,
    /// `finished`, `failed`, `cancelled` (the client left) or `shutdown`.
    pub outcome: &'static str,
    /// Why generation ended, when it finished (`end_of_turn`,
    /// `max_tokens`, ...).
    pub finish: Option<&'static str>,
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub generated_tokens: u32,
    /// Prefix source (`none`, `live`, `ram`, `disk`), when it started.
    pub source: Option<&'static str>,
    pub ttft_secs: Option<f64>,
    pub total_secs: f64,
    /// Unix time it ended.
    pub ended_at: u64,
}

/// How a job ended, for [`Activity::end`].
pub struct Ending {
    pub outcome: &'static str,
    pub finish: Option<&'static str>,
    /// The engine's count, when it finished.
    pub usage: Option<Usage>,
}

impl Activity {
    pub fn new() -> Self {
        Self::with_capacity(RECENT_REQUESTS)
    }

    /// Keeping `keep` finished requests.
    pub fn with_capacity(keep: usize) -> Self {
        Self {
            registry: Mutex::new(Registry::default()),
            keep,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic elsewhere leaves the lists whole: keep using them.
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a job as it is submitted.
    pub fn begin(&self, route: &'static str, cancel: &CancelFlag) -> Arc<LiveJob> {
        let mut r = self.lock();
        let job = Arc::new(LiveJob {
            id: r.next_id,
            route,
            arrived: Instant::now(),
            cancel: cancel.clone(),
            streaming: AtomicBool::new(false),
            last_write: AtomicU64::new(0),
            progress: Mutex::new(Progress::default()),
        });
        r.next_id += 1;
        r.live.push(job.clone());
        job
    }

    /// The job ended: it leaves the live list for the recent ring.
    pub fn end(&self, job: &LiveJob, ending: Ending) {
        let p = job.progress();
        let usage = ending.usage.unwrap_or(Usage {
            prompt_tokens: p.prompt_tokens,
            cached_tokens: p.cached_tokens,
            completion_tokens: 0,
        });
        let record = RecentRequest {
            id: job.id,
            route: job.route,
            outcome: ending.outcome,
            finish: ending.finish,
            prompt_tokens: usage.prompt_tokens,
            cached_tokens: usage.cached_tokens,
            generated_tokens: usage.completion_tokens,
            source: p.source.map(PrefixSource::as_str),
            ttft_secs: p.first_token.map(|d| d.as_secs_f64()),
            total_secs: job.arrived.elapsed().as_secs_f64(),
            ended_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let mut r = self.lock();
        r.live.retain(|j| j.id != job.id);
        r.recent.push_front(record);
        r.recent.truncate(self.keep);
    }

    /// The live job whose cancel flag this is (a single job's stream).
    pub fn by_cancel(&self, cancel: &CancelFlag) -> Option<Arc<LiveJob>> {
        self.lock()
            .live
            .iter()
            .find(|j| j.cancel.same(cancel))
            .cloned()
    }

    /// The live job the engine numbered `engine_job` (the choices of a
    /// multi-choice stream, learnt from their `Started` events).
    pub fn by_engine_job(&self, engine_job: u64) -> Option<Arc<LiveJob>> {
        self.lock()
            .live
            .iter()
            .find(|j| j.progress().engine_job == Some(engine_job))
            .cloned()
    }

    /// The live jobs, in submission order.
    pub fn live(&self) -> Vec<Arc<LiveJob>> {
        self.lock().live.clone()
    }

    /// The finished requests, newest first.
    pub fn recent(&self) -> Vec<RecentRequest> {
        self.lock().recent.iter().cloned().collect()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl LiveJob {
    /// A copy of what its events said so far.
    pub fn progress(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Change its progress (called by the watcher, once per event).
    pub fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// A stream writes this job's events: from now on its writes count.
    pub fn streamed(&self) {
        self.streaming.store(true, Ordering::Relaxed);
    }

    /// The stream wrote something to the client (an event or a heartbeat)
    /// at `at`.
    pub fn wrote_at(&self, at: Instant) {
        let us = at.saturating_duration_since(self.arrived).as_micros() as u64;
        self.last_write.store(us + 1, Ordering::Relaxed);
    }

    pub fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Relaxed)
    }

    /// How long ago its stream last wrote; None when it never did (not
    /// streaming, or nothing written yet).
    pub fn since_last_write(&self, now: Instant) -> Option<Duration> {
        match self.last_write.load(Ordering::Relaxed) {
            0 => None,
            us => {
                let at = self.arrived + Duration::from_micros(us - 1);
                Some(now.saturating_duration_since(at))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(outcome: &'static str) -> Ending {
        Ending {
            outcome,
            finish: None,
            usage: None,
        }
    }

    #[test]
    fn a_job_moves_from_live_to_a_bounded_ring_newest_first() {
        let a = Activity::with_capacity(2);
        let flags: Vec<CancelFlag> = (0..3).map(|_| CancelFlag::default()).collect();
        let jobs: Vec<_> = flags.iter().map(|f| a.begin("messages", f)).collect();
        assert_eq!(a.live().len(), 3);
        jobs[1].update(|p| {
            p.prompt_tokens = 9;
            p.cached_tokens = 4;
        });
        for (j, outcome) in jobs.iter().zip(["finished", "cancelled", "failed"]) {
            a.end(j, ended(outcome));
        }
        assert!(a.live().is_empty());
        let recent = a.recent();
        assert_eq!(recent.len(), 2, "the oldest fell out of the ring");
        assert_eq!(
            (recent[0].outcome, recent[1].outcome),
            ("failed", "cancelled")
        );
        // Without usage (it never finished), the counts its events gave.
        assert_eq!((recent[1].prompt_tokens, recent[1].cached_tokens), (9, 4));
    }

    #[test]
    fn a_stream_finds_its_job_by_cancel_flag_or_engine_number() {
        let a = Activity::new();
        let (f1, f2) = (CancelFlag::default(), CancelFlag::default());
        let j1 = a.begin("chat_completions", &f1);
        let j2 = a.begin("chat_completions", &f2);
        assert_eq!(a.by_cancel(&f2).unwrap().id, j2.id);
        assert!(a.by_cancel(&CancelFlag::default()).is_none());
        j1.update(|p| p.engine_job = Some(7));
        assert_eq!(a.by_engine_job(7).unwrap().id, j1.id);
        assert!(a.by_engine_job(8).is_none());
    }

    #[test]
    fn the_last_write_is_measured_from_its_stamp() {
        let a = Activity::new();
        let j = a.begin("messages", &CancelFlag::default());
        let now = Instant::now();
        assert_eq!(j.since_last_write(now), None);
        j.wrote_at(j.arrived + Duration::from_millis(250));
        let later = j.arrived + Duration::from_millis(1250);
        let since = j.since_last_write(later).unwrap();
        assert!(
            since >= Duration::from_millis(999) && since <= Duration::from_millis(1001),
            "{since:?}"
        );
    }
}
