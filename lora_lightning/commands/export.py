"""`python -m lora_lightning export`: a training checkpoint as a PEFT adapter or a merged
Hugging Face model."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch

from lora_lightning.files import plain_mode, write_problem
from lora_lightning.lora import save_adapter, unload_lora
from lora_lightning.models import load_tokenizer
from lora_lightning.module import LoRAKnowledgeModule, read_checkpoint


def export_command(
    ckpt_path: str,
    output: str,
    format: Literal["adapter", "merged"] = "adapter",
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
    overwrite: bool = False,
) -> Path:
    """Export a `fit` checkpoint.

    The export is written into a temporary folder beside `output` and renamed into place when
    complete, so `output` never holds half an export, nor a mix of an old export's files and a
    new one's (an adapter and a merged model in one folder load as neither).

    Args:
        ckpt_path: A checkpoint written by `python -m lora_lightning fit`.
        output: Folder to write; it must not exist or be empty, unless `overwrite`.
        format: "adapter" writes a PEFT adapter (adapter_config.json +
            adapter_model.safetensors); "merged" folds the adapter into the base and writes a
            full Hugging Face model (safetensors) with its tokenizer.
        dtype: dtype of the merged model's weights ("auto": the base checkpoint's own).
        overwrite: Replace a non-empty `output` folder (all of its contents) with the export.
    """
    read_checkpoint(ckpt_path, what="ckpt_path")  # one clear line for a missing/damaged file
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output: {output!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output: {output!r} is not empty; pass --overwrite to replace its contents, or "
            "choose a new folder"
        )
    module = LoRAKnowledgeModule.load_from_checkpoint(ckpt_path, map_location="cpu")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except OSError as err:
        raise write_problem(err, out, "cannot export to") or err from err
    try:
        if format == "adapter":
            save_adapter(module.model, staging, module.base_model_name)
        else:
            model = module.model
            if dtype != "auto":  # cast first, so the merge rounds once, into the output dtype
                model.to(getattr(torch, dtype))
            unload_lora(model, merge=True)  # s*B@A formed in fp32, added, cast once
            model.config.use_cache = True
            model.save_pretrained(staging, safe_serialization=True)
            load_tokenizer(module.base_model_name).save_pretrained(staging)
        plain_mode(staging, tree=True)  # an output: the umask's modes, not mkdtemp's 0700
        _move_into_place(staging, out)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        # a full disk: safetensors' error names no path, an OSError the temporary folder
        if isinstance(err, Exception) and (
                problem := write_problem(err, out, "cannot export to")) is not None:
            raise problem from err
        raise
    print(f"exported {format} to {out}")
    return out


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished export to `out`; an existing `out` is set aside first and removed
    only once the new one is in place, so a failure leaves the old folder or the new one."""
    if not out.exists():
        staging.rename(out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    old.rmdir()
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
