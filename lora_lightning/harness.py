"""lm-evaluation-harness tasks on our model object, in memory.

Researchers measure forgetting with the harness' own tasks (HellaSwag, ARC, GSM8K, ...), so
the numbers are comparable with everyone else's only if the harness itself builds the prompts,
sends the requests and computes the metrics. This module hands the harness the model we
already hold - the base with our LoRA layers injected and unmerged, or with them switched off
by `lora_disabled` for the base's scores - instead of letting it load a checkpoint: a subclass
of the harness' `HFLM` constructed with `pretrained=<the nn.Module>` and our tokenizer. Nothing
is saved, merged or reloaded, so "before" and "after" are the very same weights.

Task names are the harness' (`TaskManager`), plus the tasks of a user's YAML folder
(`include`, the harness' `--include_path`). `lm_eval` is imported only when a task is run:
the `harness` extra is optional (`pip install "lora-lightning[harness]"`).
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import logging
import os
import random
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lora_lightning.inference import evaluating

__all__ = [
    "INSTALL_HINT",
    "HarnessUnavailable",
    "check_tasks",
    "evaluate_tasks",
    "harness_lm",
    "include_folders",
    "parse_tasks",
    "run_harness",
    "summarize",
    "task_manager",
]

INSTALL_HINT = 'pip install "lora-lightning[harness]"'
# stderr of bootstrapped metrics (f1, bleu, ...); means have a closed form and are not resampled
BOOTSTRAP_ITERS = 1000


class HarnessUnavailable(ImportError):
    """lm-evaluation-harness is not installed; the message says how to install it."""


def require_lm_eval() -> Any:
    """The `lm_eval` package, or a `HarnessUnavailable` naming the extra that installs it."""
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401  (the submodules we use, imported once here)
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        raise HarnessUnavailable(
            f"lm-evaluation-harness tasks need the lm-eval package ({err}); install it with: "
            f"{INSTALL_HINT}"
        ) from err
    return lm_eval


def parse_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Task names from "a,b", ["a", "b"] or ["a,b"]: stripped, empty ones and repeats dropped,
    order kept (the command line's `--harness_tasks a,b` is one string)."""
    if tasks is None:
        return []
    items = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [name.strip() for item in items for name in str(item).split(",")]
    return list(dict.fromkeys(name for name in names if name))


def include_folders(include: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[Path]:
    """Existing folders of task YAMLs; a YAML file stands for its folder (the harness indexes
    folders, so a file's siblings are indexed too)."""
    if include is None:
        return []
    items = [include] if isinstance(include, (str, os.PathLike)) else list(include)
    folders = []
    for item in items:
        for part in str(item).split(",") if isinstance(item, str) else [item]:
            if not str(part).strip():
                continue
            path = Path(str(part).strip()).expanduser().resolve()
            if not path.exists():
                raise FileNotFoundError(f"harness include path not found: {path}")
            folders.append(path if path.is_dir() else path.parent)
    return list(dict.fromkeys(folders))


@functools.lru_cache(maxsize=4)
def _cached_manager(include: tuple[str, ...]) -> Any:
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None)


def task_manager(include: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> Any:
    """The harness' `TaskManager` with its own tasks and those under `include`.

    Indexing the harness' thousands of task YAMLs takes seconds, so one manager per set of
    include folders is kept for the life of the process (a `test` run scores before and after
    with the same tasks)."""
    require_lm_eval()  # also when a manager is cached: lm_eval may have gone since
    return _cached_manager(tuple(str(p) for p in include_folders(include)))


def _broken_yamls(include: Sequence[Path]) -> list[str]:
    """YAML files under `include` that the harness cannot load, with the reason: the harness
    skips them silently while indexing, so their tasks look merely "unknown"."""
    from lm_eval.tasks._yaml_loader import load_yaml

    broken = []
    for folder in include:
        for path in sorted(folder.glob("**/*.yaml")):
            try:
                cfg = load_yaml(path, resolve_func=False, recursive=True)
                if not isinstance(cfg, dict) or not ({"task", "group", "tag"} & set(cfg)):
                    continue
            except Exception as err:  # anything the harness would skip the file for
                broken.append(f"{path}: {type(err).__name__}: {err}")
    return broken


def check_limits(prefix: str = "--", **options: Any) -> None:
    """Counts given on the command line, checked before any model work: `<prefix>name` must
    be None or a positive whole number; `harness_limit` may also be a share in (0, 1) and
    `harness_num_fewshot` may be 0. (lm_eval's own messages for these came after the model
    had loaded and named none of our options.)"""
    for name, value in options.items():
        if value is None:
            continue
        share = name == "harness_limit" and isinstance(value, float) and 0 < value < 1
        whole = not isinstance(value, bool) and isinstance(value, int | float) and (
            float(value).is_integer())
        low = 0 if name == "harness_num_fewshot" else 1
        if not share and not (whole and value >= low):
            kind = ("a whole number >= 1 or a share in (0, 1)" if name == "harness_limit" else
                    f"a whole number >= {low}")
            raise ValueError(f"{prefix}{name} must be {kind}, got {value!r}")


def check_tasks(manager: Any, tasks: Sequence[str]) -> None:
    """A ValueError naming every task the harness does not know, with the closest names it
    does know, before any model work starts."""
    if not tasks:
        raise ValueError("no harness tasks given")
    known = manager.all_tasks
    known_set = set(known)
    problems = []
    for name in tasks:
        if name in known_set or (name.endswith(".yaml") and Path(name).is_file()):
            continue
        close = difflib.get_close_matches(name, known, n=6, cutoff=0.6)
        close += [k for k in known if name.lower() in k.lower() and k not in close]
        close = close[:6]
        hint = f"close task names: {', '.join(close)}" if close else "no task has a close name"
        problems.append(f"{name!r} ({hint})")
    if problems:
        include = [Path(p) for p in (manager.include_path or [])]
        message = f"unknown lm-evaluation-harness task {'; '.join(problems)}"
        broken = _broken_yamls(include)
        if broken:
            message += "; these YAML files under the include path do not load: " + "; ".join(
                broken)
        elif not include:
            message += "; a task of your own needs --harness_include <folder of task YAMLs>"
        raise ValueError(message)


class _DropMessages(logging.Filter):
    """Drops the harness' warnings about passing a model object, which we do on purpose."""

    needles = ("`pretrained` model kwarg is not of type", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(needle in str(record.msg) for needle in self.needles)


@functools.lru_cache(maxsize=1)
def _lm_class() -> type:
    """`InMemoryHFLM`, defined on first use because its base class lives in lm_eval."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    hf_logger = logging.getLogger(HFLM.__module__)
    if not any(isinstance(f, _DropMessages) for f in hf_logger.filters):
        hf_logger.addFilter(_DropMessages())

    class InMemoryHFLM(HFLM):
        """The harness' Hugging Face LM over a model object we already hold.

        `HFLM` accepts an instantiated model; what it does with one is kept (its tokenisation,
        batching, truncation and log-softmax are what make the numbers the harness' numbers).
        Only what assumes a hub checkpoint changes: the model info asks no hub for a commit
        hash, and the progress bars follow our `progress` setting.
        """

        def __init__(
            self,
            model: torch.nn.Module,
            tokenizer: Any,
            batch_size: int = 8,
            max_length: int | None = None,
            name: str | None = None,
            progress: bool = True,
        ) -> None:
            super().__init__(
                pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                max_length=max_length, backend="causal",
            )
            self.model_name = name
            self.progress = progress

        def get_model_info(self) -> dict[str, Any]:
            return {
                "model_name": self.model_name or "",
                "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(next(self._model.parameters()).dtype),
            }

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood_rolling(
                requests, disable_tqdm=disable_tqdm or not self.progress
            )

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().generate_until(
                requests, disable_tqdm=disable_tqdm or not self.progress
            )

    return InMemoryHFLM


def harness_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int = 8,
    max_length: int | None = None,
    name: str | None = None,
    progress: bool = True,
) -> Any:
    """An lm_eval `HFLM` (subclass) scoring `model` as it is now: LoRA layers on, off or merged,
    whatever they are set to when the harness calls it.

    A tokenizer without a pad token is copied first: the harness would give it one (its
    unk or eos token), which would change how the rest of the run pads."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer = copy.deepcopy(tokenizer)
    return _lm_class()(model, tokenizer, batch_size, max_length, name, progress)


@contextlib.contextmanager
def _harness_side_effects_contained() -> Iterator[None]:
    """Undo what a harness run changes in the process: `simple_evaluate` reseeds the global
    `random`, numpy and torch generators (a run's later sampling would depend on whether the
    harness ran), and bootstrapped stderrs run in a pool of processes forked from this one,
    which holds the model (and maybe CUDA or a DDP group): serial bootstrapping is safe.
    And the results' `git_hash` is asked of git quietly: the harness' own call printed
    "fatal: not a git repository" on every run outside a git checkout."""
    import numpy as np
    from lm_eval import evaluator

    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    git_hash = getattr(evaluator, "get_git_commit_hash", None)
    if git_hash is not None:
        evaluator.get_git_commit_hash = _quiet_git_hash
    try:
        yield
    finally:
        if git_hash is not None:
            evaluator.get_git_commit_hash = git_hash
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = multiproc
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _quiet_git_hash() -> str | None:
    """The working folder's git commit, as the harness records it; None outside a checkout
    (without git's "fatal: ..." on stderr)."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def run_harness(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    include: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    name: str | None = None,
    log_samples: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The harness' `simple_evaluate` on `model` as it is now; its raw result dict.

    Args:
        model: A causal LM (`transformers` Llama, our LoRA layers in it or not).
        tokenizer: Its tokenizer (a `transformers` tokenizer object).
        tasks: Harness task, group or tag names ("hellaswag,arc_easy" or a list).
        include: Folder(s) of task YAMLs of your own (the harness' `--include_path`).
        limit: At most this many documents per task (a float < 1: that share of them).
        num_fewshot: Shots, overriding each task's default (None keeps the task's own).
        batch_size: Requests per forward pass.
        name: The model's name in the harness' results.
        log_samples: Keep every document's requests and responses under "samples".
        progress: Show the harness' progress bars.
    """
    names = parse_tasks(tasks)
    manager = task_manager(include)
    check_tasks(manager, names)
    from lm_eval.evaluator import simple_evaluate

    with _harness_side_effects_contained(), evaluating(model, use_cache=False):
        lm = harness_lm(model, tokenizer, batch_size, name=name, progress=progress)
        result = simple_evaluate(
            model=lm, tasks=names, num_fewshot=num_fewshot, limit=limit,
            task_manager=manager, log_samples=log_samples, bootstrap_iters=BOOTSTRAP_ITERS,
        )
    if result is None:  # not rank 0 of a distributed harness run; we never start one
        raise RuntimeError("lm-evaluation-harness returned no results")
    return result


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # "N/A" stderrs, aliases
    return float(value)


def summarize(result: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{task or group: {metric: value, ..., "n": documents}}` from a harness result.

    The harness names a metric "acc,none" (metric, filter); here it is "acc", or
    "exact_match_strict-match" for a filter other than "none", so that the name is a valid
    metric name for every logger (MLflow refuses commas). Stderrs are "<metric>_stderr".
    A group's "n" is the sum over its tasks.
    """
    counts = {task: int(n.get("effective", n.get("original", 0)))
              for task, n in (result.get("n-samples") or {}).items()}
    members = result.get("group_subtasks") or {}

    def documents(name: str) -> int | None:
        if name in counts:
            return counts[name]
        parts = [documents(sub) for sub in members.get(name, [])]
        return sum(p for p in parts if p is not None) if parts else None

    out: dict[str, dict[str, float]] = {}
    for section in ("results", "groups"):
        for task, metrics in (result.get(section) or {}).items():
            row = out.setdefault(task, {})
            for key, value in metrics.items():
                if "," not in key or (number := _number(value)) is None:
                    continue
                metric, filter_name = key.split(",", 1)
                row[metric if filter_name == "none" else f"{metric}_{filter_name}"] = number
            n = documents(task)
            if n is not None:
                row["n"] = n
    return out


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: str | Sequence[str],
    include: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    name: str | None = None,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """Harness tasks on `model` as it is now, as `{task: {metric: value, "n": documents}}`
    (`summarize`); arguments as for `run_harness`."""
    return summarize(run_harness(
        model, tokenizer, tasks, include, limit, num_fewshot, batch_size, name,
        log_samples=False, progress=progress,
    ))
