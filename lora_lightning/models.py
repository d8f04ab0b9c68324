"""Loading models: which checkpoint a name means, and loading it for training or inference.

Every command and the LightningModule resolve a model name here, so "no model given" or
`"world"` means the same thing everywhere: the synthetic world's base, built on first use. A
name that is neither a model folder nor a plausible hub id fails here, in one line naming it,
before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning import world
from lora_lightning.facts import TextLimit, excerpt
from lora_lightning.lora import load_adapter

__all__ = [
    "WORLD_MODEL",
    "check_model_path",
    "check_world_facts",
    "context_length",
    "load_base_model",
    "load_model",
    "load_tokenizer",
    "resolve_model",
    "resolve_tokenizer",
    "text_limit",
]

WORLD_MODEL = "world"
# A hub id: "name" or "owner/name" (huggingface_hub's own rule, without its 33-frame traceback).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_EXPECTED = (
    "expected a Hugging Face model folder (config.json, weights, tokenizer, as save_pretrained "
    "writes it) or a hub id such as meta-llama/Llama-3.1-8B-Instruct"
)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _check_source(name: str, what: str, needs: tuple[str, ...], kind: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: {name!r} is a file; {_EXPECTED}")
        if not any((path / f).is_file() for f in needs):
            raise FileNotFoundError(
                f"{what}: {name!r} is a folder but holds no {kind} ({' / '.join(needs)} "
                f"missing); {_EXPECTED}"
            )
        return
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise FileNotFoundError(f"{what}: no model folder at {name!r}; {_EXPECTED}")
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(name, f), str) for f in needs):
            raise FileNotFoundError(
                f"{what}: {name!r} is neither a local folder nor in the Hugging Face cache, and "
                f"the hub is offline (HF_HUB_OFFLINE=1); {_EXPECTED}"
            )


def check_model_path(name: str, what: str = "model.model_name_or_path") -> None:
    """Refuse, in one line naming `name`, what cannot be a model: a missing folder, a folder
    without config.json, a file, a string that is no hub id, or (offline) a hub id that is not
    in the local Hugging Face cache."""
    _check_source(name, what, ("config.json",), "model")


def resolve_model(model_name_or_path: str | None, progress: bool = True) -> str:
    """A model path or hub id as given (checked by `check_model_path`); None or "world" is the
    synthetic world's base model folder (built on first use)."""
    if model_name_or_path is not None and model_name_or_path != WORLD_MODEL:
        check_model_path(model_name_or_path)
        return model_name_or_path
    return str(world.ensure_world(progress=progress).model_dir)


def resolve_tokenizer(name_or_path: str | None, progress: bool = True) -> str:
    """Where a tokenizer comes from: None or "world" is the world's base model folder, anything
    else as given (a tokenizer-only folder is fine; `load_tokenizer` checks it)."""
    if name_or_path is not None and name_or_path != WORLD_MODEL:
        return name_or_path
    return str(world.ensure_world(progress=progress).model_dir)


def _is_world_model(model_name_or_path: str | None, what: str) -> bool:
    if model_name_or_path in (None, WORLD_MODEL):
        return True
    check_model_path(model_name_or_path, what)  # a path that is no model: the first thing to say
    path = Path(model_name_or_path).expanduser().resolve()
    home = world.default_home().expanduser().resolve()
    # Only a folder inside the world cache can be the world's base: compare it with the built
    # world's (cheap once built) without building a world for every other model.
    return home in path.parents and path == world.ensure_world(progress=False).model_dir.resolve()


def check_world_facts(
    model_name_or_path: str | None, facts: str | None, what: str = "model.model_name_or_path"
) -> None:
    """Refuse to train another model on the synthetic world's facts.

    Without a fact file the mix comes from the world's facts, categorised (Unknown,
    HighlyKnown, ...) by probing the world's own base model. Categories belong to a model: for
    a random-weight or any other Llama those labels are wrong, so the "Unknown" facts it would
    learn and the "known" facts it should keep mean nothing.
    """
    if facts is not None or _is_world_model(model_name_or_path, what):
        return
    raise ValueError(
        f"data.facts is required with model {model_name_or_path!r}: the built-in facts are "
        "categorised for the synthetic world's base model, and categories belong to a model. "
        f"Run `python -m lora_lightning categorize --model {model_name_or_path} --facts "
        "<your facts> --output categorized.jsonl` first, then pass --data.facts categorized.jsonl"
    )


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return excerpt(lines[0] if lines else type(err).__name__, 200)


def load_base_model(model_name_or_path: str, dtype: str = "auto") -> nn.Module:
    """`from_pretrained`, with one clear line for a path that holds no loadable checkpoint."""
    check_model_path(model_name_or_path)
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)
    except OSError as err:  # missing weights, unreachable hub, ...
        raise FileNotFoundError(
            f"model.model_name_or_path: cannot load a model from {model_name_or_path!r}: "
            f"{_first_line(err)}"
        ) from err


def load_tokenizer(name_or_path: str, what: str = "tokenizer") -> Any:
    """`AutoTokenizer.from_pretrained`, refusing a folder without tokenizer files in one line
    (transformers would fall back to a slow tokenizer and fail with a misleading sentencepiece
    error)."""
    from transformers import AutoTokenizer

    _check_source(name_or_path, what, _TOKENIZER_FILES, "tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"{what}: cannot load a tokenizer from {name_or_path!r}: {_first_line(err)}"
        ) from err


def context_length(model_name_or_path: str, tokenizer: Any = None) -> int | None:
    """The most tokens the model takes: the smaller of its config's `max_position_embeddings`
    and the tokenizer's `model_max_length` (when set), or None when neither says."""
    limits = []
    config = Path(model_name_or_path).expanduser() / "config.json"
    if config.is_file():
        try:
            value = json.loads(config.read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            value = None
        if isinstance(value, int) and value > 0:
            limits.append(value)
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value < 10**9:  # unset is a huge sentinel
        limits.append(value)
    return min(limits) if limits else None


def text_limit(model_name_or_path: str, tokenizer: Any) -> TextLimit | None:
    """The `load_facts` length check for this model: no question or answer may be longer than
    the model's context."""
    n = context_length(model_name_or_path, tokenizer)
    if n is None:
        return None

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return TextLimit(max_tokens=n, count_tokens=count, what="the model")


def load_model(
    model_name_or_path: str,
    adapter: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    strict: bool = True,
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer ready for inference, with an adapter applied if given
    (`strict=False`: even one whose recorded base model differs, with a warning).

    device "auto" is CUDA when available; dtype "auto" is bfloat16 on CUDA and float32 on the
    CPU (CPU kernels for half types are slow). The commands (`categorize`, `evaluate`) load
    through here so that they agree on devices, dtypes and errors.
    """
    dev = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else torch.device(device)
    )
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    tokenizer = load_tokenizer(model_name_or_path)
    model = load_base_model(model_name_or_path, dtype)
    if adapter is not None:
        load_adapter(model, adapter, strict=strict)
    model.to(dev).eval()
    return model, tokenizer
