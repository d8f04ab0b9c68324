"""Plain-PyTorch LoRA linear: the definition of correct that every backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "torch",
) -> torch.Tensor:
    """y = x W^T + b + s * (drop(x) A^T) B^T, written the obvious way (autograd does backward).

    Adapters are used in x's dtype, as ``lora_linear`` does. ``backend`` is accepted for
    signature parity and ignored; the dropout draws from torch's own RNG, so compare against a
    fused backend with dropout only through an explicit mask (see ``lora_kernels.dropout_mask``).
    """
    del backend
    base = F.linear(x, weight, bias)
    dropped = F.dropout(x, p=dropout_p, training=training) if dropout_p > 0 else x
    lora = F.linear(F.linear(dropped, lora_a.to(x.dtype)), lora_b.to(x.dtype))
    return base + scaling * lora
