"""The local launcher: cells one after another, or `workers` at once, each worker on its own
GPU(s) or its own share of the CPU cores.

Two fits on the same cores each run at well under half speed (threads evict each other's
caches and wait on each other's locks), so a worker on a CPU machine gets `cores // workers`
cores: its subprocesses are pinned to them (`sched_setaffinity`, Linux) and told to use that
many threads (`OMP_NUM_THREADS`, which torch reads at start-up). On a GPU machine each worker
sees only its GPU(s) through `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_lightning.sweep.cell import run_cell, terminate_running
from lora_lightning.sweep.progress import SweepProgress

__all__ = ["Slot", "local_slots", "run_local", "visible_gpus"]


@dataclass
class Slot:
    """What one worker may use: extra environment and the CPU cores it is pinned to."""

    index: int
    env: dict[str, str] = field(default_factory=dict)
    cpus: list[int] | None = None

    def describe(self) -> str:
        if "CUDA_VISIBLE_DEVICES" in self.env:
            return f"worker {self.index}: GPU {self.env['CUDA_VISIBLE_DEVICES']}"
        if self.cpus:
            return f"worker {self.index}: CPU cores {self.cpus}"
        return f"worker {self.index}: every core"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES would name them."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover - torch is a dependency
        return []


def _cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def local_slots(
    workers: int, gpus: list[str] | None = None, cores: list[int] | None = None
) -> list[Slot]:
    """One slot per worker: GPUs split evenly among the workers when there are GPUs, else the
    CPU cores split evenly (one worker alone keeps every core and torch's own thread count)."""
    gpus = visible_gpus() if gpus is None else gpus
    if gpus:
        if workers > len(gpus):
            raise ValueError(f"--workers {workers}: only {len(gpus)} GPU(s) visible "
                             f"({','.join(gpus)}); give each worker its own GPU")
        per = len(gpus) // workers
        return [Slot(i, {"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * per:(i + 1) * per])})
                for i in range(workers)]
    if workers == 1:
        return [Slot(0)]
    cores = _cores() if cores is None else cores
    if workers > len(cores):
        raise ValueError(f"--workers {workers}: only {len(cores)} CPU core(s) here; more "
                         "workers than cores would oversubscribe them")
    per = len(cores) // workers
    slots = []
    for i in range(workers):
        mine = cores[i * per:(i + 1) * per]
        threads = str(len(mine))
        slots.append(Slot(i, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}, mine))
    return slots


def run_local(
    jobs: list[tuple[str, Path]],
    slots: list[Slot],
    cwd: Path,
    retries: int,
    progress: SweepProgress,
) -> dict[str, dict[str, Any]]:
    """Run `jobs` (cell name, cell folder) on the slots, one thread per slot; return each
    cell's status. Ctrl-C stops the running cells, waits until each has saved and is marked
    interrupted (resumable), says so, and re-raises."""
    _stop_on_sigint()
    todo: queue.Queue[tuple[str, Path]] = queue.Queue()
    for job in jobs:
        todo.put(job)
    results: dict[str, dict[str, Any]] = {}
    stop = threading.Event()

    def worker(slot: Slot) -> None:
        while not stop.is_set():
            try:
                name, cell_dir = todo.get_nowait()
            except queue.Empty:
                return
            start = time.monotonic()
            try:
                status = run_cell(cell_dir, cwd, retries, slot.env, slot.cpus, stop)
            except Exception as exc:  # a bug of ours, not of the cell: record it, go on
                status = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
            results[name] = status
            if not stop.is_set():
                progress.finished(name, status, time.monotonic() - start)

    # Each worker says when it is done through its own Event: after a Ctrl-C has interrupted a
    # `Thread.join`, CPython 3.11's next join returns at once, and the sweep exited while its
    # cells were still saving (status "running" forever). `Event.wait` can be waited on again.
    finished = [threading.Event() for _ in slots]

    def run(slot: Slot, done: threading.Event) -> None:
        try:
            worker(slot)
        finally:
            done.set()

    for slot, done in zip(slots, finished, strict=True):
        threading.Thread(target=run, args=(slot, done), daemon=True).start()
    try:
        _wait(finished)
    except KeyboardInterrupt:
        stop.set()
        terminate_running()
        print("sweep: stopping; the running cells save a resumable checkpoint first (Ctrl-C "
              "again to stop them at once)", flush=True)
        try:
            _wait(finished)
        except KeyboardInterrupt:
            terminate_running(kill=True)
            _wait(finished, timeout=30)
        stopped = sorted(name for name, status in results.items()
                         if status.get("state") == "interrupted")
        print(f"sweep interrupted: {len(stopped)} cell(s) stopped and marked interrupted"
              f"{' (' + ', '.join(stopped) + ')' if stopped else ''}; run the sweep again to "
              "resume them from their last.ckpt", flush=True)
        raise
    return results


def _stop_on_sigint() -> None:
    """Take SIGINT even where it was inherited ignored. A shell without job control starts
    background commands (`sweep ... &` in a script) with SIGINT ignored, and Python keeps it
    so; the cells' `fit` installs its own handler and stops on it, so a SIGINT to the group
    stopped the running cell while the sweep, deaf to it, started the next one and exited 0."""
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.SIG_IGN):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _wait(events: list[threading.Event], timeout: float | None = None) -> None:
    """Until every event is set (or `timeout` seconds); a Ctrl-C interrupts it, as it should."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not all(e.is_set() for e in events):
        if deadline is not None and time.monotonic() > deadline:
            return
        next(e for e in events if not e.is_set()).wait(0.5)
