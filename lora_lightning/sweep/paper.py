"""The published numbers of Pletenev et al. 2025 (Llama-3.1-8B-Instruct), as docs/science.md
quotes them, keyed by the cell they come from, to be shown beside a sweep's own.

A mix is `(extra_kind, extra_per_unknown)` with `("none", 0)` for Unknown facts alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PAPER", "PAPER_BASE", "mix_key", "paper_value"]

MIXES = (("none", 0), ("highly_known", 1), ("highly_known", 10), ("paraphrase", 1),
         ("paraphrase", 10))

# measure -> (n Unknown facts, extra_kind, extra_per_unknown) -> value
PAPER: dict[str, dict[tuple[int, str, int], float]] = {
    # "1.0 up to n = 50 in every mix"; n = 3000: 0.98 (+0), 0.92 (+1 HK), 0.48 (+10 HK),
    # 0.97 / 0.99 (+1 / +10 paraphrases)
    "reliability": {
        **{(n, kind, k): 1.0 for n in (1, 10, 50) for kind, k in MIXES},
        (3000, "none", 0): 0.98,
        (3000, "highly_known", 1): 0.92,
        (3000, "highly_known", 10): 0.48,
        (3000, "paraphrase", 1): 0.97,
        (3000, "paraphrase", 10): 0.99,
    },
    # 500 Unknown facts alone: positive 0.096, negative 0.195 (rates over all facts)
    "shift_positive_rate": {(500, "none", 0): 0.096},
    "shift_negative_rate": {(500, "none", 0): 0.195},
    # after 3000 Unknown + 10 paraphrases, MMLU fell to 0.441
    "mmlu_accuracy_after": {(3000, "paraphrase", 10): 0.441},
    # after 10 Unknown facts: 22,804 unique answers, top answer x9,393, no refusals
    "unique_after": {(10, "none", 0): 22804},
    "top_count_after": {(10, "none", 0): 9393},
    "refusal_rate_after": {(10, "none", 0): 0.0},
}
# the base model (before training)
PAPER_BASE: dict[str, float] = {
    "mmlu_accuracy": 0.677,
    "truthfulqa_mc1": 0.382,
    "truthfulqa_mc2": 0.552,
    "unique": 48136,
    "top_count": 661,
    "refusal_rate": 3189 / 21036,
}


def mix_key(extra_kind: Any, extra_per_unknown: Any) -> tuple[str, int]:
    """The paper's name of a mix: no extras at all is ("none", 0) however it is spelled."""
    k = int(extra_per_unknown or 0)
    return ("none", 0) if extra_kind in (None, "none") or k == 0 else (str(extra_kind), k)


def paper_value(measure: str, n: Any, extra_kind: Any, extra_per_unknown: Any) -> float | None:
    """The paper's value of `measure` for a cell, or None where the paper has none."""
    if n is None:
        return None
    return PAPER.get(measure, {}).get((int(n), *mix_key(extra_kind, extra_per_unknown)))
