"""How many CPU threads torch should use, chosen from the work's size and the cores free now.

OpenMP threads that spin against another process cost more than the second core gives a small
model: on a 2-core machine with one core busy elsewhere, the default `fit` on the synthetic
world took 240 s with torch's default 2 threads and 38 s with one. So:

* an explicit setting wins (a `threads` argument, or `OMP_NUM_THREADS` in the environment);
* a model under `SMALL_MODEL` parameters gets one thread: its matrices are too small to split;
* otherwise the cores this process may run on that are not busy right now (measured over a
  short window from /proc/stat, else the load average), at least one.
"""

from __future__ import annotations

import os
import time

import torch

__all__ = ["SMALL_MODEL", "busy_cores", "choose_threads", "set_threads", "usable_cores"]

SMALL_MODEL = 10_000_000


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs, or None where /proc/stat does not exist."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return idle, sum(fields)


def busy_cores(window: float = 0.2) -> float:
    """How many of the machine's cores other work keeps busy, measured over `window` seconds
    (the caller sleeps meanwhile, so it does not count itself); the 1-minute load average where
    /proc/stat is missing."""
    first = _cpu_times()
    if first is None:
        try:
            return float(os.getloadavg()[0])
        except (AttributeError, OSError):
            return 0.0
    time.sleep(window)
    second = _cpu_times()
    idle, total = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return 0.0
    return (1.0 - idle / total) * (os.cpu_count() or 1)


def choose_threads(n_parameters: int, explicit: int | None = None) -> int:
    """The intra-op thread count for work on a model of `n_parameters`; see the module doc."""
    if explicit is not None:
        if explicit < 1:
            raise ValueError(f"threads must be at least 1, got {explicit}")
        return explicit
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    if n_parameters < SMALL_MODEL:
        return 1
    cores = usable_cores()
    free = cores - int(round(busy_cores()))
    return max(1, min(cores, free))


def set_threads(n_parameters: int, explicit: int | None = None) -> int:
    """Choose the thread count (`choose_threads`), apply it to torch and return it."""
    threads = choose_threads(n_parameters, explicit)
    torch.set_num_threads(threads)
    return threads
