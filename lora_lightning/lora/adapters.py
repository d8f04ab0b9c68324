"""LoRA adapters in PEFT's file format, and the checks that an adapter fits a model.

Adapters are written exactly as PEFT writes them (`adapter_config.json` +
`adapter_model.safetensors`), because the point of training one here is to use it anywhere:
`peft.PeftModel.from_pretrained` loads ours, and `load_adapter` loads PEFT's. PEFT itself is not
needed at run time.

Base-model check in `load_adapter`: shapes are always checked. Beyond that, `save_adapter`
stores a small fingerprint of the base weights (8 sampled values per wrapped layer, rounded to
bf16, compared within one bf16 step) in the safetensors metadata, which PEFT ignores. When both
sides have it, it decides: the same checkpoint at a local path and as a hub id matches, and a
different model under the same name does not. Without it (PEFT-written adapters, or one saved
from a merged model) the normalised names are compared: `meta-llama/Llama-3.1-8B-Instruct`,
`/ckpt/Llama-3.1-8B-Instruct/` and `.../models--meta-llama--Llama-3.1-8B-Instruct/snapshots/<sha>`
all normalise to `llama-3.1-8b-instruct`, and an unknown name on either side skips that check.
`strict=False` turns an identity mismatch into a warning; key and shape mismatches are always
errors.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lora_lightning.files import plain_mode
from lora_lightning.lora.layer import LoRALinear, lora_modules
from lora_lightning.lora.targets import (
    adaptable_modules,
    check_target_spec,
    inject_lora,
    linear_modules,
    matches_target,
    resolve_targets,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "check_adapter_folder",
    "load_adapter",
    "peft_state_dict",
    "save_adapter",
]

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_ADAPTER_BIN_NAME = "adapter_model.bin"  # PEFT's pre-safetensors format, still found on the hub
_PEFT_PREFIX = "base_model.model."
_FINGERPRINT_KEY = "lora_lightning.base_fingerprint"
_FINGERPRINT_SAMPLES = 8
_FINGERPRINT_MIN_AGREEMENT = 0.9  # tolerate a few values that round differently (fp16 loads)
_PEFT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$"
)


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter keyed as PEFT saves it (`base_model.model.<module>.lora_A.weight`)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        state[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_a.detach()
        state[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_b.detach()
    return state


T = TypeVar("T")


def _uniform(attribute: str, per_layer: Iterable[T]) -> T:
    values = set(per_layer)
    if len(values) != 1:
        raise ValueError(
            f"save_adapter writes one {attribute} for all layers (PEFT's rank_pattern and "
            f"alpha_pattern are not supported), but the LoRA layers have "
            f"{sorted(values, key=str)}"
        )
    return values.pop()


def _target_list(model: nn.Module, wrapped: Sequence[str]) -> list[str]:
    """The target list PEFT resolves to exactly the wrapped layers: their last name parts when
    those select nothing else (PEFT matches a list against every module, not only linear ones),
    else the full names. A list and not the spec the layers were injected with (a regex,
    `"all-linear"`): a list means one thing to every PEFT version, and it states the layers."""
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    covered = {
        name for name in adaptable_modules(model) if any(matches_target(name, s) for s in suffixes)
    }
    return suffixes if covered == set(wrapped) else sorted(wrapped)


def _weight_samples(weights: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """A few evenly spaced values of each base weight: the base-model fingerprint.

    Rounded to bf16 so that the same checkpoint loaded in bf16, fp16 or fp32 gives the same
    values; integer positions so that CPU and GPU pick the same elements.
    """
    fingerprint: dict[str, list[float]] = {}
    for name, weight in weights.items():
        flat = weight.detach().reshape(-1)
        steps = torch.arange(_FINGERPRINT_SAMPLES, dtype=torch.int64)
        idx = (steps * (flat.numel() - 1) // (_FINGERPRINT_SAMPLES - 1)).to(flat.device)
        fingerprint[name] = flat[idx].to(torch.bfloat16).float().cpu().tolist()
    return fingerprint


def _model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _normalise_name(name: str | None) -> str | None:
    """Reduce a hub id or a local path to the model's own name, lower-cased."""
    if not name:
        return None
    parts = [p for p in str(name).replace("\\", "/").split("/") if p]
    if not parts:
        return None
    for part in reversed(parts):  # a hub cache path: .../models--org--name/snapshots/<sha>
        if part.startswith("models--"):
            return part.rsplit("--", 1)[-1].lower()
    return parts[-1].lower()


def save_adapter(
    model: nn.Module, directory: str | Path, base_model_name: str | None = None
) -> Path:
    """Write the model's LoRA adapter in PEFT's format to `directory` (created if needed).

    `base_model_name` (default: the model's `config._name_or_path`) goes to
    `base_model_name_or_path`, from which PEFT loads the base when asked to: pass the hub id
    when the model was loaded from a local copy. Weights are saved in the adapter's dtype (fp32
    for a bf16 model, as PEFT does); a merged model saves the same adapter as an unmerged one.
    """
    if base_model_name is None:
        base_model_name = _model_name(model)
    modules = lora_modules(model)
    if not modules:
        raise ValueError(
            f"save_adapter: {type(model).__name__} has no LoRA layers; inject_lora first"
        )
    rank = _uniform("rank", (m.rank for m in modules.values()))
    alpha = _uniform("alpha", (m.alpha for m in modules.values()))
    config: dict[str, object] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "revision": None,
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": _uniform("dropout", (m.dropout for m in modules.values())),
        "use_rslora": _uniform("use_rslora", (m.use_rslora for m in modules.values())),
        "target_modules": _target_list(model, list(modules)),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.contiguous().cpu() for k, v in peft_state_dict(model).items()}
    metadata = {"format": "pt"}
    if not any(m.merged for m in modules.values()):  # merged weights are not the base's
        samples = _weight_samples({n: m.base.weight for n, m in modules.items()})
        metadata[_FINGERPRINT_KEY] = json.dumps(
            {"samples_per_layer": _FINGERPRINT_SAMPLES, "layers": samples}
        )
    save_file(tensors, str(directory / ADAPTER_WEIGHTS_NAME), metadata=metadata)
    plain_mode(directory / ADAPTER_WEIGHTS_NAME)  # safetensors writes it 0600 whatever the umask
    return directory


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {config['peft_type']!r}; only LORA adapters load")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            raise ValueError(f"{path}: field {field!r} is missing")
    unsupported = {
        "use_dora": False,
        "fan_in_fan_out": False,
        "bias": "none",
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "exclude_modules": None,
        "target_parameters": None,
        "trainable_token_indices": None,
    }
    for field, plain in unsupported.items():
        value = config.get(field, plain)
        if value not in (plain, None):
            raise ValueError(
                f"{path}: field {field!r} = {value!r} is not supported (need {plain!r})"
            )
    return config


def _read_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    path = directory / ADAPTER_WEIGHTS_NAME
    if path.is_file():
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {}), path  # noqa: SIM118
    legacy = directory / _ADAPTER_BIN_NAME
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True), {}, legacy
    raise FileNotFoundError(
        f"{directory}: no adapter weights ({ADAPTER_WEIGHTS_NAME} or {_ADAPTER_BIN_NAME})"
    )


def _resolve_config_targets(model: nn.Module, targets: object, path: Path) -> list[str]:
    """The layers an adapter config's `target_modules` selects, by PEFT's rules (a regex string,
    `"all-linear"`, or a list of suffixes of which, as in PEFT, some may select nothing: a
    config written for several architectures still loads). The tensors are checked after."""
    if targets is None:
        raise ValueError(
            f"{path}: target_modules is null (an adapter on parameters, `target_parameters`, "
            "is not supported): the adapter names no layers to load into"
        )
    try:
        return resolve_targets(model, check_target_spec(targets), require_each=False)
    except ValueError as err:
        raise ValueError(f"{path}: the adapter does not fit this model: {err}") from err


def _check_identity(
    config: dict,
    metadata: dict[str, str],
    weights: dict[str, torch.Tensor],
    base_model_name: str | None,
    strict: bool,
    path: Path,
) -> None:
    problem = None
    stored = metadata.get(_FINGERPRINT_KEY)
    if stored is not None:
        try:
            layers = json.loads(stored)["layers"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: metadata {_FINGERPRINT_KEY!r} is malformed") from err
        ours = _weight_samples({n: weights[n] for n in layers if n in weights})
        pairs = [(a, b) for n in ours for a, b in zip(ours[n], layers[n], strict=False)]
        # within one bf16 step, for checkpoints stored in another precision than they run in
        agree = sum(abs(a - b) <= 2.0**-7 * max(abs(a), abs(b)) for a, b in pairs)
        agree /= max(len(pairs), 1)
        if agree < _FINGERPRINT_MIN_AGREEMENT:
            problem = (
                f"the adapter was trained on a different base model: only {agree:.0%} of the "
                f"sampled base weights agree (adapter base: "
                f"{config.get('base_model_name_or_path')!r}, model: {base_model_name!r})"
            )
    else:
        theirs = _normalise_name(config.get("base_model_name_or_path"))
        ours_name = _normalise_name(base_model_name)
        if theirs and ours_name and theirs != ours_name:
            problem = (
                f"the adapter's base model is {config.get('base_model_name_or_path')!r} but the "
                f"model is {base_model_name!r} (compared as {theirs!r} vs {ours_name!r})"
            )
    if problem is None:
        return
    if strict:
        raise ValueError(f"{path}: {problem}; to load it anyway pass strict=False (on the "
                         "command line: --strict false)")
    warnings.warn(f"{path}: {problem}; loading anyway (strict=False)", stacklevel=3)


def check_adapter_folder(directory: str | Path) -> Path:
    """The adapter's `adapter_config.json`, or one clear error naming the folder: missing, a
    file, or a folder that is no adapter (a merged model folder given as an adapter is said to
    be one). Cheap, so a command can check before it spends minutes loading a base model."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file, not a folder" if directory.exists() else "does not exist"
        raise FileNotFoundError(f"adapter folder {str(directory)!r} {what}")
    config_path = directory / ADAPTER_CONFIG_NAME
    if not config_path.is_file():
        hint = (
            "; it holds a config.json: a whole (e.g. merged) model, to load as the model "
            "itself, not as an adapter"
            if (directory / "config.json").is_file()
            else ""
        )
        raise FileNotFoundError(
            f"adapter folder {str(directory)!r} has no {ADAPTER_CONFIG_NAME}: not a PEFT adapter "
            f"folder (expected {ADAPTER_CONFIG_NAME} + {ADAPTER_WEIGHTS_NAME}){hint}"
        )
    return config_path


def load_adapter(
    model: nn.Module,
    directory: str | Path,
    strict: bool = True,
    base_model_name: str | None = None,
    backend: str = "auto",
) -> list[str]:
    """Load a LoRA adapter (ours or PEFT's) into `model`; return the names of the layers loaded.

    A model without LoRA layers gets them injected from the adapter's config (with `backend`);
    a model that has them must have them on exactly the adapter's target layers, and adopts the
    adapter's alpha, rsLoRA and dropout. Everything is checked before anything is changed.
    `strict` only governs the base-model identity check (see the module docstring); missing,
    unexpected or mis-shaped tensors always raise. `base_model_name` overrides the model's own
    `config._name_or_path` for that check.
    """
    directory = Path(directory)
    config_path = check_adapter_folder(directory)
    config = _read_config(config_path)
    tensors, metadata, weights_path = _read_tensors(directory)
    rank, alpha = config["r"], config["lora_alpha"]
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_rslora = bool(config.get("use_rslora", False))

    existing = lora_modules(model)
    if any(m.merged for m in existing.values()):
        raise RuntimeError("load_adapter: the model's LoRA layers are merged; unmerge them first")
    targets = _resolve_config_targets(model, config["target_modules"], config_path)
    if existing and set(targets) != set(existing):
        raise ValueError(
            f"{config_path}: the adapter targets {len(targets)} layers "
            f"({_target_list(model, targets)}) but the model has LoRA on {len(existing)} "
            f"({_target_list(model, list(existing))}); load it into a model without LoRA"
        )

    linears = linear_modules(model)
    layers = {name: linears[name] for name in targets}
    expected: dict[str, tuple[int, ...]] = {}
    for name, layer in layers.items():
        r = layer.rank if isinstance(layer, LoRALinear) else rank
        expected[f"{name}.lora_A.weight"] = (r, layer.in_features)
        expected[f"{name}.lora_B.weight"] = (layer.out_features, r)
    found: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        canonical = f"{match['module']}.lora_{match['ab']}.weight" if match else None
        if canonical not in expected:
            unexpected.append(key)
        else:
            found[canonical] = tensor
    missing = [f"{_PEFT_PREFIX}{k}" for k in expected if k not in found]
    if missing or unexpected:
        raise ValueError(
            f"{weights_path}: the tensors do not match the adapter's target layers; "
            f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}"
        )
    for key, tensor in found.items():
        if tuple(tensor.shape) != expected[key]:
            raise ValueError(
                f"{weights_path}: tensor {_PEFT_PREFIX}{key} has shape {list(tensor.shape)} but "
                f"this model needs {list(expected[key])} (another base model, or another "
                "LoRA rank than the model already has)"
            )
    weights = {
        name: layer.base.weight if isinstance(layer, LoRALinear) else layer.weight
        for name, layer in layers.items()
    }
    model_name = base_model_name if base_model_name is not None else _model_name(model)
    _check_identity(config, metadata, weights, model_name, strict, weights_path)

    if existing:
        for module in existing.values():
            module.configure(alpha, use_rslora, dropout)
    else:
        inject_lora(model, targets, rank, alpha, dropout, use_rslora, backend)
    modules = lora_modules(model)
    with torch.no_grad():
        for name in targets:
            modules[name].lora_a.copy_(found[f"{name}.lora_A.weight"])
            modules[name].lora_b.copy_(found[f"{name}.lora_B.weight"])
    return targets
