"""`target_modules` means what it means to PEFT: a list of name suffixes, a regular expression
matched against the full module name, or "all-linear" (every linear layer but lm_head).

PEFT is the reference: the same spec wraps the same layers in both, an adapter PEFT wrote with
any of the three loads here with PEFT's logits, and what `save_adapter` writes PEFT resolves to
exactly the layers that were wrapped.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lora_lightning.checkpointing import resume_conflicts
from lora_lightning.lora import inject_lora, load_adapter, lora_modules, save_adapter
from lora_lightning.lora.targets import canonical_targets, check_target_spec, resolve_targets
from lora_lightning.module import PAPER_TARGETS, LoRAKnowledgeModule

pytestmark = pytest.mark.usefixtures("one_thread")

SPECS = {
    "regex": r".*\.layers\.1\.(self_attn\.(q|v)_proj|mlp\.down_proj)",
    "suffix list": ["q_proj", "up_proj"],
    "full-name list": ["model.layers.0.mlp.gate_proj", "o_proj"],
    "all-linear": "all-linear",
    "ALL-LINEAR": "ALL-LINEAR",  # PEFT compares the keyword case-insensitively
}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def peft_wrapped(peft_model: nn.Module) -> list[str]:
    """The module names PEFT put a LoRA layer on, in model order, without its prefix."""
    return [
        name.removeprefix("base_model.model.")
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    ]


def peft_adapter(spec, seed: int) -> nn.Module:
    """A PEFT LoRA on the tiny Llama with non-zero B, so the adapter changes the logits."""
    config = LoraConfig(r=2, lora_alpha=4, target_modules=spec, task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(seed), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    return model.eval()


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


TOKENS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- same layers as PEFT


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_inject_lora_wraps_exactly_the_layers_peft_wraps(spec):
    ours = tiny_llama()
    names = inject_lora(ours, spec, rank=2, alpha=4)
    expected = peft_wrapped(peft_adapter(spec, seed=0))
    assert names == expected
    assert list(lora_modules(ours)) == expected


def test_all_linear_is_every_linear_layer_but_the_output_head():
    per_layer = [f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    per_layer += [f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    names = resolve_targets(tiny_llama(), "all-linear")
    assert names == [f"model.layers.{i}.{p}" for i in range(2) for p in per_layer]
    assert "lm_head" not in names


def test_a_model_that_already_has_lora_resolves_all_linear_to_the_same_layers():
    """The wrapped layers count as linear (PEFT likewise targets its own Linear layers), and
    the layer inside a LoRALinear (`.base`) is not a second one."""
    model = tiny_llama()
    inject_lora(model, ["q_proj"], rank=1, alpha=2)
    assert resolve_targets(model, "all-linear") == resolve_targets(tiny_llama(), "all-linear")
    assert resolve_targets(model, r".*q_proj.*") == ["model.layers.0.self_attn.q_proj",
                                                    "model.layers.1.self_attn.q_proj"]


# --------------------------------------------------------------------------- adapters PEFT wrote


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_an_adapter_peft_wrote_with_each_syntax_loads_with_peft_logits(spec, tmp_path):
    peft_model = peft_adapter(spec, seed=3)
    peft_model.save_pretrained(tmp_path / "peft")

    ours = tiny_llama(seed=3)
    names = load_adapter(ours, tmp_path / "peft")
    assert names == peft_wrapped(peft_model)
    assert torch.allclose(logits(ours, TOKENS), logits(peft_model, TOKENS), atol=1e-5)
    assert not torch.allclose(logits(tiny_llama(seed=3), TOKENS), logits(ours, TOKENS))


@pytest.mark.parametrize("written", ["all-linear", r".*\.mlp\.(gate|up)_proj"])
def test_an_adapter_config_holding_the_keyword_or_a_regex_loads_too(written, tmp_path):
    """PEFT itself writes the resolved names for "all-linear"; a config written by hand (or by
    another tool) may hold the keyword or a regex, and means the same layers."""
    peft_model = peft_adapter(written, seed=4)
    peft_model.save_pretrained(tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = written
    config_path.write_text(json.dumps(config))

    ours = tiny_llama(seed=4)
    assert load_adapter(ours, tmp_path / "peft") == peft_wrapped(peft_model)
    assert torch.allclose(logits(ours, TOKENS), logits(peft_model, TOKENS), atol=1e-5)


def test_a_list_entry_that_selects_nothing_is_accepted_when_loading_as_peft_does(tmp_path):
    """An adapter config written for several architectures names layers this one lacks."""
    peft_model = peft_adapter(["q_proj", "c_attn"], seed=5)
    peft_model.save_pretrained(tmp_path / "peft")
    ours = tiny_llama(seed=5)
    assert load_adapter(ours, tmp_path / "peft") == peft_wrapped(peft_model)
    assert torch.allclose(logits(ours, TOKENS), logits(peft_model, TOKENS), atol=1e-5)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_save_adapter_writes_a_list_peft_resolves_to_the_wrapped_layers(spec, tmp_path):
    ours = tiny_llama(seed=6)
    names = inject_lora(ours, spec, rank=2, alpha=4)
    with torch.no_grad():
        for module in lora_modules(ours).values():
            module.lora_b.normal_(0.0, 0.5)
    save_adapter(ours, tmp_path / "a", "tiny")
    written = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert isinstance(written, list)

    loaded = PeftModel.from_pretrained(tiny_llama(seed=6), tmp_path / "a").eval()
    assert peft_wrapped(loaded) == names
    assert torch.allclose(logits(loaded, TOKENS), logits(ours, TOKENS), atol=1e-5)


# --------------------------------------------------------------------------- bad input


def test_a_regex_that_matches_nothing_names_it_and_the_closest_module_names():
    pattern = r"model\.layers\.0\.mlp\.gate_prj"
    with pytest.raises(ValueError) as caught:
        inject_lora(tiny_llama(), pattern, rank=1, alpha=2)
    message = str(caught.value)
    assert repr(pattern) in message
    assert "'model.layers.0.mlp.gate_proj'" in message.split("closest")[1]


def test_a_bare_suffix_string_is_a_regex_and_the_error_says_how_to_write_a_suffix():
    with pytest.raises(ValueError, match=r"'q_proj' .*matches no module.*\['q_proj'\]"):
        inject_lora(tiny_llama(), "q_proj", rank=1, alpha=2)


def test_an_unknown_suffix_names_it_and_the_closest_names():
    model = tiny_llama()
    close = r"'gate_prj' matches no module.*close names: \['gate_proj'"
    with pytest.raises(ValueError, match=close):
        inject_lora(model, ["up_proj", "gate_prj"], rank=1, alpha=2)
    assert not lora_modules(model)  # a failed call wraps nothing


def test_all_linear_inside_a_list_is_a_suffix_and_the_error_says_so():
    with pytest.raises(ValueError, match="'all-linear' is PEFT's keyword only as a plain string"):
        inject_lora(tiny_llama(), ["all-linear"], rank=1, alpha=2)


def test_a_regex_that_selects_a_module_that_is_not_linear_is_refused_as_peft_refuses_it():
    with pytest.raises(ValueError, match=r"'.\*self_attn.\*' matches 2 module\(s\) that are not "
                                         r"nn.Linear \(LlamaAttention"):
        inject_lora(tiny_llama(), ".*self_attn.*", rank=1, alpha=2)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("*_proj", "not a valid regular expression"),
        ("", "empty string"),
        ([], "is empty"),
        (["q_proj", ""], "non-empty strings"),
        (3, "must be a string"),
    ],
)
def test_a_spec_that_cannot_select_anything_is_refused_before_any_model(spec, needle):
    with pytest.raises(ValueError, match=needle):
        check_target_spec(spec)


def test_an_adapter_folder_without_its_config_names_the_folder(tmp_path):
    folder = tmp_path / "my_adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"'[^']*my_adapter' has no adapter_config.json"):
        load_adapter(tiny_llama(), folder)


def test_a_whole_model_folder_given_as_an_adapter_is_recognised(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "merged")
    with pytest.raises(FileNotFoundError, match="holds a config.json: a whole"):
        load_adapter(tiny_llama(), tmp_path / "merged")


# --------------------------------------------------------------------------- module and config


def test_the_module_default_is_still_the_papers_gate_up_down_list():
    module = LoRAKnowledgeModule()
    assert tuple(module.hparams.target_modules) == PAPER_TARGETS


def test_the_module_refuses_a_broken_regex_before_loading_a_model():
    with pytest.raises(ValueError, match=r"model.target_modules '\(q' is not a valid regular"):
        LoRAKnowledgeModule(model_name_or_path="/nowhere", target_modules="(q")


@pytest.mark.parametrize(
    ("yaml_value", "parsed", "n_layers"),
    [
        ("all-linear", "all-linear", 14),
        ("'.*\\.mlp\\.down_proj'", r".*\.mlp\.down_proj", 2),
        ("[q_proj, v_proj]", ["q_proj", "v_proj"], 4),
    ],
)
def test_the_training_config_takes_each_syntax(
    yaml_value, parsed, n_layers, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """`fit --config` with a YAML `target_modules` in each form: the CLI keeps it as written,
    and the module built from it wraps what PEFT would."""
    from lora_lightning.commands.train import run_training_cli

    monkeypatch.setattr(sys, "argv", ["lora_lightning"])  # pytest's own are not the CLI's

    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  target_modules: {yaml_value}\n")
    with pytest.raises(SystemExit) as done:
        run_training_cli(["fit", "--config", str(config), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)["model"]["target_modules"]
    assert printed == parsed

    module = LoRAKnowledgeModule(model_name_or_path=str(tiny_model_dir), target_modules=printed)
    module.configure_model()
    assert len(module.lora_names) == n_layers
    assert "lm_head" not in module.lora_names


def test_resuming_compares_what_a_spec_selects_not_how_it_is_spelled():
    def conflicts(saved, now):
        return resume_conflicts(
            {"hyper_parameters": {"target_modules": saved}}, {"target_modules": now}, {}
        )

    assert conflicts(PAPER_TARGETS, list(PAPER_TARGETS)) == []  # checkpoints from before
    assert conflicts(["up_proj", "gate_proj"], ["gate_proj", "up_proj", "up_proj"]) == []
    assert conflicts("ALL-LINEAR", "all-linear") == []
    assert conflicts(list(PAPER_TARGETS), "all-linear") == [
        "model.target_modules (checkpoint ['gate_proj', 'up_proj', 'down_proj'], now 'all-linear')"
    ]
    assert canonical_targets(r".*q_proj") == r".*q_proj"
