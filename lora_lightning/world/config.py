"""`WorldConfig`: everything that determines a world build (its hash names the cache folder)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from lora_lightning.knowledge import ProbeConfig

# Bump when the generator, tokenizer or training recipe changes, so old caches are not reused.
WORLD_FORMAT_VERSION = 5  # 2: facts carry `confidence`; 3: a refusal answer matches itself;
# 4: world-MC pre-training examples carry the loss on their shots' letters too, three per fact,
# in length-sorted batches, and the benchmark formats may come late in pre-training
# (`format_start`); 5: no answer is a substring of another or of a prompt text, the harm
# benchmarks ask about their own subjects, each with a development split


@dataclass
class WorldConfig:
    """Everything that determines a world build; its hash names the cache folder.

    The defaults (611 facts; 244 pre-trained, a fifth of them only rarely; a 172k-parameter
    Llama) build in about a minute on one CPU core. The base then answers 97.6% of the few-shot
    probes of its frequently trained facts (83% over all trained ones) and the SliCK categories
    come out HighlyKnown 208 / MaybeKnown 38 / Unknown 341 (pool of 24 excluded).
    `WorldConfig.tiny()` is a seconds-scale world for tests; `WorldConfig.bench()` the bench scale.
    """

    seed: int = 0
    n_subjects: int = 120
    relations_per_subject: int = 5
    n_towns: int = 40
    n_mentors: int = 40
    zipf_exponent: float = 1.1
    refusal_fraction: float = 0.1
    known_fraction: float = 0.4
    rare_fraction: float = 0.2
    rare_exposure: float = 0.1
    pool_size: int = 24
    # question templates of each relation used for a fact's question and paraphrases; the next
    # `heldout_templates` are kept out of every fact (asked only to measure generalisation)
    templates_per_fact: int = 5
    heldout_templates: int = 0
    # bench-scale structure (0 / False: off, as in the default world)
    mentors_are_subjects: bool = False  # mentors are subjects too, so 2-hop questions exist
    obscure_fraction: float = 0.0  # subjects none of whose facts is pre-trained
    format_subjects: int = 0  # pre-trained only, to teach the benchmark formats; never tested
    decoy_subjects: int = 0  # unknown people whose questions are pre-trained as refusals
    n_years: int = 60
    # subjects pre-trained like the familiar ones but never tested: the harm benchmarks ask
    # about them only, so no training mix touches what they measure
    benchmark_subjects: int = 0
    mc_heldout: int = 0  # world-MC questions (test split): known facts of benchmark subjects
    truthful_questions: int = 0  # world-truthful questions (test split), about benchmark subjects
    dev_questions: int = 0  # each benchmark's development split (for choosing the recipe)
    format_fraction: float = 0.0  # share of pre-training sequences in the benchmark formats
    # the share of the pre-training steps before the first benchmark-format batch (the formats'
    # share after it is raised so the total stays `format_fraction`): a base learns to answer
    # 4-choice questions about facts it already knows, as an LLM meets such formats late
    format_start: float = 0.0
    # tokenizer
    vocab_size: int = 1024
    # model
    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 2
    num_heads: int = 4
    max_position_embeddings: int = 512
    # pre-training
    train_steps: int = 260
    batch_size: int = 32
    learning_rate: float = 5e-3
    warmup_steps: int = 30
    max_turns: int = 5
    # categorisation of the world by the base
    n_exp: int = ProbeConfig.n_exp
    n_shot: int = ProbeConfig.n_shot
    eval_batch_size: int = 256
    version: int = WORLD_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("known_fraction", "rare_fraction", "rare_exposure", "refusal_fraction",
                     "obscure_fraction", "format_fraction", "format_start"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {value}")
        for name in ("n_subjects", "n_towns", "pool_size", "train_steps", "n_years",
                     "batch_size", "n_exp", "n_shot", "max_turns", "num_layers"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"WorldConfig.{name} must be at least 1, got {value}")
        if not self.mentors_are_subjects and self.n_mentors < 1:
            raise ValueError("WorldConfig.n_mentors must be at least 1 unless mentors_are_subjects")
        if self.format_fraction and self.format_fraction > 1.0 - self.format_start:
            raise ValueError(
                f"WorldConfig.format_fraction ({self.format_fraction}) does not fit after "
                f"format_start ({self.format_start}): at most 1 - format_start"
            )
        if (self.mc_heldout or self.truthful_questions) and not self.benchmark_subjects:
            raise ValueError(
                "WorldConfig: mc_heldout and truthful_questions ask about benchmark subjects; "
                "set benchmark_subjects"
            )
        if self.templates_per_fact < 1:
            raise ValueError("WorldConfig.templates_per_fact must be at least 1")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"WorldConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )

    @classmethod
    def scale(cls, name: str, seed: int = 0) -> WorldConfig:
        """The named world scale: "small" (the default run's world) or "bench" (big enough for
        the paper's grid and for in-world harm benchmarks), with its seed."""
        scales = {"small": lambda seed: cls(seed=seed), "bench": cls.bench}
        if name not in scales:
            raise ValueError(f"world scale must be one of {sorted(scales)}, got {name!r}")
        return scales[name](seed)

    @classmethod
    def bench(cls, seed: int = 0) -> WorldConfig:
        """The bench-scale world (docs/world.md): thousands of Unknown facts, a base model with
        benchmark skills it can lose, refusals, 2-hop questions and held-out templates."""
        return cls(
            seed=seed, n_subjects=800, relations_per_subject=6, n_towns=300, n_mentors=0,
            zipf_exponent=0.8, refusal_fraction=0.1, known_fraction=0.58, rare_fraction=0.2,
            rare_exposure=0.15, pool_size=24, templates_per_fact=6, heldout_templates=2,
            mentors_are_subjects=True, obscure_fraction=0.4, format_subjects=80,
            decoy_subjects=200, n_years=300, benchmark_subjects=150, mc_heldout=200,
            truthful_questions=200, dev_questions=100,
            format_fraction=0.25, format_start=0.5, vocab_size=1536, hidden_size=96,
            intermediate_size=256, num_layers=4, num_heads=4, max_position_embeddings=512,
            train_steps=1600, batch_size=48, learning_rate=5e-3, warmup_steps=50, max_turns=6,
            eval_batch_size=64,
        )

    @classmethod
    def tiny(cls, seed: int = 0) -> WorldConfig:
        """A tiny world that builds in seconds: for tests, not for science."""
        return cls(
            seed=seed, n_subjects=24, relations_per_subject=3, n_towns=8, n_mentors=8,
            pool_size=8, vocab_size=400, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=2, train_steps=140, batch_size=16, warmup_steps=10, n_exp=4,
        )

    def key(self) -> str:
        """A short stable hash of every field (the cache folder name)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
