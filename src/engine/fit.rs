//! Whether the model, its KV and its compute buffers fit in memory,
//! measured before the weights are loaded. A model that does not fit is
//! refused at start-up with the figures, instead of the OS killing the
//! server while it loads or at the first long prompt.
//!
//! The figures are llama.cpp's own: the model is opened without reading
//! its weights (`no_alloc`) and a context with the server's settings is
//! created over it without allocating, which reports the KV and compute
//! buffer sizes it would take.

use std::path::Path;

use tracing::{info, warn};

use super::llama::{gpu_free_bytes, Context, Model};
use super::worker::context_params;
use super::EngineConfig;

/// What the server will hold, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryNeed {
    pub weights: u64,
    pub kv: u64,
    /// Compute and output buffers.
    pub buffers: u64,
    /// The RAM snapshot budget (`--cache-ram-mb`): filled over time.
    pub snapshots: u64,
}

impl MemoryNeed {
    /// What must fit to start and serve a first prompt.
    pub fn base(&self) -> u64 {
        self.weights + self.kv + self.buffers
    }
}

/// What the machine offers, in bytes: host RAM available to this process
/// (the lower of the kernel's estimate and the cgroup's limit) and free GPU
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    pub host: u64,
    pub gpu: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Fits,
    /// Starts, but the RAM snapshot budget may not fit beside it.
    SnapshotsTight,
    DoesNotFit,
}

/// Compare what is needed with what is there.
pub fn verdict(need: &MemoryNeed, cap: &Capacity) -> Verdict {
    let total = cap.host + cap.gpu;
    if need.base() > total {
        Verdict::DoesNotFit
    } else if need.base() + need.snapshots > total {
        Verdict::SnapshotsTight
    } else {
        Verdict::Fits
    }
}

/// `MemAvailable` from `/proc/meminfo`'s text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What a cgroup v2 limit leaves: `memory.max` less `memory.current`
/// (None when unlimited or unreadable).
pub fn cgroup_room(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// This machine's capacity; None where free memory cannot be read (not
/// Linux).
pub fn capacity() -> Option<Capacity> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let mut host = mem_available(&meminfo)?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(str::to_string)
        });
    if let Some(dir) = cgroup {
        let base = format!("/sys/fs/cgroup{}", dir.trim_end_matches('/'));
        let read = |f: &str| std::fs::read_to_string(format!("{base}/{f}")).ok();
        if let (Some(max), Some(cur)) = (read("memory.max"), read("memory.current")) {
            if let Some(room) = cgroup_room(&max, &cur) {
                host = host.min(room);
            }
        }
    }
    Some(Capacity {
        host,
        gpu: gpu_free_bytes(),
    })
}

fn mib(b: u64) -> String {
    let mib = b as f64 / (1u64 << 20) as f64;
    if mib >= 10240.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// Why the server will not start.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct DoesNotFit(pub String);

/// Measure what `config` over the model at `path` needs and refuse it when
/// it cannot fit. Returns the figures (also logged).
pub fn check(path: &Path, config: &EngineConfig) -> Result<Option<MemoryNeed>, DoesNotFit> {
    let Ok(model) = Model::probe(path, config.n_gpu_layers) else {
        // The real load reports why it cannot open the file.
        return Ok(None);
    };
    let (params, _) = context_params(&model, config, 1);
    let Some((kv, buffers)) = Context::probe_sizes(&model, params) else {
        return Ok(None);
    };
    let need = MemoryNeed {
        weights: model.size_bytes(),
        kv,
        buffers,
        snapshots: config.cache_ram_bytes as u64,
    };
    drop(model);
    let Some(cap) = capacity() else {
        info!(
            weights = mib(need.weights),
            kv = mib(need.kv),
            compute = mib(need.buffers),
            "memory needed (free memory cannot be read here: not checked)"
        );
        return Ok(Some(need));
    };
    let figures = format!(
        "the weights take {}, the KV cache {} ({} cells for {} sequences), compute buffers {}: \
         {} in all, and {} of RAM{} is available",
        mib(need.weights),
        mib(need.kv),
        params.n_ctx,
        params.n_seq_max,
        mib(need.buffers),
        mib(need.base()),
        mib(cap.host),
        if cap.gpu > 0 {
            format!(" and {} of GPU memory", mib(cap.gpu))
        } else {
            String::new()
        },
    );
    match verdict(&need, &cap) {
        Verdict::Fits => {
            info!(
                weights = mib(need.weights),
                kv = mib(need.kv),
                compute = mib(need.buffers),
                snapshots = mib(need.snapshots),
                available = mib(cap.host + cap.gpu),
                "memory: the model fits"
            );
            Ok(Some(need))
        }
        Verdict::SnapshotsTight => {
            warn!(
                "memory: {figures}; the RAM snapshot budget (--cache-ram-mb, {}) may not fit beside \
                 it: lower it if the server is short of memory",
                mib(need.snapshots)
            );
            Ok(Some(need))
        }
        Verdict::DoesNotFit => Err(DoesNotFit(format!(
            "the model does not fit in memory: {figures}. Lower --ctx or --parallel (or set a \
             smaller --kv-size), use a smaller quantization, or start with --no-memory-check \
             to try anyway"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(weights: u64, kv: u64, snapshots: u64) -> MemoryNeed {
        MemoryNeed {
            weights,
            kv,
            buffers: 10,
            snapshots,
        }
    }

    #[test]
    fn verdicts() {
        let cap = Capacity { host: 100, gpu: 0 };
        assert_eq!(verdict(&need(50, 20, 10), &cap), Verdict::Fits);
        assert_eq!(verdict(&need(50, 20, 30), &cap), Verdict::SnapshotsTight);
        assert_eq!(verdict(&need(80, 20, 0), &cap), Verdict::DoesNotFit);
        let gpu = Capacity { host: 60, gpu: 60 };
        assert_eq!(verdict(&need(80, 20, 0), &gpu), Verdict::Fits);
    }

    #[test]
    fn reads_meminfo_and_cgroup_limits() {
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(cgroup_room("max\n", "123\n"), None);
        assert_eq!(cgroup_room("1000\n", "300\n"), Some(700));
        assert_eq!(cgroup_room("1000\n", "3000\n"), Some(0));
    }
}
