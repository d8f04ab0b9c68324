"""`python -m lora_lightning export`: a training checkpoint as a PEFT adapter or a merged
Hugging Face model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from lora_lightning.lora import save_adapter, unload_lora
from lora_lightning.module import LoRAKnowledgeModule


def export_command(
    ckpt_path: str,
    output: str,
    format: Literal["adapter", "merged"] = "adapter",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
) -> Path:
    """Export a `fit` checkpoint.

    Args:
        ckpt_path: A checkpoint written by `python -m lora_lightning fit`.
        output: Folder to write.
        format: "adapter" writes a PEFT adapter (adapter_config.json +
            adapter_model.safetensors); "merged" folds the adapter into the base and writes a
            full Hugging Face model (safetensors) with its tokenizer.
        dtype: dtype of the merged model's weights ("auto": the base checkpoint's own).
    """
    from transformers import AutoTokenizer

    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path: no checkpoint file at {ckpt_path!r}")
    module = LoRAKnowledgeModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    if format == "adapter":
        save_adapter(module.model, out, module.base_model_name)
    else:
        model = module.model
        if dtype != "auto":  # cast first, so the merge rounds once, into the output dtype
            model.to(getattr(torch, dtype))
        unload_lora(model, merge=True)  # s*B@A formed in fp32, added, cast once
        model.config.use_cache = True
        model.save_pretrained(out, safe_serialization=True)
        AutoTokenizer.from_pretrained(module.base_model_name).save_pretrained(out)
    print(f"exported {format} to {out}")
    return out
