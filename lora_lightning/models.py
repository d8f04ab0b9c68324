"""Loading models: which checkpoint a name means, and loading it for training or inference.

Every command and the LightningModule resolve a model name here, so "no model given" or
`"world"` means the same thing everywhere: the synthetic world's base, built on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning import world
from lora_lightning.lora import load_adapter

__all__ = ["WORLD_MODEL", "load_base_model", "load_model", "resolve_model"]

WORLD_MODEL = "world"


def resolve_model(model_name_or_path: str | None, progress: bool = True) -> str:
    """A model path or hub id as given; None or "world" is the synthetic world's base model
    folder (built on first use)."""
    if model_name_or_path is not None and model_name_or_path != WORLD_MODEL:
        return model_name_or_path
    return str(world.ensure_world(progress=progress).model_dir)


def load_base_model(model_name_or_path: str, dtype: str = "auto") -> nn.Module:
    """`from_pretrained` with a clear error for a missing local checkpoint."""
    looks_local = (
        model_name_or_path.startswith((".", "/", "~")) or Path(model_name_or_path).exists()
    )
    if looks_local and not (Path(model_name_or_path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"model.model_name_or_path: no Hugging Face checkpoint (config.json) at "
            f"{model_name_or_path!r}"
        )
    from transformers import AutoModelForCausalLM

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=torch_dtype)


def load_model(
    model_name_or_path: str,
    adapter: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer ready for inference, with an adapter applied if given.

    device "auto" is CUDA when available; dtype "auto" is bfloat16 on CUDA and float32 on the
    CPU (CPU kernels for half types are slow). The commands (`categorize`, `evaluate`) load
    through here so that they agree on devices, dtypes and errors.
    """
    from transformers import AutoTokenizer

    dev = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else torch.device(device)
    )
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    model = load_base_model(model_name_or_path, dtype)
    if adapter is not None:
        load_adapter(model, adapter)
    model.to(dev).eval()
    return model, AutoTokenizer.from_pretrained(model_name_or_path)
