"""Fused LoRA linear kernels (Triton on CUDA, a fused torch formulation elsewhere).

Independent of Lightning and transformers: only torch (and triton where present).
"""

from __future__ import annotations

import torch

from kernels.reference import lora_linear_reference

__all__ = ["lora_linear", "lora_linear_reference"]


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
    """y = x W^T + b + s * (drop(x) A^T) B^T, differentiable in x, lora_a and lora_b."""
    # Placeholder dispatch until the fused backends land (kernels issue).
    return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, dropout_p, training)
