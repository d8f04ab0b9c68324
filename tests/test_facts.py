"""Fact files: every supported shape loads into the same facts, and bad data is refused loudly."""

from __future__ import annotations

import json
import logging
import random
import string
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lora_lightning.facts import (
    Fact,
    FactFileError,
    answer_matches,
    answer_problems,
    is_correct,
    is_correct_strict,
    load_facts,
    normalize_answer,
    save_facts,
)


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9)))


def kp_rows(rng: random.Random, n: int, wrapped: bool) -> list[dict]:
    """Rows in the knowledge-packing datasets' shape (no id column)."""
    rows = []
    for i in range(n):
        aliases = [word(rng).title() for _ in range(rng.randint(1, 3))]
        answer = {"aliases": aliases, "normalized_aliases": [a.lower() for a in aliases]}
        para = [f"Paraphrase {j} of question {i} {word(rng)}?" for j in range(rng.randint(0, 3))]
        rows.append({
            "question": f"Where was {word(rng)} {i} born?",
            "answer": [answer] if wrapped else answer,
            "Category": rng.choice(["HighlyKnown", "MaybeKnown", "Unknown"]),
            "para": para,
            "is_para": bool(para),
            "para_len": len(para),
        })
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_kp_facts(facts: list[Fact], rows: list[dict]) -> None:
    assert len(facts) == len(rows)
    for fact, row in zip(facts, rows, strict=True):
        answer = row["answer"][0] if isinstance(row["answer"], list) else row["answer"]
        assert fact.question == row["question"]
        assert fact.answers == answer["aliases"]
        assert fact.answer == answer["aliases"][0]
        assert fact.normalized_answers == answer["normalized_aliases"]
        assert fact.category == row["Category"]
        assert fact.paraphrases == row["para"]
        assert fact.meta == {"is_para": row["is_para"], "para_len": row["para_len"]}
    assert len({f.id for f in facts}) == len(facts)


@pytest.mark.parametrize("wrapped", [False, True], ids=["dict", "one-element-list"])
def test_knowledge_packing_jsonl_loads_both_answer_wrappings(tmp_path, wrapped):
    rows = kp_rows(random.Random(), 6, wrapped)
    facts = load_facts(write_jsonl(tmp_path / "kp.jsonl", rows))
    check_kp_facts(facts, rows)


@pytest.mark.parametrize("wrapped", [False, True], ids=["dict", "one-element-list"])
def test_knowledge_packing_parquet_loads_both_answer_wrappings(tmp_path, wrapped):
    rows = kp_rows(random.Random(), 6, wrapped)
    path = tmp_path / "kp.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    check_kp_facts(load_facts(path), rows)


def write_arrow_dataset(folder: Path, rows: list[dict]) -> Path:
    """The layout `datasets.Dataset.save_to_disk` writes: Arrow stream files + state.json."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    arrow_file = str(folder / "data-00000-of-00001.arrow")
    with pa.OSFile(arrow_file, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]})
    )
    return folder


def test_save_to_disk_folder_loads_without_the_datasets_package(tmp_path):
    rows = kp_rows(random.Random(), 5, wrapped=True)
    check_kp_facts(load_facts(write_arrow_dataset(tmp_path / "ds", rows)), rows)


def test_save_to_disk_dataset_dict_needs_a_split_only_when_it_has_several(tmp_path):
    rows = kp_rows(random.Random(), 4, wrapped=False)
    single = tmp_path / "single"
    write_arrow_dataset(single / "full", rows)
    (single / "dataset_dict.json").write_text(json.dumps({"splits": ["full"]}))
    check_kp_facts(load_facts(single), rows)
    several = tmp_path / "several"
    write_arrow_dataset(several / "train", rows[:1])
    write_arrow_dataset(several / "test", rows)
    (several / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    check_kp_facts(load_facts(f"{several}:test"), rows)
    with pytest.raises(FactFileError, match=r"splits \['train', 'test'\]: name one"):
        load_facts(several)
    with pytest.raises(FactFileError, match=r"no split 'dev'"):
        load_facts(f"{several}:dev")


def test_derived_ids_are_stable_under_reordering(tmp_path):
    rows = kp_rows(random.Random(), 8, wrapped=False)
    first = {f.question: f.id for f in load_facts(write_jsonl(tmp_path / "a.jsonl", rows))}
    shuffled = list(reversed(rows))
    second = {f.question: f.id for f in load_facts(write_jsonl(tmp_path / "b.jsonl", shuffled))}
    assert first == second


def random_fact(rng: random.Random, i: int) -> Fact:
    maybe = rng.random() < 0.5
    return Fact(
        id=f"f{i}-{word(rng)}",
        question=f"Question {i}: which {word(rng)} did {word(rng)} found? ünï",
        answers=[word(rng).title() for _ in range(rng.randint(1, 3))],
        category=rng.choice([None, "HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"]),
        paraphrases=[f"{word(rng)}?" for _ in range(rng.randint(0, 3))],
        relation=word(rng) if maybe else None,
        subject=word(rng) if maybe else None,
        p_greedy=rng.random() if maybe else None,
        p_sampled=0.25 if maybe else None,
        predictions=[word(rng) for _ in range(rng.randint(0, 4))],
        meta={"source_row": i, "flags": [maybe]} if maybe else {},
    )


def test_save_then_load_round_trips_exactly(tmp_path):
    rng = random.Random()
    facts = [random_fact(rng, i) for i in range(20)]
    path = save_facts(facts, tmp_path / "sub" / "facts.jsonl")
    assert load_facts(path) == facts
    assert len(path.read_text().splitlines()) == 20
    assert not [p for p in path.parent.iterdir() if p.name != "facts.jsonl"]  # no temp files


def test_flat_jsonl_with_only_question_and_answers(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [
        {"question": "Capital of France?", "answers": ["Paris", "Paris, France"]},
        {"id": 7, "question": "Who wrote Hamlet?", "answers": ["Shakespeare"],
         "category": "HighlyKnown", "source": "handmade"},
    ])
    first, second = load_facts(path)
    assert first.id.startswith("q") and first.normalized_answers == ["paris", "paris france"]
    assert first.category is None and first.paraphrases == []
    assert (second.id, second.category, second.meta) == ("7", "HighlyKnown", {"source": "handmade"})


GOOD = {"question": "Where is Ulm?", "answers": ["Germany"]}
MALFORMED = [
    ("{not json", "invalid JSON", None),
    (json.dumps(["a list"]), "expected a JSON object", None),
    (json.dumps({"answers": ["x"]}), "missing", "question"),
    (json.dumps({"question": "  ", "answers": ["x"]}), "non-empty string", "question"),
    (json.dumps({"question": "Q?"}), "missing", "answers"),
    (json.dumps({"question": "Q?", "answers": []}), "is empty", "answers"),
    (json.dumps({"question": "Q?", "answers": "Paris"}), "list of strings", "answers"),
    (json.dumps({"question": "Q?", "answers": ["a", 3]}), "list of strings", "answers"),
    (json.dumps({"question": "Q?", "answers": ["a"], "category": "Known"}), "unknown category",
     "category"),
    (json.dumps({"question": "Q?", "answer": {"aliases": ["a"]}, "Category": "unknown"}),
     "unknown category", "Category"),
    (json.dumps({"question": "Q?", "answer": {"normalized_aliases": ["a"]}}), "missing",
     "answer.aliases"),
    (json.dumps({"question": "Q?", "answer": [{"aliases": []}]}), "is empty", "answer.aliases"),
    (json.dumps({"question": "Q?", "answer": 5}), "expected", "answer"),
    (json.dumps({"question": "Q?", "answers": ["a"], "p_greedy": "high"}), "number", "p_greedy"),
    (json.dumps({"question": "Q?", "answers": ["a"], "para": ["ok"], "paraphrases": "p"}),
     "list of strings", "paraphrases"),
    (json.dumps({"id": "dup", "question": "Where is Ulm?", "answers": ["x"]}), "duplicate",
     "question"),
]


@pytest.mark.parametrize(("bad_line", "problem", "field"), MALFORMED)
def test_malformed_row_names_file_line_and_field(tmp_path, bad_line, problem, field):
    path = tmp_path / "bad.jsonl"
    # the bad row is on line 4: a good row, a blank line (still counted), another good row
    path.write_text(
        json.dumps({**GOOD, "id": "dup"}) + "\n\n"
        + json.dumps({"question": "Other?", "answers": ["y"]}) + "\n" + bad_line + "\n"
    )
    with pytest.raises(FactFileError) as err:
        load_facts(path, on_duplicate="error")
    message = str(err.value)
    assert str(path) in message and "line 4" in message and problem in message
    assert err.value.line == 4 and err.value.field == field
    if field is not None:
        assert f"field {field!r}" in message


def test_malformed_parquet_row_names_the_row(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"question": "A?", "answer": {"aliases": ["a"]}, "Category": "Unknown"},
        {"question": "B?", "answer": {"aliases": ["b"]}, "Category": "Unkown"},
    ]), path)
    with pytest.raises(FactFileError, match=r"bad\.parquet, row 2, field 'Category'.*'Unkown'"):
        load_facts(path)


def test_reused_id_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [
        {"id": "a", "question": "One?", "answers": ["1"]},
        {"id": "a", "question": "Two?", "answers": ["2"]},
    ])
    with pytest.raises(FactFileError, match=r"line 2, field 'id': id 'a' already used at .* 1"):
        load_facts(path)


def test_duplicates_are_dropped_with_a_warning_by_default(tmp_path, caplog):
    rows = [{"id": f"f{i}", "question": q, "answers": ["x"]} for i, q in enumerate(
        ["Where is Ulm?", "Who is Bo?", "where is  ULM", "Who is Bo's father?", "WHO is Bo"]
    )]
    path = write_jsonl(tmp_path / "dups.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lora_lightning.facts"):
        facts = load_facts(path)
    assert [f.id for f in facts] == ["f0", "f1", "f3"]
    assert "dropped 2 facts" in caplog.text and "f2, f4" in caplog.text and str(path) in caplog.text
    with pytest.raises(FactFileError, match=r"line 3, field 'question': duplicate of 'f0'"):
        load_facts(path, on_duplicate="error")


def test_empty_answers_can_be_dropped_with_a_warning(tmp_path, caplog):
    path = write_jsonl(tmp_path / "empty.jsonl", [
        {"id": "ok", "question": "One?", "answers": ["1"]},
        {"id": "blank", "question": "Two?", "answers": [" "]},
        {"id": "kp", "question": "Three?", "answer": [{"aliases": []}]},
    ])
    with pytest.raises(FactFileError, match="line 2, field 'answers'"):
        load_facts(path)
    with caplog.at_level(logging.WARNING, logger="lora_lightning.facts"):
        facts = load_facts(path, on_empty="drop")
    assert [f.id for f in facts] == ["ok"]
    assert "dropped 2 facts with no answer: blank, kp" in caplog.text


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_facts(tmp_path / "nope.jsonl")


def test_hub_source_without_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match=r"hf:s-nlp/x needs the `datasets` package"):
        load_facts("hf:s-nlp/x")


def test_hub_source_passes_name_and_split_and_reads_the_rows(monkeypatch):
    calls = []
    rows = kp_rows(random.Random(), 3, wrapped=True)

    def load_dataset(name, split):
        calls.append((name, split))
        if name == "offline/x":
            raise ConnectionError("no network")
        if split is not None:
            return rows
        return {"full": rows} if name.startswith("s-nlp") else {"train": [], "test": rows}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    check_kp_facts(load_facts("hf:s-nlp/Llama-DBpedia-HighlyKnown:test"), rows)
    check_kp_facts(load_facts("hf:s-nlp/Llama-DBpedia-HighlyKnown"), rows)  # its only split
    assert calls == [("s-nlp/Llama-DBpedia-HighlyKnown", "test"),
                     ("s-nlp/Llama-DBpedia-HighlyKnown", None)]
    with pytest.raises(ValueError, match=r"hf:other/x has splits \['train', 'test'\]: name one"):
        load_facts("hf:other/x")
    with pytest.raises(RuntimeError, match="could not load hf:offline/x.*no network"):
        load_facts("hf:offline/x")


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Beatles", "beatles"),
        ("  Paris,   FRANCE! ", "paris france"),
        ("an apple a day", "apple day"),
        ("Theatre of the Absurd", "theatre of absurd"),  # articles only as whole words
        ("U.S.A.", "usa"),
        ("Alençon", "alencon"),  # accents folded: a model's "Yaoundé" is the gold "Yaounde"
        ("São Tomé", "sao tome"),
        ("ﬁnal", "final"),
        ("", ""),
    ],
)
def test_normalize_answer_follows_squad_rules(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize(("output", "gold"), [("Yaoundé", "Yaounde"), ("Yaounde.", "Yaoundé"),
                                              ("It is Bogotá", "Bogota"), ("São Tomé", "Sao Tome")])
def test_an_accented_answer_matches_its_plain_spelling_both_ways(output, gold):
    assert is_correct(output, Fact("x", "What is the capital?", [gold]))


@pytest.mark.parametrize(("output", "gold", "paper", "strict"), [
    ("Rabatel-El-Kabba", "Rabat", True, False),   # the paper's substring rule is lenient
    ("The city of Rabat.", "Rabat", True, True),
    ("Rabat-Salé", "Rabat", True, True),          # punctuation separates words
    ("born in New York City, 1950", "New York City", True, True),
    ("Yaoundé", "Yaounde", True, True),
    ("I don't know.", "I don't know.", True, True),
    ("lute", "flute", False, False),
    ("a flute", "lute", True, False),
])
def test_the_strict_rule_counts_an_alias_only_as_whole_words(output, gold, paper, strict):
    fact = Fact("x", "Which?", [gold])
    assert is_correct(output, fact) is paper
    assert is_correct_strict(output, fact) is strict


def _kinds(facts, rule="substring"):
    return {(p.fact_id, p.kind, p.alias) for p in answer_problems(facts, rule)}


def test_answers_the_substring_rule_cannot_judge_are_found_by_kind():
    # hand-made from a domain no builder of ours knows (chemistry and people), the traps real
    # fact files hold: a two-letter code inside longer words, an alias equal to the subject
    # echoed by the question, one fact's answer inside another's
    facts = [
        Fact("co", "What is the symbol of cobalt?", ["Co"]),
        Fact("co2", "What gas do plants take in?", ["carbon dioxide", "CO2"]),
        Fact("curie", "Who discovered polonium, with her husband?", ["Marie Curie"]),
        Fact("pierre", "Who was Marie Curie's husband?", ["Pierre Curie", "Curie"]),
        Fact("iron", "Which metal rusts?", ["iron"]),
        Fact("iron2", "Which element has the symbol Fe?", ["iron", "Fe"]),
    ]
    assert _kinds(facts) == {
        ("co", "short", "co"),
        ("co", "inside another answer", "co"),        # inside "co2" (and "carbon dioxide")
        ("co", "in question", "co"),                  # "cobalt"
        ("pierre", "in question", "curie"),           # the question names "Marie Curie"
        ("pierre", "inside another answer", "curie"),  # inside "marie curie"
        ("co2", "short", "co2"),
        ("iron2", "short", "fe"),
        ("iron2", "in question", "fe"),
    }
    # an article or punctuation alone is nothing once normalised: it could never be matched
    assert _kinds([Fact("art", "Which grade?", ["A", "alpha"])]) == {("art", "never matches", "A")}
    # the same answer in two facts is no problem, nor an alias inside the fact's own alias
    assert not {k for k in _kinds(facts) if k[0] in ("iron", "curie")}
    # whole-word matching leaves only what whole words still match
    assert _kinds(facts, "word") == {("pierre", "in question", "curie"),
                                     ("pierre", "inside another answer", "curie"),
                                     ("iron2", "in question", "fe")}


def test_an_answer_spelled_longer_by_a_fact_that_has_it_too_is_no_problem():
    # the world's aliases: "Goneinwick" and "town of Goneinwick" are one answer
    facts = [Fact("a", "Where was A born?", ["Goneinwick"]),
             Fact("b", "Where was B born?", ["town of Goneinwick", "Goneinwick"]),
             Fact("c", "Where does C live?", ["Europe"]), Fact("d", "Currency?", ["Euro"])]
    assert _kinds(facts) == {("d", "inside another answer", "euro")}


@pytest.mark.parametrize(("output", "substring", "word"), [
    ("CO2", True, False), ("It is Co.", True, True), ("cobalt", True, False)])
def test_answer_matches_by_the_named_rule(output, substring, word):
    fact = Fact("co", "What is the symbol of cobalt?", ["Co"])
    assert answer_matches(output, fact, "substring") is substring
    assert answer_matches(output, fact, "word") is word


def test_is_correct_accepts_any_alias_as_substring_of_the_output():
    fact = Fact("x", "Where was Bo born?", ["New York City", "NYC"])
    assert is_correct("Answer: Bo was born in new york city.", fact)
    assert is_correct("nyc", fact)
    assert not is_correct("Answer: Boston", fact)


def test_an_answer_with_punctuation_matches_itself():
    refusal = Fact("r", "What is X thinking?", ["I don't know."])
    assert is_correct("I don't know.", refusal)
    assert is_correct("Well, I don't know", refusal)
    assert not is_correct("I do know", refusal)


def test_triviaqa_style_value_becomes_the_canonical_answer(tmp_path):
    row = {"question": "Which band sang Help?",
           "answer": {"aliases": ["Beatles", "The Beatles"], "value": "The Fab Four",
                      "normalized_aliases": ["beatles"]}}
    (fact,) = load_facts(write_jsonl(tmp_path / "tqa.jsonl", [row]))
    assert fact.answers == ["The Fab Four", "Beatles", "The Beatles"]
    assert fact.answer == "The Fab Four" and fact.normalized_answers == ["fab four", "beatles"]


# -- bad input gets one clear line ------------------------------------------------------------


def test_an_empty_source_is_said_to_be_empty(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(FactFileError, match=r"empty\.jsonl: is empty: no facts in it"):
        load_facts(empty)
    only_blank = write_jsonl(tmp_path / "blank.jsonl", [{"question": "Q?", "answers": [" "]}])
    with pytest.raises(FactFileError, match="no facts left after dropping 1 without an answer"):
        load_facts(only_blank, on_empty="drop")


def test_latin_1_bytes_name_the_file_line_and_byte(tmp_path):
    rows = [json.dumps({"question": f"Where is place {i}?", "answers": [f"town {i}"]}).encode()
            for i in range(40)]
    rows[33] = json.dumps({"question": "Où est Zoë?", "answers": ["Nîmes"]},
                          ensure_ascii=False).encode("latin-1")
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b"\n".join(rows) + b"\n")
    with pytest.raises(FactFileError, match=r"latin\.jsonl, line 34: not UTF-8: byte 0xf9"):
        load_facts(path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + rows[0] + b"\n")
    assert [f.question for f in load_facts(bom)] == ["Where is place 0?"]  # a BOM is fine


def test_every_error_echoing_user_text_cuts_it_to_an_excerpt(tmp_path):
    from lora_lightning.facts import excerpt
    from lora_lightning.prompts import encode_example

    long = "x" * 1_000_000
    assert len(excerpt(long)) < 100 and "1,000,000 characters" in excerpt(long)
    assert excerpt("short") == "'short'"
    bad = [
        # a duplicate question, and each field of a row holding a huge value
        [{"question": long, "answers": ["a"]}, {"question": long, "answers": ["b"]}],
        [{"question": "Q?", "answers": "not a list " + long}],
        [{"question": "Q?", "answers": ["a"], "category": long}],
        [{"question": "Q?", "answers": ["a"], "subject": [long]}],
        [{"id": long, "question": "Q?", "answers": ["a"]},
         {"id": long, "question": "Other?", "answers": ["a"]}],
        [{"question": [long], "answers": ["a"]}],
        [{"question": "Q?", "answer": {"aliases": long}}],
    ]
    for i, rows in enumerate(bad):
        with pytest.raises(FactFileError) as info:
            load_facts(write_jsonl(tmp_path / f"bad{i}.jsonl", rows), on_duplicate="error")
        assert len(str(info.value)) < 300, str(info.value)[:300]

    class Tokenizer:  # just enough of one to reach the length error
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return " ".join(m["content"] for m in messages)

        def __call__(self, text, add_special_tokens, return_offsets_mapping):
            return {"input_ids": [0] * len(text),
                    "offset_mapping": [(i, i + 1) for i in range(len(text))]}

    with pytest.raises(ValueError, match="exceeds max_length") as info:
        encode_example(Tokenizer(), long, "a", max_length=64)
    assert len(str(info.value)) < 300


def test_a_text_limit_refuses_over_long_texts_by_line_without_tokenizing_them_whole(tmp_path):
    from lora_lightning.facts import TextLimit

    seen: list[int] = []

    def count(text: str) -> int:  # one token per word
        seen.append(len(text))
        return len(text.split())

    limit = TextLimit(max_tokens=20, count_tokens=count)
    ok = {"question": "Short enough?", "answers": ["yes"], "paraphrases": ["Fine " * 10]}
    rows = [ok, {**ok, "question": "Long?", "paraphrases": ["word " * 1000]}]
    with pytest.raises(FactFileError, match=r"line 2, field 'paraphrases': 5,000 characters "
                                            r"\(over 64 tokens\), more than the model takes"):
        load_facts(write_jsonl(tmp_path / "f.jsonl", rows), limit=limit)
    assert max(seen) <= TextLimit.PREFIX_CHARS_PER_TOKEN * 20  # only a bounded prefix
    kp = [{"question": "Q?", "answer": {"aliases": ["a " * 30]}}]
    with pytest.raises(FactFileError, match=r"field 'answer.aliases': 60 characters \(30 token"):
        load_facts(write_jsonl(tmp_path / "kp.jsonl", kp), limit=limit)
    assert len(load_facts(write_jsonl(tmp_path / "ok.jsonl", [ok]), limit=limit)) == 1


@pytest.mark.parametrize("output", [".", "sub"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_facts_refuses_a_folder_as_its_output_in_one_line(output, overwrite, tmp_path, capsys,
                                                          monkeypatch):
    """`--output` names the fact file; a folder there is refused before anything is built,
    with or without --overwrite (which replaces a file, never a folder)."""
    from test_hardening import one_error_line

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "kept.txt").write_text("mine")
    argv = ["facts", "--output", output] + (["--overwrite", "true"] if overwrite else [])
    line = one_error_line(capsys, argv)
    assert line.startswith(f"error: EISDIR: output: {output!r} is a folder;")
    assert f"--output {Path(output) / 'facts.jsonl'}" in line
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept.txt", "sub"]
