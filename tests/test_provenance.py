"""Provenance: every published results folder, and every folder the aggregate and capacity
writers fill, holds a `provenance.json` saying what its numbers depend on beyond their settings
(library versions, CPU, thread counts, the world's, fact file's and model's checksums, the
command that made it), with what is not known named in "missing", never guessed."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from test_sweep import fake_sweep

from lora_lightning.files import sha256_file
from lora_lightning.provenance import (
    PROVENANCE_FILE,
    PROVENANCE_KEYS,
    THREAD_KINDS,
    provenance_problems,
)
from lora_lightning.sweep.aggregate import aggregate_sweep, write_provenance
from lora_lightning.sweep.cell import report_path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = sorted(p for p in (ROOT / "docs" / "results").iterdir() if p.is_dir())
WORLD_CHECKSUM = "47c83391685b61b6"  # the shipped bench world (docs/world.md)
# the folders a sweep or a capacity search made (the others hold other measurements)
RUNS = ("capacity_smollm2", "capacity_world", "real_smollm2", "world_grid")


def test_there_are_published_folders_to_check():
    assert {p.name for p in PUBLISHED} >= {"capacity_smollm2", "capacity_world",
                                           "real_smollm2", "world_grid"}


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda p: p.name)
def test_every_published_results_folder_has_a_provenance_file(folder):
    path = folder / PROVENANCE_FILE
    assert path.is_file(), f"{path} is missing"
    record = json.loads(path.read_text())
    assert set(record) == set(PROVENANCE_KEYS)
    assert provenance_problems(record) == []
    # the cell folders are not in the repository: what is there was read from the pages
    assert record["source"].startswith("reconstructed from the published text")
    assert record["libraries"]["torch"] == ["2.13.0+cpu"]
    if folder.name not in RUNS:  # measurements that are no sweep or capacity run
        assert record["cells"] is None and any(m.startswith("commands:")
                                               for m in record["missing"])
        return
    assert record["python"] == ["3.11.7"]
    assert record["threads"]["launcher"] == [1]
    readme = re.sub(r"\\\n\s*", "", (folder / "README.md").read_text())  # joined lines
    assert record["commands"] and all(command in readme for command in record["commands"])
    on_world = folder.name in ("world_grid", "capacity_world")
    assert record["world_checksum"] == ([WORLD_CHECKSUM] if on_world else None)


def test_the_real_tracks_categorisation_threads_are_those_its_pages_state():
    """bfloat16 categories depend on the thread count: two for the track, one for capacity."""
    real = json.loads((ROOT / "docs/results/real_smollm2" / PROVENANCE_FILE).read_text())
    capacity = json.loads((ROOT / "docs/results/capacity_smollm2" / PROVENANCE_FILE)
                          .read_text())
    assert real["threads"]["categorize"] == [2]
    assert capacity["threads"]["categorize"] == [1]


def good_record() -> dict:
    return json.loads((ROOT / "docs/results/world_grid" / PROVENANCE_FILE).read_text())


@pytest.mark.parametrize("change, problem", [
    (lambda r: r.pop("cpu"), "cpu: absent"),
    (lambda r: r.update(cpu="Intel"), "cpu: 'Intel' is not texts"),
    (lambda r: r.update(cells="75"), "cells: '75' is not count"),
    (lambda r: r.update(python=None), "python: null, and \"missing\" does not say why"),
    (lambda r: r["threads"].update(torch=["1"]), "threads: "),
    (lambda r: r["libraries"].update(torch=None),
     "libraries.torch: null, and \"missing\" does not say why"),
    (lambda r: r.update(seed=42), "seed: not a key of a provenance file"),
])
def test_a_provenance_file_with_a_wrong_or_unexplained_value_is_refused(change, problem):
    record = copy.deepcopy(good_record())
    change(record)
    assert any(p.startswith(problem) for p in provenance_problems(record))


def recorded_sweep(root: Path) -> Path:
    """`fake_sweep`'s folder with what real cells record: each report's environment, the
    launcher's thread count, the configs' fact file, model and shared "before" scores, and the
    folder's copy of its sweep file."""
    fake_sweep(root)
    (root / "sweep.yaml").write_text("axes: {}\n")
    facts = root / "facts.jsonl"
    facts.write_text('{"id": "f1"}\n')
    (root / "before_scores.json").write_text(json.dumps(
        {"{}": {"settings": {"weights": "ab" * 32}, "scores": {}}}))
    for i, cell in enumerate(sorted((root / "cells").iterdir())):
        config = yaml.safe_load((cell / "cell.yaml").read_text())
        config["model"] = {"model_name_or_path": "/worlds/w/model"}
        config["data"]["facts"] = str(facts)
        config["report"] = {"before_scores": "/moved/away/before_scores.json"}
        (cell / "cell.yaml").write_text(yaml.safe_dump(config))
        status = json.loads((cell / "status.json").read_text())
        (cell / "status.json").write_text(json.dumps({**status, "threads": "1"}))
        if report_path(cell).is_file():
            report = json.loads(report_path(cell).read_text())
            report["environment"] = {
                "python": "3.11.7", "libraries": {"torch": "2.13.0+cpu", "peft": None},
                "cpu": "Intel(R) Xeon(R) Processor", "cpu_capability": "AVX512",
                "threads": 1 + i % 2, "variables": {"OMP_NUM_THREADS": "1"},
                "world": {"path": "/worlds/w", "checksum": WORLD_CHECKSUM}}
            report_path(cell).write_text(json.dumps(report))
    return root


def test_aggregate_writes_provenance_from_what_the_cells_recorded(tmp_path):
    root = recorded_sweep(tmp_path / "sweep")
    out = aggregate_sweep(root, plots=False)
    assert out["provenance"] == root / PROVENANCE_FILE
    record = json.loads(out["provenance"].read_text())
    assert provenance_problems(record) == []
    assert record["source"] == "cells" and record["cells"] == 8
    assert record["commands"] == ["python -m lora_lightning sweep --config fake.yaml"]
    assert record["command_files"] == [{"path": "fake.yaml",
                                        "sha256": sha256_file(root / "sweep.yaml")}]
    assert record["libraries"] == {"torch": ["2.13.0+cpu"], "peft": ["not installed"]}
    assert record["cpu"] == ["Intel(R) Xeon(R) Processor"]
    assert record["cpu_capability"] == ["AVX512"]
    # the distinct values over the cells: two torch thread counts among the seven reports
    assert record["threads"] == {"torch": [1, 2], "launcher": [1], "config": None,
                                 "categorize": None}
    assert record["numeric_variables"] == ["OMP_NUM_THREADS=1"]
    assert record["world_checksum"] == [WORLD_CHECKSUM]
    assert record["facts"] == [str(root / "facts.jsonl")]
    assert record["facts_sha256"] == [sha256_file(root / "facts.jsonl")]
    assert record["model"] == ["/worlds/w/model"]
    assert record["model_checksum"] == ["ab" * 32]  # found in the moved folder
    assert record["aggregated_on"]["libraries"]["torch"]
    named = {m.split(":")[0] for m in record["missing"]}
    assert named == {"threads.config", "threads.categorize"}


def test_cells_that_only_fit_give_their_environment_and_weights_from_environment_json(
        tmp_path):
    """A capacity probe is never tested, so it has no report.json: `fit` records what it ran
    on in `environment.json` (with the base's weight checksum), and the shared
    categorisation's `.meta.json` says how many threads categorised the facts."""
    from lora_lightning.knowledge_report import ENVIRONMENT_FILE

    root = fake_sweep(tmp_path / "sweep")
    for cell in (root / "cells").iterdir():
        report_path(cell).unlink(missing_ok=True)
        report_path(cell).parent.mkdir(parents=True, exist_ok=True)
        (report_path(cell).parent / ENVIRONMENT_FILE).write_text(json.dumps({
            "environment": {"python": "3.11.7", "libraries": {"torch": "2.13.0+cpu"},
                            "cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 1,
                            "variables": {}},
            "weights": "cd" * 32}))
    (root / "categorized.jsonl.meta.json").write_text(json.dumps({"threads": 2}))
    record = json.loads(write_provenance(root, "capacity").read_text())
    assert provenance_problems(record) == []
    assert record["cpu"] == ["AMD EPYC"] and record["libraries"] == {"torch": ["2.13.0+cpu"]}
    assert record["threads"]["torch"] == [1] and record["threads"]["categorize"] == [2]
    assert record["model_checksum"] == ["cd" * 32]


def test_what_no_cell_recorded_is_null_and_named_in_missing(tmp_path):
    root = fake_sweep(tmp_path / "sweep")  # reports without an environment, no sweep.yaml
    record = json.loads(write_provenance(root).read_text())
    assert provenance_problems(record) == []
    for key in ("libraries", "python", "cpu", "cpu_capability", "world_checksum", "facts",
                "facts_sha256", "model", "model_checksum"):
        assert record[key] is None
        assert any(m.startswith(f"{key}: ") for m in record["missing"]), key
    assert record["command_files"] == [{"path": "fake.yaml", "sha256": None}]
    assert any(m.startswith("command_files: sweep.yaml") for m in record["missing"])
    assert set(record["threads"]) == set(THREAD_KINDS)
    assert all(v is None for v in record["threads"].values())


def test_the_capacity_report_writes_provenance_beside_its_tables(tmp_path):
    from lora_lightning.sweep.capacity.report import write_capacity_report
    from lora_lightning.sweep.capacity.search import load_capacity

    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump({"world": "small", "variants": {"r4": {"model.rank": 4}}}))
    capacity = load_capacity(file, output=tmp_path / "cap")
    capacity.sweep.output.mkdir()
    written = write_capacity_report(capacity, None)
    assert written["provenance"] == tmp_path / "cap" / PROVENANCE_FILE
    record = json.loads(written["provenance"].read_text())
    assert provenance_problems(record) == [] and record["cells"] == 0
    assert record["commands"] is None  # no sweep.json: the run never claimed the folder

    (tmp_path / "cap" / "sweep.json").write_text(json.dumps(
        {"sweeps": [{"file": str(file), "fingerprint": "x", "raw": {}}]}))
    (tmp_path / "cap" / "sweep.yaml").write_text(file.read_text())
    record = json.loads(write_capacity_report(capacity, None)["provenance"].read_text())
    assert record["commands"] == [f"python -m lora_lightning capacity --config {file}"]
    assert record["command_files"] == [{"path": str(file), "sha256": sha256_file(file)}]
