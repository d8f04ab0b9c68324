"""Which linear layers a PEFT `target_modules` spec selects, and wrapping them in LoRA.

`target_modules` means what it means to PEFT, so that a config written for PEFT wraps the same
layers here: a list of module-name suffixes, a regular expression matched against the full
module name, or `"all-linear"` (every linear layer but the output head). Where PEFT would fail
(a selected module that is not linear, nothing selected) the error names the target and the
closest module names instead of a bare "not found".

`inject_lora` lives here rather than beside `LoRALinear`: resolving a spec needs to know the
layer (an already-wrapped layer is still a target, its insides are not), and injecting needs the
resolution, so the layer module depends on nothing here and this one on the layer.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from lora_lightning.lora.layer import (
    LoRALinear,
    check_backend,
    check_dropout,
    check_rank,
    lora_modules,
)

__all__ = [
    "ALL_LINEAR",
    "TargetModules",
    "adaptable_modules",
    "available_suffixes",
    "canonical_targets",
    "check_target_spec",
    "inject_lora",
    "is_all_linear",
    "linear_modules",
    "matches_target",
    "output_head_names",
    "resolve_targets",
]

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


def linear_modules(model: nn.Module) -> dict[str, nn.Linear | LoRALinear]:
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
    linears = linear_modules(model)
    layers = {name: linears[name] for name in names}
    already = [name for name, layer in layers.items() if isinstance(layer, LoRALinear)]
    if already:
        raise ValueError(
            f"modules already carry LoRA: {already[:3]}{'...' if len(already) > 3 else ''}"
        )
    check_dropout(dropout)
    check_backend(backend)
    for name, layer in layers.items():
        check_rank(rank, layer, name)
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
