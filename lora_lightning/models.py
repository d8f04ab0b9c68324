"""Loading models: which checkpoint a name means, and loading it for training or inference.

Every command and the LightningModule resolve a model name here, so "no model given" or
`"world"` means the same thing everywhere: the synthetic world's base, unpacked on first use. A
name that is neither a model folder nor a plausible hub id fails here, in one line naming it,
before anything is loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.facts import TextLimit, excerpt
from lora_lightning.files import (
    default_home,
    package_file,
    plain_mode,
    sha256_file,
    write_problem,
)
from lora_lightning.lora import load_adapter

__all__ = [
    "WORLD_MODEL",
    "check_model_path",
    "check_world_facts",
    "context_length",
    "gguf_folder",
    "is_gguf",
    "load_base_model",
    "load_model",
    "load_tokenizer",
    "package_file",
    "resolve_model",
    "resolve_tokenizer",
    "text_limit",
    "world_model_dir",
]

WORLD_MODEL = "world"
# A hub id: "name" or "owner/name" (huggingface_hub's own rule, without its 33-frame traceback).
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_EXPECTED = (
    "expected a Hugging Face model folder (config.json, weights, tokenizer, as save_pretrained "
    "writes it), a .gguf file, a file shipped in an installed package (pkg:<package>/<file>), "
    "or a hub id such as meta-llama/Llama-3.1-8B-Instruct"
)
GGUF_SUFFIX = ".gguf"
GGUF_DIR = "gguf"  # under $LORA_LIGHTNING_HOME: one dequantized HF folder per GGUF file
# what a GGUF reader raises on a cut or damaged file: numpy's views of bytes that are not there
_UNREADABLE_GGUF = (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError,
                    MemoryError, EOFError)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def is_gguf(name: str | None) -> bool:
    """Whether a model name is a GGUF file (llama.cpp's format, e.g. a quantized checkpoint)."""
    return isinstance(name, str) and name.lower().endswith(GGUF_SUFFIX)


def _check_source(name: str, what: str, needs: tuple[str, ...], kind: str) -> None:
    name = package_file(name, what)
    path = Path(name).expanduser()
    if is_gguf(name):
        if not path.is_file():
            raise FileNotFoundError(f"{what}: no GGUF file at {name!r}")
        return
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{what}: {name!r} is a file; {_EXPECTED}")
        if not any((path / f).is_file() for f in needs):
            ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
            if ggufs:
                raise FileNotFoundError(
                    f"{what}: {name!r} holds GGUF file(s) ({', '.join(ggufs[:3])}) but no "
                    f"{' / '.join(needs)}; pass the .gguf file itself"
                )
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
    without config.json, a file that is no .gguf, a string that is no hub id, or (offline) a
    hub id that is not in the local Hugging Face cache."""
    _check_source(name, what, ("config.json",), "model")


def world_model_dir(progress: bool = True) -> Path:
    """The synthetic world's base model folder (unpacked on first use). The world package is
    imported here, not at the top: loading any other model needs none of its builder."""
    from lora_lightning.world.cache import ensure_world

    return ensure_world(progress=progress).model_dir


def resolve_model(model_name_or_path: str | None, progress: bool = True) -> str:
    """A model path or hub id as given (checked by `check_model_path`); None or "world" is the
    synthetic world's base model folder (unpacked on first use); a .gguf file is the HF folder it
    is dequantized into once (`gguf_folder`)."""
    if is_gguf(model_name_or_path):
        return gguf_folder(model_name_or_path, progress=progress)
    if model_name_or_path is not None and model_name_or_path != WORLD_MODEL:
        check_model_path(model_name_or_path)
        return package_file(model_name_or_path)
    return str(world_model_dir(progress))


def resolve_tokenizer(name_or_path: str | None, progress: bool = True) -> str:
    """Where a tokenizer comes from: None or "world" is the world's base model folder, a .gguf
    file its HF folder, anything else as given (a tokenizer-only folder is fine;
    `load_tokenizer` checks it)."""
    if is_gguf(name_or_path):
        return gguf_folder(name_or_path, progress=progress)
    if name_or_path is not None and name_or_path != WORLD_MODEL:
        return package_file(name_or_path, "tokenizer")
    return str(world_model_dir(progress))


def _gguf_field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")


def _check_gguf(path: Path) -> Any:
    """The file's header, read without loading it: a Llama, with tensor types transformers can
    dequantize (through the `gguf` package), or one line saying what is not."""
    try:
        import gguf
        from gguf.quants import _type_traits
    except ImportError as err:
        raise ValueError(
            f"{path}: loading a GGUF file needs the `gguf` package: pip install gguf (or "
            "\"lora-lightning[real]\")"
        ) from err
    try:
        reader = gguf.GGUFReader(str(path))
        arch = _gguf_field(reader, "general.architecture")
        types = {t.tensor_type for t in reader.tensors}
    except _UNREADABLE_GGUF as err:
        raise ValueError(
            f"{path}: not a readable GGUF file ({type(err).__name__}: {_first_line(err)}); it "
            "may be cut short (an interrupted download or copy): download or copy it again"
        ) from err
    if arch != "llama":
        raise ValueError(
            f"{path}: a GGUF model of architecture {arch!r}; lora-lightning trains Llama "
            "checkpoints (GGUF architecture 'llama', transformers' LlamaForCausalLM)"
        )
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    unsupported = sorted(t.name for t in types if t not in plain and t not in _type_traits)
    if unsupported:
        raise ValueError(
            f"{path}: tensors stored as {', '.join(unsupported)}, which the gguf package "
            "transformers dequantizes with cannot read; convert the model with another "
            f"quantization (e.g. Q8_0, Q4_K_M, F16) or load its original weights"
        )
    return reader


def gguf_folder(path: str, progress: bool = True) -> str:
    """The plain Hugging Face folder a GGUF file is dequantized into, made on first use.

    transformers loads a GGUF file (`from_pretrained(folder, gguf_file=...)`) and dequantizes
    it to float weights, which takes a while and refuses `save_pretrained` ("quantized with
    gguf and is not serializable"). So the weights are copied once into a plain
    `LlamaForCausalLM` and saved with the tokenizer under `$LORA_LIGHTNING_HOME/gguf/
    <stem>-<sha256[:16]>/`, keyed by the file's checksum: later runs load that folder as any
    model, and adapters record it as their base, which PEFT loads.

    The folder is made in a temporary sibling and renamed when complete, under a file lock; a
    temporary folder left by a writer that was killed (the size of the dequantized model, ~16 GB
    for an 8B one) is removed by the next caller that holds the lock, which says so.
    """
    source = Path(package_file(path, "model")).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"model: no GGUF file at {path!r}")
    digest = sha256_file(source)
    root = default_home() / GGUF_DIR / f"{source.stem}-{digest[:16]}"
    done = root / "gguf_source.json"
    from filelock import FileLock, Timeout

    if done.is_file():
        if _stale_temp_folders(root):  # left by a killed writer beside the finished folder
            with contextlib.suppress(Timeout, OSError), FileLock(str(root) + ".lock",
                                                                 timeout=0):
                _remove_stale_temp_folders(root)
        return str(root)
    _check_gguf(source)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _home_problem(err, root) from err
    with FileLock(str(root) + ".lock"):
        _remove_stale_temp_folders(root)  # only a writer holding this lock makes them
        if done.is_file():  # another process made it while we waited
            return str(root)
        if progress:
            print(f"dequantizing {source} into {root} (once)", flush=True)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(root), dir=root.parent))
        except OSError as err:
            raise _home_problem(err, root) from err
        try:
            _dequantize(source, tmp)
            (tmp / done.name).write_text(json.dumps(
                {"gguf": str(source.resolve()), "sha256": digest}, indent=1))
            plain_mode(tmp, tree=True)
            if root.exists():  # an incomplete earlier attempt
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            problem = write_problem(err, root, "cannot write the dequantized model to",
                                    "or set LORA_LIGHTNING_HOME to a folder with room for it")
            if problem is not None:
                raise problem from err
            raise
    return str(root)


def _temp_prefix(root: Path) -> str:
    return f".{root.name}.tmp-"


def _stale_temp_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.parent.glob(_temp_prefix(root) + "*") if p.is_dir())


def _remove_stale_temp_folders(root: Path) -> None:
    """Remove the temporary folders of earlier writers of `root`; call it holding `root`'s
    lock, which every writer holds while its temporary folder exists, so their writers are
    dead (killed midway)."""
    stale = _stale_temp_folders(root)
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        print(f"removed {len(stale)} temporary folder(s) left by an interrupted "
              f"dequantization of {root.name} in {root.parent}", file=sys.stderr, flush=True)


def _home_problem(err: OSError, root: Path) -> OSError:
    return write_problem(err, root.parent, "cannot write the dequantized model to",
                         "set LORA_LIGHTNING_HOME to a writable folder") or err


def _dequantize(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError, OSError) as err:
        raise ValueError(f"{source}: transformers cannot load it: {_first_line(err)}") from err
    settings = loaded.config.to_dict()
    for key in ("quantization_config", "architectures", "model_type", "transformers_version"):
        settings.pop(key, None)
    plain = LlamaForCausalLM(LlamaConfig(**settings))
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _is_world_model(model_name_or_path: str | None, what: str) -> bool:
    if model_name_or_path in (None, WORLD_MODEL):
        return True
    check_model_path(model_name_or_path, what)  # a path that is no model: the first thing to say
    path = Path(model_name_or_path).expanduser().resolve()
    home = default_home().expanduser().resolve()
    # Only a folder inside the world cache can be the world's base: compare it with the built
    # world's (cheap once built) without building a world for every other model.
    return home in path.parents and path == world_model_dir(progress=False).resolve()


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
    if is_gguf(model_name_or_path):
        model_name_or_path = gguf_folder(model_name_or_path)
    check_model_path(model_name_or_path)
    model_name_or_path = package_file(model_name_or_path)
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

    if is_gguf(name_or_path):
        name_or_path = gguf_folder(name_or_path)
    _check_source(name_or_path, what, _TOKENIZER_FILES, "tokenizer")
    name_or_path = package_file(name_or_path, what)
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
    if is_gguf(model_name_or_path):
        model_name_or_path = gguf_folder(model_name_or_path)
    config = Path(package_file(model_name_or_path)).expanduser() / "config.json"
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
