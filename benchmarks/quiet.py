"""Timing on a machine other processes may share: how much CPU they used during a timed block, and waiting for
them to go quiet before one (read from /proc/stat; Linux)."""

from __future__ import annotations

import contextlib
import gc
import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK  # minus idle and iowait


@contextlib.contextmanager
def timed():
    """Yields a dict filled with wall and process CPU seconds of the block, and ``foreign``: the share of the
    machine's CPU capacity that other processes used meanwhile (0 = we had the machine to ourselves)."""
    out: dict[str, float] = {}
    gc.collect()
    busy, wall, cpu = busy_cpu_s(), time.perf_counter(), time.process_time()
    try:
        yield out
    finally:
        out["wall"], out["cpu"] = time.perf_counter() - wall, time.process_time() - cpu
        out["foreign"] = max(0.0, busy_cpu_s() - busy - out["cpu"]) / (out["wall"] * NCPU)


def wait_for_quiet(threshold: float, max_wait: float, window: float = 1.0) -> float:
    """Wait (up to ``max_wait`` s) until other processes use less than ``threshold`` of the machine over two
    consecutive ``window``s; returns the seconds waited."""
    start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - start < max_wait and quiet < 2:
        busy = busy_cpu_s()
        time.sleep(window)
        quiet = quiet + 1 if (busy_cpu_s() - busy) / (window * NCPU) < threshold else 0
    return time.perf_counter() - start
