"""`python -m lora_lightning ask`: a model's greedy answers before and after its adapter, asked
exactly as the reliability probe asks, side by side and as JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_lightning.__main__ import main
from lora_lightning.commands.ask import ask_argv, ask_command
from lora_lightning.facts import is_correct, load_facts
from lora_lightning.lora import inject_lora, load_adapter, lora_modules, save_adapter, unload_lora
from lora_lightning.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def random_adapter(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """An adapter on the MLPs with non-zero B, saved as `fit` saves one: it changes answers."""
    lm, _ = load_model(str(model_dir))
    inject_lora(lm, ["gate_proj", "up_proj", "down_proj"], rank=2, alpha=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(lm).values():
            module.lora_b.normal_(0.0, 0.5)
    return save_adapter(lm, out)


@pytest.fixture(scope="module")
def world(small_world):
    return small_world


@pytest.fixture(scope="module")
def adapter(world, tmp_path_factory) -> Path:
    return random_adapter(world.model_dir, tmp_path_factory.mktemp("ask") / "adapter")


@pytest.fixture(scope="module")
def facts(world):
    """Three categorised world facts: two the base knows (HighlyKnown), one it does not."""
    categorised = load_facts(world.facts_path)
    known = [f for f in categorised if f.category == "HighlyKnown"][:2]
    unknown = [f for f in categorised if f.category == "Unknown"][:1]
    return known + unknown


@pytest.fixture()
def questions(facts, tmp_path) -> Path:
    """The facts as a questions file, plus one question without answers."""
    path = tmp_path / "questions.jsonl"
    rows = [{"id": f.id, "question": f.question, "answers": f.answers} for f in facts]
    rows.append({"question": "Who keeps the lighthouse of nowhere?"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def ask(world, **kwargs):
    kwargs.setdefault("model", str(world.model_dir))
    kwargs.setdefault("pool", str(world.pool_path))
    return ask_command(progress=False, **kwargs)


def run_cli(*args: str, capsys) -> tuple[int, str, str]:
    try:
        main(["ask", *args])
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- what it shows


def test_one_question_prints_the_base_and_the_adapter_answer_side_by_side(
    world, adapter, facts, capsys
):
    fact = facts[0]
    code, out, err = run_cli(
        "--model", str(world.model_dir), "--adapter", str(adapter), "--pool",
        str(world.pool_path), "--answer", fact.answers[0], "--progress", "false",
        *fact.question.split(),  # unquoted words are the question
        capsys=capsys,
    )
    assert code == 0, err
    header, row, total = out.strip().splitlines()[-3:]
    assert header.split() == ["question", "expected", "base", "adapter"]
    assert row.startswith(fact.question)
    assert row.count("[right]") + row.count("[wrong]") == 2
    assert total.startswith("right: base 1/1, adapter ")  # a HighlyKnown fact: the base knows it


def test_a_questions_file_gives_a_jsonl_row_with_both_answers_per_question(
    world, adapter, facts, questions, tmp_path
):
    output = tmp_path / "out" / "answers.jsonl"
    returned = ask(world, adapter=str(adapter), questions=str(questions), output=str(output))
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows == returned
    assert [r["question"] for r in rows] == [f.question for f in facts] + [
        "Who keeps the lighthouse of nowhere?"
    ]
    for row, fact in zip(rows, facts, strict=False):
        assert row["id"] == fact.id and row["answers"] == fact.answers
        for column in ("base", "adapter"):
            said = row[column]
            assert said["predictions"] == [said["answer"]]  # one prompt: the probe's first
            assert said["correct"] is is_correct(said["answer"], fact)
            assert said["p_greedy"] == float(said["correct"])
    assert [rows[0]["base"]["correct"], rows[1]["base"]["correct"]] == [True, True]
    assert any(r["base"]["answer"] != r["adapter"]["answer"] for r in rows)  # B is not zero
    unanswerable = rows[-1]
    assert unanswerable["answers"] == []
    assert unanswerable["base"]["correct"] is None and unanswerable["adapter"]["p_greedy"] is None


def test_with_the_probes_settings_the_base_answers_are_the_categorisations_answers(
    world, adapter, facts, questions
):
    """The world's facts were categorised with n_exp prompts of its pool and seed: asking with
    the same settings is the same probe, so the base gives the very same answers."""
    config = world.config
    rows = ask(world, adapter=str(adapter), questions=str(questions), n_exp=config.n_exp,
               n_shot=config.n_shot, seed=config.seed)
    for row, fact in zip(rows, facts, strict=False):
        assert row["base"]["predictions"] == fact.predictions
        assert row["base"]["p_greedy"] == fact.p_greedy


def test_a_merged_export_gives_the_same_answers_as_base_plus_adapter(
    world, adapter, questions, tmp_path
):
    """The merged model as `export --format merged` writes it, compared with `--base`."""
    lm, tokenizer = load_model(str(world.model_dir))
    load_adapter(lm, adapter)
    unload_lora(lm, merge=True)
    lm.save_pretrained(tmp_path / "merged", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "merged")

    with_adapter = ask(world, adapter=str(adapter), questions=str(questions))
    merged = ask(world, model=str(tmp_path / "merged"), base=str(world.model_dir),
                 questions=str(questions))
    assert merged == with_adapter
    alone = ask(world, model=str(tmp_path / "merged"), questions=str(questions))
    assert [r["model"] for r in alone] == [r["adapter"] for r in with_adapter]
    assert all(set(r) == {"id", "question", "answers", "model"} for r in alone)


def test_an_expected_answer_nobody_gives_is_wrong_in_both_columns(world, adapter, facts):
    rows = ask(world, adapter=str(adapter), question=facts[0].question, answer="Xylophonia")
    assert rows[0]["answers"] == ["Xylophonia"]
    assert rows[0]["base"]["correct"] is False and rows[0]["adapter"]["correct"] is False


def test_the_bare_words_of_the_command_line_are_the_question():
    assert ask_argv(["--model", "world", "Where", "was", "Ada", "born?", "--n_exp", "2"]) == [
        "--model", "world", "--n_exp", "2", "--question", "Where was Ada born?"
    ]
    assert ask_argv(["--answer=Paris", "Where?"]) == ["--answer=Paris", "--question", "Where?"]
    assert ask_argv(["--questions", "q.jsonl"]) == ["--questions", "q.jsonl"]


# --------------------------------------------------------------------------- bad input


def one_line_error(world, *args: str, capsys) -> str:
    code, _, err = run_cli("--model", str(world.model_dir), "--pool", str(world.pool_path),
                           "--progress", "false", *args, capsys=capsys)
    assert code == 2
    assert "Traceback" not in err
    return err.splitlines()[0]


def test_a_missing_adapter_folder_is_one_line_naming_it(world, tmp_path, capsys):
    line = one_line_error(world, "--adapter", str(tmp_path / "no_adapter"), "Where?",
                          capsys=capsys)
    assert "no_adapter" in line and "does not exist" in line


def test_a_folder_that_is_no_adapter_is_one_line_naming_it(world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = one_line_error(world, "--adapter", str(tmp_path / "empty"), "Where?", capsys=capsys)
    assert "empty" in line and "has no adapter_config.json" in line


def test_an_adapter_trained_on_another_base_model_is_refused(world, tmp_path, capsys):
    """Same shapes, other weights: only the base-model fingerprint can tell."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(world.model_dir))
    inject_lora(other, ["gate_proj"], rank=2, alpha=4)
    adapter = save_adapter(other, tmp_path / "other_adapter")
    line = one_line_error(world, "--adapter", str(adapter), "Where?", capsys=capsys)
    assert "other_adapter" in line and "different base model" in line


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"question": "Where?"}\n{"answers": ["x"]}\n', "line 2, field 'question': missing"),
        ('{"question": "Where?"}\nnot json\n', "line 2: invalid JSON"),
        ('{"question": "Where?", "answers": "Paris"}\n', "field 'answers': expected a list"),
    ],
)
def test_a_malformed_questions_file_is_one_line_naming_file_line_and_field(
    world, tmp_path, content, needle, capsys
):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    line = one_line_error(world, "--questions", str(path), capsys=capsys)
    assert "bad.jsonl" in line and needle in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((), "give one question"),
        (("--questions", "q.jsonl", "Where?"), "not both"),
        (("--adapter", "a", "--base", "b", "Where?"), "--base is for a merged --model"),
    ],
)
def test_contradictory_arguments_are_refused_before_loading_anything(
    world, args, needle, capsys
):
    assert needle in one_line_error(world, *args, capsys=capsys)


def test_another_model_without_a_few_shot_pool_is_asked_zero_shot_saying_so(
    tiny_model_dir, tmp_path, capsys
):
    """`ask --model <any model> "question"` just works: zero-shot, in the chat format."""
    answers = tmp_path / "answers.jsonl"
    code, out, err = run_cli("--model", str(tiny_model_dir), "--progress", "false",
                             "--output", str(answers), "What colour is item 3?", capsys=capsys)
    assert code == 0, err
    assert "zero-shot: no few-shot pool for this model" in err and "--pool" in err
    assert "What colour is item 3?" in out
    explicit = ask_command(model=str(tiny_model_dir), question="What colour is item 3?",
                           n_shot=0, progress=False)
    assert set(explicit[0]) == {"id", "question", "answers", "model"}
    [row] = [json.loads(line) for line in answers.read_text().splitlines()]
    assert row["model"] == explicit[0]["model"]


def test_shots_without_a_pool_are_refused_naming_the_flag(tiny_model_dir, capsys):
    code, _, err = run_cli("--model", str(tiny_model_dir), "--n_shot", "2", "Where?",
                           capsys=capsys)
    assert code == 2 and "--n_shot 2 needs --pool" in err


def test_a_questions_file_brings_its_few_shot_pool_from_beside_it(
    tiny_model_dir, tiny_fact_files, tmp_path, capsys
):
    """`categorize` writes `<stem>.pool.jsonl` beside its output; asking that file's questions
    of another model then needs no --pool."""
    from lora_lightning.facts import pool_sidecar

    questions = tmp_path / "categorized.jsonl"
    questions.write_text(Path(tiny_fact_files["facts"]).read_text())
    pool_sidecar(questions).write_text(Path(tiny_fact_files["pool"]).read_text())
    rows = ask_command(model=str(tiny_model_dir), questions=str(questions), n_shot=2,
                       progress=False)
    assert len(rows) == len(load_facts(questions))
    assert f"few-shot pool: {pool_sidecar(questions)}" in capsys.readouterr().err
