//! What every handler and middleware shares: the engine handle, the chat
//! setup of the loaded model, the stores of recent replies, and running it
//! as a service (keys, limits, admission, shutdown, metrics, trace).
//!
//! A leaf of the crate: it names the engine's, the chat layer's and the
//! service's types, and nothing of the HTTP layer above it, so `api/` and
//! `server` both build on it without importing each other. Each type it
//! holds that belongs to no lower layer (API keys, the admission count,
//! the Responses store) lives beside it here.

pub mod activity;
pub mod admission;
pub mod keys;
pub mod responses;

use std::sync::Arc;
use std::time::Duration;

use crate::chat::prompt::SpecialTexts;
use crate::chat::replay::ReplayStore;
use crate::chat::template::ChatTemplate;
use crate::chat::tools::ToolFormat;
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::shutdown::Shutdown;
use crate::trace::TraceLog;
use activity::Activity;
use admission::Admission;
use keys::ApiKeys;
use responses::ResponseStore;

/// What every handler shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub template: ChatTemplate,
    /// The tool-call markup this model writes.
    pub tool_format: ToolFormat,
    /// The vocabulary's control-token texts, kept out of client text.
    pub specials: SpecialTexts,
    /// The exact text of recent tool-calling replies, by call id.
    /// Arc: streams hold it after their handler returned.
    pub replay: Arc<ReplayStore>,
    /// Recent Responses API responses, for `previous_response_id`.
    pub responses: ResponseStore,
    /// The id `/v1/models` reports.
    pub model_id: String,
    /// Written when nothing else was for this long on a stream.
    pub heartbeat: Duration,
    /// Unix time the server started.
    pub started_at: u64,
    /// OpenAI's `system_fingerprint`: identifies model and build.
    pub fingerprint: String,
    /// Keep Claude Code's volatile billing line in system prompts (it
    /// changes every request and would defeat prefix caching).
    pub keep_billing_header: bool,
    /// Running it as a service: access, limits, admission, shutdown,
    /// metrics, trace.
    pub service: ServiceState,
}

/// What the middleware and the streams share, besides the engine.
pub struct ServiceState {
    /// None: no key is required.
    pub api_keys: Option<ApiKeys>,
    pub limits: Limits,
    /// Places in the generation queue.
    pub admission: Admission,
    pub shutdown: Shutdown,
    /// Arc: streams hold it after their handler returned.
    pub metrics: Arc<Metrics>,
    pub trace: Option<Arc<TraceLog>>,
    /// What the status page shows of each request; None: `--no-ui`.
    pub activity: Option<Arc<Activity>>,
}

impl ServiceState {
    /// An open server with default limits (tests).
    pub fn new(max_queue: usize) -> Self {
        Self {
            api_keys: None,
            limits: Limits::default(),
            admission: Admission::new(max_queue, 1),
            shutdown: Shutdown::new(),
            metrics: Arc::new(Metrics::new()),
            trace: None,
            activity: None,
        }
    }
}

/// Bounds on what one request may ask of the server.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// For the headers of a request, and again for its body.
    pub read_timeout: Duration,
    /// The largest `max_tokens` a request may ask for (None: the context).
    pub max_tokens: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 << 20,
            read_timeout: Duration::from_secs(30),
            max_tokens: None,
        }
    }
}
