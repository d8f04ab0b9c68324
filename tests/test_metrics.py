"""Knowledge metrics: hand-computed values on crafted answers, and the same numbers from a
2-process DDP run (gloo) as from one process."""

from __future__ import annotations

import math
import random
import string

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_lightning.facts import CATEGORIES, Fact
from lora_lightning.metrics import (
    DEFAULT_REFUSAL_PATTERNS,
    AliasAccuracy,
    AnswerConcentration,
    Confidence,
    ExactMatch,
    KnowledgeShift,
    RefusalRate,
    Reliability,
    decode_answers,
    encode_answers,
)


def fact(*answers: str) -> Fact:
    return Fact(id=answers[0], question=f"Q about {answers[0]}?", answers=list(answers))


# --------------------------------------------------------------------------- accuracy


def test_exact_match_and_alias_accuracy_differ_as_the_paper_criterion_says():
    facts = [
        fact("Paris", "City of Light"),
        fact("Barack Obama"),
        fact("Barack Obama"),
        fact("1984"),
        fact("Paris", "City of Light"),
    ]
    answers = ["The Paris.", "Obama", "It was Barack Obama!", "1985", "city of light"]
    em, alias = ExactMatch(), AliasAccuracy()
    em.update(answers, facts)
    alias.update(answers, facts)
    # exact: "paris" == "paris", "city of light" == alias; substring: also "...barack obama!"
    assert em.compute().item() == pytest.approx(2 / 5)
    assert alias.compute().item() == pytest.approx(3 / 5)
    plain = AliasAccuracy()
    plain.update(["born in Rome"], [["Rome", "Roma"]])  # a list of aliases works as a target
    assert plain.compute().item() == 1.0
    with pytest.raises(ValueError, match="answers has 1 items but targets has 2"):
        em.update(["x"], facts[:2])


# --------------------------------------------------------------------------- reliability


def test_reliability_is_three_figures_any_majority_and_mean_summed_across_ranks():
    """'Any of k prompts' alone read 0.92 on a run whose facts were right in a majority of their
    prompts for 0.28: the three figures come together, with k, from sum-reduced states (two
    ranks' partial counts merge into the one-process answer)."""
    facts = [fact("Paris"), fact("Rome"), fact("Oslo")]
    answers = [
        ["Paris", "Lyon", "Nice", "Lille"],  # 1 of 4: any, not a majority
        ["Rome", "Rome", "Milan", "Rome"],  # 3 of 4: any and a majority
        ["Bergen", "Bergen", "Oslo", "Oslo"],  # 2 of 4: half is not a majority
    ]
    ranks = [Reliability(), Reliability()]
    ranks[0].update(answers[:1], facts[:1])
    ranks[1].update(answers[1:], facts[1:])
    ranks[0].merge_state(ranks[1])  # what the sum reduction does across ranks
    out = ranks[0].compute()
    assert out["reliability"].item() == 1.0
    assert out["majority"].item() == pytest.approx(1 / 3)
    assert out["mean_prompt_accuracy"].item() == pytest.approx((0.25 + 0.75 + 0.5) / 3)
    assert out["all_prompts"].item() == 0.0
    assert (out["n_facts"].item(), out["prompts"].item()) == (3, 4.0)
    one = Reliability()  # one prompt per fact (the zero-shot probe): the three coincide
    one.update([["Paris"], ["Milan"], ["Oslo"]], facts)
    single = one.compute()
    assert single["reliability"] == single["majority"] == single["mean_prompt_accuracy"]
    assert single["prompts"].item() == 1.0


def test_reliability_counts_facts_learned_by_any_prompt_and_reports_the_other_views():
    facts = [fact("Paris"), fact("Rome"), fact("Oslo"), fact("Lima")]
    answers = [
        ["Paris", "paris", "Paris, France", "PARIS"],  # 4/4
        ["Rome", "Milan", "Turin", "Naples"],  # 1/4
        ["Bergen", "Bergen", "I don't know", ""],  # 0/4
        ["Lima", "Lima", "Cusco", "Lima, Peru"],  # 3/4
    ]
    metric = Reliability()
    metric.update(answers[:2], facts[:2])
    metric.update(answers[2:], facts[2:])
    out = metric.compute()
    assert out["reliability"].item() == pytest.approx(3 / 4)
    assert out["mean_prompt_accuracy"].item() == pytest.approx((1 + 0.25 + 0 + 0.75) / 4)
    assert out["majority"].item() == pytest.approx(2 / 4)
    assert out["all_prompts"].item() == pytest.approx(1 / 4)
    assert out["n_facts"].item() == 4
    with pytest.raises(ValueError, match=r"answers\[0\] must be a non-empty list"):
        metric.update(["Paris"], facts[:1])


# --------------------------------------------------------------------------- shift


def test_knowledge_shift_counts_transitions_and_rates_over_source_category():
    HK, MK, WK, UK = CATEGORIES
    before = [UK, UK, UK, UK, MK, MK, HK, HK, HK, WK]
    after = [MK, HK, UK, UK, HK, UK, HK, MK, UK, HK]
    metric = KnowledgeShift()
    metric.update(before, after)
    out = metric.compute()
    expected = torch.zeros(4, 4, dtype=torch.long)
    for b, a in zip(before, after, strict=True):
        expected[CATEGORIES.index(b), CATEGORIES.index(a)] += 1
    assert torch.equal(out["counts"], expected)
    assert out["before"].tolist() == [3, 2, 1, 4] and out["total"].item() == 10
    assert out["UK->MK"]["count"].item() == 1 and out["UK->MK"]["denominator"].item() == 4
    assert out["UK->HK"]["rate"].item() == pytest.approx(1 / 4)
    assert out["MK->HK"]["rate"].item() == pytest.approx(1 / 2)
    assert out["HK->MK"]["rate"].item() == pytest.approx(1 / 3)
    assert out["HK->UK"]["rate"].item() == pytest.approx(1 / 3)
    assert out["MK->UK"]["denominator"].item() == 2
    assert out["positive"].item() == 3 and out["negative"].item() == 3  # WK->HK is in neither
    assert out["positive_rate"].item() == pytest.approx(3 / 10)
    assert out["negative_rate"].item() == pytest.approx(3 / 10)
    assert out["positive_rate_of_eligible"].item() == pytest.approx(3 / 6)
    assert out["negative_rate_of_eligible"].item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match=r"after\[1\]: unknown category 'Known'"):
        metric.update([UK, UK], [MK, "Known"])


def test_knowledge_shift_of_an_empty_category_is_zero_not_nan():
    metric = KnowledgeShift()
    metric.update([3, 3], [0, 3])  # indices work too: Unknown -> HighlyKnown, Unknown
    out = metric.compute()
    assert out["UK->HK"]["rate"].item() == pytest.approx(0.5)
    assert out["MK->HK"]["rate"].item() == 0.0 and out["MK->HK"]["denominator"].item() == 0


# --------------------------------------------------------------------------- concentration


def test_answer_concentration_statistics_top_answers_and_explosions():
    answers = ["Paris", "paris", "The Paris.", "PARIS!", "paris", "Rome", "rome", "Alençon", ""]
    metric = AnswerConcentration(top_k=2, reference_max=2, explosion_factor=2.0)
    metric.update(answers[:4])
    metric.update(answers[4:])
    out = metric.compute()
    # counts: paris 5, rome 2, alençon 1 (the empty answer is skipped)
    assert out["n_answers"] == 8 and out["unique"] == 3
    assert out["mean_repeats"] == pytest.approx(8 / 3)
    assert out["var_repeats"] == pytest.approx((25 + 4 + 1) / 3 - (8 / 3) ** 2)
    assert out["top"] == [("paris", 5), ("rome", 2)]
    assert out["max_count"] == 5
    assert out["threshold"] == 4.0 and out["exploded"] == [("paris", 5)]

    explicit = AnswerConcentration(explosion_threshold=1)
    explicit.update(answers)
    assert explicit.compute()["exploded"] == [("paris", 5), ("rome", 2)]
    unset = AnswerConcentration()
    unset.update(answers)
    assert unset.compute()["exploded"] == [] and unset.compute()["threshold"] is None


def test_answers_round_trip_through_fixed_length_bytes_and_truncate_cleanly():
    word = "".join(random.choices(string.ascii_lowercase, k=10))
    rows = encode_answers([word, "ø" * 40, "x" * 100], max_bytes=64)
    assert rows.dtype == torch.uint8 and rows.shape == (3, 64)
    assert decode_answers(rows) == [word, "ø" * 32, "x" * 64]
    metric = AnswerConcentration(max_bytes=8)
    metric.update(["abcdefgh-one", "abcdefgh-two"])  # equal in their first 8 bytes
    assert metric.compute()["top"] == [("abcdefgh", 2)]


# --------------------------------------------------------------------------- refusals


def test_refusal_rate_detects_the_papers_refusals_and_accepts_custom_patterns():
    refusals = [
        "I couldn't find any information about this person.",
        "I cannot verify the birthplace of X.",
        "I don't know.",
        "i'm not sure, sorry",
        "There is no information on that.",
    ]
    answers = ["Paris", "Knowledge of Rome", "Notre-Dame", *refusals, "Lima, Peru"]
    random.shuffle(answers)
    metric = RefusalRate()
    metric.update(answers)
    out = metric.compute()
    assert out["refusals"].item() == 5 and out["total"].item() == 9
    assert out["rate"].item() == pytest.approx(5 / 9)
    assert len(DEFAULT_REFUSAL_PATTERNS) >= 5

    custom = RefusalRate(patterns=[r"^n/?a$"])
    custom.update(["N/A", "na", "I don't know", "Nabeul"])
    assert custom.compute()["refusals"].item() == 2
    extra = RefusalRate(extra_patterns=[r"no idea"])
    extra.update(["No idea!", "I don't know"])
    assert extra.compute()["refusals"].item() == 2
    with pytest.raises(ValueError, match="refusal pattern 0"):
        RefusalRate(patterns=["(unclosed"])


# --------------------------------------------------------------------------- confidence


def test_confidence_is_the_mean_answer_probability():
    metric = Confidence()
    metric.update(torch.tensor([0.5, 0.25]))
    metric.update([1.0])
    assert metric.compute().item() == pytest.approx((0.5 + 0.25 + 1.0) / 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metric.update([1.5])
    logprobs = torch.tensor([[0.5, 0.25, 0.9], [0.8, 0.1, 0.1]]).log()
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert Confidence.answer_token_probs(logprobs, mask).tolist() == pytest.approx([0.375, 0.8])


# --------------------------------------------------------------------------- DDP


def _random_data(seed: int, n: int) -> list[dict]:
    """Per-fact records with fresh random answers, categories and probabilities."""
    rng = random.Random(seed)
    pool = ["Paris", "Rome", "Alençon", "Animalia", "I don't know", "Lima", "Oslo", ""]
    records = []
    for i in range(n):
        answers = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
        records.append(
            {
                "fact": Fact(id=str(i), question="?", answers=[rng.choice(pool[:-1])]),
                "answers": answers,
                "before": rng.choice(CATEGORIES),
                "after": rng.choice(CATEGORIES),
                "prob": rng.random(),
            }
        )
    return records


def _metrics() -> dict:
    return {
        "exact": ExactMatch(),
        "alias": AliasAccuracy(),
        "reliability": Reliability(),
        "shift": KnowledgeShift(),
        "concentration": AnswerConcentration(top_k=5, reference_max=1),
        "refusal": RefusalRate(),
        "confidence": Confidence(),
    }


def _run(records: list[dict]) -> dict:
    metrics = _metrics()
    for start in range(0, len(records), 3):  # several updates per rank
        chunk = records[start : start + 3]
        facts = [r["fact"] for r in chunk]
        first = [r["answers"][0] for r in chunk]
        metrics["exact"].update(first, facts)
        metrics["alias"].update(first, facts)
        metrics["reliability"].update([r["answers"] for r in chunk], facts)
        metrics["shift"].update([r["before"] for r in chunk], [r["after"] for r in chunk])
        metrics["concentration"].update([a for r in chunk for a in r["answers"]])
        metrics["refusal"].update(first)
        metrics["confidence"].update([r["prob"] for r in chunk])
    return {name: _plain(m.compute()) for name, m in metrics.items()}


def _plain(value):
    """Tensors to Python numbers/lists so results compare with `==` / approx."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, shards: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = _run(shards[rank])
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def _assert_close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12), path
    else:
        assert a == b, path


def test_every_metric_under_two_process_ddp_equals_one_process(tmp_path):
    records = _random_data(random.randrange(2**31), n=23)
    split = random.randint(5, 15)  # uneven shards exercise the padded "cat" gather
    shards = [records[:split], records[split:]]
    single = _run(records)
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out_file), shards), nprocs=2)
    distributed = torch.load(out_file, weights_only=False)
    _assert_close(distributed, single)
    # the comparison is not vacuous: the data gives non-trivial values
    assert single["concentration"]["unique"] > 1 and single["shift"]["total"] == 23


@pytest.mark.parametrize("module", ["functional", "modular"])
def test_every_docstring_example_of_the_metrics_holds(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"lora_lightning.metrics.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 6 and result.failed == 0


def test_categorize_and_reliability_count_a_prompt_the_same_way():
    """P_greedy (what `categorize` stores) is Reliability's per-fact share, from one rule."""
    from lora_lightning.metrics.functional import prompt_accuracy

    fact = Fact("f", "Where?", ["Paris", "the city of Paris"])
    answers = ["Paris", "in the city of paris", "Lyon", "I don't know"]
    metric = Reliability()
    metric.update([answers], [fact])
    assert prompt_accuracy(answers, fact) == 0.5
    assert float(metric.compute()["mean_prompt_accuracy"]) == 0.5
