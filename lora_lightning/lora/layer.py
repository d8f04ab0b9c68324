"""The LoRA layer, its injection into a model, merging, and running a model without it.

`LoRALinear` wraps a frozen `nn.Linear` and routes its forward through
`lora_kernels.lora_linear`, so the fused torch/Triton paths serve every wrapped layer.

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

import difflib
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

import lora_kernels

__all__ = [
    "ALL_LINEAR",
    "LoRALinear",
    "TargetModules",
    "adaptable_modules",
    "canonical_targets",
    "check_target_spec",
    "count_parameters",
    "inject_lora",
    "is_all_linear",
    "linear_modules",
    "lora_disabled",
    "lora_modules",
    "lora_state_dict",
    "matches_target",
    "merge_lora",
    "output_head_names",
    "resolve_targets",
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
        _check_rank(rank, base)
        _check_dropout(dropout)
        _check_backend(backend)
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
        factory = {"dtype": _adapter_dtype(base.weight.dtype), "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
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

    def _configure(self, alpha: float, use_rslora: bool, dropout: float) -> None:
        """Adopt an adapter's hyper-parameters (the scaling is part of what an adapter means)."""
        if self.merged:
            raise RuntimeError("cannot change the scaling of a merged LoRALinear; unmerge() first")
        _check_dropout(dropout)
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


def _check_dropout(dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _check_backend(backend: str) -> None:
    if backend not in lora_kernels.BACKENDS:
        raise ValueError(f"backend must be one of {lora_kernels.BACKENDS}, got {backend!r}")


def _check_rank(rank: int, layer: nn.Module, name: str | None = None) -> None:
    """A rank is a positive integer no larger than the layer's smaller side."""
    limit = min(layer.in_features, layer.out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        where = f"layer {name!r}" if name else "a linear layer"
        raise ValueError(
            f"LoRA rank {rank!r} is not an integer in [1, {limit}] for {where} of shape "
            f"[out={layer.out_features}, in={layer.in_features}]"
        )


# PEFT's keyword for "every linear layer but the output head" (any case, as PEFT compares it).
ALL_LINEAR = "all-linear"
TargetModules = str | Sequence[str]
_CLOSE_NAMES = 5  # how many similar module names an error about a target lists


def matches_target(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: the module name is the target or ends with '.target'."""
    return name == target or name.endswith("." + target)


def is_all_linear(target_modules: object) -> bool:
    """Whether a target spec is PEFT's `"all-linear"` keyword (a plain string, any case)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def check_target_spec(target_modules: object, what: str = "target_modules") -> TargetModules:
    """A target spec in one of PEFT's three forms, checked without a model; returned as a
    `str` (`"all-linear"` or a regular expression) or a `list` of suffixes.

    Everything that can be refused before a model is loaded is refused here, so a config with an
    empty list or a broken regex fails in one line naming `what` instead of after minutes of
    loading an 8B checkpoint.
    """
    if isinstance(target_modules, str):
        if is_all_linear(target_modules):
            return ALL_LINEAR
        if not target_modules:
            raise ValueError(f"{what} is an empty string: give a regex, a list or 'all-linear'")
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"{what} {target_modules!r} is not a valid regular expression ({err}); a string "
                "is matched as a regex against the full module name, as PEFT does"
            ) from None
        return target_modules
    if not isinstance(target_modules, Sequence | set | frozenset):
        raise ValueError(
            f"{what} must be a string (a regex, or 'all-linear') or a list of module-name "
            f"suffixes, got {type(target_modules).__name__} {target_modules!r}"
        )
    targets = list(target_modules)
    if not targets:
        raise ValueError(f"{what} is empty: name at least one linear layer, e.g. ['q_proj']")
    for target in targets:
        if not isinstance(target, str) or not target:
            raise ValueError(f"{what} entries must be non-empty strings, got {target!r}")
    return targets


def canonical_targets(target_modules: object) -> object:
    """One spelling per target spec, for comparing settings (a resumed run's with its
    checkpoint's): `"ALL-LINEAR"` is `"all-linear"`, and a list is a set of suffixes (order and
    repeats do not change what it selects). A regex stays as written: two regexes that select
    the same layers are not recognised as equal."""
    if is_all_linear(target_modules):
        return ALL_LINEAR
    if isinstance(target_modules, list | tuple | set | frozenset):
        return sorted({str(t) for t in target_modules})
    return target_modules


def adaptable_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a target could name, by full name: all but the root and the insides of a
    `LoRALinear` (its `base` is the wrapped layer itself, not another one to wrap)."""
    found: dict[str, nn.Module] = {}
    inside_lora: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside_lora):
            continue
        if isinstance(module, LoRALinear):
            inside_lora.append(name)
        found[name] = module
    return found


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer a target could name: plain Linear and already-wrapped LoRALinear."""
    return {
        name: module
        for name, module in adaptable_modules(model).items()
        if isinstance(module, nn.Linear | LoRALinear)
    }


def output_head_names(model: nn.Module) -> set[str]:
    """The module name(s) of the model's output head (`lm_head`), which PEFT's "all-linear"
    leaves out: adapting the projection onto the vocabulary is not what anyone means by it."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, module in adaptable_modules(model).items() if module is head}


def available_suffixes(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def _close_names(wanted: str, names: Sequence[str]) -> list[str]:
    return difflib.get_close_matches(wanted, names, n=_CLOSE_NAMES, cutoff=0.5)


def _not_linear(model: nn.Module, what: str, hits: Sequence[str]) -> ValueError:
    kinds = sorted({type(model.get_submodule(n)).__name__ for n in hits})
    return ValueError(
        f"{what} matches {len(hits)} module(s) that are not nn.Linear ({', '.join(kinds)}, e.g. "
        f"{hits[0]!r}); LoRA here wraps linear layers only. Available linear-layer suffixes: "
        f"{available_suffixes(model)}"
    )


def _resolve_regex(model: nn.Module, pattern: str) -> list[str]:
    """PEFT's rule for a string: the modules whose full name the regex matches (re.fullmatch)."""
    modules = adaptable_modules(model)
    linears = linear_modules(model)
    hits = [name for name in modules if re.fullmatch(pattern, name)]
    wrong = [name for name in hits if name not in linears]
    if wrong:  # PEFT refuses a module type it cannot adapt; so do we, for anything not linear
        raise _not_linear(model, f"target_modules regex {pattern!r}", wrong)
    if hits:
        return hits
    # Compare the pattern without its escapes: r"model\.layers\.0\.q_prj" reads like a name.
    close = _close_names(pattern.replace("\\", ""), list(linears))
    hint = ""
    if any(matches_target(name, pattern) for name in linears):
        hint = (
            f"; {pattern!r} is a suffix of module names: for PEFT's suffix rule write it as a "
            f"list, [{pattern!r}], or as the regex '.*\\.{pattern}'"
        )
    example = (
        f"none similar (the names look like {next(iter(linears))!r})"
        if linears
        else "none (the model has no linear layers)"
    )
    raise ValueError(
        f"target_modules regex {pattern!r} (matched against full module names, as PEFT does) "
        f"matches no module of {type(model).__name__}{hint}; closest linear-layer names: "
        f"{close or example}"
    )


def _suffixes(names: Sequence[str]) -> list[str]:
    """Every dotted tail of every name ('q_proj', 'self_attn.q_proj', ...), first-seen order:
    what a list entry could have meant, for a suggestion."""
    found: dict[str, None] = {}
    for name in names:
        parts = name.split(".")
        for i in range(len(parts) - 1, -1, -1):
            found.setdefault(".".join(parts[i:]), None)
    return list(found)


def _resolve_list(model: nn.Module, targets: Sequence[str], require_each: bool) -> list[str]:
    """PEFT's rule for a list: a module is selected when its name is an entry or ends with
    '.' + entry. Here every entry must select a linear layer unless `require_each=False`."""
    modules = adaptable_modules(model)
    linears = linear_modules(model)
    selected: set[str] = set()
    for target in targets:
        hits = [name for name in modules if matches_target(name, target)]
        wrong = [name for name in hits if name not in linears]
        hits = [name for name in hits if name in linears]
        if wrong and not hits:
            raise _not_linear(model, f"target module {target!r}", wrong)
        if not hits and require_each:
            close = _close_names(target, _suffixes(list(linears)))
            keyword = (
                "; 'all-linear' is PEFT's keyword only as a plain string, not inside a list"
                if is_all_linear(target)
                else ""
            )
            raise ValueError(
                f"target module {target!r} matches no module of {type(model).__name__}{keyword}; "
                f"close names: {close or 'none'}; available linear-layer suffixes: "
                f"{available_suffixes(model)}"
            )
        selected.update(hits)
    if not selected:
        raise ValueError(
            f"target_modules {list(targets)} match no linear layer of {type(model).__name__}; "
            f"available linear-layer suffixes: {available_suffixes(model)}"
        )
    return [name for name in linears if name in selected]


def resolve_targets(
    model: nn.Module, target_modules: TargetModules, require_each: bool = True
) -> list[str]:
    """Names of the linear layers a target spec selects, in model order, by PEFT's rules.

    * a list (or tuple/set) holds name suffixes: `"gate_proj"` selects
      `model.layers.3.mlp.gate_proj`, and a full name selects that module;
    * `"all-linear"` (any case) selects every linear layer except the output head (`lm_head`);
    * any other string is a regular expression that must match a module's full name
      (`re.fullmatch`): `".*mlp[.](gate|up)_proj"`.

    Where PEFT would fail (a selected module that is not linear, nothing selected) this raises a
    ValueError naming the target and the closest module names. Stricter than PEFT by default,
    every list entry must select something (a typo in one entry is then an error, not a silently
    smaller adapter); `require_each=False` accepts entries that select nothing, as PEFT does when
    it loads an adapter written for several architectures.
    """
    spec = check_target_spec(target_modules)
    if isinstance(spec, str):
        if spec == ALL_LINEAR:
            heads = output_head_names(model)
            names = [name for name in linear_modules(model) if name not in heads]
            if not names:
                raise ValueError(
                    f"target_modules 'all-linear' selects nothing: {type(model).__name__} has no "
                    "linear layer besides its output head"
                )
            return names
        return _resolve_regex(model, spec)
    return _resolve_list(model, spec, require_each)


def inject_lora(
    model: nn.Module,
    target_modules: TargetModules,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    use_rslora: bool = False,
    backend: str = "auto",
) -> list[str]:
    """Wrap every linear layer `target_modules` selects in a `LoRALinear`; return their names.

    `target_modules` means what it means to PEFT (`resolve_targets`): a list of name suffixes
    (`["gate_proj"]` selects `model.layers.3.mlp.gate_proj`), a regex string matched against full
    names, or `"all-linear"`; so a config written for PEFT wraps the same layers here. Every
    non-LoRA parameter of the model is frozen. All checks run before the model is touched, so a
    failed call leaves it unchanged.
    """
    names = resolve_targets(model, target_modules)
    already = [name for name in names if isinstance(model.get_submodule(name), LoRALinear)]
    if already:
        raise ValueError(
            f"modules already carry LoRA: {already[:3]}{'...' if len(already) > 3 else ''}"
        )
    _check_dropout(dropout)
    _check_backend(backend)
    for name in names:
        _check_rank(rank, model.get_submodule(name), name)
    for param in model.parameters():
        param.requires_grad_(False)
    for existing in lora_modules(model).values():  # adapters injected earlier stay trainable
        existing.lora_a.requires_grad_(True)
        existing.lora_b.requires_grad_(True)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = LoRALinear(getattr(parent, child), rank, alpha, dropout, use_rslora, backend)
        setattr(parent, child, wrapped)
    return names


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

