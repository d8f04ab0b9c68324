"""Running one cell: `fit`, then `test`, each a `python -m lora_lightning` subprocess, with its
state in `<cell>/status.json` so that any process (a local worker, a SLURM task, a rerun after a
crash) can pick the cell up where it stopped.

- A cell whose `test/report/report.json` exists is finished and skipped.
- A cell with `checkpoints/last.ckpt` and no finished `fit` resumes with `--ckpt_path last`.
- A failed attempt is retried (`retries` times, default once). A retry after a failed *resumed*
  fit starts the fit afresh, since the checkpoint itself may be what failed (a file cut short
  by a kill); a retry after a failed fresh fit resumes from the checkpoint it wrote.
- An interrupted cell (the sweep stopped, a SLURM preemption) is left resumable, not failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lora_lightning

__all__ = [
    "CELL_CONFIG", "CELL_INFO", "STATUS_FILE", "cell_env", "read_status", "report_path",
    "run_cell", "terminate_running", "write_status",
]

CELL_CONFIG = "cell.yaml"
CELL_INFO = "cell.json"
STATUS_FILE = "status.json"
PACKAGE_ROOT = Path(lora_lightning.__file__).resolve().parents[1]

_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def report_path(cell_dir: Path) -> Path:
    """Where `test` writes the cell's report; its existence means the cell is finished."""
    return Path(cell_dir) / "test" / "report" / "report.json"


def read_status(cell_dir: Path) -> dict[str, Any]:
    """The cell's recorded state ({} when it never ran)."""
    path = Path(cell_dir) / STATUS_FILE
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def write_status(cell_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the cell's status, atomically (readers never see half a file)."""
    status = {**read_status(cell_dir), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = Path(cell_dir) / STATUS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)
    return status


def cell_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a cell's subprocesses.

    The package that runs the sweep is first on PYTHONPATH, so cells run the same code as the
    sweep even where another copy is installed. SLURM_* variables are dropped: inside a SLURM
    task Lightning would otherwise take the task for a SLURM-managed DDP job (and requeue it
    itself), while here the sweep's launcher owns requeueing and a cell's DDP processes are
    Lightning's own, as in a plain `fit`.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    paths = [str(PACKAGE_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def terminate_running() -> None:
    """Stop every cell subprocess this process started (the sweep is being interrupted)."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()


def _run(
    cmd: Sequence[str], log: Path, cwd: Path, env: dict[str, str], cpus: Sequence[int] | None
) -> int:
    with open(log, "a") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
                  f"{' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            if cpus:  # the child is still starting Python: its threads will inherit this
                with contextlib.suppress(AttributeError, OSError):  # not Linux; child gone
                    os.sched_setaffinity(proc.pid, list(cpus))
            return proc.wait()
        finally:
            if proc.poll() is None:  # we are being stopped (Ctrl-C, a SLURM preemption)
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)


def _error_line(log: Path) -> str:
    """The line of a log that says what went wrong: our CLI's `error: ...` line, else the last
    exception line, else the last line."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except FileNotFoundError:
        return f"no log at {log}"
    lines = [ln for ln in lines if ln]
    for prefix in ("error:", ""):
        for line in reversed(lines):
            if line.startswith(prefix) and (prefix or "Error" in line.split(":")[0]):
                return line[:1000]
    return (lines[-1] if lines else "no output")[:1000]


def _attempt(
    cell_dir: Path, cwd: Path, env: dict[str, str], cpus: Sequence[int] | None,
    stop: threading.Event | None,
) -> str | None:
    """One try at fit (unless done) then test; None when the cell finished, else the error."""
    python = [sys.executable, "-m", "lora_lightning"]
    config = str(cell_dir / CELL_CONFIG)
    if not read_status(cell_dir).get("fit_done"):
        last = cell_dir / "checkpoints" / "last.ckpt"
        resume = last.is_file()
        write_status(cell_dir, phase="fit", resumed=resume)
        start = time.monotonic()
        resume_args = ["--ckpt_path", "last"] if resume else []
        rc = _run([*python, "fit", "--config", config, *resume_args],
                  cell_dir / "fit.log", cwd, env, cpus)
        if rc != 0:
            if resume:  # next time start afresh: the checkpoint may be what failed
                shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
            return f"fit exited with {rc}: {_error_line(cell_dir / 'fit.log')}"
        write_status(cell_dir, fit_done=True, fit_seconds=round(time.monotonic() - start, 1))
    if stop is not None and stop.is_set():
        return "stopped before test"
    write_status(cell_dir, phase="test")
    start = time.monotonic()
    rc = _run([*python, "test", "--config", config, "--ckpt_path", "last"],
              cell_dir / "test.log", cwd, env, cpus)
    if rc != 0:
        return f"test exited with {rc}: {_error_line(cell_dir / 'test.log')}"
    if not report_path(cell_dir).is_file():
        return f"test wrote no {report_path(cell_dir)}"
    write_status(cell_dir, test_seconds=round(time.monotonic() - start, 1))
    return None


def run_cell(
    cell_dir: str | Path,
    cwd: str | Path,
    retries: int = 1,
    env: dict[str, str] | None = None,
    cpus: Sequence[int] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Bring one prepared cell (its `cell.yaml` written) to a report, and return its status.

    Args:
        cell_dir: The cell's folder.
        cwd: Working folder of the subprocesses (relative paths in configs mean the same as
            for a plain `fit` started there).
        retries: How many times a failed cell is tried again.
        env: Extra environment for the subprocesses (thread counts, CUDA_VISIBLE_DEVICES).
        cpus: CPU cores the subprocesses are pinned to (None = no pinning).
        stop: Set when the sweep is being stopped: a failing subprocess then means an
            interruption, not a failure.
    """
    from filelock import FileLock, Timeout

    cell_dir, cwd = Path(cell_dir), Path(cwd)
    lock = FileLock(str(cell_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return {"state": "busy", "error": "another process is running this cell"}
    try:
        if report_path(cell_dir).is_file():
            status = read_status(cell_dir)
            if status.get("state") != "done":
                status = write_status(cell_dir, state="done", error=None)
            return {**status, "skipped": True}
        subprocess_env = cell_env(env)
        for attempt in range(retries + 1):
            if stop is not None and stop.is_set():  # never start a subprocess after Ctrl-C
                return write_status(cell_dir, state="interrupted")
            previous = read_status(cell_dir).get("attempts", 0)
            write_status(cell_dir, state="running", attempts=previous + 1, error=None,
                         host=socket.gethostname(), pid=os.getpid(),
                         cpus=list(cpus) if cpus else None,
                         threads=(env or {}).get("OMP_NUM_THREADS"),
                         gpus=(env or {}).get("CUDA_VISIBLE_DEVICES"))
            try:
                error = _attempt(cell_dir, cwd, subprocess_env, cpus, stop)
            except BaseException:
                write_status(cell_dir, state="interrupted")
                raise
            if error is None:
                return write_status(cell_dir, state="done", error=None)
            if stop is not None and stop.is_set():
                return write_status(cell_dir, state="interrupted", error=error)
            state = "failed" if attempt == retries else "retrying"
            write_status(cell_dir, state=state, error=error)
        return read_status(cell_dir)
    finally:
        lock.release()
