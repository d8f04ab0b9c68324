"""The embedded default: a seeded synthetic world and a tiny Llama that knows part of it.

No weights or hub data can be downloaded on a fresh machine, so the default run brings its own
world (docs/world.md): fictional people, relations with several real paraphrased question
templates, answers drawn with a Zipf-like skew (so a few answers are over-represented, which the
concentration measure needs), and a few unanswerable questions trained to be refused. A byte-level
BPE tokenizer is trained on the world's text, a tiny `LlamaForCausalLM` is pre-trained on the
"known" part only (a share of it shown rarely, so half-learned MaybeKnown facts exist as they do
for a real model), and everything is saved in Hugging Face format so the rest of the pipeline
loads it exactly like Llama-3.1-8B-Instruct.

One file per idea: `vocabulary` (names, word lists, relations), `config` (`WorldConfig`),
`generator` (the facts and their split), `tokenizer`, `model` (the tiny Llama and its
pre-training) and `cache` (`ensure_world()`: build once per config, reuse after).
"""

from lora_lightning.world.cache import BUILD_THREADS, WorldArtifacts, ensure_world
from lora_lightning.world.config import WORLD_FORMAT_VERSION, WorldConfig
from lora_lightning.world.generator import (
    choose_pool,
    choose_rare,
    generate_world,
    split_world,
    world_texts,
)
from lora_lightning.world.model import build_model, pretrain
from lora_lightning.world.tokenizer import CHAT_TEMPLATE, train_tokenizer
from lora_lightning.world.vocabulary import REFUSAL, RELATION_BY_NAME, RELATIONS, Relation

__all__ = [
    "BUILD_THREADS",
    "CHAT_TEMPLATE",
    "REFUSAL",
    "RELATIONS",
    "RELATION_BY_NAME",
    "WORLD_FORMAT_VERSION",
    "Relation",
    "WorldArtifacts",
    "WorldConfig",
    "build_model",
    "choose_pool",
    "choose_rare",
    "ensure_world",
    "generate_world",
    "pretrain",
    "split_world",
    "train_tokenizer",
    "world_texts",
]
