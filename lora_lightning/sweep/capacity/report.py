r"""A capacity folder into its answer: `capacity.csv` (one row per chain), `report.md` and plots.

Bits per fact: a fact of relation R carries H(R) bits, the entropy of the answers R takes in
the fact set (-sum p log2 p over its distinct answers, p their shares): what it takes on
average to name a fact's answer among those its relation gives, frequent answers cheaper. It
is at most log2(K) for K distinct answers, the figure used before (also in capacity.csv,
`bits_per_parameter_log2k`), and equal to it only when every answer is equally common; on
real relations (most cities in a few countries) it is lower. The bits an adapter holds at n\*
are the sum over the trained facts it learned (the probe's per-fact verdicts,
`probe_facts.jsonl`, or `test`'s per-fact rows). Bits per LoRA parameter divide that by the
adapter's trainable parameters, counted from its saved tensors. Allen-Zhu & Li (2024, "Physics
of Language Models: Part 3.3") measure about 2 bits per parameter for fully trained language
models; it is printed beside ours, never fitted to.
"""

from __future__ import annotations

import ast
import csv
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from lora_lightning.files import atomic_path, atomic_write_text
from lora_lightning.sweep.aggregate import headline, trained_rows, write_provenance
from lora_lightning.sweep.capacity.search import (
    PROBES,
    Capacity,
    other_bracket,
    probe_cell,
    search_state,
    trained_epochs,
    wilson_interval,
)
from lora_lightning.sweep.cell import read_report
from lora_lightning.sweep.folder import cell_dir
from lora_lightning.sweep.plots import legend

__all__ = ["PUBLISHED_BITS_PER_PARAMETER", "capacity_markdown", "capacity_rows", "censored",
           "read_capacity_csv", "refresh_capacity_report", "slopes", "target_family",
           "write_capacity_report"]

PUBLISHED_BITS_PER_PARAMETER = 2.0  # Allen-Zhu & Li 2024, fully trained LMs
# two-sided 95% Student t quantiles by degrees of freedom (for the slope's interval)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t95(df: int) -> float:
    usable = [d for d in _T95 if d <= df]
    return _T95[max(usable)] if usable else float("inf")


def adapter_parameters(cell_dir: Path) -> int | None:
    """Trainable LoRA parameters of the adapter a probe saved (its tensors' sizes)."""
    path = Path(cell_dir) / "adapter" / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            total += math.prod(f.get_slice(key).get_shape())
    return total


def _answer_counts(facts_path: str | Path) -> dict[str | None, Counter[str]]:
    """How often each answer occurs among each relation's facts in the fact file."""
    from lora_lightning.facts import load_facts

    answers: dict[str | None, Counter[str]] = {}
    for fact in load_facts(facts_path):
        answers.setdefault(fact.relation, Counter())[fact.normalized_answers[0]] += 1
    return answers


def _bits(answers: dict[str | None, Counter[str]], entropy: bool) -> dict[str | None, float]:
    if not entropy:
        return {r: math.log2(len(a)) if len(a) > 1 else 0.0 for r, a in answers.items()}
    out = {}
    for relation, counts in answers.items():
        total = sum(counts.values())
        out[relation] = -sum(c / total * math.log2(c / total) for c in counts.values()) + 0.0
    return out


def relation_bits(facts_path: str | Path | None, entropy: bool = True
                  ) -> dict[str | None, float]:
    """Bits per fact of each relation in the fact file: the entropy of its answers (`entropy`,
    the default) or log2 of how many distinct answers it takes."""
    return _bits(_answer_counts(facts_path), entropy) if facts_path else {}


def probe_verdicts(cell_dir: Path, probe: str) -> list[dict[str, Any]] | None:
    """A probe's per-fact verdicts on its trained facts under `probe` (`probe_facts.jsonl`,
    written by `fit`'s last probe), each row with `learned`; None when the file is missing."""
    path = Path(cell_dir) / "probe_facts.jsonl"
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not rows or probe not in rows[0]:
        return None
    return [{**r, "learned": bool(r[probe])} for r in rows]


def learned_facts(cell_dir: Path, probe: str | None = None) -> list[dict[str, Any]] | None:
    """The trained facts a probe learned: from its own verdicts under `probe` where `fit` wrote
    them, else from a tested probe's per-fact rows (the few-shot rule); None without either."""
    rows = probe_verdicts(cell_dir, probe) if probe else None
    if rows is None and probe in (None, "fewshot"):
        rows = trained_rows(cell_dir)
    return None if rows is None else [r for r in rows if r["learned"]]


def _sum_bits(learned: list[dict[str, Any]], bits: dict[str | None, float]) -> float:
    fallback = max(bits.values(), default=0.0) if len(bits) == 1 else 0.0
    return sum(bits.get(r.get("relation"), fallback) for r in learned)


def learned_bits(cell_dir: Path, bits: dict[str | None, float],
                 probe: str | None = None) -> tuple[int, float] | None:
    """(facts learned, their bits) of a probe (`learned_facts`)."""
    learned = learned_facts(cell_dir, probe)
    return None if learned is None else (len(learned), _sum_bits(learned, bits))


def capacity_rows(capacity: Capacity, facts_path: str | Path | None) -> list[dict[str, Any]]:
    """One row per chain: its bracket with intervals, parameters, harm at n*, bits."""
    answers = _answer_counts(facts_path) if facts_path else {}
    bits, bits_log2k = _bits(answers, entropy=True), _bits(answers, entropy=False)
    rows = []
    for chain in capacity.chains():
        state = search_state(capacity, chain)
        n_lo, n_hi, probes = state.n_lo, state.n_hi, state.probes
        row: dict[str, Any] = {"chain": chain.name, **chain.labels,
                               "rank": chain.settings.get("model.rank"),
                               "target_modules": chain.settings.get("model.target_modules"),
                               "probes": len(probes), "error": state.error,
                               "n_star": n_lo, "n_hi": n_hi, "searching": state.next_n,
                               "probe": capacity.probe}
        for probe in PROBES:  # the searched probe's equals n_star, n_hi
            bracket = other_bracket(capacity, state, probe)
            row[f"n_star_{probe}"], row[f"n_hi_{probe}"] = bracket or (None, None)
        for end, n in (("n_star", n_lo), ("n_hi", n_hi)):
            row[f"epochs_at_{end}"] = (trained_epochs(probes[n].cell_dir)
                                       if n and n in probes else None)
        for end, n in (("lo", n_lo), ("hi", n_hi)):
            probe = probes.get(n) if n else None
            if probe is None or probe.reliability is None:
                continue
            low, high = wilson_interval(probe.learned, n, capacity.confidence)
            row[f"reliability_{end}"] = probe.reliability
            row[f"reliability_{end}_ci"] = f"[{low:.3f}, {high:.3f}]"
            row[f"noisy_{end}"] = low < capacity.rule.threshold <= high
        any_probe = next((p.cell_dir for p in probes.values()), None)
        params = adapter_parameters(any_probe) if any_probe is not None else None
        row["lora_parameters"] = params
        lo_dir = cell_dir(capacity.sweep, probe_cell(chain, n_lo)) if n_lo else None
        report = None
        if lo_dir is not None:
            try:
                report = read_report(lo_dir)
            except ValueError:
                report = None
        if report:
            shown = headline(report)
            for key, value in shown.items():
                if key.endswith(("_before", "_after")) and ("accuracy" in key or "mc" in key):
                    row[key] = value
            for key in ("known_retained", "shift_untrained_negative_rate_of_eligible",
                        "shift_untrained_negative_rate", "locality"):
                row[key] = shown.get(key)
        learned = learned_facts(lo_dir, capacity.probe) if lo_dir is not None else None
        if learned is not None and params:
            row["facts_learned"], row["bits"] = len(learned), _sum_bits(learned, bits)
            row["facts_per_1k_parameters"] = 1000 * len(learned) / params
            row["bits_per_parameter"] = row["bits"] / params
            row["bits_per_parameter_log2k"] = _sum_bits(learned, bits_log2k) / params
        for probe in PROBES:  # bits under each probe, at its own n*
            n = row.get(f"n_star_{probe}")
            at = (learned if probe == capacity.probe and n == n_lo else
                  learned_facts(cell_dir(capacity.sweep, probe_cell(chain, n)), probe)
                  if n and n in probes else None)
            row[f"bits_per_parameter_{probe}"] = (_sum_bits(at, bits) / params
                                                 if at is not None and params else None)
        rows.append(row)
    return rows


def target_family(value: Any) -> str:
    """The target-module family a row's adapter belongs to, one spelling per family.

    In memory `target_modules` is a list or "all-linear"; capacity.csv holds the list's repr
    ("['gate_proj', 'up_proj', 'down_proj']"); a variant that leaves it unset (empty) gets the
    model's default, named as such rather than guessed.
    """
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            return value.strip()
    if isinstance(value, (list, tuple)):
        return "/".join(str(v) for v in value) or "default target modules"
    if value is None or str(value).strip() == "":
        return "default target modules"
    return str(value).strip()


def censored(row: dict[str, Any]) -> bool:
    """Whether the row's n* is only a lower bound: its search ran out of facts (n_max) with
    every probe passing, so no failing n (n_hi) exists. Such a row holds at least n* facts."""
    return (bool(row.get("n_star")) and row.get("n_hi") in (None, "")
            and row.get("searching") in (None, "") and not row.get("error"))


MIN_SLOPE_VARIANTS = 3  # two points always lie on a line: no residual, no interval


def slopes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target-module family, the least-squares slope of log10 n* on log10 parameters,
    fitted over variants with its 95% t interval (variants - 2 degrees of freedom).

    A variant's point is the mean over its seeds of log10 n*: seeds share the fact file and
    mostly end on the same bracket, so chains are not independent draws and counting each
    would narrow the interval. Families are fitted apart, since where the parameters go moves
    n* at equal parameters. Censored rows (`censored`) take no part. A family with fewer than
    `MIN_SLOPE_VARIANTS` usable variants gets no slope, with the reason.
    """
    families: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:  # and per training mode, where the file has modes
        family = target_family(r.get("target_modules")) + (
            f", {r['mode']}" if r.get("mode") not in (None, "") else "")
        families.setdefault(family, {}).setdefault(str(r.get("variant")), []).append(r)
    fits = []
    for family, variants in families.items():
        points, chains = [], 0
        left_out = [str(r.get("chain") or f"{r.get('variant')}/{r.get('seed')}")
                    for rs in variants.values() for r in rs if censored(r)]
        for seeds in variants.values():
            usable = [r for r in seeds if r.get("lora_parameters") and r.get("n_star")
                      and not censored(r)]
            if usable:
                chains += len(usable)
                points.append((
                    sum(math.log10(r["lora_parameters"]) for r in usable) / len(usable),
                    sum(math.log10(r["n_star"]) for r in usable) / len(usable)))
        fit: dict[str, Any] = {"family": family, "variants": len(points), "chains": chains,
                               "left_out": left_out, "slope": None}
        fits.append(fit)
        if len(points) < MIN_SLOPE_VARIANTS or len({x for x, _ in points}) < 2:
            fit["reason"] = (f"{len(points)} variant{'' if len(points) == 1 else 's'} with a "
                             f"measured n\\*, {MIN_SLOPE_VARIANTS} needed")
            continue
        m = len(points)
        mx, my = sum(x for x, _ in points) / m, sum(y for _, y in points) / m
        sxx = sum((x - mx) ** 2 for x, _ in points)
        b = sum((x - mx) * (y - my) for x, y in points) / sxx
        a = my - b * mx
        resid = sum((y - a - b * x) ** 2 for x, y in points) / (m - 2)
        half = _t95(m - 2) * math.sqrt(resid / sxx)
        fit.update(slope=b, intercept=a, interval=(b - half, b + half))
    return fits


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 and value else f"{value:.{digits}f}"
    return str(value)


def _reliability(row: dict[str, Any], end: str) -> str:
    value = row.get(f"reliability_{end}")
    if value is None:
        return "-"
    return (f"{value:.3f} {row[f'reliability_{end}_ci']}"
            + (" noisy" if row.get(f"noisy_{end}") else ""))


_PROBE_TEXT = {
    "fewshot": "the few-shot probe: a trained Unknown fact counts when any of its few-shot "
    "prompts answers it (SliCK, the paper's)",
    "zeroshot": "the zero-shot probe: each trained Unknown fact asked once, in the prompt it "
    "was trained on",
}


def _other(probe: str) -> str:
    return next(p for p in PROBES if p != probe)


def _header(capacity: Capacity) -> list[str]:
    rule = capacity.rule
    other = _other(capacity.probe)
    return [
        "# Capacity: how many new facts each adapter holds", "",
        f"Capacity file `{capacity.sweep.path.name}`; n\\* = the largest n whose reliability "
        f"is >= {rule.threshold:g}, under {_PROBE_TEXT[capacity.probe]} (`search.probe: "
        f"{capacity.probe}`)."
        f" Search: n from {rule.n_start}, x{rule.growth:g}, then bisection to "
        f"{rule.precision:.0%}; [n\\*, n_hi] is the bracket it ended on. Intervals: Wilson, "
        f"{capacity.confidence:.0%}; \"noisy\" marks an end whose interval holds the threshold.",
        "",
        f"The search followed the {capacity.probe} probe alone. Every probe's `fit` also "
        f"measured reliability under {_PROBE_TEXT[other]}, so *n\\* under the {other} probe* "
        "is read off the same probes: the largest n that passed under it below the smallest that "
        "failed. It is a bracket only where the chain's probes happen to bracket it (they were "
        "placed for the other probe), and \"≥ n\" where every probe passed under it.",
        "",
        "Harm at n\\*: *known retained* is the share of the held-out HighlyKnown facts still "
        "known; *untrained known facts lost* is the share of the facts training did not touch "
        "and the base knew (HighlyKnown or MaybeKnown) that moved down a category. (Over every "
        "untrained fact, Unknown ones included, as `shift_untrained_negative_rate` in "
        "capacity.csv, the rate would grow with n alone: each probe trains n of the Unknown "
        "facts, which cannot move down, out of the denominator.)",
        "",
    ]


def _bound(row: dict[str, Any], text: str) -> str:
    return f"≥ {text}" if censored(row) and text != "-" else text


def other_nstar(row: dict[str, Any]) -> str:
    """n* under the probe the search did not follow, from the row's `n_star_<probe>` and
    `n_hi_<probe>`: "lo–hi" where the probes bracket it, "≥ lo" where every probe passed under
    it, "< hi" where none did, "-" where no probe measured it (a table from before)."""
    other = _other(str(row.get("probe") or "fewshot"))
    lo, hi = row.get(f"n_star_{other}"), row.get(f"n_hi_{other}")
    if lo in (None, "") and hi in (None, ""):
        return "-"
    if hi in (None, ""):
        return f"≥ {lo}"
    if not lo:
        return f"< {hi}"
    return f"{lo}–{hi}"


def capacity_markdown(rows: list[dict[str, Any]], fits: list[dict[str, Any]]) -> str:
    """report.md below its header: the tables, the slopes and the bits, from the rows alone
    (capacity.csv's), so a published folder can be recomputed without its probe folders.
    A censored row's n*, facts and bits per parameter print as lower bounds ("≥")."""
    moded = any(r.get("mode") not in (None, "") for r in rows)
    other = _other(str(rows[0].get("probe") or "fewshot")) if rows else "zeroshot"
    lines = [
        "| variant | " + ("mode | " if moded else "") + "seed | LoRA params | n* | n_hi | "
        "epochs at n* | reliability at n* | at n_hi | n* under the other probe | "
        "facts / 1k params | bits / param | bits / param, the other probe | bits / param as "
        "log2 K | known retained | untrained known facts lost | locality |",
        "|---|" + ("---|" if moded else "") + "---|---:|---:|---:|---:|---|---|---:|---:|---:|"
        "---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        other_bits = r.get(f"bits_per_parameter_{other}")
        other_text = _fmt(other_bits)
        if other_bits is not None and other_nstar(r).startswith("≥"):
            other_text = f"≥ {other_text}"
        lines.append(
            f"| {r.get('variant')} | " + (f"{r.get('mode')} | " if moded else "")
            + f"{r.get('seed')} | {_fmt(r.get('lora_parameters'))} | "
            f"{_bound(r, _fmt(r.get('n_star')))} | {_fmt(r.get('n_hi'))} | "
            f"{_fmt(r.get('epochs_at_n_star'))} | "
            f"{_reliability(r, 'lo')} | {_reliability(r, 'hi')} | {other_nstar(r)} | "
            f"{_bound(r, _fmt(r.get('facts_per_1k_parameters')))} | "
            f"{_bound(r, _fmt(r.get('bits_per_parameter')))} | {other_text} | "
            f"{_bound(r, _fmt(r.get('bits_per_parameter_log2k')))} | "
            f"{_fmt(r.get('known_retained'))} | "
            f"{_fmt(r.get('shift_untrained_negative_rate_of_eligible'))} | "
            f"{_fmt(r.get('locality'))} |")
    bench = sorted({k[: -len("_before")] for r in rows for k in r if k.endswith("_before")})
    if bench:
        lines += ["", "Benchmarks at n\\* (before -> after):", "",
                  "| variant | seed | " + " | ".join(bench) + " |",
                  "|---|---|" + "---|" * len(bench)]
        for r in rows:
            cells = [f"{_fmt(r.get(b + '_before'))} -> {_fmt(r.get(b + '_after'))}"
                     for b in bench]
            lines.append(f"| {r.get('variant')} | {r.get('seed')} | " + " | ".join(cells) + " |")
    lines += ["", "Slope of log10 n\\* on log10 LoRA parameters, per target-module family, "
              "fitted over variants: a variant's n\\* is the mean of log10 n\\* over its seeds "
              "(seeds share the facts and mostly end on the same bracket, so chains are not "
              "independent), and the 95% t interval has variants - 2 degrees of freedom. "
              "A censored n\\* (the search ran out of facts, \"≥\") takes no part.", ""]
    for fit in fits:
        if fit["slope"] is None:
            text = f"- {fit['family']}: slope not estimated ({fit['reason']})"
        else:
            low, high = fit["interval"]
            text = (f"- {fit['family']}: log10 n\\* = {fit['intercept']:.2f} + "
                    f"{fit['slope']:.2f} log10 parameters, 95% t interval of the slope "
                    f"[{low:.2f}, {high:.2f}] ({fit['variants']} variants, "
                    f"{fit['chains']} chains)")
        if fit["left_out"]:
            text += f"; left out as censored: {', '.join(fit['left_out'])}"
        lines.append(text + ".")
    measured = [_bound(r, f"{r['bits_per_parameter']:.3g}") for r in rows
                if r.get("bits_per_parameter") is not None]
    lines += ["", f"Bits per LoRA parameter: {', '.join(measured) or '-'}; "
              f"published for fully trained language models (Allen-Zhu & Li 2024): about "
              f"{PUBLISHED_BITS_PER_PARAMETER:g}. A fact's bits: the entropy of the answers "
              "its relation takes in the fact set, summed over the facts learned at n\\* (the "
              "column \"as log2 K\" counts log2 of the distinct answers instead, an upper "
              "bound on the entropy)."]
    for r in rows:
        if r.get("error"):
            lines.append(f"- {r['chain']}: stopped by a failed probe: {r['error']}")
    for r in rows:
        if r.get("searching") not in (None, "") and not r.get("error"):
            lines.append(f"- {r['chain']}: search not finished (next probe n={r['searching']})")
    return "\n".join(lines) + "\n"


def _markdown(capacity: Capacity, rows: list[dict[str, Any]], fits: list[dict[str, Any]]) -> str:
    return "\n".join(_header(capacity)) + "\n" + capacity_markdown(rows, fits)


def _csv_value(text: str) -> Any:
    if text == "":
        return None
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def read_capacity_csv(path: str | Path) -> list[dict[str, Any]]:
    """capacity.csv's rows, typed back as `capacity_rows` made them (empty cells as None)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise ValueError(f"{path}: cannot read the capacity table ({err.strerror})") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"{path}: not a CSV capacity table ({err})") from None
    missing = {"variant", "seed", "n_star", "n_hi", "lora_parameters"} - set(
        rows[0] if rows else {})
    if not rows or missing:
        raise ValueError(f"{path}: not a capacity table (no rows, or no column "
                         f"{', '.join(sorted(missing))}); pass a capacity folder's capacity.csv")
    return [{k: _csv_value(v or "") for k, v in r.items()} for r in rows]


def refresh_capacity_report(folder: str | Path, threshold: float) -> dict[str, Path]:
    """Recompute report.md's tables and slopes and the n* plot from the folder's capacity.csv.

    Published folders ship capacity.csv but not their probe folders, so `write_capacity_report`
    cannot run there; this keeps report.md's header (the text before its first table, which
    names the capacity file and search rule) and rewrites the rest. `threshold` is the search's
    tau, shown in the plot's title.
    """
    folder = Path(folder)
    rows = read_capacity_csv(folder / "capacity.csv")
    report = folder / "report.md"
    if not report.is_file():
        raise ValueError(f"{report}: missing; refresh_capacity_report rewrites an existing "
                         "report.md below its header (run `capacity` to write one)")
    text = report.read_text()
    cut = text.find("\n| variant | ")
    if cut < 0:
        raise ValueError(f"{report}: no table \"| variant | ...\" to rewrite")
    fits = slopes(rows)
    atomic_write_text(report, text[: cut + 1] + capacity_markdown(rows, fits))
    return {"report": report, "nstar_vs_parameters": _nstar_plot(rows, fits, threshold, folder)}


def _styles(rows: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """(colour per variant, marker per seed, seeds): one colour per variant and one marker
    per seed, so seeds of a variant sit side by side instead of cycling through ten colours."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(str(r.get("variant")) for r in rows))
    seeds = list(dict.fromkeys(str(r.get("seed")) for r in rows))
    cmap = plt.get_cmap("tab10" if len(variants) <= 10 else "tab20")
    colour = {v: cmap(i % cmap.N) for i, v in enumerate(variants)}
    marker = {s: "osD^v<>"[i % 7] for i, s in enumerate(seeds)}
    return colour, marker, seeds


def _nstar_plot(rows: list[dict[str, Any]], fits: list[dict[str, Any]], threshold: float,
                out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour, marker, seeds = _styles(rows)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    shown = [r for r in rows if r.get("lora_parameters") and r.get("n_star")]
    labelled: set[str] = set()
    for r in shown:
        hi = r.get("n_hi") or r["n_star"]
        variant, seed = str(r.get("variant")), str(r.get("seed"))
        x = r["lora_parameters"] * 1.04 ** seeds.index(seed)  # seeds side by side
        label = None if variant in labelled else variant + (" (≥)" if censored(r) else "")
        ax.errorbar([x], [r["n_star"]], yerr=[[0], [hi - r["n_star"]]], fmt=marker[seed],
                    color=colour[variant], capsize=3, label=label,
                    mfc="none" if censored(r) else None)
        labelled.add(variant)
    if len(seeds) > 1:
        for seed in seeds:
            ax.plot([], [], marker[seed], color="grey", label=f"seed {seed}")
    fitted = [f for f in fits if f["slope"] is not None]
    for i, fit in enumerate(fitted):
        ls = ["--", ":", "-.", "-"][i % 4]
        xs = sorted(r["lora_parameters"] for r in shown
                    if target_family(r.get("target_modules")) == fit["family"])
        ax.plot(xs, [10 ** (fit["intercept"] + fit["slope"] * math.log10(x)) for x in xs],
                "k" + ls, label=f"{fit['family']}: slope {fit['slope']:.2f}")
    ax.set(xscale="log", yscale="log", xlabel="trainable LoRA parameters",
           ylabel="n* (bar: up to n_hi; hollow: ≥, ran out of facts)",
           title=f"Facts held at reliability >= {threshold:g}")
    legend(ax, fontsize=7)
    fig.tight_layout()
    path = out / "nstar_vs_parameters.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plots(capacity: Capacity, rows: list[dict[str, Any]], fits: list[dict[str, Any]],
           out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    colour, marker, seeds = _styles(rows)
    style = {s: ["-", "--", ":", "-."][i % 4] for i, s in enumerate(seeds)}
    written = [_nstar_plot(rows, fits, capacity.rule.threshold, out)]

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for chain in capacity.chains():
        results = sorted(search_state(capacity, chain).results.items())
        variant, seed = str(chain.labels.get("variant")), str(chain.labels.get("seed"))
        if results:
            ax.plot([n for n, _ in results], [r for _, r in results],
                    marker=marker.get(seed, "o"), ls=style.get(seed, "-"),
                    color=colour.get(variant), label=chain.name)
    ax.axhline(capacity.rule.threshold, color="grey", ls=":")
    ax.set(xscale="log", xlabel="n (Unknown facts trained)", ylabel="reliability",
           title="Every probe")
    # plain numbers at 1, 2, 5 x 10^k: the default labels every minor tick in 10^x notation,
    # overlapping when the probes span less than a decade or two
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    legend(ax, fontsize=6)
    fig.tight_layout()
    written.append(out / "reliability_vs_n.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    harm = [r for r in rows if r.get("known_retained") is not None]
    if harm:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        labels = [f"{r.get('variant')}/{r.get('seed')}" for r in harm]
        xs = range(len(harm))
        ax.bar([x - 0.2 for x in xs], [r["known_retained"] for r in harm], 0.4,
               label="held-out known facts retained")
        ax.bar([x + 0.2 for x in xs],
               [r.get("shift_untrained_negative_rate_of_eligible") or 0 for r in harm],
               0.4, label="untrained known facts lost")
        ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
        ax.set(title="Harm at n*")
        legend(ax, fontsize=7)
        fig.tight_layout()
        written.append(out / "harm_at_nstar.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def write_capacity_report(capacity: Capacity, facts_path: str | Path | None) -> dict[str, Path]:
    """capacity.csv, report.md and the plots, in the capacity folder."""
    out = capacity.sweep.output
    rows = capacity_rows(capacity, facts_path)
    fits = slopes(rows)
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(out / "capacity.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(out / "report.md", _markdown(capacity, rows, fits))
    written = {"csv": out / "capacity.csv", "report": out / "report.md",
               "provenance": write_provenance(out, "capacity")}
    for path in _plots(capacity, rows, fits, out):
        written[path.stem] = path
    return written
