"""The fused LoRA linear as four Triton kernels (the LoRAFusion layout, docs/kernels.md).

forward   1. ``_lora_s``: S' = s * drop(x) A^T  [M, r], a thin GEMM (one read of x).
          2. ``_fwd``:    y = [x | S'] @ [W | B]^T + b: the LoRA term is one more K-step of the
             base GEMM's accumulator and the bias is added in the epilogue.
backward  3. ``_dy_pass``: dS = s dy B and dB = dy^T S' in one pass over dy.
          4. ``_dx``:     dx = dy W + drop'(dS A), the accumulator starting from the LoRA term,
             and, from the same x tile and regenerated mask, dA += dS^T drop(x).

``backend="triton-cublas"`` keeps the two big GEMMs (y = x W^T, dx = dy W) and the thin products
that need no mask in cuBLAS (through torch) and runs only the dropout-masked work in Triton:
``_lora_s`` for S', and ``_masked_grads`` for dx += drop'(dS A) and dA = dS^T drop(x) in one
read of x, with the same regenerated mask. It trades the fused K-step and epilogues for
cuBLAS's main loop: on an H200 the fused forward (``_lora_s`` and the GEMM with its LoRA step)
took 1.37x the base cuBLAS GEMM and the fused backward 1.91x (benchmarks/RESULTS.md).

Dropout is philox (``tl.randint4x``, one call per 8 elements as 16-bit uniforms) keyed by
(seed, row, column of x), so backward regenerates exactly the forward mask: no mask, no drop(x),
no fp32 copy of x is stored. Saved for backward: x (as given, no copy when it can be viewed as
2-D), the frozen W, A, B and S' [M, r]. p is used to the nearest 1/65536
and the kept values are scaled by the exact inverse of the resulting keep probability. The rank
is padded to a power of two >= 16 for ``tl.dot``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from lora_kernels._common import (
    Backward,
    dropout_keep_factor,
    dropout_threshold,
    fused_function,
    run_fused,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The interpreter's tl.dot hands bf16 bits to numpy as integers; upcasting the operands first is
# exact (bf16 products fit in fp32) and compiles away on a GPU.
_UPCAST_DOT = tl.constexpr(INTERPRET)


# The small-tile fallback configs, known by identity: always among the autotuner's candidates
# (the one that still launches where the tuned tiles run out of shared memory), alone for fp32
# at large ranks, where the tuned ones take minutes to compile (see `_candidates`). Not an
# attribute on the Config: Triton's on-disk autotune cache rebuilds a config from its
# __dict__ as `Config(**d)`, which an unknown key breaks.
_FALLBACKS: list[triton.Config] = []
_LARGE_RANK = 128  # a padded rank from which fp32 calls take the fallback configs
# An autotuner's `early_config_prune`: (configs, named_args, **kwargs) -> the configs to time.
Prune = Callable[..., list[triton.Config]]
# A backward's (dx, dA, dB) for 2-D dy, each None where its input needs no gradient.
Gradients = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


def _gemm_configs(
    reduce_name: str, out_name: str, interpret: bool = INTERPRET
) -> list[triton.Config]:
    """Autotune space for an [M, out] tile GEMM reducing over ``reduce``, plus a small-tile
    fallback (`is_fallback`); one tiny fixed config under the interpreter, where
    autotuning would only multiply an already slow run."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, out_name: 16, reduce_name: 16, "GROUP_M": 2})]
    shapes = [  # (BLOCK_M, out, reduce, stages, warps): H100-friendly bf16 tiles
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
    ]
    configs = [
        triton.Config(
            {"BLOCK_M": bm, out_name: bo, reduce_name: br, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bo, br, stages, warps in shapes
    ]
    fallback = triton.Config({"BLOCK_M": 32, out_name: 32, reduce_name: 32, "GROUP_M": 8},
                             num_stages=2, num_warps=4)
    _FALLBACKS.append(fallback)
    return [*configs, fallback]


def _thin_configs(reduce_name: str, interpret: bool = INTERPRET) -> list[triton.Config]:
    """Configs for the rank-wide kernels (S and the dy pass): bandwidth-bound row sweeps, and
    a small fallback (`is_fallback`) for large ranks, where the dy pass needs 262-610 KB of
    shared memory in every other config (bf16 and fp32 at rank 256)."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, reduce_name: 16})]
    configs = [
        triton.Config({"BLOCK_M": bm, reduce_name: br}, num_stages=stages, num_warps=warps)
        for bm, br, stages, warps in [
            (64, 64, 4, 4),
            (64, 128, 3, 4),
            (128, 64, 3, 8),
            (32, 256, 3, 4),
        ]
    ]
    fallback = triton.Config({"BLOCK_M": 16, reduce_name: 32}, num_stages=2, num_warps=4)
    _FALLBACKS.append(fallback)
    return [*configs, fallback]


def _stream_configs(interpret: bool = INTERPRET) -> list[triton.Config]:
    """Configs for ``_masked_grads``, a bandwidth-bound sweep over [M, in] in column strips
    (tiles and warps chosen so that none spills registers in bf16 at rank 16, compiled for
    sm_90), and a small fallback (`is_fallback`)."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16})]
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_stages=stages, num_warps=warps)
        for bm, bk, stages, warps in [
            (64, 128, 3, 8),
            (128, 64, 3, 8),
            (32, 256, 3, 8),
            (32, 128, 4, 4),
        ]
    ]
    fallback = triton.Config({"BLOCK_M": 16, "BLOCK_K": 32}, num_stages=2, num_warps=4)
    _FALLBACKS.append(fallback)
    return [*configs, fallback]


_FALLBACK_SMEM = 232448  # H100/H200: 227 KB of shared memory per program (opt-in)


def is_fallback(config: triton.Config) -> bool:
    """Whether `config` is a small-tile fallback (see `_candidates`)."""
    return any(config is fallback for fallback in _FALLBACKS)


def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one program may use on `device` (Triton's own figure)."""
    if device.type != "cuda":
        return _FALLBACK_SMEM
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
        return int(props["max_shared_mem"])
    except Exception:  # noqa: BLE001 - an unknown driver: assume the GPU the tiles are tuned for
        return _FALLBACK_SMEM


def shared_memory_bytes(
    config: triton.Config, reduce_name: str, out_name: str | None, block_r: int,
    element_size: int, resident: str | None = None, lora_first: bool = False,
) -> int:
    """The shared memory a config of these kernels takes on sm_90 in a real call: exact for the
    GEMMs and fp32 `_lora_s`, a lower bound for the dy pass and 16-bit `_lora_s`. Measured by
    compiling every config for H100 with Triton 3.9 as the JIT does at an aligned shape
    (16-byte aligned pointers, sizes divisible by 16, unit strides as constants); a test holds
    the formula to the compiler. Unaligned shapes are not pipelined and take less.

    The main loop keeps `num_stages` copies of its operand tiles, [M, reduce] and [reduce, out]
    (out = the rank in the thin kernels), in 16-bit dtypes and `num_stages - 1` in fp32; the
    16-bit thin kernels keep the rank-wide operand once. A GEMM's LoRA step, [M, r] and
    [r, out] tiles, reuses the pipeline's space when it follows the main loop (`_fwd`), and adds
    to it when it precedes it in 16-bit dtypes (`_dx`: `lora_first`). `resident` is a thin
    kernel's tile held beside the pipeline: "x" (fp32 `_lora_s`' x tile) or "s" (the dy pass'
    [M, r] tile).
    """
    bm, red = config.kwargs["BLOCK_M"], config.kwargs[reduce_name]
    wide = element_size >= 4
    stages = config.num_stages - 1 if wide else config.num_stages
    if out_name:
        out = config.kwargs[out_name]
        main, lora = stages * (bm * red + red * out), bm * block_r + block_r * out
        tiles = main + lora if lora_first and not wide else max(main, lora)
    elif wide:
        tiles = stages * (bm * red + red * block_r) + (bm * red if resident == "x" else 0)
    else:
        tiles = stages * bm * red + red * block_r
    if resident == "s":
        tiles += bm * block_r
    return tiles * element_size


def stream_shared_memory_bytes(config: triton.Config, block_r: int, element_size: int) -> int:
    """`shared_memory_bytes` for ``_masked_grads`` (same measurement): in fp32, exactly
    `num_stages - 1` copies of the [M, r] dS and [M, K] x tiles beside one more x tile and A's
    [r, K]; in 16-bit dtypes, at least `num_stages` copies of the x tile and A once."""
    bm, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"]
    if element_size >= 4:
        stages = config.num_stages - 1
        return (stages * (bm * bk + bm * block_r) + bm * bk + block_r * bk) * element_size
    return (config.num_stages * bm * bk + block_r * bk) * element_size


def _candidates(
    configs: list[triton.Config],
    size: Callable[[triton.Config], int],
    element_size: int,
    block_r: int,
    limit: int,
) -> list[triton.Config]:
    """The configs the autotuner should time: those whose `size` (a lower bound of their
    shared memory) fits in `limit`, the small fallback always among them; the fallback alone
    for fp32 at a padded rank of `_LARGE_RANK` or more; the smallest config if none fits.

    The fallback stays because a lower bound can pass a config that then fails at launch
    (bf16 at rank 256: every tuned dy-pass config needs 262-377 KB of the 227 KB there is),
    and the autotuner, which times every candidate, skips a config that runs out of resources
    and keeps the fastest one that ran. fp32 at large ranks takes the fallback alone: its dots
    are IEEE FMA loops, not tensor-core instructions, and at rank 256 the tuned tiles took
    26-166 s each to compile for sm_90 (the whole space ran past the CUDA test's 90 s limit on
    an H200), the 32-wide fallback tiles 1.5-3.5 s."""
    fitting = [c for c in configs if size(c) <= limit]
    fallback = [c for c in fitting if is_fallback(c)]
    if fallback and element_size >= 4 and block_r >= _LARGE_RANK:
        return fallback
    return fitting or [min(configs, key=size)]


def _pruning_inputs(named_args: dict[str, Any], kwargs: dict[str, Any]) -> tuple[int, int, int]:
    """(padded rank, element size, shared memory limit) of an autotuned call."""
    block_r = int(kwargs.get("BLOCK_R", named_args.get("BLOCK_R", 16)))
    tensor = next(v for v in named_args.values() if isinstance(v, torch.Tensor))
    return block_r, tensor.element_size(), _shared_memory_limit(tensor.device)


def prune_configs(
    reduce_name: str, out_name: str | None = None, resident: str | None = None,
    lora_first: bool = False,
) -> Prune:  # fmt: skip
    """An `early_config_prune` for the autotuner: the `_candidates` of a GEMM or thin kernel
    (arguments as `shared_memory_bytes`')."""

    def prune(
        configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
    ) -> list[triton.Config]:
        block_r, element_size, limit = _pruning_inputs(named_args, kwargs)

        def size(config: triton.Config) -> int:
            return shared_memory_bytes(config, reduce_name, out_name, block_r, element_size,
                                       resident, lora_first)

        return _candidates(configs, size, element_size, block_r, limit)

    return prune


def prune_stream_configs(
    configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any
) -> list[triton.Config]:
    """The `early_config_prune` of ``_masked_grads``: its `_candidates`."""
    block_r, element_size, limit = _pruning_inputs(named_args, kwargs)

    def size(config: triton.Config) -> int:
        return stream_shared_memory_bytes(config, block_r, element_size)

    return _candidates(configs, size, element_size, block_r, limit)


# The kernels' arguments stay unannotated, hence their `type: ignore[no-untyped-def]`: Triton
# reads a kernel's annotations (`tl.constexpr`, and a type such as `int` changes how an argument
# is specialised and compiled), and what they receive (pointers, tl.tensor blocks) has no Python
# type a checker knows.
@triton.jit
def _grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):  # type: ignore[no-untyped-def]
    """Grouped ordering of output tiles, so consecutive programs share operand tiles in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols):  # type: ignore[no-untyped-def]
    """ptr[rows, cols] with zeros outside [n_rows, n_cols]: how every operand tile is read, so
    partial edge tiles contribute nothing to a dot product."""
    return tl.load(
        ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
        mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols),
        other=0.0,
    )


@triton.jit
def _mma(a, b, acc, PRECISION: tl.constexpr):  # type: ignore[no-untyped-def]
    """acc + a @ b with fp32 accumulation (``tl.dot``), interpreter-safe for bf16."""
    if _UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _keep(seed, rows, col0, K, threshold, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):  # type: ignore[no-untyped-def]
    """Dropout keep decisions for x[rows, col0 : col0 + BLOCK_COLS] (col0 a multiple of 8).

    One philox call (``randint4x``: 4 x 32 bits) serves 8 consecutive columns as 16-bit
    uniforms, so the kernels spend 8x fewer integer ops on dropout than with one ``tl.rand``
    per element. The draw for x[m, k] depends only on (seed, m, k), never on the tile shape,
    so forward and backward (autotuned to different tiles) see the same mask.
    """
    GROUPS: tl.constexpr = BLOCK_COLS // 8
    groups = col0 // 8 + tl.arange(0, GROUPS)
    counters = rows[:, None].to(tl.int64) * ((K + 7) // 8) + groups[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_ROWS, BLOCK_COLS // 2))
    low = (words & 0xFFFF).to(tl.int32)
    high = (words >> 16).to(tl.int32)
    uniform16 = tl.reshape(tl.join(low, high), (BLOCK_ROWS, BLOCK_COLS))  # x[m, col0 + j]
    return uniform16 >= threshold


@triton.autotune(
    configs=_thin_configs("BLOCK_K"), key=["M_BUCKET", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": prune_configs("BLOCK_K", resident="x")},
)
@triton.jit
def _lora_s_kernel(  # type: ignore[no-untyped-def]
    x_ptr, a_ptr, s_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_sm, stride_sr,
    scale, threshold, seed,
    HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, M, K)
        if HAS_DROPOUT:
            keep = _keep(seed, rm, k0, K, threshold, BLOCK_M, BLOCK_K)
            x = tl.where(keep, x, tl.zeros_like(x))
        a = _load_tile(a_ptr, rk, rr, stride_ak, stride_ar, K, R)
        acc = _mma(x, a, acc, PRECISION)
    acc = acc * scale  # LoRA scaling times the inverted-dropout factor
    tl.store(
        s_ptr + rm[:, None] * stride_sm + rr[None, :] * stride_sr,
        acc.to(s_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rr[None, :] < R),
    )


@triton.autotune(
    configs=_gemm_configs("BLOCK_K", "BLOCK_N"), key=["M_BUCKET", "N", "K", "BLOCK_R"],
    prune_configs_by={"early_config_prune": prune_configs("BLOCK_K", "BLOCK_N")},
)
@triton.jit
def _fwd_kernel(  # type: ignore[no-untyped-def]
    x_ptr, w_ptr, bias_ptr, s_ptr, b_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr,
    stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rm, rk, stride_xm, stride_xk, M, K)
        w = _load_tile(w_ptr, rk, rn, stride_wk, stride_wn, K, N)
        acc = _mma(x, w, acc, PRECISION)
    # the concatenated-K step: [.. | S'] @ [.. | B]^T
    s = _load_tile(s_ptr, rm, rr, stride_sm, stride_sr, M, R)
    bt = _load_tile(b_ptr, rr, rn, stride_br, stride_bn, R, N)
    acc = _mma(s, bt, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rn[None, :] < N),
    )


@triton.autotune(
    configs=_thin_configs("BLOCK_N"), key=["M_BUCKET", "N", "BLOCK_R"], reset_to_zero=["db_ptr"],
    prune_configs_by={"early_config_prune": prune_configs("BLOCK_N", resident="s")},
)
@triton.jit
def _dy_pass_kernel(  # type: ignore[no-untyped-def]
    dy_ptr, b_ptr, s_ptr, ds_ptr, db_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr,
    stride_dsm, stride_dsr, stride_dbn, stride_dbr,
    scaling,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, BLOCK_R)
    s = _load_tile(s_ptr, rm, rr, stride_sm, stride_sr, M, R)
    ds = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        dy = _load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, M, N)
        b = _load_tile(b_ptr, rn, rr, stride_bn, stride_br, N, R)
        ds = _mma(dy, b, ds, PRECISION)
        db = _mma(tl.trans(dy), s, tl.zeros((BLOCK_N, BLOCK_R), tl.float32), PRECISION)
        tl.atomic_add(
            db_ptr + rn[:, None] * stride_dbn + rr[None, :] * stride_dbr,
            db,
            mask=(rn[:, None] < N) & (rr[None, :] < R),
        )
    tl.store(
        ds_ptr + rm[:, None] * stride_dsm + rr[None, :] * stride_dsr,
        (ds * scaling).to(ds_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rr[None, :] < R),
    )


@triton.autotune(
    configs=_gemm_configs("BLOCK_N", "BLOCK_K"),
    key=["M_BUCKET", "N", "K", "BLOCK_R", "NEED_DX"],
    reset_to_zero=["da_ptr"],
    prune_configs_by={"early_config_prune": prune_configs("BLOCK_N", "BLOCK_K", lora_first=True)},
)
@triton.jit
def _dx_kernel(  # type: ignore[no-untyped-def]
    dy_ptr, w_ptr, ds_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_dsm, stride_dsr,
    stride_ar, stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk, stride_dar, stride_dak,
    threshold, seed, inv_keep,
    HAS_DROPOUT: tl.constexpr, NEED_DX: tl.constexpr, NEED_DA: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_k = _grouped_pid(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    tile_mask = (rm[:, None] < M) & (rk[None, :] < K)
    # The LoRA work comes first, while no accumulator is live: dA from the x tile, then the
    # masked dS A that the main loop's accumulator starts from. Done after the loop (as an
    # epilogue beside the [M, K] accumulator) it needed two more [M, K] fp32 tiles and spilled
    # about 1 KB of registers a thread in the large tiles (compiled for sm_90).
    ds = _load_tile(ds_ptr, rm, rr, stride_dsm, stride_dsr, M, R)
    if HAS_DROPOUT:
        keep = _keep(seed, rm, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
    if NEED_DA:
        x = tl.load(
            x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=tile_mask, other=0.0
        )
        if HAS_DROPOUT:
            x = tl.where(keep, x, tl.zeros_like(x))
        da = _mma(tl.trans(ds), x, tl.zeros((BLOCK_R, BLOCK_K), tl.float32), PRECISION)
        tl.atomic_add(
            da_ptr + rr[:, None] * stride_dar + rk[None, :] * stride_dak,
            da * inv_keep,
            mask=(rr[:, None] < R) & (rk[None, :] < K),
        )
    if NEED_DX:
        a = _load_tile(a_ptr, rr, rk, stride_ar, stride_ak, R, K)
        acc = _mma(ds, a, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), PRECISION)
        if HAS_DROPOUT:  # the mask sits on the LoRA branch only
            acc = tl.where(keep, acc * inv_keep, 0.0)
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            dy = _load_tile(dy_ptr, rm, rn, stride_dym, stride_dyn, M, N)
            w = _load_tile(w_ptr, rn, rk, stride_wn, stride_wk, N, K)
            acc = _mma(dy, w, acc, PRECISION)
        tl.store(
            dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
            acc.to(dx_ptr.dtype.element_ty),
            mask=tile_mask,
        )


@triton.autotune(
    configs=_stream_configs(), key=["M_BUCKET", "K", "BLOCK_R", "NEED_DX", "NEED_DA"],
    reset_to_zero=["da_ptr"], restore_value=["dx_ptr"],  # tuning trials add into both
    prune_configs_by={"early_config_prune": prune_stream_configs},
)
@triton.jit
def _masked_grads_kernel(  # type: ignore[no-untyped-def]
    ds_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    M, K, R, M_BUCKET,
    stride_dsm, stride_dsr, stride_ar, stride_ak, stride_xm, stride_xk,
    stride_dxm, stride_dxk, stride_dar, stride_dak,
    threshold, seed, inv_keep,
    NEED_DX: tl.constexpr, NEED_DA: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """dx[:, strip] += drop'(dS A)[:, strip] (dx already holds cuBLAS's dy W) and
    dA[:, strip] += dS^T drop(x)[:, strip], for one column strip of x and every
    `num_programs(1)`-th row tile: the strip's dA stays in registers across its row tiles, so
    there is one atomic add per program and strip, not per tile."""
    pid_k = tl.program_id(0)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    a = _load_tile(a_ptr, rr, rk, stride_ar, stride_ak, R, K)
    da = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for tile in range(tl.program_id(1), tl.cdiv(M, BLOCK_M), tl.num_programs(1)):
        rm = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tile_mask = (rm[:, None] < M) & (rk[None, :] < K)
        ds = _load_tile(ds_ptr, rm, rr, stride_dsm, stride_dsr, M, R)
        keep = _keep(seed, rm, pid_k * BLOCK_K, K, threshold, BLOCK_M, BLOCK_K)
        if NEED_DX:
            lora = _mma(ds, a, tl.zeros((BLOCK_M, BLOCK_K), tl.float32), PRECISION)
            dx_ptrs = dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk
            dx = tl.load(dx_ptrs, mask=tile_mask, other=0.0).to(tl.float32)
            dx += tl.where(keep, lora * inv_keep, 0.0)
            tl.store(dx_ptrs, dx.to(dx_ptr.dtype.element_ty), mask=tile_mask)
        if NEED_DA:
            x = tl.load(
                x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=tile_mask, other=0.0,
            )
            da = _mma(tl.trans(ds), tl.where(keep, x, tl.zeros_like(x)), da, PRECISION)
    if NEED_DA:
        tl.atomic_add(
            da_ptr + rr[:, None] * stride_dar + rk[None, :] * stride_dak,
            da * inv_keep,
            mask=(rr[:, None] < R) & (rk[None, :] < K),
        )


def _block_r(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))


def _precision(dtype: torch.dtype) -> str:
    # fp32 users expect fp32 GEMMs (torch's default), not TF32 on the tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _m_bucket(m: int) -> int:
    """Autotune key for the token count: a power of two, so variable sequence lengths reuse
    tuned configs instead of re-benchmarking on every new M."""
    return triton.next_power_of_2(max(m, 1))


_MAX_OFFSET = 2**31 - 1  # the kernels index with int32 offsets


def _extent(t: torch.Tensor) -> int:
    """One past the largest element offset a kernel computes from `t`'s strides: its numel
    when contiguous, more for a strided view (a row slice of a wider tensor)."""
    if t.numel() == 0:
        return 0
    steps = zip(t.shape, t.stride(), strict=True)
    return 1 + sum((size - 1) * abs(stride) for size, stride in steps)


def _addressable(t: torch.Tensor) -> torch.Tensor:
    """`t`, or its contiguous copy when a view's offsets would overflow int32 though its
    elements alone would not."""
    return t.contiguous() if _extent(t) > _MAX_OFFSET >= t.numel() else t


def _check(x: torch.Tensor, *other_sizes: int) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(
            f"lora_linear(backend='triton'): dtype {x.dtype} is not supported; "
            "use float32, bfloat16 or float16 (or backend='torch')"
        )
    largest = max((x.numel(), *other_sizes))
    if largest > _MAX_OFFSET:
        raise ValueError(
            f"lora_linear(backend='triton'): a tensor has {largest} elements, more than the "
            "kernels' int32 indexing allows (2**31 - 1); split the batch"
        )


def _lora_s(
    x2: torch.Tensor, lora_a: torch.Tensor, scaling: float, dropout_p: float, seed: int
) -> torch.Tensor:
    """S' = s drop(x) A^T [M, r] (``_lora_s``), the first kernel of both Triton forwards."""
    m, k = x2.shape
    r = lora_a.shape[0]
    s = torch.empty((m, r), device=x2.device, dtype=x2.dtype)
    _lora_s_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        x2, lora_a, s,
        m, k, r, _m_bucket(m),
        x2.stride(0), x2.stride(1), lora_a.stride(0), lora_a.stride(1), s.stride(0), s.stride(1),
        scaling * dropout_keep_factor(dropout_p), dropout_threshold(dropout_p), seed,
        HAS_DROPOUT=dropout_p > 0.0, PRECISION=_precision(x2.dtype), BLOCK_R=_block_r(r),
    )  # fmt: skip
    return s


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
    m, k = x2.shape
    n, r = weight.shape[0], lora_a.shape[0]
    s = _lora_s(x2, lora_a, scaling, dropout_p, seed)
    y = torch.empty((m, n), device=x2.device, dtype=x2.dtype)
    _fwd_kernel[
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    ](
        x2, weight, bias if bias is not None else y, s, lora_b, y,
        m, n, k, r, _m_bucket(m),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), s.stride(0), s.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, PRECISION=_precision(x2.dtype), BLOCK_R=_block_r(r),
    )  # fmt: skip
    return y, s


def _backward(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> Gradients:
    """dS and dB in one pass over dy (``_dy_pass``; dB is always computed there), then the dx
    GEMM with the LoRA term and dA (``_dx``)."""
    del need_db
    m, k = x2.shape
    n, r = weight.shape[0], lora_a.shape[0]
    block_r = _block_r(r)
    precision = _precision(x2.dtype)
    d_s = torch.empty((m, r), device=x2.device, dtype=x2.dtype)
    d_b = torch.zeros((n, r), device=x2.device, dtype=torch.float32)
    _dy_pass_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
        dy2, lora_b, s, d_s, d_b,
        m, n, r, _m_bucket(m),
        dy2.stride(0), dy2.stride(1), lora_b.stride(0), lora_b.stride(1), s.stride(0), s.stride(1),
        d_s.stride(0), d_s.stride(1), d_b.stride(0), d_b.stride(1),
        scaling,
        PRECISION=precision, BLOCK_R=block_r,
    )  # fmt: skip
    dx: torch.Tensor | None = None
    d_a: torch.Tensor | None = None
    if need_dx or need_da:
        dx = torch.empty((m, k), device=x2.device, dtype=x2.dtype) if need_dx else d_s
        d_a = torch.zeros((r, k), device=x2.device, dtype=torch.float32)
        _dx_kernel[
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)
        ](
            dy2, weight, d_s, lora_a, x2, dx, d_a,
            m, n, k, r, _m_bucket(m),
            dy2.stride(0), dy2.stride(1), weight.stride(0), weight.stride(1),
            d_s.stride(0), d_s.stride(1), lora_a.stride(0), lora_a.stride(1),
            x2.stride(0), x2.stride(1), dx.stride(0), dx.stride(1), d_a.stride(0), d_a.stride(1),
            dropout_threshold(dropout_p), seed, dropout_keep_factor(dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, NEED_DX=need_dx, NEED_DA=need_da,
            PRECISION=precision, BLOCK_R=block_r,
        )  # fmt: skip
        if not need_dx:
            dx = None
    return dx, d_a, d_b


@functools.lru_cache(maxsize=16)
def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 2 elsewhere (the interpreter), so the tests
    run strips split across programs that each take several row tiles."""
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_cublas(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """y = x W^T (+ b) in cuBLAS, then y += S' B^T; S' = s drop(x) A^T from ``_lora_s``."""
    s = _lora_s(x2, lora_a, scaling, dropout_p, seed)
    y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())
    y.addmm_(s, lora_b.t())
    return y, s


def _backward_cublas(
    dy2: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    need_dx: bool,
    need_da: bool,
    need_db: bool,
) -> Gradients:
    """dS, dB, dx = dy W in cuBLAS; with dropout, one ``_masked_grads`` sweep adds the masked
    LoRA term into dx and computes dA (without, two more cuBLAS calls do)."""
    m, k = x2.shape
    r = lora_a.shape[0]
    d_b = dy2.t() @ s if need_db else None
    if not (need_dx or need_da):
        return None, None, d_b
    # one rounding of s * (dy B) in x's dtype, as the fused kernels store it
    d_s = torch.addmm(s, dy2, lora_b, beta=0, alpha=scaling)
    dx = dy2 @ weight if need_dx else None
    d_a = None
    if dropout_p == 0.0:
        if dx is not None:
            dx.addmm_(d_s, lora_a)
        if need_da:
            d_a = d_s.t() @ x2
    else:
        d_a = torch.zeros((r, k), device=x2.device, dtype=torch.float32)
        sms = _sm_count(x2.device)

        def grid(meta: dict[str, Any]) -> tuple[int, int]:
            # two programs per SM: enough warps in flight for a bandwidth-bound sweep
            strips, tiles = triton.cdiv(k, meta["BLOCK_K"]), triton.cdiv(m, meta["BLOCK_M"])
            return strips, max(1, min(tiles, triton.cdiv(2 * sms, strips)))

        _masked_grads_kernel[grid](
            d_s, lora_a, x2, dx if need_dx else d_s, d_a,
            m, k, r, _m_bucket(m),
            d_s.stride(0), d_s.stride(1), lora_a.stride(0), lora_a.stride(1),
            x2.stride(0), x2.stride(1), *(dx.stride() if dx is not None else (0, 0)),
            d_a.stride(0), d_a.stride(1),
            dropout_threshold(dropout_p), seed, dropout_keep_factor(dropout_p),
            NEED_DX=need_dx, NEED_DA=need_da, PRECISION=_precision(x2.dtype),
            BLOCK_R=_block_r(r),
        )  # fmt: skip
        if not need_da:
            d_a = None
    return dx, d_a, d_b


def _autograd_backward(backward: Callable[..., Gradients]) -> Backward:
    """The autograd backward (ctx, dy) of a Triton Function around `backward` (the fused
    kernels' or the cuBLAS one's): x's gradient in x's shape, the adapters' in their dtypes."""

    def run(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, weight, lora_a, lora_b, s = ctx.saved_tensors
        need_dx, _, _, need_da, need_db = ctx.needs_input_grad[:5]
        dx, d_a, d_b = backward(
            _addressable(dy.reshape(-1, dy.shape[-1])), x2, weight, lora_a, lora_b, s,
            ctx.scaling, ctx.dropout_p, ctx.seed, need_dx, need_da, need_db,
        )  # fmt: skip
        grad_x = dx.view(ctx.x_shape) if need_dx and dx is not None else None
        grad_a = d_a.to(lora_a.dtype) if need_da and d_a is not None else None
        grad_b = d_b.to(lora_b.dtype) if need_db and d_b is not None else None
        return grad_x, None, None, grad_a, grad_b, None, None, None

    return run


_LoRALinearTriton = fused_function("_LoRALinearTriton", _forward, _autograd_backward(_backward))
_LoRALinearTritonCublas = fused_function(
    "_LoRALinearTritonCublas", _forward_cublas, _autograd_backward(_backward_cublas)
)


def lora_linear_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
    cublas: bool = False,
) -> torch.Tensor:
    """Triton LoRA linear with an explicit dropout seed (``dropout_p`` already zero when not
    training): the fused kernels, or with ``cublas`` the base GEMMs in cuBLAS and the masked
    work in Triton. Arguments are assumed validated and in one dtype."""
    x, weight = _addressable(x), _addressable(weight)
    _check(x, weight.numel(), x.numel() // max(x.shape[-1], 1) * weight.shape[0])
    function = _LoRALinearTritonCublas if cublas else _LoRALinearTriton
    return run_fused(function, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)


@triton.jit
def _mask_kernel(  # type: ignore[no-untyped-def]
    out_ptr, M, K, threshold, seed, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col0 = tl.program_id(1) * BLOCK_K
    rk = col0 + tl.arange(0, BLOCK_K)
    keep = _keep(seed, rm, col0, K, threshold, BLOCK_M, BLOCK_K)
    value = tl.where(keep, inv_keep, 0.0)
    tl.store(
        out_ptr + rm[:, None] * K + rk[None, :],
        value.to(out_ptr.dtype.element_ty),
        mask=(rm[:, None] < M) & (rk[None, :] < K),
    )


def dropout_mask_triton(x: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    """The multiplier (0 or 1/keep) the Triton kernels apply to x for ``seed``, materialised."""
    _check(x)
    k = x.shape[-1]
    m = x.numel() // max(k, 1)
    out = torch.empty((m, k), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, 64), triton.cdiv(k, 64))
    _mask_kernel[grid](
        out, m, k, dropout_threshold(dropout_p), seed, dropout_keep_factor(dropout_p),
        BLOCK_M=64, BLOCK_K=64,
    )
    return out.view(x.shape)
