"""The fused LoRA linear in plain PyTorch: what CPU users run.

Compared with the textbook layer (PEFT: dropout, A, B, scale, add, each a separate full-size
tensor), the forward writes the base GEMM straight into the output and accumulates the LoRA
term into it with ``addmm_`` (no [M, out] temporaries), and the backward does the same for dx.
The dropout mask is regenerated in backward from a seed (a ``torch.Generator``), so neither the
mask nor drop(x) is kept alive between forward and backward; only x, the frozen weight, the
adapters and the small S = drop(x) A^T [M, r] are saved.
"""

from __future__ import annotations

import math

import torch

from kernels._common import (
    DROPOUT_LEVELS,
    dropout_keep_factor,
    dropout_threshold,
    forward_and_save,
    run_fused,
)


def keep_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, float]:
    """The dropout keep mask (1 kept, 0 dropped) for a seed, and the 1/keep factor that goes
    with it. Identical every time it is called with the same arguments, which is what lets
    backward regenerate it. The factor is returned apart so that it can be applied to the thin
    [M, r] / [r, in] products instead of costing one more pass over [M, in].

    Four 16-bit uniforms are cut from each 64-bit draw of the seeded generator: on a CPU this is
    about 3x cheaper than ``bernoulli_`` (the regeneration in backward must not cost more than
    the mask PEFT stores). The keep probability is 1 - round(p * 65536) / 65536 and the factor
    is its exact inverse, so the expectation is preserved.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    numel = math.prod(shape)
    words = torch.randint(
        -(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, generator=generator,
        device=device,
    )  # fmt: skip
    uniform16 = words.view(torch.int16)[:numel].view(shape)  # uniform on [-32768, 32767]
    keep = uniform16 >= dropout_threshold(dropout_p) - DROPOUT_LEVELS // 2
    return keep.to(dtype), dropout_keep_factor(dropout_p)


def dropout_scale_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The inverted-dropout multiplier (0 or 1/keep) ``lora_linear_torch`` applies for a seed."""
    keep, factor = keep_mask(shape, dropout_p, seed, dtype, device)
    return keep.mul_(factor)


def _lora_s(x2: torch.Tensor, lora_a: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """S = drop(x) A^T, [M, r]; the dropped copy of x lives only inside this call."""
    if dropout_p == 0.0:
        return x2 @ lora_a.t()
    keep, factor = keep_mask(x2.shape, dropout_p, seed, x2.dtype, x2.device)
    return (keep.mul_(x2) @ lora_a.t()).mul_(factor)


def _forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    s = _lora_s(x2, lora_a, dropout_p, seed)
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(s, lora_b.t(), alpha=scaling)
    return y, s


class _LoRALinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        return forward_and_save(
            ctx, _forward, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed
        )

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, s = ctx.saved_tensors
        scaling, dropout_p = ctx.scaling, ctx.dropout_p
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]

        d_s = (dy2 @ lora_b).mul_(scaling)  # dL/dS, [M, r]
        grad_b = (dy2.t() @ s).mul_(scaling) if need_b else None
        grad_x = grad_a = None
        if dropout_p == 0.0:
            if need_x:
                grad_x = (dy2 @ weight).addmm_(d_s, lora_a)
            if need_a:
                grad_a = d_s.t() @ x2
        else:
            keep, factor = keep_mask(x2.shape, dropout_p, ctx.seed, x2.dtype, x2.device)
            if need_x:
                grad_x = (dy2 @ weight).addcmul_(d_s @ lora_a, keep, value=factor)
            if need_a:
                grad_a = (d_s.t() @ keep.mul_(x2)).mul_(factor)  # keep becomes drop(x) in place
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def lora_linear_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """Fused torch LoRA linear with an explicit dropout seed (``dropout_p`` already zero when
    not training). Arguments are assumed validated and in one dtype."""
    return run_fused(
        _LoRALinearTorch, _forward, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed
    )
