"""The fused LoRA linear in plain PyTorch: what CPU users run.

Compared with the textbook layer (PEFT: dropout, A, B, scale, add, each a separate full-size
tensor), the forward writes the base GEMM straight into the output and accumulates the LoRA
term into it with ``addmm_`` (no [M, out] temporaries); the backward writes the thin LoRA term
of dx first and lets the big dx GEMM accumulate onto it (``beta=1`` is free inside a GEMM).

Dropout: the forward draws the keep mask once from a seed (a ``torch.Generator``) and keeps it
bit-packed, 1 bit per element of x (1/32 of x in fp32, 1/16 in bf16), so that backward neither
stores a full-size mask or drop(x) nor pays to regenerate the draws. Only x, the frozen weight,
the adapters, the small S = drop(x) A^T [M, r] and that packed mask are saved.

The thin [M, r] products are computed as ``(A @ X^T)^T``-style transposed views: for MKL on one
thread a GEMM with the skinny operand on the left runs ~1.3-1.8x faster than the same product
written the natural way (measured, benchmarks/RESULTS.md), and a transposed view costs nothing.
"""

from __future__ import annotations

import functools
import math

import torch

from kernels._common import (
    DROPOUT_LEVELS,
    dropout_keep_factor,
    dropout_threshold,
    forward_and_save,
    run_fused,
)

# (w * _GATHER) >> 56 moves the low bit of each of the 8 bytes of w into one byte: byte j's bit
# lands on bit 56 + j, and no two partial products share a bit, so nothing carries into the top
# byte (checked for all 256 patterns by tests/test_kernels.py).
_GATHER = 0x0102040810204080


def _padded(numel: int) -> int:
    """numel rounded up to whole bytes of packed mask (8 elements)."""
    return (numel + 7) // 8 * 8


def _keep_bools(numel: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The keep decisions (True kept) for the first ``_padded(numel)`` elements, flat.

    Four 16-bit uniforms are cut from each 64-bit draw of the seeded generator: on a CPU this is
    about 3x cheaper than ``bernoulli_``. An element is kept when its uniform is at least
    ``dropout_threshold(p)`` of the 65536 levels, so the keep probability is
    1 - round(p * 65536) / 65536. Drawing a few more words for the padding does not change the
    first ones: the same seed gives the same mask for every element of x.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    padded = _padded(numel)
    words = torch.randint(
        -(2**63), 2**63 - 1, (padded // 4,), dtype=torch.int64, generator=generator, device=device
    )
    uniform16 = words.view(torch.int16)  # uniform on [-32768, 32767]
    return uniform16 >= dropout_threshold(dropout_p) - DROPOUT_LEVELS // 2


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """Bit-pack a flat bool tensor whose length is a multiple of 8: element 8i + j becomes bit j
    of byte i (uint8). Three elementwise ops on 1/8 of the elements, via the int64 view."""
    words = keep.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


@functools.lru_cache(maxsize=64)
def _scale_table(dropout_p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8]: row b holds the inverted-dropout multipliers (0 or 1/keep, in ``dtype``) of the
    8 elements whose keep bits form the byte b."""
    byte = torch.arange(256, device=device).unsqueeze(-1)
    bits = (byte >> torch.arange(8, device=device)).bitwise_and_(1)
    return bits.to(dtype).mul_(dropout_keep_factor(dropout_p))


def unpack_scale(
    packed: torch.Tensor, shape: tuple[int, ...], dropout_p: float, dtype: torch.dtype
) -> torch.Tensor:
    """The dropout multiplier (0 or 1/keep) of a packed mask as a fresh contiguous tensor of
    ``shape``: one table gather (8 values per byte), cheaper than comparing and converting."""
    table = _scale_table(dropout_p, dtype, packed.device)
    scale = table.index_select(0, packed.to(torch.int32)).view(-1)
    return scale[: math.prod(shape)].view(shape)


def packed_keep_mask(numel: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The keep mask for a seed, bit-packed (uint8, ``_padded(numel) // 8`` bytes): what the
    forward saves for backward instead of regenerating it."""
    return pack_keep(_keep_bools(numel, dropout_p, seed, device))


def keep_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, float]:
    """The dropout keep mask (1 kept, 0 dropped) for a seed, and the 1/keep factor that goes
    with it. Identical every time it is called with the same arguments, and equal to what the
    forward packs (see ``_keep_bools`` for how the draws become decisions)."""
    keep = _keep_bools(math.prod(shape), dropout_p, seed, device)[: math.prod(shape)]
    return keep.view(shape).to(dtype), dropout_keep_factor(dropout_p)


def dropout_scale_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The inverted-dropout multiplier (0 or 1/keep) ``lora_linear_torch`` applies for a seed."""
    packed = packed_keep_mask(math.prod(shape), dropout_p, seed, device)
    return unpack_scale(packed, shape, dropout_p, dtype)


def _forward(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, ...]:
    """y and S = drop(x) A^T (a transposed view of a contiguous [r, M]), plus the packed mask
    when there is dropout. drop(x) lives only inside this call."""
    packed = None
    dropped = x2
    if dropout_p != 0.0:
        packed = packed_keep_mask(x2.numel(), dropout_p, seed, x2.device)
        dropped = unpack_scale(packed, tuple(x2.shape), dropout_p, x2.dtype).mul_(x2)
    s = (lora_a @ dropped.t()).t()
    del dropped
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(s, lora_b.t(), alpha=scaling)
    return (y, s) if packed is None else (y, s, packed)


class _LoRALinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        return forward_and_save(
            ctx, _forward, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed
        )

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, s, *packed = ctx.saved_tensors
        scaling, dropout_p = ctx.scaling, ctx.dropout_p
        dy2 = dy.reshape(-1, dy.shape[-1])
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]

        d_s = (lora_b.t() @ dy2.t()).t().mul_(scaling)  # dL/dS, [M, r]
        grad_b = (s.t() @ dy2).t().mul_(scaling) if need_b else None
        scale = None
        if dropout_p != 0.0 and (need_x or need_a):
            scale = unpack_scale(packed[0], tuple(x2.shape), dropout_p, x2.dtype)
        grad_x = grad_a = None
        if need_x:
            # the thin LoRA term first, masked in place; the big GEMM then accumulates onto it
            grad_x = d_s @ lora_a
            if scale is not None:
                grad_x.mul_(scale)
            grad_x = grad_x.addmm_(dy2, weight).view(ctx.x_shape)
        if need_a:
            grad_a = d_s.t() @ (x2 if scale is None else scale.mul_(x2))  # scale -> drop(x)
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
