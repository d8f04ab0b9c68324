"""What a sweep computes once and every cell shares: the base model's knowledge categories.

Categorising Llama-3.1-8B on 21k questions takes hours, and every cell needs the same
categories (and the base's per-prompt answers, the "before" side of the knowledge shift), so
the sweep runs `categorize` once into its folder and points every cell's `data.facts` at the
result. A synthetic world's fact file is categorised when the world is built: `world:` only
resolves its paths. (The "before" benchmark scores are shared through
`KnowledgeReport(before_scores=...)`: the first cell to need them computes them.)
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_lightning.sweep.cell import cell_env, error_line
from lora_lightning.sweep.cellconfig import cli_value
from lora_lightning.sweep.spec import Sweep

__all__ = [
    "CATEGORIZED", "categorize_args", "categorized_settings", "run_categorize",
    "shared_settings", "world_settings",
]

CATEGORIZED = "categorized.jsonl"


def world_settings(scale: str, dry_run: bool = False) -> dict[str, str]:
    """The base model, fact file and few-shot pool of the synthetic world of `scale`, built on
    first use (a dry run only names them, without building anything)."""
    if dry_run:
        return {
            "model.model_name_or_path": f"<{scale} world>/model",
            "data.facts": f"<{scale} world>/facts.jsonl",
            "data.fewshot_pool": f"<{scale} world>/pool.jsonl",
        }
    from lora_lightning.world import WorldConfig, ensure_world

    world = ensure_world(WorldConfig.scale(scale))
    return {
        "model.model_name_or_path": str(world.model_dir),
        "data.facts": str(world.facts_path),
        "data.fewshot_pool": str(world.pool_path),
    }


def categorize_args(sweep: Sweep, model: str | None) -> list[str]:
    """`categorize` arguments from the sweep file's `categorize:` section; the model defaults
    to the cells' base model and the output is the sweep folder's `categorized.jsonl`."""
    from lora_lightning.categorize import categorize_file

    section = dict(sweep.categorize or {})
    known = set(inspect.signature(categorize_file).parameters) - {"output"}
    for key in section:
        if key not in known:
            raise sweep.error(f"categorize.{key}", "not an argument of `categorize` "
                              f"(known: {', '.join(sorted(known))})")
    section.setdefault("model", model)
    section["output"] = str(sweep.output / CATEGORIZED)
    section.setdefault("progress", False)
    args = []
    for key, value in section.items():
        if value is not None:
            args += [f"--{key}", cli_value(value)]
    return args


def run_categorize(args: list[str], cwd: str, log: str) -> str | None:
    """Run `python -m lora_lightning categorize <args>` (here, or inside a SLURM job); it
    resumes from its own `.partial` file when interrupted. None when it succeeded, else what
    went wrong in one line: the line of its log that says why (returned, not raised, so that
    it comes back from a SLURM job as it is)."""
    with open(log, "a") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "lora_lightning", "categorize", *args], cwd=cwd,
            env=cell_env(), stdout=out, stderr=subprocess.STDOUT, check=False,
        ).returncode
    if rc != 0:
        return f"categorize exited with {rc}: {error_line(log)} (log: {log})"
    return None


def categorized_settings(sweep: Sweep, model: str | None, launch: Any) -> dict[str, Any]:
    """Categorise once (unless done) with `launch(function, *args)` and return the cells'
    `data.facts` (and `data.fewshot_pool`: the pool `categorize` used, so before and after
    come from the same prompts)."""
    from lora_lightning.facts import pool_sidecar

    out = sweep.output / CATEGORIZED
    if not out.is_file():
        args = categorize_args(sweep, model)
        print(f"sweep: categorising the facts once for every cell -> {out}", flush=True)
        error = launch(run_categorize, args, str(Path.cwd()),
                       str(sweep.output / "categorize.log"))
        if error:
            raise sweep.error("categorize", error)
    settings: dict[str, Any] = {"data.facts": str(out)}
    pool = (sweep.categorize or {}).get("pool")
    if pool is None and pool_sidecar(out).is_file():
        pool = str(pool_sidecar(out))
    if pool is not None:
        settings["data.fewshot_pool"] = str(pool)
    return settings


def shared_settings(sweep: Sweep, config: Any) -> dict[str, Any]:
    """What every cell of `sweep` shares, computed once: the world's model and fact paths
    (built on first use), or the categorised facts (`categorize` run once with the model of
    `config`, the parsed base config), or nothing."""
    if sweep.world:
        return world_settings(sweep.world)
    if sweep.categorize is not None:
        model = getattr(config.model, "model_name_or_path", None)
        return categorized_settings(sweep, model, _launch_once(sweep))
    return {}


def _launch_once(sweep: Sweep) -> Callable[..., Any]:
    """How to run one function once for the sweep: here, or as a single SLURM job."""
    if sweep.launcher == "slurm":
        from lora_lightning.sweep.slurm import submit_and_wait

        return lambda function, *args: submit_and_wait(sweep, "categorize", function, *args)
    return lambda function, *args: function(*args)
