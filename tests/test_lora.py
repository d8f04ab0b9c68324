"""The LoRA layer, its injection, and adapters that PEFT and we can read from each other."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import Linear as PeftLoraLinear
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lora_lightning.lora import (
    LoRALinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_disabled,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)

MLP = ["gate_proj", "up_proj", "down_proj"]
HUB_ID = "meta-llama/Llama-3.1-8B-Instruct"


def tiny_llama(seed: int = 0, hidden: int = 32, intermediate: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def randomize_adapter(model: nn.Module) -> None:
    """Give every LoRA B a non-zero value, so an adapter actually changes the logits."""
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_b.normal_(0.0, 0.5)


def fresh_tokens(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, 100, (batch, length))


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


# --------------------------------------------------------------------------- the layer


def test_fresh_layer_is_the_base_layer_with_peft_initialisation():
    base = nn.Linear(48, 24)
    layer = LoRALinear(copy.deepcopy(base), rank=4, alpha=8)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(layer(x), base(x))
    assert layer.lora_a.shape == (4, 48) and layer.lora_b.shape == (24, 4)
    assert torch.count_nonzero(layer.lora_b) == 0
    bound = 1 / math.sqrt(48)  # kaiming_uniform_(a=sqrt(5)) on fan_in = 48
    assert layer.lora_a.abs().max() <= bound
    assert layer.lora_a.abs().max() > 0.8 * bound
    assert layer.scaling == 2.0
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert layer.lora_a.requires_grad and layer.lora_b.requires_grad
    text = repr(layer)
    for expected in ("rank=4", "alpha=8", "scaling=2", "use_rslora=False", "merged=False"):
        assert expected in text


def test_rslora_scales_by_the_square_root_of_the_rank():
    layer = LoRALinear(nn.Linear(32, 32), rank=16, alpha=2, use_rslora=True)
    assert layer.scaling == pytest.approx(2 / 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_an_fp32_adapter_and_outputs_the_base_dtype(dtype):
    layer = LoRALinear(nn.Linear(32, 16).to(dtype), rank=2, alpha=4)
    assert layer.lora_a.dtype == torch.float32 and layer.lora_b.dtype == torch.float32
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_a.grad.dtype == torch.float32 and layer.lora_b.grad.dtype == torch.float32
    exact = layer.base(x).double() + 2 * (x.double() @ layer.lora_a.double().T) @ (
        layer.lora_b.double().T
    )
    torch.testing.assert_close(y.double(), exact, rtol=2e-2, atol=5e-2)


def _peft_layer(base: nn.Linear, rank: int, alpha: float, use_rslora: bool, dropout: float):
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout)
    return PeftLoraLinear(base, "default", config=config, r=rank, lora_alpha=alpha)


@pytest.mark.parametrize(
    ("rank", "use_rslora", "bias"), [(1, True, False), (4, False, True), (8, True, True)]
)
def test_layer_matches_a_peft_lora_layer_in_output_and_gradients(rank, use_rslora, bias):
    base = nn.Linear(40, 24, bias=bias)
    ours = LoRALinear(copy.deepcopy(base), rank, alpha=2, dropout=0.1, use_rslora=use_rslora)
    peft = _peft_layer(copy.deepcopy(base), rank, 2, use_rslora, dropout=0.1)
    a, b = torch.randn(rank, 40), torch.randn(24, rank)
    with torch.no_grad():
        ours.lora_a.copy_(a)
        ours.lora_b.copy_(b)
        peft.lora_A["default"].weight.copy_(a)
        peft.lora_B["default"].weight.copy_(b)
    ours.eval()
    peft.eval()  # dropout is off in eval mode on both sides
    assert ours.scaling == pytest.approx(peft.scaling["default"])

    x = torch.randn(2, 3, 40)
    x_ours, x_peft = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_peft = ours(x_ours), peft(x_peft)
    torch.testing.assert_close(y_ours, y_peft)
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_peft.backward(dy)
    torch.testing.assert_close(x_ours.grad, x_peft.grad)
    torch.testing.assert_close(ours.lora_a.grad, peft.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_b.grad, peft.lora_B["default"].weight.grad)


def test_triton_and_torch_backends_give_the_same_layer():
    reference = LoRALinear(nn.Linear(40, 24), rank=4, alpha=8, dropout=0.1, backend="torch")
    with torch.no_grad():
        reference.lora_b.normal_()
    x = torch.randn(2, 3, 40)
    results = []
    for backend in ("torch", "triton", "triton-cublas"):  # Triton: the interpreter on a CPU
        layer = copy.deepcopy(reference).eval()
        layer.backend = backend
        inputs = x.clone().requires_grad_()
        layer(inputs).pow(2).sum().backward()
        results.append((layer(inputs), inputs.grad, layer.lora_a.grad, layer.lora_b.grad))
    for triton_results in results[1:]:
        for ours, theirs in zip(results[0], triton_results, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_config_offers_every_kernel_backend():
    """`model.backend` (what LightningCLI validates a YAML against) lists exactly the kernels'
    backends, so a new backend is selectable from a config the day it lands."""
    import typing

    import lora_kernels
    from lora_lightning.module import LoRAKnowledgeModule

    hints = typing.get_type_hints(LoRAKnowledgeModule.__init__)
    assert typing.get_args(hints["backend"]) == lora_kernels.BACKENDS


def test_forward_goes_through_the_kernel_dispatch_with_the_layer_settings(monkeypatch):
    import lora_kernels

    calls = []

    def spy(*args):
        calls.append(args)
        return lora_kernels.lora_linear_reference(*args)

    monkeypatch.setattr(lora_kernels, "lora_linear", spy)
    layer = LoRALinear(nn.Linear(16, 8), rank=2, alpha=6, dropout=0.25, backend="torch")
    inputs = torch.randn(3, 16)
    layer(inputs)
    layer.eval()(torch.randn(3, 16))
    (x, weight, bias, a, b, scaling, p, training, backend), second = calls[0], calls[1]
    assert x is inputs and weight is layer.base.weight and bias is layer.base.bias
    assert torch.equal(a, layer.lora_a) and torch.equal(b, layer.lora_b)
    assert (scaling, p, training, backend) == (3.0, 0.25, True, "torch")
    assert second[7] is False  # eval mode: no dropout
    layer.merge()
    layer(torch.randn(3, 16))
    assert len(calls) == 2  # merged: the base layer alone


def test_dropout_applies_in_training_only():
    layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=4, dropout=0.5)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(8, 64)
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask per call
    exact = layer.base(x) + (x @ layer.lora_a.T) @ layer.lora_b.T
    torch.testing.assert_close(layer.eval()(x), exact.detach())


def test_merge_then_unmerge_restores_the_fp32_weight_and_merged_forward_is_the_same():
    layer = LoRALinear(nn.Linear(64, 32), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_b.normal_()
    original = layer.base.weight.detach().clone()
    x = torch.randn(5, 64)
    before = layer(x)
    layer.merge()
    assert layer.merged
    assert not torch.equal(layer.base.weight, original)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before)


def test_merge_then_unmerge_restores_a_bf16_weight_to_within_one_rounding():
    layer = LoRALinear(nn.Linear(128, 64).to(torch.bfloat16), rank=8, alpha=16)
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.01)
    original = layer.base.weight.detach().clone()
    layer.merge()
    merged = layer.base.weight.detach().clone()
    assert torch.equal(merged, (original.float() + layer.delta_weight()).bfloat16())  # one rounding
    layer.unmerge()
    restored, original = layer.base.weight.float(), original.float()
    # two roundings to 8 significant bits: one of the merged weight, one of the restored one
    bound = 2.0**-8 * (merged.float().abs() + original.abs())
    assert torch.all((restored - original).abs() <= bound)
    assert (restored == original).float().mean() > 0.9


def test_merging_twice_or_unmerging_an_unmerged_layer_raises():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_layer_rejects_bad_rank_dropout_and_backend():
    with pytest.raises(ValueError, match=r"\[1, 8\].*out=8, in=16"):
        LoRALinear(nn.Linear(16, 8), rank=9, alpha=1)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(16, 8), rank=1, alpha=1, dropout=1.0)
    with pytest.raises(ValueError, match="backend"):
        LoRALinear(nn.Linear(16, 8), rank=1, alpha=1, backend="cuda")
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1, alpha=1)


# --------------------------------------------------------------------------- injection


def test_inject_wraps_the_named_layers_and_trains_only_lora():
    model = tiny_llama()
    tokens = fresh_tokens()
    before = logits(model, tokens)
    names = inject_lora(model, MLP, rank=2, alpha=4)
    assert names == [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in MLP]
    torch.testing.assert_close(logits(model, tokens), before)  # B = 0: nothing changes yet

    trainable, total = count_parameters(model)
    per_layer = 2 * (32 + 64) * 3
    assert trainable == 2 * per_layer
    assert total == sum(p.numel() for p in model.parameters())
    assert set(lora_state_dict(model)) == {f"{n}.lora_{ab}" for n in names for ab in "ab"}

    model.train()
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {f"{n}.lora_{ab}" for n in names for ab in "ab"}
    optimizer.step()
    for key, value in model.state_dict().items():
        if key in frozen:
            assert torch.equal(value, frozen[key]), key
    assert any(torch.count_nonzero(m.lora_b) for m in lora_modules(model).values())


def test_inject_names_an_unknown_target_and_lists_the_linear_suffixes():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"'gate_prj'.*\['down_proj', 'gate_proj', 'k_proj'"):
        inject_lora(model, ["gate_proj", "gate_prj"], rank=1, alpha=2)
    assert not lora_modules(model)  # nothing was wrapped by the failed call


def test_inject_rejects_a_target_that_is_not_a_linear_layer():
    with pytest.raises(ValueError, match=r"'mlp'.*not nn.Linear.*LlamaMLP"):
        inject_lora(tiny_llama(), ["mlp"], rank=1, alpha=2)


@pytest.mark.parametrize("rank", [0, 33])
def test_inject_rejects_a_rank_outside_one_to_the_smaller_dimension(rank):
    model = tiny_llama()
    with pytest.raises(ValueError, match=rf"rank {rank} .*\[1, 32\].*gate_proj.*out=64, in=32"):
        inject_lora(model, ["gate_proj"], rank=rank, alpha=2)
    assert not lora_modules(model)


def test_unload_lora_merges_and_gives_back_a_plain_model():
    model = tiny_llama()
    inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4)
    randomize_adapter(model)
    tokens = fresh_tokens()
    adapted = logits(model, tokens)
    merge_lora(model)
    torch.testing.assert_close(logits(model, tokens), adapted, rtol=1e-4, atol=1e-4)
    unmerge_lora(model)
    unload_lora(model)
    assert not lora_modules(model)
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    torch.testing.assert_close(logits(model, tokens), adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("merged", [False, True])
def test_a_model_without_its_adapter_is_the_base_merged_or_not(merged):
    model = tiny_llama()
    tokens = fresh_tokens()
    base = logits(model, tokens)
    inject_lora(model, MLP, rank=2, alpha=4)
    randomize_adapter(model)
    adapted = logits(model, tokens)
    assert not torch.allclose(adapted, base, atol=1e-3)
    if merged:
        merge_lora(model)
    with lora_disabled(model):
        torch.testing.assert_close(logits(model, tokens), base, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(model, tokens), adapted, rtol=1e-4, atol=1e-4)
    assert all(m.merged == merged and not m.disabled for m in lora_modules(model).values())


def test_disabling_is_undone_when_the_block_raises():
    model = tiny_llama()
    inject_lora(model, MLP, rank=2, alpha=4)
    with pytest.raises(RuntimeError, match="inside"), lora_disabled(model):
        assert all(m.disabled for m in lora_modules(model).values())
        raise RuntimeError("inside")
    assert not any(m.disabled for m in lora_modules(model).values())


# --------------------------------------------------------------------------- PEFT files


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path, use_rslora):
    model = tiny_llama(seed=1)
    inject_lora(model, MLP, rank=2, alpha=4, dropout=0.1, use_rslora=use_rslora)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", HUB_ID)

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (2, 4, 0.1)
    assert config["target_modules"] == sorted(MLP) and config["use_rslora"] is use_rslora
    assert config["base_model_name_or_path"] == HUB_ID
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in tensors
    assert len(tensors) == 2 * 3 * 2

    peft_model = PeftModel.from_pretrained(tiny_llama(seed=1), tmp_path / "adapter").eval()
    tokens = fresh_tokens()
    torch.testing.assert_close(logits(peft_model, tokens), logits(model.eval(), tokens))
    assert not torch.allclose(logits(tiny_llama(seed=1), tokens), logits(model, tokens))


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_loads_into_our_model_with_the_same_logits(tmp_path, use_rslora):
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(tiny_llama(seed=2), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = tiny_llama(seed=2)
    names = load_adapter(ours, tmp_path / "peft")
    assert names == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")
    ]
    assert all(
        m.scaling == pytest.approx(8 / (2 if use_rslora else 4))
        for m in lora_modules(ours).values()
    )
    tokens = fresh_tokens()
    torch.testing.assert_close(logits(ours, tokens), logits(peft_model.eval(), tokens))


@pytest.mark.parametrize(
    ("targets", "safe"), [(r".*\.self_attn\.(k_proj|o_proj)", True), (["k_proj", "o_proj"], False)]
)
def test_peft_regex_targets_and_legacy_bin_files_load_too(tmp_path, targets, safe):
    config = LoraConfig(r=2, lora_alpha=2, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(tiny_llama(seed=12), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(tmp_path / "peft", safe_serialization=safe)
    assert (tmp_path / "peft" / "adapter_model.bin").exists() is not safe

    ours = tiny_llama(seed=12)
    assert len(load_adapter(ours, tmp_path / "peft")) == 4
    tokens = fresh_tokens()
    torch.testing.assert_close(logits(ours, tokens), logits(peft_model.eval(), tokens))


def test_our_adapter_round_trips_into_a_model_that_already_has_lora(tmp_path):
    model = tiny_llama(seed=3)
    inject_lora(model, MLP, rank=2, alpha=4, use_rslora=True)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "a", "tiny")
    target = tiny_llama(seed=3)
    inject_lora(target, MLP, rank=2, alpha=1)  # same layers, other scaling: the adapter's wins
    load_adapter(target, tmp_path / "a")
    tokens = fresh_tokens()
    torch.testing.assert_close(logits(target, tokens), logits(model, tokens))
    assert all(m.use_rslora and m.alpha == 4 for m in lora_modules(target).values())


def test_a_merged_bf16_model_saves_the_same_adapter_and_it_loads(tmp_path):
    model = tiny_llama(seed=13).to(torch.bfloat16)
    inject_lora(model, MLP, rank=2, alpha=4)
    randomize_adapter(model)
    tokens = fresh_tokens()
    adapted = logits(model, tokens)
    merge_lora(model)
    save_adapter(model, tmp_path / "a", HUB_ID)
    target = tiny_llama(seed=13).to(torch.bfloat16)
    target.config._name_or_path = "/models/llama-3.1-8b-instruct"
    load_adapter(target, tmp_path / "a")  # no fingerprint of merged weights: the names decide
    torch.testing.assert_close(logits(target, tokens), adapted)
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for name, module in lora_modules(model).items():
        assert torch.equal(saved[f"base_model.model.{name}.lora_B.weight"], module.lora_b.cpu())


def test_missing_adapter_directory_or_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    model = tiny_llama()
    inject_lora(model, ["up_proj"], rank=1, alpha=2)
    save_adapter(model, tmp_path / "a", None)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_a_broken_config_is_reported_with_its_line(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text('{\n  "r": 2,\n  "lora_alpha": \n}\n')
    with pytest.raises(ValueError, match=r"adapter_config.json: line 4"):
        load_adapter(tiny_llama(), tmp_path / "a")


def _saved(tmp_path, seed: int, name: str | None, targets=("gate_proj",)):
    model = tiny_llama(seed=seed)
    if name is not None:
        model.config._name_or_path = name
    inject_lora(model, list(targets), rank=2, alpha=4)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", name)
    return model


def test_adapter_for_another_base_model_is_refused_unless_not_strict(tmp_path):
    _saved(tmp_path, seed=4, name=HUB_ID)
    other = tiny_llama(seed=5)  # same architecture, different weights
    other.config._name_or_path = HUB_ID  # even under the same name
    with pytest.raises(ValueError, match="different base model.*strict=False"):
        load_adapter(other, tmp_path / "adapter")
    assert not lora_modules(other)
    with pytest.warns(UserWarning, match="different base model"):
        load_adapter(other, tmp_path / "adapter", strict=False)
    assert len(lora_modules(other)) == 2


def test_same_weights_at_a_local_path_are_accepted_for_a_hub_id(tmp_path):
    trained = _saved(tmp_path, seed=6, name=HUB_ID)
    local = tiny_llama(seed=6)
    local.config._name_or_path = "/checkpoints/llama-3.1-8b-instruct-copy"
    load_adapter(local, tmp_path / "adapter")
    tokens = fresh_tokens()
    torch.testing.assert_close(logits(local, tokens), logits(trained, tokens))


def test_without_a_fingerprint_normalised_base_names_decide(tmp_path):
    _saved(tmp_path, seed=7, name=HUB_ID)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt"})  # as PEFT writes it
    cached = tiny_llama(seed=7)
    cached.config._name_or_path = (
        "/root/.cache/huggingface/hub/models--meta-llama--Llama-3.1-8B-Instruct/snapshots/0e9e3"
    )
    load_adapter(cached, tmp_path / "adapter")
    other = tiny_llama(seed=7)
    other.config._name_or_path = "mistralai/Mistral-7B-Instruct-v0.3"
    with pytest.raises(ValueError, match="base model is 'meta-llama/Llama-3.1-8B-Instruct'"):
        load_adapter(other, tmp_path / "adapter")


def test_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    _saved(tmp_path, seed=8, name=None)
    wider = tiny_llama(seed=8, intermediate=48)
    with pytest.raises(ValueError, match=r"gate_proj.lora_B.weight has shape \[64, 2\].*\[48, 2\]"):
        load_adapter(wider, tmp_path / "adapter")


def test_other_target_modules_than_the_model_has_are_refused(tmp_path):
    _saved(tmp_path, seed=9, name=None, targets=("gate_proj",))
    model = tiny_llama(seed=9)
    inject_lora(model, ["q_proj"], rank=2, alpha=4)
    with pytest.raises(ValueError, match=r"targets 2 layers \(\['gate_proj'\]\).*\['q_proj'\]"):
        load_adapter(model, tmp_path / "adapter")


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    _saved(tmp_path, seed=10, name=None)
    path = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = tensors.pop("base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing 1 .*layers.1.mlp.gate_proj.lora_B"):
        load_adapter(tiny_llama(seed=10), tmp_path / "adapter")
    tensors["base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"] = dropped
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(2, 32)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"unexpected 1 .*lm_head.lora_A"):
        load_adapter(tiny_llama(seed=10), tmp_path / "adapter")


def test_saved_fingerprint_lives_in_the_safetensors_metadata(tmp_path):
    model = tiny_llama(seed=11)
    model.config._name_or_path = "/ckpt/tiny"
    inject_lora(model, ["gate_proj"], rank=2, alpha=4)
    save_adapter(model, tmp_path / "adapter")  # the base name defaults to the model's own
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "/ckpt/tiny"
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "pt"
    layers = json.loads(metadata["lora_lightning.base_fingerprint"])["layers"]
    assert set(layers) == {"model.layers.0.mlp.gate_proj", "model.layers.1.mlp.gate_proj"}


def test_wrapping_a_layer_twice_is_refused_and_other_layers_can_be_added():
    model = tiny_llama()
    inject_lora(model, ["q_proj"], rank=1, alpha=2)
    with pytest.raises(ValueError, match="already carry LoRA.*q_proj"):
        inject_lora(model, ["q_proj", "v_proj"], rank=1, alpha=2)
    inject_lora(model, ["v_proj"], rank=1, alpha=2)
    assert count_parameters(model)[0] == 2 * ((32 + 32) + (32 + 16))  # rank 1, two layers


def test_an_adapter_with_several_ranks_cannot_be_written_as_one_peft_config(tmp_path):
    model = tiny_llama()
    inject_lora(model, ["q_proj"], rank=1, alpha=2)
    inject_lora(model, ["v_proj"], rank=2, alpha=2)
    with pytest.raises(ValueError, match=r"one rank .*\[1, 2\]"):
        save_adapter(model, tmp_path / "a", None)


def test_loading_into_merged_lora_layers_is_refused(tmp_path):
    model = _saved(tmp_path, seed=14, name=None)
    merge_lora(model)
    with pytest.raises(RuntimeError, match="merged; unmerge"):
        load_adapter(model, tmp_path / "adapter")
