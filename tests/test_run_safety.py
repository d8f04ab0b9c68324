"""One writer per run folder, nothing overwritten by mistake, sweeps that survive every stop, and
every problem with a path or an option said in one line before any model work."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import yaml
from test_hardening import one_error_line

from lora_lightning.__main__ import main
from lora_lightning.files import FolderBusy, FolderLock, atomic_write_text, check_output_dir
from lora_lightning.sweep.cell import is_done, read_status, report_path, run_cell

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


def cli(*args: str, cwd: Path, timeout: int = 300, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_lightning", *args], cwd=cwd,
                          env=env(**extra), capture_output=True, text=True, timeout=timeout)


def start(*args: str, cwd: Path, log: Path, sigint_ignored: bool = False,
          **extra: str) -> subprocess.Popen:
    """A command in the background, in a session of its own (as a terminal runs it); with
    `sigint_ignored`, as a script's `command &` starts it: SIGINT ignored."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen([sys.executable, "-m", "lora_lightning", *args], cwd=cwd,
                            env=env(**extra), stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=ignore)


def wait_for(condition, what: str, proc: subprocess.Popen | None = None, log: Path | None = None,
             timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited before {what}: {log.read_text()[-3000:] if log else ''}")
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.05)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def processes_with(needle: str) -> list[int]:
    """Live processes whose command line contains `needle` (zombies left out)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and state != "Z":
            found.append(int(proc.name))
    return found


def run_config(root: Path, model_dir: Path, files: dict[str, Path], epochs: int) -> Path:
    config = {
        "seed_everything": 3,
        "model": {"model_name_or_path": str(model_dir), "rank": 4, "alpha": 8.0,
                  "probe": {"n_exp": 2, "max_new_tokens": 4}},
        "data": {"facts": str(files["facts"]), "fewshot_pool": str(files["pool"]),
                 "n_unknown": 8, "extra_per_unknown": 1, "extra_kind": "highly_known",
                 "n_val_known": 4, "batch_size": 4, "max_length": 128},
        "trainer": {"max_epochs": epochs, "accelerator": "cpu", "log_every_n_steps": 1,
                    "enable_progress_bar": False},
        "knowledge_eval": {"every_n_epochs": 0},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture()
def finished_run(tiny_model_dir, tiny_fact_files, tmp_path):
    """A finished one-epoch run in `tmp_path/runs/default`."""
    config = run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs=1)
    fit = cli("fit", "--config", str(config), cwd=tmp_path)
    assert fit.returncode == 0, fit.stderr[-3000:]
    return tmp_path, config, tmp_path / "runs" / "default"


# -- 1: one writer per run folder ---------------------------------------------------------------


@pytest.mark.slow
def test_a_second_fit_into_a_folder_being_written_is_refused_naming_the_holder(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    config = run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs=400)
    run = tmp_path / "runs" / "default"
    first = start("fit", "--config", str(config), cwd=tmp_path, log=tmp_path / "first.log")
    try:
        wait_for(lambda: (run / "checkpoints" / "last.ckpt").is_file(), "a first checkpoint",
                 first, tmp_path / "first.log")
        second = cli("fit", "--config", str(config), "--trainer.max_epochs", "6",
                     "--model.rank", "2", "--overwrite", cwd=tmp_path)
        assert second.returncode == 2
        [line] = error_lines(second.stderr)
        assert str(Path("runs/default")) in line and f"process {first.pid}" in line
        assert "Traceback" not in second.stderr
        test = cli("test", "--config", str(config), "--ckpt_path", "last", cwd=tmp_path)
        assert test.returncode == 2 and "is being written by" in test.stderr
        assert yaml.safe_load((run / "config.yaml").read_text())["model"]["rank"] == 4
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # a killed holder leaves no lock behind
        first.wait()
    again = cli("fit", "--config", str(config), "--trainer.max_epochs", "1", "--overwrite",
                cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(None not in row for row in rows), "every row under one header"


def test_a_folder_lock_is_held_by_one_process_and_freed_when_its_holder_dies(tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom lora_lightning.files import FolderLock\n"
         f"lock = FolderLock({str(folder)!r}).acquire()\n"
         "print('held', flush=True)\ntime.sleep(600)"],
        env=env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=f"process {holder.pid} on"):
        FolderLock(folder).acquire()
    holder.kill()
    holder.wait()
    with FolderLock(folder):  # the kernel dropped the dead holder's lock
        assert json.loads((folder / FolderLock.HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert not folder.exists() or not (folder / FolderLock.HOLDER_NAME).exists()


def test_a_lock_on_a_folder_it_made_leaves_nothing_when_nothing_was_written(tmp_path):
    with FolderLock(tmp_path / "runs" / "new"):
        assert (tmp_path / "runs" / "new").is_dir()
    assert not (tmp_path / "runs").exists()


# -- 2: nothing overwritten by a rejected or a new fit -------------------------------------------


@pytest.mark.slow
def test_a_rejected_fit_leaves_the_finished_run_whole(finished_run):
    root, config, run = finished_run
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "writer" not in p.name}
    for args in (["--model.rank", "0"], [], ["--model.rank", "0", "--overwrite"]):
        result = cli("fit", "--config", str(config), *args, cwd=root)
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(error_lines(result.stderr)) == 1
    assert "already holds a run" in cli("fit", "--config", str(config), cwd=root).stderr
    now = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "writer" not in p.name}
    assert now == files, "a refused fit changed the run folder"
    test = cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", "last", cwd=root)
    assert test.returncode == 0, test.stderr[-3000:]


@pytest.mark.slow
def test_fit_overwrite_replaces_the_whole_earlier_run(finished_run):
    root, config, run = finished_run
    (run / "test").mkdir()
    (run / "test" / "stale.txt").write_text("from the earlier run")
    result = cli("fit", "--config", str(config), "--model.rank", "2", "--overwrite", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fit --overwrite: removed the earlier run's" in result.stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["rank"] == 2
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and not (run / "test").exists()


def test_a_fit_refused_for_its_settings_writes_nothing(tiny_model_dir, tiny_fact_files, tmp_path):
    """The rank is checked against the layers once the model is loaded: still before any
    file is written (Lightning saved config.yaml before that)."""
    config = run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs=1)
    result = cli("fit", "--config", str(config), "--model.rank", "999", cwd=tmp_path)
    assert result.returncode == 2 and "LoRA rank 999" in result.stderr
    assert not (tmp_path / "runs").exists()


# -- 3: a torn report never marks a cell done ------------------------------------------------------


def fake_cell(root: Path, name: str, report: str | None) -> Path:
    cell = root / "cells" / name
    (cell / "test" / "report").mkdir(parents=True)
    (cell / "cell.json").write_text(json.dumps(
        {"name": name, "labels": {"n": name[2:]}, "axes": {"n": {"data.n_unknown": 2}}}))
    (cell / "cell.yaml").write_text(yaml.safe_dump({"data": {"n_unknown": 2}}))
    (cell / "status.json").write_text(json.dumps({"state": "done", "attempts": 1,
                                                  "fit_done": True}))
    if report is not None:
        report_path(cell).write_text(report)
    return cell


WHOLE = json.dumps({"reliability": {"reliability": 1.0, "n_facts": 2},
                    "shift": {"positive": 0, "negative": 0, "total": 4}})


def test_a_torn_or_empty_report_is_not_done_and_aggregate_names_it(tmp_path, capsys):
    from lora_lightning.sweep.aggregate import aggregate_sweep

    (tmp_path / "sweep.json").write_text(json.dumps(
        {"sweeps": [{"file": "s.yaml", "fingerprint": "x", "raw": {}}]}))
    whole = fake_cell(tmp_path, "n=1", WHOLE)
    torn = fake_cell(tmp_path, "n=2", WHOLE[:40])
    empty = fake_cell(tmp_path, "n=3", "{}")
    assert is_done(whole) and not is_done(torn) and not is_done(empty)
    (tmp_path / "summary.csv").write_text("stale\n")
    out = aggregate_sweep(tmp_path, plots=False)
    err = capsys.readouterr().err
    for cell in (torn, empty):
        [line] = [x for x in err.splitlines() if str(report_path(cell)) in x]
        assert "runs again" in line
    with open(out["summary"]) as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert rows["n=1"]["state"] == "done" and rows["n=1"]["reliability"] == "1.0"
    assert rows["n=2"]["state"] == rows["n=3"]["state"] == "damaged"
    assert rows["n=2"]["reliability"] == ""


def test_a_cell_with_a_torn_report_sets_it_aside_and_runs_test_again(tmp_path):
    cell = fake_cell(tmp_path, "n=2", WHOLE[:40])
    calls = []

    def fake_run(cmd, log, cwd, env, cpus):
        calls.append(cmd[3])  # fit or test
        report_path(cell).write_text(WHOLE)
        return 0

    with mock.patch("lora_lightning.sweep.cell._run", fake_run):
        status = run_cell(cell, tmp_path)
    assert calls == ["test"] and status["state"] == "done"
    assert report_path(cell).with_suffix(".json.damaged").read_text() == WHOLE[:40]
    assert "moved to report.json.damaged" in read_status(cell)["note"]


def test_atomic_writes_leave_the_old_file_and_no_partial_one_when_writing_fails(tmp_path):
    path = atomic_write_text(tmp_path / "report.json", "old")
    with mock.patch.object(Path, "write_text", side_effect=OSError(errno.ENOSPC, "No space")), \
            pytest.raises(OSError, match="report.json: No space; free some space"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]


# -- 4, 5: Ctrl-C and kill -9 of a sweep -----------------------------------------------------------


def one_cell_sweep(root: Path, world, epochs: int) -> Path:
    path = root / "one.yaml"
    path.write_text(yaml.safe_dump({
        "overrides": {"model.model_name_or_path": str(world.model_dir),
                      "data.facts": str(world.facts_path),
                      "data.fewshot_pool": str(world.pool_path), "trainer.max_epochs": epochs,
                      "data.n_val_known": 2, "data.batch_size": 2, "model.probe.n_exp": 2,
                      "knowledge_eval.every_n_epochs": 0},
        "axes": {"n": {"key": "data.n_unknown", "values": [4]}},
    }))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "ctrl-c, started by a script with &", "kill -9"])
def test_a_stopped_sweep_leaves_no_cell_running_and_a_rerun_finishes_it(
    how, small_world, tmp_path
):
    sweep_file = one_cell_sweep(tmp_path, small_world, epochs=8)
    cell = tmp_path / "sweeps" / "one" / "cells" / "n=4"
    log = tmp_path / "sweep.log"
    sweep = start("sweep", "--config", str(sweep_file), "--workers", "1", cwd=tmp_path, log=log,
                  sigint_ignored="script" in how)
    wait_for(lambda: (cell / "checkpoints" / "last.ckpt").is_file(), "a checkpoint", sweep, log)
    assert processes_with(str(cell / "cell.yaml")), "the cell's fit should be running"
    if how.startswith("ctrl-c"):  # a terminal sends SIGINT to the whole foreground group
        os.killpg(sweep.pid, signal.SIGINT)
        assert sweep.wait(timeout=120) != 0
        assert read_status(cell)["state"] == "interrupted"
        assert "marked interrupted" in log.read_text()
        index = json.loads((tmp_path / "sweeps" / "one" / "cells.json").read_text())
        assert index[0]["state"] == "interrupted"
    else:  # the sweep alone, as an OOM killer or `kill -9 <pid>` would
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
    wait_for(lambda: not processes_with(str(cell / "cell.yaml")), "the cell's fit to end",
             timeout=120)
    rerun = cli("sweep", "--config", str(sweep_file), "--workers", "1", "--aggregate", "false",
                cwd=tmp_path, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    status = read_status(cell)
    assert status["state"] == "done" and status["resumed"] is True


# -- 6: tracebacks that became one line ------------------------------------------------------------


def full_disk(folder: Path) -> bool:
    """A real full disk: a tiny tmpfs at `folder`, filled (False where mounting is not
    permitted; the test then fills the disk by other means)."""
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(folder)],
                          capture_output=True)
    if made.returncode != 0:
        return False
    with open(folder / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return True


@pytest.mark.slow
def test_a_full_disk_during_fit_is_one_line_and_leaves_no_partial_checkpoint(
    tiny_model_dir, tiny_fact_files, tmp_path, capsys
):
    config = run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs=1)
    checkpoints = tmp_path / "disk"
    real = False
    argv = ["fit", "--config", str(config), "--checkpoint.dirpath", str(checkpoints),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "run")]
    try:
        real = full_disk(checkpoints)
        if real:
            line = one_error_line(capsys, argv)
        else:  # the write fails as on a full disk: half a file, then ENOSPC
            def half_then_full(checkpoint, path):
                Path(path).write_bytes(b"\0" * 100)
                raise OSError(errno.ENOSPC, "No space left on device", str(path))

            with mock.patch("lightning.fabric.plugins.io.torch_io._atomic_save", half_then_full):
                line = one_error_line(capsys, argv)
        assert "ENOSPC" in line and str(checkpoints / "last.ckpt") in line
        assert "free some space" in line
        assert not [p for p in checkpoints.iterdir() if p.name != "filler"]
    finally:
        if os.path.ismount(checkpoints):
            subprocess.run(["umount", str(checkpoints)], check=False)


@pytest.mark.parametrize("kind", ["a file", "below a file", "read-only"])
def test_an_unusable_lora_lightning_home_is_one_line_naming_it(kind, tmp_path, capsys,
                                                               monkeypatch):
    from lora_lightning.world import WorldConfig, ensure_world

    home = {"a file": tmp_path / "home", "below a file": tmp_path / "home" / "cache",
            "read-only": tmp_path / "ro"}[kind]
    if kind != "read-only":
        (tmp_path / "home").write_text("")
    else:  # root may write anywhere: refuse the folder's creation as a read-only disk would
        real_mkdir = Path.mkdir

        def read_only(self, *args, **kwargs):
            if self == home:
                raise OSError(errno.EROFS, "Read-only file system", str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", read_only)
    monkeypatch.setenv("LORA_LIGHTNING_HOME", str(home))
    with pytest.raises(OSError) as err:
        ensure_world(WorldConfig.tiny(), progress=False)
    message = str(err.value)
    assert message.startswith(f"LORA_LIGHTNING_HOME={home}")
    assert "a writable folder" in message or "is a file, not a folder" in message
    if kind == "a file":
        line = one_error_line(capsys, ["world", "--scale", "small"])
        assert f"LORA_LIGHTNING_HOME={home}" in line


# -- 7: every option and output path checked before any model work -------------------------------


@pytest.mark.parametrize("limit", ["0", "-2", "1.5"])
def test_bad_harness_limits_are_refused_before_the_model_loads(limit, tmp_path, capsys):
    with mock.patch("lora_lightning.commands.evaluate.load_model") as load:
        line = one_error_line(capsys, ["evaluate", "--model", "world", "--harness_tasks",
                                       "hellaswag", "--harness_limit", limit])
    assert "--harness_limit must be" in line and not load.called
    with mock.patch("lora_lightning.module.load_base_model") as load:
        line = one_error_line(capsys, ["test", "--report.harness_tasks", "hellaswag",
                                       "--report.harness_limit", limit,
                                       "--trainer.default_root_dir", str(tmp_path)])
    assert "report.harness_limit must be" in line and not load.called


def test_more_workers_than_cores_is_refused_before_the_sweep_folder_exists(
    small_world, tmp_path, capsys
):
    sweep_file = one_cell_sweep(tmp_path, small_world, epochs=1)
    line = one_error_line(capsys, ["sweep", "--config", str(sweep_file), "--workers",
                                   str(CORES + 1), "--output", str(tmp_path / "out")])
    assert f"--workers {CORES + 1}" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting", ["checkpoint.dirpath", "save_adapter.dirpath"])
def test_a_file_where_an_output_folder_should_be_is_refused_before_training(
    setting, tiny_model_dir, tiny_fact_files, tmp_path, capsys
):
    config = run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs=1)
    (tmp_path / "in_the_way").write_text("")
    with mock.patch("lora_lightning.module.load_base_model") as load:
        line = one_error_line(capsys, ["fit", "--config", str(config), f"--{setting}",
                                       str(tmp_path / "in_the_way"),
                                       "--trainer.default_root_dir", str(tmp_path / "run")])
    assert setting in line and "is a file, not a folder" in line and not load.called
    assert not (tmp_path / "run").exists()


def test_output_folder_checks_name_the_file_in_the_way(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(OSError, match="report.report_dir .*f is a file"):
        check_output_dir(tmp_path / "f" / "report", "report.report_dir")
    assert check_output_dir(tmp_path / "new" / "folder", "x") == tmp_path / "new" / "folder"


# -- 8: the smaller ones ---------------------------------------------------------------------------


def test_every_command_help_starts_with_a_whole_sentence(capsys):
    from lora_lightning.__main__ import COMMANDS

    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        description = text.split("\n\n")[1].replace("\n", " ").strip()
        assert description.endswith("."), f"{name} --help: {description!r}"


def test_harness_runs_ask_git_quietly_outside_a_checkout(tmp_path):
    pytest.importorskip("lm_eval")
    code = ("from lora_lightning.harness import _harness_side_effects_contained\n"
            "from lm_eval import evaluator\n"
            "with _harness_side_effects_contained():\n"
            "    print(evaluator.get_git_commit_hash())\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fatal" not in result.stderr and result.stdout.strip() == "None"


def test_a_refused_cell_is_not_tried_again(tmp_path):
    cell = fake_cell(tmp_path, "n=2", None)
    (cell / "status.json").write_text("{}")
    (cell / "fit.log").write_text("error: ValueError: not enough Unknown facts\n")

    with mock.patch("lora_lightning.sweep.cell._run", return_value=2) as run:
        status = run_cell(cell, tmp_path, retries=1)
    assert run.call_count == 1 and status["state"] == "failed" and status["attempts"] == 1
    assert "not enough Unknown facts" in status["error"]
    assert "--overwrite" in run.call_args.args[0]  # a fresh fit in the sweep's own folder


def test_a_cell_stopped_by_a_signal_is_interrupted_not_failed(tmp_path):
    cell = fake_cell(tmp_path, "n=2", None)
    (cell / "status.json").write_text("{}")
    with mock.patch("lora_lightning.sweep.cell._run", return_value=128 + signal.SIGTERM) as run:
        status = run_cell(cell, tmp_path, retries=1)
    assert run.call_count == 1 and status["state"] == "interrupted"


def test_a_cell_subprocess_dies_with_the_process_that_started_it(tmp_path):
    """`follow_parent`: kill -9 of the parent sends the child SIGTERM."""
    code = ("import os, subprocess, sys, time\n"
            "from lora_lightning.sweep.cell import cell_env\n"
            "child = subprocess.Popen([sys.executable, '-c', 'from lora_lightning.sweep.cell "
            "import follow_parent; follow_parent(); import time; print(1, flush=True); "
            "time.sleep(600)'], env=cell_env(), stdout=subprocess.PIPE)\n"
            "child.stdout.readline(); print(child.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], env=env(), stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    wait_for(lambda: not Path(f"/proc/{child}").exists() or
             (Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"),
             "the child to die", timeout=30)


@pytest.mark.slow
def test_a_moved_sweep_folder_reruns_without_refusing_its_cells(small_world, tmp_path):
    sweep_file = one_cell_sweep(tmp_path, small_world, epochs=1)
    first = cli("sweep", "--config", str(sweep_file), "--output", "a", cwd=tmp_path,
                timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "sweep: tables in" in first.stdout and str(Path("a") / "summary.csv") in first.stdout
    (tmp_path / "a").rename(tmp_path / "b")
    cell = tmp_path / "b" / "cells" / "n=4"
    (cell / "test" / "report" / "report.json").unlink()  # the cell's test must run again
    again = cli("sweep", "--config", str(sweep_file), "--output", "b", cwd=tmp_path,
                timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert is_done(cell) and str(tmp_path / "a") not in (cell / "cell.yaml").read_text()


@pytest.mark.slow
def test_throughput_counters_go_on_after_a_resume(finished_run):
    root, config, run = finished_run
    resumed = cli("fit", "--config", str(config), "--ckpt_path", "last",
                  "--trainer.max_epochs", "2", cwd=root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with open(run / "metrics.csv") as f:
        samples = [float(r["train/samples"]) for r in csv.DictReader(f) if r.get("train/samples")]
    assert samples == sorted(samples) and len(set(samples)) == len(samples), samples


def test_ask_refuses_prompts_longer_than_the_context_and_says_what_fits(
    tiny_model_dir, tiny_fact_files, capsys
):
    """The tiny model takes 512 positions; 8 shots of its colour questions do not fit."""
    line = one_error_line(capsys, [
        "ask", "--model", str(tiny_model_dir), "--pool", str(tiny_fact_files["pool"]),
        "--n_shot", "8", "--max_new_tokens", "400", "What colour is item 3?"])
    assert "more than the model's context (512 tokens)" in line and "--n_shot" in line


def test_many_threads_checking_one_home_at_once_all_pass(tmp_path):
    """The writability probe is unique per caller: two threads of one process once removed
    each other's probe file (the world's concurrent build test failed on it, now and then)."""
    import threading

    from lora_lightning.files import writable_home

    errors: list[BaseException] = []

    def check() -> None:
        try:
            for _ in range(50):
                writable_home(tmp_path / "home", "LORA_LIGHTNING_HOME")
        except BaseException as err:  # noqa: BLE001 - collected for the assertion
            errors.append(err)

    threads = [threading.Thread(target=check) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and list((tmp_path / "home").iterdir()) == []


@pytest.mark.parametrize("value", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_an_unset_or_empty_home_is_the_user_cache_not_the_current_folder(monkeypatch, value):
    from lora_lightning.files import default_home

    if value is None:
        monkeypatch.delenv("LORA_LIGHTNING_HOME", raising=False)
    else:
        monkeypatch.setenv("LORA_LIGHTNING_HOME", value)
    assert default_home() == Path.home() / ".cache" / "lora_lightning"


# -- issue 36 §3: outputs written through temporary files respect the umask -------------------


@contextlib.contextmanager
def umask_set(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def tree_modes(root: Path) -> dict[str, set[int]]:
    """The permission bits of `root` and everything below it, by kind ("dir", "file")."""
    found: dict[str, set[int]] = {"dir": set(), "file": set()}
    for path in [root, *root.rglob("*")]:
        found["dir" if path.is_dir() else "file"].add(stat.S_IMODE(path.stat().st_mode))
    return found


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"),
                         [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_files_written_whole_get_the_umasks_mode_and_a_replaced_file_keeps_its_own(
    mask, file_mode, dir_mode, tiny_model_dir, tmp_path
):
    """report.json, status.json, metrics.csv after a resume, fact files and `facts` output are
    written through `atomic_path`; the adapter's weights by safetensors (0600 by itself)."""
    from transformers import AutoModelForCausalLM

    from lora_lightning.facts import Fact, save_facts
    from lora_lightning.files import plain_mode
    from lora_lightning.lora import inject_lora, save_adapter

    with umask_set(mask):
        report = atomic_write_text(tmp_path / "report.json", "{}")
        facts = save_facts([Fact(id="f1", question="Where?", answers=["here"])],
                           tmp_path / "facts.jsonl")
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
        adapter = save_adapter(model, tmp_path / "adapter", "tiny")
        private = tmp_path / "made-by-mkdtemp"
        private.mkdir(mode=0o700)
        (private / "weights").write_bytes(b"")
        (private / "weights").chmod(0o600)
        (private / "run.sh").write_bytes(b"")
        (private / "run.sh").chmod(0o700)
        plain_mode(private, tree=True)
    for path in (report, facts, adapter / "adapter_model.safetensors",
                 adapter / "adapter_config.json", private / "weights"):
        assert stat.S_IMODE(path.stat().st_mode) == file_mode, path
    assert stat.S_IMODE((private / "run.sh").stat().st_mode) == dir_mode  # executable stays so
    assert stat.S_IMODE(private.stat().st_mode) == dir_mode

    report.chmod(0o640)  # a file replaced whole keeps its mode, as a plain open() does
    with umask_set(mask):
        atomic_write_text(report, "{} ")
    assert stat.S_IMODE(report.stat().st_mode) == 0o640
