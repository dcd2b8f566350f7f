"""The memory check at start-up: the weights, the KV cache and the compute
buffers are measured by llama.cpp before the weights are read, and a model
that cannot fit is refused with the figures instead of being killed by the
OS later."""

from __future__ import annotations

import os
import re
import subprocess
import time

from conftest import HEARTH_BIN, SMOLLM2

ENV = {k: v for k, v in os.environ.items() if not k.startswith("HEARTH_")} | {"NO_COLOR": "1"}


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(HEARTH_BIN), "serve", "--port", "0", "--model", str(SMOLLM2), *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def test_a_kv_cache_larger_than_memory_is_refused_at_once_with_the_figures():
    # About 23 KB a cell: 4M cells is some 90 GB, more than any test machine.
    t0 = time.monotonic()
    proc = run("--ctx", "8192", "--kv-size", "4000000", "--parallel", "1")
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "listening" not in proc.stdout
    err = proc.stderr
    assert "does not fit in memory" in err, err[-2000:]
    for part in ("the weights take", "the KV cache", "4000000 cells", "compute buffers", "is available",
                 "--no-memory-check"):
        assert part in err, (part, err[-2000:])
    kv = re.search(r"the KV cache ([\d.]+) GiB", err)
    assert kv and 60 < float(kv.group(1)) < 120, err[-2000:]
    # Measured without reading the weights or allocating the KV.
    assert elapsed < 30, elapsed
    assert "panicked" not in err


def test_the_start_up_log_gives_what_the_model_kv_and_buffers_take(start_hearth):
    srv = start_hearth("--parallel", "2", "--ctx", "4096")
    srv.stop()
    log = srv.log_path.read_text("utf-8", "replace")
    fit = re.search(r'memory: the model fits weights="(\d+) MiB" kv="(\d+) MiB" compute="(\d+) MiB"', log)
    assert fit, log[-3000:]
    real = re.search(r'kv_mib="([\d.]+)"', log)
    assert real, log[-3000:]
    # The measured KV is the KV the engine then allocates.
    assert abs(float(fit.group(2)) - float(real.group(1))) <= 1.0, (fit.group(0), real.group(0))
    assert 60 <= int(fit.group(1)) <= 120  # SmolLM2 Q4_1: 92 MiB of weights


def test_no_memory_check_skips_the_measurement(start_hearth):
    srv = start_hearth("--no-memory-check", "--parallel", "1", "--ctx", "2048")
    srv.stop()
    log = srv.log_path.read_text("utf-8", "replace")
    assert "memory: the model fits" not in log


def compute_mib(srv) -> int:
    log = srv.log_path.read_text("utf-8", "replace")
    fit = re.search(r'memory: the model fits .* compute="(\d+) MiB"', log)
    assert fit, log[-3000:]
    return int(fit.group(1))


def test_flash_attention_off_reaches_llama_cpp_and_costs_compute_memory(start_hearth):
    """Without the fused kernel attention scores are a matrix of KV cells by
    batch rows, so the compute buffers llama.cpp plans grow with the KV."""
    auto = start_hearth("--parallel", "1", "--ctx", "8192")
    auto.stop()
    off = start_hearth("--parallel", "1", "--ctx", "8192", "--flash-attn", "off")
    off.stop()
    # Measured: 168 MiB against 110 at 8,192 cells.
    assert compute_mib(off) > 1.3 * compute_mib(auto), (compute_mib(off), compute_mib(auto))
