"""Prompts: the paper's chat format, few-shot probes, answer-only loss masking and padding.

The tokenizer is a tiny byte-level BPE trained here with a small chat template, so nothing is
downloaded and any random text can be encoded.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lora_lightning.facts import Fact
from lora_lightning.prompts import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    FewShotPrompts,
    batch_sequences,
    batch_tokens,
    build_fewshot_sets,
    encode_example,
    extract_answer,
    fewshot_messages,
    pack_batch,
    pad_batch,
    qa_messages,
    render,
    training_prompt,
)

SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(texts: list[str] = (), save_dir: Path | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a chat template, trained in milliseconds on `texts`.

    Shared with tests/test_data.py (which saves it and loads it back through AutoTokenizer).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([SYSTEM_PROMPT, "Question: ", "Answer: ", *texts], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )
    if save_dir is not None:
        fast.save_pretrained(save_dir)
    return fast


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer(["Where was the painter born?", "Answer: Paris", "Who wrote it?"])


@pytest.fixture
def rng() -> random.Random:
    return random.Random()  # fresh inputs on every run; the words are in any failure message


def words(rng: random.Random, n: int) -> str:
    letters = string.ascii_letters + "éü"
    return " ".join(
        "".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(n)
    )


def split_by_label(tokenizer, example: dict[str, list[int]]) -> tuple[str, str]:
    ids, labels = example["input_ids"], example["labels"]
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    masked = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == -100])
    return trained, masked


def test_answer_only_loss_covers_exactly_the_assistant_turn(tokenizer, rng):
    for _ in range(5):
        question, answer = words(rng, rng.randint(2, 8)) + "?", words(rng, rng.randint(1, 4))
        example = encode_example(tokenizer, question, answer, max_length=512)
        trained, masked = split_by_label(tokenizer, example)
        prompt = render(tokenizer, qa_messages(question), add_generation_prompt=True)
        assert masked == prompt, (question, answer)
        assert trained == f"Answer: {answer}<|end|>\n", (question, answer)
        first = example["labels"].index(next(lab for lab in example["labels"] if lab != -100))
        # masked prefix, then one contiguous labelled suffix that equals the input ids
        assert all(lab == IGNORE_INDEX for lab in example["labels"][:first])
        assert example["labels"][first:] == example["input_ids"][first:]
        assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_the_zero_shot_probe_prompt_is_the_training_prompt_token_for_token(tokenizer, rng):
    """The zero-shot probe asks what training showed: the tokens of its prompt are the masked
    prefix of the training example (system prompt, question, the assistant's turn opened)."""
    for _ in range(5):
        question, answer = words(rng, rng.randint(2, 8)) + "?", words(rng, rng.randint(1, 4))
        example = encode_example(tokenizer, question, answer, max_length=512)
        n = next(i for i, lab in enumerate(example["labels"]) if lab != IGNORE_INDEX)
        asked = tokenizer(training_prompt(tokenizer, question), add_special_tokens=False)
        assert asked["input_ids"] == example["input_ids"][:n], question
        assert SYSTEM_PROMPT in training_prompt(tokenizer, question)


def test_loss_on_all_trains_every_token(tokenizer, rng):
    question, answer = words(rng, 5) + "?", words(rng, 2)
    example = encode_example(tokenizer, question, answer, max_length=512, loss_on="all")
    assert example["labels"] == example["input_ids"]
    full = render(tokenizer, qa_messages(question, answer), add_generation_prompt=False)
    assert tokenizer.decode(example["input_ids"]) == full
    answer_only = encode_example(tokenizer, question, answer, max_length=512)
    assert answer_only["input_ids"] == example["input_ids"]
    assert sum(lab != -100 for lab in answer_only["labels"]) < len(example["labels"])


def test_too_long_example_is_a_clear_error(tokenizer, rng):
    question = words(rng, 40) + "?"
    n_tokens = len(encode_example(tokenizer, question, "x", max_length=10_000)["input_ids"])
    with pytest.raises(ValueError, match=rf"{n_tokens} tokens exceeds max_length={n_tokens - 1}"):
        encode_example(tokenizer, question, "x", max_length=n_tokens - 1)
    assert len(encode_example(tokenizer, question, "x", max_length=n_tokens)["input_ids"]) == (
        n_tokens
    )


def test_unknown_loss_on_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="loss_on"):
        encode_example(tokenizer, "q?", "a", max_length=64, loss_on="prompt")


def test_fewshot_prompt_renders_shots_in_order_then_the_open_question(tokenizer, rng):
    shots = [Fact(f"s{i}", words(rng, 4) + "?", [words(rng, 2)]) for i in range(4)]
    question = words(rng, 5) + "?"
    text = render(tokenizer, fewshot_messages(question, shots), add_generation_prompt=True)
    expected = f"<|system|>\n{SYSTEM_PROMPT}<|end|>\n"
    for shot in shots:
        expected += f"<|user|>\nQuestion: {shot.question}<|end|>\n"
        expected += f"<|assistant|>\nAnswer: {shot.answer}<|end|>\n"
    expected += f"<|user|>\nQuestion: {question}<|end|>\n<|assistant|>\n"
    assert text == expected


def count_renders(tokenizer, monkeypatch) -> list[int]:
    """A counter of the chat template's renders."""
    calls = [0]
    original = tokenizer.apply_chat_template

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "apply_chat_template", counted)
    return calls


def test_fewshot_prompts_render_what_the_chat_template_renders(tokenizer, rng, monkeypatch):
    shots = [Fact(f"s{i}", words(rng, 4) + "?", [words(rng, 2)]) for i in range(4)]
    plain = [words(rng, rng.randint(1, 8)) + rng.choice("?.!'\"{}%") for _ in range(20)]
    plain += ["{{ m['role'] }}?", "Question: twice?"]
    outer = ["  padded question?  ", "", "trailing newline?\n"]
    expected = {q: render(tokenizer, fewshot_messages(q, shots), add_generation_prompt=True)
                for q in plain + outer}
    renders = count_renders(tokenizer, monkeypatch)
    prompts = FewShotPrompts(tokenizer, shots)
    for question in plain + outer:
        assert prompts(question) == expected[question], question
    # two renders set the template up; then only the questions it may trim are rendered
    assert renders[0] == 2 + len(outer)


def test_fewshot_prompts_trim_like_a_trimming_template(rng):
    shots = [Fact(f"s{i}", words(rng, 4) + "?", [words(rng, 2)]) for i in range(4)]
    tokenizer = make_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE.replace("{{ m['content'] }}",
                                                    "{{ m['content'] | trim }}")
    prompts = FewShotPrompts(tokenizer, shots)
    for question in ["", " lead?", "trail? ", "plain?"]:
        assert prompts(question) == render(
            tokenizer, fewshot_messages(question, shots), add_generation_prompt=True
        ), repr(question)


def test_fewshot_prompts_fall_back_when_the_template_rewrites_content(rng, monkeypatch):
    shots = [Fact(f"s{i}", words(rng, 4) + "?", [words(rng, 2)]) for i in range(4)]
    for template in (
        CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"),
        CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | tojson }}"),
        CHAT_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | replace('e', 'E') }}"),
    ):
        tokenizer = make_tokenizer()
        tokenizer.chat_template = template
        questions = ["where is 'it'?", words(rng, 5) + "?", 'say "e"?']
        expected = [render(tokenizer, fewshot_messages(q, shots), add_generation_prompt=True)
                    for q in questions]
        prompts = FewShotPrompts(tokenizer, shots)
        renders = count_renders(tokenizer, monkeypatch)
        assert [prompts(q) for q in questions] == expected, template
        assert renders[0] == len(questions)  # every prompt rendered in full


def test_fewshot_sets_are_seeded_distinct_and_need_enough_pool(rng):
    pool = [Fact(f"p{i}", words(rng, 3) + "?", [words(rng, 1)]) for i in range(12)]
    sets = build_fewshot_sets(pool, n_exp=10, n_shot=4, seed=7)
    assert len(sets) == 10 and all(len(s) == 4 for s in sets)
    assert all(len({f.id for f in s}) == 4 for s in sets)
    assert [[f.id for f in s] for s in sets] == [
        [f.id for f in s] for s in build_fewshot_sets(pool, n_exp=10, n_shot=4, seed=7)
    ]
    assert [[f.id for f in s] for s in sets] != [
        [f.id for f in s] for s in build_fewshot_sets(pool, n_exp=10, n_shot=4, seed=8)
    ]
    with pytest.raises(ValueError, match="3 facts, fewer than n_shot=4"):
        build_fewshot_sets(pool[:3], n_exp=10, n_shot=4, seed=0)


def test_pad_batch_right_pads_and_never_trains_on_padding(rng):
    lengths = [rng.randint(1, 9) for _ in range(4)]
    examples = []
    for i, n in enumerate(lengths):
        ids = [rng.randint(5, 300) for _ in range(n)]
        labels = [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * n,
                         "kind": i % 2, "id": f"f{i}"})
    batch = pad_batch(examples, pad_token_id=0)
    width = max(lengths)
    for key in ("input_ids", "labels", "attention_mask"):
        assert batch[key].dtype == torch.long and batch[key].shape == (4, width)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == ex["input_ids"]
        assert batch["labels"][row, :n].tolist() == ex["labels"]
        assert batch["input_ids"][row, n:].tolist() == [0] * (width - n)
        assert batch["labels"][row, n:].tolist() == [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
    assert batch["kind"].dtype == torch.long and batch["kind"].tolist() == [0, 1, 0, 1]
    assert batch["id"] == ["f0", "f1", "f2", "f3"]
    with pytest.raises(ValueError, match="empty batch"):
        pad_batch([], pad_token_id=0)


@pytest.mark.parametrize(
    ("generated", "answer"),
    [("Answer: Paris", "Paris"), (" answer:  Rome\nQuestion: x", "Rome"),
     ("Lyon", "Lyon")],
)
def test_extract_answer_takes_the_first_line_without_the_prefix(generated, answer):
    assert extract_answer(generated) == answer


def test_pack_batch_concatenates_examples_into_one_row_with_restarting_positions():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1], "kind": 0},
        {"input_ids": [8, 9], "labels": [8, 9], "attention_mask": [1, 1], "kind": 1},
    ]
    batch = pack_batch(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 1, 1]]
    # an example's first token is never predicted from the previous example's last
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in batch  # its absence tells transformers the row is packed
    assert batch["kind"].tolist() == [0, 1]
    assert batch_sequences(batch) == 2 and batch_tokens(batch) == 5
    padded = pad_batch(examples, pad_token_id=0)
    assert batch_sequences(padded) == 2 and batch_tokens(padded) == 5
