"""A world once and for all: `ensure_world()` under `$LORA_LIGHTNING_HOME` (default
`~/.cache/lora_lightning`), atomic and safe across processes.

The worlds the shipped numbers come from (the small default world and the bench world, seed 0)
ship with the package as built, packed files (`shipped/world-<config key>.tar.xz`): pre-training
grows the rounding differences of one CPU's matrix kernels into another base on another CPU
(docs/world.md), so a build is only reproducible on the machine that made it. `ensure_world`
unpacks the shipped build; a world without one, or `rebuild=True`, is built on this machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tarfile
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

from lora_lightning.facts import save_facts
from lora_lightning.files import (
    check_output_dir,
    default_home,
    plain_mode,
    sha256_file,
    writable_home,
    write_problem,
)
from lora_lightning.knowledge import categorize
from lora_lightning.metrics.functional import answer_concentration, refusal_rate
from lora_lightning.provenance import environment
from lora_lightning.world.benchmarks import (
    benchmark_texts,
    evaluate_world_benchmarks,
    format_examples,
    write_benchmarks,
)
from lora_lightning.world.config import WorldConfig
from lora_lightning.world.generator import WorldPlan, plan_world, world_texts
from lora_lightning.world.model import build_model, pretrain
from lora_lightning.world.tokenizer import train_tokenizer

# The world's matrices are tiny (hidden size ~100): intra-op threads cost more in hand-offs than
# they save, and on a shared 2-core machine a second thread made pre-training ~10x slower in CPU
# time. One thread also makes the build bit-for-bit reproducible across core counts, but not
# across CPU types: MKL and torch's vectorised kernels round differently on an AMD EPYC and on
# an Intel Xeon with AVX-512, and pre-training grows that into another base (docs/world.md).
BUILD_THREADS = 1
BENCHMARKS_DIR = "benchmarks"
BENCHMARKS_DEV_DIR = "benchmarks_dev"  # the same benchmarks' development split
TWO_HOP_FILE = "two_hop.jsonl"
CHECKSUMS_FILE = "checksums.json"
SHIPPED_DIR = Path(__file__).parent / "shipped"
REBUILT_SUFFIX = "-rebuilt"


@dataclass
class WorldArtifacts:
    """Paths of a built world.

    `facts_path`: every fact except the pool, categorised by the base model (SliCK);
    `pool_path`: known facts reserved as few-shot examples, disjoint from every tested fact;
    `world_facts_path`: every fact uncategorised; `split_path`: which ids were pre-trained.
    Bench scale only: `benchmarks_dir` (world-MC in the MMLU layout, world-truthful in the
    TruthfulQA one; their development split in `benchmarks_dev_dir`) and `two_hop_path`
    (2-hop questions of tested subjects, for portability).
    """

    root: Path
    config: WorldConfig
    model_dir: Path
    facts_path: Path
    pool_path: Path
    world_facts_path: Path
    split_path: Path
    info_path: Path
    benchmarks_dir: Path
    two_hop_path: Path
    info: dict = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path, config: WorldConfig) -> WorldArtifacts:
        info_path = root / "build_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        return cls(
            root=root, config=config, model_dir=root / "model", facts_path=root / "facts.jsonl",
            pool_path=root / "pool.jsonl", world_facts_path=root / "world.jsonl",
            split_path=root / "split.json", info_path=info_path,
            benchmarks_dir=root / BENCHMARKS_DIR, two_hop_path=root / TWO_HOP_FILE, info=info,
        )

    @property
    def benchmarks_dev_dir(self) -> Path:
        """The in-world benchmarks' development split (the same layout as `benchmarks_dir`)."""
        return self.root / BENCHMARKS_DEV_DIR

    @property
    def is_bench(self) -> bool:
        """Whether this world has in-world benchmarks and 2-hop questions (bench scale)."""
        return self.benchmarks_dir.is_dir()

    def known_ids(self) -> set[str]:
        """Ids of the facts the base model was pre-trained on (pool and rare ones included)."""
        return set(json.loads(self.split_path.read_text())["known"])

    def rare_ids(self) -> set[str]:
        """Ids of the known facts shown only rarely in pre-training (often half-learned)."""
        return set(json.loads(self.split_path.read_text())["rare"])


def write_plan(plan: WorldPlan, config: WorldConfig, root: Path) -> None:
    """Write the files a build takes from its plan alone, no model involved: every fact, the
    pool, the split and the config; at bench scale also the 2-hop questions and both benchmark
    splits (a test compares them with the shipped worlds)."""
    save_facts(plan.facts, root / "world.jsonl")
    save_facts(plan.pool, root / "pool.jsonl")
    if config.format_subjects:
        save_facts(plan.two_hop, root / TWO_HOP_FILE)
        write_benchmarks(plan, config, root / BENCHMARKS_DIR, root / BENCHMARKS_DEV_DIR)
    (root / "split.json").write_text(
        json.dumps(
            {"known": sorted(plan.known_ids), "rare": sorted(plan.rare),
             "pool": sorted(f.id for f in plan.pool),
             "mc_heldout": sorted(f.id for f in plan.mc_heldout),
             "mc_dev": sorted(f.id for f in plan.mc_dev),
             "benchmark": sorted(f.id for f in plan.benchmark)},
            indent=1,
        )
    )
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))


def _build(config: WorldConfig, root: Path, progress: bool) -> dict:
    """Build every artefact of the world into `root` (a fresh temporary folder)."""
    import torch

    started = time.perf_counter()
    plan = plan_world(config)
    bench = bool(config.format_subjects)
    extra_texts = list(benchmark_texts(plan)) if bench else []
    tokenizer = train_tokenizer(
        chain(world_texts(plan.facts), world_texts(plan.decoys + plan.two_hop), extra_texts),
        config.vocab_size,
    )
    model = build_model(config, tokenizer)
    chat_facts = plan.known + plan.two_hop_train + plan.decoys
    losses = pretrain(
        model, tokenizer, chat_facts, config, rare=plan.rare, progress=progress,
        format_examples=(lambda rng: format_examples(plan, rng)) if bench else None,
    )
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trained_at = time.perf_counter()

    with torch.inference_mode():
        categorised = categorize(
            model, tokenizer, plan.tested, plan.pool, n_exp=config.n_exp, n_shot=config.n_shot,
            batch_size=config.eval_batch_size, seed=config.seed, progress=progress,
        )
    save_facts(categorised, root / "facts.jsonl")
    write_plan(plan, config, root)

    known_tested = [f for f in categorised if f.id in plan.known_ids]
    frequent = [f for f in known_tested if f.id not in plan.rare]
    unseen_tested = [f for f in categorised if f.id not in plan.known_ids]
    answers = [a for f in categorised for a in f.predictions]
    info = {
        "config_key": config.key(),
        "n_facts": len(plan.facts),
        "n_tested": len(plan.tested),
        "n_known": len(plan.known),
        "n_pool": len(plan.pool),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        # the share of few-shot probes a fact's greedy answer was right, averaged over facts
        "known_accuracy": _mean(f.p_greedy for f in known_tested),
        "frequent_known_accuracy": _mean(f.p_greedy for f in frequent),
        "rare_known_accuracy": _mean(f.p_greedy for f in known_tested if f.id in plan.rare),
        "unseen_accuracy": _mean(f.p_greedy for f in unseen_tested),
        "known_categories": dict(Counter(f.category for f in known_tested)),
        "categories": dict(Counter(f.category for f in categorised)),
        "refusal_rate": float(refusal_rate(answers)["rate"]),
        "unique_answers": answer_concentration(answers)["unique"],
        "pretrain_seconds": round(trained_at - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if bench:
        info["n_two_hop"] = len(plan.two_hop)
        for folder, suffix in ((BENCHMARKS_DIR, ""), (BENCHMARKS_DEV_DIR, "_dev")):
            scores = evaluate_world_benchmarks(model, tokenizer, root / folder)
            info[f"world_mc{suffix}"] = scores["world_mc"]["accuracy"]
            info[f"world_truthful_mc1{suffix}"] = scores["world_truthful"]["mc1"]
            info[f"world_truthful_mc2{suffix}"] = scores["world_truthful"]["mc2"]
    info["total_seconds"] = round(time.perf_counter() - started, 1)
    info["environment"] = environment()  # the CPU and libraries the build's numbers depend on
    (root / "build_info.json").write_text(json.dumps(info, indent=1))
    return info


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE)


def _write_checksums(root: Path) -> None:
    """Record a SHA-256 of every file of a finished build (written last: its presence means
    the build is complete)."""
    sums = {str(p.relative_to(root)): sha256_file(p) for p in _files(root)}
    (root / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1, sort_keys=True))


def _verified(root: Path, progress: bool) -> bool:
    """Whether `root` holds a complete world whose files are exactly as built. A damaged or
    incomplete one is reported by the file that differs and then rebuilt by the caller."""
    sums_path = root / CHECKSUMS_FILE
    if not sums_path.is_file():
        if root.exists() and progress:
            print(f"world cache {root} is incomplete (no {CHECKSUMS_FILE}); rebuilding it")
        return False
    try:
        sums = json.loads(sums_path.read_text())
    except ValueError:
        sums = None
    problem = None
    if not isinstance(sums, dict):
        problem = f"{CHECKSUMS_FILE} is not readable"
    else:
        for name, expected in sums.items():
            path = root / name
            if not path.is_file():
                problem = f"{name} is missing"
            elif sha256_file(path) != expected:
                problem = f"{name} differs from the file the build wrote"
            if problem:
                break
    if problem is None:
        return True
    warnings.warn(f"world cache {root} is damaged ({problem}); rebuilding it", stacklevel=3)
    return False


def shipped_world(config: WorldConfig) -> Path | None:
    """The packed build shipped for `config`, if the package has one."""
    path = SHIPPED_DIR / f"world-{config.key()}.tar.xz"
    return path if path.is_file() else None


def pack_world(root: str | Path, dest: str | Path) -> Path:
    """Pack a built world folder into `dest` (`.tar.xz`), byte for byte the same for the same
    files: sorted names, no times, owners or modes beyond read/execute."""
    root, dest = Path(root), Path(dest)
    if not (root / CHECKSUMS_FILE).is_file():
        raise ValueError(f"{root} is not a finished world build (no {CHECKSUMS_FILE})")

    def plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() else 0o644
        return info

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest, "w:xz", preset=9, format=tarfile.PAX_FORMAT) as tar:
        for path in [root / CHECKSUMS_FILE, *_files(root)]:
            tar.add(path, arcname=str(path.relative_to(root)), recursive=False, filter=plain)
    return dest


def extract_world(artifact: str | Path, root: str | Path) -> None:
    """Extract a packed world into `root`, refusing links and paths outside it (the "data"
    filter of Python 3.11.4+; our own packs hold plain files only)."""
    with tarfile.open(artifact, "r:xz") as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
        else:  # pragma: no cover - Python 3.11.0-3.11.3
            members = [m for m in tar.getmembers() if m.isfile() and ".." not in m.name
                       and not m.name.startswith("/")]
            tar.extractall(root, members=members)


def _unpack(artifact: Path, root: Path) -> dict:
    """Unpack a shipped build into `root` (a fresh temporary folder) and check every file
    against the checksums it was packed with."""
    extract_world(artifact, root)
    if not _verified(root, progress=False):
        raise RuntimeError(
            f"the shipped world {artifact} does not match its own checksums: reinstall "
            "lora-lightning"
        )
    return json.loads((root / "build_info.json").read_text())


def differing_files(a: str | Path, b: str | Path) -> list[str]:
    """The files two world builds do not share bit for bit (by their recorded checksums),
    leaving out the builds' own records (`build_info.json`: times and the machine)."""
    sums = [json.loads((Path(r) / CHECKSUMS_FILE).read_text()) for r in (a, b)]
    names = sorted((set(sums[0]) | set(sums[1])) - {"build_info.json"})
    return [n for n in names if sums[0].get(n) != sums[1].get(n)]


def _write_problem(
    err: Exception, root: Path, variable: str, artifact: Path | None
) -> OSError | None:
    """A failed write into the world's folder (a full disk: tarfile's and safetensors' errors
    name no path) as one line naming the folder and the setting that moves it."""
    setting = "--home" if variable == "home" else "LORA_LIGHTNING_HOME"
    what = "cannot unpack the world into" if artifact is not None else "cannot build the world in"
    return write_problem(err, root, what, f"or set {setting} to a folder with room for it")


def _mean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def ensure_world(
    config: WorldConfig | None = None,
    home: str | Path | None = None,
    progress: bool = True,
    rebuild: bool = False,
) -> WorldArtifacts:
    """The world for `config` (default `WorldConfig()`): the shipped build unpacked, or, for a
    world without one, built on first use.

    The folder is `<home>/world-<config hash>`. `rebuild=True` builds a world that ships on this
    machine instead, into `<home>/world-<config hash>-rebuilt` (never the folder runs use, so a
    machine's own build cannot stand in for the published one unnoticed); compare the two with
    `differing_files`. A world is unpacked or built in a temporary sibling folder and renamed
    into place only when complete, under a file lock, so a crash never leaves a half-made world
    and concurrent callers (e.g. DDP ranks) make it once and all reuse it.
    """
    import torch
    from filelock import FileLock

    config = config or WorldConfig()
    variable = "LORA_LIGHTNING_HOME" if home is None else "home"
    home = Path(home) if home is not None else default_home()
    check_output_dir(home, f"{variable}={home}:")
    artifact = None if rebuild else shipped_world(config)
    root = home / f"world-{config.key()}{REBUILT_SUFFIX if rebuild else ''}"
    if not rebuild and _verified(root, progress):  # a read-only cache holding it is fine
        return WorldArtifacts.at(root, config)
    writable_home(home, variable)  # one line naming the variable, not an OSError's traceback
    with FileLock(str(root) + ".lock"):
        if not rebuild and _verified(root, progress):  # another process made it meanwhile
            return WorldArtifacts.at(root, config)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=home))
        except OSError as err:
            raise _write_problem(err, root, variable, artifact) from err
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(BUILD_THREADS)
            # the build seeds torch's generator; the caller's random state is left as it was,
            # so a run that builds the world trains exactly as one that finds it cached
            if artifact is not None:
                info = _unpack(artifact, tmp)
            else:
                with torch.random.fork_rng(devices=[]):
                    info = _build(config, tmp, progress)
                _write_checksums(tmp)
            plain_mode(tmp, tree=True)  # the cache is read like any folder, by other users too
            if root.exists():  # a stale, incomplete or damaged folder
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(err, Exception) and (
                    problem := _write_problem(err, root, variable, artifact)) is not None:
                raise problem from err
            raise
        finally:
            torch.set_num_threads(threads)
    if progress and artifact is not None:
        built_on = info.get("environment", {}).get("cpu", "another machine")
        print(f"world unpacked at {root} (the shipped build, made on {built_on})")
    elif progress:
        print(
            f"world built in {info['total_seconds']} s at {root}: the base answers "
            f"{info['frequent_known_accuracy']:.1%} of the few-shot probes of its frequently "
            f"trained facts ({info['known_accuracy']:.1%} over all trained facts); "
            f"categories {info['categories']}"
        )
    return WorldArtifacts.at(root, config)
