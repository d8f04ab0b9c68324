"""`--trainer.logger` works as Lightning users expect: TensorBoard, MLflow (a local file store)
and W&B (offline) each hold the training curves, the per-epoch reliability and every number of
the `test` report, while the run folder (checkpoints, adapter, report) stays where it was; and
a sweep's cells are grouped in whatever logger its base config uses."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_hardening import run_config

from lora_lightning.report import report_metrics

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
EPOCHS = 2


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lora_lightning", *args], cwd=cwd, capture_output=True,
        text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]


def fit_then_test(tmp_path: Path, model_dir: Path, files: dict[str, Path], logger: list[str],
                  env: dict[str, str] | None = None, test_args: tuple[str, ...] = ()) -> dict:
    """A 2-epoch `fit` (every step logged, reliability probed every epoch), then `test` on its
    config.yaml, as a user runs them with `logger` options; the report's logged numbers."""
    config = run_config(tmp_path, model_dir, files, epochs=EPOCHS)
    cli("fit", "--config", str(config), "--knowledge_eval.every_n_epochs", "1", *logger,
        cwd=tmp_path, env=env)
    run = tmp_path / "runs" / "default"  # the run folder is unchanged by the logger choice
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "adapter").is_dir()
    cli("test", "--config", str(run / "config.yaml"), "--ckpt_path", "last", *test_args,
        cwd=tmp_path, env=env)
    report = json.loads((run / "test" / "report" / "report.json").read_text())
    return report_metrics(report)


def assert_recorded(curves: dict[str, list[tuple[int, float]]], report: dict[str, float],
                    logged_report: dict[str, float]) -> None:
    """The train loss as a curve over steps, reliability once per epoch, every report number."""
    assert len(curves["train/loss"]) >= 2 * EPOCHS
    assert len(curves["val/reliability"]) == EPOCHS
    assert report.keys() <= logged_report.keys(), sorted(report.keys() - logged_report.keys())
    for key, value in report.items():
        assert logged_report[key] == pytest.approx(value, rel=1e-6), key


# ------------------------------------------------------------------ TensorBoard


@pytest.mark.slow
def test_tensorboard_holds_curves_reliability_and_the_report_with_harness_rows(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator")
    pytest.importorskip("lm_eval")
    from test_harness import write_colour_tasks

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_colour_tasks(tasks)
    report = fit_then_test(
        tmp_path, tiny_model_dir, tiny_fact_files,
        ["--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "tb"],
        test_args=("--report.harness_tasks", "colours_mc", "--report.harness_include",
                   str(tasks)),
    )
    assert "report/benchmarks/harness/colours_mc/before/acc" in report
    runs = {}
    for events in (tmp_path / "tb").rglob("events.out.tfevents.*"):
        acc = event_accumulator.EventAccumulator(str(events.parent), size_guidance={
            event_accumulator.SCALARS: 0})
        acc.Reload()
        runs[events.parent] = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
                               for tag in acc.Tags()["scalars"]}
    fit = next(r for r in runs.values() if "train/loss" in r)
    tested = next(r for r in runs.values() if "report/reliability/n_facts" in r)
    assert_recorded(fit, report, {k: v[-1][1] for k, v in tested.items()})


# ------------------------------------------------------------------ MLflow


@pytest.mark.slow
def test_mlflow_file_store_holds_curves_reliability_and_the_report(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    env = {"MLFLOW_ALLOW_FILE_STORE": "true"}  # MLflow 3 wants this for a file store
    uri = f"file:{tmp_path / 'mlruns'}"
    report = fit_then_test(
        tmp_path, tiny_model_dir, tiny_fact_files,
        ["--trainer.logger", "MLFlowLogger", "--trainer.logger.tracking_uri", uri,
         "--trainer.logger.experiment_name", "facts"],
        env=env,
        test_args=("--report.mmlu_dir", str(SHARED / "mmlu"), "--report.mmlu_subjects",
                   "[astronomy]", "--report.mmlu_limit", "2") if SHARED.is_dir() else (),
    )
    os.environ.update(env)  # for the reader, in this process
    try:
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("facts")
        runs = client.search_runs([experiment.experiment_id])
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    fit = next(r for r in runs if "train/loss" in r.data.metrics)
    tested = next(r for r in runs if "report/reliability/n_facts" in r.data.metrics)
    curves = {key: [(m.step, m.value) for m in client.get_metric_history(fit.info.run_id, key)]
              for key in ("train/loss", "val/reliability")}
    assert_recorded(curves, report, tested.data.metrics)
    if SHARED.is_dir():
        assert "report/benchmarks/mmlu/after/accuracy" in tested.data.metrics


# ------------------------------------------------------------------ Weights & Biases (offline)


def wandb_records(path: Path):
    """The protobuf records of an offline run's `.wandb` file: W&B's LevelDB-style log
    (a 7-byte header, then 32 KiB blocks of chunks with a 7-byte header: CRC, length, type;
    types 1 full, 2 first, 3 middle, 4 last). wandb >= 0.19 ships no Python reader for it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(path: Path) -> dict:
    """An offline run's name, group and tags, its history rows and its final summary."""
    run: dict = {"history": [], "summary": {}}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group,
                       tags=list(record.run.tags))
        elif kind == "history":
            run["history"].append({item.key or "/".join(item.nested_key):
                                   json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run["summary"][item.key or "/".join(item.nested_key)] = json.loads(
                    item.value_json)
    return run


@pytest.mark.slow
def test_wandb_offline_run_holds_curves_reliability_and_the_report(
    tiny_model_dir, tiny_fact_files, tmp_path
):
    pytest.importorskip("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
           **{f"WANDB_{d}_DIR": str(tmp_path / "wandb_home") for d in ("CACHE", "CONFIG",
                                                                        "DATA")}}
    report = fit_then_test(
        tmp_path, tiny_model_dir, tiny_fact_files,
        ["--trainer.logger", "WandbLogger", "--trainer.logger.save_dir", "wb",
         "--trainer.logger.project", "facts"],
        env=env,
    )
    runs = [wandb_run(p) for p in (tmp_path / "wb").rglob("offline-run-*/run-*.wandb")]
    assert len(runs) == 2
    # not the default logger's "" carried over by jsonargparse: W&B chooses the name and id
    saved = yaml.safe_load((tmp_path / "runs" / "default" / "config.yaml").read_text())
    assert {saved["trainer"]["logger"]["init_args"][k] for k in ("name", "version")} == {None}
    fit = next(r for r in runs if any("train/loss" in row for row in r["history"]))
    tested = next(r for r in runs if "report/reliability/n_facts" in r["summary"])
    curves = {key: [(row["trainer/global_step"], row[key]) for row in fit["history"]
                    if key in row] for key in ("train/loss", "val/reliability")}
    assert_recorded(curves, report, tested["summary"])


# ------------------------------------------------------------------ choosing loggers


def test_any_logger_choice_keeps_the_run_folder_first(tiny_model_dir, tiny_fact_files, tmp_path,
                                                      monkeypatch):
    """A list of loggers, an appended one (`+=`), one that replaces the default: the run
    folder's ResumableCSVLogger comes first, so checkpoints, config.yaml, adapter and report
    stay in `runs/default` (or `--trainer.default_root_dir`), and `--ckpt_path last` finds
    them; `false` still means no logger at all."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lora_lightning.checkpointing import ResumableCSVLogger
    from lora_lightning.commands.train import run_folder, run_training_cli

    pytest.importorskip("tensorboard")
    monkeypatch.chdir(tmp_path)
    config = str(run_config(tmp_path, tiny_model_dir, tiny_fact_files, epochs=1))

    def loggers(*args: str) -> list:
        cli = run_training_cli(["--config", config, *args], run=False)
        assert run_folder(cli.config.trainer) == (Path(cli.trainer.log_dir)
                                                  if cli.trainer.loggers else None)
        return cli.trainer.loggers

    tb = ["--trainer.logger", "TensorBoardLogger", "--trainer.logger.save_dir", "tb"]
    replaced = loggers(*tb)
    assert [type(lg) for lg in replaced] == [ResumableCSVLogger, TensorBoardLogger]
    assert Path(replaced[0].log_dir) == Path("runs/default")
    moved = loggers(*tb, "--trainer.default_root_dir", "elsewhere")
    assert Path(moved[0].log_dir) == Path("elsewhere")
    both = loggers("--trainer.logger+=TensorBoardLogger", "--trainer.logger.save_dir", "tb")
    assert [type(lg) for lg in both] == [ResumableCSVLogger, TensorBoardLogger]
    assert Path(both[0].log_dir) == Path("runs/default") and both[1].save_dir == "tb"
    listed = loggers("--trainer.logger", yaml.safe_dump(
        [{"class_path": "TensorBoardLogger", "init_args": {"save_dir": "tb", "name": "x"}}]))
    assert [type(lg) for lg in listed] == [ResumableCSVLogger, TensorBoardLogger]
    assert loggers("--trainer.logger", "false") == []


# ------------------------------------------------------------------ sweeps


def test_a_sweeps_cells_are_named_and_grouped_in_the_base_configs_loggers(tmp_path):
    from lora_lightning.commands.train import run_folder
    from lora_lightning.sweep.cellconfig import FitConfigParser
    from lora_lightning.sweep.runner import own_settings
    from lora_lightning.sweep.spec import load_sweep

    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"trainer": {"logger": [
        {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
         "init_args": {"save_dir": "tb"}},
        {"class_path": "lightning.pytorch.loggers.MLFlowLogger",
         "init_args": {"tracking_uri": "file:./mlruns", "tags": {"team": "facts"}}},
        {"class_path": "lightning.pytorch.loggers.WandbLogger",
         "init_args": {"project": "facts", "tags": ["lora"]}},
    ]}}))
    sweep_file = tmp_path / "grid.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "base": "base.yaml",
        "axes": {"n": {"key": "data.n_unknown", "values": [10, 100]},
                 "seed": {"key": "data.seed", "values": [1]}},
    }))
    sweep = load_sweep(sweep_file, output=tmp_path / "sweeps" / "grid")
    parser = FitConfigParser()
    base_logger = parser.parse(sweep.base, {}).trainer.logger
    cell = sweep.cells()[1]
    cell_dir = tmp_path / "sweeps" / "grid" / "cells" / cell.name
    settings = {**cell.settings, **own_settings(sweep, cell, cell_dir, base_logger)}
    config = yaml.safe_load(parser.dump(parser.parse(sweep.base, settings)))

    tb, mlflow, wandb = (entry["init_args"] for entry in config["trainer"]["logger"])
    assert cell.name == "n=100__seed=1"
    assert (tb["save_dir"], tb["name"], tb["version"]) == ("tb", "grid", cell.name)
    assert mlflow["run_name"] == cell.name
    assert {k: str(v) for k, v in mlflow["tags"].items()} == {  # MLflow's tags are strings
        "team": "facts", "sweep": "grid", "cell": cell.name, "n": "100", "seed": "1"}
    assert (wandb["name"], wandb["group"]) == (cell.name, "grid")
    assert wandb["tags"] == ["lora", "n=100", "seed=1"]
    # the cell's run folder: its own folder, through the logger `fit` adds in front
    assert config["trainer"]["default_root_dir"] == str(cell_dir)
    assert run_folder(parser.parse(sweep.base, settings).trainer) == cell_dir

    default = parser.parse(None, {}).trainer.logger  # the default CSV logger: as before
    own = own_settings(sweep, cell, cell_dir, default)
    assert own["trainer.logger"]["init_args"] == {
        "save_dir": str(cell_dir), "name": "", "version": "", "prefix": "",
        "flush_logs_every_n_steps": 100}
    assert "trainer.default_root_dir" not in own  # cell.yaml of earlier sweeps unchanged


def test_the_report_reaches_every_logger_in_calls_mlflow_accepts():
    """Each logger gets every number, at most 500 per call (MLflow refuses over 1000)."""
    from types import SimpleNamespace

    from lora_lightning.knowledge_report import KnowledgeReport

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        def log_metrics(self, metrics: dict, step: int) -> None:
            self.calls.append(metrics)

        def save(self) -> None:
            pass

    loggers = [Recorder(), Recorder()]
    report = KnowledgeReport()
    report.results = {"benchmarks": {"harness": {f"task{i}": {"after": {"acc": i / 1200}}
                                                 for i in range(1200)}}}
    report._log_report(SimpleNamespace(loggers=loggers, global_step=7))
    for logger in loggers:
        assert max(len(c) for c in logger.calls) <= 500
        merged = {k: v for call in logger.calls for k, v in call.items()}
        assert merged == report_metrics(report.results) and len(merged) == 1200
