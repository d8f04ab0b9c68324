"""Categorise a fact file for a model: the file-level SliCK command.

`knowledge` holds the algorithm (the world's build uses it to categorise its own facts); this
module adds what a command needs around it: loading the model, the world's facts and pool, the
few-shot pool carved out of a file, threads, and a checkpoint a rerun resumes from.

Beside the output it records how the categories were measured (`<output>.meta.json`: the
model's dtype and device, the dtype the probe computed in, the matching rule, the probe's
settings), since the fact file itself is plain JSONL that every reader takes as it is.
`comparability_problem` holds that record against a later probe: `test` warns when it would
compare categories measured differently.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from lora_lightning.facts import (
    DEFAULT_POOL_SIZE,
    Fact,
    MatchRule,
    answer_problems,
    answer_problems_line,
    check_match_rule,
    load_facts,
    pool_sidecar,
    save_facts,
    write_answer_problems,
)
from lora_lightning.files import atomic_write_text
from lora_lightning.inference import model_dtype
from lora_lightning.knowledge import (
    ComputeDtype,
    ProbeConfig,
    categorize,
    category_counts,
    check_compute_dtype,
    default_pool,
    effective_compute_dtype,
)
from lora_lightning.models import WORLD_MODEL, load_model, load_tokenizer, resolve_model, text_limit
from lora_lightning.threads import set_threads
from lora_lightning.world import ensure_world

log = logging.getLogger(__name__)

__all__ = [
    "categorization_record",
    "categorize_file",
    "comparability_problem",
    "record_sidecar",
]

# the probe's settings a category depends on, recorded and compared
_PROBE_KEYS = ("n_exp", "n_shot", "max_new_tokens", "seed")


def record_sidecar(facts_path: str | Path) -> Path:
    """`<file>.meta.json` beside a categorised fact file: how its categories were measured."""
    path = Path(facts_path)
    return path.with_name(path.name + ".meta.json")


def categorization_record(facts_path: str | Path) -> dict[str, Any] | None:
    """The record `categorize` wrote beside `facts_path`; None for a file without one (older
    files, the world's, one from elsewhere) or with one that cannot be read."""
    sidecar = record_sidecar(facts_path)
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def comparability_problem(
    facts_path: str | Path, record: dict[str, Any] | None, dtype: str, probe: ProbeConfig
) -> str | None:
    """One line saying how the categories in `facts_path` were measured differently from a
    probe in `dtype` with `probe`'s settings (so that before vs after would partly compare two
    measurements), or None when they agree or the file has no record."""
    if not record:
        return None
    dtype = dtype.removeprefix("torch.")
    differ = []
    if record.get("dtype") not in (None, dtype):
        differ.append(f"dtype {record['dtype']} vs {dtype}")
    # a record from before the probe's arithmetic was a setting computed in the weights' dtype
    then = record.get("compute_dtype", record.get("dtype"))
    now = effective_compute_dtype(probe.compute_dtype, dtype)
    if then is not None and then != now:
        differ.append(f"computed in {then} vs {now}")
    if record.get("match", "substring") != probe.match:
        differ.append(f"matching rule {record.get('match', 'substring')} vs {probe.match}")
    recorded = record.get("probe") or {}
    for key in _PROBE_KEYS:
        if key in recorded and recorded[key] != getattr(probe, key):
            differ.append(f"{key} {recorded[key]} vs {getattr(probe, key)}")
    if not differ:
        return None
    fix = "categorise it again with this probe's settings"
    if then is not None and then != now and record.get("dtype") in (None, dtype):
        fix = (f"categorise it again (--compute_dtype {probe.compute_dtype}), or run with "
               f"--model.probe.compute_dtype {'model' if then == dtype else 'float32'}")
    if record.get("dtype") not in (None, dtype):
        fix = (f"categorise it again with --dtype {dtype}, or run with --model.dtype "
               f"{record['dtype']}")
    return (f"{facts_path}: categorised otherwise than this probe (then vs now: "
            f"{', '.join(differ)}; {record_sidecar(facts_path).name}), so before vs after "
            f"compares two measurements; {fix}")


def warn_answer_problems(
    facts: list[Fact], source: str, listing: Path, rule: str = "substring"
) -> Path | None:
    """Warn in one line (and list them in `listing`) about facts whose answers the matching
    `rule` cannot judge cleanly (`facts.answer_problems`); the listing's path, or None."""
    problems = answer_problems(facts, rule)
    if not problems:
        listing.unlink(missing_ok=True)
        return None
    write_answer_problems(problems, listing)
    log.warning(answer_problems_line(problems, source, listing, rule))
    return listing


def categorize_file(
    model: str | None = None,
    facts: str | None = None,
    output: str = "categorized.jsonl",
    pool: str | None = None,
    adapter: str | None = None,
    n_exp: int = ProbeConfig.n_exp,
    n_shot: int = ProbeConfig.n_shot,
    sample: bool = False,
    n_samples: int = ProbeConfig.n_samples,
    temperature: float = ProbeConfig.temperature,
    top_k: int = ProbeConfig.top_k,
    batch_size: int = ProbeConfig.batch_size,
    max_new_tokens: int = ProbeConfig.max_new_tokens,
    seed: int = ProbeConfig.seed,
    match: MatchRule = ProbeConfig.match,
    compute_dtype: ComputeDtype = ProbeConfig.compute_dtype,
    pool_size: int = DEFAULT_POOL_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    strict: bool = True,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """Categorise facts (SliCK) for a model and write them, with the per-prompt answers.

    `python -m lora_lightning categorize` is this function; a sweep or capacity search runs it
    once for all its runs.

    Args:
        model: Hugging Face model directory or hub name; None or "world" = the synthetic world's
            base (unpacked on first use).
        facts: fact file (JSONL of our own or the knowledge-packing shape); None = the world's
            categorised facts (only with the world model).
        output: where to write the categorised facts (JSONL). Progress is checkpointed to
            `<output>.partial` and a rerun resumes from it.
        pool: few-shot pool file. None = the world's pool for world facts; for any other file,
            reuse `<output stem>.pool.jsonl` if present, else carve a seeded sample of
            `pool_size` facts out of `facts` (excluded from categorisation) and save it there.
        adapter: LoRA adapter directory (PEFT format) applied to the model before probing.
        n_exp: number of few-shot prompts per fact.
        n_shot: examples per few-shot prompt.
        sample: also sample `n_samples` answers per prompt, which enables WeaklyKnown.
        n_samples: sampled answers per prompt when `sample`.
        temperature: sampling temperature.
        top_k: sampling top-k.
        batch_size: prompts per generation batch.
        max_new_tokens: generation length limit.
        seed: seed of the few-shot sets, the default pool and sampling.
        match: how an answer counts as right: "substring" (the paper's: an alias inside the
            answer) or "word" (whole words; for short answers and codes, which the substring
            rule finds inside longer words). `fit` and `test` must probe with the same rule
            (`--model.probe.match`).
        compute_dtype: what the probe computes in: "float32" (weights loaded in bfloat16 or
            float16 are upcast for the probe; the answers do not depend on the thread count or
            the batch size) or "model" (the weights' dtype: about twice as fast in bfloat16 on a
            CPU with AMX, but answers that move with threads and batches). `fit` and `test`
            must probe with the same (`--model.probe.compute_dtype`).
        pool_size: size of a pool carved out of `facts` when no pool is given.
        device: "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        dtype: "auto" (bfloat16 on cuda, float32 on cpu), "float32", "bfloat16", "float16".
        strict: Refuse an adapter whose recorded base model is not this model (false: load
            it anyway, with a warning).
        threads: CPU threads for torch. None chooses from the model's size and the cores free
            now (`lora_lightning.threads`: one for a model under 10M parameters, whose
            matrices are too small to split; `OMP_NUM_THREADS` wins).
        progress: show progress bars.

    Returns:
        Facts per category.
    """
    out_path = Path(output)
    model_path = resolve_model(model, progress=progress)
    if model in (None, WORLD_MODEL):
        artifacts = ensure_world(progress=progress)
        if facts is None:
            facts = str(artifacts.facts_path)
        if pool is None:
            pool = str(artifacts.pool_path)
    if facts is None:
        raise ValueError("categorize: `facts` is required unless the model is the world's base")

    # The tokenizer first: a question longer than the model's context is refused on its line
    # as the file is read, before any prompt holding it is rendered, tokenized or generated on.
    limit = text_limit(model_path, load_tokenizer(model_path))
    all_facts = load_facts(Path(facts), limit=limit)
    if pool is not None:
        pool_facts = load_facts(Path(pool), limit=limit)
        pool_ids = {f.id for f in pool_facts}
        tested = [f for f in all_facts if f.id not in pool_ids]
    else:
        pool_file = pool_sidecar(out_path)
        if pool_file.exists():
            pool_facts = load_facts(pool_file, limit=limit)
            pool_ids = {f.id for f in pool_facts}
            tested = [f for f in all_facts if f.id not in pool_ids]
        else:
            pool_facts, tested = default_pool(all_facts, pool_size, seed)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            save_facts(pool_facts, pool_file)
        if progress:
            print(f"few-shot pool: {len(pool_facts)} facts in {pool_file} (not categorised)")

    check_match_rule(match, "categorize --match")
    check_compute_dtype(compute_dtype, "categorize --compute_dtype")
    warn_answer_problems(tested, str(facts), out_path.with_name(out_path.name + ".answers.jsonl"),
                         match)
    if not tested:
        raise ValueError(
            f"categorize: nothing to categorise: all {len(all_facts)} facts of {facts} are in the "
            "few-shot pool"
        )

    lm, tokenizer = load_model(model_path, adapter, device=device, dtype=dtype, strict=strict)
    used_threads = set_threads(sum(p.numel() for p in lm.parameters()), threads)

    partial = out_path.with_name(out_path.name + ".partial")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    result = categorize(
        lm, tokenizer, tested, pool_facts, n_exp=n_exp, n_shot=n_shot, sample=sample,
        n_samples=n_samples, temperature=temperature, top_k=top_k, batch_size=batch_size,
        max_new_tokens=max_new_tokens, seed=seed, match=match, compute_dtype=compute_dtype,
        progress=progress, checkpoint=partial,
    )
    save_facts(result, out_path)
    weights = str(model_dtype(lm)).removeprefix("torch.")
    record = {
        "dtype": weights, "device": next(lm.parameters()).device.type,
        "compute_dtype": effective_compute_dtype(compute_dtype, weights),
        "model": str(model_path), "adapter": adapter, "match": match,
        "threads": used_threads,
        "probe": {"n_exp": n_exp, "n_shot": n_shot, "max_new_tokens": max_new_tokens,
                  "seed": seed, "sample": sample},
    }
    atomic_write_text(record_sidecar(out_path), json.dumps(record, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    partial.with_name(partial.name + ".settings.json").unlink(missing_ok=True)
    counts = category_counts(result)
    print(f"categorised {len(result)} facts -> {out_path}")
    for name, count in counts.items():
        print(f"  {name:<12} {count}")
    return counts
