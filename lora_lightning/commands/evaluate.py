"""`python -m lora_lightning evaluate`: MMLU, TruthfulQA and lm-evaluation-harness tasks for a
model, with or without an adapter."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lora_lightning import evaluation, harness
from lora_lightning.files import atomic_write_text
from lora_lightning.models import load_model, resolve_model
from lora_lightning.threads import set_threads


def evaluate_command(
    model: str | None = None,
    adapter: str | None = None,
    data_dir: str | None = None,
    mmlu_dir: str | None = None,
    truthfulqa_path: str | None = None,
    benchmarks: list[str] | None = None,
    mmlu_subjects: list[str] | None = None,
    mmlu_limit: int | None = None,
    n_shot: int = evaluation.BenchmarkSettings.n_shot,
    truthfulqa_limit: int | None = None,
    harness_tasks: list[str] | str | None = None,
    harness_include: list[str] | str | None = None,
    harness_limit: int | float | None = None,
    harness_num_fewshot: int | None = None,
    batch_size: int = evaluation.BenchmarkSettings.batch_size,
    output: str | None = "evaluation.json",
    device: str = "auto",
    dtype: str = "auto",
    strict: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score a model, with or without a LoRA adapter, on MMLU, TruthfulQA and harness tasks.

    TruthfulQA as MC1 and MC2; harness tasks are lm-evaluation-harness' own.

    Args:
        model: Hugging Face model directory or hub name; None or "world" = the synthetic
            world's base model (unpacked on first use).
        adapter: LoRA adapter directory (ours or PEFT's) applied before scoring.
        data_dir: folder holding `mmlu/` and `truthfulqa/TruthfulQA.csv`;
            `pkg:lora_lightning/benchmark_data` is the copy the package ships. None = Hugging
            Face datasets (needs `datasets` and the network).
        mmlu_dir: MMLU folder, overriding `data_dir` for MMLU.
        truthfulqa_path: TruthfulQA CSV (or its folder), overriding `data_dir` for TruthfulQA.
        benchmarks: which to run, from "mmlu" and "truthfulqa". Default: both; with
            `harness_tasks`, those whose local data is given (so `--harness_tasks` alone runs
            the harness tasks only, with nothing to download).
        mmlu_subjects: restrict MMLU to these subjects (file-name form, e.g. "high_school_biology").
        mmlu_limit: at most this many test questions per subject. Given alone (no
            `truthfulqa_limit`), TruthfulQA is limited to the same number of questions: a
            limit asks for a quick look, not for all 817 TruthfulQA questions.
        n_shot: MMLU shots (first rows of the dev split), 0..5.
        truthfulqa_limit: at most this many TruthfulQA questions. Given alone, MMLU is limited
            to the same number of questions per subject.
        harness_tasks: lm-evaluation-harness tasks, groups or tags ("hellaswag,arc_easy"),
            run by the harness itself on the model in memory (adapter applied, unmerged).
            Needs `pip install "lora-lightning[harness]"`.
        harness_include: folder(s) of your own harness task YAMLs (the harness'
            `--include_path`), whose tasks `harness_tasks` may then name.
        harness_limit: at most this many documents per harness task (a float below 1: that
            share of each task).
        harness_num_fewshot: shots for every harness task (None: each task's own default).
        batch_size: distinct model inputs per forward pass.
        output: JSON file for the results (its path is printed before scoring starts); None
            writes nothing.
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16".
        strict: Refuse an adapter whose recorded base model is not this model (false: load
            it anyway, with a warning).
        threads: CPU threads for torch. None chooses from the model's size and the cores free
            now (`lora_lightning.threads`; `OMP_NUM_THREADS` wins).
        progress: show progress bars.

    Returns:
        ``{"mmlu": {...}, "truthfulqa": {...}, "harness": {task: {metric: value, "n": ...}},
        "model": ..., "adapter": ...}``.
    """
    harness.check_limits(
        "--", mmlu_limit=mmlu_limit, truthfulqa_limit=truthfulqa_limit,
        harness_limit=harness_limit, harness_num_fewshot=harness_num_fewshot,
        batch_size=batch_size,
    )
    if benchmarks is None:  # with harness tasks: only what has local data, nothing downloaded
        benchmarks = (["mmlu", "truthfulqa"] if not harness.parse_tasks(harness_tasks) else
                      [name for name, data in (("mmlu", mmlu_dir), ("truthfulqa", truthfulqa_path))
                       if data is not None or data_dir is not None])
    settings = evaluation.BenchmarkSettings(
        benchmarks=benchmarks,
        mmlu_dir=mmlu_dir if mmlu_dir is not None else data_dir,
        mmlu_subjects=mmlu_subjects, mmlu_limit=mmlu_limit, n_shot=n_shot,
        truthfulqa_path=truthfulqa_path if truthfulqa_path is not None else data_dir,
        truthfulqa_limit=truthfulqa_limit, harness_tasks=harness_tasks,
        harness_include=harness_include, harness_limit=harness_limit,
        harness_num_fewshot=harness_num_fewshot, batch_size=batch_size,
    )
    settings = _one_limit_for_both(settings)
    settings.check_tasks()  # before the model is loaded
    settings.check_data()
    path = None
    if output is not None:
        path = Path(output).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the scoring
        print(f"results will be written to {path}")
    model_path = resolve_model(model, progress=progress)
    lm, tokenizer = load_model(model_path, adapter, device=device, dtype=dtype, strict=strict)
    set_threads(sum(p.numel() for p in lm.parameters()), threads)

    results: dict[str, Any] = {"model": model_path, "adapter": adapter}
    results.update(evaluation.score_benchmarks(
        lm, tokenizer, settings, name=adapter or model_path, progress=progress,
        on_scored=_print_score,
    ))
    if path is not None:
        atomic_write_text(path, json.dumps(results, indent=2))
        print(f"results written to {path}")
    return results


def _one_limit_for_both(settings: evaluation.BenchmarkSettings) -> evaluation.BenchmarkSettings:
    """A limit on MMLU or TruthfulQA alone, with both chosen, limits the other to the same
    number: a limit asks for a quick look, not for all 817 TruthfulQA questions."""
    mmlu, tqa = settings.mmlu_limit, settings.truthfulqa_limit
    if not {"mmlu", "truthfulqa"} <= set(settings.chosen) or (mmlu is None) == (tqa is None):
        return settings
    if mmlu is None:
        print(f"--truthfulqa_limit {tqa} without --mmlu_limit: MMLU is limited "
              f"to {tqa} questions per subject too (pass --mmlu_limit to choose)")
        return dataclasses.replace(settings, mmlu_limit=tqa)
    print(f"--mmlu_limit {mmlu} without --truthfulqa_limit: TruthfulQA is limited "
          f"to {mmlu} questions too (pass --truthfulqa_limit to choose)")
    return dataclasses.replace(settings, truthfulqa_limit=mmlu)


def _print_score(key: str, result: dict[str, Any]) -> None:
    """One benchmark's headline numbers, as soon as it is scored."""
    if key == "mmlu":
        print(f"MMLU ({result['n_shot']}-shot): accuracy {result['accuracy']:.4f} "
              f"over {result['n']} questions")
    elif key == "truthfulqa":
        print(f"TruthfulQA: MC1 {result['mc1']:.4f}, MC2 {result['mc2']:.4f} "
              f"over {result['n']} questions")
    elif key == "harness":
        for task, scores in result.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items()
                              if k != "n" and not k.endswith("_stderr"))
            print(f"harness {task}: {shown} over {scores.get('n', '?')} documents")
