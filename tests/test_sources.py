"""Real facts from installed real-data packages: enough of them, with real aliases, and none
that the paper's substring rule would mark right for another fact's answer."""

from __future__ import annotations

from collections import Counter

import pytest

from lora_lightning.__main__ import main
from lora_lightning.facts import Fact, is_correct, load_facts, normalize_answer
from lora_lightning.sources import SOURCES, build_facts

_BUILDS: dict[str, tuple] = {}


def _built(source: str) -> tuple:
    if source not in _BUILDS:
        _BUILDS[source] = build_facts(source)
    return _BUILDS[source]


@pytest.fixture(scope="module")
def built():
    return _built("countries")


def _probe(norms: list[str]) -> Fact:
    """A fact whose aliases are `norms` as they are, to ask `is_correct` about them."""
    return Fact(id="probe", question="", answers=norms, normalized_answers=norms)


def _found_in(output: str, norms: list[str]) -> list[str]:
    """Every one of `norms` that `is_correct` finds in `output`, by halving the list."""
    if not norms or not is_correct(output, _probe(norms)):
        return []
    if len(norms) == 1:
        return norms
    half = len(norms) // 2
    return _found_in(output, norms[:half]) + _found_in(output, norms[half:])


@pytest.mark.parametrize("source", SOURCES)
def test_no_answer_of_a_fact_marks_another_facts_question_right_by_substring(source):
    """With the paper's lenient rule (`is_correct`), answering a question with another fact's
    answer (any relation) is never right unless that answer is one of the fact's own:
    no normalised alias sits strictly inside another fact's alias ("Euro" in "Europe"); and
    no alias (not main answer) sits inside an answer another fact has without it."""
    facts, _ = _built(source)
    holds: dict[str, set[frozenset[str]]] = {}
    mains: dict[str, set[str]] = {}  # the main answers of the facts that hold an answer
    raw_of: dict[str, set[str]] = {}
    for fact in facts:
        for raw, norm in zip(fact.answers, fact.normalized_answers, strict=True):
            holds.setdefault(norm, set()).add(frozenset(fact.normalized_answers))
            mains.setdefault(norm, set()).add(fact.normalized_answers[0])
            raw_of.setdefault(norm, set()).add(raw)
    clashes = []
    for outer, raws in sorted(raw_of.items()):
        others = sorted(set(holds) - {outer})
        for raw in sorted(raws):
            for inner in _found_in(raw, others):
                if any(outer not in own for own in holds[inner]):
                    clashes.append((inner, raw))
                elif any(inner not in own for own in holds[outer]) and any(
                        own_main != inner for own_main in mains[inner]):
                    clashes.append((inner, raw))  # an alias another fact's answer holds
    assert not clashes, clashes[:20]


@pytest.mark.parametrize("source", SOURCES)
def test_no_fact_is_answered_right_by_echoing_its_question(source):
    """"What is the capital of Algeria?" echoed back must not count right for "Alger", nor
    "What is the capital of Luxembourg?" for "Luxembourg"."""
    facts, _ = _built(source)
    echoed = [(f.id, text) for f in facts for text in (f.question, *f.paraphrases)
              if is_correct(text, f)]
    assert not echoed, echoed[:20]


def test_geography_gives_thousands_of_facts_in_seven_relations():
    facts, report = _built("geography")
    counts = Counter(f.relation for f in facts)
    minimum = {"capital": 150, "continent": 200, "currency": 80, "city_country": 1000,
               "subdivision_country": 2000, "county_state": 1000, "country_language": 100}
    assert sum(counts.values()) >= 5000 and set(counts) == set(minimum)
    assert all(counts[r] >= n for r, n in minimum.items()), counts
    assert counts == report.facts
    assert len({f.id for f in facts}) == len({f.question for f in facts}) == len(facts)
    assert all(len(f.paraphrases) == 3 and f.subject for f in facts)
    assert min(len(a) for f in facts for a in f.normalized_answers) >= 4  # no ISO codes
    by_question = {f.question: f for f in facts}
    assert by_question["In which US state is Autauga County?"].answers == ["Alabama"]
    assert by_question["In which country is the region of Bayern?"].answers[0] == "Germany"
    assert {"Spanish", "Quechua"} <= set(
        by_question["What language is spoken in Peru?"].answers)
    assert "Washington County" not in {f.subject for f in facts}  # in 30 states
    assert report.dropped["a county name of several states"]["county_state"] > 1000
    assert [f.id for f in facts] == [f.id for f in build_facts("geography")[0]]


def test_clean_facts_drops_the_smaller_side_of_a_clash_and_names_it():
    from lora_lightning.sources import BuildReport, clean_facts

    def fact(relation, subject, *answers):
        return Fact(id=f"{relation}:{subject}", question=f"What is the {relation} of {subject}?",
                    answers=list(answers), relation=relation, subject=subject)

    facts = [fact("currency", "France", "Euro"), fact("currency", "Germany", "Euro"),
             fact("currency", "India", "Indian Rupee"),
             *(fact("continent", c, "Europe") for c in ("France", "Germany", "Italy")),
             *(fact("country", c, "India") for c in ("Mumbai", "Delhi")),
             fact("capital", "Peru", "Lima", "Limo"), fact("capital", "Montserrat", "Plymouth",
                                                            "Plimouth"),
             fact("capital", "Algeria", "Algiers", "Alger"),
             fact("capital", "Luxembourg", "Luxembourg"), fact("capital", "Japan", "Tokyo"),
             fact("currency", "Albania", "Lek")]
    report = BuildReport()
    kept = {f.id: f.answers for f in clean_facts(facts, report)}
    assert "currency:France" not in kept and "currency:Germany" not in kept  # 2 Euro < 3 Europe
    assert kept["continent:Italy"] == ["Europe"]
    assert "currency:India" not in kept and kept["country:Delhi"] == ["India"]  # 1 < 2
    assert kept["capital:Peru"] == ["Lima"] and kept["capital:Montserrat"] == [
        "Plymouth", "Plimouth"]  # an alias goes before a fact
    assert kept["capital:Algeria"] == ["Algiers"] and "capital:Luxembourg" not in kept
    assert kept["capital:Japan"] == ["Tokyo"] and "currency:Albania" not in kept
    assert report.facts == Counter(f.split(":")[0] for f in kept)
    assert report.dropped["its answer inside another answer"]["currency"] == 2
    assert "France: 'Euro' in 'Europe'" in report.examples["its answer inside another answer"]
    assert report.dropped["its answer holds another answer"]["currency"] == 1
    assert report.dropped["an alias inside another answer"]["capital"] == 1
    assert report.dropped["an alias in its own question"]["capital"] == 1
    assert report.dropped["its answer in its own question"]["capital"] == 1
    assert report.dropped["its answer is 3 characters or fewer"]["currency"] == 1
    assert any("'Euro' in 'Europe'" in line for line in report.lines())


def test_countries_give_over_a_thousand_facts_in_four_relations(built):
    facts, report = built
    counts = Counter(f.relation for f in facts)
    assert sum(counts.values()) >= 1000
    assert set(counts) == {"capital", "continent", "currency", "city_country"}
    # currency loses "Euro" (inside "Europe") and "Cuban Peso"-like names (holding "Cuba")
    assert all(n >= (150 if r == "currency" else 200) for r, n in counts.items()), counts
    assert counts == report.facts
    assert len({f.id for f in facts}) == len({f.question for f in facts}) == len(facts)
    assert all(len(f.paraphrases) == 3 and f.subject for f in facts)


def test_real_aliases_come_with_the_facts(built):
    facts, _ = built
    by_question = {f.question: f for f in facts}
    kyiv = by_question["What is the capital of Ukraine?"]
    assert kyiv.answers[0] == "Kyiv" and "Kiev" in kyiv.answers
    assert by_question["On which continent is Ukraine?"].answers == ["Europe"]
    lagos = by_question["In which country is the city of Lagos?"]
    assert lagos.answers[0] == "Nigeria"
    russia = next(f for f in facts if f.relation == "city_country" and "Russia" in f.answers)
    assert "Russian Federation" in russia.answers


def test_no_answer_is_inside_another_answer_of_its_relation(built):
    facts, report = built
    for relation in ("capital", "continent", "currency", "city_country"):
        mains = {normalize_answer(f.answers[0]) for f in facts if f.relation == relation}
        for fact in (f for f in facts if f.relation == relation):
            for alias in map(normalize_answer, fact.answers):
                inside = [m for m in mains - {normalize_answer(fact.answers[0])}
                          if alias in m or m in alias]
                assert not inside, (fact.id, alias, inside)
    assert report.dropped["its answer inside another answer"]["city_country"] > 0  # Niger...


def test_the_facts_command_writes_a_file_categorize_reads_and_keeps_an_existing_one(
    tmp_path, capsys
):
    out = tmp_path / "facts.jsonl"
    main(["facts", "--source", "countries", "--output", str(out)])
    assert len(load_facts(out)) >= 1000 and "categorize" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["facts", "--output", str(out)])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err


def test_the_facts_command_builds_geography(tmp_path, capsys):
    out = tmp_path / "geo.jsonl"
    main(["facts", "--source", "geography", "--output", str(out)])
    printed = capsys.readouterr().out
    assert len({f.relation for f in load_facts(out)}) == 7
    assert "left out, its answer inside another answer" in printed and "'Euro'" in printed


def test_per_relation_keeps_a_seeded_sample_of_the_named_relations_and_the_rest_whole(
    tmp_path, capsys
):
    """A file a CPU can categorise in minutes: the named relations sampled, the same sample
    for the same seed, every other relation whole; a relation the source lacks or a sample
    larger than the relation is refused naming the key."""
    spec = '{"city_country": 30, "subdivision_country": 20}'
    first, again, other = (tmp_path / f"{name}.jsonl" for name in ("a", "b", "c"))
    main(["facts", "--source", "geography", "--output", str(first), "--per_relation", spec])
    main(["facts", "--source", "geography", "--output", str(again), "--per_relation", spec])
    main(["facts", "--source", "geography", "--output", str(other), "--per_relation", spec,
          "--seed", "1"])
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    counts = Counter(f.relation for f in load_facts(first))
    whole = Counter(f.relation for f in build_facts("geography")[0])
    assert counts["city_country"] == 30 and counts["subdivision_country"] == 20
    assert all(counts[r] == whole[r] for r in whole if r not in ("city_country",
                                                                 "subdivision_country"))
    assert "kept a sample: city_country 30, subdivision_country 20" in capsys.readouterr().out
    for bad, key in (('{"moon_phase": 3}', "per_relation.moon_phase"),
                     ('{"capital": 100000}', "per_relation.capital")):
        with pytest.raises(SystemExit):
            main(["facts", "--source", "geography", "--output", str(tmp_path / "x.jsonl"),
                  "--per_relation", bad])
        assert key in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()


def test_a_missing_data_package_is_named_with_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycountry" else real(name, *a))
    with pytest.raises(ValueError, match="pycountry.*lora-lightning\\[real\\]"):
        build_facts("countries")
