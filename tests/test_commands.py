"""The commands as functions: what `python -m lora_lightning <command>` runs, called directly."""

from __future__ import annotations

import json
import logging

import pytest

from lora_lightning.__main__ import COMMANDS
from lora_lightning.commands import (
    aggregate_command,
    ask_command,
    capacity_command,
    categorize_command,
    evaluate_command,
    export_command,
    facts_command,
    sweep_command,
    world_command,
)
from lora_lightning.facts import load_facts, save_facts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_command_is_a_typed_function_in_the_table():
    assert {
        "aggregate": aggregate_command,
        "ask": ask_command,
        "capacity": capacity_command,
        "categorize": categorize_command,
        "evaluate": evaluate_command,
        "export": export_command,
        "facts": facts_command,
        "sweep": sweep_command,
        "world": world_command,
    } == COMMANDS
    for name, function in COMMANDS.items():
        # categorize's function is the library's (the sweep checks its arguments against it)
        home = "categorize" if name == "categorize" else f"commands.{name}"
        assert function.__module__ == f"lora_lightning.{home}"
        assert function.__doc__ and "Args:" in function.__doc__


def test_categorize_command_writes_counts_and_reuses_its_pool(small_world, tmp_path, capsys):
    facts = load_facts(small_world.world_facts_path)[:30]
    source = save_facts(facts, tmp_path / "mine.jsonl")
    output = tmp_path / "out" / "categorized.jsonl"
    counts = categorize_command(model=str(small_world.model_dir), facts=str(source),
                                output=str(output), n_exp=2, pool_size=6, progress=False)
    printed = capsys.readouterr().out
    written = load_facts(output)
    pool_file = output.with_name("categorized.pool.jsonl")
    pool = load_facts(pool_file)
    assert len(pool) == 6 and len(written) == 24
    assert {f.id for f in pool}.isdisjoint(f.id for f in written)
    assert sum(counts.values()) == 24
    assert counts == {c: sum(f.category == c for f in written) for c in counts}
    for name, count in counts.items():
        assert f"{name}" in printed and str(count) in printed
    assert not output.with_name(output.name + ".partial").exists()

    # categorising again (e.g. after training) reuses the saved pool: identical few-shot sets
    again = categorize_command(model=str(small_world.model_dir), facts=str(source),
                               output=str(output), n_exp=2, pool_size=6, progress=False)
    assert again == counts
    assert load_facts(output) == written


def test_categorize_warns_about_answers_it_cannot_judge_and_can_match_whole_words(
        tiny_model_dir, tiny_fact_files, tmp_path, caplog):
    # one-letter answers: the untrained tiny model's babble holds the letter somewhere, so the
    # paper's substring rule calls them known; whole words do not
    facts = [{"id": f"s{i}", "question": f"Which letter is sign {i}?", "answers": [letter]}
             for i, letter in enumerate("eiouy")]
    source = tmp_path / "letters.jsonl"
    source.write_text("".join(json.dumps(f) + "\n" for f in facts))
    outputs = {}
    for rule in ("substring", "word"):
        out = tmp_path / rule / "c.jsonl"
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            categorize_command(model=str(tiny_model_dir), facts=str(source), output=str(out),
                               pool=str(tiny_fact_files["pool"]), n_exp=2, n_shot=1,
                               max_new_tokens=12, match=rule, progress=False)
        outputs[rule] = {f.id: f for f in load_facts(out)}
        assert json.loads(out.with_name("c.jsonl.meta.json").read_text())["match"] == rule
        listing = out.with_name("c.jsonl.answers.jsonl")
        if rule == "substring":
            (line,) = [r.message for r in caplog.records if "cannot judge" in r.message]
            assert "5 facts" in line and "5 short" in line and str(listing) in line
            assert "--match word" in line
            assert {json.loads(r)["fact_id"] for r in listing.read_text().splitlines()} == {
                f"s{i}" for i in range(5)}
        else:
            assert not [r for r in caplog.records if "cannot judge" in r.message]
            assert not listing.exists()
    said = [a for f in outputs["word"].values() for a in f.predictions]
    assert outputs["word"].keys() == outputs["substring"].keys()
    for fid, fact in outputs["word"].items():  # the same answers, judged by two rules
        assert fact.predictions == outputs["substring"][fid].predictions
    assert max(f.p_greedy for f in outputs["substring"].values()) > 0  # babble holds letters
    assert all(f.p_greedy == 0 for f in outputs["word"].values()), said
    with pytest.raises(ValueError, match="categorize --match: unknown matching rule 'fuzzy'"):
        categorize_command(model=str(tiny_model_dir), facts=str(source), output=str(out),
                           pool=str(tiny_fact_files["pool"]), match="fuzzy", progress=False)


def test_categorize_command_reports_a_missing_fact_file(small_world, tmp_path):
    with pytest.raises((FileNotFoundError, ValueError), match="nope.jsonl"):
        categorize_command(model=str(small_world.model_dir), facts=str(tmp_path / "nope.jsonl"),
                           output=str(tmp_path / "o.jsonl"), progress=False)


def test_categorize_command_applies_the_adapter_hook(small_world, tmp_path):
    """The adapter goes through lora.load_adapter, whose errors name the directory."""
    facts = save_facts(load_facts(small_world.world_facts_path)[:12], tmp_path / "f.jsonl")
    with pytest.raises(FileNotFoundError, match="no_adapter"):
        categorize_command(model=str(small_world.model_dir), facts=str(facts),
                           output=str(tmp_path / "o.jsonl"), adapter=str(tmp_path / "no_adapter"),
                           pool_size=4, n_exp=2, progress=False)


def test_world_command_shows_sizes_categories_and_base_accuracy(tmp_path, monkeypatch, capsys):
    from lora_lightning.world import WorldConfig

    monkeypatch.setattr(WorldConfig, "scale",
                        classmethod(lambda cls, name, seed=0: cls.tiny(seed)))
    info = world_command(scale="small", home=str(tmp_path / "home"))
    shown = capsys.readouterr().out
    assert info["root"].startswith(str(tmp_path))
    for label in ("facts categorised", "base accuracy, frequently trained facts",
                  "refusal rate of the probes", "categories:"):
        assert label in shown
    assert f"Unknown {info['categories']['Unknown']}" in shown
    again = world_command(scale="small", home=str(tmp_path / "home"), json_output=True)
    assert again["root"] == info["root"] and '"n_tested"' in capsys.readouterr().out


def test_world_command_names_its_flag_when_home_cannot_hold_the_cache(
    tmp_path, monkeypatch, capsys
):
    """The cache says `home=...; set home to a writable folder`; the command says `--home`."""
    import errno

    from lora_lightning.__main__ import main

    def not_writable(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(dir))

    monkeypatch.setattr("lora_lightning.files.tempfile.mkstemp", not_writable)
    home = tmp_path / "home"
    with pytest.raises(SystemExit) as exit_info:
        main(["world", "--home", str(home)])
    line = capsys.readouterr().err.splitlines()[0]
    assert exit_info.value.code == 2
    assert f"--home {home}" in line and "pass --home a writable folder" in line
    assert "set home" not in line


def test_world_command_packs_a_world_and_compares_a_rebuild_with_the_shipped_one(
    tmp_path, monkeypatch, capsys
):
    """`--pack` writes a world as it ships; `--rebuild true` builds a shipped world here and
    names the files that differ from the shipped build (none on the machine that made it)."""
    from lora_lightning.world import WorldConfig, cache

    monkeypatch.setattr(WorldConfig, "scale",
                        classmethod(lambda cls, name, seed=0: cls.tiny(seed)))
    key = WorldConfig.tiny().key()
    world_command(scale="small", home=str(tmp_path / "maker"),
                  pack=str(tmp_path / "shipped" / f"world-{key}.tar.xz"))
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    info = world_command(scale="small", home=str(tmp_path / "user"), rebuild=True)
    assert info["root"].endswith(f"world-{key}-rebuilt")
    assert info["differs_from_shipped"] == []
    assert "none (bit for bit the same)" in capsys.readouterr().out


@pytest.mark.parametrize(("failed", "code"), [({}, None), ({"n=10__mix=+0": "boom"}, 1)])
def test_sweep_exits_non_zero_when_a_cell_failed(monkeypatch, failed, code):
    """The other cells still ran and were aggregated; a script or CI must notice the failure."""
    import lora_lightning.__main__ as cli

    def fake_sweep(config_file: str, dry_run: bool = False) -> dict:
        return {"cells": 2, "done": 2 - len(failed), "failed": failed}

    monkeypatch.setitem(cli.COMMANDS, "sweep", fake_sweep)
    if code is None:
        cli.main(["sweep", "--config", "grid.yaml"])
    else:
        with pytest.raises(SystemExit) as exited:
            cli.main(["sweep", "--config", "grid.yaml"])
        assert exited.value.code == code
