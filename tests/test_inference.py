"""Batched inference rules shared by generation and scoring; progress that reads well in logs."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from lora_lightning.inference import (
    evaluating,
    left_padded_batches,
    model_dtype,
    pad_token_id,
    upcast,
)
from lora_lightning.progress import LineProgress, progress_bar


@pytest.mark.parametrize(
    ("pad", "eos", "expected"), [(3, 7, 3), (None, 7, 7), (None, None, 0), (0, 7, 0)]
)
def test_the_pad_id_is_the_pad_token_else_eos_else_zero(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_batches_are_ordered_by_length_and_padded_on_the_left():
    sequences = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    batches = list(left_padded_batches(sequences, batch_size=2, pad_id=0))
    assert [b.indices for b in batches] == [[1, 2], [0, 3]]
    assert [b.start for b in batches] == [0, 2]
    first = batches[0]
    assert first.input_ids.tolist() == [[0, 4], [5, 6]]
    assert first.attention_mask.tolist() == [[0, 1], [1, 1]]
    assert first.position_ids.tolist() == [[0, 0], [0, 1]]  # every sequence starts at 0
    longest = list(left_padded_batches(sequences, batch_size=3, pad_id=9, longest_first=True))
    assert [b.indices for b in longest] == [[3, 0, 2], [1]]
    assert longest[0].input_ids[2].tolist() == [9, 9, 5, 6]
    with pytest.raises(ValueError, match="batch_size"):
        next(left_padded_batches(sequences, batch_size=0, pad_id=0))


def test_evaluating_restores_the_mode_and_cache_setting_even_after_an_error():
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(use_cache=False)
    model.train()
    with pytest.raises(RuntimeError, match="boom"), evaluating(model):
        assert not model.training and model.config.use_cache
        assert torch.is_inference_mode_enabled()
        raise RuntimeError("boom")
    assert model.training and model.config.use_cache is False
    with evaluating(model, use_cache=False):
        assert model.config.use_cache is False


def _half_model_with_fp32_adapter() -> torch.nn.Module:
    """A bfloat16 layer with a bfloat16 buffer and float32 'LoRA' factors, as a bf16 run has."""
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    model.register_buffer("scale", torch.full((3,), 0.3, dtype=torch.bfloat16))
    model.lora_b = torch.nn.Parameter(torch.randn(3, 2))
    return model


def test_upcast_computes_in_float32_and_gives_back_the_very_same_weights():
    """A probe of a bfloat16 model computes in float32 on the same (bf16-rounded) values; after
    it, training goes on with the very tensors it had, the float32 adapter never touched and
    the parameters the same objects (an optimizer holds them)."""
    model = _half_model_with_fp32_adapter()
    weight, lora_b = model.weight, model.lora_b
    before = {name: t.data for name, t in [*model.named_parameters(), *model.named_buffers()]}
    values = {name: t.detach().clone() for name, t in before.items()}
    with upcast(model, torch.float32):
        assert {t.dtype for t in [*model.parameters(), *model.buffers()]} == {torch.float32}
        assert torch.equal(model.weight.double(), values["weight"].double())  # exact values
        assert model.lora_b.data.data_ptr() == before["lora_b"].data_ptr()  # not copied
        out = model(torch.ones(1, 4))
        assert out.dtype == torch.float32
    assert model.weight is weight and model.lora_b is lora_b
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.dtype == before[name].dtype and t.data_ptr() == before[name].data_ptr(), name
    with pytest.raises(RuntimeError, match="boom"), upcast(model, torch.float32):
        raise RuntimeError("boom")
    assert model.weight.dtype == torch.bfloat16 and model.scale.dtype == torch.bfloat16
    with upcast(model, None):  # the model's own arithmetic
        assert model.weight.dtype == torch.bfloat16


def test_a_models_dtype_is_that_of_its_narrowest_weights():
    assert model_dtype(_half_model_with_fp32_adapter()) == torch.bfloat16
    assert model_dtype(torch.nn.Linear(2, 2)) == torch.float32


def test_progress_in_a_log_is_whole_lines_every_tenth_of_the_work():
    out = io.StringIO()
    with LineProgress(total=200, desc="categorising", file=out, every_seconds=3600) as bar:
        for _ in range(200):
            bar.update()
        bar.set_postfix(loss="0.5")
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert len(lines) == 10
    assert lines[0].startswith("categorising: 20/200 (10%)") and "left" in lines[0]
    assert lines[-1].startswith("categorising: 200/200 (100%)")


def test_progress_is_a_line_printer_off_a_terminal_and_nothing_when_disabled(capsys):
    bar = progress_bar(10, "work")  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    bar.update(10)
    bar.close()
    silent = progress_bar(10, "quiet", enabled=False)
    silent.update(10)
    silent.close()
    err = capsys.readouterr().err
    assert "work: 10/10 (100%)" in err and "quiet" not in err


def test_rows_sharing_a_prefix_are_batched_around_it():
    shots_a, shots_b = [1, 2, 3, 4], [1, 2, 9, 9]
    sequences = [shots_a + [5], shots_b + [6, 7], shots_a + [8, 8, 8], shots_b + [6]]
    batches = list(left_padded_batches(sequences, batch_size=4, pad_id=0, share_prefix=3))
    assert [b.indices for b in batches] == [[0, 2], [3, 1]]  # one batch per prefix group
    first = batches[0]
    assert first.prefix_len == 4 and first.prefix_ids.tolist() == [[1, 2, 3, 4]]
    assert first.input_ids.tolist() == [[1, 2, 3, 4, 0, 0, 5], [1, 2, 3, 4, 8, 8, 8]]
    assert first.position_ids[0].tolist()[-1] == 4  # the padding in the middle is skipped
    assert batches[1].prefix_len == 4  # [1, 2, 9, 9] + the rest; one token left outside
    lone = next(left_padded_batches([[1, 2, 3]], batch_size=1, pad_id=0, share_prefix=2))
    assert lone.prefix_len == 2  # the last token stays outside the cached prefix


def test_prompts_too_few_to_share_a_prefix_are_pooled_into_full_batches():
    """Zero-shot prompts differ within their first tokens: each alone in a batch made a probe
    run one prompt at a time. Groups under an eighth of a batch are pooled (their batch laid
    out around whatever prefix they still share); a group that fills batches keeps its own."""
    system = [7, 7, 7]
    questions = [system + [10 + i, 5, 5] for i in range(12)]  # differ at the 4th token
    shots = [[1, 2, 3, 4, 5, i] for i in range(16)]  # one few-shot group of 16
    batches = list(left_padded_batches(shots + questions, batch_size=16, pad_id=0,
                                       share_prefix=4))
    assert [len(b.indices) for b in batches] == [16, 12]
    assert batches[0].prefix_len == 5 and batches[1].prefix_len == 0  # 3 shared < 4
    assert sorted(batches[1].indices) == list(range(16, 28))
    apart = list(left_padded_batches(questions, batch_size=2, pad_id=0, share_prefix=4))
    assert [len(b.indices) for b in apart] == [2] * 6  # pooled, then two at a time


def test_evaluating_hands_the_output_layer_a_contiguous_input_and_then_lets_go(tiny_model_dir):
    """With `logits_to_keep=1` the head gets a strided slice; with a frozen weight torch then
    copies the whole weight per row (150x slower on SmolLM2's head). Inside `evaluating` the
    head sees a contiguous input, and nothing of it is left on the model afterwards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).requires_grad_(False)
    seen = []
    head = model.get_output_embeddings()
    probe = head.register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, model.config.vocab_size, (3, 7))
    with evaluating(model):
        inside = model(input_ids=ids, logits_to_keep=1).logits
    model.eval()
    with torch.no_grad():
        outside = model(input_ids=ids, logits_to_keep=1).logits
    probe.remove()
    assert seen == [True, False]  # the strided slice reaches the head outside the block
    torch.testing.assert_close(inside, outside)
    assert not head._forward_pre_hooks


@pytest.mark.parametrize("inference", [False, True], ids=["grad-mode", "inference-mode"])
def test_the_in_place_kv_cache_holds_what_transformers_own_cache_holds(inference):
    """The generation cache writes each step into spare room instead of concatenating; through
    appends past its reserve, rows repeated for a shared prefix, rows dropped as they end and a
    crop, it holds the same keys and values as transformers' `DynamicLayer`."""
    from transformers.cache_utils import DynamicLayer

    from lora_lightning.inference import _append_layer

    gen = torch.Generator().manual_seed(0)

    def states(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(batch, 2, length, 3, generator=gen),
                torch.randn(batch, 2, length, 3, generator=gen))

    ours, theirs = _append_layer()(), DynamicLayer()
    with torch.inference_mode(inference):
        steps = [("update", states(1, 5)), ("repeat", 4), ("update", states(4, 3))]
        steps += [("update", states(4, 1)) for _ in range(20)]  # past the reserve
        steps += [("select", torch.tensor([0, 2, 3])), ("update", states(3, 1)),
                  ("crop", -2), ("update", states(3, 2)), ("select", torch.tensor([1])),
                  ("update", states(1, 1))]
        for op, arg in steps:
            returned = []
            for layer in (ours, theirs):
                if op == "update":
                    returned.append(layer.update(*arg))
                elif op == "repeat":
                    layer.batch_repeat_interleave(arg)
                elif op == "select":
                    layer.batch_select_indices(arg)
                else:
                    layer.crop(arg)
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
            assert ours.get_seq_length() == theirs.get_seq_length()
            if returned:  # what attention reads this step
                (our_k, our_v), (their_k, their_v) = returned
                assert torch.equal(our_k, their_k) and torch.equal(our_v, their_v)


def test_the_in_place_kv_cache_behaves_as_transformers_where_writing_in_place_cannot():
    """States that need a gradient, another dtype or another batch size go through
    `DynamicLayer`'s own concatenation: promoted, differentiable, or refused as it refuses."""
    from transformers.cache_utils import DynamicLayer

    from lora_lightning.inference import _append_layer

    ours, theirs = _append_layer()(), DynamicLayer()
    for layer in (ours, theirs):
        layer.update(torch.ones(2, 1, 3, 2), torch.ones(2, 1, 3, 2))
    wide = torch.full((2, 1, 1, 2), 0.1, dtype=torch.float64)
    assert ours.update(wide, wide)[0].dtype == theirs.update(wide, wide)[0].dtype == torch.float64
    with pytest.raises(RuntimeError):
        theirs.update(torch.ones(3, 1, 1, 2, dtype=torch.float64),
                      torch.ones(3, 1, 1, 2, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        ours.update(torch.ones(3, 1, 1, 2, dtype=torch.float64),
                    torch.ones(3, 1, 1, 2, dtype=torch.float64))
    grad = _append_layer()()
    x = torch.ones(1, 1, 2, 2, requires_grad=True)
    for _ in range(3):
        keys, values = grad.update(x * 2, x * 3)
    (keys.sum() + values.sum()).backward()
    assert torch.equal(x.grad, torch.full_like(x, 15.0))  # 3 steps x (2 + 3)
