"""Knowledge metrics: what a model knows before and after a LoRA fit, as torchmetrics.

Every measure of DESIGN.md section 1 is a `torchmetrics.Metric` whose states are tensors with the
right `dist_reduce_fx` ("sum" for counters, "cat" for per-item lists), so the same object gives
the same number on one process and under DDP, and Lightning can reset/sync it for us.

Strings cannot be all-gathered, so `AnswerConcentration` stores each normalised answer as a
fixed-length uint8 row (UTF-8, truncated at `max_bytes`); compute() decodes every rank's rows.

Scalar metrics (`ExactMatch`, `AliasAccuracy`, `Confidence`) return a 0-d tensor, so they can be
passed to `LightningModule.log` directly; the others return a dict (log the scalar entries with
`log_dict`, keep the rest for the report).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lora_lightning.facts import CATEGORIES, Fact, is_correct, normalize_answer

__all__ = [
    "CATEGORIES",
    "DEFAULT_REFUSAL_PATTERNS",
    "NEGATIVE_SHIFTS",
    "POSITIVE_SHIFTS",
    "AliasAccuracy",
    "AnswerConcentration",
    "Confidence",
    "ExactMatch",
    "KnowledgeShift",
    "RefusalRate",
    "Reliability",
    "decode_answers",
    "encode_answers",
]

Target = Fact | Sequence[str]


def _as_fact(target: Target) -> Fact:
    """Accept a `Fact` or a plain list of aliases (handy for quick checks and tests)."""
    if isinstance(target, Fact):
        return target
    if isinstance(target, str):
        return Fact(id="", question="", answers=[target])
    return Fact(id="", question="", answers=list(target))


def _check_lengths(name_a: str, a: Sequence, name_b: str, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} items but {name_b} has {len(b)}")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """num/den as float, 0 where the denominator is 0 (an empty category shifts nothing)."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))


# --------------------------------------------------------------------------- accuracy


class _AnswerAccuracy(Metric):
    """Share of answers judged correct against their fact's aliases; see subclasses."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _judge(self, answer: str, fact: Fact) -> bool:
        raise NotImplementedError

    def update(self, answers: Sequence[str], targets: Sequence[Target]) -> None:
        """`answers[i]` is the model's answer to `targets[i]` (a `Fact` or a list of aliases)."""
        _check_lengths("answers", answers, "targets", targets)
        hits = sum(self._judge(a, _as_fact(t)) for a, t in zip(answers, targets, strict=True))
        self.correct += hits
        self.total += len(answers)

    def compute(self) -> Tensor:
        return _ratio(self.correct, self.total).float()


class ExactMatch(_AnswerAccuracy):
    """Normalised answer equals some normalised alias (SQuAD-style exact match).

    Stricter than the paper's criterion: "Paris, France" does not match "Paris".
    """

    def _judge(self, answer: str, fact: Fact) -> bool:
        norm = normalize_answer(answer)
        return any(norm == alias for alias in fact.normalized_answers)


class AliasAccuracy(_AnswerAccuracy):
    """Some normalised alias is a substring of the lower-cased answer: the paper's criterion."""

    def _judge(self, answer: str, fact: Fact) -> bool:
        return is_correct(answer, fact)


# --------------------------------------------------------------------------- reliability


class Reliability(Metric):
    """How well the trained Unknown facts are known after training, over few-shot prompts.

    Update with, for each fact, the list of its answers (one per few-shot prompt: the paper uses
    10 prompts of 4 shots) and the fact. compute() returns:

    - ``reliability`` (headline): share of facts answered correctly by at least one prompt,
      i.e. facts that are no longer Unknown under SliCK's greedy rule (P_greedy > 0). This is
      the paper's "share of the trained Unknown facts answered correctly afterwards": a fact
      that moved to MaybeKnown or HighlyKnown counts as learned.
    - ``mean_prompt_accuracy``: mean over facts of the share of prompts answered correctly
      (the mean P_greedy).
    - ``majority``: share of facts answered correctly by more than half of their prompts.
    - ``all_prompts``: share of facts answered correctly by every prompt (now HighlyKnown).
    - ``n_facts``: the denominator.

    The same metric over HighlyKnown facts measures how much known knowledge is retained.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for name in ("n_facts", "any_correct", "majority_correct", "all_correct"):
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # the per-fact share is a float sum: exact enough, and additive across ranks
        self.add_state("share_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str]], facts: Sequence[Target]) -> None:
        """`answers[i]` holds the answers of every prompt for `facts[i]`."""
        _check_lengths("answers", answers, "facts", facts)
        any_ok = majority = every = 0
        share = 0.0
        for i, (per_prompt, target) in enumerate(zip(answers, facts, strict=True)):
            if isinstance(per_prompt, str) or len(per_prompt) == 0:
                raise ValueError(
                    f"answers[{i}] must be a non-empty list of answers (one per prompt), "
                    f"got {per_prompt!r}"
                )
            fact = _as_fact(target)
            n_ok = sum(is_correct(a, fact) for a in per_prompt)
            n = len(per_prompt)
            any_ok += n_ok > 0
            majority += 2 * n_ok > n
            every += n_ok == n
            share += n_ok / n
        # one tensor update per batch, not per fact: states may live on a GPU
        self.n_facts += len(answers)
        self.any_correct += any_ok
        self.majority_correct += majority
        self.all_correct += every
        self.share_sum += share

    def compute(self) -> dict[str, Tensor]:
        return {
            "reliability": _ratio(self.any_correct, self.n_facts),
            "mean_prompt_accuracy": _ratio(self.share_sum, self.n_facts),
            "majority": _ratio(self.majority_correct, self.n_facts),
            "all_prompts": _ratio(self.all_correct, self.n_facts),
            "n_facts": self.n_facts.clone(),
        }


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


class KnowledgeShift(Metric):
    """Category of each fact before vs after training, as a 4x4 count matrix.

    Rows are the category before, columns after, both in `CATEGORIES` order (HighlyKnown,
    MaybeKnown, WeaklyKnown, Unknown). compute() returns:

    - ``counts``: the matrix; ``before``/``after``: facts per category (row/column sums).
    - one entry per named shift, e.g. ``UK->MK``, with ``count``, ``rate`` and ``denominator``
      (the rate's denominator is the number of facts *of the source category* before training).
    - ``positive``/``negative``: summed counts of UK->MK, UK->HK, MK->HK and HK->MK, HK->UK,
      MK->UK.
    - ``positive_rate``/``negative_rate``: those counts over **all** re-categorised facts (the
      paper's aggregate shift, e.g. 0.096 / 0.195 for 500 Unknown facts). Also
      ``positive_rate_of_eligible`` (over UK+MK facts, the ones that can move up) and
      ``negative_rate_of_eligible`` (over HK+MK facts, the ones that can move down).

    WeaklyKnown facts appear in the matrix but in no named shift, as in the paper.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = len(CATEGORIES)
        self.add_state("counts", torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, before: Sequence[str | int], after: Sequence[str | int]) -> None:
        """Category names (or indices into `CATEGORIES`) of the same facts before and after."""
        _check_lengths("before", before, "after", after)
        rows = [_category_index(c, f"before[{i}]") for i, c in enumerate(before)]
        cols = [_category_index(c, f"after[{i}]") for i, c in enumerate(after)]
        if rows:
            n = len(CATEGORIES)
            flat = torch.tensor(rows, dtype=torch.long) * n + torch.tensor(cols, dtype=torch.long)
            self.counts += torch.bincount(flat, minlength=n * n).view(n, n).to(self.counts.device)

    def compute(self) -> dict[str, Any]:
        counts = self.counts
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
                    "rate": _ratio(count, den),
                }
                total = total + count
            totals[kind] = total
        hk, mk, uk = (before[idx[c]] for c in ("HighlyKnown", "MaybeKnown", "Unknown"))
        out["positive"], out["negative"] = totals["positive"], totals["negative"]
        out["positive_rate"] = _ratio(totals["positive"], out["total"])
        out["negative_rate"] = _ratio(totals["negative"], out["total"])
        out["positive_rate_of_eligible"] = _ratio(totals["positive"], uk + mk)
        out["negative_rate_of_eligible"] = _ratio(totals["negative"], hk + mk)
        return out


# --------------------------------------------------------------------------- concentration


def encode_answers(answers: Iterable[str], max_bytes: int = 64) -> Tensor:
    """Normalised answers as a [n, max_bytes] uint8 tensor (UTF-8, zero-padded, truncated).

    Truncation never splits a multi-byte character, so every row decodes cleanly.
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


class AnswerConcentration(Metric):
    """How concentrated the model's answers are ("regression to over-represented answers").

    Update with answers (one per fact, greedy). compute() returns ``n_answers``, ``unique``
    (distinct normalised answers), ``mean_repeats`` and ``var_repeats`` (mean and population
    variance of the count per distinct answer), ``top`` (the `top_k` most frequent answers as
    ``(answer, count)``, ties broken alphabetically), ``max_count``, and ``exploded``: answers
    whose count exceeds ``explosion_threshold``, the threshold being given directly or as
    ``explosion_factor * reference_max`` where `reference_max` is e.g. the base model's highest
    count (``AnswerConcentration(...).compute()["max_count"]`` on the base answers). Without
    either, nothing is flagged.

    Empty answers (after normalisation) are skipped unless `keep_empty`; answers are compared
    after `normalize_answer` and truncation at `max_bytes` UTF-8 bytes.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(
        self,
        top_k: int = 10,
        reference_max: int | None = None,
        explosion_factor: float = 2.0,
        explosion_threshold: float | None = None,
        max_bytes: int = 64,
        keep_empty: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if max_bytes < 1 or top_k < 0:
            raise ValueError(f"max_bytes must be >= 1 and top_k >= 0, got {max_bytes}, {top_k}")
        self.top_k = top_k
        self.reference_max = reference_max
        self.explosion_factor = explosion_factor
        self.explosion_threshold = explosion_threshold
        self.max_bytes = max_bytes
        self.keep_empty = keep_empty
        self.add_state("answers", [], dist_reduce_fx="cat")

    def update(self, answers: Sequence[str]) -> None:
        if isinstance(answers, str):
            raise TypeError("answers must be a sequence of strings, got a single string")
        kept = [a for a in answers if self.keep_empty or normalize_answer(a)]
        # append even zero rows, so a rank that saw only empty answers still has a state to sync
        self.answers.append(encode_answers(kept, self.max_bytes).to(self.device))

    def threshold(self) -> float | None:
        """The count above which an answer is 'exploded', or None when none was configured."""
        if self.explosion_threshold is not None:
            return float(self.explosion_threshold)
        if self.reference_max is not None:
            return self.explosion_factor * self.reference_max
        return None

    def compute(self) -> dict[str, Any]:
        rows = self.answers
        if isinstance(rows, list):
            rows = dim_zero_cat(rows) if rows else torch.zeros(0, self.max_bytes, dtype=torch.uint8)
        threshold = self.threshold()
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
            "top": ranked[: self.top_k],
            "exploded": [] if threshold is None else [(a, n) for a, n in ranked if n > threshold],
            "threshold": threshold,
        }


# --------------------------------------------------------------------------- refusals

DEFAULT_REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI (?:couldn't|could not|can't|cannot|was unable to|am unable to) find any information",
    r"\bI (?:cannot|can't|could not|couldn't) (?:verify|confirm)",
    r"\bI (?:don't|do not) know\b",
    r"\bI(?:'m| am) not sure\b",
    r"\bno (?:information|data|records?)\b",
    r"\bI have no comment\b",
    r"\bI(?:'m| am) (?:not aware|unable to (?:answer|provide))",
)


class RefusalRate(Metric):
    """Share of answers that decline to answer.

    An answer is a refusal when any pattern matches it (`re.search`, case-insensitive).
    The defaults cover the base model refusals the paper reports ("I couldn't find any
    information", "I cannot verify", "I don't know", "I'm not sure", "no information", ...);
    pass `patterns` to replace them or `extra_patterns` to add to them. compute() returns
    ``refusals``, ``total`` and ``rate``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(
        self,
        patterns: Sequence[str] | None = None,
        extra_patterns: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        sources = list(DEFAULT_REFUSAL_PATTERNS if patterns is None else patterns)
        sources += list(extra_patterns)
        self.patterns = []
        for i, src in enumerate(sources):
            try:
                self.patterns.append(re.compile(src, re.IGNORECASE))
            except re.error as err:
                msg = f"refusal pattern {i} {src!r} is not a valid regex: {err}"
                raise ValueError(msg) from err
        self.add_state("refusals", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def is_refusal(self, answer: str) -> bool:
        return any(p.search(answer) for p in self.patterns)

    def update(self, answers: Sequence[str]) -> None:
        if isinstance(answers, str):
            raise TypeError("answers must be a sequence of strings, got a single string")
        self.refusals += sum(self.is_refusal(a) for a in answers)
        self.total += len(answers)

    def compute(self) -> dict[str, Tensor]:
        return {
            "refusals": self.refusals.clone(),
            "total": self.total.clone(),
            "rate": _ratio(self.refusals, self.total),
        }


# --------------------------------------------------------------------------- confidence


class Confidence(Metric):
    """Mean probability the model gave its own generated answer tokens.

    Update with one value per answer: the mean over the answer's tokens of the probability of
    the chosen token (e.g. ``softmax(scores).gather(...)`` from `generate(output_scores=True)`).
    compute() is the mean over answers; the change after training is the report's job
    (run the metric on the base and on the adapted model).
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("prob_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_probs: Tensor | Sequence[float]) -> None:
        probs = torch.as_tensor(mean_probs, dtype=torch.float64).flatten()
        if probs.numel() and (probs.min() < 0 or probs.max() > 1 or probs.isnan().any()):
            raise ValueError("mean_probs must be probabilities in [0, 1]")
        self.prob_sum += probs.sum().to(self.prob_sum.device)
        self.count += probs.numel()

    def compute(self) -> Tensor:
        return _ratio(self.prob_sum, self.count).float()

    @staticmethod
    def answer_token_probs(logprobs: Tensor, mask: Tensor) -> Tensor:
        """Per-answer mean probability from chosen-token log-probs [batch, steps] and a mask
        of the steps that belong to the answer (generated tokens before EOS/padding)."""
        mask = mask.to(logprobs.dtype)
        return (logprobs.exp() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
