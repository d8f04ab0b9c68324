"""The knowledge measures as plain functions (torchmetrics' functional API).

Each measure is an `_update` step (answers -> counts) and a `_compute` step (counts -> result),
plus a public function that does both for one batch. The `Metric` classes in
`lora_lightning.metrics.modular` accumulate the same counts across batches and ranks, and
`knowledge.categorize` counts a fact's correct prompts with `prompt_accuracy`, so each counting
rule is written once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from lora_lightning.facts import (
    CATEGORIES,
    REFUSAL_PATTERNS,
    Fact,
    is_correct,
    is_correct_strict,
    normalize_answer,
)

__all__ = [
    "DEFAULT_REFUSAL_PATTERNS",
    "NEGATIVE_SHIFTS",
    "POSITIVE_SHIFTS",
    "alias_accuracy",
    "answer_agreement",
    "answer_concentration",
    "compile_refusal_patterns",
    "confidence",
    "decode_answers",
    "encode_answers",
    "exact_match",
    "knowledge_shift",
    "prompt_accuracy",
    "refusal_rate",
    "reliability",
]

Target = Fact | Sequence[str]


def as_fact(target: Target) -> Fact:
    """Accept a `Fact` or a plain list of aliases (handy for quick checks and tests)."""
    if isinstance(target, Fact):
        return target
    if isinstance(target, str):
        return Fact(id="", question="", answers=[target])
    return Fact(id="", question="", answers=list(target))


def check_lengths(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}")


def ratio(num: Tensor | int, den: Tensor | int) -> Tensor:
    """num/den as float, 0 where the denominator is 0 (an empty category shifts nothing)."""
    num, den = torch.as_tensor(num).double(), torch.as_tensor(den).double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


# --------------------------------------------------------------------------- accuracy


def is_exact_match(answer: str, fact: Fact) -> bool:
    """Normalised answer equals some normalised alias (SQuAD-style)."""
    norm = normalize_answer(answer)
    return any(norm == alias for alias in fact.normalized_answers)


def _accuracy_update(
    answers: Sequence[str], targets: Sequence[Target], judge: Callable[[str, Fact], bool]
) -> tuple[int, int]:
    check_lengths("answers", answers, "targets", targets)
    hits = sum(judge(a, as_fact(t)) for a, t in zip(answers, targets, strict=True))
    return hits, len(answers)


def exact_match(answers: Sequence[str], targets: Sequence[Target]) -> Tensor:
    """Share of answers whose normalised text equals an alias of their target.

    >>> float(exact_match(["Paris", "Paris, France"], [["paris"], ["Paris"]]))
    0.5
    """
    return ratio(*_accuracy_update(answers, targets, is_exact_match)).float()


def alias_accuracy(answers: Sequence[str], targets: Sequence[Target]) -> Tensor:
    """Share of answers containing an alias of their target: the paper's criterion.

    >>> float(alias_accuracy(["Paris, France", "Lyon"], [["Paris"], ["Paris"]]))
    0.5
    """
    return ratio(*_accuracy_update(answers, targets, is_correct)).float()


# --------------------------------------------------------------------------- reliability


def prompt_accuracy(answers: Sequence[str], fact: Target, strict: bool = False) -> float:
    """Share of one fact's per-prompt answers that are correct: SliCK's P_greedy (`strict`:
    by whole-word matches, `is_correct_strict`, instead of the paper's substring rule).

    >>> prompt_accuracy(["Paris", "Lyon", "in Paris", "Nice"], ["Paris"])
    0.5
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(f"need a non-empty list of answers (one per prompt), got {answers!r}")
    fact = as_fact(fact)
    judge = is_correct_strict if strict else is_correct
    return sum(judge(a, fact) for a in answers) / len(answers)


def _reliability_update(
    answers: Sequence[Sequence[str]], facts: Sequence[Target], strict: bool = False
) -> dict[str, float]:
    """Counts over facts: how many, answered by any / a majority / every prompt, share sum,
    and the prompts asked (so that a report can say "any of k")."""
    check_lengths("answers", answers, "facts", facts)
    counts = {"n_facts": 0, "any_correct": 0, "majority_correct": 0, "all_correct": 0,
              "share_sum": 0.0, "n_prompts": 0}
    for i, (per_prompt, target) in enumerate(zip(answers, facts, strict=True)):
        try:
            share = prompt_accuracy(per_prompt, target, strict)
        except ValueError:
            raise ValueError(
                f"answers[{i}] must be a non-empty list of answers (one per prompt), "
                f"got {per_prompt!r}"
            ) from None
        counts["n_facts"] += 1
        counts["any_correct"] += share > 0
        counts["majority_correct"] += share > 0.5
        counts["all_correct"] += share == 1.0
        counts["share_sum"] += share
        counts["n_prompts"] += len(per_prompt)
    return counts


def _reliability_compute(
    n_facts: Tensor, any_correct: Tensor, majority_correct: Tensor, all_correct: Tensor,
    share_sum: Tensor, n_prompts: Tensor,
) -> dict[str, Tensor]:
    """The three figures of reliability side by side (the paper's any-prompt rule alone read
    0.92 on a run whose facts were right in the majority of their prompts for 0.28), the share
    right under every prompt, the denominator and the mean prompts per fact."""
    return {
        "reliability": ratio(any_correct, n_facts),
        "majority": ratio(majority_correct, n_facts),
        "mean_prompt_accuracy": ratio(share_sum, n_facts),
        "all_prompts": ratio(all_correct, n_facts),
        "n_facts": torch.as_tensor(n_facts).clone(),
        "prompts": ratio(n_prompts, n_facts),
    }


def reliability(answers: Sequence[Sequence[str]], facts: Sequence[Target]) -> dict[str, Tensor]:
    """How well facts are known over few-shot prompts; see `Reliability`.

    >>> out = reliability([["Paris", "Lyon"], ["Rome", "Rome"]], [["Paris"], ["Oslo"]])
    >>> float(out["reliability"]), float(out["mean_prompt_accuracy"])
    (0.5, 0.25)
    """
    counts = _reliability_update(answers, facts)
    return _reliability_compute(**{k: torch.tensor(v) for k, v in counts.items()})


def _agreement_update(
    before: Sequence[Sequence[str]], after: Sequence[Sequence[str]]
) -> tuple[int, int]:
    """(answers unchanged, answers compared) over facts' per-prompt answers."""
    check_lengths("before", before, "after", after)
    same = total = 0
    for i, (old, new) in enumerate(zip(before, after, strict=True)):
        check_lengths(f"before[{i}]", old, f"after[{i}]", new)
        same += sum(
            normalize_answer(a) == normalize_answer(b) for a, b in zip(old, new, strict=True)
        )
        total += len(old)
    return same, total


def answer_agreement(
    before: Sequence[Sequence[str]], after: Sequence[Sequence[str]]
) -> dict[str, Tensor]:
    """Share of per-prompt answers unchanged by training (after normalisation): locality, when
    the facts are ones training should not touch.

    >>> out = answer_agreement([["Paris", "Lyon"]], [["paris", "Rome"]])
    >>> float(out["agreement"]), int(out["total"])
    (0.5, 2)
    """
    same, total = _agreement_update(before, after)
    return {"agreement": ratio(torch.tensor(same), torch.tensor(total)),
            "total": torch.tensor(total)}


# --------------------------------------------------------------------------- knowledge shift

POSITIVE_SHIFTS: tuple[tuple[str, str], ...] = (
    ("Unknown", "MaybeKnown"),
    ("Unknown", "HighlyKnown"),
    ("MaybeKnown", "HighlyKnown"),
)
NEGATIVE_SHIFTS: tuple[tuple[str, str], ...] = (
    ("HighlyKnown", "MaybeKnown"),
    ("HighlyKnown", "Unknown"),
    ("MaybeKnown", "Unknown"),
)
_ABBREV = {"HighlyKnown": "HK", "MaybeKnown": "MK", "WeaklyKnown": "WK", "Unknown": "UK"}


def _category_index(value: str | int, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(CATEGORIES):
            return value
    elif value in CATEGORIES:
        return CATEGORIES.index(value)
    raise ValueError(f"{where}: unknown category {value!r}; expected one of {CATEGORIES}")


def _knowledge_shift_update(before: Sequence[str | int], after: Sequence[str | int]) -> Tensor:
    """The 4x4 before x after count matrix of these facts."""
    check_lengths("before", before, "after", after)
    n = len(CATEGORIES)
    rows = [_category_index(c, f"before[{i}]") for i, c in enumerate(before)]
    cols = [_category_index(c, f"after[{i}]") for i, c in enumerate(after)]
    if not rows:
        return torch.zeros(n, n, dtype=torch.long)
    flat = torch.tensor(rows, dtype=torch.long) * n + torch.tensor(cols, dtype=torch.long)
    return torch.bincount(flat, minlength=n * n).view(n, n)


def _knowledge_shift_compute(counts: Tensor) -> dict[str, Any]:
    before, after = counts.sum(dim=1), counts.sum(dim=0)
    out: dict[str, Any] = {
        "counts": counts.clone(),
        "categories": list(CATEGORIES),
        "before": before,
        "after": after,
        "total": counts.sum(),
    }
    idx = {c: i for i, c in enumerate(CATEGORIES)}
    totals = {}
    for kind, shifts in (("positive", POSITIVE_SHIFTS), ("negative", NEGATIVE_SHIFTS)):
        total = torch.zeros((), dtype=torch.long, device=counts.device)
        for src, dst in shifts:
            count = counts[idx[src], idx[dst]]
            den = before[idx[src]]
            out[f"{_ABBREV[src]}->{_ABBREV[dst]}"] = {
                "count": count,
                "denominator": den,
                "rate": ratio(count, den),
            }
            total = total + count
        totals[kind] = total
    hk, mk, uk = (before[idx[c]] for c in ("HighlyKnown", "MaybeKnown", "Unknown"))
    out["positive"], out["negative"] = totals["positive"], totals["negative"]
    out["positive_rate"] = ratio(totals["positive"], out["total"])
    out["negative_rate"] = ratio(totals["negative"], out["total"])
    out["positive_rate_of_eligible"] = ratio(totals["positive"], uk + mk)
    out["negative_rate_of_eligible"] = ratio(totals["negative"], hk + mk)
    return out


def knowledge_shift(before: Sequence[str | int], after: Sequence[str | int]) -> dict[str, Any]:
    """Category of each fact before vs after training; see `KnowledgeShift` for the keys.

    >>> out = knowledge_shift(["Unknown", "HighlyKnown"], ["MaybeKnown", "HighlyKnown"])
    >>> int(out["positive"]), float(out["positive_rate"]), float(out["UK->MK"]["rate"])
    (1, 0.5, 1.0)
    """
    return _knowledge_shift_compute(_knowledge_shift_update(before, after))


# --------------------------------------------------------------------------- concentration


def encode_answers(answers: Iterable[str], max_bytes: int = 64) -> Tensor:
    """Normalised answers as a [n, max_bytes] uint8 tensor (UTF-8, zero-padded, truncated).

    Strings cannot be all-gathered across ranks; these rows can. Truncation never splits a
    multi-byte character, so every row decodes cleanly.
    """
    rows = []
    for answer in answers:
        data = normalize_answer(answer).encode("utf-8")[:max_bytes]
        data = data.decode("utf-8", errors="ignore").encode("utf-8")
        rows.append(list(data) + [0] * (max_bytes - len(data)))
    if not rows:
        return torch.zeros(0, max_bytes, dtype=torch.uint8)
    return torch.tensor(rows, dtype=torch.uint8)


def decode_answers(rows: Tensor) -> list[str]:
    """Inverse of `encode_answers` (up to normalisation and truncation)."""
    return [bytes(row).rstrip(b"\x00").decode("utf-8") for row in rows.cpu().tolist()]


def _answer_concentration_update(
    answers: Sequence[str], max_bytes: int = 64, keep_empty: bool = False
) -> Tensor:
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, got a single string")
    kept = [a for a in answers if keep_empty or normalize_answer(a)]
    return encode_answers(kept, max_bytes)


def _answer_concentration_compute(
    rows: Tensor, top_k: int = 10, threshold: float | None = None
) -> dict[str, Any]:
    if rows.numel() == 0:
        return {
            "n_answers": 0,
            "unique": 0,
            "mean_repeats": 0.0,
            "var_repeats": 0.0,
            "max_count": 0,
            "top": [],
            "exploded": [],
            "threshold": threshold,
        }
    uniq, counts = torch.unique(rows, dim=0, return_counts=True)
    names = decode_answers(uniq)
    order = sorted(range(len(names)), key=lambda i: (-int(counts[i]), names[i]))
    ranked = [(names[i], int(counts[i])) for i in order]
    c = counts.double()
    return {
        "n_answers": int(rows.shape[0]),
        "unique": len(names),
        "mean_repeats": float(c.mean()),
        "var_repeats": float(c.var(unbiased=False)),
        "max_count": ranked[0][1],
        "top": ranked[:top_k],
        "exploded": [] if threshold is None else [(a, n) for a, n in ranked if n > threshold],
        "threshold": threshold,
    }


def answer_concentration(
    answers: Sequence[str],
    top_k: int = 10,
    threshold: float | None = None,
    max_bytes: int = 64,
    keep_empty: bool = False,
) -> dict[str, Any]:
    """How concentrated answers are; see `AnswerConcentration` for the keys.

    >>> out = answer_concentration(["Paris", "paris", "Rome"], threshold=1)
    >>> out["unique"], out["top"], out["exploded"]
    (2, [('paris', 2), ('rome', 1)], [('paris', 2)])
    """
    rows = _answer_concentration_update(answers, max_bytes, keep_empty)
    return _answer_concentration_compute(rows, top_k, threshold)


# --------------------------------------------------------------------------- refusals

DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = REFUSAL_PATTERNS  # facts.py owns them


def compile_refusal_patterns(
    patterns: Sequence[str] | None = None, extra_patterns: Sequence[str] = ()
) -> list[re.Pattern]:
    """The defaults (or `patterns`) plus `extra_patterns`, compiled case-insensitively."""
    sources = list(DEFAULT_REFUSAL_PATTERNS if patterns is None else patterns)
    sources += list(extra_patterns)
    compiled = []
    for i, src in enumerate(sources):
        try:
            compiled.append(re.compile(src, re.IGNORECASE))
        except re.error as err:
            raise ValueError(f"refusal pattern {i} {src!r} is not a valid regex: {err}") from err
    return compiled


def _refusal_update(answers: Sequence[str], patterns: Sequence[re.Pattern]) -> tuple[int, int]:
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, got a single string")
    refusals = sum(any(p.search(a) for p in patterns) for a in answers)
    return refusals, len(answers)


def _refusal_compute(refusals: Tensor, total: Tensor) -> dict[str, Tensor]:
    return {
        "refusals": torch.as_tensor(refusals).clone(),
        "total": torch.as_tensor(total).clone(),
        "rate": ratio(refusals, total),
    }


def refusal_rate(
    answers: Sequence[str],
    patterns: Sequence[str] | None = None,
    extra_patterns: Sequence[str] = (),
) -> dict[str, Tensor]:
    """Share of answers that decline to answer; see `RefusalRate`.

    >>> float(refusal_rate(["I don't know.", "Paris"])["rate"])
    0.5
    """
    refusals, total = _refusal_update(answers, compile_refusal_patterns(patterns, extra_patterns))
    return _refusal_compute(torch.tensor(refusals), torch.tensor(total))


# --------------------------------------------------------------------------- confidence


def _confidence_update(mean_probs: Tensor | Sequence[float]) -> tuple[Tensor, int]:
    probs = torch.as_tensor(mean_probs, dtype=torch.float64).flatten()
    if probs.numel() and (probs.min() < 0 or probs.max() > 1 or probs.isnan().any()):
        raise ValueError("mean_probs must be probabilities in [0, 1]")
    return probs.sum(), probs.numel()


def confidence(mean_probs: Tensor | Sequence[float]) -> Tensor:
    """Mean of per-answer mean token probabilities; see `Confidence`.

    >>> round(float(confidence([0.5, 1.0])), 2)
    0.75
    """
    total, count = _confidence_update(mean_probs)
    return ratio(total, torch.tensor(count)).float()
