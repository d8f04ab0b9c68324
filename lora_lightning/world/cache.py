"""Building a world once and caching it: `ensure_world()` under `$LORA_LIGHTNING_HOME`
(default `~/.cache/lora_lightning`), atomic and safe across processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from lora_lightning.facts import save_facts
from lora_lightning.knowledge import categorize
from lora_lightning.world.config import WorldConfig
from lora_lightning.world.generator import (
    choose_pool,
    choose_rare,
    generate_world,
    split_world,
    world_texts,
)
from lora_lightning.world.model import build_model, pretrain
from lora_lightning.world.tokenizer import train_tokenizer

# The world's matrices are tiny (hidden size ~100): intra-op threads cost more in hand-offs than
# they save, and on a shared 2-core machine a second thread made pre-training ~10x slower in CPU
# time. One thread also makes the build bit-for-bit reproducible across machines' core counts.
BUILD_THREADS = 1


@dataclass
class WorldArtifacts:
    """Paths of a built world.

    `facts_path`: every fact except the pool, categorised by the base model (SliCK);
    `pool_path`: known facts reserved as few-shot examples, disjoint from every tested fact;
    `world_facts_path`: every fact uncategorised; `split_path`: which ids were pre-trained.
    """

    root: Path
    config: WorldConfig
    model_dir: Path
    facts_path: Path
    pool_path: Path
    world_facts_path: Path
    split_path: Path
    info_path: Path
    info: dict = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path, config: WorldConfig) -> WorldArtifacts:
        info_path = root / "build_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        return cls(
            root=root, config=config, model_dir=root / "model", facts_path=root / "facts.jsonl",
            pool_path=root / "pool.jsonl", world_facts_path=root / "world.jsonl",
            split_path=root / "split.json", info_path=info_path, info=info,
        )

    def known_ids(self) -> set[str]:
        """Ids of the facts the base model was pre-trained on (pool and rare ones included)."""
        return set(json.loads(self.split_path.read_text())["known"])

    def rare_ids(self) -> set[str]:
        """Ids of the known facts shown only rarely in pre-training (often half-learned)."""
        return set(json.loads(self.split_path.read_text())["rare"])


def default_home() -> Path:
    """`$LORA_LIGHTNING_HOME`, else `~/.cache/lora_lightning`."""
    return Path(os.environ.get("LORA_LIGHTNING_HOME", Path.home() / ".cache" / "lora_lightning"))


def _build(config: WorldConfig, root: Path, progress: bool) -> dict:
    """Build every artefact of the world into `root` (a fresh temporary folder)."""
    import torch

    started = time.perf_counter()
    facts = generate_world(config)
    known, unseen = split_world(facts, config)
    pool = choose_pool(known, config)
    pool_ids = {f.id for f in pool}
    rare = choose_rare(known, pool, config)

    tokenizer = train_tokenizer(world_texts(facts), config.vocab_size)
    model = build_model(config, tokenizer)
    losses = pretrain(model, tokenizer, known, config, rare=rare, progress=progress)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trained_at = time.perf_counter()

    tested = [f for f in facts if f.id not in pool_ids]
    with torch.inference_mode():
        categorised = categorize(
            model, tokenizer, tested, pool, n_exp=config.n_exp, n_shot=config.n_shot,
            batch_size=config.eval_batch_size, seed=config.seed, progress=progress,
        )
    save_facts(facts, root / "world.jsonl")
    save_facts(categorised, root / "facts.jsonl")
    save_facts(pool, root / "pool.jsonl")
    (root / "split.json").write_text(
        json.dumps(
            {"known": sorted(f.id for f in known), "rare": sorted(rare), "pool": sorted(pool_ids)},
            indent=1,
        )
    )
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))

    known_ids = {f.id for f in known}
    known_tested = [f for f in categorised if f.id in known_ids]
    frequent = [f for f in known_tested if f.id not in rare]
    unseen_tested = [f for f in categorised if f.id not in known_ids]
    info = {
        "config_key": config.key(),
        "n_facts": len(facts),
        "n_known": len(known),
        "n_pool": len(pool),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        # the share of few-shot probes a fact's greedy answer was right, averaged over facts
        "known_accuracy": _mean(f.p_greedy for f in known_tested),
        "frequent_known_accuracy": _mean(f.p_greedy for f in frequent),
        "rare_known_accuracy": _mean(f.p_greedy for f in known_tested if f.id in rare),
        "unseen_accuracy": _mean(f.p_greedy for f in unseen_tested),
        "known_categories": dict(Counter(f.category for f in known_tested)),
        "categories": dict(Counter(f.category for f in categorised)),
        "pretrain_seconds": round(trained_at - started, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (root / "build_info.json").write_text(json.dumps(info, indent=1))
    return info


def _mean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def ensure_world(
    config: WorldConfig | None = None,
    home: str | Path | None = None,
    progress: bool = True,
) -> WorldArtifacts:
    """The built world for `config` (default `WorldConfig()`), building it on first use.

    The folder is `<home>/world-<config hash>`. A build happens in a temporary sibling folder and
    is renamed into place only when complete, under a file lock, so a crash never leaves a
    half-built world and concurrent callers (e.g. DDP ranks) build it once and all reuse it.
    """
    import torch
    from filelock import FileLock

    config = config or WorldConfig()
    home = Path(home) if home is not None else default_home()
    home.mkdir(parents=True, exist_ok=True)
    root = home / f"world-{config.key()}"
    if (root / "build_info.json").exists():
        return WorldArtifacts.at(root, config)
    with FileLock(str(root) + ".lock"):
        if (root / "build_info.json").exists():  # another process built it while we waited
            return WorldArtifacts.at(root, config)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=home))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is read like any folder
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(BUILD_THREADS)
            info = _build(config, tmp, progress)
            if root.exists():  # a stale, incomplete folder from an older crash
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)
    if progress:
        print(
            f"world built in {info['total_seconds']} s at {root}: the base answers "
            f"{info['frequent_known_accuracy']:.1%} of the few-shot probes of its frequently "
            f"trained facts ({info['known_accuracy']:.1%} over all trained facts); "
            f"categories {info['categories']}"
        )
    return WorldArtifacts.at(root, config)
