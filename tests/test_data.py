"""The training mix and the DataModule: exact composition, seeded determinism, masking, DDP."""

from __future__ import annotations

import logging
import random
import string
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from test_prompts import make_tokenizer
from torch.utils.data import DistributedSampler

from lora_lightning.data import VAL_KINDS, KnowledgeDataModule
from lora_lightning.facts import DEFAULT_POOL_SIZE, Fact, load_facts, save_facts
from lora_lightning.mix import build_mix, mix_size

N_UNKNOWN, N_KNOWN, N_MAYBE, N_PARA = 40, 60, 7, 4
# Unknown answers: groups of 9, 6 and 4 facts sharing an answer, the rest unique.
ANSWER_GROUPS = [9, 6, 4]
SUBJECT_GROUPS = [8, 5]


def word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 8))).title()


def make_facts(rng: random.Random) -> list[Fact]:
    """Categorised facts in a shuffled file order, with paraphrases and subject/answer groups."""
    answers = [
        a
        for size, a in zip(ANSWER_GROUPS, ["Alencon", "Brest", "Caen"], strict=True)
        for _ in range(size)
    ]
    subjects = [
        s for size, s in zip(SUBJECT_GROUPS, ["Zorb", "Quill"], strict=True) for _ in range(size)
    ]
    facts = []
    for i in range(N_UNKNOWN):
        name = word(rng)
        facts.append(
            Fact(
                id=f"u{i}",
                question=f"Where was {name} {i} born?",
                answers=[answers[i] if i < len(answers) else f"{word(rng)}{i}"],
                category="Unknown",
                subject=subjects[i] if i < len(subjects) else f"{name}{i}",
                paraphrases=[
                    f"In which town was {name} {i} born, version {j}?" for j in range(N_PARA)
                ],
            )
        )
    facts += [
        Fact(
            f"k{i}", f"What is the capital of {word(rng)} {i}?", [word(rng)], category="HighlyKnown"
        )
        for i in range(N_KNOWN)
    ]
    facts += [
        Fact(f"m{i}", f"Who founded {word(rng)} {i}?", [word(rng)], category="MaybeKnown")
        for i in range(N_MAYBE)
    ]
    rng.shuffle(facts)
    return facts


def unknown_order(facts: list[Fact]) -> list[Fact]:
    return [f for f in facts if f.category == "Unknown"]


@pytest.fixture
def facts() -> list[Fact]:
    return make_facts(random.Random())


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(
        ["Where was Bob born?", "What is the capital of France?", "Answer: Caen"], save_dir=path
    )
    return path


@pytest.fixture
def fact_file(tmp_path, facts) -> Path:
    return save_facts(facts, tmp_path / "facts.jsonl")


def make_dm(fact_file: Path, tokenizer_dir: Path, **kwargs) -> KnowledgeDataModule:
    for key, value in (
        ("n_val_known", 5),
        ("n_unknown", 10),
        ("extra_per_unknown", 0),
        ("extra_kind", "none"),
    ):
        kwargs.setdefault(key, value)
    return KnowledgeDataModule(facts=str(fact_file), tokenizer=str(tokenizer_dir), **kwargs)


# ------------------------------------------------------------------------- composition

SETTINGS = [
    (1, 0, "none"),
    (10, 0, "highly_known"),
    (5, 1, "highly_known"),
    (10, 5, "highly_known"),
    (2, 3, "paraphrase"),
    (3, 1, "paraphrase"),
]


@pytest.mark.parametrize(("n", "k", "kind"), SETTINGS)
@pytest.mark.parametrize("selection", ["first", "random"])
def test_mix_has_exactly_the_requested_composition(facts, n, k, kind, selection):
    mix = build_mix(
        facts,
        n_unknown=n,
        extra_per_unknown=k,
        extra_kind=kind,
        selection=selection,
        seed=1337,
        n_val_known=5,
    )
    assert len(mix.train_unknown) == n and len(mix.train_extra) == n * k
    assert all(f.category == "Unknown" for f in mix.train_unknown)
    assert len({f.id for f in mix.train_unknown}) == n
    if selection == "first":
        assert mix.train_unknown == unknown_order(facts)[:n]  # the paper's "first n"
    assert len(mix.val_known) == 5 and all(f.category == "HighlyKnown" for f in mix.val_known)
    val_ids = {f.id for f in mix.val_known}
    pool_ids = {f.id for f in mix.fewshot_pool}
    assert not val_ids & pool_ids and all(f.category == "HighlyKnown" for f in mix.fewshot_pool)
    if kind == "highly_known":
        extra_ids = {f.id for f in mix.train_extra}
        assert len(extra_ids) == n * k  # distinct
        assert all(f.category == "HighlyKnown" for f in mix.train_extra)
        assert not extra_ids & val_ids and not extra_ids & pool_ids
        assert len(mix.fewshot_pool) == min(DEFAULT_POOL_SIZE, N_KNOWN - 5 - n * k)
    if kind == "paraphrase":
        per_fact = Counter(f.meta["paraphrase_of"] for f in mix.train_extra)
        assert per_fact == {f.id: k for f in mix.train_unknown}
        by_id = {f.id: f for f in mix.train_unknown}
        for extra in mix.train_extra:
            source = by_id[extra.meta["paraphrase_of"]]
            assert extra.question in source.paraphrases and extra.answers == source.answers
        assert len({f.question for f in mix.train_extra}) == n * k
    summary_train = Counter(kind for _, kind in mix.train_items())
    assert summary_train["unknown"] == n and sum(summary_train.values()) == n * (1 + k)


@pytest.mark.parametrize(("n", "k", "kind"), SETTINGS)
def test_mix_size_counts_the_samples_the_mix_trains_on(facts, n, k, kind):
    """What a sweep orders its cells by and a capacity probe counts its steps from, without
    building the mix."""
    mix = build_mix(facts, n_unknown=n, extra_per_unknown=k, extra_kind=kind, n_val_known=5)
    assert mix_size(n, k, kind) == len(mix.train_items())


def test_random_selection_is_a_function_of_the_seed(facts):
    def build(seed: int):
        mix = build_mix(
            facts,
            n_unknown=8,
            extra_per_unknown=2,
            extra_kind="highly_known",
            selection="random",
            seed=seed,
            n_val_known=6,
        )
        return [f.id for f in mix.train_unknown + mix.train_extra + mix.val_known]

    first_build = build(42)
    state = random.getstate()
    random.seed(1)  # ranks differ in global RNG state; the mix must not care
    with torch.random.fork_rng():
        torch.manual_seed(2)
        assert build(42) == first_build
    random.setstate(state)
    assert build(42) != build(10824)
    first = build_mix(facts, n_unknown=8, selection="first", seed=1)
    assert first.train_unknown == build_mix(facts, n_unknown=8, seed=2).train_unknown


def test_random_paraphrases_are_seeded(facts):
    def questions(seed: int) -> list[str]:
        mix = build_mix(
            facts,
            n_unknown=12,
            extra_per_unknown=2,
            extra_kind="paraphrase",
            selection="random",
            seed=seed,
        )
        return [f.question for f in mix.train_extra]

    assert questions(5) == questions(5) and questions(5) != questions(6)


@pytest.mark.parametrize("selection", ["first", "random"])
def test_forgetting_set_and_unknowns_do_not_move_when_k_changes(facts, selection):
    mixes = [
        build_mix(
            facts,
            n_unknown=4,
            extra_per_unknown=k,
            extra_kind="highly_known",
            selection=selection,
            seed=3,
            n_val_known=7,
        )
        for k in (0, 1, 10)
    ]
    assert len({tuple(f.id for f in m.val_known) for m in mixes}) == 1
    assert len({tuple(f.id for f in m.train_unknown) for m in mixes}) == 1
    bigger = build_mix(facts, n_unknown=9, selection=selection, seed=3)
    assert bigger.train_unknown[:4] == mixes[0].train_unknown  # smaller mixes nest


def test_not_enough_facts_errors_name_the_numbers(facts):
    with pytest.raises(ValueError, match=rf"n_unknown=41 requested, the facts have {N_UNKNOWN}"):
        build_mix(facts, n_unknown=N_UNKNOWN + 1)
    with pytest.raises(
        ValueError,
        match=rf"need 65 \(n_val_known=5 \+ 10\*6 extras\), the facts "
        rf"have {N_KNOWN}",
    ):
        build_mix(
            facts, n_unknown=10, extra_per_unknown=6, extra_kind="highly_known", n_val_known=5
        )
    with pytest.raises(ValueError, match=rf"need {N_KNOWN + 1} \(n_val_known={N_KNOWN + 1}\)"
                       r".*; lower data.n_val_known to fit"):
        build_mix(facts, n_unknown=1, n_val_known=N_KNOWN + 1)
    with pytest.raises(ValueError, match="lower data.n_val_known, data.extra_per_unknown or "
                                         "data.n_unknown to fit"):
        build_mix(facts, n_unknown=10, extra_per_unknown=6, extra_kind="highly_known",
                  n_val_known=5)
    short = unknown_order(facts)[3]  # one real paraphrase; the others repeat it or the question
    short.paraphrases = [short.paraphrases[0], short.question.upper(), short.paraphrases[0] + "!"]
    with pytest.raises(
        ValueError,
        match=rf"1 of the 5 Unknown facts have fewer distinct ones "
        rf"\(e\.g\. {short.id} has 1; ids {short.id}\)",
    ):
        build_mix(facts, n_unknown=5, extra_per_unknown=2, extra_kind="paraphrase")
    with pytest.raises(ValueError, match=r"1 of \d+ have no category \(ids x\)"):
        build_mix([*facts, Fact("x", "Uncategorised?", ["y"])], n_unknown=1)
    with pytest.raises(ValueError, match="needs extra_kind"):
        build_mix(facts, n_unknown=1, extra_per_unknown=1, extra_kind="none")


def test_extra_repeats_cycles_highly_known_facts_evenly_when_too_few(facts):
    """3,000 Unknown + 10 HighlyKnown each needs more HighlyKnown facts than the paper had."""
    with pytest.raises(ValueError, match="data.extra_repeats=true reuses HighlyKnown"):
        build_mix(facts, n_unknown=10, extra_per_unknown=6, extra_kind="highly_known",
                  n_val_known=5)
    mix = build_mix(facts, n_unknown=10, extra_per_unknown=6, extra_kind="highly_known",
                    n_val_known=5, extra_repeats=True)
    assert len(mix.train_extra) == 60
    uses = Counter(f.id for f in mix.train_extra)
    assert len(uses) == N_KNOWN - 5  # every HighlyKnown fact but the validation ones
    assert max(uses.values()) - min(uses.values()) <= 1  # as evenly as possible
    assert not {f.id for f in mix.val_known} & set(uses)  # the forgetting set stays untouched
    # with enough distinct facts the option changes nothing
    same = dict(n_unknown=5, extra_per_unknown=2, extra_kind="highly_known", n_val_known=5)
    assert build_mix(facts, **same, extra_repeats=True) == build_mix(facts, **same)


@pytest.mark.parametrize("selection", ["first", "random"])
def test_extra_repeats_cycles_paraphrases_when_a_fact_has_too_few(facts, selection):
    short = build_mix(facts, n_unknown=5, selection=selection).train_unknown[3]
    short.paraphrases = [short.paraphrases[0], short.question.upper()]  # one distinct
    with pytest.raises(ValueError, match="data.extra_repeats=true reuses paraphrases"):
        build_mix(facts, n_unknown=5, extra_per_unknown=3, extra_kind="paraphrase",
                  selection=selection)
    mix = build_mix(facts, n_unknown=5, extra_per_unknown=3, extra_kind="paraphrase",
                    selection=selection, extra_repeats=True)
    of_short = [f.question for f in mix.train_extra if f.meta["paraphrase_of"] == short.id]
    assert of_short == [short.paraphrases[0]] * 3
    for fact in mix.train_unknown:
        questions = [f.question for f in mix.train_extra if f.meta["paraphrase_of"] == fact.id]
        assert len(questions) == 3 and fact.question not in questions


@pytest.mark.parametrize(
    ("bias", "groups", "sizes"), [("answer", 1, [9]), ("answer", 2, [9, 6]), ("subject", 1, [8])]
)
def test_biased_mix_draws_from_the_largest_groups(facts, bias, groups, sizes):
    n = sum(sizes)
    mix = build_mix(facts, n_unknown=n, bias=bias, bias_groups=groups, selection="random", seed=9)
    keys = Counter(f.answer if bias == "answer" else f.subject for f in mix.train_unknown)
    assert sorted(keys.values(), reverse=True) == sizes
    with pytest.raises(
        ValueError,
        match=rf"groups hold {n} Unknown facts, fewer than "
        rf"n_unknown={n + 1}",
    ):
        build_mix(facts, n_unknown=n + 1, bias=bias, bias_groups=groups)


def test_fewshot_pool_file_loses_facts_that_are_trained_or_validated(facts):
    mix0 = build_mix(facts, n_unknown=3, n_val_known=2)
    outside = Fact("p0", "A question nobody trains on?", ["x"], category="HighlyKnown")
    pool = [outside, mix0.train_unknown[0], mix0.val_known[1]]
    mix = build_mix(facts, n_unknown=3, n_val_known=2, fewshot_pool=pool)
    assert [f.id for f in mix.fewshot_pool] == ["p0"]


# ------------------------------------------------------------------------- DataModule


def decode_trained(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> str:
    return tokenizer.decode(input_ids[labels != -100].tolist())


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def rank_zero_log():
    """Messages of Lightning's rank-zero logger (it does not propagate to pytest's caplog)."""
    handler = Records()
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def examples_in(batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input ids, labels) of each example of a padded or a packed batch, padding removed."""
    if "sequence_ids" in batch:  # packed: one row, no padding, positions restart per example
        ids, labels, seq = batch["input_ids"][0], batch["labels"][0], batch["sequence_ids"][0]
        assert "attention_mask" not in batch
        out = []
        for index in range(int(seq[-1]) + 1):
            sel = seq == index
            assert batch["position_ids"][0][sel].tolist() == list(range(int(sel.sum())))
            out.append((ids[sel], labels[sel]))
        return out
    out = []
    for ids, mask, labels in zip(
        batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
    ):
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padding
        assert (labels[n:] == -100).all()
        out.append((ids[:n], labels[:n]))
    return out


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_datamodule_batches_mask_everything_but_the_answer(
    fact_file, tokenizer_dir, rank_zero_log, packing
):
    dm = make_dm(
        fact_file,
        tokenizer_dir,
        n_unknown=6,
        extra_per_unknown=2,
        extra_kind="highly_known",
        batch_size=4,
        packing=packing,
    )
    dm.setup("fit")
    logged = "\n".join(rank_zero_log)
    assert "knowledge mix" in logged and '"train": {"unknown": 6, "highly_known": 12' in logged
    summary = dm.mix_summary()
    assert summary["train"] == {"unknown": 6, "highly_known": 12, "paraphrase": 0, "total": 18}
    assert summary["val"] == {"unknown": 6, "highly_known": 5, "total": 11}
    assert summary["facts_by_category"] == {
        "Unknown": N_UNKNOWN,
        "HighlyKnown": N_KNOWN,
        "MaybeKnown": N_MAYBE,
    }
    assert (
        summary["fewshot_pool"] == len(dm.fewshot_pool) == min(DEFAULT_POOL_SIZE, N_KNOWN - 12 - 5)
    )
    by_question = {f.question: f for f in dm.train_unknown + dm.train_extra}
    seen = 0
    for batch in dm.train_dataloader():
        layout = {"position_ids", "sequence_ids"} if packing else {"attention_mask"}
        assert set(batch) == {"input_ids", "labels", *layout}
        assert all(batch[k].dtype == torch.long for k in batch)
        for ids, labels in examples_in(batch):
            text = dm.tokenizer.decode(ids.tolist())
            question = text.split("Question: ", 1)[1].split("<|end|>", 1)[0]
            fact = by_question.pop(question)
            assert decode_trained(dm.tokenizer, ids, labels) == f"Answer: {fact.answer}<|end|>\n"
            seen += 1
    assert seen == 18 and not by_question  # every sample exactly once per epoch


def test_validation_batches_carry_the_kind_of_each_item(fact_file, tokenizer_dir):
    dm = make_dm(fact_file, tokenizer_dir, n_unknown=3, n_val_known=4, batch_size=5)
    dm.setup("validate")
    kinds, answers = [], []
    for batch in dm.val_dataloader():
        assert batch["kind"].dtype == torch.long
        kinds += [VAL_KINDS[code] for code in batch["kind"].tolist()]
        answers += [decode_trained(dm.tokenizer, i, lab) for i, lab in examples_in(batch)]
    assert kinds == ["unknown"] * 3 + ["highly_known"] * 4
    expected = [f"Answer: {f.answer}<|end|>\n" for f in dm.train_unknown + dm.val_known]
    assert answers == expected


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_loss_on_all_trains_on_every_real_token(fact_file, tokenizer_dir, packing):
    dm = make_dm(
        fact_file, tokenizer_dir, n_unknown=4, loss_on="all", batch_size=4, packing=packing
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for ids, labels in examples_in(batch):
        # the first token is never a target (nothing before it in its example predicts it)
        assert torch.equal(labels[1:], ids[1:])
    if not packing:
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_two_datamodules_with_one_seed_build_the_same_mix(fact_file, tokenizer_dir):
    def build(seed: int) -> KnowledgeDataModule:
        dm = make_dm(
            fact_file,
            tokenizer_dir,
            n_unknown=5,
            extra_per_unknown=1,
            extra_kind="highly_known",
            selection="random",
            seed=seed,
        )
        dm.setup("fit")
        return dm

    a, b, c = build(42), build(42), build(1337)
    assert a.train_unknown == b.train_unknown and a.train_extra == b.train_extra
    assert a.val_known == b.val_known and a.mix.fingerprint() == b.mix.fingerprint()
    assert [x["input_ids"] for x in a._train.items] == [x["input_ids"] for x in b._train.items]
    assert a.mix.fingerprint() != c.mix.fingerprint()


def rank_batches(dm: KnowledgeDataModule, world_size: int, rank: int, epoch: int):
    dm.trainer = SimpleNamespace(world_size=world_size, global_rank=rank)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, DistributedSampler)
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (world_size, rank)
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    return list(loader.batch_sampler)


@pytest.mark.parametrize(("n_unknown", "k"), [(12, 1), (11, 0)])  # 24 and 11 samples an epoch
def test_two_ranks_see_the_global_batches_of_one_process(fact_file, tokenizer_dir, n_unknown, k):
    per_rank = 3
    dm = make_dm(
        fact_file,
        tokenizer_dir,
        n_unknown=n_unknown,
        extra_per_unknown=k,
        extra_kind="paraphrase" if k else "none",
        batch_size=per_rank,
        seed=random.randrange(10**6),
    )
    dm.setup("fit")
    size = len(dm._train)
    assert size == n_unknown * (1 + k)
    for epoch in (0, 1):
        ranks = [rank_batches(dm, 2, r, epoch) for r in (0, 1)]
        dm.hparams.batch_size = 2 * per_rank
        single = rank_batches(dm, 1, 0, epoch)
        dm.hparams.batch_size = per_rank
        assert len(ranks[0]) == len(ranks[1]) == len(single)
        for step, (b0, b1, one) in enumerate(zip(*ranks, single, strict=True)):
            merged = sorted(b0 + b1)
            if 2 * per_rank * (step + 1) <= size:  # every full global batch: identical
                assert merged == sorted(one)
            else:  # last one: the sampler pads an odd total with a repeat of an early sample
                assert set(one) <= set(merged) and len(merged) - len(one) == size % 2
        all_rank_samples = [i for r in ranks for b in r for i in b]
        assert set(all_rank_samples) == set(range(size))
    epochs = [rank_batches(dm, 1, 0, e) for e in (0, 1)]
    assert epochs[0] != epochs[1]  # set_epoch reshuffles
    assert rank_batches(dm, 1, 0, 1) == epochs[1]  # and an epoch replays exactly


def test_a_fresh_datamodule_replays_the_same_epoch_order(fact_file, tokenizer_dir):
    orders = []
    for _ in range(2):
        dm = make_dm(fact_file, tokenizer_dir, n_unknown=8, batch_size=2, seed=77)
        dm.setup("fit")
        orders.append(rank_batches(dm, 2, 1, epoch=3))
    assert orders[0] == orders[1]


def test_resuming_on_a_different_mix_is_refused(fact_file, tokenizer_dir):
    dm = make_dm(fact_file, tokenizer_dir, n_unknown=4)
    dm.setup("fit")
    state = dm.state_dict()
    same = make_dm(fact_file, tokenizer_dir, n_unknown=4)
    same.setup("fit")
    same.load_state_dict(state)
    other = make_dm(fact_file, tokenizer_dir, n_unknown=5)
    other.setup("fit")
    with pytest.raises(ValueError, match="different mix"):
        other.load_state_dict(state)


def test_too_long_fact_names_the_file_and_fact(tmp_path, facts, tokenizer_dir):
    long = Fact("long1", "Why " + "very " * 200 + "long?", ["x"], category="Unknown")
    path = save_facts([long, *facts], tmp_path / "long.jsonl")
    dm = make_dm(path, tokenizer_dir, n_unknown=1, max_length=64)
    with pytest.raises(ValueError, match=r"long\.jsonl: fact 'long1': .*exceeds max_length=64"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"extra_per_unknown": 2, "extra_kind": "none"}, "needs extra_kind"),
        ({"extra_kind": "known"}, "extra_kind must be one of"),
        ({"selection": "last"}, "selection must be one of"),
        ({"loss_on": "prompt"}, "loss_on must be one of"),
        ({"n_unknown": 0}, "n_unknown must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_settings_are_refused_at_construction(fact_file, tokenizer_dir, kwargs, message):
    args = {"facts": str(fact_file), "tokenizer": str(tokenizer_dir), **kwargs}
    with pytest.raises(ValueError, match=message):
        KnowledgeDataModule(**args)


class RecordingModel(L.LightningModule):
    """A stand-in model: enough parameters to step, and it records what it is fed."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(512, 4)
        self.seen: list[tuple[int, list[int]]] = []
        self.val_kinds: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["input_ids"].tolist()))
        return self.embed(batch["input_ids"]).mean()

    def validation_step(self, batch, batch_idx):
        self.val_kinds += [VAL_KINDS[code] for code in batch["kind"].tolist()]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_keeps_our_sampler_and_sets_its_epoch(fact_file, tokenizer_dir):
    dm = make_dm(fact_file, tokenizer_dir, n_unknown=6, n_val_known=3, batch_size=4, seed=5)
    model = RecordingModel()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    sampler = trainer.train_dataloader.sampler
    assert isinstance(sampler, DistributedSampler)
    assert (sampler.seed, sampler.epoch) == (5, 1)
    assert [epoch for epoch, _ in model.seen] == [0, 0, 1, 1]
    assert model.val_kinds == (["unknown"] * 6 + ["highly_known"] * 3) * 2


def test_test_batches_are_every_categorised_fact_outside_the_fewshot_pool(fact_file, tokenizer_dir):
    dm = make_dm(
        fact_file,
        tokenizer_dir,
        n_unknown=5,
        extra_per_unknown=2,
        extra_kind="highly_known",
        batch_size=8,
        test_batch_size=16,
    )
    dm.setup("test")
    batches = list(dm.test_dataloader())
    # test batches are sized for the probe's generation batches, not the training batch
    assert all(isinstance(b, list) and len(b) <= 16 for b in batches)
    assert len(batches[0]) == 16
    tested = [f for b in batches for f in b]
    pool_ids = {f.id for f in dm.fewshot_pool}
    assert len(pool_ids) == min(DEFAULT_POOL_SIZE, N_KNOWN - 5 - 10)
    assert {f.id for f in tested} == {f.id for f in dm.all_facts} - pool_ids
    assert len(tested) == N_UNKNOWN + N_MAYBE + N_KNOWN - len(pool_ids)
    assert all(f.category for f in tested)


def test_without_a_fact_file_the_synthetic_world_supplies_facts_pool_and_tokenizer(
    monkeypatch, tmp_path, facts, tokenizer_dir
):
    known = [f for f in facts if f.category == "HighlyKnown"]
    world = SimpleNamespace(
        model_dir=tokenizer_dir,
        facts_path=save_facts([f for f in facts if f not in known[:6]], tmp_path / "w.jsonl"),
        pool_path=save_facts(known[:6], tmp_path / "pool.jsonl"),
    )
    calls = []

    def ensure_world(progress: bool = True) -> SimpleNamespace:
        calls.append(1)
        return world

    # the package's name (the DataModule's) and the cache module's (the tokenizer's, through
    # `models.world_model_dir`)
    monkeypatch.setattr("lora_lightning.world.ensure_world", ensure_world)
    monkeypatch.setattr("lora_lightning.world.cache.ensure_world", ensure_world)
    dm = KnowledgeDataModule(n_unknown=4, n_val_known=3)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [1, 1, 1]  # prepare_data; setup's facts and pool; setup's tokenizer
    assert [f.id for f in dm.fewshot_pool] == [f.id for f in known[:6]]
    assert dm.tokenizer.chat_template and dm.mix_summary()["facts"] == str(world.facts_path)
    assert len(dm.train_unknown) == 4 and len(dm.val_known) == 3


def test_facts_without_categories_cannot_be_mixed(tmp_path, facts, tokenizer_dir):
    path = save_facts([*facts, Fact("raw1", "Never categorised?", ["x"])], tmp_path / "raw.jsonl")
    with pytest.raises(ValueError, match=r"1 of \d+ have no category \(ids raw1\).*categorize"):
        make_dm(path, tokenizer_dir).setup("fit")


@pytest.mark.parametrize("stop_after", [2, 4])  # 3 batches an epoch: mid-epoch 0 and 1
def test_resuming_mid_epoch_continues_with_exactly_the_remaining_batches(
    fact_file, tokenizer_dir, tmp_path, stop_after
):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(root: Path, max_steps: int = -1, ckpt_path: str | None = None) -> RecordingModel:
        model = RecordingModel()
        dm = make_dm(
            fact_file,
            tokenizer_dir,
            n_unknown=6,
            extra_per_unknown=1,
            extra_kind="highly_known",
            n_val_known=2,
            batch_size=4,
            seed=11,
        )
        checkpoint = ModelCheckpoint(
            dirpath=root, every_n_train_steps=1, save_last=True, save_top_k=0
        )
        trainer = L.Trainer(
            max_epochs=2,
            max_steps=max_steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            callbacks=[checkpoint],
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=root,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model

    straight = fit(tmp_path / "straight")
    assert len(straight.seen) == 6
    first = fit(tmp_path / "cut", max_steps=stop_after)
    assert first.seen == straight.seen[:stop_after]
    rest = fit(tmp_path / "cut", ckpt_path=str(tmp_path / "cut" / "last.ckpt"))
    assert first.seen + rest.seen == straight.seen


def test_a_tokenizer_without_chat_template_is_refused(fact_file, tmp_path):
    tokenizer = make_tokenizer(["Where?"])
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path / "plain")
    dm = make_dm(fact_file, tmp_path / "plain", n_unknown=2)
    with pytest.raises(ValueError, match=r"plain'? has no chat template"):
        dm.setup("fit")


def test_categorize_sidecar_pool_is_reused_and_the_default_pool_is_small(
    fact_file, tokenizer_dir, tmp_path
):
    facts = load_facts(fact_file)
    copy = save_facts(facts, tmp_path / "cat.jsonl")
    dm = make_dm(copy, tokenizer_dir)
    dm.setup("fit")
    assert 0 < len(dm.fewshot_pool) <= 32
    assert all(f.category == "HighlyKnown" for f in dm.fewshot_pool)
    pool_ids = {f.id for f in dm.fewshot_pool}
    assert pool_ids.isdisjoint(f.id for f in dm.test_facts)
    assert len(dm.test_facts) == len(facts) - len(pool_ids)

    # `categorize` carves its pool out of the file, so the sidecar's facts are not in it
    sidecar = [Fact(f"p{i}", f"Pool question {i}?", [f"a{i}"], category="HighlyKnown")
               for i in range(3)]
    save_facts(sidecar, tmp_path / "cat.pool.jsonl")
    dm = make_dm(copy, tokenizer_dir)
    dm.setup("fit")
    assert [f.id for f in dm.fewshot_pool] == [f.id for f in sidecar]


def test_an_unanswerable_known_fact_is_never_an_extra_or_a_shot():
    """The paper's known facts all have an answer: a HighlyKnown fact whose answer is a refusal
    ("I don't know.") would teach refusing. The held-out facts stay as they are."""
    def fact(i: int, category: str, answer: str) -> Fact:
        return Fact(id=f"f{i}", question=f"Where is place {i}?", answers=[answer],
                    category=category)

    unknown = [fact(i, "Unknown", f"town {i}") for i in range(4)]
    known = [fact(100 + i, "HighlyKnown", "I don't know." if i % 2 else f"city {i}")
             for i in range(12)]
    mix = build_mix([*unknown, *known], n_unknown=4, extra_per_unknown=1,
                    extra_kind="highly_known", n_val_known=2)
    assert len(mix.train_extra) == 4
    assert all(f.answer != "I don't know." for f in [*mix.train_extra, *mix.fewshot_pool])
    assert mix.val_known == known[-2:]
    with pytest.raises(ValueError, match="5 of them unanswerable"):
        build_mix([*unknown, *known[:10]], n_unknown=4, extra_per_unknown=2,
                  extra_kind="highly_known", n_val_known=0)


def test_stratified_selection_spans_every_relation_in_proportion():
    """A real fact file grouped by relation: 'first' trains one relation and holds out
    another; 'stratified' gives every role every relation, in proportion, seeded."""
    def fact(i: int, relation: str, category: str) -> Fact:
        return Fact(id=f"{relation}{i}", question=f"Q {relation} {i}?", answers=[f"a{i}"],
                    category=category, relation=relation)

    facts = [fact(i, r, c) for r, n in (("capital", 60), ("continent", 30), ("currency", 30))
             for c in ("Unknown", "HighlyKnown") for i in range(n)]
    first = build_mix(facts, n_unknown=20, extra_per_unknown=1, extra_kind="highly_known",
                      n_val_known=20, selection="first")
    assert {f.relation for f in first.train_unknown} == {"capital"}
    assert {f.relation for f in first.val_known} == {"currency"}
    mix = build_mix(facts, n_unknown=20, extra_per_unknown=1, extra_kind="highly_known",
                    n_val_known=20, selection="stratified", seed=3)
    for part in (mix.train_unknown, mix.train_extra, mix.val_known):
        counts = Counter(f.relation for f in part)
        assert set(counts) == {"capital", "continent", "currency"}
        assert abs(counts["capital"] - 10) <= 1 and abs(counts["continent"] - 5) <= 1, counts
    again = build_mix(facts, n_unknown=20, extra_per_unknown=1, extra_kind="highly_known",
                      n_val_known=20, selection="stratified", seed=3)
    assert [f.id for f in again.train_unknown] == [f.id for f in mix.train_unknown]
    smaller = build_mix(facts, n_unknown=10, selection="stratified", seed=3)
    assert [f.id for f in smaller.train_unknown] == [f.id for f in mix.train_unknown[:10]]
