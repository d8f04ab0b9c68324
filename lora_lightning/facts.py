"""Facts: the question/answer records everything else is built from.

One `Fact` type serves every source (our JSONL, the knowledge-packing datasets, the synthetic
world), so prompts, batches, categorisation and metrics never care where a fact came from.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalisation: lower-case, drop punctuation and articles, fold spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


@dataclass
class Fact:
    """One question with its accepted answers.

    `answers[0]` is the canonical answer (the one trained on); any alias counts as correct.
    `predictions` keeps the per-prompt greedy answers of the last categorisation, which the
    concentration and refusal measures read later.
    """

    id: str
    question: str
    answers: list[str]
    normalized_answers: list[str] = field(default_factory=list)
    category: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    relation: str | None = None
    subject: str | None = None
    p_greedy: float | None = None
    p_sampled: float | None = None
    predictions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.normalized_answers:
            self.normalized_answers = [normalize_answer(a) for a in self.answers]

    @property
    def answer(self) -> str:
        """The canonical answer."""
        return self.answers[0]


def is_correct(output: str, fact: Fact) -> bool:
    """The paper's criterion: some normalised alias is a substring of the lower-cased output."""
    out = output.lower()
    return any(alias and alias in out for alias in fact.normalized_answers)
