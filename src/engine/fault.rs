//! Fault injection, from the hidden environment variable `HEARTH_FAULT`.
//!
//! The faults stall *inside* llama.cpp's graph compute (in the abort
//! callback, which its CPU backend calls after every graph node), so tests
//! reproduce the failure this server exists to survive: compute that goes
//! quiet while a client waits. A stalled request that is cancelled stops
//! stalling at once.

use std::time::Duration;

/// Where the stall happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Inside the second prefill chunk (the first when there is only one).
    PrefillStall,
    /// Inside the fifth decode step.
    DecodeStall,
    /// The fifth decode step's compute fails (aborts with no client gone):
    /// how an engine error looks to the rest of the server.
    DecodeError,
    /// The engine step that samples the request's fifth token panics (a
    /// bug in the step): the step's requests fail, the engine goes on.
    StepPanic,
    /// The engine thread panics outside any step when it takes the
    /// request: the engine is gone, `/health` says so.
    EnginePanic,
    /// The engine process aborts (`abort()`, as llama.cpp's own asserts
    /// do) inside the compute of the fifth decode step.
    EngineAbort,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultPlan {
    pub kind: FaultKind,
    pub stall: Duration,
    /// Only the first `count` requests the server receives are affected.
    pub count: Option<u64>,
}

impl FaultPlan {
    /// Parse `prefill_stall:SECS[:COUNT]`, `decode_stall:SECS[:COUNT]`,
    /// `decode_error[:COUNT]`, `step_panic[:COUNT]`, `engine_panic` or `engine_abort[:COUNT]`.
    pub fn parse(spec: &str) -> Result<FaultPlan, String> {
        let spec = spec.trim();
        for (name, kind) in [
            ("decode_error", FaultKind::DecodeError),
            ("step_panic", FaultKind::StepPanic),
            ("engine_panic", FaultKind::EnginePanic),
            ("engine_abort", FaultKind::EngineAbort),
        ] {
            let Some(rest) = spec.strip_prefix(name) else {
                continue;
            };
            let count = match rest.strip_prefix(':') {
                Some(c) => Some(
                    c.parse::<u64>()
                        .map_err(|_| "count must be a whole number".to_string())?,
                ),
                None if rest.is_empty() => None,
                None => return Err(format!("unknown fault {spec:?}")),
            };
            return Ok(FaultPlan {
                kind,
                stall: Duration::ZERO,
                count,
            });
        }
        let mut parts = spec.split(':');
        let kind = match parts.next() {
            Some("prefill_stall") => FaultKind::PrefillStall,
            Some("decode_stall") => FaultKind::DecodeStall,
            other => return Err(format!("unknown fault {:?}", other.unwrap_or(""))),
        };
        let secs: f64 = parts
            .next()
            .ok_or("missing seconds")?
            .parse()
            .map_err(|_| "seconds must be a number".to_string())?;
        if !(0.0..=86_400.0).contains(&secs) {
            return Err("seconds out of range".into());
        }
        let count = match parts.next() {
            Some(c) => Some(
                c.parse::<u64>()
                    .map_err(|_| "count must be a whole number".to_string())?,
            ),
            None => None,
        };
        if parts.next().is_some() {
            return Err("too many fields".into());
        }
        Ok(FaultPlan {
            kind,
            stall: Duration::from_secs_f64(secs),
            count,
        })
    }

    /// Read `HEARTH_FAULT`; a malformed value is an error, not ignored.
    pub fn from_env() -> Result<Option<FaultPlan>, String> {
        match std::env::var("HEARTH_FAULT") {
            Ok(v) if !v.trim().is_empty() => FaultPlan::parse(&v).map(Some),
            _ => Ok(None),
        }
    }

    /// Whether the request with arrival number `arrival` (from 0) is affected.
    pub fn applies_to(&self, arrival: u64) -> bool {
        self.count.is_none_or(|c| arrival < c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let p = FaultPlan::parse("prefill_stall:12").unwrap();
        assert_eq!(p.kind, FaultKind::PrefillStall);
        assert_eq!(p.stall, Duration::from_secs(12));
        assert!(p.applies_to(1_000));
        let d = FaultPlan::parse("decode_stall:0.5:2").unwrap();
        assert_eq!(d.kind, FaultKind::DecodeStall);
        assert_eq!(d.stall, Duration::from_millis(500));
        assert!(d.applies_to(1) && !d.applies_to(2));
    }

    #[test]
    fn parses_decode_error() {
        let e = FaultPlan::parse("decode_error:1").unwrap();
        assert_eq!(e.kind, FaultKind::DecodeError);
        assert!(e.applies_to(0) && !e.applies_to(1));
        assert_eq!(FaultPlan::parse("decode_error").unwrap().count, None);
        assert!(FaultPlan::parse("decode_errorx").is_err());
        assert!(FaultPlan::parse("decode_error:x").is_err());
        assert_eq!(
            FaultPlan::parse("step_panic:2").unwrap().kind,
            FaultKind::StepPanic
        );
        let abort = FaultPlan::parse("engine_abort:1").unwrap();
        assert_eq!(abort.kind, FaultKind::EngineAbort);
        assert!(abort.applies_to(0) && !abort.applies_to(1));
        assert_eq!(
            FaultPlan::parse("engine_panic").unwrap().kind,
            FaultKind::EnginePanic
        );
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "stall:1",
            "prefill_stall",
            "prefill_stall:x",
            "prefill_stall:1:y",
            "prefill_stall:1:2:3",
            "decode_stall:-1",
        ] {
            assert!(FaultPlan::parse(bad).is_err(), "{bad}");
        }
    }
}
