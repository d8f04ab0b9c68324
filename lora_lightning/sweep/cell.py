"""Running one cell: `fit`, then `test` (or `fit` alone, as its `cell.json` says), each a
`python -m lora_lightning` subprocess, with its state in `<cell>/status.json` so that any
process (a local worker, a SLURM task, a rerun after a crash) can pick the cell up where it
stopped.

- A cell whose `test/report/report.json` is a whole report is finished and skipped; a damaged
  one is set aside and the cell's `test` runs again.
- A cell with `checkpoints/last.ckpt` and no finished `fit` resumes with `--ckpt_path last`.
- A failed attempt is retried (`retries` times, default once). A retry after a failed *resumed*
  fit starts the fit afresh, since the checkpoint itself may be what failed (a file cut short
  by a kill); a retry after a failed fresh fit resumes from the checkpoint it wrote. Input
  the CLI refuses (exit 2) is not retried: it would be refused again.
- An interrupted cell (the sweep stopped, a SLURM preemption) is left resumable, not failed.
- A cell's subprocesses die with the sweep (`follow_parent`), and a rerun waits until a dying
  one has let go of the cell's run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lora_lightning
from lora_lightning.files import FolderLock, atomic_write_text

__all__ = [
    "CELL_CONFIG", "CELL_INFO", "PARENT_ENV", "STATUS_FILE", "DamagedReport", "cell_env",
    "cell_stages", "error_line", "follow_parent", "is_done", "read_report", "read_status",
    "repair_status", "report_path", "run_cell", "terminate_running", "write_status",
]

CELL_CONFIG = "cell.yaml"
CELL_INFO = "cell.json"
STATUS_FILE = "status.json"
PARENT_ENV = "LORA_LIGHTNING_SWEEP_PID"
HEADER = "=== "  # how `_run` opens each attempt's part of a log
PACKAGE_ROOT = Path(lora_lightning.__file__).resolve().parents[1]

_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()


def report_path(cell_dir: Path) -> Path:
    """Where `test` writes the cell's report; a whole one (`read_report`) means finished."""
    return Path(cell_dir) / "test" / "report" / "report.json"


class DamagedReport(ValueError):
    """A report.json that is not a whole report (cut short, emptied, edited)."""


def read_report(cell_dir: Path) -> dict[str, Any] | None:
    """The cell's report when it is whole, None when there is none.

    Raises `DamagedReport`, naming the file, for one that does not parse or lacks what every
    report has (the reliability of the trained facts and the knowledge shift): its mere
    existence once marked a torn file done forever.
    """
    path = report_path(cell_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DamagedReport(f"{path}: unreadable ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise DamagedReport(f"{path}: not UTF-8 text (byte {err.start})") from err
    try:
        report = json.loads(text)
    except json.JSONDecodeError as err:
        raise DamagedReport(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from err
    reliability = report.get("reliability") if isinstance(report, dict) else None
    if not isinstance(reliability, dict) or not isinstance(
        reliability.get("reliability"), int | float
    ) or not isinstance(report.get("shift"), dict):
        raise DamagedReport(f"{path}: not a whole report (no reliability or shift)")
    return report


def is_done(cell_dir: Path) -> bool:
    """Whether the cell holds a whole report (a damaged one means: run its `test` again)."""
    try:
        return read_report(cell_dir) is not None
    except DamagedReport:
        return False


def cell_stages(cell_dir: Path) -> tuple[str, ...]:
    """What the cell runs, from its `cell.json`: `fit` then `test` (a sweep's cells), or `fit`
    alone (a `capacity` probe, which needs only the reliability `fit` measures at its end)."""
    try:
        stages = json.loads((Path(cell_dir) / CELL_INFO).read_text()).get("stages")
    except (OSError, ValueError, AttributeError):
        stages = None
    return tuple(stages) if isinstance(stages, list) and stages else ("fit", "test")


def read_status(cell_dir: Path) -> dict[str, Any]:
    """The cell's recorded state ({} when it never ran)."""
    path = Path(cell_dir) / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):  # none, or damaged (`repair_status`)
        return {}
    return status if isinstance(status, dict) else {}


def repair_status(cell_dir: Path) -> str | None:
    """Rewrite a cell's status.json that does not parse (a torn write, a stray edit), which
    `read_status` reads as "never ran" while a whole report says the cell is done, and mark
    a finished cell done whatever its status says; what was repaired, or None."""
    path = Path(cell_dir) / STATUS_FILE
    done = is_done(cell_dir)
    try:
        status = json.loads(path.read_text())
        damage = None if isinstance(status, dict) else "not a JSON object"
    except FileNotFoundError:
        status, damage = {}, None
    except ValueError as err:  # also not UTF-8
        status, damage = {}, type(err).__name__
    if damage is None:
        if done and status and status.get("state") != "done":
            write_status(cell_dir, state="done", error=None)
        return None
    state = "done" if done else "pending"
    atomic_write_text(path, json.dumps({
        "state": state, "note": f"status.json was damaged ({damage}) and rewritten",
        "updated": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
    return (f"{path} was damaged ({damage}); rewritten as {state}"
            + (" (its report is whole)" if done else ""))


def write_status(cell_dir: Path, **fields: Any) -> dict[str, Any]:
    """Merge `fields` into the cell's status, atomically (readers never see half a file)."""
    status = {**read_status(cell_dir), **fields, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(Path(cell_dir) / STATUS_FILE, json.dumps(status, indent=1))
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
    env[PARENT_ENV] = str(os.getpid())  # the subprocess dies with the sweep (`follow_parent`)
    env.update(extra or {})
    return env


def terminate_running(kill: bool = False) -> None:
    """Stop every cell subprocess this process started (the sweep is being interrupted): with
    SIGTERM, on which `fit` saves a resumable checkpoint first, or at once with `kill`."""
    with _RUNNING_LOCK:
        procs = list(_RUNNING)
    for proc in procs:
        if proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()


def follow_parent() -> None:
    """End this process when the sweep that started it dies, kill -9 included (Linux).

    A cell's subprocess finds the sweep's pid in `PARENT_ENV` (set by `cell_env`) and asks the
    kernel for SIGTERM when its parent dies (`PR_SET_PDEATHSIG`), on which `fit` saves a
    resumable checkpoint and exits; left running, an orphaned fit went on writing the cell
    while a rerun of the sweep started a second one there. The variable is consumed, so the
    subprocess's own children (DDP ranks) are not tied to the sweep.
    """
    expected = os.environ.pop(PARENT_ENV, None)
    if not expected or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if str(os.getppid()) != expected:  # the sweep died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def _run(
    cmd: Sequence[str], log: Path, cwd: Path, env: dict[str, str], cpus: Sequence[int] | None
) -> int:
    with open(log, "a") as out:
        out.write(f"\n{HEADER}{time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}: "
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


def error_line(log: str | Path) -> str:
    """The line of a log's last attempt that says what went wrong: our CLI's `error: ...`
    line, else the last exception line, else the last line (never the attempt's header)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except FileNotFoundError:
        return f"no log at {log}"
    headers = [i for i, ln in enumerate(lines) if ln.startswith(HEADER)]
    lines = [ln for ln in lines[headers[-1] + 1 if headers else 0:] if ln]
    for prefix in ("error:", ""):
        for line in reversed(lines):
            if line.startswith(prefix) and (prefix or "Error" in line.split(":")[0]):
                return line[:1000]
    return (lines[-1] if lines else "no output")[:1000]


# How a cell subprocess ended, by exit code: 2 is our CLI's one-line refusal of its input (the
# same input is refused again: no retry); 128 + SIGINT/SIGTERM is a stop that saved a
# resumable checkpoint (an interruption, not a failure).
BAD_INPUT = 2
STOPPED = (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM)


def _attempt(
    cell_dir: Path, cwd: Path, env: dict[str, str], cpus: Sequence[int] | None,
    stop: threading.Event | None,
) -> tuple[str | None, str]:
    """One try at fit (unless done) then test: (None, "done") when the cell finished, else
    (the error, "interrupted" | "bad input" | "failed")."""
    python = [sys.executable, "-m", "lora_lightning"]
    config = str(cell_dir / CELL_CONFIG)
    if not read_status(cell_dir).get("fit_done"):
        last = cell_dir / "checkpoints" / "last.ckpt"
        resume = last.is_file()
        write_status(cell_dir, phase="fit", resumed=resume)
        start = time.monotonic()
        # the cell folder is the sweep's: a fresh fit replaces what a failed one left there
        how = ["--ckpt_path", "last"] if resume else ["--overwrite", "true"]
        rc = _run([*python, "fit", "--config", config, *how],
                  cell_dir / "fit.log", cwd, env, cpus)
        if rc != 0:
            error = f"fit exited with {rc}: {error_line(cell_dir / 'fit.log')}"
            if rc in STOPPED:
                return error, "interrupted"
            if resume:  # next time start afresh: the checkpoint may be what failed
                shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
                return error, "failed"
            return error, "bad input" if rc == BAD_INPUT else "failed"
        write_status(cell_dir, fit_done=True, fit_seconds=round(time.monotonic() - start, 1))
    if "test" not in cell_stages(cell_dir):
        return None, "done"
    if stop is not None and stop.is_set():
        return "stopped before test", "interrupted"
    write_status(cell_dir, phase="test")
    start = time.monotonic()
    rc = _run([*python, "test", "--config", config, "--ckpt_path", "last"],
              cell_dir / "test.log", cwd, env, cpus)
    if rc != 0:
        error = f"test exited with {rc}: {error_line(cell_dir / 'test.log')}"
        return error, ("interrupted" if rc in STOPPED else
                       "bad input" if rc == BAD_INPUT else "failed")
    try:
        if read_report(cell_dir) is None:
            return f"test wrote no {report_path(cell_dir)}", "failed"
    except DamagedReport as damaged:
        return f"test wrote a damaged report: {damaged}", "failed"
    write_status(cell_dir, test_seconds=round(time.monotonic() - start, 1))
    return None, "done"


def _wait_for_writer(cell_dir: Path, timeout: float = 600.0) -> None:
    """Wait while a process of an earlier sweep still writes the cell's run folder (killed
    with its sweep, it is saving a checkpoint before it exits), so no second writer starts."""
    from filelock import FileLock, Timeout

    path = cell_dir / FolderLock.LOCK_NAME
    if not path.exists():
        return
    writer = FileLock(str(path))
    try:
        writer.acquire(timeout=timeout)
    except Timeout:
        return  # the run folder's own lock refuses the new fit, with a clear line
    writer.release()


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
        if "test" not in cell_stages(cell_dir) and read_status(cell_dir).get("fit_done"):
            return {**write_status(cell_dir, state="done", error=None), "skipped": True}
        try:
            if read_report(cell_dir) is not None:
                status = read_status(cell_dir)
                if status.get("state") != "done":
                    status = write_status(cell_dir, state="done", error=None)
                return {**status, "skipped": True}
        except DamagedReport as damaged:  # set aside (kept for a look) and measured again
            aside = report_path(cell_dir).with_suffix(".json.damaged")
            os.replace(report_path(cell_dir), aside)
            write_status(cell_dir, note=f"{damaged}; moved to {aside.name}, test runs again")
        subprocess_env = cell_env(env)
        _wait_for_writer(cell_dir)
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
                error, outcome = _attempt(cell_dir, cwd, subprocess_env, cpus, stop)
            except BaseException:
                write_status(cell_dir, state="interrupted")
                raise
            if error is None:
                return write_status(cell_dir, state="done", error=None)
            if outcome == "interrupted" or (stop is not None and stop.is_set()):
                return write_status(cell_dir, state="interrupted", error=error)
            if outcome == "bad input":  # refused as given: trying again would be refused again
                return write_status(cell_dir, state="failed", error=error)
            state = "failed" if attempt == retries else "retrying"
            write_status(cell_dir, state=state, error=error)
        return read_status(cell_dir)
    finally:
        lock.release()
