//! What the status page shows, in one serializable value.
//!
//! A snapshot is built on the async side from what is already shared: the
//! engine's counters and the status copy it refreshes after each step
//! (`engine/status.rs`), and the HTTP side's own record of each request
//! (`activity.rs`). Building one never asks the engine thread anything.

use std::sync::atomic::Ordering;
use std::time::Instant;

use serde::Serialize;

use crate::engine::status::{EngineStatus, SlotStatus, StoredSnapshot};
use crate::state::activity::{Activity, LiveJob, Progress, RecentRequest};
use crate::state::AppState;

/// Everything the page shows.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub server: ServerInfo,
    pub queue: QueueInfo,
    /// Every live request: queued, prefilling, decoding or preempted.
    pub requests: Vec<RequestView>,
    /// Every sequence of the unified KV, idle ones included.
    pub slots: Vec<SlotStatus>,
    /// The last finished requests, newest first.
    pub recent: Vec<RecentRequest>,
    /// The KV snapshots in RAM and on disk.
    pub stores: Vec<StoredSnapshot>,
}

/// The server and its model.
#[derive(Debug, Clone, Serialize)]
pub struct ServerInfo {
    pub model_id: String,
    /// The model's own description (architecture, size, quantization).
    pub model: String,
    pub model_path: String,
    pub n_ctx: u32,
    pub n_ctx_train: u32,
    pub n_params: u64,
    pub parallel: usize,
    pub kv_cells: usize,
    pub kv_used: usize,
    pub memory: Memory,
    /// The compiled-in backends (`cpu` when none).
    pub features: Vec<&'static str>,
    pub version: &'static str,
    pub started_at: u64,
    pub uptime_secs: u64,
    pub heartbeat_secs: f64,
    pub engine_alive: bool,
    pub steps: u64,
    pub last_step_rows: usize,
}

/// What the model and its context take, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    pub weights: u64,
    pub kv: u64,
    /// Compute and output buffers.
    pub buffers: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    /// Generation requests admitted and not yet answered in full.
    pub in_flight: usize,
    /// Jobs waiting for a sequence (submitted, or held by the engine).
    pub waiting: usize,
    pub running: usize,
}

/// One live request, as the page shows it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RequestView {
    pub id: u64,
    pub route: &'static str,
    /// `queued`, `prefill`, `decode` or `preempted`.
    pub phase: std::borrow::Cow<'static, str>,
    pub age_secs: f64,
    pub streaming: bool,
    /// Seconds since its stream last wrote to the client (None: nothing
    /// written yet, or not streaming).
    pub since_write_secs: Option<f64>,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    /// Where its reused prefix came from (`copy:2` when shared from
    /// sequence 2).
    pub source: String,
    pub prefill_done: usize,
    pub prefill_total: usize,
    pub generated_tokens: u32,
    pub tokens_per_second: f64,
    /// The sequence it runs on.
    pub slot: Option<usize>,
    pub ttft_secs: Option<f64>,
}

/// The compiled-in GPU backends.
fn features() -> Vec<&'static str> {
    let mut f = Vec::new();
    if cfg!(feature = "metal") {
        f.push("metal");
    }
    if cfg!(feature = "cuda") {
        f.push("cuda");
    }
    if cfg!(feature = "vulkan") {
        f.push("vulkan");
    }
    if f.is_empty() {
        f.push("cpu");
    }
    f
}

/// A snapshot of the server now.
pub fn build(state: &AppState, activity: &Activity) -> Snapshot {
    let engine = &state.engine;
    let stats = engine.stats();
    let status = engine.status();
    let model = engine.model();
    let now = Instant::now();
    let requests = activity
        .live()
        .iter()
        .map(|job| request_view(job, &status, now))
        .collect();
    let uptime = crate::api::unix_now().saturating_sub(state.started_at);
    Snapshot {
        server: ServerInfo {
            model_id: state.model_id.clone(),
            model: model.description(),
            model_path: model.path().to_string(),
            n_ctx: engine.n_ctx(),
            n_ctx_train: model.n_ctx_train(),
            n_params: model.n_params(),
            parallel: status.slots.len(),
            kv_cells: stats.kv_cells.load(Ordering::Relaxed),
            kv_used: stats.kv_used.load(Ordering::Relaxed),
            memory: Memory {
                weights: model.size_bytes(),
                kv: stats.kv_bytes.load(Ordering::Relaxed),
                buffers: stats.buffer_bytes.load(Ordering::Relaxed),
            },
            features: features(),
            version: env!("CARGO_PKG_VERSION"),
            started_at: state.started_at,
            uptime_secs: uptime,
            heartbeat_secs: state.heartbeat.as_secs_f64(),
            engine_alive: engine.is_alive(),
            steps: status.steps,
            last_step_rows: status.last_step_rows,
        },
        queue: QueueInfo {
            in_flight: state.service.admission.in_flight(),
            waiting: stats.queued.load(Ordering::Relaxed) + stats.waiting.load(Ordering::Relaxed),
            running: stats.running.load(Ordering::Relaxed),
        },
        requests,
        slots: status.slots.clone(),
        recent: activity.recent(),
        stores: status.stores.clone(),
    }
}

fn request_view(job: &LiveJob, status: &EngineStatus, now: Instant) -> RequestView {
    let progress = job.progress();
    let mut view = merge(&progress, status);
    view.id = job.id;
    view.route = job.route;
    view.age_secs = round2(now.saturating_duration_since(job.arrived).as_secs_f64());
    view.streaming = job.is_streaming();
    view.since_write_secs = job.since_last_write(now).map(|d| round2(d.as_secs_f64()));
    view
}

/// A job's phase and counts: the engine's copy of its sequence when that
/// holds it (it is at most one step old), else what its events said.
pub fn merge(p: &Progress, status: &EngineStatus) -> RequestView {
    let mut view = RequestView {
        prompt_tokens: p.prompt_tokens as usize,
        cached_tokens: p.cached_tokens as usize,
        source: p.source.map(|s| s.as_str()).unwrap_or("").to_string(),
        prefill_done: p.prefill_done as usize,
        prefill_total: p.prefill_total as usize,
        ttft_secs: p.first_token.map(|d| round2(d.as_secs_f64())),
        ..RequestView::default()
    };
    let Some(job) = p.engine_job else {
        view.phase = "queued".into();
        return view;
    };
    let running = status.slots.iter().find(|s| s.job == Some(job));
    let preempted = status.preempted.iter().find(|s| s.job == Some(job));
    match running.or(preempted) {
        Some(s) => {
            view.phase = s.state.clone();
            view.slot = running.map(|s| s.id);
            view.prompt_tokens = s.prompt_tokens;
            view.cached_tokens = s.cached_tokens;
            view.source = s.prefix.clone();
            view.prefill_done = s.prefilled_tokens;
            view.prefill_total = s.prompt_tokens;
            view.generated_tokens = s.generated_tokens;
            view.tokens_per_second = s.tokens_per_second;
        }
        // Started after the engine's last copy, or just ended.
        None => {
            view.phase = if p.first_token.is_some() {
                "decode".into()
            } else {
                "prefill".into()
            };
            if view.prefill_total == 0 {
                // No chunk done yet: what was reused is all there is.
                view.prefill_total = view.prompt_tokens;
                view.prefill_done = view.cached_tokens;
            }
        }
    }
    view
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PrefixSource;

    fn slot(id: usize, job: u64, state: &'static str) -> SlotStatus {
        SlotStatus {
            id,
            job: Some(job),
            state: state.into(),
            prompt_tokens: 1000,
            cached_tokens: 200,
            prefix: "copy:1".into(),
            prefilled_tokens: 600,
            ..SlotStatus::default()
        }
    }

    #[test]
    fn a_queued_job_has_no_sequence() {
        let v = merge(&Progress::default(), &EngineStatus::default());
        assert_eq!((v.phase.as_ref(), v.slot), ("queued", None));
    }

    #[test]
    fn the_engines_copy_wins_over_the_events() {
        let p = Progress {
            engine_job: Some(5),
            prompt_tokens: 1000,
            cached_tokens: 200,
            source: Some(PrefixSource::Live),
            prefill_done: 200,
            prefill_total: 1000,
            first_token: None,
        };
        let status = EngineStatus {
            slots: vec![slot(0, 4, "decode"), slot(1, 5, "prefill")],
            ..EngineStatus::default()
        };
        let v = merge(&p, &status);
        assert_eq!(
            (v.phase.as_ref(), v.slot, v.prefill_done, v.source.as_str()),
            ("prefill", Some(1), 600, "copy:1")
        );
        // Preempted: no sequence of its own.
        let status = EngineStatus {
            preempted: vec![slot(0, 5, "preempted")],
            ..EngineStatus::default()
        };
        assert_eq!(merge(&p, &status).phase, "preempted");
        assert_eq!(merge(&p, &status).slot, None);
        // Not in the copy yet: the events say where it is.
        let v = merge(&p, &EngineStatus::default());
        assert_eq!(
            (v.phase.as_ref(), v.prefill_done, v.source.as_str()),
            ("prefill", 200, "live")
        );
        let before_any_chunk = Progress {
            prefill_done: 0,
            prefill_total: 0,
            ..p.clone()
        };
        let v = merge(&before_any_chunk, &EngineStatus::default());
        assert_eq!((v.prefill_done, v.prefill_total), (200, 1000));
    }
}
