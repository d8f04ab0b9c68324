"""`python -m lora_lightning aggregate SWEEP_DIR`: a sweep folder's reports into the paper's
tables (summary.csv, report.md) and plots."""

from __future__ import annotations

from lora_lightning.sweep.aggregate import aggregate_sweep


def aggregate_command(sweep_dir: str, plots: bool = True) -> dict[str, str]:
    """Collect a sweep folder's cell reports into summary.csv, report.md and plots.

    `summary.csv` has one row per cell; `report.md` reliability, shifts, answer concentration,
    refusals and every benchmark by n x mix, mean and min–max over seeds; the PNG plots are
    against n.

    `sweep` runs this at its end; run it by hand to look at a sweep still running or one
    whose cells ran elsewhere.

    Args:
        sweep_dir: The sweep folder (the one with sweep.json).
        plots: Also draw reliability_vs_n.png, harm_vs_n.png and shifts_vs_n.png.

    Returns:
        The files written, by name.
    """
    written = aggregate_sweep(sweep_dir, plots=plots)
    for name, path in written.items():
        print(f"{name}: {path}")
    return {name: str(path) for name, path in written.items()}
