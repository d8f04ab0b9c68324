"""Evaluation speed on the CPU: MMLU scoring and fact generation, by batch size.

Uses the synthetic world's base model (built on first use) so the numbers say how long the
default pipeline's measurements take, and how much batching buys:

    python benchmarks/bench_eval.py                              # batch sizes 1 8 32
    python benchmarks/bench_eval.py --batch-sizes 1 4 16 --mmlu-limit 4 --facts 64
    python benchmarks/bench_eval.py --out benchmarks/eval.json

MMLU rows: 5-shot log-likelihood scoring (one forward pass per question: the four " A".." D"
continuations share their context) with `lora_lightning.evaluation.evaluate_mmlu`; the world's
model has `max_position_embeddings` tokens, so longer prompts lose their left end, as in the
harness. Generation rows: greedy answers to 4-shot chat prompts (the SliCK probe) with
`lora_lightning.knowledge.generate_answers`, left-padded batches, up to 32 new tokens.
Throughput is questions per second (best of `--repeats` timed runs after one warm-up). On a
machine shared with other jobs, `--threads 1` gives far steadier numbers: two busy threads on two
contended cores can run 10x slower than one.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_lightning.evaluation import evaluate_mmlu, load_mmlu  # noqa: E402

DEFAULT_SUBJECTS = ["abstract_algebra", "anatomy", "astronomy", "high_school_biology"]


def _best_time(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_mmlu(model, tokenizer, args) -> list[dict]:
    n = len(load_mmlu(args.data_dir, "test", args.subjects, args.mmlu_limit))
    rows = []
    for bs in args.batch_sizes:
        seconds = _best_time(
            lambda bs=bs: evaluate_mmlu(
                model,
                tokenizer,
                args.data_dir,
                args.subjects,
                args.mmlu_limit,
                n_shot=5,
                batch_size=bs,
            ),
            args.repeats,
        )
        rows.append(
            {
                "task": "mmlu 5-shot scoring",
                "batch_size": bs,
                "questions": n,
                "seconds": seconds,
                "questions_per_s": n / seconds,
            }
        )
    return rows


def bench_generation(model, tokenizer, art, args) -> list[dict]:
    from lora_lightning.facts import load_facts
    from lora_lightning.knowledge import generate_answers
    from lora_lightning.prompts import build_fewshot_sets, fewshot_messages, render

    facts = load_facts(art.facts_path)[: args.facts]
    shots = build_fewshot_sets(load_facts(art.pool_path), n_exp=len(facts), n_shot=4, seed=0)
    prompts = [
        render(tokenizer, fewshot_messages(f.question, s), add_generation_prompt=True)
        for f, s in zip(facts, shots, strict=True)
    ]
    rows = []
    for bs in args.batch_sizes:
        seconds = _best_time(
            lambda bs=bs: generate_answers(model, tokenizer, prompts, batch_size=bs),
            args.repeats,
        )
        rows.append(
            {
                "task": "greedy generation (4-shot)",
                "batch_size": bs,
                "questions": len(prompts),
                "seconds": seconds,
                "questions_per_s": len(prompts) / seconds,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--data-dir",
        default=str(ROOT.parent / "shared" / "data"),
        help="folder holding mmlu/ (default ../shared/data)",
    )
    parser.add_argument("--subjects", nargs="+", default=DEFAULT_SUBJECTS)
    parser.add_argument("--mmlu-limit", type=int, default=8, help="questions per subject")
    parser.add_argument("--facts", type=int, default=64, help="facts to answer")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as is)")
    parser.add_argument("--skip", choices=["mmlu", "generation"], default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lightning.world import ensure_world

    if args.threads:
        torch.set_num_threads(args.threads)
    art = ensure_world(progress=sys.stderr.isatty())
    tokenizer = AutoTokenizer.from_pretrained(art.model_dir)
    model = AutoModelForCausalLM.from_pretrained(art.model_dir, dtype=torch.float32).eval()

    rows: list[dict] = []
    if args.skip != "mmlu":
        rows += bench_mmlu(model, tokenizer, args)
    if args.skip != "generation":
        rows += bench_generation(model, tokenizer, art, args)

    print(f"{'task':28s} {'batch':>5s} {'questions':>9s} {'seconds':>8s} {'q/s':>8s} {'x bs1':>6s}")
    for row in rows:
        first = next(r for r in rows if r["task"] == row["task"])
        row["speedup_vs_first"] = row["questions_per_s"] / first["questions_per_s"]
        print(
            f"{row['task']:28s} {row['batch_size']:5d} {row['questions']:9d} "
            f"{row['seconds']:8.2f} {row['questions_per_s']:8.2f} "
            f"{row['speedup_vs_first']:6.2f}"
        )
    result = {
        "device": "cpu",
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model_dir": str(art.model_dir),
        "max_position_embeddings": model.config.max_position_embeddings,
        "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"written to {args.out}")
    return result


if __name__ == "__main__":
    main()
