"""The fact generator: a seeded world of facts, which of them the base model is shown in
pre-training, and which known facts serve as few-shot examples."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from lora_lightning.facts import Fact, normalize_answer
from lora_lightning.prompts import SYSTEM_PROMPT
from lora_lightning.world.config import WorldConfig
from lora_lightning.world.vocabulary import (
    FORMAT_TEXTS,
    REFUSAL,
    RELATIONS,
    TOWN_SUFFIXES,
    TWO_HOP,
    WORD_LISTS,
    NameBook,
    Relation,
    word,
)


def _zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank**exponent) for rank in range(1, n + 1)]


def generate_world(config: WorldConfig) -> list[Fact]:
    """The world's facts, fully determined by `config` (same seed, same facts).

    Every subject gets `relations_per_subject` distinct answerable relations; a share
    `refusal_fraction` of subjects also gets one unanswerable question (answer: a refusal).
    Answers follow a Zipf-like law over each relation's vocabulary, so a few are frequent. A
    fact's question and paraphrases are its relation's first `templates_per_fact` templates;
    the next `heldout_templates` go to `meta["heldout_questions"]` (never trained). Facts of the
    `format_subjects` and `benchmark_subjects` (bench scale) come after the others, with
    `meta["role"]` "format" and "benchmark". No name is a substring of another answer or of a
    prompt text (`NameBook`).
    """
    rng = random.Random(config.seed)
    book = NameBook()

    def person() -> str:
        return f"{word(rng, rng.choice([1, 2]))} {word(rng, 2)}"

    n_mentors = 0 if config.mentors_are_subjects else config.n_mentors
    people = book.draw(rng, config.n_subjects + n_mentors, person)
    subjects, mentors = people[: config.n_subjects], people[config.n_subjects :]
    towns = book.draw(
        rng, config.n_towns, lambda: word(rng, rng.choice([1, 2])) + rng.choice(TOWN_SUFFIXES)
    )
    years = [str(y) for y in rng.sample(range(1100, 1900), config.n_years)]
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
    needed = config.templates_per_fact + config.heldout_templates
    if any(len(r.templates) < needed for r in RELATIONS):
        raise ValueError(
            f"WorldConfig: templates_per_fact + heldout_templates = {needed}, but a relation "
            f"has only {min(len(r.templates) for r in RELATIONS)} templates"
        )
    format_people = book.draw(rng, config.format_subjects, person)
    benchmark_people = book.draw(rng, config.benchmark_subjects, person)
    if config.mentors_are_subjects:
        # a seeded order, so which people are the popular mentors is random; format and
        # benchmark subjects are mentored among themselves, so none of their facts names a
        # tested subject
        vocab["person"] = rng.sample(subjects, len(subjects))
        format_vocab = {**vocab, "person": rng.sample(format_people, len(format_people))}
        benchmark_vocab = {**vocab,
                           "person": rng.sample(benchmark_people, len(benchmark_people))}
    else:
        format_vocab = benchmark_vocab = vocab

    def facts_of(prefix: str, people: Sequence[str], vocab: dict, all_relations: bool,
                 meta: dict) -> list[Fact]:
        out = []
        for i, subject in enumerate(people):
            if all_relations:  # every relation, the unanswerable one too
                relations = [*answerable, rng.choice(refusal_relations)]
            else:
                relations = rng.sample(answerable, config.relations_per_subject)
                if rng.random() < config.refusal_fraction:
                    relations.append(rng.choice(refusal_relations))
            for relation in relations:
                answers = _answers(rng, relation, vocab, config.zipf_exponent, exclude=subject)
                if answers is None:
                    continue  # nobody mentors themself
                templates = relation.templates
                questions = [t.format(s=subject) for t in templates[: config.templates_per_fact]]
                heldout = [t.format(s=subject) for t in templates[
                    config.templates_per_fact : config.templates_per_fact
                    + config.heldout_templates]]
                out.append(
                    Fact(
                        id=f"w{config.seed}-{prefix}{i:04d}-{relation.name}",
                        question=questions[0],
                        answers=answers,
                        paraphrases=questions[1:],
                        relation=relation.name,
                        subject=subject,
                        meta={**meta, **({"heldout_questions": heldout} if heldout else {})},
                    )
                )
        return out

    facts = facts_of("", subjects, vocab, all_relations=False, meta={})
    facts += facts_of("f", format_people, format_vocab, all_relations=True,
                      meta={"role": "format"})
    facts += facts_of("b", benchmark_people, benchmark_vocab, all_relations=False,
                      meta={"role": "benchmark"})
    return facts


def _answers(
    rng: random.Random, relation: Relation, vocab: dict[str, list[str]], exponent: float,
    exclude: str | None = None,
) -> list[str] | None:
    """Answer aliases for one fact; the first is the canonical (trained) one. None when the
    drawn answer is `exclude` (a person as their own mentor)."""
    if relation.kind == "refusal":
        return [REFUSAL]
    words = vocab[relation.kind]
    word = rng.choices(words, weights=_zipf_weights(len(words), exponent))[0]
    if relation.kind == "person":
        if word == exclude:
            return None
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


@dataclass
class WorldPlan:
    """Every role a fact plays in a world build.

    `known` is what the base is pre-trained on (`rare` ids only now and then); `pool` the
    few-shot examples; `tested` what is categorised into the fact file; `benchmark` the facts of
    the benchmark subjects (never tested, so no mix can train them), whose pre-trained facts
    world-MC asks (`mc_heldout`: its test split, `mc_dev`: its development split); `two_hop`
    the 2-hop questions of tested subjects (portability probes, never trained) and
    `two_hop_train` those of the format subjects (pre-trained, so the base knows the question's
    form); `decoys` questions about people the world does not know, pre-trained with a refusal.
    """

    facts: list[Fact]
    known: list[Fact]
    rare: set[str]
    pool: list[Fact]
    tested: list[Fact]
    mc_heldout: list[Fact] = field(default_factory=list)
    mc_dev: list[Fact] = field(default_factory=list)
    benchmark: list[Fact] = field(default_factory=list)
    two_hop: list[Fact] = field(default_factory=list)
    two_hop_train: list[Fact] = field(default_factory=list)
    decoys: list[Fact] = field(default_factory=list)

    @property
    def known_ids(self) -> set[str]:
        return {f.id for f in self.known}


def plan_world(config: WorldConfig) -> WorldPlan:
    """Generate the world and decide every fact's role (a pure function of `config`)."""
    facts = generate_world(config)
    if not config.format_subjects and not config.obscure_fraction:
        known, _ = split_world(facts, config)
        pool = choose_pool(known, config)
        pool_ids = {f.id for f in pool}
        return WorldPlan(
            facts=facts, known=known, rare=choose_rare(known, pool, config), pool=pool,
            tested=[f for f in facts if f.id not in pool_ids],
        )
    formats = [f for f in facts if f.meta.get("role") == "format"]
    benchmark = [f for f in facts if f.meta.get("role") == "benchmark"]
    subject_facts = [f for f in facts if f.meta.get("role") is None]
    rng = random.Random(config.seed + 1)
    subjects = sorted({f.subject for f in subject_facts})
    obscure = set(rng.sample(subjects, round(config.obscure_fraction * len(subjects))))
    familiar_ids = sorted(f.id for f in subject_facts if f.subject not in obscure)
    known_ids = set(rng.sample(familiar_ids, round(config.known_fraction * len(familiar_ids))))
    known_tested = [f for f in subject_facts if f.id in known_ids]
    # the benchmark subjects' facts are split like the familiar subjects' ones; world-MC asks
    # their steadily pre-trained facts, so harm is measured on what no mix can train
    benchmark_ids = sorted(f.id for f in benchmark)
    known_ids |= set(random.Random(config.seed + 10).sample(
        benchmark_ids, round(config.known_fraction * len(benchmark_ids))))
    known_benchmark = [f for f in benchmark if f.id in known_ids]
    pool = choose_pool(formats or known_tested, config)
    rare = choose_rare(known_tested + known_benchmark, pool, config)
    steady = sorted(f.id for f in known_benchmark if f.id not in rare and f.answer != REFUSAL)
    wanted = config.mc_heldout + config.dev_questions if config.mc_heldout else 0
    if len(steady) < wanted:
        raise ValueError(
            f"WorldConfig: world-MC needs {wanted} steadily known facts of the benchmark "
            f"subjects (mc_heldout + dev_questions), there are {len(steady)}: raise "
            "benchmark_subjects"
        )
    held = random.Random(config.seed + 5).sample(steady, wanted)
    by_id = {f.id: f for f in benchmark}
    pool_ids = {f.id for f in pool}
    two_hop = two_hop_facts(facts, config)
    tested = [f for f in subject_facts if f.id not in pool_ids]
    # a seeded order, so that the first n facts a mix takes ("first", as the paper does) are
    # spread over many subjects and their other facts remain to measure locality on
    random.Random(config.seed + 9).shuffle(tested)
    return WorldPlan(
        facts=facts,
        known=known_tested + known_benchmark + formats,
        rare=rare,
        pool=pool,
        tested=tested,
        mc_heldout=[by_id[i] for i in held[: config.mc_heldout]],
        mc_dev=[by_id[i] for i in held[config.mc_heldout :]],
        benchmark=benchmark,
        two_hop=[f for f in two_hop if f.meta.get("role") is None],
        two_hop_train=[f for f in two_hop if f.meta.get("role") == "format"],
        decoys=decoy_facts(config, world_names(facts)),
    )


def answer_clashes(facts: Iterable[Fact]) -> list[str]:
    """Every way an answer of `facts` would be found where it is not meant (empty for a world
    the generator made): an alias inside an alias of another answer, or inside a fixed prompt
    text (`FORMAT_TEXTS`), both normalised as the paper's substring rule matches them."""
    aliases: dict[str, set[str]] = {}
    for fact in facts:
        aliases.setdefault(fact.answer, set()).update(
            normalize_answer(a) for a in fact.answers if normalize_answer(a))
    everything = [(answer, alias) for answer, forms in aliases.items() for alias in forms]
    joined = "\n".join(alias for _, alias in everything)
    texts = "\n".join(normalize_answer(t) for t in FORMAT_TEXTS)
    clashes = []
    for answer, alias in everything:
        own = sum(alias in other for other in aliases[answer])
        if joined.count(alias) > own:
            inside = [f"{a!r}" for a, other in everything if a != answer and alias in other]
            clashes.append(f"{alias!r} (of {answer!r}) is inside {', '.join(inside[:3])}")
        if alias in texts and answer != REFUSAL:
            clashes.append(f"{alias!r} (of {answer!r}) is inside a prompt text")
    return clashes


RELATION_KIND = {r.name: r.kind for r in RELATIONS}


def world_names(facts: Iterable[Fact]) -> set[str]:
    """Every made-up name of a world: its subjects and its town and person answers."""
    names = set()
    for fact in facts:
        names.add(fact.subject)
        if RELATION_KIND.get(fact.relation) in ("town", "person"):
            names.add(fact.answer)
    return names


def two_hop_facts(facts: Sequence[Fact], config: WorldConfig) -> list[Fact]:
    """"Where was the mentor of X born?" for every X whose mentor has a birthplace fact; the
    answer is that birthplace, and `meta["hops"]` names the two facts it follows from."""
    birthplace = {f.subject: f for f in facts if f.relation == "birthplace"}
    out = []
    for fact in facts:
        if fact.relation != "mentor" or fact.answer not in birthplace:
            continue
        second = birthplace[fact.answer]
        questions = [t.format(s=fact.subject) for t in TWO_HOP.templates]
        out.append(Fact(
            id=f"{fact.id}-{TWO_HOP.name}",
            question=questions[0],
            answers=list(second.answers),
            paraphrases=questions[1:],
            relation=TWO_HOP.name,
            subject=fact.subject,
            meta={**({"role": fact.meta["role"]} if "role" in fact.meta else {}),
                  "hops": [fact.id, second.id]},
        ))
    return out


def decoy_facts(config: WorldConfig, taken: Iterable[str]) -> list[Fact]:
    """Questions about `decoy_subjects` people nobody in the world knows, answered with a
    refusal: the base learns to decline when it does not know a name, as an instruction-tuned
    model does, so that refusals exist for training to change. `taken`: the world's names."""
    rng = random.Random(config.seed + 6)
    names = NameBook(taken).draw(
        rng, config.decoy_subjects, lambda: f"{word(rng, rng.choice([1, 2]))} {word(rng, 2)}"
    )
    answerable = [r for r in RELATIONS if r.kind != "refusal"]
    out = []
    for i, name in enumerate(names):
        for relation in rng.sample(answerable, 2):
            questions = [t.format(s=name) for t in relation.templates[: config.templates_per_fact]]
            out.append(Fact(
                id=f"w{config.seed}-d{i:04d}-{relation.name}", question=questions[0],
                answers=[REFUSAL], paraphrases=questions[1:], relation=relation.name,
                subject=name, meta={"role": "decoy"},
            ))
    return out
