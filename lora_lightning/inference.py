"""Batched inference shared by generation (probing facts) and log-likelihood scoring.

Both paths feed the model many token sequences of very different lengths. One set of rules
serves them, so they cannot drift apart:

* sequences are ordered by length and cut into batches (little padding per batch);
* each batch is padded on the left (every sequence ends at the last column, where generation
  continues and where scored continuations sit), with an attention mask and explicit position
  ids that start at 0 on each sequence's first real token;
* sequences that share a long prefix (a few-shot probe's system prompt and shots) can be
  batched together and the prefix encoded once per batch (`share_prefix`, `prefix_cache`);
* generation appends each step's keys and values into spare room in the cache instead of
  concatenating them onto the whole cache (`_append_layer`);
* the pad id is the tokenizer's pad token, else its eos token, else 0: padded positions are
  masked out, so the value only has to be a valid id;
* the model runs in eval mode (KV cache on for generation) under `torch.inference_mode`, and
  goes back to the training mode and cache setting it had (a probe in the middle of `fit` must
  not switch LoRA dropout off for the rest of training);
* a probe can compute in float32 whatever dtype the model holds its weights in (`upcast`): in
  bfloat16 the answers depended on the thread count and on which prompts shared a batch.
"""

from __future__ import annotations

import functools
import inspect
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PaddedBatch",
    "common_prefix_length",
    "evaluating",
    "greedy_decode",
    "left_padded_batches",
    "model_device",
    "model_dtype",
    "pad_token_id",
    "prefix_cache",
    "upcast",
]


def pad_token_id(tokenizer) -> int:
    """The id that fills padded positions: pad token, else eos, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model) -> torch.dtype:
    """The dtype the model holds its weights in: the narrowest of its floating parameters (a
    bfloat16 base with float32 LoRA factors is a bfloat16 model)."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes:
        return torch.get_default_dtype()
    return min(dtypes, key=lambda d: torch.finfo(d).bits)


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
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = (head.register_forward_pre_hook(_contiguous_input)
            if isinstance(head, torch.nn.Linear) else None)
    try:
        with torch.inference_mode():
            yield
    finally:
        if hook is not None:
            hook.remove()
        if config is not None:
            config.use_cache = had_cache
        model.train(was_training)


@contextmanager
def upcast(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """Inside the block, every floating parameter and buffer of `model` narrower than `dtype`
    holds its values in `dtype` (None: nothing changes); afterwards each holds its own tensor
    again, the very one it had (also on an exception), so training resumes on unchanged weights.

    Why: bfloat16 keeps 8 bits of mantissa, and a product's rounding depends on how the kernel
    splits the sum (threads, batch shape); on SmolLM2-135M 15 of 480 greedy answers (3 of 48
    categories) changed between 1 and 2 threads (benchmarks/RESULTS.md). The bf16-rounded
    weights computed in float32 are the same model, and its answers did not change. The cost is
    a float32 copy of the narrower weights for the block's duration. The parameters stay the
    same objects (an optimizer's references hold), only their `.data` is swapped.
    """
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    if dtype is not None:
        width = torch.finfo(dtype).bits
        for tensor in itertools.chain(model.parameters(), model.buffers()):
            if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < width:
                saved.append((tensor, tensor.data))
                tensor.data = tensor.data.to(dtype)
    try:
        yield
    finally:
        for tensor, data in saved:
            tensor.data = data


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The output layer's input made contiguous. `logits_to_keep=1` hands it the last position
    as a strided slice [batch, 1, hidden]; with a frozen weight (no grad: every model with an
    adapter) torch's linear then broadcasts the weight into a batched product, copying the
    whole vocabulary matrix once per row: 2.6 s instead of 17 ms for 8 rows of SmolLM2's 49k x
    576 head in bf16 on a CPU thread (benchmarks/RESULTS.md). Copying the slice costs a row."""
    return (args[0].contiguous(), *args[1:])


@dataclass
class PaddedBatch:
    """One padded batch: `indices` into the caller's sequences, in batch-row order.

    Normally every row is left-padded. With a shared prefix (`prefix_len` > 0) each row is
    `prefix | padding | rest`: the prefix is the same tokens at the same positions in every row,
    so its keys and values can be computed once (`prefix_ids`) and reused, and the padding sits
    between the prefix and each row's own tokens, masked out, with position ids that skip it.
    """

    indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    start: int  # offset of this batch in the length order (seeds sampling per batch)
    prefix_len: int = 0

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def prefix_ids(self) -> torch.Tensor:
        """The shared prefix as a [1, prefix_len] batch."""
        return self.input_ids[:1, : self.prefix_len]


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix all `sequences` share."""
    first = sequences[0]
    n = min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences):
            return i
    return n


def _order(
    sequences: Sequence[Sequence[int]], longest_first: bool, group_by: int, batch_size: int = 1
) -> list[list[int]]:
    """Indices grouped by their first `group_by` tokens (one group when 0), each group ordered
    by length; groups keep the order in which they first appear. Groups too small to be worth
    batches of their own (under an eighth of `batch_size`) are pooled into one group, last:
    zero-shot prompts differ within their first tokens, and kept apart they ran one prompt a
    batch, 5x slower than pooled (a few-shot probe's groups, one per set of shots, stay)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, seq in enumerate(sequences):
        groups.setdefault(tuple(seq[:group_by]), []).append(i)
    smallest = max(2, batch_size // 8) if group_by else 1
    kept = [idx for idx in groups.values() if len(idx) >= smallest]
    pooled = [i for idx in groups.values() if len(idx) < smallest for i in idx]
    return [
        sorted(idx, key=lambda i: len(sequences[i]), reverse=longest_first)
        for idx in (kept + [pooled] if pooled else kept)
    ]


def left_padded_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    pad_id: int,
    device: torch.device | str = "cpu",
    longest_first: bool = False,
    share_prefix: int = 0,
) -> Iterator[PaddedBatch]:
    """Batches of `sequences` ordered by length (shortest first, or longest first to meet an
    out-of-memory batch at once), each padded on the left to its longest sequence.

    With `share_prefix` = k > 0, sequences that start with the same k tokens are batched
    together (those too few to fill a batch pooled, `_order`), and a batch whose rows share at
    least k leading tokens is laid out around that common prefix (see `PaddedBatch`): a
    few-shot probe's shots are encoded once per batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = 0
    for group in _order(sequences, longest_first, share_prefix, batch_size):
        for offset in range(0, len(group), batch_size):
            idx = group[offset : offset + batch_size]
            rows = [list(sequences[i]) for i in idx]
            prefix = 0
            if share_prefix:
                # keep at least one token of every row outside the prefix: the model must
                # read something after the cached part to give the next token
                prefix = min(common_prefix_length(rows), min(len(r) for r in rows) - 1)
                prefix = prefix if prefix >= share_prefix else 0
            yield _pad(idx, rows, prefix, pad_id, device, start)
            start += len(idx)


def _pad(
    idx: list[int], rows: list[list[int]], prefix: int, pad_id: int,
    device: torch.device | str, start: int,
) -> PaddedBatch:
    width = prefix + max(len(r) - prefix for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, seq in enumerate(rows):
        if prefix:
            ids[row, :prefix] = torch.as_tensor(seq[:prefix], dtype=torch.long)
            mask[row, :prefix] = 1
        rest = seq[prefix:]
        if rest:
            ids[row, width - len(rest) :] = torch.as_tensor(rest, dtype=torch.long)
            mask[row, width - len(rest) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return PaddedBatch(
        idx, ids.to(device), mask.to(device), positions.to(device), start, prefix
    )


def _cache_keyword(model) -> str:
    """The forward's KV-cache argument: `cache` in transformers 5.x, `past_key_values` before."""
    forward = inspect.signature(model.forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def _new_cache(model):
    """A `DynamicCache` whose full-attention layers append in place (`_append_layer`)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        return DynamicCache()

    layers = getattr(cache, "layers", None) or []
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:  # full attention; sliding-window layers keep their own
            layers[i] = _append_layer()()
    return cache


@functools.cache
def _append_layer() -> type:
    """A transformers `DynamicLayer` that keeps its keys and values in buffers with room for
    `reserve` more positions and writes each step's states into them, where `DynamicLayer`
    concatenates: that copied a whole batch's cache (the few-shot prefix repeated on every row)
    at every generated token, 10% of a probe's time on the bench world (4% once appended in
    place; the keys, values and answers are the same to the bit). `keys` and `values` stay what
    `DynamicLayer` exposes (the filled part, here a view), so the rest of transformers reads
    them unchanged; dropping or repeating rows writes into a new buffer once."""
    from transformers.cache_utils import DynamicLayer

    class AppendLayer(DynamicLayer):
        reserve = 16

        def _fresh(self, like: torch.Tensor, batch: int, length: int) -> tuple[torch.Tensor, ...]:
            shape = (batch, like.shape[1], length + self.reserve, like.shape[3])
            return like.new_empty(shape), like.new_empty(shape)

        def _adopt(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> None:
            self._kbuf, self._vbuf = kbuf, vbuf
            self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]
            self._exposed = (self.keys, self.values)

        def _buffered(self) -> bool:
            # `keys` is still the view handed out (views of inference tensors have no `_base`);
            # anything else that set it (crop, a DynamicLayer method) gets a new buffer
            exposed = getattr(self, "_exposed", None)
            return exposed is not None and exposed[0] is self.keys and exposed[1] is self.values

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            old, new = self.get_seq_length(), key_states.shape[-2]
            if key_states.requires_grad or old and (key_states.dtype != self.keys.dtype
                                                    or key_states.shape[0] != self.keys.shape[0]):
                # in-place writes would break autograd or cast silently; concatenating keeps
                # `DynamicLayer`'s own behaviour (type promotion, its error on a batch mismatch)
                return super().update(key_states, value_states, *args, **kwargs)
            if not (self._buffered() and self._kbuf.shape[0] == key_states.shape[0]
                    and old + new <= self._kbuf.shape[2]):
                kbuf, vbuf = self._fresh(key_states, key_states.shape[0], old + new)
                if old:
                    kbuf[:, :, :old] = self.keys
                    vbuf[:, :, :old] = self.values
                self._kbuf, self._vbuf = kbuf, vbuf
            self._kbuf[:, :, old : old + new] = key_states
            self._vbuf[:, :, old : old + new] = value_states
            self._adopt(self._kbuf, self._vbuf, old + new)
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            length = self.get_seq_length()
            if length == 0:
                return
            batch = self.keys.shape[0]
            kbuf, vbuf = self._fresh(self.keys, batch * repeats, length)
            for buf, states in ((kbuf, self.keys), (vbuf, self.values)):
                rows = buf.view(batch, repeats, *buf.shape[1:])
                rows[:, :, :, :length] = states[:, None]
            self._adopt(kbuf, vbuf, length)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            length = self.get_seq_length()
            if length == 0:
                return
            kbuf, vbuf = self._fresh(self.keys, len(indices), length)
            kbuf[:, :, :length] = self.keys[indices]
            vbuf[:, :, :length] = self.values[indices]
            self._adopt(kbuf, vbuf, length)

    return AppendLayer


def prefix_cache(model, batch: PaddedBatch) -> dict[str, Any]:
    """The keys and values of a batch's shared prefix, computed once and repeated for every row,
    as the keyword argument `generate` takes it (`cache` in transformers 5.x, `past_key_values`
    before)."""
    keyword = _cache_keyword(model)
    cache = _new_cache(model)
    model(input_ids=batch.prefix_ids, use_cache=True, **{keyword: cache})
    cache.batch_repeat_interleave(len(batch.indices))
    return {keyword: cache}


def greedy_decode(
    model,
    batch: PaddedBatch,
    max_new_tokens: int,
    stops: Sequence[int],
    cache: dict[str, Any] | None = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy continuations of a left-padded batch: per row the new tokens (through its first
    stop token, or `max_new_tokens` of them) and the log-probability of each.

    What `generate(do_sample=False)` computes, in a loop that drops the rows that have ended
    from the batch (their KV cache rows too) instead of carrying them as padding until the
    longest row ends: fact answers are a few tokens, but one row that never stops kept the
    whole batch running. None of `generate`'s per-step machinery (logits processors, stopping
    criteria) runs, which on the bench world's base was worth 1.24x at 8 rows a batch and
    1.08x at 64. Only the last position's logits are computed. `cache` is
    `prefix_cache(model, batch)` when the batch has a shared prefix (its rows' own tokens are
    then read after it), else None. Run it inside `evaluating(model)`.
    """
    keyword = _cache_keyword(model)
    kv = (cache or {}).get(keyword)
    if kv is None:
        kv = _new_cache(model)
    start = batch.prefix_len if cache else 0
    ids = batch.input_ids[:, start:]
    positions = batch.position_ids[:, start:]
    mask = batch.attention_mask
    rows = torch.arange(len(batch.indices), device=ids.device)
    stop = torch.as_tensor(list(stops), dtype=torch.long, device=ids.device)
    tokens: list[list[int]] = [[] for _ in batch.indices]
    logprobs: list[list[float]] = [[] for _ in batch.indices]
    for step in range(max_new_tokens):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{keyword: kv})
        logp = out.logits[:, -1].float().log_softmax(-1)
        chosen = logp.argmax(-1)
        chosen_logp = logp.gather(-1, chosen[:, None])[:, 0]
        for row, token, value in zip(rows.tolist(), chosen.tolist(), chosen_logp.tolist(),
                                     strict=True):
            tokens[row].append(token)
            logprobs[row].append(value)
        going = ~torch.isin(chosen, stop)
        if step == max_new_tokens - 1 or not bool(going.any()):
            break
        if not bool(going.all()):
            keep = going.nonzero()[:, 0]
            kv.batch_select_indices(keep)
            rows, chosen, mask, positions = rows[keep], chosen[keep], mask[keep], positions[keep]
        ids = chosen[:, None]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return tokens, logprobs
