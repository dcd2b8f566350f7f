//! `GET /metrics`: counters and histograms in Prometheus' text format.
//!
//! Hand-written rather than a metrics crate: there are a dozen series, every
//! label value comes from a fixed set in this crate (so nothing needs
//! escaping and cardinality is bounded), and the text format is a few lines
//! per series. Counters are atomics; the two labelled request tables sit
//! behind std mutexes held for one map update (never across an await).
//! Gauges that live elsewhere (queue depth, requests in flight) are read at
//! scrape time and passed to [`Metrics::render`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::engine::PrefixSource;

/// How a submitted generation ended, as seen from the HTTP side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// The engine finished it.
    Finished,
    /// The engine reported an error.
    Failed,
    /// The client left before the end.
    Cancelled,
    /// Ended by a shutdown past its grace period.
    Shutdown,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
            Outcome::Shutdown => "shutdown",
        }
    }
}

/// The label for a request path: known routes by name, the rest as
/// `other`, so a scanner probing random paths cannot grow the table.
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat_completions",
        "/v1/messages" => "messages",
        "/v1/messages/count_tokens" => "count_tokens",
        "/v1/completions" => "completions",
        "/v1/responses" => "responses",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        _ => "other",
    }
}

const SOURCES: [PrefixSource; 4] = [
    PrefixSource::None,
    PrefixSource::Live,
    PrefixSource::Ram,
    PrefixSource::Disk,
];

fn source_index(source: PrefixSource) -> usize {
    SOURCES.iter().position(|s| *s == source).unwrap_or(0)
}

/// Every series the server exports.
pub struct Metrics {
    /// (route, HTTP status) -> responses.
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    /// (route, outcome) -> generations submitted to the engine.
    generations: Mutex<BTreeMap<(&'static str, Outcome), u64>>,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Jobs by where their reused prefix came from (index: `SOURCES`).
    prefix_jobs: [AtomicU64; 4],
    /// Prompt tokens reused, by source.
    prefix_tokens: [AtomicU64; 4],
    heartbeats: AtomicU64,
    time_to_first_token: Histogram,
    prefill_tps: Histogram,
    decode_tps: Histogram,
    heartbeats_per_stream: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        const SECONDS: &[f64] = &[
            0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
        ];
        const RATES: &[f64] = &[
            1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        ];
        const BEATS: &[f64] = &[0.0, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 500.0];
        Self {
            requests: Mutex::default(),
            generations: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            cached_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            prefix_jobs: Default::default(),
            prefix_tokens: Default::default(),
            heartbeats: AtomicU64::new(0),
            time_to_first_token: Histogram::new(SECONDS),
            prefill_tps: Histogram::new(RATES),
            decode_tps: Histogram::new(RATES),
            heartbeats_per_stream: Histogram::new(BEATS),
        }
    }

    /// A response went out (its status is known once headers are written).
    pub fn request(&self, route: &'static str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((route, status)).or_default() += 1;
        }
    }

    /// The engine picked a job up and reused `cached` tokens from `source`.
    pub fn started(&self, cached: u32, source: PrefixSource) {
        let i = source_index(source);
        self.prefix_jobs[i].fetch_add(1, Ordering::Relaxed);
        self.prefix_tokens[i].fetch_add(cached as u64, Ordering::Relaxed);
    }

    pub fn first_token(&self, after: Duration) {
        self.time_to_first_token.observe(after.as_secs_f64());
    }

    /// A job ended; `usage` and speeds only when the engine finished it.
    pub fn finished(
        &self,
        route: &'static str,
        outcome: Outcome,
        done: Option<(crate::engine::Usage, crate::engine::Timings)>,
    ) {
        if let Ok(mut m) = self.generations.lock() {
            *m.entry((route, outcome)).or_default() += 1;
        }
        let Some((usage, timings)) = done else { return };
        self.prompt_tokens
            .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(usage.cached_tokens as u64, Ordering::Relaxed);
        self.generated_tokens
            .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
        let prefilled = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
        if prefilled > 0 && !timings.prefill.is_zero() {
            self.prefill_tps
                .observe(prefilled as f64 / timings.prefill.as_secs_f64());
        }
        if usage.completion_tokens > 1 && !timings.decode.is_zero() {
            self.decode_tps
                .observe(usage.completion_tokens as f64 / timings.decode.as_secs_f64());
        }
    }

    /// A stream wrote a heartbeat.
    pub fn heartbeat(&self) {
        self.heartbeats.fetch_add(1, Ordering::Relaxed);
    }

    /// A stream ended after writing `beats` heartbeats.
    pub fn stream_ended(&self, beats: u64) {
        self.heartbeats_per_stream.observe(beats as f64);
    }

    /// The whole exposition. `gauges` are (name, help, value) read by the
    /// caller at scrape time.
    /// `gauges` are values read at render time; names ending in `_total`
    /// are typed as counters.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(4096);
        for (name, help, value) in gauges {
            header(
                &mut out,
                name,
                help,
                if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                },
            );
            let _ = writeln!(out, "{name} {value}");
        }
        header(
            &mut out,
            "hearth_requests_total",
            "HTTP responses by route and status code.",
            "counter",
        );
        if let Ok(m) = self.requests.lock() {
            for ((route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "hearth_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        header(
            &mut out,
            "hearth_generations_total",
            "Generations submitted to the engine, by route and how they ended (cancelled: the client left).",
            "counter",
        );
        if let Ok(m) = self.generations.lock() {
            for ((route, outcome), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "hearth_generations_total{{route=\"{route}\",outcome=\"{}\"}} {n}",
                    outcome.as_str()
                );
            }
        }
        let counters = [
            (
                "hearth_prompt_tokens_total",
                "Prompt tokens of finished generations.",
                &self.prompt_tokens,
            ),
            (
                "hearth_cached_prompt_tokens_total",
                "Prompt tokens reused from the KV cache.",
                &self.cached_tokens,
            ),
            (
                "hearth_generated_tokens_total",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "hearth_heartbeats_total",
                "Heartbeats written on streams.",
                &self.heartbeats,
            ),
        ];
        for (name, help, v) in counters {
            header(&mut out, name, help, "counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        header(
            &mut out,
            "hearth_cache_lookups_total",
            "Jobs by where their reused prompt prefix came from.",
            "counter",
        );
        for (i, s) in SOURCES.iter().enumerate() {
            let _ = writeln!(
                out,
                "hearth_cache_lookups_total{{source=\"{}\"}} {}",
                s.as_str(),
                self.prefix_jobs[i].load(Ordering::Relaxed)
            );
        }
        header(
            &mut out,
            "hearth_cache_reused_tokens_total",
            "Prompt tokens reused, by source.",
            "counter",
        );
        for (i, s) in SOURCES.iter().enumerate() {
            let _ = writeln!(
                out,
                "hearth_cache_reused_tokens_total{{source=\"{}\"}} {}",
                s.as_str(),
                self.prefix_tokens[i].load(Ordering::Relaxed)
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "hearth_time_to_first_token_seconds",
            "From queueing a job to its first generated text.",
        );
        self.prefill_tps.render(
            &mut out,
            "hearth_prefill_tokens_per_second",
            "Prefill speed of each job (uncached tokens).",
        );
        self.decode_tps.render(
            &mut out,
            "hearth_decode_tokens_per_second",
            "Decode speed of each job.",
        );
        self.heartbeats_per_stream.render(
            &mut out,
            "hearth_stream_heartbeats",
            "Heartbeats written per streamed response.",
        );
        out
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A fixed-bucket histogram of atomics.
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; one more than `bounds` for +Inf.
    counts: Vec<AtomicU64>,
    /// The sum of observations, as f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            match self.bounds.get(i) {
                Some(b) => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
                }
                None => {
                    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(
            out,
            "{name}_sum {}",
            f64::from_bits(self.sum.load(Ordering::Relaxed))
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{Timings, Usage};

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.request("messages", 200);
        m.request("messages", 529);
        m.request("messages", 200);
        m.started(40, PrefixSource::Live);
        m.first_token(Duration::from_millis(300));
        let usage = Usage {
            prompt_tokens: 100,
            cached_tokens: 40,
            completion_tokens: 11,
        };
        let timings = Timings {
            prefill: Duration::from_millis(600),
            decode: Duration::from_millis(500),
        };
        m.finished("messages", Outcome::Finished, Some((usage, timings)));
        m.finished("messages", Outcome::Cancelled, None);
        m.heartbeat();
        m.stream_ended(1);
        let text = m.render(&[("hearth_queue_depth", "Jobs waiting.", 3.0)]);
        for line in [
            "hearth_queue_depth 3",
            "hearth_requests_total{route=\"messages\",status=\"200\"} 2",
            "hearth_requests_total{route=\"messages\",status=\"529\"} 1",
            "hearth_generations_total{route=\"messages\",outcome=\"finished\"} 1",
            "hearth_generations_total{route=\"messages\",outcome=\"cancelled\"} 1",
            "hearth_prompt_tokens_total 100",
            "hearth_cached_prompt_tokens_total 40",
            "hearth_generated_tokens_total 11",
            "hearth_cache_lookups_total{source=\"live\"} 1",
            "hearth_cache_reused_tokens_total{source=\"live\"} 40",
            "hearth_time_to_first_token_seconds_bucket{le=\"0.25\"} 0",
            "hearth_time_to_first_token_seconds_bucket{le=\"0.5\"} 1",
            "hearth_time_to_first_token_seconds_bucket{le=\"+Inf\"} 1",
            "hearth_time_to_first_token_seconds_count 1",
            "hearth_prefill_tokens_per_second_bucket{le=\"100\"} 1",
            "hearth_decode_tokens_per_second_bucket{le=\"25\"} 1",
            "hearth_heartbeats_total 1",
            "hearth_stream_heartbeats_bucket{le=\"1\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing `{line}` in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` with a numeric value.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{l}");
        }
    }

    #[test]
    fn unknown_paths_share_one_label() {
        assert_eq!(route_label("/v1/messages"), "messages");
        assert_eq!(route_label("/wp-admin/x.php"), "other");
    }
}
