"""SliCK knowledge categories (Gekhman et al. 2024), as used by Pletenev et al. 2025.

A fact's category for a model comes from how often the model answers it under `n_exp` different
`n_shot`-shot prompts: HighlyKnown when always (greedy), MaybeKnown when sometimes, WeaklyKnown
when never greedily but sometimes when sampling, Unknown otherwise. The few-shot sets are drawn
once from a pool with a seed, so categories before and after training compare like with like.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import zlib
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import torch

from lora_lightning.facts import CATEGORIES, Fact, MatchRule, check_match_rule, fact_to_row
from lora_lightning.inference import (
    evaluating,
    greedy_decode,
    left_padded_batches,
    model_device,
    model_dtype,
    pad_token_id,
    prefix_cache,
    upcast,
)
from lora_lightning.metrics.functional import prompt_accuracy
from lora_lightning.progress import progress_bar
from lora_lightning.prompts import FewShotPrompts, build_fewshot_sets, extract_answer

# What a probe computes in: "float32" (weights held in bfloat16 or float16 are upcast for the
# probe: the same weights, answers that do not depend on threads or batch shapes) or "model"
# (the weights' own dtype: faster on hardware with fast half-precision kernels, and no float32
# copy of the weights in memory, but answers that move with the arithmetic).
ComputeDtype = Literal["float32", "model"]
COMPUTE_DTYPES: tuple[str, ...] = get_args(ComputeDtype)


@dataclass(frozen=True)
class ProbeConfig:
    """How the model is asked about facts: SliCK's few-shot greedy probe (docs/science.md).
    The one home of these defaults: the training module, `categorize`, the world's build and
    `ask` read them from here.

    The same settings (and seed, hence the same few-shot sets) must be used before and after
    training for categories to be comparable.
    """

    n_exp: int = 10
    n_shot: int = 4
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 0
    # how an answer counts as right: the paper's "substring" (an alias inside the output) or
    # "word" (whole words: for files with short answers or codes, docs/usage.md#fact-files)
    match: MatchRule = "substring"
    # the arithmetic of the probe (`ComputeDtype`); before and after training must share it
    compute_dtype: ComputeDtype = "float32"
    # Sampling, for SliCK's WeaklyKnown (`categorize --sample`): constants rather than fields,
    # so that a run's settings, its saved config and its caches' keys stay as they were.
    n_samples: ClassVar[int] = 16
    temperature: ClassVar[float] = 0.5
    top_k: ClassVar[int] = 40

    def __post_init__(self) -> None:
        check_match_rule(self.match, "probe.match")
        check_compute_dtype(self.compute_dtype, "probe.compute_dtype")


def check_compute_dtype(value: str, where: str = "compute_dtype") -> None:
    """Refuse a compute dtype that is not one of `COMPUTE_DTYPES`, naming the setting."""
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"{where}: unknown compute dtype {value!r}; use one of "
                         f"{', '.join(COMPUTE_DTYPES)}")


def _upcast_to(compute_dtype: str) -> torch.dtype | None:
    check_compute_dtype(compute_dtype)
    return torch.float32 if compute_dtype == "float32" else None


def effective_compute_dtype(compute_dtype: str, weights_dtype: torch.dtype | str) -> str:
    """The dtype a probe with `compute_dtype` computes in for weights held in `weights_dtype`
    ("bfloat16" weights probed with "float32" compute in float32; float32 weights compute in
    float32 either way), as recorded beside categories and compared before vs after."""
    name = str(weights_dtype).removeprefix("torch.")
    if compute_dtype == "model":
        return name
    check_compute_dtype(compute_dtype)
    weights = getattr(torch, name, None)
    if isinstance(weights, torch.dtype) and weights.is_floating_point and (
        torch.finfo(weights).bits < torch.finfo(torch.float32).bits
    ):
        return "float32"
    return name


@dataclass
class Generation:
    """One generated answer: `text` (after `extract_answer`) and `mean_token_prob`, the mean
    probability of the generated tokens (through the end-of-turn token), a confidence score."""

    text: str
    mean_token_prob: float


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _sample(
    model, batch, gen_config, cache: dict, seed: int, stops: Sequence[int]
) -> list[tuple[list[int], list[float]]]:
    """Sampled continuations of a batch through `generate`: per returned sequence its tokens
    through the first stop token and their log-probabilities after the sampling warpers.
    Seeded, inside a fork of the RNG, so the caller's random state (a training run's dropout)
    is untouched."""
    device = model_device(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _seed_everything(seed)
        out = model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            generation_config=gen_config, **cache,
        )
    new = out.sequences[:, batch.width :]
    logprobs = model.compute_transition_scores(
        out.sequences, out.scores, normalize_logits=True
    ).float()
    rows = []
    for row in range(new.shape[0]):
        tokens = new[row].tolist()
        ends = [k for k, t in enumerate(tokens) if t in stops]
        n = ends[0] + 1 if ends else len(tokens)
        rows.append((tokens[:n], logprobs[row, :n].tolist()))
    return rows


def generate_answers(
    model,
    tokenizer,
    prompts: list[str],
    batch_size: int = ProbeConfig.batch_size,
    max_new_tokens: int = ProbeConfig.max_new_tokens,
    do_sample: bool = False,
    temperature: float = ProbeConfig.temperature,
    top_k: int = ProbeConfig.top_k,
    num_return_sequences: int = 1,
    seed: int = 0,
    progress: bool = False,
    share_prefix: int = 24,
    bar: Any = None,
    compute_dtype: ComputeDtype = ProbeConfig.compute_dtype,
) -> list[Generation]:
    """Answers to already-rendered prompts, `num_return_sequences` per prompt, in prompt order.

    Prompts are encoded without extra special tokens (chat templates already write the bos
    token) and batched by `inference.left_padded_batches`, so every continuation starts right
    after its prompt. Prompts whose first `share_prefix` tokens agree (the same few-shot
    examples) are batched together and their common prefix is encoded once per batch, which on
    a small model is most of the cost of a probe (0 turns this off). Greedy answers come from
    `inference.greedy_decode` (the answers of `generate`, without its per-step machinery and
    with ended rows leaving the batch); sampled ones from `generate`, seeded per batch, so a
    run is repeatable, inside a fork of the RNG, so the caller's random state (a training run's
    dropout) is untouched. `bar`: a caller's progress counter to advance by each batch's prompts
    (in place of this call's own), so a probe of many calls shows one progress from its start.
    `compute_dtype`: the probe's arithmetic (`ComputeDtype`; `inference.upcast`).
    """
    from transformers import GenerationConfig

    if not prompts:
        return []
    pad = pad_token_id(tokenizer)
    # Stop at any end token the model declares too (Llama-3.1 lists <|eot_id|> and others).
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for tok in model_eos if isinstance(model_eos, list) else [model_eos]:
        if tok is not None and tok not in stops:
            stops.append(tok)
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=top_k if do_sample else None,
        top_p=None,
        num_return_sequences=num_return_sequences,
        pad_token_id=pad,
        eos_token_id=stops or None,
        bos_token_id=tokenizer.bos_token_id,
        return_dict_in_generate=True,
        output_scores=True,
    )
    device = model_device(model)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    results: list[list[Generation]] = [[] for _ in prompts]
    # generate() does not repeat a given cache for several samples per prompt
    shared = share_prefix if num_return_sequences == 1 else 0
    batches = left_padded_batches(encoded, batch_size, pad, device, share_prefix=shared)
    own = bar is None
    if own:
        bar = progress_bar(len(prompts), "generating", enabled=progress)
    with bar if own else nullcontext(), upcast(model, _upcast_to(compute_dtype)), \
            evaluating(model):
        for batch in batches:
            cache = prefix_cache(model, batch) if batch.prefix_len else {}
            if do_sample or num_return_sequences > 1:
                rows = _sample(model, batch, gen_config, cache, seed + batch.start, stops)
            else:
                rows = zip(*greedy_decode(model, batch, max_new_tokens, stops, cache), strict=True)
            for row, (tokens, logprobs) in enumerate(rows):
                text = tokenizer.decode(tokens, skip_special_tokens=True)
                prob = sum(math.exp(v) for v in logprobs) / len(logprobs) if logprobs else 0.0
                results[batch.indices[row // num_return_sequences]].append(
                    Generation(text=extract_answer(text), mean_token_prob=prob)
                )
            bar.update(len(batch.indices))
    return [g for per_prompt in results for g in per_prompt]


def category_of(p_greedy: float, p_sampled: float | None = None) -> str:
    """SliCK's category from the greedy (and optionally sampled) correctness rates.

    Without sampling (`p_sampled=None`) WeaklyKnown cannot occur, as in the paper.
    """
    for name, p in (("p_greedy", p_greedy), ("p_sampled", p_sampled)):
        if p is not None and not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
    if p_greedy == 1.0:
        return "HighlyKnown"
    if p_greedy > 0.0:
        return "MaybeKnown"
    if p_sampled is not None and p_sampled > 0.0:
        return "WeaklyKnown"
    return "Unknown"


def _fact_to_json(fact: Fact) -> str:
    return json.dumps(fact_to_row(fact), ensure_ascii=False)


def _read_checkpoint(path: Path) -> dict[str, Fact]:
    """Finished facts of an interrupted run.

    Every record is written with its newline, so an unterminated last line is a record torn by
    a crash: it is cut off the file (so appending continues on a clean line) and redone.
    """
    done: dict[str, Fact] = {}
    if not path.exists():
        return done
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(data))
    for lineno, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            fact = Fact(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}:{lineno}: corrupt categorisation checkpoint: {err}") from err
        done[fact.id] = fact
    return done


def _check_checkpoint_settings(checkpoint: Path, settings: dict) -> None:
    """Refuse to resume a checkpoint written with other settings (it would mix two different
    measurements); record the settings beside a new one."""
    sidecar = checkpoint.with_name(checkpoint.name + ".settings.json")
    if sidecar.exists():
        old = json.loads(sidecar.read_text())
        changed = sorted(k for k in settings.keys() | old.keys() if old.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"checkpoint {checkpoint} was written with other settings ({', '.join(changed)}"
                f" differ); delete it and {sidecar.name} to start over"
            )
    else:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        sidecar.write_text(json.dumps(settings))


def _append_or_nothing(path: Path | None):
    """The checkpoint opened for appending, or a null context when there is none."""
    return nullcontext() if path is None else Path(path).open("a", encoding="utf-8")


def categorize(
    model,
    tokenizer,
    facts: Sequence[Fact],
    pool: Sequence[Fact],
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
    progress: bool | str = True,
    checkpoint: Path | None = None,
) -> list[Fact]:
    """SliCK categories of `facts` for `model`: new Fact objects, in input order, with
    `category`, `p_greedy`, `p_sampled` (None unless `sample`) and `predictions` (the greedy
    answer of each of the `n_exp` prompts).

    The few-shot sets come from `pool` with `seed`, identical for every fact and every call, and
    `pool` must be disjoint from `facts` (a shot must never give the answer away). With
    `checkpoint`, each finished chunk is appended to that JSONL and facts already in it are not
    redone, so a crash loses at most one chunk. `progress` (a string: the phase's name) counts
    prompts, batch by batch: one chunk of a real model's probe takes a minute. `match` is the
    rule an answer is right by (`facts.answer_matches`). `compute_dtype` is the probe's
    arithmetic (`ComputeDtype`): "float32" gives the same answers at any thread count and batch
    size (on SmolLM2-135M in bfloat16 they did not), so a category that moves after training
    moved because of the adapter.
    """
    check_match_rule(match)
    check_compute_dtype(compute_dtype)
    computes_in = effective_compute_dtype(compute_dtype, model_dtype(model))
    ids = [f.id for f in facts]
    if len(set(ids)) != len(ids):
        dupes = sorted(k for k, v in Counter(ids).items() if v > 1)
        raise ValueError(f"duplicate fact ids: {dupes[:5]}")
    overlap = set(ids) & {f.id for f in pool}
    if overlap:
        raise ValueError(
            f"{len(overlap)} facts are also in the few-shot pool (e.g. {sorted(overlap)[:3]}); "
            "the pool must be disjoint from the facts being categorised"
        )
    shot_sets = build_fewshot_sets(pool, n_exp=n_exp, n_shot=n_shot, seed=seed)
    renderers = [FewShotPrompts(tokenizer, shots) for shots in shot_sets]

    done: dict[str, Fact] = {}
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        settings = {
            "n_exp": n_exp, "n_shot": n_shot, "seed": seed, "sample": sample,
            "n_samples": n_samples if sample else None,
            "temperature": temperature if sample else None, "top_k": top_k if sample else None,
            "max_new_tokens": max_new_tokens, "pool": sorted(f.id for f in pool),
            "compute_dtype": computes_in,
        }
        if match != "substring":  # checkpoints written before the rule was a setting resume
            settings["match"] = match
        _check_checkpoint_settings(checkpoint, settings)
        wanted = set(ids)
        done = {k: v for k, v in _read_checkpoint(checkpoint).items() if k in wanted}
    todo = [f for f in facts if f.id not in done]
    # prompts are batched per few-shot set (they share its prefix): a chunk of `batch_size`
    # facts is n_exp full batches, written to the checkpoint together
    chunk = batch_size
    # progress in prompts (every batch), each fact's n_exp greedy ones and as many sampled
    per_fact = n_exp * (2 if sample else 1)
    name = progress if isinstance(progress, str) else "categorising"
    bar = progress_bar(len(facts) * per_fact, f"{name} ({len(facts)} facts x {per_fact} prompts)",
                       enabled=bool(progress), initial=len(done) * per_fact)
    # upcast once for the whole probe, not once per chunk (`generate_answers` then finds
    # nothing narrower left to cast)
    with bar, _append_or_nothing(checkpoint) as sink, upcast(model, _upcast_to(compute_dtype)):
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            prompts = [prompt(f.question) for f in part for prompt in renderers]
            greedy = generate_answers(
                model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                seed=seed, bar=bar, compute_dtype=compute_dtype,
            )
            sampled = None
            if sample:
                # seeded by the chunk's content, so a resumed run samples what a full run would
                chunk_seed = seed + zlib.crc32(part[0].id.encode())
                sampled = generate_answers(
                    model, tokenizer, prompts, batch_size=max(1, batch_size // n_samples),
                    max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                    top_k=top_k, num_return_sequences=n_samples, seed=chunk_seed, bar=bar,
                    compute_dtype=compute_dtype,
                )
            for j, fact in enumerate(part):
                mine = greedy[j * n_exp : (j + 1) * n_exp]
                answers = [g.text for g in mine]
                confidence = sum(g.mean_token_prob for g in mine) / n_exp
                p_greedy = prompt_accuracy(answers, fact, strict=match == "word")
                p_sampled = None
                if sampled is not None:
                    per = n_exp * n_samples
                    mine_sampled = sampled[j * per : (j + 1) * per]
                    p_sampled = prompt_accuracy([g.text for g in mine_sampled], fact,
                                                strict=match == "word")
                result = dataclasses.replace(
                    fact, category=category_of(p_greedy, p_sampled), p_greedy=p_greedy,
                    p_sampled=p_sampled, predictions=answers, confidence=confidence,
                )
                done[fact.id] = result
                if sink is not None:
                    sink.write(_fact_to_json(result) + "\n")
            if sink is not None:
                sink.flush()
    return [done[i] for i in ids]


def category_counts(facts: Sequence[Fact]) -> dict[str, int]:
    """Facts per category, every category listed (zeros included) in a fixed order."""
    counts = Counter(f.category for f in facts)
    return {c: counts.get(c, 0) for c in CATEGORIES}


def default_pool(
    facts: Sequence[Fact], pool_size: int, seed: int
) -> tuple[list[Fact], list[Fact]]:
    """(pool, rest) for a fact file that comes without a pool.

    Rule: a seeded random sample of `pool_size` facts is carved out of the file and used only
    as few-shot examples; the rest are categorised. The same file and seed always give the same
    pool, and the command saves it beside its output so categorising again after training (pass
    it as `pool`) reuses exactly the same shots.
    """
    if len(facts) <= pool_size:
        raise ValueError(
            f"cannot carve a few-shot pool of {pool_size} facts out of a file of {len(facts)}"
        )
    ids = set(random.Random(seed).sample(sorted(f.id for f in facts), pool_size))
    return [f for f in facts if f.id in ids], [f for f in facts if f.id not in ids]
