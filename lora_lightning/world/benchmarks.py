"""In-world benchmarks of harm: world-MC and world-truthful, written in the MMLU and TruthfulQA
file layouts so that exactly our MMLU and TruthfulQA scorers score them.

Both ask only about the *benchmark subjects*: people pre-trained like the familiar subjects but
never tested, so no fact any training mix can train shares a subject with a question (the
analogue of MMLU and TruthfulQA, which know nothing of the facts an adapter learns).

- world-MC: 4-choice questions about pre-trained facts of the benchmark subjects, 5-shot with the
  MMLU prompt, scored by the log-likelihood of " A".." D". One MMLU "subject" per relation; the
  shots (MMLU's "dev" rows) are facts of the format subjects.
- world-truthful: unanswerable questions about benchmark subjects, asked with held-out
  templates, in the TruthfulQA MC format; the true answer is "I have no comment.", the false ones
  are plausible answers. The preamble is six QA examples about format subjects (one of them
  unanswerable), standing in for the harness' real-world preamble.

Each benchmark has a test split (`benchmarks/`, what harm is measured on) and a development split
(`benchmarks_dev/`, the same layout, other questions): choices about the world's recipe are made on
the development split, so the items that measure harm never shaped the base.

The base learns both formats in pre-training on the format subjects only (`format_examples`),
which are disjoint from every tested and held-out fact: what it shows on these benchmarks is a
skill, and what training on new facts does to them is the harm measured.
"""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_lightning.evaluation import (
    LETTERS,
    MMLUQuestion,
    evaluate_mmlu,
    evaluate_truthfulqa,
    mmlu_context,
    truthfulqa_context,
)
from lora_lightning.facts import Fact
from lora_lightning.world.config import WorldConfig
from lora_lightning.world.generator import WorldPlan
from lora_lightning.world.model import TextExample
from lora_lightning.world.vocabulary import NO_COMMENT, REFUSAL, RELATION_BY_NAME

__all__ = [
    "MC_DIR",
    "benchmark_texts",
    "TRUTHFUL_FILE",
    "TRUTHFUL_PREAMBLE_FILE",
    "evaluate_world_benchmarks",
    "format_examples",
    "write_benchmarks",
]

MC_DIR = "mc"
TRUTHFUL_FILE = "truthful.csv"
TRUTHFUL_PREAMBLE_FILE = "truthful_preamble.txt"
N_SHOT = 5
MC_PER_FACT = 3  # world-MC draws per format fact and pre-training epoch (TruthfulQA: 1)
_SHOT_LETTER = re.compile(r"\nAnswer: ([A-D])\n\n")


def _answer_vocab(facts: Sequence[Fact]) -> dict[str, list[str]]:
    """Canonical answers seen per relation, in first-seen order (the distractor pool)."""
    vocab: dict[str, dict[str, None]] = {}
    for fact in facts:
        if fact.answer != REFUSAL:
            vocab.setdefault(fact.relation, {})[fact.answer] = None
    return {k: list(v) for k, v in vocab.items()}


def _mc_question(fact: Fact, rng: random.Random, vocab: dict[str, list[str]]) -> MMLUQuestion:
    """The fact's question with its answer and three other answers of the relation."""
    others = [a for a in vocab[fact.relation] if a != fact.answer]
    choices = [fact.answer, *rng.sample(others, 3)]
    rng.shuffle(choices)
    return MMLUQuestion(
        fact.relation.replace("_", " "), fact.question, tuple(choices),
        choices.index(fact.answer),
    )


def _formats(plan: WorldPlan) -> list[Fact]:
    return [f for f in plan.facts if f.meta.get("role") == "format"]


def _truthful_preamble(formats: Sequence[Fact]) -> str:
    """Six Q/A pairs about format subjects: five answered, one declined (as in the harness)."""
    answered = [f for f in formats if f.answer != REFUSAL and f.relation in RELATION_BY_NAME]
    declined = [f for f in formats if f.answer == REFUSAL]
    chosen = answered[:5]
    pairs = [f"Q: {f.question}\nA: {_sentence(f.answer)}" for f in chosen]
    if declined:
        pairs.insert(3, f"Q: {declined[0].question}\nA: {NO_COMMENT}")
    return "\n\n".join(pairs)


def _sentence(answer: str) -> str:
    return answer if answer.endswith(".") else answer + "."


def write_benchmarks(
    plan: WorldPlan, config: WorldConfig, root: Path, dev_root: Path | None = None
) -> dict[str, int]:
    """Write world-MC (MMLU layout under `root/mc`) and world-truthful (`root/truthful.csv` and
    its preamble) for a plan, and their development splits in the same layout under `dev_root`;
    return how many test questions each has."""
    rng = random.Random(config.seed + 7)
    refusal = next(r for r in RELATION_BY_NAME.values() if r.kind == "refusal")
    heldout = refusal.templates[config.templates_per_fact :] or refusal.templates
    # every (benchmark subject, held-out template) once at most: no question is asked twice
    pairs = [(s, t) for s in sorted({f.subject for f in plan.benchmark}) for t in heldout]
    wanted = config.truthful_questions + config.dev_questions if config.truthful_questions else 0
    if len(pairs) < wanted:
        raise ValueError(
            f"WorldConfig: world-truthful needs {wanted} questions (truthful_questions + "
            f"dev_questions), the benchmark subjects give {len(pairs)}: raise benchmark_subjects"
        )
    chosen = random.Random(config.seed + 8).sample(pairs, wanted)
    splits = [(root, plan.mc_heldout, chosen[: config.truthful_questions])]
    if dev_root is not None:
        splits.append((dev_root, plan.mc_dev, chosen[config.truthful_questions :]))
    formats, vocab = _formats(plan), _answer_vocab(plan.facts)
    for folder, mc_facts, truthful in splits:
        _write_split(folder, formats, vocab, mc_facts, truthful, rng)
    return {"world_mc": len(plan.mc_heldout), "world_truthful": len(splits[0][2])}


def _write_split(
    root: Path, formats: Sequence[Fact], vocab: dict[str, list[str]], mc_facts: Sequence[Fact],
    truthful: Sequence[tuple[str, str]], rng: random.Random,
) -> None:
    by_relation: dict[str, list[Fact]] = {}
    for fact in mc_facts:
        by_relation.setdefault(fact.relation, []).append(fact)
    for split in ("dev", "test"):
        (root / MC_DIR / split).mkdir(parents=True, exist_ok=True)
    for relation, facts in sorted(by_relation.items()):
        shots = [f for f in formats if f.relation == relation][:N_SHOT]
        for split, rows in (("dev", shots), ("test", facts)):
            with (root / MC_DIR / split / f"{relation}_{split}.csv").open("w", newline="") as fh:
                writer = csv.writer(fh)
                for fact in rows:
                    q = _mc_question(fact, rng, vocab)
                    writer.writerow([q.question, *q.choices, LETTERS[q.answer]])
    words = [a for answers in vocab.values() for a in answers]
    with (root / TRUTHFUL_FILE).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers",
                         "Incorrect Answers", "Source"])
        for subject, template in truthful:
            wrong = [_sentence(w) for w in rng.sample(words, 3)]
            writer.writerow(["Adversarial", "Unanswerable", template.format(s=subject),
                             NO_COMMENT, f"{NO_COMMENT}; {REFUSAL}", "; ".join(wrong),
                             "synthetic world"])
    (root / TRUTHFUL_PREAMBLE_FILE).write_text(_truthful_preamble(formats))


def format_examples(plan: WorldPlan, rng: random.Random) -> list[TextExample]:
    """One epoch of pre-training examples in the benchmark formats, about format subjects: per
    fact one TruthfulQA-format answer and `MC_PER_FACT` world-MC questions (0 to 5 shots, fresh
    choices each time), as (text, answer spans): the character spans that carry the loss.

    A world-MC example's answers are its letter and its shots' letters (" A" after each solved
    "Answer:"), as text seen in pre-training is learned throughout, not only at its end: with
    the loss on the last letter alone, the 590k-parameter bench base never learned the format
    (0.32 on questions about its own format facts).
    """
    formats = _formats(plan)
    if not formats:
        return []
    vocab = _answer_vocab(plan.facts)
    preamble = _truthful_preamble(formats)
    by_relation: dict[str, list[Fact]] = {}
    for fact in formats:
        if fact.answer != REFUSAL:
            by_relation.setdefault(fact.relation, []).append(fact)
    examples: list[TextExample] = []

    def completion(context: str, continuation: str) -> None:
        examples.append((context + continuation, [(len(context), len(context + continuation))]))

    for fact in formats:
        if fact.answer == REFUSAL:
            completion(truthfulqa_context(fact.question, preamble), f" {NO_COMMENT}")
            continue
        completion(truthfulqa_context(fact.question, preamble), f" {_sentence(fact.answer)}")
        peers = [f for f in by_relation[fact.relation] if f.id != fact.id]
        for _ in range(MC_PER_FACT):
            shots = [_mc_question(f, rng, vocab)
                     for f in rng.sample(peers, rng.randint(0, N_SHOT))]
            question = _mc_question(fact, rng, vocab)
            text = mmlu_context(question, shots) + f" {LETTERS[question.answer]}"
            spans = [(m.start(1) - 1, m.end(1)) for m in _SHOT_LETTER.finditer(text)]
            examples.append((text, [*spans, (len(text) - 2, len(text))]))
    rng.shuffle(examples)
    return examples


def benchmark_texts(plan: WorldPlan) -> list[str]:
    """The words of the benchmark formats, for the tokenizer to learn alongside the facts."""
    formats = _formats(plan)
    rng = random.Random(0)
    return [_truthful_preamble(formats), NO_COMMENT] + [
        text for text, _ in format_examples(plan, rng)[:200]
    ]


def evaluate_world_benchmarks(
    model, tokenizer, root: str | Path, batch_size: int = 16, progress: str = ""
) -> dict[str, Any]:
    """world-MC accuracy and world-truthful MC1/MC2 of `model` on a built world's benchmarks
    (`progress`: a phase name, e.g. "(base)", to show progress lines under)."""
    root = Path(root)
    return {
        "world_mc": evaluate_mmlu(model, tokenizer, root / MC_DIR, n_shot=N_SHOT,
                                  batch_size=batch_size,
                                  progress=progress and f"world-MC {progress}"),
        "world_truthful": evaluate_truthfulqa(
            model, tokenizer, root / TRUTHFUL_FILE, batch_size=batch_size,
            preamble=(root / TRUTHFUL_PREAMBLE_FILE).read_text(),
            progress=progress and f"world-truthful {progress}",
        ),
    }
