"""The report: every measured number as JSON, a Markdown summary and a reliability plot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lora_lightning.files import atomic_write_text


def to_python(value: Any) -> Any:
    """Tensors and tuples to plain JSON-able Python, recursively."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _get(d: dict | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


# the lost facts' moves: a category lower, as `metrics.NEGATIVE_SHIFTS` (WeaklyKnown is in no
# named shift, as in the paper), so the count is the shift table's `negative_rate_of_eligible`
_LOST = {"HighlyKnown": ("MaybeKnown", "Unknown"), "MaybeKnown": ("Unknown",)}
_UNTRAINED_ROLES = ("untrained", "held-out known")


def untrained_known_lost(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The facts training did not touch that the base knew (HighlyKnown or MaybeKnown before)
    and that moved a category lower, from the per-fact rows (`knowledge_report.fact_row`):
    per category before (`n`, `lost`, `rate` and the count per category after) and over both.
    Claims of harm rest on this count: over every untrained fact, Unknown ones included, the
    rate would change with the mix alone (Unknown facts cannot move down). The sweep's table of
    the same name reads the same count off the untrained facts' shift table."""
    untrained = [r for r in rows if r.get("role") in _UNTRAINED_ROLES]
    out: dict[str, Any] = {"by_category": {}}
    for before, lower in _LOST.items():
        mine = [r for r in untrained if r.get("category_before") == before]
        to = {after: sum(r.get("category_after") == after for r in mine) for after in lower}
        lost = sum(to.values())
        out["by_category"][before] = {"n": len(mine), "lost": lost, "to": to,
                                      "rate": lost / len(mine) if mine else None}
    n = sum(c["n"] for c in out["by_category"].values())
    lost = sum(c["lost"] for c in out["by_category"].values())
    out.update(n=n, lost=lost, rate=lost / n if n else None)
    return out


def _reliability_lines(results: dict[str, Any]) -> list[str]:
    """Reliability as three figures side by side under the few-shot probe, and once under the
    zero-shot probe (the training prompt), where its three figures coincide."""
    rel = results.get("reliability") or {}
    k = rel.get("prompts")
    k_text = f"{k:g}" if isinstance(k, (int, float)) else "k"
    lines = [
        f"| reliability (trained Unknown facts, n={_fmt(rel.get('n_facts'))}), few-shot probe: "
        f"right in any of the {k_text} prompts (the paper's) | 0 (Unknown by definition) | "
        f"{_fmt(rel.get('reliability'))} |",
        f"| reliability, few-shot probe: right in a majority (more than half) of the {k_text} "
        f"prompts | 0 | {_fmt(rel.get('majority'))} |",
        f"| reliability, few-shot probe: mean prompt accuracy | 0 | "
        f"{_fmt(rel.get('mean_prompt_accuracy'))} |",
    ]
    zero = results.get("reliability_zeroshot")
    if zero:
        lines.append(
            f"| reliability, zero-shot probe (each trained fact once, in the prompt it was "
            f"trained on; one prompt, so any, majority and mean coincide; "
            f"n={_fmt(zero.get('n_facts'))}) | - | {_fmt(zero.get('reliability'))} |")
    return lines


def _lost_lines(lost: dict[str, Any] | None) -> list[str]:
    if not lost or not lost.get("n"):
        return []
    lines = ["", "## Untrained facts the base knew that training lost", "",
             "Facts training did not touch, HighlyKnown or MaybeKnown before and a category "
             "lower after (claims of harm rest on this table: over every untrained fact, Unknown "
             "ones included, the rate would change with the mix alone).", "",
             "| before | facts | lost | of which to | rate |", "| --- | --- | --- | --- | --- |"]
    for before, entry in lost["by_category"].items():
        to = ", ".join(f"{after} {count}" for after, count in entry["to"].items())
        lines.append(f"| {before} | {entry['n']} | {entry['lost']} | {to} | "
                     f"{_fmt(entry['rate'])} |")
    lines.append(f"| HighlyKnown or MaybeKnown | {lost['n']} | {lost['lost']} | - | "
                 f"{_fmt(lost['rate'])} |")
    return lines


def markdown(results: dict[str, Any]) -> str:
    """A one-page summary: each measure before vs after, the shift table, top answers."""
    results = to_python(results)  # metrics' tensors too, as `compute()` gives them
    lines = ["# lora-lightning report", ""]
    if results.get("mix"):
        lines += ["Training mix: " + ", ".join(f"{k}={v}" for k, v in results["mix"].items()), ""]
    if results.get("match"):
        rule = ("whole words (`match: word`)" if results["match"] == "word" else
                "the paper's: an alias anywhere in the answer (`match: substring`)")
        lines += [f"Answers judged right by {rule}; reliability, retention and the categories "
                  "behind the shifts all follow it.", ""]
    ret = results.get("known_retained") or {}
    lines += [
        "| measure | before | after |",
        "| --- | --- | --- |",
        *_reliability_lines(results),
        f"| held-out HighlyKnown retained (n={_fmt(ret.get('n_facts'))}) | 1 (HighlyKnown by "
        f"definition) | {_fmt(ret.get('reliability'))} |",
    ]
    for key, label in (("reliability_strict", "reliability, whole-word matches only"),
                       ("known_retained_strict", "held-out HighlyKnown retained, whole words")):
        if results.get(key):
            lines.append(f"| {label} | - | {_fmt(results[key].get('reliability'))} |")
    conc = results.get("concentration") or {}
    for key, label in (
        ("unique", "unique greedy answers"),
        ("mean_repeats", "mean repeats per answer"),
        ("var_repeats", "variance of repeats"),
        ("max_count", "most frequent answer count"),
    ):
        lines.append(
            f"| {label} | {_fmt(_get(conc, 'before', key))} | {_fmt(_get(conc, 'after', key))} |"
        )
    ref = results.get("refusals") or {}
    before, after = _get(ref, "before", "rate"), _get(ref, "after", "rate")
    lines.append(f"| refusal rate (all probe answers, the paper's) | {_fmt(before)} | "
                 f"{_fmt(after)} |")
    for key, label in (("refusals_answerable", "refusal rate on answerable facts"),
                       ("refusals_unanswerable",
                        "correct refusals (facts whose answer is a refusal)")):
        part = results.get(key) or {}
        if _get(part, "after", "total"):
            lines.append(f"| {label} (n={_fmt(_get(part, 'after', 'total'))} answers) | "
                         f"{_fmt(_get(part, 'before', 'rate'))} | "
                         f"{_fmt(_get(part, 'after', 'rate'))} |")
    conf = results.get("confidence") or {}
    lines.append(f"| confidence | {_fmt(conf.get('before'))} | {_fmt(conf.get('after'))} |")
    bench = results.get("benchmarks") or {}
    for key, label in (("mmlu", "MMLU accuracy"),
                       ("world_mc", "world-MC accuracy (held-out known facts)")):
        if key in bench:
            lines.append(
                f"| {label} (n={_fmt(_get(bench, key, 'after', 'n'))}) | "
                f"{_fmt(_get(bench, key, 'before', 'accuracy'))} | "
                f"{_fmt(_get(bench, key, 'after', 'accuracy'))} |"
            )
    for key, label in (("truthfulqa", "TruthfulQA"), ("world_truthful", "world-truthful")):
        for measure in ("mc1", "mc2") if key in bench else ():
            lines.append(
                f"| {label} {measure.upper()} | {_fmt(_get(bench, key, 'before', measure))} | "
                f"{_fmt(_get(bench, key, 'after', measure))} |"
            )
    for task, result in sorted((bench.get("harness") or {}).items()):
        shown = result.get("after") or result.get("before") or {}
        for metric in (k for k in shown if k != "n" and not k.endswith("_stderr")):
            lines.append(
                f"| harness {task} {metric} (n={_fmt(shown.get('n'))}) | "
                f"{_fmt(_get(result, 'before', metric))} | {_fmt(_get(result, 'after', metric))} |"
            )
    editing = results.get("editing") or {}
    for key, label in (
        ("generalization", "generalisation (trained facts, held-out templates)"),
        ("portability", "portability (2-hop questions through a trained fact)"),
    ):
        n = _get(editing, key, "after", "n_facts")
        if n:
            ceiling = _get(editing, key, "ceiling", "rate")
            if ceiling is not None:
                label += f"; ceiling {_fmt(ceiling)}: second hop known to the base"
            lines.append(
                f"| {label}, n={n} | {_fmt(_get(editing, key, 'before', 'reliability'))} | "
                f"{_fmt(_get(editing, key, 'after', 'reliability'))} |"
            )
    total = _get(editing, "locality", "total")
    if total:
        lines.append(
            f"| locality (answers to other facts of the trained subjects unchanged, "
            f"n={total} answers) | 1 (by definition) | "
            f"{_fmt(_get(editing, 'locality', 'agreement'))} |"
        )
    shift = results.get("shift")
    if shift:
        cats = shift["categories"]
        lines += ["", "## Knowledge shift (rows: before, columns: after)", ""]
        lines += ["| before \\ after | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
        for cat, row in zip(cats, shift["counts"], strict=True):
            lines.append(f"| {cat} | " + " | ".join(str(v) for v in row) + " |")
        lines += [
            "",
            f"Positive shifts (UK->MK, UK->HK, MK->HK): {shift['positive']} of "
            f"{shift['total']} facts ({_fmt(shift['positive_rate'])}); negative shifts (HK->MK, "
            f"HK->UK, MK->UK): {shift['negative']} ({_fmt(shift['negative_rate'])}).",
        ]
        for key in ("UK->MK", "UK->HK", "MK->HK", "HK->MK", "HK->UK", "MK->UK"):
            s = shift.get(key)
            if s:
                lines.append(
                    f"- {key}: {s['count']} of {s['denominator']} ({_fmt(s['rate'])} of the "
                    "source category)"
                )
        untrained = results.get("shift_untrained")
        if untrained and untrained.get("total"):
            lines += [
                "",
                f"On the {untrained['total']} facts training did not touch (the trained "
                f"Unknown facts and extras left out; claims of harm rest on these): positive "
                f"{untrained['positive']} ({_fmt(untrained['positive_rate'])}), negative "
                f"{untrained['negative']} ({_fmt(untrained['negative_rate'])}).",
            ]
    lines += _lost_lines(results.get("untrained_known_lost"))
    by_relation = results.get("by_relation") or {}
    if by_relation:
        lines += ["", "## By relation", "",
                  "| relation | reliability (n) | held-out known retained (n) | reliability, "
                  "majority of prompts | reliability, zero-shot |",
                  "| --- | --- | --- | --- | --- |"]
        for relation, entry in by_relation.items():
            lines.append(f"| {relation} | {_fmt(entry.get('reliability'))} "
                         f"({entry.get('reliability_n')}) | {_fmt(entry.get('known_retained'))} "
                         f"({entry.get('known_retained_n')}) | "
                         f"{_fmt(entry.get('reliability_majority'))} | "
                         f"{_fmt(entry.get('reliability_zeroshot'))} |")
    for when in ("before", "after"):
        top = _get(conc, when, "top")
        if top:
            lines += ["", f"Top answers {when}: " + ", ".join(f"{a!r} x{n}" for a, n in top[:5])]
    exploded = _get(conc, "after", "exploded")
    if exploded:
        threshold = _get(conc, "after", "threshold")
        rule = "" if threshold is None else (
            f" (not refusals, more than {_fmt(threshold, 0)} times: the explosion factor times "
            "the base's most frequent answer that is not a refusal)")
        lines.append(f"Exploded answers after{rule}: "
                     + ", ".join(f"{a!r} x{n}" for a, n in exploded))
    return "\n".join(lines) + "\n"


# Not logged as the report's numbers: the per-epoch history (logged as val/* while fitting),
# the training mix (settings, not measures), MMLU's per-subject breakdown and the environment
# (library versions, CPU, world checksum), all in report.json.
_NOT_LOGGED = frozenset({"history", "mix", "subjects", "environment"})


def _metric_name(parts: list[str]) -> str:
    """A name every logger accepts: MLflow allows only letters, digits and `_-./ `, so the
    shift's "UK->MK" becomes "UK_to_MK" and anything else odd an underscore."""
    name = "/".join(parts).replace("->", "_to_")
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def report_metrics(results: dict[str, Any], prefix: str = "report") -> dict[str, float]:
    """The report's numbers as flat `{"report/benchmarks/mmlu/after/accuracy": 0.25, ...}`, for
    loggers (TensorBoard, MLflow, W&B, CSV), which take named scalars: every number in the
    report except lists (top answers, the shift's count matrix) and the parts in _NOT_LOGGED.
    """
    flat: dict[str, float] = {}

    def walk(value: Any, parts: list[str]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if str(key) not in _NOT_LOGGED:
                    walk(item, [*parts, str(key)])
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[_metric_name(parts)] = float(value)

    walk(to_python(results), [prefix])
    return flat


def plot_history(history: list[dict[str, float]], path: Path) -> Path | None:
    """Reliability and known-fact retention over epochs (the paper's Figure 1 shape)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] + 1 for h in history]
    for key, label in (
        ("reliability", "reliability (trained Unknown), any few-shot prompt"),
        ("reliability_majority", "reliability, majority of few-shot prompts"),
        ("reliability_zeroshot", "reliability, zero-shot (the training prompt)"),
        ("known_retained", "held-out HighlyKnown retained"),
    ):
        if any(key in h for h in history):
            ax.plot(epochs, [h.get(key) for h in history], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("share of facts")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write report.json, report.md and (with a history) reliability.png; return the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = to_python(results)
    # report.md and the plot first: report.json, whole, is what marks the measurement done
    atomic_write_text(out / "report.md", markdown(results))
    plot_history(results.get("history") or [], out / "reliability.png")
    atomic_write_text(out / "report.json", json.dumps(results, indent=2))
    return out
