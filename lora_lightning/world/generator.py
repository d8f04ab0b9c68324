"""The fact generator: a seeded world of facts, which of them the base model is shown in
pre-training, and which known facts serve as few-shot examples."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from lora_lightning.facts import Fact
from lora_lightning.prompts import SYSTEM_PROMPT
from lora_lightning.world.config import WorldConfig
from lora_lightning.world.vocabulary import (
    REFUSAL,
    RELATIONS,
    TOWN_SUFFIXES,
    WORD_LISTS,
    Relation,
    unique_names,
    word,
)


def _zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank**exponent) for rank in range(1, n + 1)]


def generate_world(config: WorldConfig) -> list[Fact]:
    """The world's facts, fully determined by `config` (same seed, same facts).

    Every subject gets `relations_per_subject` distinct answerable relations; a share
    `refusal_fraction` of subjects also gets one unanswerable question (answer: a refusal).
    Answers follow a Zipf-like law over each relation's vocabulary, so a few are frequent.
    """
    rng = random.Random(config.seed)
    taken: set[str] = set()
    people = unique_names(
        rng,
        config.n_subjects + config.n_mentors,
        lambda: f"{word(rng, rng.choice([1, 2]))} {word(rng, 2)}",
        taken,
    )
    subjects, mentors = people[: config.n_subjects], people[config.n_subjects :]
    towns = unique_names(
        rng, config.n_towns, lambda: word(rng, rng.choice([1, 2])) + rng.choice(TOWN_SUFFIXES),
        taken,
    )
    years = [str(y) for y in rng.sample(range(1100, 1900), 60)]
    vocab: dict[str, list[str]] = {"town": towns, "person": mentors, "year": years}
    for kind, words in WORD_LISTS.items():
        vocab[kind] = rng.sample(words, len(words))  # which word is the frequent one is seeded
    answerable = [r for r in RELATIONS if r.kind != "refusal"]
    refusal_relations = [r for r in RELATIONS if r.kind == "refusal"]
    if not 1 <= config.relations_per_subject <= len(answerable):
        raise ValueError(
            f"WorldConfig.relations_per_subject must be in 1..{len(answerable)}, "
            f"got {config.relations_per_subject}"
        )

    facts: list[Fact] = []
    for i, subject in enumerate(subjects):
        relations = rng.sample(answerable, config.relations_per_subject)
        if rng.random() < config.refusal_fraction:
            relations.append(rng.choice(refusal_relations))
        for relation in relations:
            answers = _answers(rng, relation, vocab, config.zipf_exponent)
            if relation.kind == "person" and answers[0] == subject:
                continue  # nobody mentors themself
            questions = [t.format(s=subject) for t in relation.templates]
            facts.append(
                Fact(
                    id=f"w{config.seed}-{i:04d}-{relation.name}",
                    question=questions[0],
                    answers=answers,
                    paraphrases=questions[1:],
                    relation=relation.name,
                    subject=subject,
                )
            )
    return facts


def _answers(
    rng: random.Random, relation: Relation, vocab: dict[str, list[str]], exponent: float
) -> list[str]:
    """Answer aliases for one fact; the first is the canonical (trained) one."""
    if relation.kind == "refusal":
        return [REFUSAL]
    words = vocab[relation.kind]
    word = rng.choices(words, weights=_zipf_weights(len(words), exponent))[0]
    if relation.kind == "person":
        return [word, "Master " + word]
    if relation.kind == "town":
        return [word, f"the town of {word}"]
    if relation.kind == "year":
        return [word, f"the year {word}"]
    return [word, f"a {word}"]


def split_world(facts: Sequence[Fact], config: WorldConfig) -> tuple[list[Fact], list[Fact]]:
    """(known, unseen): a seeded share `known_fraction` of the facts is shown in pre-training.

    Refusal facts are split like the others, so the base refuses the unanswerable relation
    because it learned the pattern, not because it saw every such question.
    """
    rng = random.Random(config.seed + 1)
    ids = sorted(f.id for f in facts)
    known_ids = set(rng.sample(ids, round(config.known_fraction * len(ids))))
    known = [f for f in facts if f.id in known_ids]
    unseen = [f for f in facts if f.id not in known_ids]
    return known, unseen


def choose_pool(known: Sequence[Fact], config: WorldConfig) -> list[Fact]:
    """Few-shot pool: answerable known facts (refusals would teach the probe to refuse)."""
    candidates = sorted((f for f in known if f.answer != REFUSAL), key=lambda f: f.id)
    if len(candidates) < max(config.pool_size, config.n_shot):
        raise ValueError(
            f"WorldConfig: only {len(candidates)} answerable known facts, need pool_size="
            f"{config.pool_size} (and at least n_shot={config.n_shot})"
        )
    return random.Random(config.seed + 2).sample(candidates, config.pool_size)


def choose_rare(known: Sequence[Fact], pool: Sequence[Fact], config: WorldConfig) -> set[str]:
    """Ids of the known facts shown only rarely in pre-training (never pool facts: few-shot
    examples should be facts the base knows well)."""
    pool_ids = {f.id for f in pool}
    candidates = sorted(f.id for f in known if f.id not in pool_ids)
    return set(random.Random(config.seed + 4).sample(
        candidates, round(config.rare_fraction * len(candidates))))


def world_texts(facts: Sequence[Fact]) -> Iterator[str]:
    """Every string the tokenizer should know well: all questions, answers and prompt words."""
    for fact in facts:
        yield SYSTEM_PROMPT  # once per fact, so BPE weighs the prompt words like the data
        for question in [fact.question, *fact.paraphrases]:
            yield f"Question: {question}"
        for answer in fact.answers:
            yield f"Answer: {answer}"
