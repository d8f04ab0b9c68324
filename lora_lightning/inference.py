"""Batched inference shared by generation (probing facts) and log-likelihood scoring.

Both paths feed the model many token sequences of very different lengths. One set of rules
serves them, so they cannot drift apart:

* sequences are ordered by length and cut into batches (little padding per batch);
* each batch is padded on the left (every sequence ends at the last column, where generation
  continues and where scored continuations sit), with an attention mask and explicit position
  ids that start at 0 on each sequence's first real token;
* the pad id is the tokenizer's pad token, else its eos token, else 0: padded positions are
  masked out, so the value only has to be a valid id;
* the model runs in eval mode (KV cache on for generation) under `torch.inference_mode`, and
  goes back to the training mode and cache setting it had (a probe in the middle of `fit` must
  not switch LoRA dropout off for the rest of training).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["PaddedBatch", "evaluating", "left_padded_batches", "model_device", "pad_token_id"]


def pad_token_id(tokenizer) -> int:
    """The id that fills padded positions: pad token, else eos, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def evaluating(model, use_cache: bool = True) -> Iterator[None]:
    """Eval mode, the KV cache on (for generation; off for one-pass scoring) and no autograd
    inside the block; the model's own training mode and `config.use_cache` are restored
    afterwards (also on an exception)."""
    config = getattr(model, "config", None)
    was_training = model.training
    had_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None:
        config.use_cache = use_cache
    try:
        with torch.inference_mode():
            yield
    finally:
        if config is not None:
            config.use_cache = had_cache
        model.train(was_training)


@dataclass
class PaddedBatch:
    """One left-padded batch: `indices` into the caller's sequences, in batch-row order."""

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    start: int  # offset of this batch in the length order (seeds sampling per batch)

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])


def left_padded_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    longest_first: bool = False,
) -> Iterator[PaddedBatch]:
    """Batches of `sequences` ordered by length (shortest first, or longest first to meet an
    out-of-memory batch at once), each padded on the left to its longest sequence."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=longest_first)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = sequences[i]
            if len(seq):
                ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
                mask[row, width - len(seq) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        yield PaddedBatch(
            idx, ids.to(device), mask.to(device), positions.to(device), start
        )
