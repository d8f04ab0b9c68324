"""The training mix as Lightning data: `KnowledgeDataModule` loads the facts and the tokenizer,
builds the mix (`lora_lightning.mix`), encodes it as zero-shot chat conversations and serves the
batches, DDP-safe and resumable mid-epoch.

Train = the mix's Unknown facts and their extras. Validation = the trained Unknown facts
(reliability) plus held-out HighlyKnown facts (forgetting), each item tagged with its `kind`
code (an index into `VAL_KINDS`) so the model can log the two losses apart. Test = every
categorised fact outside the few-shot pool, as batches of `Fact`s, for re-categorisation
(knowledge shift).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lora_lightning import world
from lora_lightning.facts import Fact, excerpt, load_facts, pool_sidecar
from lora_lightning.mix import (
    HIGHLY_KNOWN,
    PARAPHRASE,
    UNKNOWN,
    Bias,
    ExtraKind,
    Mix,
    Selection,
    build_mix,
    check_choice,
    check_extras,
)
from lora_lightning.models import (
    check_world_facts,
    load_tokenizer,
    resolve_tokenizer,
    text_limit,
)
from lora_lightning.prompts import LossOn, encode_example, pack_batch, pad_batch

__all__ = ["VAL_KINDS", "EncodedFacts", "KnowledgeDataModule", "ResumableDataLoader"]

log = logging.getLogger(__name__)

# A validation batch's `kind` is a LongTensor of indices into this tuple.
VAL_KINDS = (UNKNOWN, HIGHLY_KNOWN)


class EncodedFacts(Dataset):
    """Pre-encoded conversations (encoding up front surfaces a too-long fact before training)."""

    def __init__(self, items: list[dict[str, Any]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class ResumableDataLoader(DataLoader):
    """A DataLoader whose place within the epoch is saved in Lightning checkpoints.

    Lightning stores `state_dict()` of a loader that has one and hands it back on resume, so a
    run interrupted mid-epoch continues with exactly the batches it had not trained on yet. The
    place is read from the trainer's progress (`position`), not counted here, because Lightning
    fetches one batch ahead of the one it trains on.
    """

    def __init__(self, *args: Any, position: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = position
        self._resume: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches_done": self._position()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        iterator = super().__iter__()
        return iterator if not resume else self._skip(iterator, resume)

    def _skip(self, iterator: Iterator[Any], resume: dict[str, int]) -> Iterator[Any]:
        # Lazily: Lightning calls iter() before set_epoch(), and the sampler draws its
        # permutation on the first next(), so only then is the epoch known.
        if getattr(self.sampler, "epoch", 0) == resume["epoch"]:
            for _ in range(resume["batches_done"]):
                next(iterator, None)
        yield from iterator


class KnowledgeDataModule(L.LightningDataModule):
    """Train on a mix of Unknown facts with HighlyKnown facts or paraphrases; validate on both.

    Args:
        facts: Categorised fact file (any source `load_facts` reads: JSONL, Parquet, a
            save_to_disk folder, `hf:name[:split]`). None = the embedded synthetic world.
        tokenizer: Path or name for `AutoTokenizer.from_pretrained`; it must carry a chat
            template. None = the synthetic world's base model folder.
        fewshot_pool: Fact file of few-shot examples for the evaluation probes. None = the
            world's pool; for a fact file, the `<stem>.pool.jsonl` that `categorize` wrote
            beside it, else a seeded sample of 32 HighlyKnown facts unused by the mix.
        n_unknown: Number of Unknown facts to teach (paper: 1, 10, 50, 100, 500, 3000).
        extra_per_unknown: k extra samples per Unknown fact (paper: 0, 1, 10).
        extra_kind: What the extras are: distinct HighlyKnown facts, k paraphrases of the
            Unknown question, or nothing.
        selection: "first" takes facts in file order as the paper does; "random" draws them
            with `seed`; "stratified" draws them with `seed` within each relation and deals
            the relations out in turn, so the trained, extra and held-out facts each span
            every relation (use it for a real fact file grouped by relation).
        seed: Seed of the random selection and of the training sampler's shuffling.
        bias: Biased mix: draw the Unknown facts only from the `bias_groups` largest groups of
            facts sharing a "subject" or an "answer"; "none" = unbiased.
        bias_groups: How many subject/answer groups a biased mix draws from.
        n_val_known: Held-out HighlyKnown facts validated on to measure forgetting.
        extra_repeats: When the facts have fewer distinct extras than the mix needs (n*k
            HighlyKnown facts, or k paraphrases per Unknown fact), reuse them evenly instead of
            failing, as the paper's largest mixes must.
        loss_on: "answer" puts loss on the assistant turn only; "all" on every token, as the
            paper's released script does.
        batch_size: Samples per batch on each device.
        test_batch_size: Facts per `test` batch. Each batch is re-categorised with every
            few-shot set of the probe, one generation batch per set holding one prompt per
            fact, so a batch of at least the probe's `batch_size` facts fills them (with the
            greedy loop of `inference.greedy_decode`, a bench-world cell's test took 138 s
            against 170 s with batches of 8 and `generate`).
        max_length: Longest conversation in tokens; a longer one is an error, never truncated.
        num_workers: DataLoader worker processes.
        packing: Concatenate each batch's conversations into one row without padding
            (`prompts.pack_batch`; attention stays within each conversation, see
            `lora_lightning/attention.py`) instead of right-padding them to the longest. The
            same loss and gradients, less work.
    """

    def __init__(
        self,
        facts: str | None = None,
        tokenizer: str | None = None,
        fewshot_pool: str | None = None,
        n_unknown: int = 50,
        extra_per_unknown: int = 1,
        extra_kind: ExtraKind = "highly_known",
        selection: Selection = "first",
        seed: int = 42,
        bias: Bias = "none",
        bias_groups: int = 1,
        n_val_known: int = 50,
        extra_repeats: bool = False,
        loss_on: LossOn = "answer",
        batch_size: int = 16,
        test_batch_size: int = 64,
        max_length: int = 256,
        num_workers: int = 0,
        packing: bool = True,
    ) -> None:
        super().__init__()
        for name, value, literal in [("extra_kind", extra_kind, ExtraKind),
                                     ("selection", selection, Selection), ("bias", bias, Bias),
                                     ("loss_on", loss_on, LossOn)]:
            check_choice(name, value, literal)
        for name, value, low in [("n_unknown", n_unknown, 1),
                                 ("extra_per_unknown", extra_per_unknown, 0),
                                 ("bias_groups", bias_groups, 1), ("n_val_known", n_val_known, 0),
                                 ("batch_size", batch_size, 1), ("max_length", max_length, 1),
                                 ("test_batch_size", test_batch_size, 1),
                                 ("num_workers", num_workers, 0)]:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        check_extras(extra_kind, extra_per_unknown)
        self.save_hyperparameters()
        # The init args `facts`, `tokenizer` and `fewshot_pool` name sources; after setup() the
        # attributes of those names hold the loaded objects.
        self.tokenizer: Any = None
        self.all_facts: list[Fact] = []
        self.train_unknown: list[Fact] = []
        self.train_extra: list[Fact] = []
        self.val_known: list[Fact] = []
        self.fewshot_pool: list[Fact] = []
        self.test_facts: list[Fact] = []
        self.mix: Mix | None = None
        self._train: EncodedFacts | None = None
        self._val: EncodedFacts | None = None
        self._expected_fingerprint: str | None = None

    # ----------------------------------------------------------------------- building

    def prepare_data(self) -> None:
        """Build the synthetic world once per machine (Lightning calls this on local rank 0)."""
        if self.hparams.facts is None:
            check_world_facts(self.hparams.tokenizer, None, what="data.tokenizer")
            world.ensure_world()

    def _sources(self) -> tuple[str, str, str | None]:
        hp = self.hparams
        # the tokenizer is the model's (the CLI links them): the world's facts only fit the world
        check_world_facts(hp.tokenizer, hp.facts, what="data.tokenizer")
        if hp.facts is not None:
            pool = hp.fewshot_pool
            sidecar = pool_sidecar(hp.facts)
            if pool is None and Path(hp.facts).suffix and sidecar.is_file():
                # `categorize` saved its few-shot pool there: reuse it, so the categories
                # before and after training come from the same prompts
                pool = str(sidecar)
            return hp.facts, resolve_tokenizer(hp.tokenizer), pool
        built = world.ensure_world()
        pool = hp.fewshot_pool if hp.fewshot_pool is not None else str(built.pool_path)
        return str(built.facts_path), resolve_tokenizer(hp.tokenizer), pool

    def setup(self, stage: str | None = None) -> None:
        """Load facts and tokenizer, build and encode the mix (once; every rank the same)."""
        if self._train is not None:
            return
        hp = self.hparams
        facts_source, tokenizer_source, pool_source = self._sources()
        tokenizer = load_tokenizer(tokenizer_source, what="data.tokenizer")
        # a question longer than the model takes is refused on its line, before any encoding
        limit = text_limit(tokenizer_source, tokenizer)
        self.all_facts = load_facts(facts_source, limit=limit)
        pool = load_facts(pool_source, limit=limit) if pool_source is not None else None
        mix = build_mix(
            self.all_facts, n_unknown=hp.n_unknown, extra_per_unknown=hp.extra_per_unknown,
            extra_kind=hp.extra_kind, selection=hp.selection, seed=hp.seed, bias=hp.bias,
            bias_groups=hp.bias_groups, n_val_known=hp.n_val_known, fewshot_pool=pool,
            extra_repeats=hp.get("extra_repeats", False),
        )
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"tokenizer {tokenizer_source!r} has no chat template; prompts are rendered "
                "with it (use an Instruct model's tokenizer, or set `chat_template`)"
            )
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ValueError(f"tokenizer {tokenizer_source!r} has neither pad nor eos token")
            tokenizer.pad_token = tokenizer.eos_token  # padding never carries loss or attention
        encode = partial(self._encode, tokenizer, facts_source)
        self._train = EncodedFacts([encode(f) for f, _ in mix.train_items()])
        self._val = EncodedFacts(
            [{**encode(f), "kind": VAL_KINDS.index(kind)} for f, kind in mix.val_items()]
        )
        pool_ids = {f.id for f in mix.fewshot_pool}
        self.test_facts = [f for f in self.all_facts if f.id not in pool_ids]
        self.tokenizer, self.mix = tokenizer, mix
        self.train_unknown, self.train_extra = mix.train_unknown, mix.train_extra
        self.val_known, self.fewshot_pool = mix.val_known, mix.fewshot_pool
        self._source = facts_source
        if not mix.fewshot_pool:
            log.warning("the few-shot pool is empty: few-shot evaluation probes cannot be built")
        self._check_fingerprint()
        rank_zero_info(f"knowledge mix: {json.dumps(self.mix_summary())}")

    def _encode(self, tokenizer: Any, source: str, fact: Fact) -> dict[str, list[int]]:
        try:
            return encode_example(
                tokenizer, fact.question, fact.answer, self.hparams.max_length,
                self.hparams.loss_on,
            )
        except ValueError as exc:
            raise ValueError(f"{source}: fact {excerpt(fact.id)}: {exc}") from exc

    def mix_summary(self) -> dict[str, Any]:
        """Counts per kind for train and validation, and per category of the source facts."""
        if self.mix is None:
            raise RuntimeError("mix_summary() is available after setup()")
        train = Counter(kind for _, kind in self.mix.train_items())
        val = Counter(kind for _, kind in self.mix.val_items())
        hp = self.hparams
        return {
            "facts": self._source,
            "facts_by_category": dict(Counter(f.category for f in self.all_facts)),
            "train": {**{k: train[k] for k in (UNKNOWN, HIGHLY_KNOWN, PARAPHRASE)},
                      "total": sum(train.values())},
            "val": {**{k: val[k] for k in VAL_KINDS}, "total": sum(val.values())},
            "fewshot_pool": len(self.mix.fewshot_pool),
            "settings": {name: hp[name] for name in (
                "n_unknown", "extra_per_unknown", "extra_kind", "selection", "seed", "bias",
                "bias_groups", "n_val_known", "extra_repeats", "loss_on")},
        }

    # ---------------------------------------------------------------------- loaders

    def _collate(self) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
        if self.hparams.get("packing", False):
            return pack_batch
        return partial(pad_batch, pad_token_id=self.tokenizer.pad_token_id)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def train_dataloader(self) -> DataLoader:
        """Shuffled by a DistributedSampler we create, so Lightning keeps it and sets its epoch.

        Its permutation depends only on `seed` and the epoch: every rank agrees on it, a rerun
        replays it exactly, and the global batch of N ranks with batch size b equals the batch
        of one process with batch size N*b (up to the sampler's padding of the last batch when
        the size is not a multiple of N). The loader saves its place in the epoch, so resuming
        from a mid-epoch checkpoint continues with exactly the batches not yet trained on.
        """
        if self._train is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        world_size, rank = self._world()
        sampler = DistributedSampler(
            self._train, num_replicas=world_size, rank=rank, shuffle=True, seed=self.hparams.seed
        )
        return ResumableDataLoader(
            self._train, batch_size=self.hparams.batch_size, sampler=sampler,
            collate_fn=self._collate(), num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0, position=self._batches_done,
            generator=self._generator(),
        )

    def _generator(self) -> torch.Generator:
        """The loader's own generator. Without one, every `iter(loader)` draws its workers'
        base seed from torch's global generator, the one LoRA dropout draws from: a run
        resumed mid-epoch creates its iterator at a point the uninterrupted run did not, and
        its dropout masks (hence its adapter) would differ from there on."""
        return torch.Generator().manual_seed(self.hparams.seed)

    def _batches_done(self) -> int:
        """Training batches finished in the current epoch (what a resume must skip)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def val_dataloader(self) -> DataLoader:
        """Trained Unknown facts then held-out HighlyKnown ones; `kind` indexes `VAL_KINDS`."""
        if self._val is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        return DataLoader(
            self._val, batch_size=self.hparams.batch_size, shuffle=False,
            collate_fn=self._collate(), num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0, generator=self._generator(),
        )

    def test_dataloader(self) -> DataLoader:
        """Batches (lists) of every categorised fact outside the few-shot pool.

        The model re-categorises them after training; comparing with the categories they carry
        gives the knowledge shift and the answer-concentration measures.
        """
        if self._val is None:
            raise RuntimeError("call setup() before asking for dataloaders")
        world_size, rank = self._world()
        # No padding by repeats: each fact is measured exactly once across ranks.
        sampler = UnrepeatedDistributedSampler(
            self.test_facts, num_replicas=world_size, rank=rank, shuffle=False
        )
        return DataLoader(
            self.test_facts, batch_size=self.hparams.get("test_batch_size", 64), sampler=sampler,
            collate_fn=_as_list, generator=self._generator(),
        )

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"mix_fingerprint": self.mix.fingerprint() if self.mix is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Refuse to resume a run on a different mix than the one it was trained on."""
        self._expected_fingerprint = state_dict.get("mix_fingerprint")
        if self.mix is not None:
            self._check_fingerprint()

    def _check_fingerprint(self) -> None:
        expected = self._expected_fingerprint
        if expected is not None and self.mix is not None and self.mix.fingerprint() != expected:
            raise ValueError(
                "the checkpoint was trained on a different mix than this datamodule builds "
                f"from {self._source} (facts, n_unknown, extra_*, selection, seed or bias differ, "
                "or the fact file changed since); resume with the run's own settings and facts"
            )


def _as_list(facts: list[Fact]) -> list[Fact]:
    return list(facts)
