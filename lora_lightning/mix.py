"""The training mix: which facts a run trains and validates on, as in the paper.

Train = n Unknown facts, each with its canonical answer, plus k extra samples per Unknown fact:
distinct HighlyKnown facts, or k paraphrases of that Unknown question. Validation = the trained
Unknown facts (reliability) plus held-out HighlyKnown facts (forgetting).

`build_mix` is a pure function of the facts and the settings, so every DDP rank builds the same
mix from the seed. This module needs neither torch nor Lightning: the sweeps read `mix_size`
from it to order and size their runs; `lora_lightning.data` serves the mix as batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from lora_lightning.facts import DEFAULT_POOL_SIZE, Fact, excerpt, is_refusal, normalize_answer

__all__ = [
    "HIGHLY_KNOWN", "PARAPHRASE", "UNKNOWN", "Bias", "ExtraKind", "Mix", "Selection",
    "build_mix", "check_choice", "check_extras", "extras_per_unknown", "mix_size",
]

log = logging.getLogger(__name__)

ExtraKind = Literal["highly_known", "paraphrase", "none"]
Selection = Literal["first", "random", "stratified"]
Bias = Literal["none", "subject", "answer"]

UNKNOWN, HIGHLY_KNOWN, PARAPHRASE = "unknown", "highly_known", "paraphrase"


def extras_per_unknown(extra_kind: str | None, extra_per_unknown: int | None) -> int:
    """k, the extra samples each Unknown fact brings: none when `extra_kind` is "none"."""
    return 0 if extra_kind in (None, "none") else int(extra_per_unknown or 0)


def mix_size(n_unknown: int | None, extra_per_unknown: int | None,
             extra_kind: str | None) -> int:
    """Training samples of a mix, n * (1 + k): what a sweep orders its cells by and what a
    capacity probe's steps per epoch are counted from, without building the mix."""
    return (n_unknown or 0) * (1 + extras_per_unknown(extra_kind, extra_per_unknown))


def check_choice(name: str, value: Any, literal: Any) -> None:
    """Refuse a value outside a `Literal`'s choices, naming the setting."""
    if value not in get_args(literal):
        raise ValueError(f"{name} must be one of {get_args(literal)}, got {value!r}")


def check_extras(extra_kind: str, extra_per_unknown: int) -> None:
    """Refuse extras of kind "none": k > 0 would silently train on Unknown facts alone."""
    if extra_kind == "none" and extra_per_unknown:
        raise ValueError(
            f"extra_per_unknown={extra_per_unknown} needs extra_kind 'highly_known' or "
            "'paraphrase' (extra_kind is 'none')"
        )


@dataclass
class Mix:
    """Which facts a run trains and validates on.

    `train_extra` holds the k-per-Unknown extras: HighlyKnown facts, or paraphrase facts whose
    question is a paraphrase and whose id is `<unknown id>/para<j>`.
    """

    train_unknown: list[Fact]
    train_extra: list[Fact]
    extra_kind: ExtraKind
    val_known: list[Fact]
    fewshot_pool: list[Fact] = field(default_factory=list)

    def train_items(self) -> list[tuple[Fact, str]]:
        extra = PARAPHRASE if self.extra_kind == "paraphrase" else HIGHLY_KNOWN
        return [(f, UNKNOWN) for f in self.train_unknown] + [(f, extra) for f in self.train_extra]

    def val_items(self) -> list[tuple[Fact, str]]:
        return [(f, UNKNOWN) for f in self.train_unknown] + [
            (f, HIGHLY_KNOWN) for f in self.val_known
        ]

    def fingerprint(self) -> str:
        """A digest of every trained and validated sample, to refuse resuming on another mix."""
        payload = [
            [(kind, f.id, f.question, f.answer) for f, kind in self.train_items()],
            [(kind, f.id) for f, kind in self.val_items()],
        ]
        return hashlib.sha1(json.dumps(payload).encode()).hexdigest()


def _ordered(facts: Sequence[Fact], selection: Selection, seed: int, stream: str) -> list[Fact]:
    """File order ("first", as the paper takes facts), a seeded shuffle ("random"), or a seeded
    shuffle within each relation dealt out across relations in turn ("stratified": the first n
    of any kind span every relation in proportion, where a file grouped by relation would give
    the first n all of one relation and the held-out facts all of another).

    Each role draws from its own named stream, so changing k never changes which Unknown facts
    are picked, and taking the first n of one shuffle makes smaller mixes subsets of larger ones.
    """
    facts = list(facts)
    rng = random.Random(f"{seed}:{stream}")
    if selection == "random":
        rng.shuffle(facts)
    elif selection == "stratified":
        groups: dict[str, list[Fact]] = {}
        for fact in facts:
            groups.setdefault(fact.relation or "", []).append(fact)
        for group in groups.values():
            rng.shuffle(group)
        # each fact's place is its rank within its relation, scaled to the relation's size, so
        # the relations interleave in proportion to their sizes at every prefix
        keyed = [((i + rng.random()) / len(group), name, fact)
                 for name, group in sorted(groups.items()) for i, fact in enumerate(group)]
        facts = [fact for *_, fact in sorted(keyed, key=lambda t: (t[0], t[1]))]
    return facts


def _ids(facts: Sequence[Fact], limit: int = 5) -> str:
    shown = ", ".join(f.id if len(f.id) <= 40 else excerpt(f.id, 40) for f in facts[:limit])
    return shown + (", ..." if len(facts) > limit else "")


def _biased(
    unknown: list[Fact], n_unknown: int, bias: Bias, bias_groups: int
) -> list[Fact]:
    """Restrict the Unknown facts to the `bias_groups` largest groups by subject or answer.

    This is the paper's biased mix (many facts about few entities, or with few answers): with
    `bias="answer", bias_groups=1` every trained fact shares one answer. Groups are ranked by
    size, ties by first appearance in the (possibly shuffled) order.
    """
    if bias == "none":
        return unknown

    def key(fact: Fact) -> str | None:
        return fact.subject if bias == "subject" else normalize_answer(fact.answer)

    sizes = Counter(k for f in unknown if (k := key(f)) is not None)
    if not sizes:
        raise ValueError(f"bias={bias!r} needs a {bias} on the Unknown facts; none has one")
    first_seen = {k: i for i, k in reversed(list(enumerate(key(f) for f in unknown)))}
    ranked = sorted(sizes, key=lambda k: (-sizes[k], first_seen[k]))
    chosen = set(ranked[:bias_groups])
    kept = [f for f in unknown if key(f) in chosen]
    if len(kept) < n_unknown:
        raise ValueError(
            f"bias={bias!r} with bias_groups={bias_groups}: the {len(chosen)} largest {bias} "
            f"groups hold {len(kept)} Unknown facts, fewer than n_unknown={n_unknown} "
            f"(largest group sizes: {[sizes[k] for k in ranked[:5]]})"
        )
    return kept


def build_mix(
    facts: Sequence[Fact],
    *,
    n_unknown: int,
    extra_per_unknown: int = 0,
    extra_kind: ExtraKind = "none",
    selection: Selection = "first",
    seed: int = 42,
    bias: Bias = "none",
    bias_groups: int = 1,
    n_val_known: int = 0,
    fewshot_pool: Sequence[Fact] | None = None,
    extra_repeats: bool = False,
) -> Mix:
    """Choose the training mix and the validation facts from categorised facts.

    HighlyKnown facts are ordered once (file order or seeded shuffle): the extras are the first
    n*k, the validation facts the last `n_val_known`, so the forgetting set does not move when k
    or n change. Few-shot pool: `fewshot_pool` minus any fact used in the mix or validation, or,
    when None, the HighlyKnown facts left over.

    With `extra_repeats`, a mix that needs more distinct extras than there are (n*k HighlyKnown
    facts, or k paraphrases of each Unknown fact) cycles through the ones there are, each used
    as evenly as possible, instead of failing. The paper's largest mixes need it: 3,000 Unknown
    + 10 HighlyKnown each is 30,000 extras against 2,732 HighlyKnown facts.
    """
    check_choice("extra_kind", extra_kind, ExtraKind)
    check_choice("selection", selection, Selection)
    check_choice("bias", bias, Bias)
    check_extras(extra_kind, extra_per_unknown)
    k = extras_per_unknown(extra_kind, extra_per_unknown)
    uncategorised = [f for f in facts if f.category is None]
    if uncategorised:
        raise ValueError(
            f"the mix needs categorised facts: {len(uncategorised)} of {len(facts)} have no "
            f"category (ids {_ids(uncategorised)}); run `python -m lora_lightning categorize`"
        )
    unknown = _ordered([f for f in facts if f.category == "Unknown"], selection, seed, UNKNOWN)
    known = _ordered([f for f in facts if f.category == "HighlyKnown"], selection, seed,
                     HIGHLY_KNOWN)

    candidates = _biased(unknown, n_unknown, bias, bias_groups)
    if len(candidates) < n_unknown:
        raise ValueError(
            f"not enough Unknown facts: n_unknown={n_unknown} requested, the facts have "
            f"{len(unknown)} Unknown (categories: {dict(Counter(f.category for f in facts))})"
        )
    train_unknown = candidates[:n_unknown]

    n_extra = n_unknown * k if extra_kind == "highly_known" else 0
    n_known_needed = n_val_known + (min(n_extra, 1) if extra_repeats else n_extra)
    # The paper's known facts all have an answer. A HighlyKnown fact whose answer is a refusal
    # ("I don't know." to an unanswerable question) would teach refusing: never an extra (nor
    # a few-shot example); the held-out facts are kept as they are, so they do not move.
    val_known = known[len(known) - n_val_known :] if n_val_known else []
    leftover = [f for f in known[: len(known) - n_val_known] if not is_refusal(f.answer)]
    if n_val_known > len(known) or len(leftover) < n_known_needed - n_val_known:
        extra = f" + {n_unknown}*{k} extras" if extra_kind == "highly_known" else ""
        hint = "" if extra_repeats or not n_extra else (
            "; data.extra_repeats=true reuses HighlyKnown facts as the paper's largest mixes do"
        )
        refusing = sum(is_refusal(f.answer) for f in known)
        answerable = f", {refusing} of them unanswerable (never extras)" if refusing else ""
        lower = "data.n_val_known" + (", data.extra_per_unknown or data.n_unknown"
                                      if n_extra else "")
        raise ValueError(
            f"not enough HighlyKnown facts: need {n_known_needed} (n_val_known={n_val_known}"
            f"{extra}), the facts have {len(known)}{answerable}{hint}; lower {lower} to fit"
        )

    if extra_kind == "highly_known":
        if n_extra > len(leftover):  # extra_repeats (checked above): cycle, evenly
            train_extra = [leftover[i % len(leftover)] for i in range(n_extra)]
            log.warning(
                "%d HighlyKnown extras from %d distinct facts: each is repeated up to %d times",
                n_extra, len(leftover), -(-n_extra // len(leftover)),
            )
            leftover = []
        else:
            train_extra, leftover = leftover[:n_extra], leftover[n_extra:]
    elif extra_kind == "paraphrase" and k:
        least = 1 if extra_repeats else k
        short = [f for f in train_unknown if len(_usable_paraphrases(f)) < least]
        if short:
            hint = "" if extra_repeats else "; data.extra_repeats=true reuses paraphrases"
            raise ValueError(
                f"extra_per_unknown={k} paraphrases requested, but {len(short)} of the "
                f"{n_unknown} Unknown facts have fewer distinct ones (e.g. {short[0].id} has "
                f"{len(_usable_paraphrases(short[0]))}; ids {_ids(short)}){hint}"
            )
        train_extra = [
            replace(
                fact, id=f"{fact.id}/para{j}", question=question, paraphrases=[], predictions=[],
                meta={**fact.meta, "paraphrase_of": fact.id},
            )
            for fact in train_unknown
            for j, question in enumerate(_paraphrases(fact, k, selection, seed))
        ]
    else:
        train_extra = []

    if fewshot_pool is None:
        # A seeded sample of the unused HighlyKnown facts: known answers make good shots, and a
        # small pool leaves every other fact in the test set's knowledge-shift measure.
        pool = _ordered(leftover, "random", seed, "pool")[:DEFAULT_POOL_SIZE]
    else:
        used = {normalize_answer(q) for f in [*train_unknown, *train_extra, *val_known]
                for q in (f.question, *f.paraphrases)}
        pool = [f for f in fewshot_pool if normalize_answer(f.question) not in used]
        if len(pool) < len(fewshot_pool):
            log.warning(
                "dropped %d few-shot pool facts whose question is in the mix or validation",
                len(fewshot_pool) - len(pool),
            )
    return Mix(train_unknown, train_extra, extra_kind, val_known, list(pool))


def _usable_paraphrases(fact: Fact) -> list[str]:
    """Paraphrases that differ from the question and from each other (after normalising)."""
    seen = {normalize_answer(fact.question)}
    usable = []
    for text in fact.paraphrases:
        if (key := normalize_answer(text)) not in seen:
            seen.add(key)
            usable.append(text)
    return usable


def _paraphrases(fact: Fact, k: int, selection: Selection, seed: int) -> list[str]:
    """k paraphrases of the question; fewer distinct ones (only with `extra_repeats`) cycle."""
    usable = _usable_paraphrases(fact)
    if selection in ("random", "stratified"):
        rng = random.Random(f"{seed}:{PARAPHRASE}:{fact.id}")
        usable = rng.sample(usable, min(k, len(usable)))
    return [usable[j % len(usable)] for j in range(k)]
