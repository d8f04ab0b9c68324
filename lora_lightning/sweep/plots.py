"""The sweep's plots (PNG, matplotlib's Agg backend): reliability vs n per mix, the harm vs n
(held-out known facts, world-MC or MMLU, world-truthful or TruthfulQA), the shifts vs n.
x is n Unknown facts on a log scale; each line is one mix (the non-n, non-seed axes), the
mean over seeds with its min–max as error bars; dashed lines are the base model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_lightning.sweep.grid import Grid

__all__ = ["legend", "plot_all"]

HARM = (
    ("known_retained", None, "held-out HighlyKnown facts still known"),
    ("shift_untrained_negative_rate_of_eligible", None, "untrained known facts lost"),
    ("world_mc_accuracy_after", "world_mc_accuracy_before", "world-MC accuracy"),
    ("mmlu_accuracy_after", "mmlu_accuracy_before", "MMLU accuracy"),
    ("world_truthful_mc1_after", "world_truthful_mc1_before", "world-truthful MC1"),
    ("truthfulqa_mc1_after", "truthfulqa_mc1_before", "TruthfulQA MC1"),
    ("locality", None, "locality (answers unchanged)"),
)


def _lines(ax: Any, grid: Grid, column: str, label_prefix: str = "") -> None:
    for group in grid.groups:
        xs, means, lows, highs = [], [], [], []
        for n in grid.ns:
            stats = grid.stats(n, group, column)
            if stats is not None:
                xs.append(n)
                means.append(stats[0])
                # the mean of equal seeds can round a hair past their min or max
                lows.append(max(0.0, stats[0] - stats[1]))
                highs.append(max(0.0, stats[2] - stats[0]))
        if xs:
            ax.errorbar(xs, means, yerr=[lows, highs], marker="o", capsize=3,
                        label=f"{label_prefix}{group}")


def _base_line(ax: Any, grid: Grid, column: str | None) -> None:
    if column is None:
        return
    values = [v for n in grid.ns for g in grid.groups for v in grid.values(n, g, column)]
    if values:
        ax.axhline(sum(values) / len(values), color="grey", linestyle="--", label="base model")


def legend(ax: Any, **kwargs: Any) -> None:
    """The axes' legend, where anything on them is labelled: on an empty plot (no cell or
    probe finished yet) matplotlib would warn "No artists with labels found" to the user."""
    if ax.get_legend_handles_labels()[1]:
        ax.legend(**kwargs)


def _finish(ax: Any, title: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel("n Unknown facts trained")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax, fontsize=7)


def plot_all(grid: Grid, out: Path, paper: bool = False) -> list[Path]:
    """Write reliability_vs_n.png, harm_vs_n.png and shifts_vs_n.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_lightning.sweep.paper import paper_value

    written = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    _lines(ax, grid, "reliability")
    if paper:
        for group in grid.groups:
            points = []
            for n in grid.ns:
                cell = grid.cells(n, group)[0]
                value = paper_value("reliability", n, cell["extra_kind"],
                                    cell["extra_per_unknown"])
                if value is not None:
                    points.append((n, value))
            if points:
                ax.plot(*zip(*points, strict=True), linestyle=":", marker="x",
                        label=f"paper {group}")
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "Reliability: trained Unknown facts answered", "share of facts")
    fig.tight_layout()
    written.append(out / "reliability_vs_n.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    harms = [h for h in HARM if grid.has(h[0])]
    if harms:
        fig, axes = plt.subplots(1, len(harms), figsize=(4.2 * len(harms), 4), squeeze=False)
        for ax, (column, before, title) in zip(axes[0], harms, strict=True):
            _lines(ax, grid, column)
            _base_line(ax, grid, before)
            _finish(ax, title, "after training")
        fig.suptitle("Harm vs n")
        fig.tight_layout()
        written.append(out / "harm_vs_n.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (column, title) in zip(axes, (
        ("shift_positive_rate", "Positive shifts (UK->MK, UK->HK, MK->HK)"),
        ("shift_negative_rate", "Negative shifts (HK->MK, HK->UK, MK->UK)"),
    ), strict=True):
        _lines(ax, grid, column)
        _finish(ax, title, "rate over all facts")
    fig.tight_layout()
    written.append(out / "shifts_vs_n.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
