"""Prompts: the paper's chat format, few-shot sets and loss-masked training examples.

Every prompt goes through the tokenizer's own chat template, so the same code serves
Llama-3.1-8B-Instruct and the synthetic world's tiny model.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from lora_lightning.facts import Fact, excerpt

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SYSTEM_PROMPT = "Answer the following question."
IGNORE_INDEX = -100
LossOn = Literal["answer", "all"]


def user_turn(question: str) -> dict[str, str]:
    return {"role": "user", "content": f"Question: {question}"}


def assistant_turn(answer: str) -> dict[str, str]:
    return {"role": "assistant", "content": f"Answer: {answer}"}


def qa_messages(question: str, answer: str | None = None) -> list[dict[str, str]]:
    """Zero-shot conversation (the training format); with `answer`, the assistant turn too."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, user_turn(question)]
    if answer is not None:
        messages.append(assistant_turn(answer))
    return messages


def training_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> str:
    """The prompt of a fact exactly as training shows it (system prompt, the question, the
    assistant's turn opened): the zero-shot probe asks this, so that it measures what the adapter
    was trained to answer rather than how well it transfers to a few-shot prompt."""
    return render(tokenizer, qa_messages(question), add_generation_prompt=True)


def fewshot_messages(question: str, shots: Sequence[Fact]) -> list[dict[str, str]]:
    """System prompt, one user/assistant pair per shot, then the question (SliCK's probe)."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for shot in shots:
        messages += [user_turn(shot.question), assistant_turn(shot.answer)]
    messages.append(user_turn(question))
    return messages


class FewShotPrompts:
    """`render(tokenizer, fewshot_messages(question, shots), True)` for many questions and one
    few-shot set, with the chat template applied once instead of once per question.

    A probe renders every fact under each of its few-shot sets (48,760 prompts per `test` on
    the bench world), and Jinja rendering was 7% of a probe's time. The set is rendered once
    with a marker in place of the question and split around it; a question is then spliced in.
    That equals the template's own output when the template copies the content verbatim, which
    is checked once by rendering, in full, a question holding every printable ASCII character
    and some others: a template that escapes, rewrites or reads the content (`tojson`, `upper`,
    HTML escaping) fails the check and every prompt is rendered in full. Empty questions and
    questions with leading or trailing whitespace, which templates may trim, are always
    rendered in full.
    """

    _MARKER = "LoraLightningQuestionMarker"
    _CHECK = "".join(chr(c) for c in range(33, 127)) + " tab\tline\nend é ü ß 中 … ?"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, shots: Sequence[Fact]) -> None:
        self.tokenizer = tokenizer
        self.shots = list(shots)
        parts = self._full(self._MARKER).split(self._MARKER)
        self._parts: tuple[str, str] | None = None
        if len(parts) == 2 and self._full(self._CHECK) == parts[0] + self._CHECK + parts[1]:
            self._parts = (parts[0], parts[1])

    def _full(self, question: str) -> str:
        return render(self.tokenizer, fewshot_messages(question, self.shots), True)

    def __call__(self, question: str) -> str:
        if self._parts is None or not question or question != question.strip():
            return self._full(question)
        return self._parts[0] + question + self._parts[1]


def build_fewshot_sets(
    pool: Sequence[Fact], n_exp: int, n_shot: int, seed: int
) -> list[list[Fact]]:
    """`n_exp` sets of `n_shot` distinct pool facts; the same seed always gives the same sets.
    No defaults: the probe's live in `knowledge.ProbeConfig`."""
    if len(pool) < n_shot:
        raise ValueError(f"few-shot pool has {len(pool)} facts, fewer than n_shot={n_shot}")
    rng = random.Random(seed)
    return [rng.sample(list(pool), n_shot) for _ in range(n_exp)]


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, str]],
    add_generation_prompt: bool,
) -> str:
    """Render messages as text with the tokenizer's chat template."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def extract_answer(generated: str) -> str:
    """The answer a model generated: first line, without the "Answer:" prefix."""
    text = generated.strip()
    if text.lower().startswith("answer:"):
        text = text[len("answer:") :]
    return text.strip().split("\n", 1)[0].strip()


def encode_example(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    max_length: int,
    loss_on: LossOn = "answer",
) -> dict[str, list[int]]:
    """Token ids and labels for one zero-shot training conversation.

    With `loss_on="answer"` only the assistant turn (from "Answer:" through the end-of-turn
    marker) carries loss; `"all"` puts it on every token, as the paper's released script does.
    Positions are found with the fast tokenizer's character offsets, so the mask is exact even
    where a prompt/answer split would tokenize differently on its own.
    """
    prompt = training_prompt(tokenizer, question)
    full = render(tokenizer, qa_messages(question, answer), add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("chat template does not render the prompt as a prefix of the conversation")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    if loss_on == "all":
        labels = list(ids)
    elif loss_on == "answer":
        labels = [
            tok if end > len(prompt) else IGNORE_INDEX
            for tok, (_, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
    else:
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    if len(ids) > max_length:
        raise ValueError(
            f"example of {len(ids)} tokens exceeds max_length={max_length}: {excerpt(question)}"
        )
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)}


PADDED_KEYS = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}


def pad_batch(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Collate encoded examples into right-padded LongTensors.

    Padding gets `pad_token_id` in `input_ids`, 0 in `attention_mask` and `IGNORE_INDEX` in
    `labels`, so it never carries loss. Any other key is passed through: as a LongTensor when
    every value is an int (e.g. a `kind` code, so it moves to the device with the batch), else as
    a list. Right padding suits teacher-forced training; batched generation pads on the left.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    batch: dict[str, Any] = {}
    for key, pad in PADDED_KEYS.items():
        value = pad_token_id if pad is None else pad
        rows = [list(ex[key]) + [value] * (width - len(ex[key])) for ex in examples]
        batch[key] = torch.tensor(rows, dtype=torch.long)
    return _with_other_keys(batch, examples)


def _with_other_keys(batch: dict[str, Any], examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Add the examples' keys other than the token columns: as a LongTensor when every value
    is an int (e.g. a `kind` code, so it moves to the device with the batch), else as a list."""
    for key in examples[0]:
        if key not in PADDED_KEYS:
            values = [ex[key] for ex in examples]
            ints = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            batch[key] = torch.tensor(values, dtype=torch.long) if ints else values
    return batch


def pack_batch(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Collate encoded examples into one padding-free row, as Hugging Face's flattening
    collator does.

    Fact conversations are short and of very different lengths (a fifth to a quarter of a
    padded batch is padding), so the examples are concatenated instead: `input_ids` and
    `labels` of shape [1, total], `position_ids` restarting at 0 for each example (from them
    `lora_lightning.attention` attends per example, or transformers builds a block-diagonal
    causal mask: no token attends across examples)
    and `sequence_ids`, the example each token belongs to. The first label of every example is
    `IGNORE_INDEX`: in the row it would be predicted from the previous example's last token.
    No `attention_mask`: its absence is what tells the model the row is packed. Other keys
    pass through as in `pad_batch`.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    ids: list[int] = []
    positions: list[int] = []
    labels: list[int] = []
    sequences: list[int] = []
    for index, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids += ex["input_ids"]
        positions += range(n)
        labels += [IGNORE_INDEX, *ex["labels"][1:]]
        sequences += [index] * n
    batch: dict[str, Any] = {
        key: torch.tensor([values], dtype=torch.long)
        for key, values in (("input_ids", ids), ("position_ids", positions),
                            ("labels", labels), ("sequence_ids", sequences))
    }
    return _with_other_keys(batch, examples)


def batch_sequences(batch: dict[str, Any]) -> int:
    """How many examples a collated batch holds (padded or packed)."""
    if "sequence_ids" in batch:
        return int(batch["sequence_ids"][0, -1]) + 1
    return int(batch["input_ids"].size(0))


def batch_tokens(batch: dict[str, Any]) -> int:
    """How many real (non-padding) tokens a collated batch holds (padded or packed)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())

