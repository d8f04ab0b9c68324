"""`python -m lora_lightning world`: build a synthetic world (or find it cached) and show it."""

from __future__ import annotations

import json
from typing import Any, Literal

from lora_lightning.files import PathProblem
from lora_lightning.world import WorldConfig, ensure_world
from lora_lightning.world.cache import differing_files, pack_world, shipped_world

_SHOWN = (
    ("n_facts", "facts (all)"),
    ("n_tested", "facts categorised (the fact file)"),
    ("n_known", "facts pre-trained"),
    ("n_two_hop", "2-hop questions (portability)"),
    ("n_parameters", "base model parameters"),
    ("frequent_known_accuracy", "base accuracy, frequently trained facts"),
    ("known_accuracy", "base accuracy, all trained facts"),
    ("unseen_accuracy", "base accuracy, never-seen facts"),
    ("refusal_rate", "refusal rate of the probes"),
    ("unique_answers", "unique answers of the probes"),
    ("world_mc", "world-MC accuracy (5-shot, chance 0.25)"),
    ("world_truthful_mc1", "world-truthful MC1"),
    ("world_truthful_mc2", "world-truthful MC2"),
    ("world_mc_dev", "world-MC, development split"),
    ("world_truthful_mc1_dev", "world-truthful MC1, development split"),
    ("world_truthful_mc2_dev", "world-truthful MC2, development split"),
    ("pretrain_seconds", "build: pre-training seconds"),
    ("total_seconds", "build: total seconds"),
)


def world_command(
    scale: Literal["small", "bench"] = "small",
    seed: int = 0,
    home: str | None = None,
    rebuild: bool = False,
    pack: str | None = None,
    json_output: bool = False,
) -> dict[str, Any]:
    """Show a synthetic world: the shipped build unpacked, or built here if it does not ship.

    Args:
        scale: "small" (the default run's world) or "bench" (the paper's grid and in-world harm
            benchmarks; docs/world.md).
        seed: the world's seed. Seed 0 of each scale ships as built; other seeds are built here
            (small: 23 s, bench: about 13 minutes, on one core).
        home: cache folder (default `$LORA_LIGHTNING_HOME`, else `~/.cache/lora_lightning`).
        rebuild: build the world on this machine even though it ships, into a folder of its own
            (`world-<key>-rebuilt`, never used by runs), and say which files differ from the
            shipped build: whether this machine reproduces it bit for bit.
        pack: write the world's folder, packed as it ships, to this `.tar.xz` file.
        json_output: print the build information as JSON instead of a table.

    Returns:
        The world's build information (sizes, categories, base accuracy, refusal rate and, at
        bench scale, in-world benchmark scores, test and development splits).
    """
    config = WorldConfig.scale(scale, seed)
    try:
        world = ensure_world(config, home=home, rebuild=rebuild)
    except PathProblem as err:
        raise _named_by_flag(err, home) from err
    info = {"scale": scale, "seed": seed, "root": str(world.root), **world.info}
    if rebuild and shipped_world(config) is not None:
        shipped = ensure_world(config, home=home, progress=False)
        info["differs_from_shipped"] = differing_files(shipped.root, world.root)
    if pack:
        print(f"packed {pack_world(world.root, pack)}")
    if json_output:
        print(json.dumps(info, indent=1))
        return info
    print(f"{scale} world at {world.root}")
    for key, label in _SHOWN:
        if key in info:
            value = info[key]
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            print(f"  {label + ':':46s} {shown}")
    categories = ", ".join(f"{k} {v}" for k, v in sorted(info.get("categories", {}).items()))
    print(f"  {'categories:':46s} {categories}")
    if "differs_from_shipped" in info:
        differ = info["differs_from_shipped"]
        print(f"  {'files that differ from the shipped build:':46s} "
              f"{', '.join(differ) if differ else 'none (bit for bit the same)'}")
    return info


def _named_by_flag(err: PathProblem, home: str | None) -> PathProblem:
    """The cache's complaint about `home` (it names the argument `home=...` and says "set home
    to a writable folder", as a Python caller reads it) in the command line's words: the
    `--home` flag, or `$LORA_LIGHTNING_HOME` when no `--home` was given (already so worded)."""
    line = str(err)
    if home is None or f"home={home}" not in line:
        return err
    line = line.replace(f"home={home}", f"--home {home}", 1)
    line = line.replace("set home to a writable folder", "pass --home a writable folder (or "
                        "leave --home out to use $LORA_LIGHTNING_HOME)")
    return PathProblem(err.errno or 0, line)
