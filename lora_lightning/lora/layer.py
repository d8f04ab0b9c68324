"""The LoRA layer, merging it, unloading it, and running a model without it.

`LoRALinear` wraps a frozen `nn.Linear` and routes its forward through
`lora_kernels.lora_linear`, so the fused torch/Triton paths serve every wrapped layer. Which
layers get wrapped (PEFT's `target_modules`) and `inject_lora` are in `targets`.

Design choices a user should know about:

* LoRA parameters are kept in fp32 when the base layer is fp16/bf16 (otherwise in the base dtype),
  on the base weight's device. PEFT does the same by default (`autocast_adapter_dtype=True`),
  and it matters here: many AdamW steps of lr 1e-3 on a rank-1 adapter fall below the
  resolution of bf16. `lora_kernels.lora_linear` casts A and B (r * (in + out) values, negligible)
  to x's dtype, so x is never copied to fp32 (PEFT's default does copy it).
* `merge()` twice (or `unmerge()` when not merged) raises rather than doing nothing: a silent
  no-op would hide a caller that lost track of the state.
* `lora_disabled(model)` runs the base model alone whether or not the adapters are merged (a
  merged layer subtracts its update on the fly), so "before training" numbers can never
  silently include the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import lora_kernels

__all__ = [
    "LoRALinear",
    "check_backend",
    "check_dropout",
    "check_rank",
    "count_parameters",
    "lora_disabled",
    "lora_modules",
    "lora_state_dict",
    "merge_lora",
    "unload_lora",
    "unmerge_lora",
]


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: y = base(x) + s * B A drop(x).

    `lora_a` [rank, in] starts Kaiming-uniform and `lora_b` [out, rank] at zero (as in PEFT), so a
    fresh layer computes exactly the base layer. `scaling` is alpha/rank, or alpha/sqrt(rank) with
    rsLoRA (Kalajdzievski 2023), which keeps the update's size independent of the rank.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_rank(rank, base)
        check_dropout(dropout)
        check_backend(backend)
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = _scaling(rank, alpha, use_rslora)
        self.dropout = float(dropout)
        self.backend = backend
        self.merged = False
        self.disabled = False
        dtype, device = _adapter_dtype(base.weight.dtype), base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_forward(x)
        if self.merged:
            return self.base(x)
        # the fp32 adapter goes in as is: lora_linear uses it in x's dtype, gradients stay fp32
        return lora_kernels.lora_linear(
            x,
            self.base.weight,
            self.base.bias,
            self.lora_a,
            self.lora_b,
            self.scaling,
            self.dropout,
            self.training,
            self.backend,
        )

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone, merged or not: a merged layer subtracts its update on the fly
        (a rank-r correction, no change to the weight), so the answer never includes it."""
        if not self.merged:
            return self.base(x)
        return lora_kernels.lora_linear(
            x,
            self.base.weight,
            self.base.bias,
            self.lora_a.detach(),
            self.lora_b.detach(),
            -self.scaling,
            0.0,
            False,
            self.backend,
        )

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """s * B @ A in fp32 (or fp64 for an fp64 layer): what merging adds to the base weight."""
        dtype = torch.promote_types(self.lora_a.dtype, torch.float32)
        return self.scaling * (self.lora_b.to(dtype) @ self.lora_a.to(dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight, so inference costs exactly the base GEMM.

        The sum is formed in fp32 and rounded once to the base dtype. While merged, the forward
        is the base layer alone (no dropout, no gradient for A and B): unmerge before training.
        Raises if already merged.
        """
        if self.merged:
            raise RuntimeError("LoRALinear.merge(): the adapter is already merged; unmerge() first")
        weight = self.base.weight
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again.

        In fp32 this restores the weight up to fp32 rounding; in bf16/fp16 each value comes back
        within the rounding of the merged and of the restored value (most come back exactly).
        Keeping a copy of the weight would make it exact at the cost of the layer's memory.
        """
        if not self.merged:
            raise RuntimeError("LoRALinear.unmerge(): the adapter is not merged")
        weight = self.base.weight
        delta = self.delta_weight()
        weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
        self.merged = False

    def configure(self, alpha: float, use_rslora: bool, dropout: float) -> None:
        """Adopt an adapter's hyper-parameters (the scaling is part of what an adapter means)."""
        if self.merged:
            raise RuntimeError("cannot change the scaling of a merged LoRALinear; unmerge() first")
        check_dropout(dropout)
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = _scaling(self.rank, alpha, use_rslora)
        self.dropout = float(dropout)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, "
            f"dropout={self.dropout}, use_rslora={self.use_rslora}, merged={self.merged}, "
            f"disabled={self.disabled}, "
            f"backend={self.backend!r}"
        )


# The argument checks are public because `inject_lora` runs them for every target before it
# wraps any, so that a failed call leaves the model unchanged.
def check_dropout(dropout: float) -> None:
    """Dropout is a probability in [0, 1)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def check_backend(backend: str) -> None:
    """The backend is one `lora_kernels` knows."""
    if backend not in lora_kernels.BACKENDS:
        raise ValueError(f"backend must be one of {lora_kernels.BACKENDS}, got {backend!r}")


def check_rank(rank: int, layer: nn.Linear | LoRALinear, name: str | None = None) -> None:
    """A rank is a positive integer no larger than the layer's smaller side."""
    limit = min(layer.in_features, layer.out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        where = f"layer {name!r}" if name else "a linear layer"
        raise ValueError(
            f"LoRA rank {rank!r} is not an integer in [1, {limit}] for {where} of shape "
            f"[out={layer.out_features}, in={layer.in_features}]"
        )


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied parameters are counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone, keyed like the model's own state dict (`...gate_proj.lora_a`)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        prefix = f"{name}." if name else ""
        state[prefix + "lora_a"] = module.lora_a.detach()
        state[prefix + "lora_b"] = module.lora_b.detach()
    return state


def merge_lora(model: nn.Module) -> list[str]:
    """Merge every LoRA layer into its base weight (fast inference); return their names."""
    modules = lora_modules(model)
    for module in modules.values():
        module.merge()
    return list(modules)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo `merge_lora`."""
    modules = lora_modules(model)
    for module in modules.values():
        module.unmerge()
    return list(modules)


def unload_lora(model: nn.Module, merge: bool = True) -> list[str]:
    """Replace every `LoRALinear` by its base `nn.Linear` (merged first unless `merge=False`).

    The result is a plain transformers model again, whose `save_pretrained` writes the usual
    keys: the way to export a merged checkpoint.
    """
    names = []
    for name, module in lora_modules(model).items():
        if merge and not module.merged:
            module.merge()
        elif not merge and module.merged:
            module.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
        names.append(name)
    return names


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block, whether its adapters are merged or not.

    Every `LoRALinear` of `model` is switched to `base_forward` and switched back afterwards
    (also on an exception). Nothing is copied and no weight changes.
    """
    layers = list(lora_modules(model).values())
    saved = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, state in zip(layers, saved, strict=True):
            m.disabled = state

