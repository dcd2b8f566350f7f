//! What llama.cpp's compute calls back into, and the watchdog beside it.
//!
//! The abort callback runs after every graph node on a compute thread. It
//! aborts a step only when every request with rows in it has been
//! cancelled (another request's rows must not be thrown away because one
//! client left), and it is where injected faults stall or fail the step
//! (`HEARTH_FAULT`): the whole batch stalls, as a hung kernel would stall it.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::warn;

use super::CancelFlag;

/// State the abort callback reads from inside llama.cpp's compute. Plain
/// std mutexes: the callback runs on a compute thread, never in async code,
/// and each lock is held for a few instructions.
#[derive(Default)]
pub(super) struct AbortHook {
    /// The cancel flags of the requests with rows in the running step.
    step: Mutex<Vec<CancelFlag>>,
    /// A stall armed for the next graph compute (fault injection).
    stall: Mutex<Option<Duration>>,
    /// A failure armed for the next graph compute (fault injection).
    fail: Mutex<bool>,
    /// A process abort armed for the next graph compute (fault injection).
    abort: std::sync::atomic::AtomicBool,
}

impl AbortHook {
    pub fn should_abort(&self) -> bool {
        if self.abort.load(Ordering::Relaxed) {
            // What llama.cpp does on GGML_ABORT, a backend out of memory or
            // a remote worker gone: the whole process ends, here.
            tracing::error!("injected fault: the engine process aborts inside compute");
            std::process::abort();
        }
        if self
            .fail
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or(false)
        {
            return true;
        }
        let stall = self.stall.lock().ok().and_then(|mut s| s.take());
        if let Some(stall) = stall {
            // The injected fault: compute goes quiet, as a hung kernel or a
            // slow memory wait would. Only cancellation ends it early.
            let until = Instant::now() + stall;
            while Instant::now() < until {
                if self.all_cancelled() || super::exit::exiting() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10).min(until - Instant::now()));
            }
        }
        self.all_cancelled()
    }

    /// Every request in the step has been cancelled (none: false).
    pub fn all_cancelled(&self) -> bool {
        self.step
            .lock()
            .map(|s| !s.is_empty() && s.iter().all(CancelFlag::is_cancelled))
            .unwrap_or(false)
    }

    pub fn arm_stall(&self, stall: Duration) {
        if let Ok(mut s) = self.stall.lock() {
            *s = Some(stall);
        }
    }

    pub fn arm_abort(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }

    pub fn arm_failure(&self) {
        if let Ok(mut f) = self.fail.lock() {
            *f = true;
        }
    }

    /// The requests of the step about to run; empty between steps (and
    /// any armed fault is dropped).
    pub fn set_step(&self, flags: Vec<CancelFlag>) {
        let clear = flags.is_empty();
        if let Ok(mut s) = self.step.lock() {
            *s = flags;
        }
        if clear {
            if let Ok(mut s) = self.stall.lock() {
                *s = None;
            }
            if let Ok(mut f) = self.fail.lock() {
                *f = false;
            }
        }
    }
}

/// What the engine's last step was doing, as the watchdog reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum StepPhase {
    /// No step is running: silence is not a stall.
    Idle = 0,
    /// The step carried prompt rows.
    Prefill = 1,
    /// The step carried only decode rows (and drafts).
    Decode = 2,
}

impl StepPhase {
    fn from_u8(v: u8) -> StepPhase {
        match v {
            1 => StepPhase::Prefill,
            2 => StepPhase::Decode,
            _ => StepPhase::Idle,
        }
    }

    fn name(self) -> &'static str {
        match self {
            StepPhase::Idle => "idle",
            StepPhase::Prefill => "prefill",
            StepPhase::Decode => "decode",
        }
    }
}

/// What the engine is doing, for the watchdog.
#[derive(Default)]
pub(super) struct Progress {
    /// A [`StepPhase`], stored as its `u8` so the watchdog thread reads it
    /// without a lock.
    phase: AtomicU8,
    /// Rows of the last step.
    rows: AtomicUsize,
    /// Milliseconds since `epoch` of the last completed step.
    last_ms: AtomicU64,
}

/// A step that makes no progress for this long gets a warning line.
const WATCHDOG_AFTER: Duration = Duration::from_secs(30);

impl Progress {
    pub fn touch(&self, epoch: Instant, phase: StepPhase, rows: usize) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.rows.store(rows, Ordering::Relaxed);
        self.last_ms
            .store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn idle(&self) {
        self.phase.store(StepPhase::Idle as u8, Ordering::Relaxed);
    }
}

pub(super) fn spawn_watchdog(progress: Arc<Progress>, epoch: Instant) {
    let _ = std::thread::Builder::new()
        .name("hearth-watchdog".into())
        .spawn(move || {
            let mut warned_at = 0u64;
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let phase = StepPhase::from_u8(progress.phase.load(Ordering::Relaxed));
                if phase == StepPhase::Idle {
                    continue;
                }
                let last = progress.last_ms.load(Ordering::Relaxed);
                let stalled = (epoch.elapsed().as_millis() as u64).saturating_sub(last);
                // Warn once per 30 s of silence, again if it goes on.
                if stalled >= WATCHDOG_AFTER.as_millis() as u64 && stalled / 30_000 != warned_at {
                    warned_at = stalled / 30_000;
                    warn!(
                        phase = phase.name(),
                        rows = progress.rows.load(Ordering::Relaxed),
                        stalled_secs = stalled / 1000,
                        "watchdog: the engine step has made no progress"
                    );
                } else if stalled < WATCHDOG_AFTER.as_millis() as u64 {
                    warned_at = 0;
                }
            }
        });
}
