"""Argument checks and dropout-seed plumbing shared by every backend.

Kept free of Triton so that CPU users never import it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_RANK = 256
DROPOUT_LEVELS = 65536  # dropout draws 16-bit uniforms: p is used to the nearest 1/65536


def dropout_threshold(dropout_p: float) -> int:
    """How many of the 65536 levels of a 16-bit uniform drop an element: round(p * 65536),
    capped so that at least one level keeps (p < 1 must never drop everything)."""
    return min(round(dropout_p * DROPOUT_LEVELS), DROPOUT_LEVELS - 1)


def dropout_keep_factor(dropout_p: float) -> float:
    """1 / keep probability, exact for the quantised p, so the expectation is preserved."""
    return DROPOUT_LEVELS / (DROPOUT_LEVELS - dropout_threshold(dropout_p))


def validate(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    dropout_p: float,
) -> None:
    """Raise a ValueError naming the offending argument; shape bugs otherwise surface as
    cryptic matmul errors (or, in a Triton kernel, as silently wrong numbers)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("lora_linear: x must be a tensor with at least one dimension [..., in]")
    if weight.dim() != 2:
        raise ValueError(
            f"lora_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"lora_linear: x has {x.shape[-1]} input features but weight is "
            f"{tuple(weight.shape)} ([out, in] = [{out_features}, {in_features}])"
        )
    if lora_a.dim() != 2 or lora_a.shape[1] != in_features:
        raise ValueError(
            f"lora_linear: lora_a must be [rank, in={in_features}], got {tuple(lora_a.shape)}"
        )
    rank = lora_a.shape[0]
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"lora_linear: rank must be in [1, {MAX_RANK}], got {rank}")
    if tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(
            f"lora_linear: lora_b must be [out={out_features}, rank={rank}], "
            f"got {tuple(lora_b.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"lora_linear: bias must be [out={out_features}], got {tuple(bias.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"lora_linear: x has dtype {x.dtype}; supported: float32, bfloat16, float16, float64"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise ValueError(
                f"lora_linear: {name} has dtype {t.dtype} but x has {x.dtype}; the frozen base "
                "layer must share the activation dtype"
            )
    for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
        if not t.is_floating_point():
            raise ValueError(f"lora_linear: {name} must be floating point, got {t.dtype}")
    devices = {t.device for t in (x, weight, bias, lora_a, lora_b) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"lora_linear: all tensors must be on one device, got {devices}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")


def draw_dropout_seed() -> int:
    """A dropout seed drawn from torch's global CPU generator, so ``torch.manual_seed`` makes a
    run reproducible while the mask itself never has to be stored for backward."""
    return int(torch.randint(0, 2**31 - 1, (1,), device="cpu").item())


# A backend's fused forward on 2-D x: (x2, weight, bias, A, B, scaling, p, seed) -> (y, S, *extra)
# where ``extra`` are small tensors its backward also needs (the torch backend's bit-packed mask).
FusedForward = Callable[..., tuple[torch.Tensor, ...]]
# A backend's autograd backward: (ctx, dy) -> one gradient (or None) per forward argument.
Backward = Callable[..., tuple[torch.Tensor | None, ...]]


class FusedFunction(torch.autograd.Function):
    """A backend's autograd.Function (made by `fused_function`), which also carries the
    backend's bare fused forward for `run_fused` to call when no gradient is wanted."""

    fused_forward: ClassVar[FusedForward]


def forward_and_save(
    ctx: Any,
    fused_forward: FusedForward,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """Flatten x's leading dims, run a backend's forward and, with an autograd `ctx`, keep what
    every backend's backward needs: x (a view, never a dropped copy), W, A, B and S [M, r],
    followed by whatever small extras the backend's forward returned after S."""
    x2 = x.reshape(-1, x.shape[-1])  # a view whenever x allows one: strides go to the kernels
    y, s, *extra = fused_forward(x2, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    if ctx is not None:
        ctx.save_for_backward(x2, weight, lora_a, lora_b, s, *extra)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.x_shape = scaling, dropout_p, seed, x.shape
    return y.view(*x.shape[:-1], weight.shape[0])


def fused_function(
    name: str, fused_forward: FusedForward, backward: Backward
) -> type[FusedFunction]:
    """A backend's autograd.Function: the forward runs `fused_forward` through
    `forward_and_save`, the backward is `backward(ctx, dy)`. Backends differ only in those two,
    so this one definition serves them all; `run_fused` takes `fused_forward` from it."""

    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout_p: float,
        seed: int,
    ) -> torch.Tensor:
        return forward_and_save(
            ctx, fused_forward, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed
        )

    members: dict[str, Callable[..., Any]] = {
        "forward": forward,
        "backward": backward,
        "fused_forward": fused_forward,
    }
    # type() and not a class statement: torch names the grad_fn after the class
    # (`_LoRALinearTorchBackward`), and type() returns a bare `type` to the checker
    function = type(name, (FusedFunction,), {k: staticmethod(v) for k, v in members.items()})
    return cast(type[FusedFunction], function)


def run_fused(
    function: type[FusedFunction],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> torch.Tensor:
    """Through the backend's autograd.Function (from `fused_function`) when a gradient is
    wanted; otherwise its bare fused forward, which saves nothing (inference skips the
    Function's bookkeeping altogether)."""
    scaling = float(scaling)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or lora_a.requires_grad or lora_b.requires_grad
    )
    if needs_grad:
        return function.apply(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
    return forward_and_save(
        None, function.fused_forward, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed
    )
