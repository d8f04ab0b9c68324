"""Hardening of `sweep`, `capacity` and `aggregate` (issue 38, items 1, 2, 6, 9 and 10): what
a new user's bad input and damaged files did to them, each now one line naming the file or the
setting, checked before anything is launched, or repaired and said."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml

from lora_lightning.commands.capacity import capacity_command
from lora_lightning.commands.sweep import sweep_command
from lora_lightning.sweep.aggregate import aggregate_sweep
from lora_lightning.sweep.cell import (
    DamagedReport,
    error_line,
    read_report,
    read_status,
    report_path,
    write_status,
)
from lora_lightning.sweep.spec import SweepFileError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


N_AXIS = {"n": {"key": "data.n_unknown", "values": [2, 3]}}


# ------------------------------------------- 1. a model that does not resolve, categorize


def test_a_model_that_does_not_resolve_is_refused_by_the_dry_run_naming_it(tmp_path):
    """Without the `real` extra, the shipped SmolLM2 files named no such package only after
    the dry run had said all was well, in a traceback from `categorize` inside the sweep."""
    missing = "pkg:no_such_model_package/model.gguf"
    sweep_file = write(tmp_path / "s.yaml", {
        "base": str(ROOT / "configs/real/smollm2_135m.yaml"),
        "categorize": {"facts": str(tmp_path / "facts.jsonl")},
        "overrides": {"model.model_name_or_path": missing}, "axes": N_AXIS})
    with pytest.raises(SweepFileError) as err:
        sweep_command(str(sweep_file), output=str(tmp_path / "out"), dry_run=True)
    message = str(err.value)
    assert str(sweep_file) in message and "overrides" in message
    assert "no installed package 'no_such_model_package'" in message
    assert "\n" not in message and not (tmp_path / "out").exists()

    capacity_file = write(tmp_path / "c.yaml", {
        "base": str(ROOT / "configs/real/smollm2_135m.yaml"),
        "categorize": {"facts": str(tmp_path / "facts.jsonl"), "model": missing},
        "variants": {"r4": {"model.rank": 4}}})
    with pytest.raises(SweepFileError) as err:
        capacity_command(str(capacity_file), output=str(tmp_path / "cap"), dry_run=True)
    assert "categorize.model" in str(err.value) and "no_such_model_package" in str(err.value)


def test_a_failed_categorize_says_its_cause_in_one_line(tmp_path):
    """The sweep quoted the log's last line, "(set LORA_LIGHTNING_DEBUG=1 ...)", in a
    RuntimeError's traceback; the cause was only in the log."""
    from lora_lightning.sweep.shared import categorized_settings
    from lora_lightning.sweep.spec import load_sweep

    facts = tmp_path / "raw.jsonl"
    facts.write_text(json.dumps({"id": "f0", "question": "What colour is item 0?",
                                 "answers": ["red"], "subject": "item 0"}) + "\n")
    sweep_file = write(tmp_path / "s.yaml", {"categorize": {"facts": str(facts)},
                                             "axes": N_AXIS})
    sweep = load_sweep(sweep_file, output=tmp_path / "out")
    sweep.output.mkdir()
    with pytest.raises(SweepFileError) as err:
        categorized_settings(sweep, "pkg:no_such_model_package/model.gguf",
                             lambda function, *args: function(*args))
    message = str(err.value)
    assert message.startswith(f"sweep file {sweep_file}: categorize: categorize exited with 2")
    assert "no installed package 'no_such_model_package'" in message
    assert "LORA_LIGHTNING_DEBUG" not in message and "categorize.log" in message


# ------------------------------------------------- 2. every cell checked as `fit` checks it


@pytest.mark.parametrize(("body", "key", "problem"), [
    ({"overrides": {"model.rank": 0}, "axes": N_AXIS}, "overrides", "model.rank"),
    ({"overrides": {"model.lr": -1.0}, "axes": N_AXIS}, "overrides", "model.lr must be positive"),
    ({"axes": {**N_AXIS, "lr": {"key": "model.lr", "values": [1e-3, -1.0]}}}, "axes.lr.-1",
     "model.lr"),
    ({"overrides": {"knowledge_eval.every_n_epochs": -2}, "axes": N_AXIS}, "overrides",
     "knowledge_eval.every_n_epochs"),
    ({"overrides": {"data.batch_size": 0}, "axes": N_AXIS}, "overrides", "data: batch_size"),
    # refused only beside another axis' value (the base sets no extras): found in the cell
    # that combines them
    ({"base": "no_extras.yaml", "axes": {
        **N_AXIS, "kind": {"key": "data.extra_kind", "values": ["none"]},
        "k": {"key": "data.extra_per_unknown", "values": [0, 1]}}},
     "axes (cell n=2__kind=none__k=1)", "extra_kind"),
])
def test_a_value_fit_would_refuse_fails_the_dry_run_naming_the_key(body, key, problem, tmp_path):
    write(tmp_path / "no_extras.yaml", {"data": {"extra_per_unknown": 0}})
    sweep_file = write(tmp_path / "s.yaml", {"world": "small", **body})
    with pytest.raises(SweepFileError) as err:
        sweep_command(str(sweep_file), output=str(tmp_path / "out"), dry_run=True)
    assert err.value.key == key and problem in str(err.value)
    assert not (tmp_path / "out").exists()


def test_a_capacity_variant_fit_would_refuse_fails_the_dry_run_naming_the_variant(tmp_path):
    path = write(tmp_path / "c.yaml", {"world": "small", "variants": {
        "r4": {"model.rank": 4}, "r0": {"model.rank": 0}}})
    with pytest.raises(SweepFileError) as err:
        capacity_command(str(path), output=str(tmp_path / "out"), dry_run=True)
    assert err.value.key == "variants.r0" and "model.rank must be an integer >= 1" in str(err.value)


def test_a_bad_value_launches_no_cell_and_makes_no_folder(small_world, tmp_path, monkeypatch):
    from lora_lightning.sweep import local

    launched: list = []
    monkeypatch.setattr(local, "run_local", lambda jobs, *args: launched.extend(jobs) or {})
    body = fake_grid(small_world)
    body["overrides"]["model.rank"] = 0
    with pytest.raises(SweepFileError, match="model.rank"):
        sweep_command(str(write(tmp_path / "s.yaml", body)), output=str(tmp_path / "out"))
    assert launched == [] and not (tmp_path / "out").exists()


def test_the_settings_check_builds_the_module_without_loading_any_weights(tmp_path):
    """A folder with a config.json and no weights passes: the check builds the LightningModule
    and the data module (whose constructors check their arguments), and loads nothing."""
    from lora_lightning.sweep.cellconfig import FitConfigParser

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    parser = FitConfigParser()
    parser.check(parser.parse(None, {"model.model_name_or_path": str(model),
                                     "data.facts": str(tmp_path / "not_read.jsonl")}))
    with pytest.raises(ValueError, match="model.lora_dropout"):
        parser.check(parser.parse(None, {"model.model_name_or_path": str(model),
                                         "model.lora_dropout": 1.5}))


# ------------------------------------------ 6 and 9. damaged files of a sweep folder, rerun


def fake_grid(small_world) -> dict:
    return {
        "overrides": {"model.model_name_or_path": str(small_world.model_dir),
                      "data.facts": str(small_world.facts_path),
                      "data.fewshot_pool": str(small_world.pool_path),
                      "knowledge_eval.every_n_epochs": 0},
        "axes": {"n": {"key": "data.n_unknown", "values": [2, 3, 4]}},
    }


def finish_cells(jobs, *args) -> dict:
    """A stand-in launcher that finishes every cell with a whole report."""
    from test_sweep import fake_report

    for name, folder in jobs:
        n = int(name.split("=")[1])
        report_path(folder).parent.mkdir(parents=True, exist_ok=True)
        report_path(folder).write_text(json.dumps(fake_report(0.9, n, "none", 0, 1)))
        write_status(folder, state="done", attempts=1, fit_done=True)
    return {name: read_status(folder) for name, folder in jobs}


def test_a_rerun_sets_aside_a_report_that_is_not_utf8_and_repairs_a_torn_status(
    small_world, tmp_path, monkeypatch, capsys
):
    from lora_lightning.sweep import local

    monkeypatch.setattr(local, "run_local", finish_cells)
    sweep_file = write(tmp_path / "s.yaml", fake_grid(small_world))
    out = tmp_path / "out"
    assert sweep_command(str(sweep_file), output=str(out), aggregate=False)["done"] == 3
    cells = out / "cells"
    report_path(cells / "n=2").write_bytes(b'{"reliability": "\xff\xfe\x00 torn')
    (cells / "n=3" / "status.json").write_text('{"state": "do')
    capsys.readouterr()

    launched: list = []
    monkeypatch.setattr(local, "run_local", lambda jobs, *args: launched.extend(jobs) or {})
    result = sweep_command(str(sweep_file), output=str(out))
    shown = capsys.readouterr().out
    assert [name for name, _ in launched] == ["n=2"]
    assert f"n=2: {report_path(cells / 'n=2')}: not UTF-8 text" in shown  # said, not only filed
    assert "n=3: " in shown and "status.json was damaged" in shown
    assert read_status(cells / "n=3")["state"] == "done"
    assert "sweep: 2/3 cells done; 1 to run" in shown
    assert "sweep: 2/3 cells done, 0 failed" in shown  # the same count at the end
    assert result["done"] == 2
    index = {c["cell"]: c["state"] for c in json.loads((out / "cells.json").read_text())}
    assert index == {"n=2": "pending", "n=3": "done", "n=4": "done"}
    rows = (out / "summary.csv").read_text()
    assert "n=2,damaged" in rows and "n=3,done" in rows


def test_a_report_that_is_not_utf8_is_damaged_for_aggregate_not_a_crash(tmp_path, capsys):
    from test_sweep import fake_sweep

    root = fake_sweep(tmp_path / "s")
    cell = root / "cells" / "n=10__mix=+0__seed=1"
    report_path(cell).write_bytes(b"\x89PNG\r\n\x1a\n not a report")
    with pytest.raises(DamagedReport, match="not UTF-8"):
        read_report(cell)
    written = aggregate_sweep(root, plots=False)
    assert "n=10__mix=+0__seed=1,damaged" in written["summary"].read_text()
    assert str(report_path(cell)) in capsys.readouterr().err


def test_a_cell_keeps_one_checkpoint_and_older_cells_with_two_are_the_same_run(
    small_world, tmp_path, monkeypatch
):
    """`fit` writes last.ckpt after every epoch, so a cell needs no top-k copy of it (which
    doubled every cell's disk); a folder of an older sweep that kept one is reused as it is."""
    from lora_lightning.sweep import local

    monkeypatch.setattr(local, "run_local", lambda jobs, *args: {})
    sweep_file = write(tmp_path / "s.yaml", fake_grid(small_world))
    out = tmp_path / "out"
    sweep_command(str(sweep_file), output=str(out), aggregate=False)
    config_path = out / "cells" / "n=2" / "cell.yaml"
    config = yaml.safe_load(config_path.read_text())
    assert config["checkpoint"]["save_top_k"] == 0 and config["checkpoint"]["save_last"]
    config["checkpoint"].update(save_top_k=1, every_n_epochs=1)  # as older sweeps wrote it
    config_path.write_text(yaml.safe_dump(config))
    sweep_command(str(sweep_file), output=str(out), aggregate=False)
    assert yaml.safe_load(config_path.read_text())["checkpoint"]["save_top_k"] == 0


# ------------------------------------------------------------------ 10. what a user reads


def test_an_interrupted_attempt_is_not_reported_by_its_log_header(tmp_path):
    log = tmp_path / "test.log"
    log.write_text(
        "\n=== 2025-01-01 10:00:00 on host: python -m lora_lightning test --config c.yaml\n"
        "ValueError: an earlier attempt's error\n"
        "\n=== 2025-01-01 11:00:00 on host: python -m lora_lightning test --config c.yaml\n")
    assert error_line(log) == "no output"
    with open(log, "a") as f:
        f.write("error: FileNotFoundError: data.facts: no such file\n(set ... traceback)\n")
    assert error_line(log) == "error: FileNotFoundError: data.facts: no such file"


def test_the_capacity_dry_run_shows_the_first_probe_the_run_makes(small_world, tmp_path, capsys):
    """n_start above the Unknown facts there are: the run probes them all, not n_start."""
    from lora_lightning.facts import load_facts

    unknown = sum(f.category == "Unknown" for f in load_facts(small_world.facts_path))
    path = write(tmp_path / "c.yaml", {
        "overrides": {"model.model_name_or_path": str(small_world.model_dir),
                      "data.facts": str(small_world.facts_path),
                      "data.fewshot_pool": str(small_world.pool_path)},
        "variants": {"r4": {"model.rank": 4}}, "search": {"n_start": 100000}})
    capacity_command(str(path), output=str(tmp_path / "out"), dry_run=True)
    shown = capsys.readouterr().out
    assert f"next probe n={unknown}]" in shown and "next probe n=100000" not in shown
    world = write(tmp_path / "w.yaml", {"world": "small", "variants": {"r4": {"model.rank": 4}},
                                        "search": {"n_start": 100000}})
    capacity_command(str(world), output=str(tmp_path / "out"), dry_run=True)
    assert "next probe n=100000 (or fewer: the Unknown facts there are)" in capsys.readouterr().out


def test_reports_of_a_run_with_nothing_to_plot_yet_raise_no_matplotlib_warnings(tmp_path):
    """Every probe failed, or none finished: empty plots, and no "No artists with labels"."""
    from test_sweep import fake_sweep

    from lora_lightning.sweep.capacity.report import write_capacity_report
    from lora_lightning.sweep.capacity.search import load_capacity

    capacity = load_capacity(write(tmp_path / "c.yaml", {
        "world": "small", "variants": {"r4": {"model.rank": 4}}}), output=tmp_path / "cap")
    capacity.sweep.output.mkdir()
    root = fake_sweep(tmp_path / "s")
    for report in (root / "cells").glob("*/test/report/report.json"):
        report.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_capacity_report(capacity, None)
        assert written["nstar_vs_parameters"].is_file()
        aggregate_sweep(root)
