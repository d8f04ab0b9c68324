"""`capacity`: the adaptive search for n* (the most new facts an adapter learns at reliability
>= tau), its noise bounds, the capacity file's checks, and the run: rounds of probes that a
rerun continues without repeating one, the full test at both ends of each bracket, the table."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from lora_lightning.commands.capacity import capacity_command
from lora_lightning.sweep.capacity.search import SearchRule, load_capacity, wilson_interval
from lora_lightning.sweep.cell import read_status, report_path
from lora_lightning.sweep.spec import SweepFileError

ROOT = Path(__file__).resolve().parents[1]


def search(rule: SearchRule, reliability) -> tuple[list[int], tuple[int, int | None]]:
    """Run the search against a reliability function of n; the probes in order."""
    results: dict[int, float] = {}
    order = []
    while (n := rule.next_n(results)) is not None:
        assert n not in results, f"probe n={n} repeated"
        order.append(n)
        results[n] = reliability(n)
        assert len(order) < 100
    return order, rule.bracket(results)


# ------------------------------------------------------------------------------ the search


@pytest.mark.parametrize("capacity", [1, 7, 137, 999])
def test_the_search_grows_then_bisects_to_the_stated_precision(capacity):
    rule = SearchRule(threshold=0.95, n_start=10, growth=2.0, precision=0.1)
    order, (n_lo, n_hi) = search(rule, lambda n: 1.0 if n <= capacity else 0.9)
    assert n_lo <= capacity < n_hi
    assert n_hi - n_lo <= 1 or n_hi <= n_lo * 1.1
    assert order[0] == 10
    assert len(order) <= 2 * (len(bin(max(capacity, 10) // 10)) + 4)  # geometric, not linear


def test_every_probe_passing_stops_at_n_max_with_an_open_bracket():
    rule = SearchRule(threshold=0.95, n_start=10, n_max=100, growth=3.0)
    order, bracket = search(rule, lambda n: 1.0)
    assert order == [10, 30, 90, 100] and bracket == (100, None)


def test_a_probe_passes_at_the_threshold_and_fails_just_below_it():
    rule = SearchRule(threshold=0.95)
    assert rule.passes(0.95) and not rule.passes(0.949)
    assert rule.bracket({10: 0.95, 20: 0.94}) == (10, 20)


def test_a_non_monotone_result_brackets_below_the_first_failure():
    """Reliability is noisy: a pass above a failure does not move n* past the failure."""
    rule = SearchRule(threshold=0.95, precision=0.1)
    assert rule.bracket({10: 1.0, 20: 0.9, 40: 1.0}) == (10, 20)
    assert rule.next_n({10: 1.0, 20: 0.9, 40: 1.0}) == 14


def test_the_next_probe_depends_only_on_the_probes_so_far():
    """What a rerun relies on: the same probes on disk give the same next probe."""
    rule = SearchRule(threshold=0.95, n_start=10)
    probes = {10: 1.0, 20: 1.0, 40: 0.5, 28: 1.0}
    shuffled = dict(reversed(list(probes.items())))
    assert rule.next_n(probes) == rule.next_n(shuffled) == 33


def test_wilson_intervals_match_the_textbook_values():
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    low, high = wilson_interval(20, 20)  # all learned: an interval, not a point
    assert low == pytest.approx(0.8389, abs=1e-3) and high == 1.0
    assert wilson_interval(95, 100)[0] < 0.95 < wilson_interval(95, 100)[1]


# ------------------------------------------------------------------- the slope

GATE_UP_DOWN = "['gate_proj', 'up_proj', 'down_proj']"  # as capacity.csv spells the list


def chain_row(variant: str, seed: int, params: int, n_star: int, n_hi: int | None,
              family: str = GATE_UP_DOWN) -> dict:
    return {"chain": f"variant={variant}__seed={seed}", "variant": variant, "seed": seed,
            "target_modules": family, "n_star": n_star, "n_hi": n_hi, "searching": None,
            "error": None, "lora_parameters": params}


def test_the_slope_is_fitted_over_variants_with_seeds_averaged_in_log():
    """Seeds share the facts: a variant is one point (mean log10 n* over its seeds), and the
    interval has variants - 2 degrees of freedom, not chains - 2."""
    from lora_lightning.sweep.capacity.report import slopes

    rows = [chain_row("r1", 42, 10, 10, 11), chain_row("r1", 43, 10, 10, 11),
            chain_row("r2", 42, 100, 100, 110), chain_row("r2", 43, 100, 1000, 1100),
            chain_row("r4", 42, 1000, 1000, 1100), chain_row("r4", 43, 1000, 1000, 1100)]
    # points (1, 1), (2, 2.5), (3, 3): slope 1, intercept 1/6, residual variance 1/6 on 1 df
    (fit,) = slopes(rows)
    assert (fit["variants"], fit["chains"]) == (3, 6)
    assert fit["slope"] == pytest.approx(1.0) and fit["intercept"] == pytest.approx(1 / 6)
    half = 12.706 * (1 / 12) ** 0.5  # t(0.975, 1 df) x sqrt(residual variance / Sxx)
    assert fit["interval"] == pytest.approx((1 - half, 1 + half))


def test_each_target_module_family_gets_its_own_slope_or_none_below_three_variants():
    from lora_lightning.sweep.capacity.report import slopes

    rows = [chain_row("r1", 42, 10, 10, 11), chain_row("r2", 42, 100, 100, 110),
            chain_row("r4", 42, 1000, 1000, 1100),
            # all-linear holds fewer facts at equal parameters: pooled, it would bend the line
            chain_row("all-r2", 42, 100, 20, 22, "all-linear"),
            chain_row("all-r8", 42, 1000, 40, 44, "all-linear")]
    fits = {f["family"]: f for f in slopes(rows)}
    assert set(fits) == {"gate_proj/up_proj/down_proj", "all-linear"}
    assert fits["gate_proj/up_proj/down_proj"]["slope"] == pytest.approx(1.0)
    assert fits["gate_proj/up_proj/down_proj"]["variants"] == 3
    assert fits["all-linear"]["slope"] is None
    assert "2 variants" in fits["all-linear"]["reason"]


CSV_COLUMNS = ["chain", "variant", "seed", "rank", "target_modules", "probes", "error", "n_star",
               "n_hi", "searching", "reliability_lo", "reliability_lo_ci", "noisy_lo",
               "lora_parameters", "facts_per_1k_parameters", "bits_per_parameter"]


def test_a_censored_n_star_is_left_out_of_the_slope_and_printed_as_a_lower_bound(tmp_path):
    """A search that ran out of facts with every probe passing (no n_hi) measured a lower
    bound: the report recomputed from capacity.csv alone prints it with "≥" and fits
    without it."""
    from lora_lightning.sweep.capacity.report import (
        read_capacity_csv,
        refresh_capacity_report,
        slopes,
    )

    measured = [("r1", 10, 10, 11), ("r2", 100, 100, 110), ("r4", 1000, 1000, 1100)]
    with open(tmp_path / "capacity.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for variant, params, n_star, n_hi in [*measured, ("r8", 10000, 264, None)]:
            writer.writerow({
                "chain": f"variant={variant}__seed=42", "variant": variant, "seed": 42,
                "target_modules": GATE_UP_DOWN, "probes": 5, "n_star": n_star,
                "n_hi": "" if n_hi is None else n_hi, "reliability_lo": 0.99,
                "reliability_lo_ci": "[0.97, 1.00]", "noisy_lo": False,
                "lora_parameters": params, "facts_per_1k_parameters": n_star / params * 1000,
                "bits_per_parameter": 6 * n_star / params})
    (tmp_path / "report.md").write_text("# Capacity\n\nThe header stays.\n\n"
                                        "| variant | seed | old |\n|---|---|---|\nlog10 n = old\n")
    rows = read_capacity_csv(tmp_path / "capacity.csv")
    (fit,) = slopes(rows)
    assert fit["slope"] == pytest.approx(1.0) and fit["variants"] == 3  # r8 would pull it down
    assert fit["left_out"] == ["variant=r8__seed=42"]

    written = refresh_capacity_report(tmp_path, threshold=0.95)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# Capacity\n\nThe header stays.\n\n| variant | seed |")
    assert "old" not in report
    r8 = next(line for line in report.splitlines() if line.startswith("| r8 |"))
    assert "| ≥ 264 |" in r8 and f"| ≥ {6 * 264 / 10000:.3g} |" in r8
    assert "| 100 |" in next(line for line in report.splitlines() if line.startswith("| r2 |"))
    assert "≥" not in next(line for line in report.splitlines() if line.startswith("| r2 |"))
    assert "slope [" in report and "(3 variants, 3 chains)" in report
    assert "left out as censored: variant=r8__seed=42" in report
    assert f"Bits per LoRA parameter: 6, 6, 6, ≥ {6 * 264 / 10000:.3g};" in report
    assert written["nstar_vs_parameters"].is_file()


def test_a_file_that_is_not_a_capacity_table_is_refused_naming_it(tmp_path):
    from lora_lightning.sweep.capacity.report import read_capacity_csv

    (tmp_path / "capacity.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"capacity\.csv: not a capacity table .*n_star"):
        read_capacity_csv(tmp_path / "capacity.csv")


# ------------------------------------------------------------------------- the file


def write(path: Path, body: dict) -> Path:
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


GOOD = {"world": "small", "variants": {"r1": {"model.rank": 1}, "r4": {"model.rank": 4}}}


def test_a_capacity_file_is_a_sweep_of_variants_by_seeds(tmp_path):
    capacity = load_capacity(write(tmp_path / "cap.yaml", {**GOOD, "seeds": [1, 2]}),
                             cwd=tmp_path)
    assert [c.name for c in capacity.chains()] == [
        "variant=r1__seed=1", "variant=r1__seed=2", "variant=r4__seed=1", "variant=r4__seed=2"]
    assert capacity.sweep.overrides == {"data.extra_kind": "none", "data.extra_per_unknown": 0}
    assert capacity.sweep.output == tmp_path / "capacity" / "cap"
    assert capacity.rule == SearchRule()


def test_modes_cross_the_variants_with_training_modes_each_a_chain(tmp_path):
    """The paper's fixed epochs beside the convergence mode: every (variant, mode, seed) is a
    chain with the mode's settings; a mode may not set what a variant sets."""
    modes = {"epochs10": {"convergence.patience": None},
             "converged": {"convergence.patience": 3, "convergence.min_epochs": 10,
                           "trainer.max_epochs": 40}}
    capacity = load_capacity(write(tmp_path / "cap.yaml", {**GOOD, "modes": modes,
                                                            "search": {"test": False}}),
                             cwd=tmp_path)
    chains = {c.name: c for c in capacity.chains()}
    assert list(chains) == [f"variant={v}__mode={m}__seed=42" for v in ("r1", "r4")
                            for m in ("epochs10", "converged")]
    converged = chains["variant=r4__mode=converged__seed=42"]
    assert converged.labels == {"variant": "r4", "mode": "converged", "seed": "42"}
    assert converged.settings["trainer.max_epochs"] == 40 and converged.settings[
        "model.rank"] == 4
    assert capacity.test_ends is False and load_capacity(
        write(tmp_path / "plain.yaml", GOOD), cwd=tmp_path).test_ends is True
    with pytest.raises(SweepFileError) as err:
        load_capacity(write(tmp_path / "bad.yaml", {**GOOD, "modes": {
            "long": {"model.rank": 2}}}))
    assert err.value.key == "modes.long.model.rank"


def test_a_mode_can_floor_its_probes_steps_where_an_epoch_budget_would_starve_small_n(
        tmp_path):
    """10 facts in batches of 8 are 2 steps an epoch: 60 epochs are 120 steps, too few to call
    a probe converged. A mode's `min_steps` (its chains alone) raises the epochs of small n."""
    from lora_lightning.sweep.capacity.search import epochs_for

    modes = {"epochs10": {"convergence.patience": None},
             "converged": {"convergence.patience": 5, "trainer.max_epochs": 60,
                           "min_steps": 600}}
    capacity = load_capacity(write(tmp_path / "cap.yaml", {**GOOD, "modes": modes}),
                             cwd=tmp_path)
    floors = {c.labels["mode"]: capacity.steps_floor(c) for c in capacity.chains()}
    assert floors == {"epochs10": None, "converged": 600}
    assert all("min_steps" not in c.settings for c in capacity.chains())
    config = SimpleNamespace(
        data=SimpleNamespace(n_unknown=10, extra_per_unknown=0, extra_kind="none",
                             batch_size=8),
        trainer=SimpleNamespace(devices=1, max_epochs=60))
    assert epochs_for(config, 600) == 300 and epochs_for(config, None) is None
    for bad in (0, "many"):
        with pytest.raises(SweepFileError) as err:
            load_capacity(write(tmp_path / "bad.yaml", {**GOOD, "modes": {
                "converged": {"convergence.patience": 5, "min_steps": bad}}}))
        assert err.value.key == "modes.converged.min_steps"


def test_bits_per_fact_are_the_entropy_of_the_answers_its_relation_takes(tmp_path):
    """A relation whose 4 facts share 2 answers 3:1 carries H = 0.811 bits a fact, not
    log2(2) = 1; 4 distinct answers give 2 bits either way. The bits an adapter holds are
    summed over the facts its probe's verdicts (`probe_facts.jsonl`) say it learned, under
    the probe asked for."""
    from lora_lightning.facts import Fact, save_facts
    from lora_lightning.sweep.capacity.report import learned_bits, relation_bits

    answers = {"lopsided": ["Paris", "Paris", "Paris", "Rome"],
               "even": ["Oslo", "Bern", "Lima", "Doha"]}
    facts = [Fact(id=f"{r}:{i}", question=f"Q {r} {i}?", answers=[a], relation=r)
             for r, values in answers.items() for i, a in enumerate(values)]
    path = save_facts(facts, tmp_path / "facts.jsonl")
    h = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert relation_bits(path) == pytest.approx({"lopsided": h, "even": 2.0})
    assert relation_bits(path, entropy=False) == {"lopsided": 1.0, "even": 2.0}
    cell = tmp_path / "probe"
    cell.mkdir()
    (cell / "probe_facts.jsonl").write_text("\n".join(json.dumps(v) for v in (
        {"id": "lopsided:0", "relation": "lopsided", "fewshot": True, "zeroshot": True},
        {"id": "even:1", "relation": "even", "fewshot": False, "zeroshot": True},
        {"id": "even:2", "relation": "even", "fewshot": False, "zeroshot": False})) + "\n")
    bits = relation_bits(path)
    assert learned_bits(cell, bits, "zeroshot") == pytest.approx((2, h + 2.0))
    assert learned_bits(cell, bits, "fewshot") == pytest.approx((1, h))
    assert learned_bits(tmp_path, bits, "zeroshot") is None  # no verdicts, no test: unknown


def test_slopes_are_fitted_per_training_mode():
    """A converged probe and a fixed-epoch one measure different things: never one line."""
    from lora_lightning.sweep.capacity.report import slopes

    rows = [{**chain_row(v, 42, p, n, n + 1), "mode": mode}
            for mode, scale in (("epochs10", 1), ("converged", 10))
            for v, p, n in (("r1", 10, 10 * scale), ("r2", 100, 100 * scale),
                            ("r4", 1000, 1000 * scale))]
    fits = {f["family"]: f for f in slopes(rows)}
    assert set(fits) == {"gate_proj/up_proj/down_proj, epochs10",
                         "gate_proj/up_proj/down_proj, converged"}
    assert all(f["slope"] == pytest.approx(1.0) and f["variants"] == 3 for f in fits.values())


def test_a_probe_says_how_many_epochs_it_trained(tmp_path):
    from lora_lightning.sweep.capacity.search import trained_epochs

    (tmp_path / "metrics.csv").write_text("epoch,step,val/answered_unknown\n0,3,0.5\n"
                                          "11,47,1.0\n11,47,\n")
    assert trained_epochs(tmp_path) == 12
    assert trained_epochs(tmp_path / "missing") is None


@pytest.mark.parametrize(("body", "key"), [
    ({**GOOD, "axes": {"n": [1]}}, "axes"),
    ({"world": "small"}, "variants"),
    ({**GOOD, "variants": {"r1": {"data.n_unknown": 5}}}, "variants.r1.data.n_unknown"),
    ({**GOOD, "variants": {"r1": {"data.extra_kind": "none"}}}, "variants.r1.data.extra_kind"),
    ({**GOOD, "variants": {"r1": {"report.report_dir": "x"}}}, "variants.r1"),
    ({**GOOD, "search": {"threshold": 1.5}}, "search.threshold"),
    ({**GOOD, "search": {"n_start": 2.5}}, "search.n_start"),
    ({**GOOD, "search": {"tau": 0.9}}, "search.tau"),
    ({**GOOD, "seeds": []}, "seeds"),
    ({**GOOD, "search": {"probe": "fourshot"}}, "search.probe"),
    ({**GOOD, "overrides": {"knowledge_eval.every_n_epochs": None}},
     "overrides.knowledge_eval.every_n_epochs"),
    ({**GOOD, "variants": {"r1": {"knowledge_eval.every_n_epochs": None}}},
     "variants.r1.knowledge_eval.every_n_epochs"),
])
def test_a_bad_capacity_file_fails_naming_the_file_and_the_key(body, key, tmp_path):
    path = write(tmp_path / "bad.yaml", body)
    with pytest.raises(SweepFileError) as err:
        load_capacity(path)
    assert err.value.key == key and str(path) in str(err.value)


def _probe_folder(capacity, chain, n: int, columns: dict[str, float]) -> None:
    """A finished probe on disk, as `fit` leaves it: its metrics.csv with `columns` in the row
    of the probe after the last epoch."""
    from lora_lightning.sweep.cell import write_status

    cell = capacity.sweep.output / "cells" / f"{chain.name}__n={n}"
    cell.mkdir(parents=True)
    write_status(cell, state="done", fit_done=True)
    names = ["epoch", "step", "train/loss", *columns]
    (cell / "metrics.csv").write_text(
        ",".join(names) + "\n0,4,1.5" + "," * len(columns) + "\n"
        + "0,9,," + ",".join(str(v) for v in columns.values()) + "\n")


def test_a_search_on_the_zero_shot_probe_reads_its_column_and_brackets_the_other_n_star(
    tmp_path,
):
    """On a real model every probe's adapter answered its trained facts zero-shot and failed
    the few-shot probe: the capacity measured the probe. `search.probe: zeroshot` searches on
    `val/reliability_zeroshot`; n* under the few-shot probe is read off the same probes, a
    bracket where they bracket it and "≥ n" where every probe passed under it. The default
    stays the few-shot probe, so existing files keep their meaning."""
    from lora_lightning.sweep.capacity.report import capacity_markdown, capacity_rows, slopes
    from lora_lightning.sweep.capacity.search import search_state

    body = {**GOOD, "variants": {"r1": {"model.rank": 1}},
            "search": {"threshold": 0.9, "n_start": 10, "growth": 2, "probe": "zeroshot"}}
    capacity = load_capacity(write(tmp_path / "cap.yaml", body), output=tmp_path / "out",
                             cwd=tmp_path)
    assert capacity.probe == "zeroshot"
    (chain,) = capacity.chains()
    for n, fewshot, zeroshot in ((10, 0.95, 1.0), (20, 0.5, 0.95), (40, 0.1, 0.6)):
        _probe_folder(capacity, chain, n, {"val/reliability": fewshot,
                                           "val/reliability_zeroshot": zeroshot})
    state = search_state(capacity, chain)
    assert state.results == {10: 1.0, 20: 0.95, 40: 0.6}
    assert (state.n_lo, state.n_hi, state.next_n) == (20, 40, 28)  # bisects on zero-shot
    (row,) = capacity_rows(capacity, None)
    assert (row["probe"], row["n_star"], row["n_hi"]) == ("zeroshot", 20, 40)
    assert (row["n_star_fewshot"], row["n_hi_fewshot"]) == (10, 20)
    assert "| 10–20 |" in capacity_markdown([row], slopes([row]))
    every_passed = {**row, "probe": "fewshot", "n_star_zeroshot": 40, "n_hi_zeroshot": None}
    assert "| ≥ 40 |" in capacity_markdown([every_passed], slopes([every_passed]))

    default = load_capacity(write(tmp_path / "plain.yaml", {**GOOD, "search": {"n_start": 10}}),
                            output=tmp_path / "plain", cwd=tmp_path)
    assert default.probe == "fewshot"
    first = default.chains()[0]
    _probe_folder(default, first, 10, {"val/reliability": 0.5})  # a fit from before: no zero-shot
    assert search_state(default, first).results == {10: 0.5}
    later = load_capacity(write(tmp_path / "zero.yaml", {**GOOD, "search": {"probe": "zeroshot"}}),
                          output=tmp_path / "plain", cwd=tmp_path)
    assert "has no val/reliability_zeroshot" in search_state(later, first).error


def test_the_shipped_capacity_files_dry_run(capsys, monkeypatch):
    # the dry run checks the model as `fit` does: offline, a hub id must be in the cache, so
    # this is a user online; the hub's address is one that answers nothing, should anything
    # try to reach it (a dry run must not)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name in ("world", "llama31_8b", "smollm2_135m"):
        result = capacity_command(str(ROOT / "configs" / "capacity" / f"{name}.yaml"),
                                  output=f"/tmp/never-made-{name}", dry_run=True)
        assert result["dry_run"] and result["chains"]
        shown = capsys.readouterr().out
        assert "next probe n=" in shown and not Path(f"/tmp/never-made-{name}").exists()


# ------------------------------------------------------------------------------ the run


def _small_world_probes(small_world) -> dict:
    """Overrides that make every probe a seconds-long fit on the test-sized world."""
    return {
        "model.model_name_or_path": str(small_world.model_dir),
        "data.facts": str(small_world.facts_path),
        "data.fewshot_pool": str(small_world.pool_path),
        "trainer.max_epochs": 3, "data.n_val_known": 2, "data.batch_size": 2,
        "model.probe.n_exp": 2, "knowledge_eval.every_n_epochs": 0,
    }


@pytest.fixture(scope="module")
def searched(small_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("capacity")
    body = {
        "overrides": _small_world_probes(small_world),
        "variants": {"r1": {"model.rank": 1}, "r8": {"model.rank": 8}},
        "search": {"threshold": 0.75, "n_start": 2, "n_max": 8, "growth": 2, "precision": 0.5},
        "workers": min(2, len(__import__("os").sched_getaffinity(0))),
    }
    path = write(root / "cap.yaml", body)
    start = time.monotonic()
    result = capacity_command(str(path), output=str(root / "out"))
    return {"file": path, "out": root / "out", "result": result,
            "seconds": time.monotonic() - start}


@pytest.mark.slow
def test_every_chain_ends_on_a_bracket_tested_at_both_ends(searched):
    out = searched["out"]
    state = {s["chain"]: s for s in json.loads((out / "capacity.json").read_text())}
    assert set(state) == {"variant=r1__seed=42", "variant=r8__seed=42"}
    rule = SearchRule(threshold=0.75, n_start=2, n_max=8, growth=2, precision=0.5)
    for chain, s in state.items():
        probes = {int(n): r for n, r in s["probes"].items()}
        assert s["next"] is None and s["error"] is None
        assert (s["n_lo"], s["n_hi"]) == rule.bracket(probes)
        for n in (s["n_lo"], s["n_hi"]):
            if n:
                cell = out / "cells" / f"{chain}__n={n}"
                report = json.loads(report_path(cell).read_text())
                assert report["reliability"]["n_facts"] == n
                assert report["reliability"]["reliability"] == pytest.approx(probes[n], abs=1e-6)
        for n in probes:
            config = yaml.safe_load((out / "cells" / f"{chain}__n={n}" / "cell.yaml").read_text())
            assert config["data"]["n_unknown"] == n
    rows = list(csv.DictReader((out / "capacity.csv").read_text().splitlines()))
    assert {r["variant"] for r in rows} == {"r1", "r8"}
    params = {r["variant"]: int(r["lora_parameters"]) for r in rows}
    assert params["r8"] == 8 * params["r1"]  # A (r x in) and B (out x r) grow with r
    for r in rows:  # bits: each learned fact's log2(answers its relation takes) > 0
        assert int(r["facts_learned"]) >= 1 and float(r["bits"]) > 0
        assert float(r["bits_per_parameter"]) == pytest.approx(
            float(r["bits"]) / int(r["lora_parameters"]))
    for name in ("report.md", "nstar_vs_parameters.png", "reliability_vs_n.png"):
        assert (out / name).is_file(), name
    assert "Allen-Zhu & Li" in (out / "report.md").read_text()


@pytest.mark.slow
def test_harm_at_nstar_is_the_share_of_untrained_known_facts_lost(searched):
    """Over every untrained fact, Unknown ones included, a negative-shift rate grows with n
    alone (each probe takes n Unknown facts, which cannot move down, out of the denominator);
    the capacity table compares variants at different n*, so it counts the facts the base knew."""
    out = searched["out"]
    for r in csv.DictReader((out / "capacity.csv").read_text().splitlines()):
        cell = out / "cells" / f"{r['chain']}__n={r['n_star']}"
        shift = json.loads(report_path(cell).read_text())["shift_untrained"]
        before = dict(zip(shift["categories"], shift["before"], strict=True))
        known = before["HighlyKnown"] + before["MaybeKnown"]
        assert known > 0
        assert float(r["shift_untrained_negative_rate_of_eligible"]) == pytest.approx(
            shift["negative"] / known)
        assert float(r["shift_untrained_negative_rate"]) == pytest.approx(
            shift["negative"] / shift["total"])
    assert "untrained known facts lost" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_rerun_continues_the_search_without_repeating_a_probe(searched):
    out = searched["out"]
    chain = "variant=r8__seed=42"
    state = {s["chain"]: s for s in json.loads((out / "capacity.json").read_text())}[chain]
    probes = [out / "cells" / f"{chain}__n={n}" for n in state["probes"]]
    newest = max(probes, key=lambda cell: (cell / "cell.yaml").stat().st_mtime_ns)
    last = int(newest.name.rsplit("=", 1)[1])
    shutil.rmtree(newest)  # as if the search was killed before its last probe ended
    before = {d.name: read_status(d) for d in (out / "cells").iterdir()}
    result = capacity_command(str(searched["file"]), output=str(out))
    assert result["rounds"] == 1
    after = {d.name: read_status(d) for d in (out / "cells").iterdir()}
    assert set(after) == set(before) | {f"{chain}__n={last}"}
    for name, status in before.items():
        assert after[name]["attempts"] == status["attempts"], name  # not run again
    again = {s["chain"]: s for s in json.loads((out / "capacity.json").read_text())}[chain]
    assert again["probes"].keys() == state["probes"].keys()


@pytest.mark.slow
def test_probes_trained_otherwise_are_refused_not_read_as_this_files_answer(searched):
    """min_steps is a search setting, yet it changes how a probe trains: a file that asks
    for more steps must not take the probes on disk as its own."""
    body = yaml.safe_load(searched["file"].read_text())
    body["search"]["min_steps"] = 40
    other = write(searched["file"].with_name("more_steps.yaml"), body)
    before = {d.name: read_status(d) for d in (searched["out"] / "cells").iterdir()}
    with pytest.raises(SweepFileError) as err:
        capacity_command(str(other), output=str(searched["out"]))
    assert "holds a run with other settings (trainer.max_epochs)" in str(err.value)
    after = {d.name: read_status(d) for d in (searched["out"] / "cells").iterdir()}
    assert after == before  # nothing ran


@pytest.mark.slow
def test_a_seed_added_to_a_finished_run_reuses_its_probes_with_extend(searched):
    out = searched["out"]
    body = yaml.safe_load(searched["file"].read_text())
    body["variants"] = {"r8": body["variants"]["r8"]}
    body["seeds"] = [42, 7]
    more = write(searched["file"].with_name("two_seeds.yaml"), body)
    with pytest.raises(SweepFileError, match="--extend true"):
        capacity_command(str(more), output=str(out))
    before = {d.name: read_status(d) for d in (out / "cells").iterdir()}
    capacity_command(str(more), output=str(out), extend=True)
    after = {d.name: read_status(d) for d in (out / "cells").iterdir()}
    for name, status in before.items():
        assert after[name]["attempts"] == status["attempts"], name  # not run again
    assert any(name.startswith("variant=r8__seed=7__") for name in set(after) - set(before))
    state = {s["chain"]: s for s in json.loads((out / "capacity.json").read_text())}
    assert set(state) == {"variant=r8__seed=42", "variant=r8__seed=7"}
    assert all(s["next"] is None and s["error"] is None for s in state.values())
    rows = list(csv.DictReader((out / "capacity.csv").read_text().splitlines()))
    assert sorted(r["seed"] for r in rows) == ["42", "7"]


@pytest.mark.slow
def test_a_search_on_the_slurm_launcher_runs_its_probes_as_submitit_tasks(small_world, tmp_path):
    """The SLURM path end to end, with submitit's local executor standing in for the cluster:
    every probe is a task of a job array, and the search ends on a bracket tested at both
    ends, as on the local launcher."""
    body = {
        "overrides": _small_world_probes(small_world),
        "variants": {"r8": {"model.rank": 8}},
        "search": {"threshold": 0.75, "n_start": 2, "n_max": 4, "growth": 2, "precision": 0.5},
        "launcher": "slurm",
        "slurm": {"cluster": "local", "timeout_min": 10, "max_running": 1},
    }
    result = capacity_command(str(write(tmp_path / "cap.yaml", body)), output=str(tmp_path / "out"))
    out = tmp_path / "out"
    state = json.loads((out / "capacity.json").read_text())[0]
    assert state["next"] is None and state["error"] is None, state
    assert result["rounds"] >= 1
    assert any((out / "slurm").iterdir()), "submitit keeps its task logs in <capacity>/slurm"
    rows = list(csv.DictReader((out / "capacity.csv").read_text().splitlines()))
    assert [r["variant"] for r in rows] == ["r8"]
    for n in (state["n_lo"], state["n_hi"]):
        if n:
            assert report_path(out / "cells" / f"variant=r8__seed=42__n={n}").is_file()
