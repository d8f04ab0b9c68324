"""The SLURM launcher, through submitit (`pip install lora-lightning[slurm]`).

One job array, one cell per task, at most `slurm.max_running` tasks at once; partition, time,
GPUs, CPUs and memory from the sweep file's `slurm:` section. Each task runs the same
`run_cell` as the local launcher, so a task that SLURM preempts or times out is requeued by
submitit (`Checkpointable`) and resumes its cell from `last.ckpt`, written every epoch.
`slurm.cluster: local` runs the same tasks with submitit's local executor (for tests, and to
try a sweep file without a cluster).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import submitit
    from submitit.helpers import Checkpointable
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the slurm launcher needs submitit: pip install 'lora-lightning[slurm]'"
    ) from exc

from lora_lightning.sweep.cell import PACKAGE_ROOT, read_status, run_cell, write_status
from lora_lightning.sweep.progress import SweepProgress
from lora_lightning.sweep.spec import Sweep

__all__ = ["CellTask", "make_executor", "run_slurm", "submit_and_wait"]


class CellTask(Checkpointable):
    """One cell as a submitit task. On preemption or timeout submitit calls `checkpoint()`
    (inherited), which resubmits this same call: the new task resumes from `last.ckpt`."""

    def __call__(self, cell_dir: str, cwd: str, retries: int) -> dict[str, Any]:
        return run_cell(cell_dir, cwd, retries)


@contextmanager
def _package_on_pythonpath() -> Iterator[None]:
    """Tasks inherit the submitting environment: make them import this copy of the package."""
    before = os.environ.get("PYTHONPATH")
    parts = [str(PACKAGE_ROOT), *filter(None, (before or "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def make_executor(sweep: Sweep, name: str) -> Any:
    """A submitit executor with the sweep file's `slurm:` settings."""
    s = sweep.slurm
    executor = submitit.AutoExecutor(
        folder=str(sweep.output / "slurm" / "%j"), cluster=s.get("cluster", "slurm")
    )
    executor.update_parameters(
        name=name,
        timeout_min=s.get("timeout_min", 24 * 60),
        gpus_per_node=s.get("gpus_per_node"),
        cpus_per_task=s.get("cpus_per_task"),
        mem_gb=s.get("mem_gb"),
        slurm_partition=s.get("partition"),
        slurm_account=s.get("account"),
        slurm_qos=s.get("qos"),
        slurm_constraint=s.get("constraint"),
        slurm_array_parallelism=s.get("max_running", 16),
        slurm_setup=s.get("setup"),
        slurm_additional_parameters=s.get("additional_parameters"),
    )
    return executor


def submit_and_wait(sweep: Sweep, name: str, function: Callable[..., Any], *args: Any) -> Any:
    """Run one function as a single job (e.g. `categorize` on a GPU node) and return its
    result."""
    executor = make_executor(sweep, name)
    with _package_on_pythonpath():
        job = executor.submit(function, *args)
    print(f"sweep: submitted {name} as job {job.job_id}; waiting", flush=True)
    return job.result()


def run_slurm(
    sweep: Sweep, jobs: list[tuple[str, Path]], cwd: Path, retries: int,
    progress: SweepProgress, poll_seconds: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Submit the cells as one job array and wait for them, printing progress as they end."""
    if not jobs:
        return {}
    executor = make_executor(sweep, f"sweep-{sweep.output.name}")
    with _package_on_pythonpath(), executor.batch():
        submitted = [
            (name, cell_dir, executor.submit(CellTask(), str(cell_dir), str(cwd), retries))
            for name, cell_dir in jobs
        ]
    print(f"sweep: submitted {len(submitted)} cells as job array "
          f"{submitted[0][2].job_id.split('_')[0]} (logs in {sweep.output / 'slurm'})", flush=True)
    poll = poll_seconds if poll_seconds is not None else (
        15.0 if sweep.slurm.get("cluster", "slurm") == "slurm" else 0.5)
    results: dict[str, dict[str, Any]] = {}
    started = {name: time.monotonic() for name, _, _ in submitted}
    waiting = list(submitted)
    try:
        while waiting:
            for item in list(waiting):
                name, cell_dir, job = item
                if not job.done():
                    continue
                waiting.remove(item)
                try:
                    status = job.result()
                except Exception as exc:  # the task died (not the cell's fit or test)
                    error = " ".join(str(exc).split())[-1000:]
                    status = write_status(cell_dir, state="failed", error=f"task: {error}")
                if status.get("state") == "busy":
                    status = read_status(cell_dir)
                results[name] = status
                progress.finished(name, status, time.monotonic() - started[name])
            if waiting:
                time.sleep(poll)
    except KeyboardInterrupt:
        print("sweep: stopped waiting; the jobs go on running on the cluster. Run the sweep "
              "again to wait for them (finished cells are skipped) or `aggregate` the folder.",
              flush=True)
        raise
    return results
