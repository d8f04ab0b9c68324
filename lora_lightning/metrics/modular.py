"""Knowledge metrics as torchmetrics `Metric` classes: what a model knows before and after a fit.

Every measure of docs/science.md is a `Metric` whose states are tensors with the right
`dist_reduce_fx` ("sum" for counters, "cat" for per-item lists), so the same object gives the
same number on one process and under DDP, and Lightning can reset/sync it for us. The counting
rules themselves are the functions of `lora_lightning.metrics.functional`.

Strings cannot be all-gathered, so `AnswerConcentration` stores each normalised answer as a
fixed-length uint8 row (UTF-8, truncated at `max_bytes`); compute() decodes every rank's rows.

Scalar metrics (`ExactMatch`, `AliasAccuracy`, `Confidence`) return a 0-d tensor, so they can be
passed to `LightningModule.log` directly; the others return a dict (log the scalar entries with
`log_dict`, keep the rest for the report).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.metric import Metric
from torchmetrics.utilities import dim_zero_cat

import lora_lightning.metrics.functional as F
from lora_lightning.facts import CATEGORIES, Fact, is_correct
from lora_lightning.metrics.functional import Target

__all__ = [
    "AliasAccuracy",
    "AnswerAgreement",
    "AnswerConcentration",
    "Confidence",
    "ExactMatch",
    "KnowledgeShift",
    "RefusalRate",
    "Reliability",
]


# --------------------------------------------------------------------------- accuracy


class _AnswerAccuracy(Metric):
    """Share of answers judged correct against their fact's aliases; see subclasses."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    # The states `add_state` registers, declared for the type checker: nn.Module's __getattr__,
    # which serves them, is typed `Tensor | Module`.
    correct: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @staticmethod
    def _judge(answer: str, fact: Fact, /) -> bool:
        raise NotImplementedError

    def update(self, answers: Sequence[str], targets: Sequence[Target]) -> None:
        """`answers[i]` is the model's answer to `targets[i]` (a `Fact` or a list of aliases)."""
        hits, total = F._accuracy_update(answers, targets, self._judge)
        self.correct += hits
        self.total += total

    def compute(self) -> Tensor:
        return F.ratio(self.correct, self.total).float()


class ExactMatch(_AnswerAccuracy):
    """Normalised answer equals some normalised alias (SQuAD-style exact match).

    Stricter than the paper's criterion: "Paris, France" does not match "Paris".

    >>> metric = ExactMatch()
    >>> metric.update(["Paris", "Paris, France"], [["paris"], ["Paris"]])
    >>> float(metric.compute())
    0.5
    """

    _judge = staticmethod(F.is_exact_match)


class AliasAccuracy(_AnswerAccuracy):
    """Some normalised alias is a substring of the lower-cased answer: the paper's criterion.

    >>> metric = AliasAccuracy()
    >>> metric.update(["Paris, France", "Lyon"], [["Paris"], ["Paris"]])
    >>> float(metric.compute())
    0.5
    """

    _judge = staticmethod(is_correct)


# --------------------------------------------------------------------------- reliability


class Reliability(Metric):
    """How well the trained Unknown facts are known after training, over few-shot prompts.

    Update with, for each fact, the list of its answers (one per few-shot prompt: the paper uses
    10 prompts of 4 shots) and the fact. compute() returns:

    - ``reliability`` (headline): share of facts answered correctly by at least one prompt,
      i.e. facts that are no longer Unknown under SliCK's greedy rule (P_greedy > 0). This is
      the paper's "share of the trained Unknown facts answered correctly afterwards": a fact
      that moved to MaybeKnown or HighlyKnown counts as learned.
    - ``majority``: share of facts answered correctly by more than half of their prompts.
    - ``mean_prompt_accuracy``: mean over facts of the share of prompts answered correctly
      (the mean P_greedy).
    - ``all_prompts``: share of facts answered correctly by every prompt (now HighlyKnown).
    - ``n_facts``: the denominator; ``prompts``: the mean prompts per fact (k).

    The first three are reported side by side: "any of k" alone can read 0.92 where a
    majority of prompts is right for 0.28 of the facts. With one prompt per fact (the zero-shot
    probe) the three coincide.

    The same metric over HighlyKnown facts measures how much known knowledge is retained.

    >>> metric = Reliability()
    >>> metric.update([["Paris", "Lyon"], ["Rome", "Rome"]], [["Paris"], ["Oslo"]])
    >>> out = metric.compute()
    >>> float(out["reliability"]), float(out["mean_prompt_accuracy"]), int(out["n_facts"])
    (0.5, 0.25, 2)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _COUNTS = ("n_facts", "any_correct", "majority_correct", "all_correct", "n_prompts")

    n_facts: Tensor
    any_correct: Tensor
    majority_correct: Tensor
    all_correct: Tensor
    n_prompts: Tensor
    share_sum: Tensor

    def __init__(self, strict: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strict = strict  # whole-word matches instead of the paper's substring rule
        for name in self._COUNTS:
            self.add_state(name, torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # the per-fact share is a float sum: exact enough, and additive across ranks
        self.add_state("share_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, answers: Sequence[Sequence[str]], facts: Sequence[Target]) -> None:
        """`answers[i]` holds the answers of every prompt for `facts[i]`."""
        counts = F._reliability_update(answers, facts, self.strict)
        # one tensor update per batch, not per fact: states may live on a GPU
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + value)

    def compute(self) -> dict[str, Tensor]:
        return F._reliability_compute(
            self.n_facts, self.any_correct, self.majority_correct, self.all_correct,
            self.share_sum, self.n_prompts,
        )


class AnswerAgreement(Metric):
    """Share of per-prompt answers that training left unchanged (after normalisation).

    Over facts training should not touch (other facts of the trained subjects), this is the
    editing literature's locality: agreement with the base model, not correctness. compute()
    returns ``agreement``, ``same`` and ``total`` (answers compared).

    >>> metric = AnswerAgreement()
    >>> metric.update([["Paris", "Lyon"]], [["paris", "Rome"]])
    >>> float(metric.compute()["agreement"])
    0.5
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    same: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("same", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, before: Sequence[Sequence[str]], after: Sequence[Sequence[str]]) -> None:
        """`before[i]` and `after[i]`: the per-prompt answers to one fact, before and after."""
        same, total = F._agreement_update(before, after)
        self.same += same
        self.total += total

    def compute(self) -> dict[str, Tensor]:
        return {"agreement": F.ratio(self.same, self.total), "same": self.same.clone(),
                "total": self.total.clone()}


# --------------------------------------------------------------------------- knowledge shift


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

    >>> metric = KnowledgeShift()
    >>> metric.update(["Unknown", "HighlyKnown"], ["MaybeKnown", "HighlyKnown"])
    >>> out = metric.compute()
    >>> int(out["positive"]), float(out["positive_rate"]), int(out["UK->MK"]["denominator"])
    (1, 0.5, 1)
    """

    is_differentiable = False
    full_state_update = False

    counts: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        n = len(CATEGORIES)
        self.add_state("counts", torch.zeros(n, n, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, before: Sequence[str | int], after: Sequence[str | int]) -> None:
        """Category names (or indices into `CATEGORIES`) of the same facts before and after."""
        self.counts += F._knowledge_shift_update(before, after).to(self.counts.device)

    def compute(self) -> dict[str, Any]:
        return F._knowledge_shift_compute(self.counts)


# --------------------------------------------------------------------------- concentration


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

    >>> metric = AnswerConcentration(reference_max=1, explosion_factor=1.5)
    >>> metric.update(["Paris", "paris", "Rome"])
    >>> out = metric.compute()
    >>> out["unique"], out["max_count"], out["exploded"]
    (2, 2, [('paris', 2)])
    """

    is_differentiable = False
    full_state_update = False

    answers: list[Tensor] | Tensor  # a list while updating, one tensor once synced

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
        rows = F._answer_concentration_update(answers, self.max_bytes, self.keep_empty)
        assert isinstance(self.answers, list)  # a tensor only inside compute, after a sync
        # append even zero rows, so a rank that saw only empty answers still has a state to sync
        self.answers.append(rows.to(self.device))

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
        return F._answer_concentration_compute(rows, self.top_k, self.threshold())


# --------------------------------------------------------------------------- refusals


class RefusalRate(Metric):
    """Share of answers that decline to answer.

    An answer is a refusal when any pattern matches it (`re.search`, case-insensitive).
    The defaults cover the base model refusals the paper reports ("I couldn't find any
    information", "I cannot verify", "I don't know", "I'm not sure", "no information", ...);
    pass `patterns` to replace them or `extra_patterns` to add to them. compute() returns
    ``refusals``, ``total`` and ``rate``.

    >>> metric = RefusalRate()
    >>> metric.update(["I don't know.", "Paris"])
    >>> float(metric.compute()["rate"])
    0.5
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    refusals: Tensor
    total: Tensor

    def __init__(
        self,
        patterns: Sequence[str] | None = None,
        extra_patterns: Sequence[str] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.patterns = F.compile_refusal_patterns(patterns, extra_patterns)
        self.add_state("refusals", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def is_refusal(self, answer: str) -> bool:
        return any(p.search(answer) for p in self.patterns)

    def update(self, answers: Sequence[str]) -> None:
        refusals, total = F._refusal_update(answers, self.patterns)
        self.refusals += refusals
        self.total += total

    def compute(self) -> dict[str, Tensor]:
        return F._refusal_compute(self.refusals, self.total)


# --------------------------------------------------------------------------- confidence


class Confidence(Metric):
    """Mean probability the model gave its own generated answer tokens.

    Update with one value per answer: the mean over the answer's tokens of the probability of
    the chosen token (e.g. ``softmax(scores).gather(...)`` from `generate(output_scores=True)`).
    compute() is the mean over answers; the change after training is the report's job
    (run the metric on the base and on the adapted model).

    >>> metric = Confidence()
    >>> metric.update([0.5, 1.0])
    >>> round(float(metric.compute()), 2)
    0.75
    """

    is_differentiable = False
    full_state_update = False

    prob_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("prob_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, mean_probs: Tensor | Sequence[float]) -> None:
        total, count = F._confidence_update(mean_probs)
        self.prob_sum += total.to(self.prob_sum.device)
        self.count += count

    def compute(self) -> Tensor:
        return F.ratio(self.prob_sum, self.count).float()

    @staticmethod
    def answer_token_probs(logprobs: Tensor, mask: Tensor) -> Tensor:
        """Per-answer mean probability from chosen-token log-probs [batch, steps] and a mask
        of the steps that belong to the answer (generated tokens before EOS/padding)."""
        mask = mask.to(logprobs.dtype)
        return (logprobs.exp() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
