"""Real facts from installed real-data packages: enough of them, with real aliases, and none
that the paper's substring rule would mark right for another fact's answer."""

from __future__ import annotations

from collections import Counter

import pytest

from lora_lightning.__main__ import main
from lora_lightning.facts import load_facts, normalize_answer
from lora_lightning.sources import build_facts


@pytest.fixture(scope="module")
def built():
    return build_facts("countries")


def test_countries_give_over_a_thousand_facts_in_four_relations(built):
    facts, report = built
    counts = Counter(f.relation for f in facts)
    assert sum(counts.values()) >= 1000
    assert set(counts) == {"capital", "continent", "currency", "city_country"}
    assert all(n >= 200 for n in counts.values()), counts
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


def test_a_missing_data_package_is_named_with_how_to_install_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycountry" else real(name, *a))
    with pytest.raises(ValueError, match="pycountry.*lora-lightning\\[real\\]"):
        build_facts("countries")
