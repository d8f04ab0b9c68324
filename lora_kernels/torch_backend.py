"""The fused LoRA linear in plain PyTorch: what CPU users run.

Compared with the textbook layer (PEFT: dropout, A, B, scale, add, each a separate full-size
tensor), the forward writes the base GEMM straight into the output and accumulates the LoRA
term into it with ``addmm_`` (no [M, out] temporaries), and the backward does the same for dx.

On a CPU the LoRA work is memory-bound, so what counts is the number of full-size passes over
[M, in] (measured: benchmarks/RESULTS.md, "CPU (measured)"):

- Dropout is drawn once, in the forward, from a seed (a ``torch.Generator``) as 16-bit uniforms
  laid out in bit planes and compared with the threshold 64 elements per int64 op, which gives
  the mask already bit-packed. That packed mask (1 bit per element of x: 1/32 of x in fp32) is
  what backward gets instead of regenerating it; no full-size mask and no drop(x) is saved.
  (On CUDA, where this path serves small launch-bound calls, whole 16-bit uniforms are compared
  and packed instead: a handful of kernels rather than one per bit plane.)
- The masked work runs per row block sized for L2: unpack the block's multipliers with one
  table gather, multiply into x, take its rows of S = drop(x) A^T (forward) or add
  mask * (dS A) into dx and accumulate dA (backward). drop(x) never exists beyond one block.
- dS and dB, the thin products that read all of dy, are written with the skinny operand on
  the left (``B^T dy^T``, ``S^T dy``): 1.4-1.8x faster with MKL on one thread than ``dy B`` and
  ``dy^T S``, and the transposed views cost nothing.

Saved for backward: x, the frozen weight, the adapters, S [M, r] and the packed mask.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch

from lora_kernels._common import (
    DROPOUT_LEVELS,
    dropout_keep_factor,
    dropout_threshold,
    fused_function,
    run_fused,
)


def _padded(numel: int) -> int:
    """numel rounded up to whole bytes of packed mask (8 elements)."""
    return (numel + 7) // 8 * 8


def uniform_bit_planes(
    numel: int, dropout_p: float, seed: int, device: torch.device
) -> tuple[torch.Tensor, int]:
    """The random bits behind the mask of a seed, and the threshold they are compared with.

    Element e of x owns a 16-bit uniform u_e; bit 15 - i of u_e is bit e % 64 of word e // 64
    of plane i (int64 [planes, ceil(numel / 64)], drawn by a seeded ``torch.Generator`` plane
    after plane). The element is kept when u_e >= t = ``dropout_threshold(p)``, so the keep
    probability is exactly 1 - t / 65536. Bits of u below the lowest set bit of t cannot change
    that comparison, so only the planes down to it are drawn (p = 0.5: one plane).
    """
    threshold = dropout_threshold(dropout_p)
    lowest = (threshold & -threshold).bit_length() - 1 if threshold else 16
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    words = (numel + 63) // 64
    planes = torch.randint(
        -(2**63), 2**63 - 1, (16 - lowest, words), dtype=torch.int64, generator=generator,
        device=device,
    )  # fmt: skip
    return planes, threshold


def packed_keep_mask(numel: int, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """The keep mask for a seed, bit-packed (uint8, ``_padded(numel) // 8`` bytes; element
    8i + j is bit j of byte i): what the forward saves for backward instead of regenerating it.

    On a CPU the comparison u >= t runs bit-sliced (``_sliced_keep_words``): a few dozen ops on
    1/64 of the elements, where comparing 16-bit integers and packing the result would make
    full-size passes. Elsewhere (CUDA, where the torch path serves small, launch-bound calls)
    the same kind of draw is compared and packed in a handful of kernels
    (``_compared_keep_bytes``) instead of one launch per bit plane.
    """
    if device.type != "cpu":
        return _compared_keep_bytes(numel, dropout_p, seed, device)
    return _sliced_keep_words(numel, dropout_p, seed, device).view(torch.uint8)[
        : _padded(numel) // 8
    ]  # little-endian: bit e % 64 of word e // 64 is bit e % 8 of byte e // 8


def _sliced_keep_words(
    numel: int, dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Keep bits, 64 elements per int64 word, from ``uniform_bit_planes`` compared bit-sliced
    from the most significant plane down: ``greater`` collects elements already above t,
    ``equal`` those still tied with it."""
    planes, threshold = uniform_bit_planes(numel, dropout_p, seed, device)
    if threshold == 0:  # p below 1/131072: nothing is dropped
        return torch.full(planes.shape[1:], -1, dtype=torch.int64, device=device)
    greater = torch.zeros_like(planes[0])
    equal: torch.Tensor | None = None  # None: every element still tied (all ones)
    for i, bits in enumerate(planes):
        if threshold >> (15 - i) & 1:  # t has a 1: a 0 in u falls below, a 1 stays tied
            equal = bits.clone() if equal is None else equal.bitwise_and_(bits)
        elif equal is None:  # t has a 0 and all are tied: a 1 in u is above t
            greater.bitwise_or_(bits)
        else:
            above = equal & bits
            greater.bitwise_or_(above)
            equal.bitwise_xor_(above)  # equal & ~bits
    return greater if equal is None else greater.bitwise_or_(equal)


# (w * _GATHER) >> 56 moves the low bit of each of the 8 bytes of w into one byte: byte j's bit
# lands on bit 56 + j and no two partial products share a bit, so nothing carries into the top
# byte (checked for all 256 patterns by tests/test_kernels.py).
_GATHER = 0x0102040810204080


def pack_keep(keep: torch.Tensor) -> torch.Tensor:
    """Bit-pack a flat bool tensor whose length is a multiple of 8: element 8i + j becomes bit j
    of byte i (uint8). Three elementwise ops on 1/8 of the elements, via the int64 view."""
    words = keep.view(torch.uint8).view(torch.int64)
    return ((words * _GATHER) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def _compared_keep_bytes(
    numel: int, dropout_p: float, seed: int, device: torch.device
) -> torch.Tensor:
    """Keep bits from whole 16-bit uniforms (four cut from each 64-bit draw of the seeded
    generator), compared as integers and packed: u >= t, keep probability 1 - t / 65536."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    padded = _padded(numel)
    words = torch.randint(
        -(2**63), 2**63 - 1, (padded // 4,), dtype=torch.int64, generator=generator, device=device
    )
    signed_threshold = dropout_threshold(dropout_p) - DROPOUT_LEVELS // 2
    return pack_keep(words.view(torch.int16) >= signed_threshold)  # int16 is u - 32768


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


def keep_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, float]:
    """The dropout keep mask (1 kept, 0 dropped) for a seed, and the 1/keep factor that goes
    with it. Identical every time it is called with the same arguments, and equal to what the
    forward packs (``packed_keep_mask``)."""
    packed = packed_keep_mask(math.prod(shape), dropout_p, seed, device)
    keep = unpack_scale(packed, shape, 0.0, dtype)  # factor 1 for p = 0: the bits themselves
    return keep, dropout_keep_factor(dropout_p)


def dropout_scale_mask(
    shape: tuple[int, ...], dropout_p: float, seed: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The inverted-dropout multiplier (0 or 1/keep) ``lora_linear_torch`` applies for a seed."""
    packed = packed_keep_mask(math.prod(shape), dropout_p, seed, device)
    return unpack_scale(packed, shape, dropout_p, dtype)


# Row blocks of x are sized so that one block of x, of its mask and of dx (or dy) stay in a
# core's L2 together: the masked and thin work then reads x and dy once from memory instead of
# making a full-size pass per elementwise op. Off the CPU there is one block (no Python loop).
_BLOCK_BYTES = 512 * 1024


def _row_blocks(x2: torch.Tensor) -> list[tuple[int, int]]:
    """[start, stop) row ranges covering x2, each a multiple of 8 rows (so every block starts
    on a byte of the packed mask) except the last."""
    m, k = x2.shape
    if x2.device.type != "cpu":
        return [(0, m)]
    rows = max(8, _BLOCK_BYTES // max(1, k * x2.element_size()) // 8 * 8)
    return [(start, min(start + rows, m)) for start in range(0, m, rows)]


def _block_scale(
    index: torch.Tensor, table: torch.Tensor, start: int, stop: int, k: int, work: torch.Tensor
) -> torch.Tensor:
    """The dropout multipliers of rows [start, stop) as a [stop - start, k] view of ``work``
    (``index``: the packed mask's bytes as int32, the index type ``index_select`` takes)."""
    first, last = start * k // 8, _padded(stop * k) // 8
    out = work[: (last - first) * 8].view(last - first, 8)
    torch.index_select(table, 0, index[first:last], out=out)
    return out.view(-1)[: (stop - start) * k].view(stop - start, k)


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
    """y and S = drop(x) A^T [M, r], plus the packed mask when there is dropout.

    The mask is drawn and packed for all of x at once (bit-sliced, 1/64 of the elements per
    op); then, per row block, its multipliers are unpacked, multiplied into x and the block's S
    rows taken, all inside L2 (drop(x) never exists beyond one block). The base GEMM is written
    first and the LoRA term added onto y while y is still in cache (writing S B^T first and
    accumulating the base GEMM onto it was measured slower: that write goes to cold memory).
    """
    m, k = x2.shape
    a_t = lora_a.t().contiguous()  # [in, r]: tiny
    s = x2.new_empty(m, lora_a.shape[0])
    packed = None
    if dropout_p == 0.0:
        torch.mm(x2, a_t, out=s)
    else:
        packed = packed_keep_mask(m * k, dropout_p, seed, x2.device)
        index = packed.to(torch.int32)
        table = _scale_table(dropout_p, x2.dtype, x2.device)
        blocks = _row_blocks(x2)
        work = x2.new_empty(_padded((blocks[0][1] - blocks[0][0]) * k))
        for start, stop in blocks:
            dropped = _block_scale(index, table, start, stop, k, work).mul_(x2[start:stop])
            torch.mm(dropped, a_t, out=s[start:stop])
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(s, lora_b.t(), alpha=scaling)
    return (y, s) if packed is None else (y, s, packed)


def _backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """dS and dB as one thin GEMM each over dy, the big dx GEMM, then per row block (in L2)
    the block's masked LoRA term of dx, (dS A) * mask, added onto dx and dA += dS^T (x *
    mask): x and the mask are read once, and neither the mask nor drop(x) is ever
    full-size."""
    x2, weight, lora_a, lora_b, s, *packed = ctx.saved_tensors
    scaling, dropout_p = ctx.scaling, ctx.dropout_p
    dy2 = dy.reshape(-1, dy.shape[-1])
    need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
    d_s_t = (lora_b.t() @ dy2.t()).mul_(scaling)  # [r, M]: (dL/dS)^T
    grad_b = (s.t() @ dy2).t().mul_(scaling) if need_b else None
    grad_x = dy2 @ weight if need_x else None
    grad_a = None
    if dropout_p == 0.0:
        if grad_x is not None:
            grad_x.addmm_(d_s_t.t(), lora_a)
        if need_a:
            grad_a = d_s_t @ x2
    elif need_x or need_a:
        grad_a = _masked_backward(x2, lora_a, d_s_t, grad_x, packed[0], dropout_p, need_a=need_a)
    if grad_x is not None:
        grad_x = grad_x.view(ctx.x_shape)
    return grad_x, None, None, grad_a, grad_b, None, None, None


_LoRALinearTorch = fused_function("_LoRALinearTorch", _forward, _backward)


def _masked_backward(
    x2: torch.Tensor,
    lora_a: torch.Tensor,
    d_s_t: torch.Tensor,
    grad_x: torch.Tensor | None,
    packed: torch.Tensor,
    dropout_p: float,
    need_a: bool,
) -> torch.Tensor | None:
    """Add mask * (dS A) into ``grad_x`` (when given) and return dA = dS^T (x * mask) (when
    ``need_a``), one row block at a time. 16-bit dtypes sum the per-block dA partials in fp32,
    as one GEMM would inside."""
    m, k = x2.shape
    acc_dtype = torch.float32 if x2.element_size() < 4 else x2.dtype
    grad_a = torch.zeros(lora_a.shape, dtype=acc_dtype, device=x2.device) if need_a else None
    index = packed.to(torch.int32)
    table = _scale_table(dropout_p, x2.dtype, x2.device)
    blocks = _row_blocks(x2)
    rows = blocks[0][1] - blocks[0][0]
    work = x2.new_empty(_padded(rows * k))
    lora_term = x2.new_empty(rows, k) if grad_x is not None else None  # both or neither
    for start, stop in blocks:
        d_s_block = d_s_t[:, start:stop]
        scale = _block_scale(index, table, start, stop, k, work)
        if grad_x is not None and lora_term is not None:
            term = torch.mm(d_s_block.t(), lora_a, out=lora_term[: stop - start])
            grad_x[start:stop].addcmul_(term, scale)
        if grad_a is not None:
            dropped = scale.mul_(x2[start:stop])
            if acc_dtype == x2.dtype:
                grad_a.addmm_(d_s_block, dropped)
            else:
                grad_a.add_(d_s_block @ dropped)
    return None if grad_a is None else grad_a.to(x2.dtype)


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
    return run_fused(_LoRALinearTorch, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
