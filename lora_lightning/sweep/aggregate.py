"""A sweep folder's cells into the paper's tables: `summary.csv` (one row per cell, the axes and
the headline numbers of its report), `report.md` (each measure by n x mix, mean and min-max
over seeds, the paper's values beside ours where it has them) and the plots (`plots.py`).

The roles of the axes come from the config keys they set: the axis setting `data.n_unknown` is
n (the rows, and the x of the plots), axes setting `seed_everything` or `data.seed` are
averaged over, and every other axis (the mix, or anything else swept) makes the columns.

Beside them, `provenance.json` (`write_provenance`): what the numbers depend on beyond the
settings, as the cells recorded it (library versions, CPU, thread counts, the world's, fact
file's and model's checksums) and the command and sweep file that made the folder.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lora_lightning.files import atomic_path, atomic_write_text, sha256_file
from lora_lightning.provenance import PROVENANCE_FILE, THREAD_KINDS, environment
from lora_lightning.sweep.cell import (
    CELL_CONFIG,
    CELL_INFO,
    DamagedReport,
    read_report,
    read_status,
    report_path,
)
from lora_lightning.sweep.folder import CELLS_DIR, RECORD, cell_dirs, read_record
from lora_lightning.sweep.grid import Grid
from lora_lightning.sweep.paper import PAPER_BASE, paper_value
from lora_lightning.sweep.spec import N_KEY, SEED_KEYS, axis_labels

__all__ = [
    "aggregate_sweep", "collect", "headline", "mcnemar_exact", "paired_comparisons",
    "trained_rows", "write_provenance",
]

# What a benchmark's table must say beside its numbers (docs/world.md, "How much a benchmark's
# base score depends on the build").
BENCHMARK_NOTES = {
    "world_truthful": " Its base score ranges 0.61-0.94 over three builds of the bench recipe "
    "(docs/world.md): a fragile by-product of pre-training, shown but not used for claims.",
}


def _get(d: Any, *keys: Any) -> Any:
    for key in keys:
        in_dict = isinstance(d, dict) and key in d
        in_list = isinstance(d, list) and isinstance(key, int) and -len(d) <= key < len(d)
        if in_dict or in_list:
            d = d[key]
        else:
            return None
    return d


_STATIC: tuple[tuple[str, tuple[Any, ...]], ...] = (
    ("reliability", ("reliability", "reliability")),
    ("reliability_n", ("reliability", "n_facts")),
    ("reliability_majority", ("reliability", "majority")),
    ("reliability_mean_prompt_accuracy", ("reliability", "mean_prompt_accuracy")),
    ("reliability_zeroshot", ("reliability_zeroshot", "reliability")),
    ("reliability_strict", ("reliability_strict", "reliability")),
    ("known_retained_strict", ("known_retained_strict", "reliability")),
    ("known_retained", ("known_retained", "reliability")),
    ("known_retained_n", ("known_retained", "n_facts")),
    ("shift_positive", ("shift", "positive")),
    ("shift_negative", ("shift", "negative")),
    ("shift_total", ("shift", "total")),
    ("shift_positive_rate", ("shift", "positive_rate")),
    ("shift_negative_rate", ("shift", "negative_rate")),
    ("shift_untrained_total", ("shift_untrained", "total")),
    ("shift_untrained_positive_rate", ("shift_untrained", "positive_rate")),
    ("shift_untrained_negative_rate", ("shift_untrained", "negative_rate")),
    ("shift_untrained_negative_rate_of_eligible", ("shift_untrained", "negative_rate_of_eligible")),
    ("unique_before", ("concentration", "before", "unique")),
    ("unique_after", ("concentration", "after", "unique")),
    ("top_answer_before", ("concentration", "before", "top", 0, 0)),
    ("top_count_before", ("concentration", "before", "max_count")),
    ("top_answer_after", ("concentration", "after", "top", 0, 0)),
    ("top_count_after", ("concentration", "after", "max_count")),
    ("refusal_rate_before", ("refusals", "before", "rate")),
    ("refusal_rate_after", ("refusals", "after", "rate")),
    ("refusal_rate_answerable_before", ("refusals_answerable", "before", "rate")),
    ("refusal_rate_answerable_after", ("refusals_answerable", "after", "rate")),
    ("correct_refusal_rate_before", ("refusals_unanswerable", "before", "rate")),
    ("correct_refusal_rate_after", ("refusals_unanswerable", "after", "rate")),
    ("confidence_before", ("confidence", "before")),
    ("confidence_after", ("confidence", "after")),
    ("world_checksum", ("environment", "world", "checksum")),
    ("cpu", ("environment", "cpu")),
    ("torch_version", ("environment", "libraries", "torch")),
    ("transformers_version", ("environment", "libraries", "transformers")),
)


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """A report's headline numbers as flat columns (None where it has no such measure)."""
    row = {name: _get(report, *path) for name, path in _STATIC}
    exploded = _get(report, "concentration", "after", "exploded")
    row["exploded_after"] = len(exploded) if isinstance(exploded, list) else None
    benchmarks = dict(report.get("benchmarks") or {})
    for task, result in sorted((benchmarks.pop("harness", None) or {}).items()):
        shown = result.get("after") or result.get("before") or {}
        for metric in (k for k in shown if k != "n" and not k.endswith("_stderr")):
            for when in ("before", "after"):
                value = _get(result, when, metric)
                if value is not None:
                    row[f"harness_{task}_{metric}_{when}"] = value
    for name, result in sorted(benchmarks.items()):
        for metric in ("accuracy", "mc1", "mc2"):
            for when in ("before", "after"):
                value = _get(result, when, metric)
                if value is not None:
                    row[f"{name}_{metric}_{when}"] = value
    editing = report.get("editing") or {}
    for name in ("generalization", "portability"):
        n = _get(editing, name, "after", "n_facts")
        if n:
            row[f"{name}_before"] = _get(editing, name, "before", "reliability")
            row[f"{name}_after"] = _get(editing, name, "after", "reliability")
            row[f"{name}_n"] = n
    if _get(editing, "portability", "ceiling", "rate") is not None:
        row["portability_ceiling"] = _get(editing, "portability", "ceiling", "rate")
    if _get(editing, "locality", "total"):
        row["locality"] = _get(editing, "locality", "agreement")
        row["locality_n"] = _get(editing, "locality", "total")
    return row


def _damaged(path: Path, reason: str) -> str:
    line = f"aggregate: {path}: {reason}; the cell runs again on the sweep's next run"
    print(line, file=sys.stderr, flush=True)
    return line


def collect(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str], dict[str, str]]:
    """Every cell of the folder as a row; the axis names; and each axis' role
    ("n", "seed" or "group").

    A cell file that cannot be read is named in one line on stderr and the cell is left out
    (its cell.json or cell.yaml) or counted as "damaged", to be run again (its report.json):
    never aggregated as empty numbers, never a traceback.
    """
    rows, axes, roles = [], [], {}
    for cell_dir in cell_dirs(Path(sweep_dir)):
        try:
            info = json.loads((cell_dir / CELL_INFO).read_text())
            config = yaml.safe_load((cell_dir / CELL_CONFIG).read_text()) or {}
            info["name"], info["axes"], info["labels"]  # noqa: B018 (every key is needed)
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as err:
            _damaged(cell_dir, f"unreadable {CELL_INFO} or {CELL_CONFIG} ({type(err).__name__})")
            continue
        status = read_status(cell_dir)
        for axis, setting in info["axes"].items():
            if axis not in roles:
                axes.append(axis)
                roles[axis] = ("n" if N_KEY in setting else
                               "seed" if any(k in setting for k in SEED_KEYS) else "group")
        try:
            report = read_report(cell_dir)
            damage = None
        except DamagedReport as err:
            report, damage = None, _damaged(report_path(cell_dir), str(err).split(": ", 1)[-1])
        data = config.get("data") or {}
        state = "done" if report is not None else status.get("state", "pending")
        row: dict[str, Any] = {
            "cell": info["name"],
            "state": "damaged" if damage else state,
            **info["labels"],
            "n_unknown": data.get("n_unknown"),
            "extra_kind": data.get("extra_kind"),
            "extra_per_unknown": data.get("extra_per_unknown"),
            "seed": config.get("seed_everything"),
        }
        if report is not None:
            row.update(headline(report))
        row.update({
            "fit_seconds": status.get("fit_seconds"), "test_seconds": status.get("test_seconds"),
            "attempts": status.get("attempts"),
            "error": damage or (status.get("error") if row["state"] != "done" else None),
        })
        rows.append(row)
    return rows, axes, roles


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _spread(stats: tuple[float, float, float, int] | None, digits: int = 3) -> str:
    if stats is None:
        return "–"
    mean, low, high, count = stats
    text = _fmt(float(mean), digits)
    if count > 1:
        text += f" ({_fmt(float(low), digits)}–{_fmt(float(high), digits)})"
    return text


def _table(
    grid: Grid, entry: Callable[[Any, str], str], note: str = ""
) -> list[str]:
    lines = ["| n \\ " + (" / ".join(grid.group_axes) or "cells") + " | "
             + " | ".join(grid.groups) + " |", "|---" * (len(grid.groups) + 1) + "|"]
    for n in grid.ns:
        entries = []
        for group in grid.groups:
            cells = grid.cells(n, group)
            if not cells:
                entries.append("")
            elif all(c["state"] != "done" for c in cells):
                entries.append(", ".join(sorted({c["state"] for c in cells})))
            else:
                entries.append(entry(n, group))
        lines.append(f"| {n} | " + " | ".join(entries) + " |")
    return lines + ([f"\n{note}"] if note else []) + [""]


def _paper(grid: Grid, use: bool, measure: str, n: Any, group: str) -> str:
    if not use:
        return ""
    cell = grid.cells(n, group)[0]
    value = paper_value(measure, n, cell["extra_kind"], cell["extra_per_unknown"])
    if value is None:
        return ""
    value = float(value)
    return f" [paper {int(value):,}]" if value.is_integer() and value > 1 else (
        f" [paper {_fmt(value)}]"
    )


def markdown(grid: Grid, record: dict[str, Any], sweep_dir: Path, plots: list[Path],
             paper: bool) -> str:
    """The sweep's report: one table per measure, n x group, mean (min–max) over seeds."""
    rows = grid.rows
    done = sum(r["state"] == "done" for r in rows)
    failed = [r for r in rows if r["state"] == "failed"]
    files = ", ".join(s["file"] for s in record.get("sweeps", [])) or "?"
    seeds = ", ".join(grid.seed_axes) or "none"
    lines = [
        f"# Sweep report: {sweep_dir.name}", "",
        f"Sweep file: {files}. Cells: {done} done, {len(failed)} failed, "
        f"{len(rows) - done - len(failed)} not finished, of {len(rows)}.",
        f"Rows: n Unknown facts trained; columns: {' / '.join(grid.group_axes) or 'all cells'}; "
        f"each entry the mean over the seed axis ({seeds}) with (min–max) when there are "
        "several seeds. One row per cell: summary.csv.",
    ]
    if paper:
        lines.append("[paper x]: Pletenev et al. 2025, Llama-3.1-8B-Instruct (docs/science.md), "
                     "where it reports the cell.")
    lines.append("")

    def simple(column: str, measure: str | None = None, digits: int = 3) -> Callable:
        return lambda n, g: _spread(grid.stats(n, g, column), digits) + (
            _paper(grid, paper, measure, n, g) if measure else "")

    lines += ["## Reliability (share of the trained Unknown facts answered)", ""]
    lines += _table(grid, simple("reliability", "reliability"))
    if grid.has("reliability_majority"):
        zeroshot = grid.has("reliability_zeroshot")
        lines += ["## Reliability, three figures: any of the prompts / a majority of them / "
                  "mean prompt accuracy" + (" / zero-shot" if zeroshot else ""), ""]
        lines += _table(grid, lambda n, g: " / ".join(
            simple(c)(n, g) for c in ("reliability", "reliability_majority",
                                      "reliability_mean_prompt_accuracy",
                                      *(("reliability_zeroshot",) if zeroshot else ()))),
            note="The first is the paper's (a fact counts when any few-shot prompt answers "
            "it); the majority counts facts right in more than half of the prompts. Zero-shot: "
            "each trained fact asked once, in the prompt it was trained on (one prompt, so its "
            "three figures coincide).")
    lines += ["## Knowledge shift (rates over all facts): positive / negative", ""]
    lines += _table(grid, lambda n, g: simple("shift_positive_rate", "shift_positive_rate")(n, g)
                    + " / " + simple("shift_negative_rate", "shift_negative_rate")(n, g))
    if grid.has("shift_untrained_negative_rate"):
        lines += ["## Knowledge shift on the facts training did not touch: positive / negative",
                  ""]
        lines += _table(grid, lambda n, g: simple("shift_untrained_positive_rate")(n, g)
                        + " / " + simple("shift_untrained_negative_rate")(n, g),
                        note="The previous table's rates count the trained facts too (the "
                        "paper's definition). These count every untrained fact, Unknown ones "
                        "included.")
    if grid.has("shift_untrained_negative_rate_of_eligible"):
        lines += ["## Untrained facts the base knew that training lost (HighlyKnown or "
                  "MaybeKnown before, a category lower after)", ""]
        lines += _table(grid, simple("shift_untrained_negative_rate_of_eligible"),
                        note="Claims of harm rest on this table. The previous one's denominator "
                        "also holds the untrained Unknown facts, which cannot move down, and "
                        "its mix of known and Unknown facts changes with n and the mix (a +HK "
                        "mix trains HighlyKnown facts, leaving fewer known facts untrained): "
                        "its rates differ between cells for that reason alone.")
    if grid.has("known_retained"):
        lines += ["## Held-out HighlyKnown facts still known (not Unknown after training)", ""]
        lines += _table(grid, simple("known_retained"))
    base_unique = _base(grid, "unique_before")
    lines += ["## Answer concentration after training: unique answers; top answer count", ""]
    lines += _table(grid, lambda n, g: simple("unique_after", "unique_after", 0)(n, g) + "; "
                    + simple("top_count_after", "top_count_after", 0)(n, g),
                    note=f"Base model: {_fmt(base_unique, 0)} unique answers, top answer "
                    f"{_fmt(_base(grid, 'top_count_before'), 0)} times"
                    + (f" (paper base: {PAPER_BASE['unique']} unique, top x"
                       f"{PAPER_BASE['top_count']})." if paper else "."))
    lines += ["## Refusal rate after training", ""]
    lines += _table(grid, simple("refusal_rate_after", "refusal_rate_after"),
                    note=f"Base model: {_fmt(_base(grid, 'refusal_rate_before'))}"
                    + (f" (paper base: {PAPER_BASE['refusal_rate']:.3f})." if paper else "."))
    if grid.has("refusal_rate_answerable_after") and grid.has("correct_refusal_rate_after"):
        lines += ["## Refusals apart: on answerable facts; correct ones on unanswerable facts",
                  ""]
        lines += _table(grid, lambda n, g: simple("refusal_rate_answerable_after")(n, g) + "; "
                        + simple("correct_refusal_rate_after")(n, g),
                        note="Base model: "
                        f"{_fmt(_base(grid, 'refusal_rate_answerable_before'))}; "
                        f"{_fmt(_base(grid, 'correct_refusal_rate_before'))}.")
    if grid.has("confidence_after"):
        pairs = [(r.get("confidence_before"), r.get("confidence_after")) for r in rows]
        pairs = [(b, a) for b, a in pairs if isinstance(b, float) and isinstance(a, float)]
        falls = sum(a < b for b, a in pairs)
        lines += ["## Confidence after training (mean token probability of the probe's answers)",
                  ""]
        lines += _table(grid, simple("confidence_after"),
                        note=f"Base model: {_fmt(_base(grid, 'confidence_before'))}. It falls "
                        f"in {falls} of {len(pairs)} cells"
                        + ("; the paper reports it rising after training." if paper else "."))
    bench = sorted({c.removesuffix("_after") for r in rows for c in r
                    if c.endswith(("_accuracy_after", "_mc1_after", "_mc2_after"))})
    if bench:
        lines += ["## Benchmarks before → after", ""]
        for name in bench:
            before = _base(grid, f"{name}_before")
            paper_base = PAPER_BASE.get(name) if paper else None
            lines += [f"### {name}", ""]
            lines += _table(
                grid, lambda n, g, name=name: _fmt(_mean(grid.values(n, g, f"{name}_before")))
                + " → " + simple(f"{name}_after", f"{name}_after")(n, g),
                note=f"Base model: {_fmt(before)}"
                + (f" (paper base: {paper_base})." if paper_base is not None else ".")
                + next((v for k, v in BENCHMARK_NOTES.items() if name.startswith(k)), ""))
    editing = [c for c in ("generalization", "portability") if grid.has(f"{c}_after")]
    if editing or grid.has("locality"):
        lines += ["## Knowledge-editing measures", ""]
        meaning = {
            "generalization": "trained Unknown facts asked with held-out question templates",
            "portability": "2-hop questions whose answer needs a trained fact",
        }
        for name in editing:
            lines += [f"### {name} ({meaning[name]}): before → after", ""]
            ceiling = name == "portability" and grid.has("portability_ceiling")
            lines += _table(grid, lambda n, g, name=name, ceiling=ceiling:
                            _fmt(_mean(grid.values(n, g, f"{name}_before")))
                            + " → " + simple(f"{name}_after")(n, g)
                            + (f" (ceiling {simple('portability_ceiling')(n, g)})"
                               if ceiling else ""),
                            note="Ceiling: the share of these questions whose second hop the "
                            "base knows (not Unknown); a 2-hop answer needs both hops."
                            if ceiling else "")
        if grid.has("locality"):
            lines += ["### locality (answers to other facts of the trained subjects unchanged)",
                      ""]
            lines += _table(grid, simple("locality"))
    lines += paired_comparisons(grid, sweep_dir)
    if failed:
        lines += ["## Failed cells", ""]
        lines += [f"- {r['cell']} ({r['attempts']} attempts): {r['error']}" for r in failed]
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: of the facts two cells disagree on, is the split
    between "learned only in A" and "learned only in B" plausible for a fair coin?"""
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2**m
    return min(1.0, 2 * tail)


def trained_rows(cell_dir: Path) -> list[dict[str, Any]] | None:
    """A tested cell's per-fact rows (`facts_after.jsonl`) of its trained Unknown facts, each
    with `learned`: any prompt right after training, as reliability counts. None when the
    cell has no such file."""
    path = report_path(cell_dir).parent / "facts_after.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    return [{**r, "learned": (r.get("p_greedy_after") or 0) > 0} for r in rows
            if r.get("role") == "trained unknown"]


def _learned(cell_dir: Path) -> dict[str, bool] | None:
    rows = trained_rows(cell_dir)
    return None if rows is None else {r["id"]: r["learned"] for r in rows}


def paired_comparisons(grid: Grid, sweep_dir: Path) -> list[str]:
    """Reliability of each mix against the first, cell by cell where both trained the same
    Unknown facts (same n and seed): an exact McNemar test on the facts learned in one and not
    the other. A difference of reliabilities is called significant only by this test."""
    if len(grid.groups) < 2:
        return []
    reference = grid.groups[0]
    table = []
    for n in grid.ns:
        for ref_row in [r for r in grid.cells(n, reference) if r["state"] == "done"]:
            ref = _learned(Path(sweep_dir) / CELLS_DIR / ref_row["cell"])
            if not ref:
                continue
            for group in grid.groups[1:]:
                for row in [r for r in grid.cells(n, group)
                            if r["state"] == "done" and r.get("seed") == ref_row.get("seed")]:
                    other = _learned(Path(sweep_dir) / CELLS_DIR / row["cell"])
                    if other is None or set(other) != set(ref):
                        continue
                    only_ref = sum(ref[i] and not other[i] for i in ref)
                    only_other = sum(other[i] and not ref[i] for i in ref)
                    p = mcnemar_exact(only_ref, only_other)
                    table.append(f"| {n} | {row.get('seed')} | {group} | {len(ref)} | "
                                 f"{only_ref} | {only_other} | {p:.3g}"
                                 f"{' *' if p < 0.05 else ''} |")
    if not table:
        return []
    return [f"## Paired comparisons of reliability against {reference} (exact McNemar test)", "",
            f"Cells of one n and seed train the same Unknown facts. For each pair: the facts "
            f"learned only with {reference}, and only with the other mix. p: two-sided exact "
            "McNemar; * marks p < 0.05, with no correction for the number of comparisons. "
            "A difference is called significant in our results only by this test.", "",
            f"| n | seed | mix | facts | only {reference} | only mix | p |",
            "|---|---|---|---|---|---|---|", *table, ""]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _base(grid: Grid, column: str) -> float | None:
    """A "before" measure of the base model: the same in every cell that measured it on the
    same facts; shown as the mean over cells."""
    return _mean([r[column] for r in grid.rows
                  if r["state"] == "done" and isinstance(r.get(column), (int, float))])


def write_summary(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    tail = ["fit_seconds", "test_seconds", "attempts", "error"]
    columns = [c for c in columns if c not in tail] + tail
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in columns})
    return path


def in_sweep_file_order(rows: list[dict[str, Any]], axes: list[str],
                        record: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows ordered by each axis' values as the sweep file(s) list them, so the report's
    columns read as the file does; a label no file lists goes after the listed ones."""
    order: dict[str, list[str]] = {}
    for sweep in record.get("sweeps", []):
        raw = sweep.get("raw") or {}
        for axis, labels in axis_labels(sweep.get("file", ""), raw.get("axes")).items():
            order.setdefault(axis, [])
            order[axis] += [label for label in labels if label not in order[axis]]

    known = [order.get(axis, []) for axis in axes]

    def key(row: dict[str, Any]) -> tuple[int, ...]:
        return tuple(labels.index(str(row.get(axis))) if str(row.get(axis)) in labels
                     else len(labels) for axis, labels in zip(axes, known, strict=True))

    return sorted(rows, key=key)


def _distinct(values: list[Any]) -> list[Any] | None:
    """The distinct values, sorted (None: none was recorded)."""
    found = {v for v in values if v is not None}
    try:
        return sorted(found) if found else None
    except TypeError:  # a field recorded as a number by some cells, as text by others
        return sorted(found, key=str)


def _count(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _weights_checksums(config: dict[str, Any], sweep_dir: Path) -> list[str]:
    """The base's weight checksums in the cell's shared "before" scores file (the key under
    which the cells' benchmark scores of the base were stored)."""
    named = (config.get("report") or {}).get("before_scores")
    if not isinstance(named, str):
        return []
    # a moved sweep folder holds the file under its own name, at the new place
    for path in (Path(named), sweep_dir / Path(named).name):
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(stored, dict):
            return [e["settings"]["weights"] for e in stored.values()
                    if isinstance(_get(e, "settings", "weights"), str)]
    return []


def _fit_environment(cell_dir: Path) -> dict[str, Any]:
    """A cell's `environment.json` (`KnowledgeReport._record_environment`), {} without one."""
    from lora_lightning.knowledge_report import ENVIRONMENT_FILE

    try:
        record = json.loads((report_path(cell_dir).parent / ENVIRONMENT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def folder_provenance(sweep_dir: str | Path, command: str = "sweep") -> dict[str, Any]:
    """The provenance record of a sweep (or capacity) folder, from what its cells recorded:
    each report.json's `environment`, status.json's thread count, cell.yaml's settings and the
    shared "before" scores file's weight checksum. A field no cell recorded is null and named,
    with the reason, in "missing". `command`: the subcommand that made the folder."""
    from lora_lightning.categorize import categorization_record
    from lora_lightning.sweep.shared import CATEGORIZED

    sweep_dir = Path(sweep_dir)
    # a folder `claim_folder` never made (tables written from cells alone) has no record
    record = read_record(sweep_dir) if (sweep_dir / RECORD).is_file() else {"sweeps": []}
    envs, configs, statuses, weights = [], [], [], []
    for cell_dir in cell_dirs(sweep_dir):
        try:
            configs.append(yaml.safe_load((cell_dir / CELL_CONFIG).read_text()) or {})
        except (OSError, yaml.YAMLError):
            configs.append({})  # `collect` names it on stderr
        statuses.append(read_status(cell_dir))
        try:
            report = read_report(cell_dir)
        except DamagedReport:
            report = None
        if report is not None and isinstance(report.get("environment"), dict):
            envs.append(report["environment"])
        else:  # a fit-only cell (a capacity probe): what `fit` recorded at its start
            fitted = _fit_environment(cell_dir)
            if isinstance(fitted.get("environment"), dict):
                envs.append(fitted["environment"])
            if isinstance(fitted.get("weights"), str):
                weights.append(fitted["weights"])
    missing: list[str] = []
    notes: list[str] = []

    files = []
    for i, sweep in enumerate(record.get("sweeps", [])):
        copy = sweep_dir / ("sweep.yaml" if i == 0 else f"sweep.{i}.yaml")
        digest = sha256_file(copy) if copy.is_file() else None
        if digest is None:
            missing.append(f"command_files: {copy.name}, the copy of {sweep.get('file')}, "
                           "is not in the folder")
        files.append({"path": str(sweep.get("file")), "sha256": digest})
    commands = [f"python -m lora_lightning {command} --config {s.get('file')}"
                + (" --extend true" if s.get("extends") else "")
                for s in record.get("sweeps", [])]

    versions: dict[str, set[str]] = {}
    for env in envs:
        for name, version in (env.get("libraries") or {}).items():
            versions.setdefault(name, set()).add("not installed" if version is None
                                                 else str(version))
    libraries = {name: sorted(found) for name, found in versions.items()}
    threads = {
        "torch": _distinct([_count(e.get("threads")) for e in envs]),
        "launcher": _distinct([_count(s.get("threads")) for s in statuses]),
        "config": _distinct([_count(_get(c, "model", "threads")) for c in configs]),
        "categorize": _distinct([_count((categorization_record(sweep_dir / CATEGORIZED)
                                         or {}).get("threads"))]),
    }
    why_threads = {
        "torch": "no cell's report.json or environment.json records an environment",
        "launcher": "no cell's status.json records the OMP_NUM_THREADS its launcher set",
        "config": "no cell's cell.yaml sets model.threads (chosen at run time: see "
                  "threads.torch)",
        "categorize": "the folder's categorised facts record no thread count (categorised "
                      "before `categorize` recorded it, or not in this folder)",
    }
    missing += [f"threads.{k}: {why_threads[k]}" for k in THREAD_KINDS if threads[k] is None]

    facts = _distinct([str(_get(c, "data", "facts")) for c in configs
                       if _get(c, "data", "facts") is not None])
    facts_sha = _distinct([sha256_file(f) for f in facts or [] if Path(f).is_file()])
    if facts_sha is not None:
        notes.append("facts_sha256: of the fact file(s) at the path the cells name, when "
                     "aggregated (the cells record the path, not the checksum)")
    out: dict[str, Any] = {
        "source": "cells",
        "cells": len(configs),
        "commands": commands or None,
        "command_files": files or None,
        "libraries": libraries or None,
        "python": _distinct([e.get("python") for e in envs]),
        "cpu": _distinct([e.get("cpu") for e in envs]),
        "cpu_capability": _distinct([e.get("cpu_capability") for e in envs]),
        "threads": threads,
        "numeric_variables": _distinct([f"{k}={v}" for e in envs
                                        for k, v in (e.get("variables") or {}).items()]),
        "world_checksum": _distinct([_get(e, "world", "checksum") for e in envs]),
        "facts": facts,
        "facts_sha256": facts_sha,
        "model": _distinct([str(_get(c, "model", "model_name_or_path")) for c in configs
                            if _get(c, "model", "model_name_or_path") is not None]),
        "model_checksum": _distinct([w for c in configs
                                     for w in _weights_checksums(c, sweep_dir)] + weights),
        "aggregated_on": environment(),
        "missing": missing,
        "notes": notes,
    }
    no_env = "no cell's report.json or environment.json records an environment"
    no_file = f"the folder's {RECORD} is absent or lists no sweep file"
    why = {
        "commands": no_file, "command_files": no_file,
        "libraries": no_env, "python": no_env, "cpu": no_env, "cpu_capability": no_env,
        "numeric_variables": no_env if not envs else "no cell's report.json records a "
        "variable that changes CPU numerics (none was set)",
        "world_checksum": no_env if not envs else "no cell's report.json records a world "
        "checksum (not run on a built world: see facts_sha256)",
        "facts": "no cell's cell.yaml names data.facts",
        "facts_sha256": "no fact file the cells name is there to checksum",
        "model": "no cell's cell.yaml names model.model_name_or_path",
        "model_checksum": "no cell recorded the base's weight checksum (`fit` writes it to "
        "environment.json, `test` keeps it with the shared benchmark scores of the base)",
    }
    out["missing"] += [f"{key}: {reason}" for key, reason in why.items() if out[key] is None]
    return out


def write_provenance(sweep_dir: str | Path, command: str = "sweep") -> Path:
    """Write `provenance.json` (`folder_provenance`) into the folder; return its path."""
    path = Path(sweep_dir) / PROVENANCE_FILE
    atomic_write_text(path, json.dumps(folder_provenance(sweep_dir, command), indent=1,
                                       ensure_ascii=False) + "\n")
    return path


def aggregate_sweep(sweep_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write summary.csv, report.md, the plots and provenance.json of a sweep folder; return
    their paths."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / RECORD).is_file():
        raise FileNotFoundError(f"aggregate: {sweep_dir} is not a sweep folder (no {RECORD})")
    record = read_record(sweep_dir)
    paper = any((s.get("raw") or {}).get("paper_values") for s in record.get("sweeps", []))
    rows, axes, roles = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"aggregate: {sweep_dir} has no cells yet")
    rows = in_sweep_file_order(rows, axes, record)
    grid = Grid(rows, axes, roles)
    out = {"summary": write_summary(rows, sweep_dir / "summary.csv")}
    images: list[Path] = []
    if plots and len(grid.ns) > 0 and any(r["state"] == "done" for r in rows):
        from lora_lightning.sweep.plots import plot_all

        images = plot_all(grid, sweep_dir, paper)
        out.update({p.stem: p for p in images})
    report = sweep_dir / "report.md"
    atomic_write_text(report, markdown(grid, record, sweep_dir, images, paper))
    out["report"] = report
    out["provenance"] = write_provenance(sweep_dir)
    return out
