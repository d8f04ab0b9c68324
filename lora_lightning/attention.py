"""Attention for padding-free training rows: each packed example attends to itself alone.

`prompts.pack_batch` concatenates a batch's conversations into one row with `position_ids`
restarting at 0 for each. transformers then builds a block-diagonal causal mask over the whole
row for SDPA: correct, but attention over a row of 16 facts costs 16x that of the facts on
their own, and a dense mask rules out the fused kernels. Here the linear layers (the bulk of the
work) keep the packed row, and only attention lays the examples out as right-padded rows of the
longest example, where plain causal SDPA is exact: an example's tokens never see the padding
after them. The flash-attention integrations do the same with their variable-length kernels.

Registered with transformers' `AttentionInterface` under `PACKED_ATTENTION`; every call that is
not a packed row (padded batches, generation with a KV cache) goes to transformers' own SDPA.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

__all__ = ["PACKED_ATTENTION", "packed_attention_forward", "use_packed_attention"]

PACKED_ATTENTION = "lora_lightning_packed_sdpa"
log = logging.getLogger(__name__)

# One forward passes the same position_ids tensor to every layer: its layout is worked out once.
_last_layout: tuple[torch.Tensor, tuple[torch.Tensor, int, int] | None] | None = None


def _layout(position_ids: torch.Tensor) -> tuple[torch.Tensor, int, int] | None:
    """(slot of each token in an [examples x width] grid, examples, width) of a packed row, or
    None when the row holds one example (or the batch has several rows: not packed)."""
    global _last_layout
    if _last_layout is not None and _last_layout[0] is position_ids:
        return _last_layout[1]
    layout = None
    if position_ids.shape[0] == 1:
        positions = position_ids[0]
        starts = positions == 0
        n = int(starts.sum())
        if n > 1:
            example = torch.cumsum(starts, 0) - 1
            width = int(positions.max()) + 1
            layout = (example * width + positions, n, width)
    _last_layout = (position_ids, layout)
    return layout


def packed_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: q/k/v [batch, heads, tokens, head_dim] in,
    [batch, tokens, heads, head_dim] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    layout = None
    if position_ids is not None and query.shape[0] == 1 and query.shape[2] > 1:
        layout = _layout(position_ids)
    if layout is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    slots, n, width = layout

    def grid(t: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [n, H, width, D]
        tokens = t[0].transpose(0, 1)  # [T, H, D]
        out = tokens.new_zeros(n * width, *tokens.shape[1:]).index_copy(0, slots, tokens)
        return out.view(n, width, *tokens.shape[1:]).transpose(1, 2)

    rest = {k: v for k, v in kwargs.items() if k not in ("position_ids", "is_causal")}
    out, _ = sdpa_attention_forward(
        module, grid(query), grid(key), grid(value), None, is_causal=True, **rest
    )
    out = out.reshape(n * width, *out.shape[2:]).index_select(0, slots)  # [T, H, D]
    return out.unsqueeze(0), None


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a model that runs transformers' SDPA attention to `packed_attention_forward`;
    True if it was switched. Other implementations are left alone (flash attention handles
    packed rows itself; eager gets transformers' block-diagonal mask)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(PACKED_ATTENTION)
    except Exception:  # noqa: BLE001 (older transformers: the config field is the switch)
        try:
            config._attn_implementation = PACKED_ATTENTION
        except Exception:  # noqa: BLE001
            log.warning("could not switch to per-example attention; packed rows use a mask")
    return config._attn_implementation == PACKED_ATTENTION
