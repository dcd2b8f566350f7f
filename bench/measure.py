#!/usr/bin/env python3
"""Run a command and record how busy the machine was meanwhile.

    measure.py STATS.json -- COMMAND [ARGS...]

The command inherits stdin/stdout/stderr and its exit status is returned.
STATS.json gets: wall_s, own_cpu_s (CPU time of the command and its
children), busy_cpu_s (CPU time of the whole machine, from /proc/stat),
other_cpu_s = busy - own, and other_cpu_pct = other CPU time as a share of
the machine's capacity (wall time x logical CPUs) over the run. A benchmark
that ran while other processes used a noticeable share of the CPUs measured
the machine's load as much as its own speed. Linux only for the machine-wide
figures (they are null elsewhere). Standard library only.
"""

import json
import os
import resource
import subprocess
import sys
import time


def busy_jiffies():
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice]
    # (guest time is already counted in user/nice)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv):
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: measure.py STATS.json -- COMMAND [ARGS...]")
    out, cmd = argv[0], argv[2:]
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    b0, c0, t0 = busy_jiffies(), children_cpu(), time.monotonic()
    rc = subprocess.call(cmd)
    b1, c1, t1 = busy_jiffies(), children_cpu(), time.monotonic()
    wall, own = t1 - t0, c1 - c0
    stats = {"wall_s": wall, "own_cpu_s": own, "ncpu": ncpu,
             "busy_cpu_s": None, "other_cpu_s": None, "other_cpu_pct": None}
    if b0 is not None and b1 is not None:
        busy = (b1 - b0) / hz
        other = max(0.0, busy - own)
        stats.update(busy_cpu_s=busy, other_cpu_s=other,
                     other_cpu_pct=100.0 * other / (wall * ncpu) if wall > 0 else None)
    with open(out, "w") as f:
        json.dump(stats, f)
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
