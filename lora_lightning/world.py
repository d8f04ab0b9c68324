"""The embedded default: a seeded synthetic world and a tiny Llama that knows part of it.

No weights or hub data can be downloaded on a fresh machine, so the default run brings its own
world (DESIGN.md section 5): fictional people, relations with several real paraphrased question
templates, answers drawn with a Zipf-like skew (so a few answers are over-represented, which the
concentration measure needs), and a few unanswerable questions trained to be refused. A byte-level
BPE tokenizer is trained on the world's text, a tiny `LlamaForCausalLM` is pre-trained on the
"known" part only (a share of it shown rarely, so half-learned MaybeKnown facts exist as they do
for a real model), and everything is saved in Hugging Face format so the rest of the pipeline
loads it exactly like Llama-3.1-8B-Instruct.

`ensure_world()` builds this once per `WorldConfig` under `$LORA_LIGHTNING_HOME` (default
`~/.cache/lora_lightning`) and reuses it after; builds are atomic and safe across processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lora_lightning.facts import Fact, save_facts

# Bump when the generator, tokenizer or training recipe changes, so old caches are not reused.
WORLD_FORMAT_VERSION = 2  # 2: categorised facts carry `confidence`

REFUSAL = "I don't know."
# The world's matrices are tiny (hidden size ~100): intra-op threads cost more in hand-offs than
# they save, and on a shared 2-core machine a second thread made pre-training ~10x slower in CPU
# time. One thread also makes the build bit-for-bit reproducible across machines' core counts.
BUILD_THREADS = 1
BOS, EOT, PAD = "<|bos|>", "<|eot|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Each turn is "<|role|>content<|eot|>"; the assistant turn therefore ends with the eos token, so
# generation stops by itself, and the generation prompt is just "<|assistant|>".
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('unknown chat role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "kr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "th"]
_TOWN_SUFFIXES = ["", "", "ford", "holm", "dale", "mar", "gard", "wick"]

OCCUPATIONS = [
    "baker", "sailor", "weaver", "blacksmith", "painter", "astronomer", "cartographer", "potter",
    "carpenter", "healer", "scribe", "glassblower", "brewer", "mason", "tailor", "shepherd",
    "fisher", "herbalist", "jeweler", "bookbinder", "miller", "archer", "merchant", "clockmaker",
]
INSTRUMENTS = [
    "lute", "harp", "flute", "drum", "violin", "bagpipe", "oboe", "trumpet", "cello", "zither",
    "lyre", "horn", "fiddle", "mandolin", "dulcimer", "organ", "cornet", "tambourine",
]
COLORS = [
    "red", "blue", "green", "yellow", "purple", "orange", "teal", "crimson", "amber", "violet",
    "silver", "gold", "indigo", "scarlet", "olive", "ivory",
]
ANIMALS = [
    "horse", "cat", "dog", "falcon", "goat", "raven", "owl", "fox", "hare", "badger", "otter",
    "heron", "lynx", "wolf", "stag", "swan", "boar", "crow",
]


@dataclass(frozen=True)
class Relation:
    """A relation: question templates (real paraphrases, `{s}` = subject) and an answer kind."""

    name: str
    templates: tuple[str, ...]
    kind: str  # "town", "person", "year", "refusal", or a key of the word lists below


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        (
            "Where was {s} born?",
            "{s} was born in which place?",
            "In which town was {s} born?",
            "What is the birthplace of {s}?",
            "Which town is the birthplace of {s}?",
        ),
        "town",
    ),
    Relation(
        "residence",
        (
            "In which town does {s} live?",
            "Where does {s} live?",
            "{s} lives in which town?",
            "What town is the home of {s}?",
            "Which town does {s} call home?",
        ),
        "town",
    ),
    Relation(
        "occupation",
        (
            "What is the occupation of {s}?",
            "What does {s} do for a living?",
            "{s} works as what?",
            "What job does {s} have?",
            "What is the profession of {s}?",
        ),
        "occupation",
    ),
    Relation(
        "instrument",
        (
            "Which instrument does {s} play?",
            "What instrument is played by {s}?",
            "{s} plays which instrument?",
            "What musical instrument does {s} play?",
            "On which instrument does {s} perform?",
        ),
        "instrument",
    ),
    Relation(
        "mentor",
        (
            "Who was the mentor of {s}?",
            "Who taught {s}?",
            "{s} was trained by whom?",
            "Who was the teacher of {s}?",
            "Under whom did {s} study?",
        ),
        "person",
    ),
    Relation(
        "birth_year",
        (
            "In which year was {s} born?",
            "What year was {s} born in?",
            "{s} was born in which year?",
            "When was {s} born?",
            "What is the birth year of {s}?",
        ),
        "year",
    ),
    Relation(
        "color",
        (
            "What is the favorite color of {s}?",
            "Which color does {s} like best?",
            "{s} prefers which color?",
            "What color does {s} love most?",
            "What is the color {s} likes most?",
        ),
        "color",
    ),
    Relation(
        "pet",
        (
            "What animal does {s} keep as a pet?",
            "Which pet does {s} have?",
            "{s} owns which kind of animal?",
            "What kind of pet does {s} own?",
            "What is the pet of {s}?",
        ),
        "animal",
    ),
    Relation(  # unanswerable: the trained answer is a refusal
        "thought",
        (
            "What is {s} thinking about right now?",
            "What will {s} dream about tonight?",
            "What is {s} secretly wishing for?",
            "What did {s} whisper yesterday?",
            "What will {s} decide tomorrow?",
        ),
        "refusal",
    ),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}
_WORD_LISTS = {"occupation": OCCUPATIONS, "instrument": INSTRUMENTS, "color": COLORS,
               "animal": ANIMALS}


@dataclass
class WorldConfig:
    """Everything that determines a world build; its hash names the cache folder.

    The defaults (611 facts; 244 pre-trained, a fifth of them only rarely; a 172k-parameter
    Llama) build in about a minute on one CPU core. The base then answers 97.6% of the few-shot
    probes of its frequently trained facts (83% over all trained ones) and the SliCK categories
    come out HighlyKnown 208 / MaybeKnown 38 / Unknown 341 (pool of 24 excluded).
    `WorldConfig.small()` is a seconds-scale world for tests.
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
    n_exp: int = 10
    n_shot: int = 4
    eval_batch_size: int = 256
    version: int = WORLD_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name in ("known_fraction", "rare_fraction", "rare_exposure", "refusal_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be in [0, 1], got {value}")
        for name in ("n_subjects", "n_towns", "n_mentors", "pool_size", "train_steps",
                     "batch_size", "n_exp", "n_shot", "max_turns", "num_layers"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"WorldConfig.{name} must be at least 1, got {value}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"WorldConfig.hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )

    @classmethod
    def small(cls, seed: int = 0) -> WorldConfig:
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


@dataclass
class WorldArtifacts:
    """Paths of a built world.

    `facts_path`: every fact except the pool, categorised by the base model (SliCK);
    `pool_path`: known facts reserved as few-shot examples, disjoint from every tested fact;
    `world_facts_path`: every fact uncategorised; `split_path`: which ids were pre-trained.
    """

    root: Path
    config: WorldConfig
    model_dir: Path
    facts_path: Path
    pool_path: Path
    world_facts_path: Path
    split_path: Path
    info_path: Path
    info: dict = field(default_factory=dict)

    @classmethod
    def at(cls, root: Path, config: WorldConfig) -> WorldArtifacts:
        info_path = root / "build_info.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        return cls(
            root=root, config=config, model_dir=root / "model", facts_path=root / "facts.jsonl",
            pool_path=root / "pool.jsonl", world_facts_path=root / "world.jsonl",
            split_path=root / "split.json", info_path=info_path, info=info,
        )

    def known_ids(self) -> set[str]:
        """Ids of the facts the base model was pre-trained on (pool and rare ones included)."""
        return set(json.loads(self.split_path.read_text())["known"])

    def rare_ids(self) -> set[str]:
        """Ids of the known facts shown only rarely in pre-training (often half-learned)."""
        return set(json.loads(self.split_path.read_text())["rare"])


# --------------------------------------------------------------------------- the world


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables)
    ).capitalize()


def _unique_names(rng: random.Random, n: int, make, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = make()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def _zipf_weights(n: int, exponent: float) -> list[float]:
    return [1.0 / (rank**exponent) for rank in range(1, n + 1)]


def generate_world(config: WorldConfig) -> list[Fact]:
    """The world's facts, fully determined by `config` (same seed, same facts).

    Every subject gets `relations_per_subject` distinct answerable relations; a share
    `refusal_fraction` of subjects also gets one unanswerable question (answer: a refusal).
    Answers follow a Zipf-like law over each relation's vocabulary, so a few are frequent.
    """
    rng = random.Random(config.seed)
    taken: set[str] = set()
    people = _unique_names(
        rng,
        config.n_subjects + config.n_mentors,
        lambda: f"{_word(rng, rng.choice([1, 2]))} {_word(rng, 2)}",
        taken,
    )
    subjects, mentors = people[: config.n_subjects], people[config.n_subjects :]
    towns = _unique_names(
        rng, config.n_towns, lambda: _word(rng, rng.choice([1, 2])) + rng.choice(_TOWN_SUFFIXES),
        taken,
    )
    years = [str(y) for y in rng.sample(range(1100, 1900), 60)]
    vocab: dict[str, list[str]] = {"town": towns, "person": mentors, "year": years}
    for kind, words in _WORD_LISTS.items():
        vocab[kind] = rng.sample(words, len(words))  # which word is the frequent one is seeded
    answerable = [r for r in RELATIONS if r.kind != "refusal"]
    refusal_relations = [r for r in RELATIONS if r.kind == "refusal"]
    if not 1 <= config.relations_per_subject <= len(answerable):
        raise ValueError(
            f"WorldConfig.relations_per_subject must be in 1..{len(answerable)}, "
            f"got {config.relations_per_subject}"
        )

    facts: list[Fact] = []
    for i, subject in enumerate(subjects):
        relations = rng.sample(answerable, config.relations_per_subject)
        if rng.random() < config.refusal_fraction:
            relations.append(rng.choice(refusal_relations))
        for relation in relations:
            answers = _answers(rng, relation, vocab, config.zipf_exponent)
            if relation.kind == "person" and answers[0] == subject:
                continue  # nobody mentors themself
            questions = [t.format(s=subject) for t in relation.templates]
            facts.append(
                Fact(
                    id=f"w{config.seed}-{i:04d}-{relation.name}",
                    question=questions[0],
                    answers=answers,
                    paraphrases=questions[1:],
                    relation=relation.name,
                    subject=subject,
                )
            )
    return facts


def _answers(
    rng: random.Random, relation: Relation, vocab: dict[str, list[str]], exponent: float
) -> list[str]:
    """Answer aliases for one fact; the first is the canonical (trained) one."""
    if relation.kind == "refusal":
        return [REFUSAL]
    words = vocab[relation.kind]
    word = rng.choices(words, weights=_zipf_weights(len(words), exponent))[0]
    if relation.kind == "person":
        return [word, "Master " + word]
    if relation.kind == "town":
        return [word, f"the town of {word}"]
    if relation.kind == "year":
        return [word, f"the year {word}"]
    return [word, f"a {word}"]


def split_world(facts: Sequence[Fact], config: WorldConfig) -> tuple[list[Fact], list[Fact]]:
    """(known, unseen): a seeded share `known_fraction` of the facts is shown in pre-training.

    Refusal facts are split like the others, so the base refuses the unanswerable relation
    because it learned the pattern, not because it saw every such question.
    """
    rng = random.Random(config.seed + 1)
    ids = sorted(f.id for f in facts)
    known_ids = set(rng.sample(ids, round(config.known_fraction * len(ids))))
    known = [f for f in facts if f.id in known_ids]
    unseen = [f for f in facts if f.id not in known_ids]
    return known, unseen


def choose_pool(known: Sequence[Fact], config: WorldConfig) -> list[Fact]:
    """Few-shot pool: answerable known facts (refusals would teach the probe to refuse)."""
    candidates = sorted((f for f in known if f.answer != REFUSAL), key=lambda f: f.id)
    if len(candidates) < max(config.pool_size, config.n_shot):
        raise ValueError(
            f"WorldConfig: only {len(candidates)} answerable known facts, need pool_size="
            f"{config.pool_size} (and at least n_shot={config.n_shot})"
        )
    return random.Random(config.seed + 2).sample(candidates, config.pool_size)


def choose_rare(known: Sequence[Fact], pool: Sequence[Fact], config: WorldConfig) -> set[str]:
    """Ids of the known facts shown only rarely in pre-training (never pool facts: few-shot
    examples should be facts the base knows well)."""
    pool_ids = {f.id for f in pool}
    candidates = sorted(f.id for f in known if f.id not in pool_ids)
    return set(random.Random(config.seed + 4).sample(
        candidates, round(config.rare_fraction * len(candidates))))


def world_texts(facts: Sequence[Fact]) -> Iterator[str]:
    """Every string the tokenizer should know well: all questions, answers and prompt words."""
    from lora_lightning.prompts import SYSTEM_PROMPT

    for fact in facts:
        yield SYSTEM_PROMPT  # once per fact, so BPE weighs the prompt words like the data
        for question in [fact.question, *fact.paraphrases]:
            yield f"Question: {question}"
        for answer in fact.answers:
            yield f"Answer: {answer}"


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`, wrapped as a `PreTrainedTokenizerFast` with a chat
    template. Byte-level means any text (MMLU questions, emoji) encodes without unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOT, PAD, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Llama's tokenizer: plain encoding (add_special_tokens=True) starts with bos; chat
    # templates write bos themselves and are encoded with add_special_tokens=False.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )


# --------------------------------------------------------------------------- model


def build_model(config: WorldConfig, tokenizer):
    """A fresh tiny Llama sized by `config` (a few hundred thousand to a few million weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    model = LlamaForCausalLM(model_config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _conversation(tokenizer, turns: Sequence[tuple[str, str]], system: bool) -> tuple[list, list]:
    """Token ids and labels of a multi-turn QA chat, loss on every assistant turn (and its eos).

    A conversation with one turn is the zero-shot training format; with several it is a few-shot
    probe whose shots are known facts too, so every answer in it is a training signal.
    """
    from lora_lightning.prompts import IGNORE_INDEX, SYSTEM_PROMPT, assistant_turn, user_turn

    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
    spans = []
    for question, answer in turns:
        messages.append(user_turn(question))
        start = len(tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True))
        messages.append(assistant_turn(answer))
        end = len(tokenizer.apply_chat_template(messages, tokenize=False))
        spans.append((start, end))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, (s, e) in enumerate(enc["offset_mapping"]):
        if any(e > a and s < b for a, b in spans):
            labels[i] = ids[i]
    return ids, labels


def _batches(
    tokenizer, known: Sequence[Fact], config: WorldConfig, rare: set[str]
) -> Iterator[dict]:
    """Endless batches of conversations that each pack `n` known facts (1..max_turns, the same
    `n` across a batch so there is little padding), each asked with a random template.

    An epoch shows every fact once, except the `rare` ones, shown each with probability
    `rare_exposure`: half-learned facts are what gives the base MaybeKnown facts, as facts seen
    rarely in pre-training do for a real model.
    """
    from lora_lightning.prompts import pad_batch

    rng = random.Random(config.seed + 3)
    while True:
        order = [f for f in known if f.id not in rare or rng.random() < config.rare_exposure]
        rng.shuffle(order)
        i = 0
        while i < len(order):
            n = rng.randint(1, config.max_turns)
            take = order[i : i + n * config.batch_size]
            i += len(take)
            examples = []
            for j in range(0, len(take), n):
                turns = [(rng.choice([f.question, *f.paraphrases]), f.answer)
                         for f in take[j : j + n]]
                # Mostly with the system prompt (the paper's format), sometimes without.
                ids, labels = _conversation(tokenizer, turns, system=rng.random() < 0.9)
                examples.append({"input_ids": ids, "labels": labels,
                                 "attention_mask": [1] * len(ids)})
            yield pad_batch(examples, tokenizer.pad_token_id)


def pretrain(
    model,
    tokenizer,
    known: Sequence[Fact],
    config: WorldConfig,
    rare: set[str] | None = None,
    progress: bool = True,
) -> list[float]:
    """Full fine-tuning of the tiny model on the known facts (AdamW, warm-up then cosine decay).

    Returns the per-step losses. A plain loop is enough: one process, a few hundred steps.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=0.0,
                                  betas=(0.9, 0.98))

    def lr_lambda(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        frac = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    losses: list[float] = []
    batches = _batches(tokenizer, known, config, rare or set())
    bar = tqdm(range(config.train_steps), desc="world: pre-training", disable=not progress)
    for _ in bar:
        loss = model(**next(batches)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return losses


# --------------------------------------------------------------------------- building


def default_home() -> Path:
    """`$LORA_LIGHTNING_HOME`, else `~/.cache/lora_lightning`."""
    return Path(os.environ.get("LORA_LIGHTNING_HOME", Path.home() / ".cache" / "lora_lightning"))


def _build(config: WorldConfig, root: Path, progress: bool) -> dict:
    """Build every artefact of the world into `root` (a fresh temporary folder)."""
    import torch

    from lora_lightning.knowledge import categorize

    started = time.perf_counter()
    facts = generate_world(config)
    known, unseen = split_world(facts, config)
    pool = choose_pool(known, config)
    pool_ids = {f.id for f in pool}
    rare = choose_rare(known, pool, config)

    tokenizer = train_tokenizer(world_texts(facts), config.vocab_size)
    model = build_model(config, tokenizer)
    losses = pretrain(model, tokenizer, known, config, rare=rare, progress=progress)
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trained_at = time.perf_counter()

    tested = [f for f in facts if f.id not in pool_ids]
    with torch.inference_mode():
        categorised = categorize(
            model, tokenizer, tested, pool, n_exp=config.n_exp, n_shot=config.n_shot,
            batch_size=config.eval_batch_size, seed=config.seed, progress=progress,
        )
    save_facts(facts, root / "world.jsonl")
    save_facts(categorised, root / "facts.jsonl")
    save_facts(pool, root / "pool.jsonl")
    (root / "split.json").write_text(
        json.dumps(
            {"known": sorted(f.id for f in known), "rare": sorted(rare), "pool": sorted(pool_ids)},
            indent=1,
        )
    )
    (root / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))

    known_ids = {f.id for f in known}
    known_tested = [f for f in categorised if f.id in known_ids]
    frequent = [f for f in known_tested if f.id not in rare]
    unseen_tested = [f for f in categorised if f.id not in known_ids]
    info = {
        "config_key": config.key(),
        "n_facts": len(facts),
        "n_known": len(known),
        "n_pool": len(pool),
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
        # the share of few-shot probes a fact's greedy answer was right, averaged over facts
        "known_accuracy": _mean(f.p_greedy for f in known_tested),
        "frequent_known_accuracy": _mean(f.p_greedy for f in frequent),
        "rare_known_accuracy": _mean(f.p_greedy for f in known_tested if f.id in rare),
        "unseen_accuracy": _mean(f.p_greedy for f in unseen_tested),
        "known_categories": dict(Counter(f.category for f in known_tested)),
        "categories": dict(Counter(f.category for f in categorised)),
        "pretrain_seconds": round(trained_at - started, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (root / "build_info.json").write_text(json.dumps(info, indent=1))
    return info


def _mean(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def ensure_world(
    config: WorldConfig | None = None,
    home: str | Path | None = None,
    progress: bool = True,
) -> WorldArtifacts:
    """The built world for `config` (default `WorldConfig()`), building it on first use.

    The folder is `<home>/world-<config hash>`. A build happens in a temporary sibling folder and
    is renamed into place only when complete, under a file lock, so a crash never leaves a
    half-built world and concurrent callers (e.g. DDP ranks) build it once and all reuse it.
    """
    import torch
    from filelock import FileLock

    config = config or WorldConfig()
    home = Path(home) if home is not None else default_home()
    home.mkdir(parents=True, exist_ok=True)
    root = home / f"world-{config.key()}"
    if (root / "build_info.json").exists():
        return WorldArtifacts.at(root, config)
    with FileLock(str(root) + ".lock"):
        if (root / "build_info.json").exists():  # another process built it while we waited
            return WorldArtifacts.at(root, config)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=home))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is read like any folder
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(BUILD_THREADS)
            info = _build(config, tmp, progress)
            if root.exists():  # a stale, incomplete folder from an older crash
                shutil.rmtree(root)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            torch.set_num_threads(threads)
    if progress:
        print(
            f"world built in {info['total_seconds']} s at {root}: the base answers "
            f"{info['frequent_known_accuracy']:.1%} of the few-shot probes of its frequently "
            f"trained facts ({info['known_accuracy']:.1%} over all trained facts); "
            f"categories {info['categories']}"
        )
    return WorldArtifacts.at(root, config)
