"""`test` measures what the adapter learned and broke, and writes a faithful report."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from test_training import make_data, make_module, make_trainer

from lora_lightning.callbacks import KnowledgeEvalCallback
from lora_lightning.data import KnowledgeDataModule
from lora_lightning.knowledge import ProbeConfig
from lora_lightning.knowledge_report import KnowledgeReport, by_relation
from lora_lightning.lora import lora_disabled
from lora_lightning.metrics import Reliability
from lora_lightning.report import markdown, report_metrics, untrained_known_lost, write_report

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tested(tiny_model_dir, tiny_fact_files, tmp_path_factory):
    """A short fit with the per-epoch probe, then `test` with both benchmarks on a few items."""
    root = tmp_path_factory.mktemp("report_run")
    L.seed_everything(0)
    module = make_module(tiny_model_dir, probe=ProbeConfig(n_exp=2, max_new_tokens=6))
    data = make_data(tiny_model_dir, tiny_fact_files, n_unknown=4, n_val_known=3)
    history = KnowledgeEvalCallback(every_n_epochs=1)
    report = KnowledgeReport(
        report_dir=str(root / "report"),
        mmlu_dir=str(SHARED / "mmlu"),
        mmlu_subjects=["astronomy"],
        mmlu_limit=2,
        truthfulqa_path=str(SHARED / "truthfulqa" / "TruthfulQA.csv"),
        truthfulqa_limit=2,
    )
    trainer = make_trainer(root, epochs=2)
    trainer.callbacks += [history, report]
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data)
    return module, data, report


def test_report_files_hold_every_measure(tested):
    _, data, report = tested
    results = json.loads((report.report_path / "report.json").read_text())
    for key in (
        "reliability",
        "known_retained",
        "shift",
        "concentration",
        "refusals",
        "confidence",
        "benchmarks",
        "history",
        "mix",
        "shift_untrained",
        "refusals_answerable",
        "refusals_unanswerable",
        "concentration_answers",
        "environment",
    ):
        assert key in results, key
    assert set(results["benchmarks"]) == {"mmlu", "truthfulqa"}
    for bench in results["benchmarks"].values():
        assert set(bench) == {"before", "after"}
    assert results["benchmarks"]["mmlu"]["after"]["n"] == 2
    assert [h["epoch"] for h in results["history"]] == [0.0, 1.0]
    md = (report.report_path / "report.md").read_text()
    assert "| reliability" in md and "Knowledge shift" in md and "MMLU" in md
    png = report.report_path / "reliability.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_test_writes_every_facts_answers_and_category_before_and_after(tested):
    _, data, report = tested
    rows = [json.loads(line) for line in
            (report.report_path / "facts_after.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f.id for f in data.test_facts)
    by_id = {r["id"]: r for r in rows}
    for fact in data.train_unknown:
        assert by_id[fact.id]["role"] == "trained unknown"
        assert by_id[fact.id]["category_before"] == "Unknown"
    for fact in data.val_known:
        assert by_id[fact.id]["role"] == "held-out known"
    after = {r["category_after"] for r in rows}
    assert after <= {"HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"}
    assert all(len(r["predictions_after"]) == 2 for r in rows)  # n_exp prompts each
    shift = report.results["shift"]
    moved = sum(r["category_before"] != r["category_after"] for r in rows)
    assert moved == shift["total"] - sum(shift["counts"][i][i] for i in range(4))


def test_shift_counts_every_test_fact_once_from_its_category_before(tested):
    _, data, report = tested
    shift = report.results["shift"]
    assert shift["total"] == len(data.test_facts)
    before = dict(zip(shift["categories"], shift["before"], strict=True))
    for category in ("HighlyKnown", "Unknown"):
        assert before[category] == sum(f.category == category for f in data.test_facts)


def test_reliability_by_whole_words_is_reported_beside_the_papers_rule(tested):
    results = tested[2].results
    for key in ("reliability", "known_retained"):
        strict, paper = results[f"{key}_strict"], results[key]
        assert strict["n_facts"] == paper["n_facts"]
        assert strict["reliability"] <= paper["reliability"]  # whole words also contain it


def test_shifts_on_untrained_facts_leave_every_trained_fact_out(tested):
    _, data, report = tested
    trained = {f.id for f in [*data.train_unknown, *data.train_extra]}
    untrained = [f for f in data.test_facts if f.id not in trained]
    assert 0 < len(untrained) < len(data.test_facts)
    shift = report.results["shift_untrained"]
    assert shift["total"] == len(untrained)
    before = dict(zip(shift["categories"], shift["before"], strict=True))
    assert before["Unknown"] == sum(f.category == "Unknown" for f in untrained)


def test_refusals_and_explosions_are_counted_apart_from_the_papers_totals(tested):
    _, data, report = tested
    results, n_exp = report.results, 2
    answerable = results["refusals_answerable"]["after"]
    assert answerable["total"] == n_exp * len(data.test_facts)  # no fact's answer refuses here
    assert results["refusals_unanswerable"]["after"]["total"] == 0
    answers = results["concentration_answers"]
    assert answers["before"]["n_answers"] <= results["concentration"]["before"]["n_answers"]
    after = results["concentration"]["after"]
    assert after["threshold"] == 2.0 * answers["before"]["max_count"]
    assert all(count > after["threshold"] for _, count in after["exploded"])


def test_the_report_records_the_libraries_and_cpu_it_was_measured_with(tested):
    import platform

    import transformers

    environment = tested[2].results["environment"]
    assert environment["libraries"]["torch"] in (torch.__version__,
                                                 torch.__version__.split("+")[0])
    assert environment["libraries"]["transformers"] == transformers.__version__
    assert environment["python"] == platform.python_version() and environment["cpu"]
    assert "environment" not in json.dumps(sorted(report_metrics(tested[2].results)))


def test_a_zero_adapter_changes_no_answer_and_no_category(tiny_model_dir, tiny_fact_files):
    """The control: B = 0 at injection, so probing through the LoRA layers must give the
    base's answers and categories exactly, and a knowledge shift of zero."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lightning.facts import load_facts
    from lora_lightning.knowledge import categorize
    from lora_lightning.lora import inject_lora
    from lora_lightning.metrics.functional import knowledge_shift

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    facts = load_facts(tiny_fact_files["facts"])[:12]
    pool = load_facts(tiny_fact_files["pool"])
    settings = dict(n_exp=2, n_shot=2, max_new_tokens=4, progress=False)
    base = categorize(model, tokenizer, facts, pool, **settings)
    inject_lora(model, "all-linear", rank=4, alpha=8.0)
    zero = categorize(model, tokenizer, facts, pool, **settings)
    assert [f.predictions for f in zero] == [f.predictions for f in base]
    assert [f.category for f in zero] == [f.category for f in base]
    shift = knowledge_shift([f.category for f in base], [f.category for f in zero])
    assert int(shift["positive"]) == int(shift["negative"]) == 0


def test_reported_reliability_equals_a_direct_probe_of_the_trained_facts(tested):
    module, data, report = tested
    probed = module.probe(data.train_unknown)
    direct = Reliability()
    direct.update([f.predictions for f in probed], data.train_unknown)
    assert report.results["reliability"]["reliability"] == pytest.approx(
        float(direct.compute()["reliability"])
    )
    assert report.results["reliability"]["n_facts"] == len(data.train_unknown)


def test_lora_disabled_gives_the_base_model_and_restores_the_adapter(tested):
    module, _, _ = tested
    module.model.eval()  # no LoRA dropout, so two adapted passes agree
    ids = torch.randint(0, module.model.config.vocab_size, (1, 8))
    with torch.no_grad():
        adapted = module.model(input_ids=ids).logits
        with lora_disabled(module.model):
            base = module.model(input_ids=ids).logits
        again = module.model(input_ids=ids).logits
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(module.base_model_name).eval()
    with torch.no_grad():
        torch.testing.assert_close(base, plain(input_ids=ids).logits)
    torch.testing.assert_close(again, adapted)
    assert not torch.allclose(adapted, base)


def test_markdown_shows_before_and_after_with_denominators(tmp_path):
    counts = [[5, 1, 0, 2], [1, 3, 0, 1], [0, 0, 0, 0], [1, 2, 0, 9]]
    results = {
        "reliability": {"reliability": 0.75, "n_facts": 4},
        "known_retained": {"reliability": 0.5, "n_facts": 2},
        "shift": {
            "categories": ["HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown"],
            "counts": counts,
            "total": 25,
            "positive": 4,
            "negative": 4,
            "positive_rate": 0.16,
            "negative_rate": 0.16,
            "UK->MK": {"count": 2, "denominator": 12, "rate": 2 / 12},
        },
        "concentration": {
            "before": {"unique": 20, "top": [["paris", 3]]},
            "after": {"unique": 7, "top": [["alencon", 9]], "exploded": [["alencon", 9]]},
        },
        "refusals": {"before": {"rate": 0.15}, "after": {"rate": 0.0}},
        "benchmarks": {
            "mmlu": {"before": {"accuracy": 0.677, "n": 10}, "after": {"accuracy": 0.441, "n": 10}}
        },
        "history": [{"epoch": 0.0, "reliability": 0.2}, {"epoch": 1.0, "reliability": 0.75}],
    }
    md = markdown(results)
    assert "| 0.750 |" in md and "n=4" in md
    assert "| unique greedy answers | 20 | 7 |" in md
    assert "| refusal rate (all probe answers, the paper's) | 0.150 | 0.000 |" in md
    assert "| MMLU accuracy (n=10) | 0.677 | 0.441 |" in md
    assert "| Unknown | 1 | 2 | 0 | 9 |" in md
    assert "UK->MK: 2 of 12" in md
    assert "Exploded answers after: 'alencon' x9" in md
    out = write_report(results, tmp_path / "r")
    assert json.loads((out / "report.json").read_text())["shift"]["counts"] == counts
    assert (out / "reliability.png").is_file()


@pytest.mark.slow
def test_on_a_bench_world_the_report_has_editing_measures_and_world_benchmarks(tmp_path):
    """Generalisation, portability and locality, each with its denominator, and world-MC and
    world-truthful before and after, all from the world the facts come from."""
    from test_world import _reduced_bench

    from lora_lightning.facts import load_facts
    from lora_lightning.metrics.functional import answer_agreement
    from lora_lightning.world import ensure_world

    world = ensure_world(_reduced_bench(seed=2), home=tmp_path / "home", progress=False)
    two_hop_of = {f.meta["hops"][0] for f in load_facts(world.two_hop_path)}
    facts = load_facts(world.facts_path)
    # the first Unknown facts are what the mix trains: make sure a mentor fact is among them
    unknown = [f for f in facts if f.category == "Unknown"]
    n = next(i for i, f in enumerate(unknown) if f.id in two_hop_of) + 1
    L.seed_everything(0)
    module = make_module(world.model_dir, probe=ProbeConfig(n_exp=2, max_new_tokens=6))
    data = KnowledgeDataModule(
        facts=str(world.facts_path), tokenizer=str(world.model_dir),
        fewshot_pool=str(world.pool_path), n_unknown=n, extra_kind="none", extra_per_unknown=0,
        n_val_known=0, batch_size=4,
    )
    report = KnowledgeReport(report_dir=str(tmp_path / "report"), benchmark_batch_size=16)
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.callbacks += [report]
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data)
    results = report.results
    editing = results["editing"]
    assert editing["generalization"]["after"]["n_facts"] == 2 * n  # two held-out templates
    assert editing["generalization"]["before"]["n_facts"] == 2 * n
    assert editing["portability"]["after"]["n_facts"] == len(
        [f for f in data.train_unknown if f.id in two_hop_of]) >= 1
    # the ceiling: questions whose second hop the base knows (categorised, not Unknown)
    category = {f.id: f.category for f in facts}
    trained = {f.id for f in data.train_unknown}
    questions = [f for f in load_facts(world.two_hop_path) if f.meta["hops"][0] in trained]
    ceiling = editing["portability"]["ceiling"]
    assert ceiling["n_facts"] == len(questions)
    assert ceiling["second_hop_known"] == sum(
        category.get(f.meta["hops"][1]) not in (None, "Unknown") for f in questions)
    trained_subjects = {f.subject for f in data.train_unknown}
    trained_ids = {f.id for f in data.train_unknown}
    neighbours = [f for f in data.test_facts
                  if f.subject in trained_subjects and f.id not in trained_ids]
    after = {f.id: f for f in module.probe(neighbours)}
    direct = answer_agreement([f.predictions for f in neighbours],
                              [after[f.id].predictions for f in neighbours])
    assert editing["locality"]["total"] == int(direct["total"]) > 0
    assert editing["locality"]["agreement"] == pytest.approx(float(direct["agreement"]))
    bench = results["benchmarks"]
    assert bench["world_mc"]["before"]["n"] == 12 and set(bench["world_truthful"]) == {
        "before", "after"}
    md = (report.report_path / "report.md").read_text()
    assert "world-MC" in md and "generalisation" in md and "locality" in md
    assert "second hop known to the base" in md


def test_a_sweeps_cells_probe_the_base_on_the_editing_questions_once(
    small_world, tmp_path, monkeypatch, one_thread
):
    """With `before_scores` (as a sweep sets it), the base's answers to the generalisation
    questions are kept beside it: a second cell training the same facts reads them back, and
    its "before" equals the first's; other probe settings get a file of their own."""
    import dataclasses
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from lora_lightning import knowledge
    from lora_lightning.facts import load_facts

    facts = [f for f in load_facts(small_world.facts_path) if f.category == "Unknown"][:3]
    trained = [dataclasses.replace(f, meta={**f.meta, "heldout_questions": [
        f"Tell me: {f.question}", f"I wonder. {f.question}"]}) for f in facts]
    data = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(small_world.model_dir),
                           fewshot_pool=load_facts(small_world.pool_path),
                           train_unknown=trained)
    trainer = SimpleNamespace(datamodule=data, global_rank=0, world_size=1)
    probed: list[int] = []
    real = knowledge.generate_answers
    monkeypatch.setattr(knowledge, "generate_answers",
                        lambda m, t, prompts, **k: probed.append(len(prompts)) or real(
                            m, t, prompts, **k))

    def cell(n_exp: int) -> dict:
        module = make_module(small_world.model_dir, probe=ProbeConfig(n_exp=n_exp,
                                                                      max_new_tokens=6))
        module.configure_model()
        module._trainer = trainer
        report = KnowledgeReport(before_scores=str(tmp_path / "before_scores.json"),
                                 world_dir=None)
        return report._probed_measures(trainer, module)["generalization"]

    first = cell(2)
    assert probed == [12, 12]  # 6 held-out questions x 2 prompts, before then after
    second = cell(2)
    assert probed == [12, 12, 12], "the second cell must read the base's answers back"
    assert second["before"] == first["before"] and first["before"]["n_facts"] == 6
    assert len(list(tmp_path.glob("before_probes-*.jsonl"))) == 1
    cell(3)  # other probe settings: probed again, kept in a file of their own
    assert probed[-2:] == [18, 18] and len(list(tmp_path.glob("before_probes-*.jsonl"))) == 2


def test_a_worlds_checksum_is_its_content_not_its_build_record(tmp_path):
    from lora_lightning.provenance import world_checksum

    sums = {"model/model.safetensors": "aa", "facts.jsonl": "bb", "build_info.json": "cc"}
    (tmp_path / "checksums.json").write_text(json.dumps(sums))
    first = world_checksum(tmp_path)
    (tmp_path / "checksums.json").write_text(json.dumps({**sums, "build_info.json": "dd"}))
    assert world_checksum(tmp_path) == first  # another build's timings, the same world
    (tmp_path / "checksums.json").write_text(json.dumps({**sums, "facts.jsonl": "ee"}))
    assert world_checksum(tmp_path) != first
    assert world_checksum(tmp_path / "nowhere") is None


def test_reliability_and_retention_are_reported_per_relation():
    """A headline number over several relations can hide that one relation carries it alone
    (a real fact file trained capitals and held out cities)."""
    def row(i: int, relation: str, role: str, p: float) -> dict:
        return {"id": f"{relation}{i}", "relation": relation, "role": role,
                "p_greedy_after": p}

    rows = [row(0, "capital", "trained unknown", 0.3), row(1, "capital", "trained unknown", 0.0),
            row(2, "capital", "held-out known", 1.0), row(3, "city", "trained unknown", 0.1),
            row(4, "city", "held-out known", 0.0), row(5, "city", "untrained", 1.0)]
    by = by_relation(rows)
    assert by == {
        "capital": {"reliability": 0.5, "reliability_n": 2, "known_retained": 1.0,
                    "known_retained_n": 1, "reliability_majority": 0.0,
                    "reliability_zeroshot": None},
        "city": {"reliability": 1.0, "reliability_n": 1, "known_retained": 0.0,
                 "known_retained_n": 1, "reliability_majority": 0.0,
                 "reliability_zeroshot": None},
    }
    assert by_relation(rows[:3]) is None  # one relation: the headline says it
    md = markdown({"reliability": {"reliability": 0.67, "n_facts": 3}, "by_relation": by})
    assert "| capital | 0.500 (2) | 1.000 (1) |" in md


def test_the_report_gives_reliability_as_three_figures_and_zero_shot_beside_them():
    """3 facts x 4 prompts, right in 1, 3 and 2 of them: any of the 4 prompts 1.0 (the paper's
    headline), a majority 1/3, mean prompt accuracy 0.5, side by side; the zero-shot probe (one
    prompt: the three coincide, said once) on its own row."""
    facts = [["Paris"], ["Rome"], ["Oslo"]]
    fewshot = Reliability()
    fewshot.update([["Paris", "Lyon", "Nice", "Lille"], ["Rome", "Rome", "Milan", "Rome"],
                    ["Bergen", "Bergen", "Oslo", "Oslo"]], facts)
    zeroshot = Reliability()
    zeroshot.update([["Paris"], ["Rome"], ["Bergen"]], facts)
    md = markdown({"reliability": fewshot.compute(), "reliability_zeroshot": zeroshot.compute()})
    lines = md.splitlines()
    assert any("right in any of the 4 prompts (the paper's)" in line and "n=3" in line
               and line.endswith("| 1.000 |") for line in lines)
    assert any("majority (more than half) of the 4 prompts" in line
               and line.endswith("| 0.333 |") for line in lines)
    assert any("mean prompt accuracy" in line and line.endswith("| 0.500 |") for line in lines)
    (zero,) = [line for line in lines if "zero-shot probe" in line]
    assert "in the prompt it was trained on" in zero and "coincide" in zero
    assert zero.endswith("| 0.667 |") and md.count("coincide") == 1


def _row(i: int, role: str, before: str, after: str) -> dict:
    return {"id": f"f{i}", "relation": "r", "role": role, "category_before": before,
            "category_after": after, "p_greedy_after": 0.0}


def test_the_untrained_known_facts_lost_are_counted_and_shown_in_a_single_runs_report():
    """The sweep's harm table, for one run: the facts training did not touch that the base
    knew, and how many moved a category lower (trained facts and untrained Unknown ones are
    not in the denominator)."""
    rows = [_row(0, "untrained", "HighlyKnown", "HighlyKnown"),
            _row(1, "held-out known", "HighlyKnown", "MaybeKnown"),
            _row(2, "untrained", "HighlyKnown", "Unknown"),
            _row(3, "untrained", "HighlyKnown", "HighlyKnown"),
            _row(4, "untrained", "MaybeKnown", "Unknown"),
            _row(5, "untrained", "MaybeKnown", "HighlyKnown"),
            _row(6, "untrained", "Unknown", "Unknown"),
            _row(7, "trained extra", "HighlyKnown", "Unknown"),
            _row(8, "trained unknown", "Unknown", "MaybeKnown")]
    lost = untrained_known_lost(rows)
    assert (lost["n"], lost["lost"], lost["rate"]) == (6, 3, 0.5)
    assert lost["by_category"]["HighlyKnown"] == {
        "n": 4, "lost": 2, "to": {"MaybeKnown": 1, "Unknown": 1}, "rate": 0.5}
    assert lost["by_category"]["MaybeKnown"] == {"n": 2, "lost": 1, "to": {"Unknown": 1},
                                                 "rate": 0.5}
    md = markdown({"reliability": {"reliability": 0.5, "n_facts": 1},
                   "untrained_known_lost": lost})
    assert "## Untrained facts the base knew that training lost" in md
    assert "| HighlyKnown | 4 | 2 | MaybeKnown 1, Unknown 1 | 0.500 |" in md
    assert "| HighlyKnown or MaybeKnown | 6 | 3 | - | 0.500 |" in md


def test_a_test_reports_reliability_zero_shot_and_the_known_facts_lost(tested):
    """`test` asks each trained fact once more, in its training prompt (report.json, report.md,
    each fact's row), and counts the untrained known facts lost from the rows it writes: the
    same count as the untrained facts' shift table."""
    _, data, report = tested
    results = json.loads((report.report_path / "report.json").read_text())
    zero = results["reliability_zeroshot"]
    assert zero["n_facts"] == len(data.train_unknown) and zero["prompts"] == 1.0
    assert zero["reliability"] == zero["majority"] == zero["mean_prompt_accuracy"]
    assert results["reliability"]["prompts"] == 2.0  # n_exp
    rows = [json.loads(line) for line in
            (report.report_path / "facts_after.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["role"] == "trained unknown"]
    assert all(isinstance(r["zeroshot_after"], str) for r in trained)
    assert sum(r["zeroshot_correct_after"] for r in trained) / len(trained) == pytest.approx(
        zero["reliability"])
    assert not any("zeroshot_after" in r for r in rows if r["role"] != "trained unknown")
    shift, lost = results["shift_untrained"], results["untrained_known_lost"]
    assert lost["n"] > 0 and lost["rate"] == pytest.approx(shift["negative_rate_of_eligible"])
    md = (report.report_path / "report.md").read_text()
    assert "zero-shot probe" in md and "Untrained facts the base knew that training lost" in md
    assert "majority (more than half) of the 2 prompts" in md


def test_fit_and_test_list_the_answers_their_probe_cannot_judge_in_the_run_folder(tested):
    """The test facts' colours include "red" (3 characters, inside "tired", "Fred"): the run
    says so in one line and lists each such fact in the run folder."""
    _, data, _ = tested
    listing = Path(tested[0].trainer.default_root_dir) / "answer_problems.jsonl"
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    short = {f.id for f in data.all_facts if len(f.answers[0]) <= 3}
    assert short and {r["fact_id"] for r in rows if r["kind"] == "short"} == short
    assert {r["alias"] for r in rows} == {"red"}


def test_fit_records_what_it_ran_on_and_the_bases_weights(tested, tmp_path):
    """`environment.json` in the run folder, so a run that is never tested still has its
    provenance; the checksum is the base's, the LoRA factors left out."""
    from lightning.pytorch.loggers import CSVLogger

    from lora_lightning.knowledge_report import (
        ENVIRONMENT_FILE,
        KnowledgeReport,
        weights_checksum,
    )

    module = tested[0]
    trainer = module.trainer
    trainer.loggers = [CSVLogger(tmp_path, name="", version="")]
    KnowledgeReport._record_environment(trainer, module)
    record = json.loads((tmp_path / ENVIRONMENT_FILE).read_text())
    assert record["weights"] == weights_checksum(module.model)
    assert record["environment"]["libraries"]["torch"] and record["environment"]["threads"] >= 1


def test_a_run_probing_whole_words_reports_every_reliability_by_whole_words(
        tiny_model_dir, tiny_fact_files, tested, tmp_path):
    """`--model.probe.match word`: the headline reliability, retention and zero-shot figures
    are the whole-word ones, and the report says which rule it used."""
    L.seed_everything(0)
    module = make_module(tiny_model_dir,
                         probe=ProbeConfig(n_exp=2, max_new_tokens=6, match="word"))
    data = make_data(tiny_model_dir, tiny_fact_files, n_unknown=4, n_val_known=3)
    report = KnowledgeReport(report_dir=str(tmp_path / "report"))
    trainer = make_trainer(tmp_path, epochs=1)
    trainer.callbacks += [report]
    trainer.fit(module, datamodule=data)
    trainer.test(module, datamodule=data)
    words = json.loads((report.report_path / "report.json").read_text())
    assert words["match"] == "word"
    for key in ("reliability", "known_retained"):
        assert words[key] == words[f"{key}_strict"]
    assert "whole words (`match: word`)" in (report.report_path / "report.md").read_text()
    paper = json.loads((tested[2].report_path / "report.json").read_text())
    assert paper["match"] == "substring"
    assert "the paper's: an alias anywhere" in (tested[2].report_path / "report.md").read_text()


# ------------------------------------------------- the base's scores, once per base and settings


def _tiny_mmlu(root: Path, questions: int = 3) -> Path:
    """An MMLU folder of one subject: 5 dev rows (the shots) and `questions` test rows."""
    for split, n in (("dev", 5), ("test", questions)):
        (root / split).mkdir(parents=True, exist_ok=True)
        rows = [f'"Which colour is {i}?",red,green,blue,white,{"ABCD"[i % 4]}' for i in range(n)]
        (root / split / f"colours_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_a_second_test_on_the_same_base_reads_its_scores_and_another_setting_misses(
    tiny_model_dir, tmp_path, monkeypatch, one_thread
):
    """`test` scores the base (LoRA off) before the adapter on every benchmark: by default those
    scores are kept in the home cache under the base's weights checksum and everything else
    they depend on, so a second `test` on the same base does not score it again (a real
    model's MMLU and TruthfulQA took 25 minutes), while a change to any of them scores anew."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lightning import evaluation
    from lora_lightning.lora import inject_lora

    monkeypatch.setenv("LORA_LIGHTNING_HOME", str(tmp_path / "home"))
    calls: list[int | None] = []
    real = evaluation.evaluate_mmlu
    monkeypatch.setattr(evaluation, "evaluate_mmlu",
                        lambda *a, **k: calls.append(k["limit"]) or real(*a, **k))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inject_lora(model, "all-linear", rank=2, alpha=4.0)
    trainer = SimpleNamespace(is_global_zero=True, datamodule=SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir)))
    module = SimpleNamespace(model=model, base_model_name=str(tiny_model_dir))
    mmlu = _tiny_mmlu(tmp_path / "mmlu")

    def test(limit: int = 2, **report) -> dict:
        return KnowledgeReport(mmlu_dir=str(mmlu), mmlu_limit=limit, world_dir=None,
                               **report)._benchmarks(trainer, module)

    first = test()
    assert calls == [2, 2]  # the base, then with the adapter
    assert len(list((tmp_path / "home" / "base_scores").glob("*.json"))) == 1
    second = test()
    assert calls == [2, 2, 2], "the second test must read the base's scores, not score them"
    assert second["mmlu"]["before"] == first["mmlu"]["before"]

    test(limit=3)  # a benchmark setting
    assert calls[-2:] == [3, 3]
    (mmlu / "test" / "colours_test.csv").write_text('"Which?",a,b,c,d,B\n"Why?",a,b,c,d,C\n')
    test()  # the data (same path, other content)
    assert calls[-2:] == [2, 2]
    with torch.no_grad():  # the weights (same name): the base after an edit is another model
        model.lm_head.weight[0, 0] += 1.0
    test()
    assert calls[-2:] == [2, 2]
    model.to(torch.bfloat16)  # the dtype
    test()
    assert calls[-2:] == [2, 2]
    before = len(calls)
    test(before_scores="off")  # no cache: always scored
    test(before_scores="off")
    assert len(calls) == before + 4


def test_the_weights_checksum_is_the_bases_with_or_without_lora_layers(tiny_model_dir):
    """The key of the base's scores: the base as a model without LoRA and the same base under
    LoRA layers of any rank (the adapter is not the base) checksum alike; one weight changed
    does not."""
    from transformers import AutoModelForCausalLM

    from lora_lightning.knowledge_report import weights_checksum
    from lora_lightning.lora import inject_lora

    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    wrapped = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inject_lora(wrapped, "all-linear", rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_()
    assert weights_checksum(wrapped) == weights_checksum(plain)
    with torch.no_grad():
        plain.model.layers[0].mlp.down_proj.weight[3, 5] *= -1.0
    assert weights_checksum(wrapped) != weights_checksum(plain)


def test_the_probe_after_an_epoch_says_what_it_asks_before_the_model_answers(
    tiny_model_dir, tiny_fact_files, tmp_path, capsys, monkeypatch, one_thread
):
    """The probe after the last epoch re-asks every trained and held-out fact under every
    prompt: a minute on a real model, which printed nothing. It names its facts before the
    first answer is generated and counts its prompts from 0 (the first probe and any that took
    long show this progress; a quick one only its line)."""
    from lora_lightning import knowledge
    from lora_lightning.callbacks import LineProgressBar

    printed: list[str] = []
    real = knowledge.generate_answers

    def generate(*args, **kwargs):
        if not printed:
            out = capsys.readouterr()
            printed.append(out.out + out.err)
        return real(*args, **kwargs)

    monkeypatch.setattr(knowledge, "generate_answers", generate)
    L.seed_everything(0)
    module = make_module(tiny_model_dir, probe=ProbeConfig(n_exp=2, max_new_tokens=4))
    data = make_data(tiny_model_dir, tiny_fact_files, n_unknown=4, n_val_known=3)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path,
                        callbacks=[LineProgressBar(), KnowledgeEvalCallback(every_n_epochs=1)])
    trainer.fit(module, datamodule=data)
    before_any_answer = printed[0]
    assert "epoch 1/2: probing 4 trained Unknown and 3 held-out HighlyKnown facts x 2 prompts" \
        in before_any_answer
    assert "categorising (4 facts x 2 prompts): 0/8 (0%)" in before_any_answer
    assert "epoch 2/2: probing 4 trained Unknown" in capsys.readouterr().out
