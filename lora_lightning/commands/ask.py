"""`python -m lora_lightning ask`: a model's greedy answers before and after its adapter.

The question goes to the model exactly as the reliability probe (`KnowledgeEvalCallback`, `test`)
asks it: the system prompt, `n_shot` examples from the few-shot pool and the question, through
the tokenizer's chat template, answered greedily by `knowledge.categorize` itself. So what `ask`
shows is what the probe counted, one question at a time. A model without a few-shot pool (any
model but the world's, unless `--pool` or `--questions` brings one) is asked zero-shot: the
system prompt and the question in its chat format.

What the columns are:

* `--adapter DIR`: `base` (the model with its adapter switched off by `lora_disabled`, the
  same loaded weights) and `adapter`;
* a merged export as `--model` with `--base MODEL`: `base` (that model, loaded first and
  freed) and `adapter` (the merged model), the same two columns as above;
* a model alone: one column, `model`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_lightning.facts import (
    Fact,
    TextLimit,
    excerpt,
    is_correct,
    load_facts,
    normalize_answer,
    pool_sidecar,
    question_fact,
)
from lora_lightning.files import atomic_path
from lora_lightning.knowledge import ProbeConfig, categorize
from lora_lightning.lora import check_adapter_folder, lora_disabled
from lora_lightning.models import (
    WORLD_MODEL,
    load_model,
    load_tokenizer,
    resolve_model,
    text_limit,
)
from lora_lightning.prompts import build_fewshot_sets, fewshot_messages, render
from lora_lightning.threads import set_threads
from lora_lightning.world import ensure_world

_PROBE = ProbeConfig()
_WIDTH = {"question": 60, "expected": 30, "answer": 36}  # characters shown per table cell


def ask_argv(argv: list[str]) -> list[str]:
    """The command line as jsonargparse takes it: the bare words are the question
    (`ask Where was X born?` works unquoted), passed on as `--question`. Every option of `ask`
    takes a value, so a word right after an option is that option's value."""
    out: list[str] = []
    words: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-") and arg not in ("-", "--"):
            out.append(arg)
            takes_value = "=" not in arg and arg not in ("-h", "--help", "--print_config")
            if takes_value and i + 1 < len(argv):
                out.append(argv[i + 1])
                i += 1
        else:
            words.append(arg)
        i += 1
    if words:
        out += ["--question", " ".join(words)]
    return out


def ask_command(
    question: str | None = None,
    model: str | None = None,
    adapter: str | None = None,
    base: str | None = None,
    answer: str | None = None,
    questions: str | None = None,
    output: str | None = None,
    pool: str | None = None,
    n_exp: int = 1,
    n_shot: int | None = None,
    seed: int = _PROBE.seed,
    max_new_tokens: int = _PROBE.max_new_tokens,
    batch_size: int = _PROBE.batch_size,
    device: str = "auto",
    dtype: str = "auto",
    strict: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Print a model's greedy answers to questions before and after its adapter, side by side.

    Each answer is marked right or wrong when the expected answer is known (`--answer`, or the
    `answers` of a `--questions` file), and `--output` keeps them all as JSONL.

    Args:
        question: The question (also the command's bare words: `ask Where was X born?`).
        model: Hugging Face model folder or hub id; None or "world" = the synthetic world's
            base. A merged export (`export --format merged`) is a model folder too.
        adapter: LoRA adapter folder (ours or PEFT's) to compare with the model without it.
        base: Model to compare a merged `--model` with, as its "before" (not with `adapter`).
        answer: Expected answer of `question`; an answer is right when it contains it (the
            probe's alias match, `facts.is_correct`).
        questions: Fact file of questions (JSONL with `question` and optional `answers`, or any
            shape `categorize` reads) to ask instead of `question`.
        output: JSONL file to write: per question its id, question, answers and, per column
            (`base`/`adapter` or `model`), the answer, whether it is right (null without
            answers), every prompt's answer and their share right (`p_greedy`).
        pool: Few-shot pool file (the shots of the probe). None = the world's pool when the
            model or base is the world's, the pool `categorize` wrote beside a `--questions`
            file; for any other model none: it is asked zero-shot (`n_shot` 0).
        n_exp: Few-shot prompts per question. 1 asks with the first of the probe's prompts
            (same pool, same seed: the same shots); the probe's own 10 add the share of them
            answered right. The answer shown is the first prompt's.
        n_shot: Examples per prompt (0 = zero-shot: the system prompt and the question in the
            chat format, as training asks, no pool needed). None = the probe's (`ProbeConfig`)
            when there is a pool, else 0 (saying so); a number above 0 needs a pool.
        seed: Seed of the few-shot sets (the probe's is 0).
        max_new_tokens: Generation length limit.
        batch_size: Prompts per generation batch.
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16".
        strict: Refuse an adapter whose recorded base model is not this model (false: load
            it anyway, with a warning).
        threads: CPU threads for torch. None chooses from the model's size and the cores free
            now (`lora_lightning.threads`; `OMP_NUM_THREADS` wins).
        progress: Show progress bars (when there is more than one question).

    Returns:
        The rows written to `output`, one per question, with the columns the module docstring
        describes: `base` and `adapter`, or `model` alone.
    """
    # Everything that can be wrong with the input is found before a model is loaded.
    if (question is None) == (questions is None):
        raise ValueError(
            "ask: give one question (`ask \"Where was X born?\"`) or --questions FILE"
            + (", not both" if question is not None else "")
        )
    if answer is not None and questions is not None:
        raise ValueError("ask: --answer goes with a single question; a --questions file holds "
                         "its answers in each row's `answers`")
    if adapter is not None and base is not None:
        raise ValueError(
            "ask: --base is for a merged --model; with --adapter the base answers come from "
            "--model itself, its adapter switched off"
        )
    if n_exp < 1 or (n_shot is not None and n_shot < 0):
        raise ValueError(f"ask: need n_exp >= 1 and n_shot >= 0, got {n_exp} and {n_shot}")
    if adapter is not None:
        check_adapter_folder(adapter)
    out_path = _check_output(output)
    model_path = resolve_model(model, progress=progress)
    base_path = resolve_model(base, progress=progress) if base is not None else None

    tokenizer = load_tokenizer(model_path)
    limit = text_limit(model_path, tokenizer)
    if questions is not None:
        facts = load_facts(questions, limit=limit, answers_required=False)
    else:
        if limit is not None and (problem := limit.problem(question)) is not None:
            raise ValueError(f"question: {problem}")
        facts = [question_fact(question, [answer] if answer is not None else [])]
    if pool is None and questions is not None and n_shot != 0 and (
        pool_sidecar(questions).is_file()
    ):
        pool = str(pool_sidecar(questions))  # the shots `categorize` used for these facts
        print(f"few-shot pool: {pool} (beside --questions; --pool to choose another)",
              file=sys.stderr)
    if n_shot is None:
        n_shot = _default_shots(pool, model, base)
    shots = _pool(pool, model, base, n_shot, facts, limit, progress)
    if limit is not None:
        _check_prompt_lengths(tokenizer, facts, shots, n_exp, n_shot, seed,
                              max_new_tokens, limit.max_tokens)

    def ask(lm, tokenizer) -> list[Fact]:
        return categorize(
            lm, tokenizer, facts, shots, n_exp=n_exp, n_shot=n_shot, batch_size=batch_size,
            max_new_tokens=max_new_tokens, seed=seed, progress=progress and len(facts) > 1,
        )

    columns: dict[str, list[Fact]] = {}
    if base_path is not None:
        lm, tokenizer = _load(base_path, None, device, dtype, threads, strict)
        columns["base"] = ask(lm, tokenizer)
        del lm  # one model in memory at a time
    lm, tokenizer = _load(model_path, adapter, device, dtype, threads, strict)
    if adapter is not None:
        with lora_disabled(lm):
            columns["base"] = ask(lm, tokenizer)
        columns["adapter"] = ask(lm, tokenizer)
    elif base_path is not None:
        columns["adapter"] = ask(lm, tokenizer)
    else:
        columns["model"] = ask(lm, tokenizer)

    rows = [_row(fact, {name: answered[i] for name, answered in columns.items()})
            for i, fact in enumerate(facts)]
    print(_table(facts, rows, list(columns)))
    if out_path is not None:
        _write_jsonl(rows, out_path)
        print(f"wrote {len(rows)} answered question(s) to {out_path}")
    return rows


def _check_prompt_lengths(
    tokenizer: Any, facts: Sequence[Fact], shots: Sequence[Fact], n_exp: int, n_shot: int,
    seed: int, max_new_tokens: int, context: int,
) -> None:
    """Refuse, before the model loads, prompts that with the answer's room do not fit in the
    model's context: cut off at the left, they lose the system prompt and the first shots, and
    the answers are garbage. Says how many shots would fit."""
    sets = build_fewshot_sets(shots, n_exp=n_exp, n_shot=n_shot, seed=seed) if n_shot else [[]]
    facts = sorted(facts, key=lambda f: len(f.question))[-3:]  # the longest questions decide

    def longest(shot_sets: Sequence[Sequence[Fact]]) -> tuple[int, Fact]:
        return max(
            ((len(tokenizer(render(tokenizer, fewshot_messages(f.question, s), True),
                            add_special_tokens=False)["input_ids"]), f)
             for f in facts for s in shot_sets),
            key=lambda pair: pair[0],
        )

    length, fact = longest(sets)
    if length + max_new_tokens <= context:
        return
    fits = next((k for k in range(n_shot - 1, -1, -1)
                 if longest([s[:k] for s in sets])[0] + max_new_tokens <= context), None)
    advice = (f"--n_shot {fits} fits" if fits is not None else
              "even without shots it does not fit; shorten the question")
    raise ValueError(
        f"ask: the prompt for {excerpt(fact.question, 60)!r} with {n_shot} shot(s) is {length:,} "
        f"tokens, and with --max_new_tokens {max_new_tokens} more than the model's context "
        f"({context:,} tokens); {advice}, or lower --max_new_tokens"
    )


def _check_output(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.is_dir():
        raise FileExistsError(f"output: {output!r} is a folder; name a .jsonl file")
    path.parent.mkdir(parents=True, exist_ok=True)  # fail now, not after the answers
    return path


def _default_shots(pool: str | None, model: str | None, base: str | None) -> int:
    """The probe's few-shot format where there is a pool (given, found beside the questions, or
    the world's for the world's model); else zero-shot, said in one line: a model asked a
    question must not need a pool file to answer it."""
    if pool is not None or model in (None, WORLD_MODEL) or base == WORLD_MODEL:
        return _PROBE.n_shot
    print("zero-shot: no few-shot pool for this model (--pool FILE for the probe's "
          f"{_PROBE.n_shot}-shot format)", file=sys.stderr)
    return 0


def _pool(
    pool: str | None, model: str | None, base: str | None, n_shot: int,
    facts: Sequence[Fact], limit: TextLimit | None, progress: bool,
) -> list[Fact]:
    """The probe's few-shot pool, without any of the questions asked (a shot must not give the
    answer away; the data module drops them the same way)."""
    if n_shot == 0:
        return []
    if pool is None:
        if model not in (None, WORLD_MODEL) and base != WORLD_MODEL:
            raise ValueError(
                f"ask: --n_shot {n_shot} needs --pool for a model other than the world's: "
                "the few-shot pool the probe used (`<facts stem>.pool.jsonl` beside a "
                "categorised fact file, found by itself with --questions <that file>); "
                "without --n_shot it asks zero-shot"
            )
        pool = str(ensure_world(progress=progress).pool_path)
    asked = {f.id for f in facts} | {normalize_answer(f.question) for f in facts}
    shots = load_facts(pool, limit=limit)
    kept = [s for s in shots if s.id not in asked and normalize_answer(s.question) not in asked]
    if len(kept) < len(shots):
        print(f"note: {len(shots) - len(kept)} few-shot pool fact(s) are among the questions "
              "and are left out of the shots", file=sys.stderr)
    return kept


def _load(
    path: str, adapter: str | None, device: str, dtype: str, threads: int | None, strict: bool
):
    lm, tokenizer = load_model(path, adapter, device=device, dtype=dtype, strict=strict)
    set_threads(sum(p.numel() for p in lm.parameters()), threads)
    return lm, tokenizer


def _row(fact: Fact, answered: dict[str, Fact]) -> dict[str, Any]:
    """One question's JSONL row: the fact, then per column what the model said."""
    has_answers = any(a.strip() for a in fact.answers)
    row: dict[str, Any] = {"id": fact.id, "question": fact.question, "answers": fact.answers}
    for name, result in answered.items():
        said = result.predictions[0]
        row[name] = {
            "answer": said,
            "correct": is_correct(said, fact) if has_answers else None,
            "predictions": result.predictions,
            "p_greedy": result.p_greedy if has_answers else None,
        }
    return row


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split()) or "(empty)"
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(facts: Sequence[Fact], rows: Sequence[dict[str, Any]], columns: list[str]) -> str:
    """The answers side by side, one question a line, with a count of right answers."""
    expected = any(row[columns[0]]["correct"] is not None for row in rows)
    header = ["question", *(["expected"] if expected else []), *columns]
    lines = [header]
    for fact, row in zip(facts, rows, strict=True):
        cells = [_cut(fact.question, _WIDTH["question"])]
        if expected:
            cells.append(_cut(" | ".join(fact.answers), _WIDTH["expected"]) if fact.answers
                          else "-")
        for name in columns:
            said = row[name]
            cell = _cut(said["answer"], _WIDTH["answer"])
            if said["correct"] is not None:
                cell += "  [right]" if said["correct"] else "  [wrong]"
                if len(said["predictions"]) > 1:
                    right = round(said["p_greedy"] * len(said["predictions"]))
                    cell += f" {right}/{len(said['predictions'])}"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )
    if expected:
        judged = [row for row in rows if row[columns[0]]["correct"] is not None]
        counts = ", ".join(
            f"{name} {sum(row[name]['correct'] for row in judged)}/{len(judged)}"
            for name in columns
        )
        text += f"\nright: {counts}"
    return text


def _write_jsonl(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Written whole or not at all: a crash never leaves half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
