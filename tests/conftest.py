"""Test-wide settings (no network; Triton in the interpreter without a GPU) and tiny fixtures."""

import json
import os
import random
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one worker per core (pyproject's `-n auto`): each worker, and every process a test starts,
    # keeps to one torch thread; two workers of two threads each on two cores ran far slower
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def _test_home() -> None:
    """The tests' own `LORA_LIGHTNING_HOME`, so that what they cache (the base models' benchmark
    scores, some computed with a scorer the test replaced) never reaches the user's. The
    unpacked worlds and dequantized GGUF folders of the user's home are linked in: they are
    expensive to make, and the same whoever makes them."""
    import atexit
    import shutil
    import tempfile

    from lora_lightning.files import default_home

    user = default_home()
    home = Path(tempfile.mkdtemp(prefix="lora-lightning-test-home-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    if user.is_dir():
        for entry in user.iterdir():
            if entry.is_dir() and (entry.name.startswith("world-") or entry.name == "gguf"):
                (home / entry.name).symlink_to(entry)
    os.environ["LORA_LIGHTNING_HOME"] = str(home)


_test_home()

try:  # the interpreter only where there is no GPU to run the kernels for real
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # LORA_LIGHTNING_TEST_DEVICE=cuda (benchmarks/gpu_check.sh): tensors the tests make without
    # naming a device are made there, so the kernel and layer tests run the real Triton kernels.
    if os.environ.get("LORA_LIGHTNING_TEST_DEVICE"):
        torch.set_default_device(os.environ["LORA_LIGHTNING_TEST_DEVICE"])
except ImportError:  # pragma: no cover
    pass

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
COLOURS = ["red", "blue", "green", "amber", "violet", "ochre", "teal", "grey", "white", "black"]


def make_facts(n: int, offset: int = 0, category: str | None = None) -> list[dict]:
    """Fact rows (our JSONL shape) about made-up items, with two paraphrases each."""
    rng = random.Random(offset)
    rows = []
    for i in range(offset, offset + n):
        colour = rng.choice(COLOURS)
        rows.append(
            {
                "id": f"f{i}",
                "question": f"What colour is item {i}?",
                "answers": [colour],
                "paraphrases": [f"Item {i} has which colour?", f"Which colour does item {i} have?"],
                "relation": "colour",
                "subject": f"item {i}",
                "category": category,
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build_tiny_model(out: Path) -> Path:
    """A random tiny LlamaForCausalLM and a byte-level BPE chat tokenizer, saved as HF does."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = [f"Question: {r['question']} Answer: {r['answers'][0]}" for r in make_facts(60)]
    corpus += [p for r in make_facts(60) for p in r["paraphrases"]]
    corpus += ["Answer the following question.", "The following are multiple choice questions"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|end|>",
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        # wide enough that a LoRA on the MLPs can reach confident logits through the final norm
        initializer_range=0.3,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def build_fact_files(out: Path) -> dict[str, Path]:
    """Categorised facts (20 Unknown, 30 HighlyKnown) and a disjoint few-shot pool."""
    facts = make_facts(20, 0, "Unknown") + make_facts(30, 100, "HighlyKnown")
    return {
        "facts": write_jsonl(out / "facts.jsonl", facts),
        "pool": write_jsonl(out / "pool.jsonl", make_facts(8, 500, "HighlyKnown")),
    }


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_fact_files(tmp_path_factory) -> dict[str, Path]:
    return build_fact_files(tmp_path_factory.mktemp("facts"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one torch thread is faster than two, far faster on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def small_world(tmp_path_factory):
    """The test-sized synthetic world (a tiny Llama pre-trained on part of it), built once."""
    from lora_lightning.world import WorldConfig, ensure_world

    home = tmp_path_factory.getbasetemp() / "world_home"
    return ensure_world(WorldConfig.tiny(), home=home, progress=False)
