"""What ships works on a user's machine: the shipped configs run from a fresh clone with no
folder outside the repository, and the benchmark data they name ships with the package."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_lightning import evaluation

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# CI's copies of the same files, which the rest of the suite scores against
CI_DATA = ROOT.parent / "shared" / "data"
SHIPPED = ROOT / "lora_lightning" / "benchmark_data"


def _kind(config: Path) -> str:
    """"sweep", "capacity" or "fit": what command a shipped config is for."""
    raw = yaml.safe_load(config.read_text()) or {}
    if "variants" in raw:
        return "capacity"
    return "sweep" if "axes" in raw else "fit"


def _shipped_configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def test_no_shipped_config_points_outside_the_repository():
    """`../shared` is our CI's folder: a user has none."""
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _shipped_configs()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "../shared" in line or "/shared/data" in line
    ]
    assert not offenders


def test_the_shipped_benchmark_data_is_the_data_the_project_scores_with():
    """MMLU's dev and test splits and TruthfulQA.csv, byte for byte the copies CI scores
    against, each with its licence (MMLU: MIT, TruthfulQA: Apache-2.0)."""
    for split in ("dev", "test"):
        ours, theirs = SHIPPED / "mmlu" / split, CI_DATA / "mmlu" / split
        names = sorted(p.name for p in theirs.glob("*.csv"))
        assert sorted(p.name for p in ours.glob("*.csv")) == names and len(names) == 57
        match, mismatch, errors = filecmp.cmpfiles(ours, theirs, names, shallow=False)
        assert (mismatch, errors) == ([], [])
    assert filecmp.cmp(SHIPPED / "truthfulqa" / "TruthfulQA.csv",
                       CI_DATA / "truthfulqa" / "TruthfulQA.csv", shallow=False)
    assert "MIT License" in (SHIPPED / "mmlu" / "LICENSE").read_text()
    assert "Apache License" in (SHIPPED / "truthfulqa" / "LICENSE").read_text()


def test_the_shipped_data_is_named_the_same_wherever_a_command_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = evaluation.SHIPPED_DATA
    assert len(evaluation.mmlu_subjects(data)) == 57
    assert len(evaluation.load_mmlu(f"{data}/mmlu", "dev", ["astronomy"])) == 5
    assert len(evaluation.load_truthfulqa(f"{data}/truthfulqa/TruthfulQA.csv")) == 817
    with pytest.raises(FileNotFoundError, match="MMLU data: 'pkg:lora_lightning/nothing'"):
        evaluation.BenchmarkSettings(mmlu_dir="pkg:lora_lightning/nothing").check_data()


def test_the_package_ships_the_benchmark_data():
    """The wheel carries the files (setuptools' package data), not only a source checkout."""
    import tomllib

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["lora_lightning"]
    package = ROOT / "lora_lightning"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert shipped == {p for p in SHIPPED.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """The shipped configs in a folder of their own, with no `../shared` beside it."""
    clone = tmp_path_factory.mktemp("user") / "lora-lightning"
    shutil.copytree(CONFIGS, clone / "configs")
    assert not (clone.parent / "shared").exists()
    return clone


def _run(clone: Path, *args: str, online: bool = False) -> str:
    """The command in the clone. `online`: as a user online (a hub id is then taken as given,
    as `fit` takes it), the hub's address one that answers nothing, should anything try."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if online:
        env.pop("HF_HUB_OFFLINE")
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    result = subprocess.run([sys.executable, "-m", "lora_lightning", *args], cwd=clone,
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("config", _shipped_configs(),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_dry_runs_from_a_fresh_clone(config, fresh_clone):
    """A sweep or capacity file dry-runs; a fit config parses as `fit` reads it, and the
    benchmark data its report names is found from the clone's folder."""
    name = str(config.relative_to(ROOT))
    kind = _kind(config)
    if kind != "fit":
        # the paper's model is a hub id: offline, a dry run refuses it unless it is cached
        online = "llama31_8b" in name or "paper" in name
        out = _run(fresh_clone, kind, "--config", name, "--dry_run", "true", online=online)
        assert "cell" in out or "chain" in out
        return
    printed = yaml.safe_load(_run(fresh_clone, "fit", "--config", name, "--print_config"))
    report = printed["report"]
    settings = evaluation.BenchmarkSettings(
        mmlu_dir=report["mmlu_dir"], truthfulqa_path=report["truthfulqa_path"])
    cwd = Path.cwd()
    try:
        os.chdir(fresh_clone)
        settings.check_data()
    finally:
        os.chdir(cwd)


def test_test_refuses_a_benchmark_folder_that_is_not_there_before_probing(tmp_path):
    """`test --config` carried to a machine without the config's data folder stops at the
    start of `test`, naming the path, not after the re-categorisation (28 minutes on the real
    model); so does `evaluate`, before the model loads."""
    from lora_lightning.commands.evaluate import evaluate_command
    from lora_lightning.knowledge_report import KnowledgeReport

    missing = str(tmp_path / "no" / "mmlu")
    report = KnowledgeReport(mmlu_dir=missing)
    with pytest.raises(FileNotFoundError, match=f"MMLU data directory not found: {missing}"):
        report.on_test_start(None, None)
    with pytest.raises(FileNotFoundError, match="TruthfulQA CSV not found"):
        evaluate_command(model=str(tmp_path / "no-model"), truthfulqa_path=str(tmp_path / "x"),
                         output=None)
