"""Fused LoRA linear kernels (Triton on CUDA, a fused torch formulation elsewhere).

Independent of Lightning and transformers: only torch, and triton (imported lazily, only when
the Triton backend is asked for). Not called ``kernels``: that import name belongs to Hugging
Face's hub kernels, which transformers requires since 5.25, and the two would shadow each other.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lora_kernels._common import draw_dropout_seed, validate
from lora_kernels.reference import lora_linear_reference
from lora_kernels.torch_backend import dropout_scale_mask, lora_linear_torch

__all__ = [
    "TRITON_MIN_TOKENS",
    "dropout_mask",
    "draw_dropout_seed",
    "lora_linear",
    "lora_linear_reference",
]

# "triton": every GEMM in Triton, the LoRA work fused into them; "triton-cublas": the big GEMMs in
# cuBLAS and only the dropout-masked LoRA work in Triton (same mask, same numbers up to rounding).
BACKENDS = ("auto", "triton", "triton-cublas", "torch")
# "auto" runs the Triton kernels on CUDA from this many tokens (rows of x) up. Below it a call is
# launch-bound: measured on an H200 (benchmarks/RESULTS.md), a 1.2B Llama trained on batches of
# 16 facts (450-700 tokens) ran 1.56x faster end to end on the torch path (cuBLAS), while at
# 8192 tokens x 4096 x 4096 the Triton kernels beat it (fwd+bwd 1.29 vs 1.40 ms).
TRITON_MIN_TOKENS = 2048


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"lora_linear: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":  # Triton where it runs natively (and is installed) and pays off
        tokens = x.numel() // max(x.shape[-1], 1)
        native = x.is_cuda and importlib.util.find_spec("triton") is not None
        return "triton" if native and tokens >= TRITON_MIN_TOKENS else "torch"
    if backend.startswith("triton") and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"lora_linear: backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 on the "
            "CPU)"
        )
    return backend


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """y = x W^T + b + s * (drop(x) A^T) B^T, differentiable in x, lora_a and lora_b.

    ``weight`` and ``bias`` are the frozen base layer: no gradient is ever computed for them.
    x [..., in], weight [out, in], bias [out] or None, lora_a [r, in], lora_b [out, r].
    The adapters may be kept in another float dtype (e.g. fp32 master weights); they are used in
    x's dtype and their gradients flow back in their own. Dropout (only when ``training``) uses a
    seed drawn from torch's global generator; for backward the Triton kernels regenerate the mask
    and the torch path keeps it bit-packed (1 bit per element), never full-size.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Mixed precision: run the whole layer in the autocast dtype, as F.linear would.
        dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return lora_linear(
                x.to(dtype),
                weight.to(dtype),
                None if bias is None else bias.to(dtype),
                lora_a,
                lora_b,
                scaling,
                dropout_p,
                training,
                backend,
            )
    validate(x, weight, bias, lora_a, lora_b, dropout_p)
    chosen = _resolve_backend(backend, x)
    lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    p = float(dropout_p) if training else 0.0
    seed = draw_dropout_seed() if p > 0.0 else 0
    if chosen == "torch":
        return lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling, p, seed)
    from lora_kernels.triton_backend import lora_linear_triton

    cublas = chosen == "triton-cublas"
    return lora_linear_triton(x, weight, bias, lora_a, lora_b, scaling, p, seed, cublas=cublas)


def dropout_mask(
    x: torch.Tensor, dropout_p: float, seed: int, backend: str = "auto"
) -> torch.Tensor:
    """The dropout multiplier (0 or 1/(1-p), shape and dtype of x) that ``lora_linear`` applies
    for ``seed`` on ``backend`` (both Triton backends draw the same mask). For tests and
    debugging: replay ``torch.manual_seed`` and call ``draw_dropout_seed()`` to get the seed a
    ``lora_linear`` call used."""
    chosen = _resolve_backend(backend, x)
    if chosen == "torch":
        return dropout_scale_mask(tuple(x.shape), dropout_p, seed, x.dtype, x.device)
    from lora_kernels.triton_backend import dropout_mask_triton

    return dropout_mask_triton(x, dropout_p, seed)
