//! CPU threads for compute: llama.cpp's own thread pools, and how many
//! threads each engine step gets.
//!
//! A graph is hundreds of operations, each ending at a barrier where every
//! compute thread waits, spinning, for the slowest one. On a machine whose
//! cores are also running a build or a test suite, a compute thread the OS
//! has set aside holds the others at the barrier for its whole time slice,
//! so one thread per core, the right count on a quiet machine, becomes the
//! slowest choice on a busy one (measured on two cores beside other work:
//! decode at 1.3 t/s on two threads against 16 t/s on one, and prefill at
//! a quarter of one thread's speed). So:
//!
//! - every step gets as many threads as the machine has cores free of
//!   other processes' work, measured from `/proc/stat` less this process's
//!   own CPU time, re-read every half second while steps run and changed
//!   with some hysteresis ([`choose_threads`]);
//! - either count can be fixed by the user: `--threads` for decode-only
//!   steps (one row per sequence, and drafts), `--threads-batch` for steps
//!   with prompt rows.
//!
//! llama.cpp is built without OpenMP, whose worker threads spin between
//! graphs and cannot be told how many to use per step cheaply; its own pool
//! (`ggml_threadpool`) sleeps on a condition variable after `poll` rounds of
//! spinning. One pool per thread count is made when first used
//! ([`ThreadPools`]); the pool a step does not use is paused, so its threads
//! sleep instead of spinning beside the one that works.

use std::ptr::NonNull;
use std::time::{Duration, Instant};

use llama_cpp_sys_2 as sys;

/// ggml's `GGML_MAX_N_THREADS`: the most threads a pool may have.
const MAX_POOL_THREADS: usize = 512;

/// How often the machine's load is re-read while steps run.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// How long the first reading, at start, watches the machine.
const FIRST_READING: Duration = Duration::from_millis(200);

/// The cores this process may run on.
pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(4)
}

/// The thread count for a machine whose other processes keep
/// `others` cores busy, out of `cores`, when `current` threads are in use.
/// One thread per free core, rounded so that a core more than half busy
/// counts as taken; a thread is added once the machine has a core free to a
/// quarter, and taken away once it is half short of one, so a load near a
/// boundary does not flip the count every sample.
pub fn choose_threads(cores: usize, others: f64, current: usize) -> usize {
    let cores = cores.max(1);
    let free = cores as f64 - others.max(0.0);
    let fit = |margin: f64| ((free + margin).floor().max(1.0) as usize).min(cores);
    let up = fit(0.25);
    if up > current {
        return up;
    }
    let keep = fit(0.5);
    if keep < current {
        return keep;
    }
    current.clamp(1, cores)
}

/// Busy and total clock ticks of all CPUs, and how many CPUs, from the text
/// of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64, usize)> {
    let first = text.lines().next()?;
    let mut fields = first.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields.map_while(|f| f.parse().ok()).collect();
    if ticks.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal guest guest_nice:
    // guest time is already counted in user and nice.
    let total: u64 = ticks.iter().take(8).sum();
    let idle = ticks[3] + ticks.get(4).copied().unwrap_or(0);
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    Some((total - idle.min(total), total, cpus.max(1)))
}

/// User plus system clock ticks of a process, from the text of its
/// `/proc/<pid>/stat` (the fields after the parenthesised command name,
/// which may itself hold spaces and parentheses).
pub fn parse_own_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is rest[0]; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU time counters at one moment, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuSample {
    /// Ticks all CPUs spent busy.
    pub busy: u64,
    /// Ticks all CPUs spent in all.
    pub total: u64,
    /// CPUs the counters cover.
    pub cpus: usize,
    /// Ticks this process spent (all its threads).
    pub own: u64,
}

impl CpuSample {
    /// Read the counters now (None where `/proc` is not there).
    pub fn read() -> Option<CpuSample> {
        let (busy, total, cpus) = parse_proc_stat(&std::fs::read_to_string("/proc/stat").ok()?)?;
        let own = parse_own_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        Some(CpuSample {
            busy,
            total,
            cpus,
            own,
        })
    }

    /// Cores other processes kept busy between `earlier` and `self`.
    pub fn others_since(&self, earlier: &CpuSample) -> Option<f64> {
        let total = self.total.checked_sub(earlier.total)?;
        if total == 0 {
            return None;
        }
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let own = self.own.saturating_sub(earlier.own) as f64;
        let per_cpu = total as f64 / self.cpus as f64;
        Some(((busy - own) / per_cpu).max(0.0))
    }
}

/// Which thread counts the steps get: fixed by the user, or chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadSettings {
    /// Threads for decode-only steps (0: from the machine's load).
    pub decode: u32,
    /// Threads for steps with prompt rows (0: from the machine's load).
    pub batch: u32,
    /// Rounds a pool's idle threads spin for new work before they sleep
    /// (llama.cpp's poll level, 0-100; 0: sleep at once).
    pub poll: u32,
}

/// The default poll level: idle threads sleep at once. Measured on a
/// two-core machine, spinning between graphs bought nothing quiet and cost
/// a core's worth of time beside other work.
pub const DEFAULT_POLL: u32 = 0;

impl Default for ThreadSettings {
    fn default() -> Self {
        ThreadSettings {
            decode: 0,
            batch: 0,
            poll: DEFAULT_POLL,
        }
    }
}

/// The engine's running choice of thread counts.
#[derive(Debug)]
pub struct ThreadPolicy {
    settings: ThreadSettings,
    cores: usize,
    /// The count the machine's load calls for now.
    chosen: usize,
    /// The last load reading and when it was taken.
    sample: Option<(Instant, CpuSample)>,
    /// Cores other processes kept busy over the last reading.
    others: f64,
}

impl ThreadPolicy {
    pub fn new(settings: ThreadSettings, cores: usize) -> ThreadPolicy {
        let cores = cores.max(1);
        let mut policy = ThreadPolicy {
            settings,
            cores,
            chosen: cores,
            sample: CpuSample::read().map(|s| (Instant::now(), s)),
            others: 0.0,
        };
        if settings.decode == 0 || settings.batch == 0 {
            // A first reading before the first step: on a busy machine
            // every core's worth of threads could make that step (and the
            // wait for the next reading) a hundred times slower.
            std::thread::sleep(FIRST_READING);
            policy.read_load();
        }
        policy
    }

    /// Threads for a step with `prefill_rows` prompt rows in it (0: a
    /// decode-only step). Re-reads the machine's load now and then where
    /// a count follows it.
    pub fn for_step(&mut self, prefill_rows: usize) -> usize {
        let fixed = if prefill_rows > 0 {
            self.settings.batch
        } else {
            self.settings.decode
        };
        if fixed > 0 {
            return fixed as usize;
        }
        self.follow_load();
        self.chosen
    }

    /// Threads decode-only steps use now.
    pub fn decode(&self) -> usize {
        Self::or(self.settings.decode, self.chosen)
    }

    /// Threads steps with prompt rows use now.
    pub fn batch(&self) -> usize {
        Self::or(self.settings.batch, self.chosen)
    }

    fn or(fixed: u32, chosen: usize) -> usize {
        match fixed {
            0 => chosen,
            n => n as usize,
        }
    }

    /// Cores other processes kept busy at the last reading.
    pub fn others(&self) -> f64 {
        self.others
    }

    fn follow_load(&mut self) {
        if self
            .sample
            .is_some_and(|(at, _)| at.elapsed() >= SAMPLE_EVERY)
        {
            self.read_load();
        }
    }

    fn read_load(&mut self) {
        let Some((_, earlier)) = self.sample else {
            return;
        };
        let Some(now) = CpuSample::read() else {
            return;
        };
        if let Some(others) = now.others_since(&earlier) {
            self.others = others;
            self.chosen = choose_threads(self.cores, others, self.chosen);
        }
        self.sample = Some((Instant::now(), now));
    }
}

/// llama.cpp thread pools, one per thread count, made when first asked for;
/// the one attached to a context computes its graphs.
pub struct ThreadPools {
    poll: u32,
    pools: Vec<(usize, NonNull<sys::ggml_threadpool>)>,
    /// The thread count of the pool attached now.
    active: Option<usize>,
}

// SAFETY: the pools are plain heap objects plus their own threads; they are
// used by one thread at a time (the one that owns the context they are
// attached to), never shared.
unsafe impl Send for ThreadPools {}

impl ThreadPools {
    pub fn new(poll: u32) -> ThreadPools {
        ThreadPools {
            poll: poll.min(100),
            pools: Vec::new(),
            active: None,
        }
    }

    /// The thread count of the pool attached now.
    pub fn active(&self) -> Option<usize> {
        self.active
    }

    fn pool(&mut self, n: usize) -> NonNull<sys::ggml_threadpool> {
        if let Some((_, p)) = self.pools.iter().find(|(k, _)| *k == n) {
            return *p;
        }
        // SAFETY: returns a struct by value; no pointers involved.
        let mut params = unsafe { sys::ggml_threadpool_params_default(n as i32) };
        params.poll = self.poll;
        // Made paused: its threads sleep until the first graph wakes them.
        params.paused = true;
        // SAFETY: `params` is a valid, initialised parameter block that
        // llama.cpp only reads; the pool is freed once, in Drop.
        let raw = unsafe { sys::ggml_threadpool_new(&mut params) };
        let pool = NonNull::new(raw).expect("ggml_threadpool_new returned null");
        self.pools.push((n, pool));
        pool
    }

    /// Make the pool of `n` threads the one `ctx` computes on (for single
    /// and batched graphs both), and pause the one it replaces.
    ///
    /// # Safety
    /// `ctx` is a live context that these pools outlive (or that is
    /// detached first), and no graph of it is computing now.
    pub unsafe fn attach(&mut self, ctx: *mut sys::llama_context, n: usize) {
        let n = n.clamp(1, MAX_POOL_THREADS);
        if self.active == Some(n) {
            return;
        }
        let pool = self.pool(n);
        if let Some(old) = self.active {
            let old = self.pool(old);
            // SAFETY: a live pool with no graph computing (the caller's
            // promise): its threads are idle and may be put to sleep; the
            // next graph on it resumes it.
            unsafe { sys::ggml_threadpool_pause(old.as_ptr()) };
        }
        // SAFETY: `ctx` is live and idle (the caller's promise) and the pool
        // outlives its use by `ctx`.
        unsafe {
            sys::llama_attach_threadpool(ctx, pool.as_ptr(), pool.as_ptr());
            sys::llama_set_n_threads(ctx, n as i32, n as i32);
        }
        self.active = Some(n);
    }
}

impl Drop for ThreadPools {
    fn drop(&mut self) {
        for (_, p) in self.pools.drain(..) {
            // SAFETY: made by `ggml_threadpool_new` and freed once, here;
            // the context they served is freed (or detached) first.
            unsafe { sys::ggml_threadpool_free(p.as_ptr()) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_machine_gets_every_core() {
        assert_eq!(choose_threads(2, 0.0, 2), 2);
        assert_eq!(choose_threads(2, 0.1, 1), 2);
        assert_eq!(choose_threads(8, 0.2, 3), 8);
    }

    #[test]
    fn busy_cores_are_left_to_their_work() {
        // One core's worth of other work on two cores: one thread.
        assert_eq!(choose_threads(2, 1.0, 2), 1);
        // Every core busy: still one thread, never none.
        assert_eq!(choose_threads(2, 2.0, 2), 1);
        assert_eq!(choose_threads(2, 7.5, 1), 1);
        assert_eq!(choose_threads(8, 3.0, 8), 5);
    }

    #[test]
    fn a_load_near_a_boundary_keeps_the_count() {
        // Between a quarter and a half of a core busy: whatever is in use stays.
        for others in [0.3, 0.4, 0.45] {
            assert_eq!(choose_threads(2, others, 2), 2, "others {others}");
            assert_eq!(choose_threads(2, others, 1), 1, "others {others}");
        }
        assert_eq!(choose_threads(2, 0.55, 2), 1);
        assert_eq!(choose_threads(2, 0.2, 1), 2);
    }

    #[test]
    fn the_count_stays_within_the_cores() {
        assert_eq!(choose_threads(2, 0.0, 9), 2);
        assert_eq!(choose_threads(1, 0.0, 1), 1);
        assert_eq!(choose_threads(0, 0.0, 0), 1);
        assert_eq!(choose_threads(4, -1.0, 4), 4);
    }

    #[test]
    fn proc_stat_counts_busy_and_total_ticks() {
        let text = "cpu  100 5 50 800 20 3 2 0 7 0\ncpu0 50 2 25 400 10 1 1 0 0 0\n\
                    cpu1 50 3 25 400 10 2 1 0 0 0\nintr 1 2 3\nctxt 9\n";
        let (busy, total, cpus) = parse_proc_stat(text).unwrap();
        assert_eq!(total, 100 + 5 + 50 + 800 + 20 + 3 + 2);
        assert_eq!(busy, total - 820);
        assert_eq!(cpus, 2);
        assert_eq!(parse_proc_stat("intr 1 2\n"), None);
        assert_eq!(parse_proc_stat(""), None);
    }

    #[test]
    fn own_ticks_survive_odd_command_names() {
        let text = "4242 (my (odd) prog) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    123 45 0 0 20 0 7 0 100 0 0";
        assert_eq!(parse_own_ticks(text), Some(168));
        assert_eq!(parse_own_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_own_ticks("no parenthesis"), None);
    }

    #[test]
    fn others_are_busy_ticks_less_our_own() {
        let a = CpuSample {
            busy: 1000,
            total: 4000,
            cpus: 2,
            own: 300,
        };
        // 200 ticks per CPU passed; 300 busy, 100 of them ours: one core.
        let b = CpuSample {
            busy: 1300,
            total: 4400,
            cpus: 2,
            own: 400,
        };
        assert_eq!(b.others_since(&a), Some(1.0));
        assert_eq!(a.others_since(&a), None);
        assert_eq!(a.others_since(&b), None);
    }

    #[test]
    fn fixed_counts_are_kept() {
        let mut p = ThreadPolicy::new(
            ThreadSettings {
                decode: 3,
                batch: 5,
                poll: 0,
            },
            2,
        );
        assert_eq!(p.for_step(0), 3);
        assert_eq!(p.for_step(17), 5);
        assert_eq!((p.decode(), p.batch()), (3, 5));
        // Chosen counts: from a first reading at start, then the same for
        // both kinds of step until the next reading.
        let mut auto = ThreadPolicy::new(ThreadSettings::default(), 2);
        let n = auto.for_step(128);
        assert!((1..=2).contains(&n), "{n}");
        assert_eq!(auto.for_step(0), n);
        assert_eq!((auto.decode(), auto.batch()), (n, n));
    }

    #[test]
    fn the_machine_can_be_read() {
        if let Some(s) = CpuSample::read() {
            assert!(s.total >= s.busy && s.cpus >= 1, "{s:?}");
        }
    }
}
