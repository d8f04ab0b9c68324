"""Sweeps: the packing experiment's grid as one command (`python -m lora_lightning sweep`).

One file per idea: `spec` (the sweep file, its axes and cells), `cellconfig` (a cell's complete
`fit` config, checked by the fit parser), `folder` (the sweep folder and what made it), `cell`
(fit then test of one cell, resumable, retried), `shared` (what is computed once per sweep),
`local` and `slurm` (the launchers), `progress`, `runner` (all of it in order), and `aggregate`,
`grid`, `plots` and `paper` (the tables, plots and the paper's numbers). The `capacity` package
searches, per adapter variant, the most new facts it learns on the same cells and launchers.
"""

from lora_lightning.sweep.spec import Axis, Cell, Sweep, SweepFileError, load_sweep

__all__ = ["Axis", "Cell", "Sweep", "SweepFileError", "load_sweep"]
