"""The world's base model: a tiny Llama, and the pre-training loop that teaches it the known
facts (and the chat format the probes use)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence

from lora_lightning.facts import Fact
from lora_lightning.progress import progress_bar
from lora_lightning.prompts import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    assistant_turn,
    pad_batch,
    user_turn,
)
from lora_lightning.world.config import WorldConfig

# A plain-text pre-training example: the text and the character spans that carry the loss.
TextExample = tuple[str, list[tuple[int, int]]]
FORMAT_WINDOW = 8  # benchmark-format batches cut from one length-sorted window


def build_model(config: WorldConfig, tokenizer):
    """A fresh tiny Llama sized by `config` (a few hundred thousand to a few million weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _conversation(tokenizer, turns: Sequence[tuple[str, str]], system: bool) -> tuple[list, list]:
    """Token ids and labels of a multi-turn QA chat, loss on every assistant turn (and its eos).

    A conversation with one turn is the zero-shot training format; with several it is a few-shot
    probe whose shots are known facts too, so every answer in it is a training signal.
    """
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    spans = []
    for question, answer in turns:
        messages.append(user_turn(question))
        start = len(tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True))
        messages.append(assistant_turn(answer))
        end = len(tokenizer.apply_chat_template(messages, tokenize=False))
        spans.append((start, end))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if any(e > a and s < b for a, b in spans):
            labels[i] = ids[i]
    return ids, labels


def _completion(tokenizer, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list, list]:
    """Token ids (bos first, as the benchmark scorers encode) and labels of a plain-text
    example whose loss is on the tokens overlapping `spans` (character ranges): the answers of
    the benchmark formats."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(end > a and start < b for a, b in spans) else IGNORE_INDEX
              for tok, (start, end) in zip(ids, enc["offset_mapping"], strict=True)]
    return ids, labels


def _batches(
    tokenizer,
    known: Sequence[Fact],
    config: WorldConfig,
    rare: set[str],
    format_examples: Callable[[random.Random], list[TextExample]] | None = None,
) -> Iterator[dict]:
    """Endless batches of conversations that each pack `n` known facts (1..max_turns, the same
    `n` across a batch so there is little padding), each asked with a random template.

    An epoch shows every fact once, except the `rare` ones, shown each with probability
    `rare_exposure`: half-learned facts are what gives the base MaybeKnown facts, as facts seen
    rarely in pre-training do for a real model. With `format_examples` (bench scale), a share
    `format_fraction` of the batches are benchmark-format examples instead, all of them after
    the first `format_start` of the steps.
    """
    rng = random.Random(config.seed + 3)
    formats: Iterator[TextExample] = iter(())
    # formats start after `format_start` of the steps, at the rate that keeps their total share
    first_format_step = int(config.format_start * config.train_steps)
    format_rate = 0.0
    if format_examples is not None and config.format_fraction:
        format_rate = config.format_fraction / (1.0 - config.format_start)
    step = 0

    ready: list[list[dict]] = []

    def format_batch() -> dict:
        """The next batch of benchmark-format examples. Their lengths vary fivefold (0 to 5
        shots), so batches are cut from length-sorted windows of `FORMAT_WINDOW` batches and
        served in random order: far less padding than batches of random lengths."""
        nonlocal formats
        if not ready:
            examples = []
            while len(examples) < FORMAT_WINDOW * config.batch_size:
                item = next(formats, None)
                if item is None:
                    formats = iter(format_examples(rng))
                    continue
                ids, labels = _completion(tokenizer, *item)
                examples.append({"input_ids": ids, "labels": labels,
                                 "attention_mask": [1] * len(ids)})
            examples.sort(key=lambda ex: len(ex["input_ids"]))
            ready.extend(examples[k : k + config.batch_size]
                         for k in range(0, len(examples), config.batch_size))
            rng.shuffle(ready)
        return pad_batch(ready.pop(), tokenizer.pad_token_id)

    while True:
        order = [f for f in known if f.id not in rare or rng.random() < config.rare_exposure]
        rng.shuffle(order)
        i = 0
        while i < len(order):
            step += 1
            if step > first_format_step and format_rate and rng.random() < format_rate:
                yield format_batch()
                continue
            n = rng.randint(1, config.max_turns)
            take = order[i : i + n * config.batch_size]
            i += len(take)
            examples = []
            for j in range(0, len(take), n):
                turns = [(rng.choice([f.question, *f.paraphrases]), f.answer)
                         for f in take[j : j + n]]
                # Mostly with the system prompt (the paper's format), sometimes without.
                ids, labels = _conversation(tokenizer, turns, system=rng.random() < 0.9)
                examples.append({"input_ids": ids, "labels": labels,
                                 "attention_mask": [1] * len(ids)})
            yield pad_batch(examples, tokenizer.pad_token_id)


def pretrain(
    model,
    tokenizer,
    known: Sequence[Fact],
    config: WorldConfig,
    rare: set[str] | None = None,
    progress: bool = True,
    format_examples: Callable[[random.Random], list[TextExample]] | None = None,
) -> list[float]:
    """Full fine-tuning of the tiny model on the known facts (AdamW, warm-up then cosine decay),
    and on benchmark-format examples when `format_examples` is given.

    Returns the per-step losses. A plain loop is enough: one process, a few thousand steps at
    most. Seeds torch's global generator: the caller (`ensure_world`) forks it around a build.
    """
    import torch

    torch.manual_seed(config.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                  betas=(0.9, 0.98))

    def lr_lambda(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    losses: list[float] = []
    batches = _batches(tokenizer, known, config, rare or set(), format_examples)
    bar = progress_bar(config.train_steps, "world: pre-training", enabled=progress)
    for _ in range(config.train_steps):
        loss = model(**next(batches)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update()
    bar.close()
    model.eval()
    return losses
