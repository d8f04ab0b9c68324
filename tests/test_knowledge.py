"""SliCK categorisation: the categories follow from what a real (tiny, trained) model answers."""

from __future__ import annotations

import copy
import dataclasses
import json
import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lora_lightning import knowledge
from lora_lightning.facts import Fact, is_correct, load_facts
from lora_lightning.knowledge import (
    ProbeConfig,
    categorize,
    category_of,
    default_pool,
    generate_answers,
)
from lora_lightning.prompts import build_fewshot_sets, extract_answer, fewshot_messages, render

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lm(small_world):
    tokenizer = AutoTokenizer.from_pretrained(small_world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(small_world.model_dir).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def facts_and_pool(small_world):
    """A few known and a few never-seen facts of the world, and the world's few-shot pool."""
    facts = load_facts(small_world.world_facts_path)
    pool = load_facts(small_world.pool_path)
    known = small_world.known_ids() - small_world.rare_ids()
    pool_ids = {f.id for f in pool}
    rng = random.Random(2026)  # fixed: a flaky sample made the count assertions below flaky
    seen = rng.sample([f for f in facts if f.id in known and f.id not in pool_ids], 5)
    unseen = rng.sample([f for f in facts if f.id not in known], 5)
    return seen + unseen, pool


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("p_greedy", "p_sampled", "expected"),
    [
        (1.0, None, "HighlyKnown"),
        (1.0, 0.0, "HighlyKnown"),
        (0.9, None, "MaybeKnown"),
        (0.1, 0.0, "MaybeKnown"),
        (0.0, 0.0625, "WeaklyKnown"),
        (0.0, 0.0, "Unknown"),
        (0.0, None, "Unknown"),  # without sampling WeaklyKnown cannot occur
    ],
)
def test_category_rules(p_greedy, p_sampled, expected):
    assert category_of(p_greedy, p_sampled) == expected


@pytest.mark.parametrize(("p_greedy", "p_sampled"), [(1.5, None), (-0.1, None), (0.0, 2.0)])
def test_category_rejects_impossible_rates(p_greedy, p_sampled):
    with pytest.raises(ValueError, match="p_"):
        category_of(p_greedy, p_sampled)


# --------------------------------------------------------------------------- generation


def test_left_padded_batches_answer_like_one_by_one(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    shots = build_fewshot_sets(pool, n_exp=3, n_shot=4, seed=random.randrange(1000))
    # prompts of very different lengths, so the batch really is padded
    prompts = [
        render(tokenizer, fewshot_messages(f.question, s[: 1 + i % 4]), add_generation_prompt=True)
        for i, (f, s) in enumerate((f, s) for f in facts for s in shots)
    ]
    tokenizer.padding_side = "right"
    batched = generate_answers(model, tokenizer, prompts, batch_size=16)
    assert tokenizer.padding_side == "right"  # restored
    single = generate_answers(model, tokenizer, prompts, batch_size=1)
    assert [g.text for g in batched] == [g.text for g in single]
    for b, s in zip(batched, single, strict=True):
        assert b.mean_token_prob == pytest.approx(s.mean_token_prob, abs=1e-4)
        assert 0.0 < b.mean_token_prob <= 1.0

    # and both agree with a plain, unbatched model.generate
    enc = tokenizer(prompts[0], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=32, do_sample=False)
    plain = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert single[0].text == extract_answer(plain)


def test_generation_without_a_pad_token_pads_with_eos(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    prompts = [render(tokenizer, fewshot_messages(f.question, pool[:k]), True)
               for k, f in enumerate(facts[:4])]
    expected = generate_answers(model, tokenizer, prompts, batch_size=4)
    no_pad = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    no_pad.pad_token = None
    got = generate_answers(model, no_pad, prompts, batch_size=4)
    assert [g.text for g in got] == [g.text for g in expected]
    assert no_pad.pad_token is None


def test_sampling_is_seeded_and_returns_every_sequence(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    prompts = [render(tokenizer, fewshot_messages(f.question, pool[:4]), True) for f in facts[:3]]
    kwargs = dict(do_sample=True, temperature=1.5, top_k=40, num_return_sequences=6)
    first = generate_answers(model, tokenizer, prompts, seed=3, **kwargs)
    again = generate_answers(model, tokenizer, prompts, seed=3, **kwargs)
    assert len(first) == 18
    assert first == again


# --------------------------------------------------------------------------- categorize


def _expected_categories(model, tokenizer, facts, pool, n_exp, seed):
    """An independent computation: one plain `generate` call per (fact, prompt), no batching."""
    out = {}
    for fact in facts:
        hits = 0
        for shots in build_fewshot_sets(pool, n_exp=n_exp, n_shot=4, seed=seed):
            text = render(tokenizer, fewshot_messages(fact.question, shots), True)
            enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=32, do_sample=False)
            answer = tokenizer.decode(gen[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            hits += is_correct(extract_answer(answer), fact)
        out[fact.id] = "HighlyKnown" if hits == n_exp else "MaybeKnown" if hits else "Unknown"
    return out


def test_categories_follow_the_models_answers(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    # Controls: a known fact relabelled with an answer nobody taught the model must be Unknown,
    # and a never-seen fact relabelled with the model's own answer must be known.
    wrong = dataclasses.replace(facts[0], id="wrong", answers=["Qwxzzy"], normalized_answers=[])
    probe = categorize(model, tokenizer, [facts[5]], pool, n_exp=3, seed=1, progress=False)[0]
    own = dataclasses.replace(facts[5], id="own", answers=[probe.predictions[0]],
                              normalized_answers=[])
    tested = [*facts, wrong, own]

    result = categorize(model, tokenizer, tested, pool, n_exp=3, seed=1, progress=False)
    assert [f.id for f in result] == [f.id for f in tested]
    expected = _expected_categories(model, tokenizer, tested, pool, n_exp=3, seed=1)
    assert {f.id: f.category for f in result} == expected
    for fact in result:
        assert len(fact.predictions) == 3
        assert fact.p_greedy == sum(is_correct(p, fact) for p in fact.predictions) / 3
        assert fact.p_sampled is None
    by_id = {f.id: f for f in result}
    assert by_id["wrong"].category == "Unknown"
    assert by_id["own"].category in ("HighlyKnown", "MaybeKnown")
    # the base knows what it was pre-trained on and not what it never saw
    assert sum(f.category == "HighlyKnown" for f in result[:5]) >= 3
    assert sum(f.category == "Unknown" for f in result[5:10]) >= 3
    assert facts[0].category is None  # inputs are not mutated
    # batching is an implementation detail: tiny batches give the same result
    # (padding changes the float sums behind `confidence` in the last bits only)
    small = categorize(model, tokenizer, tested, pool, n_exp=3, seed=1, batch_size=2,
                       progress=False)
    for a, b in zip(small, result, strict=True):
        assert 0.0 < b.confidence <= 1.0
        assert a.confidence == pytest.approx(b.confidence, abs=1e-4)
        assert replace(a, confidence=None) == replace(b, confidence=None)


def test_sampling_adds_weakly_known_and_is_deterministic(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    kwargs = dict(n_exp=2, sample=True, n_samples=4, temperature=2.0, seed=5, progress=False)
    first = categorize(model, tokenizer, facts[4:8], pool, **kwargs)
    again = categorize(model, tokenizer, facts[4:8], pool, **kwargs)
    assert first == again
    for fact in first:
        assert fact.p_sampled is not None and 0.0 <= fact.p_sampled <= 1.0
        assert fact.category == category_of(fact.p_greedy, fact.p_sampled)


@pytest.fixture(scope="module")
def bf16_lm(lm):
    """The world's base in bfloat16 (as a bf16 run loads it), and the same bf16-rounded
    weights held in float32."""
    model, tokenizer = lm
    half = copy.deepcopy(model).to(torch.bfloat16)
    return half, copy.deepcopy(half).float(), tokenizer


def test_a_bfloat16_model_is_probed_in_float32_on_its_own_weights(bf16_lm, facts_and_pool):
    """bfloat16 arithmetic made a probe's answers depend on the thread count and on which
    prompts shared a batch, so a category could move without training. By default the probe
    computes in float32 on the weights as loaded: the answers and confidences of the bf16
    model are, to the bit, those of its bf16-rounded weights held in float32. "model" keeps
    the old arithmetic, and either way the model is left in bfloat16."""
    half, rounded, tokenizer = bf16_lm
    facts, pool = facts_and_pool
    kwargs = dict(n_exp=2, seed=3, progress=False)
    assert ProbeConfig().compute_dtype == "float32"
    probed = categorize(half, tokenizer, facts, pool, **kwargs)
    assert probed == categorize(rounded, tokenizer, facts, pool, **kwargs)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    own = categorize(half, tokenizer, facts, pool, compute_dtype="model", **kwargs)
    assert [f.confidence for f in own] != [f.confidence for f in probed]
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_an_unknown_compute_dtype_is_refused_naming_the_setting(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    with pytest.raises(ValueError, match=r"probe\.compute_dtype.*'bf16'.*float32, model"):
        ProbeConfig(compute_dtype="bf16")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="compute_dtype"):
        categorize(model, tokenizer, facts, pool, compute_dtype="half", progress=False)


def test_a_checkpoint_is_not_resumed_in_other_arithmetic(bf16_lm, facts_and_pool, tmp_path):
    half, _, tokenizer = bf16_lm
    facts, pool = facts_and_pool
    checkpoint = tmp_path / "run.partial"
    categorize(half, tokenizer, facts[:2], pool, n_exp=2, progress=False, checkpoint=checkpoint)
    with pytest.raises(ValueError, match="run.partial.*compute_dtype"):
        categorize(half, tokenizer, facts, pool, n_exp=2, progress=False, checkpoint=checkpoint,
                   compute_dtype="model")


def test_pool_overlapping_the_facts_is_refused(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    with pytest.raises(ValueError, match="pool"):
        categorize(model, tokenizer, [facts[0], pool[0]], pool, n_exp=2, progress=False)


def test_resume_skips_finished_facts(lm, facts_and_pool, tmp_path, monkeypatch):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    checkpoint = tmp_path / "run.partial"
    full = categorize(model, tokenizer, facts, pool, n_exp=2, seed=2, progress=False)

    # an interrupted run: two finished facts on disk (one marked so we can tell it was reused),
    # then a line torn in the middle of writing
    marked = dataclasses.replace(full[1], predictions=["from the checkpoint", "x"])
    with open(checkpoint, "w") as f:
        f.write(json.dumps(dataclasses.asdict(full[0])) + "\n")
        f.write(json.dumps(dataclasses.asdict(marked)) + "\n")
        f.write('{"id": "torn", "quest')

    asked = []
    real = knowledge.generate_answers

    def spy(model_, tokenizer_, prompts, **kwargs):
        asked.extend(prompts)
        return real(model_, tokenizer_, prompts, **kwargs)

    monkeypatch.setattr(knowledge, "generate_answers", spy)
    resumed = categorize(model, tokenizer, facts, pool, n_exp=2, seed=2, progress=False,
                         checkpoint=checkpoint)
    assert len(asked) == 2 * (len(facts) - 2)
    assert not any(facts[0].question in p.rsplit("<|user|>", 1)[1] for p in asked)
    assert resumed[1].predictions == ["from the checkpoint", "x"]
    # same answers and categories; `confidence` only up to float rounding (batches differ)
    def exact(f):
        return dataclasses.replace(f, confidence=None)

    assert exact(resumed[0]) == exact(full[0])
    assert [exact(f) for f in resumed[2:]] == [exact(f) for f in full[2:]]
    assert [f.confidence for f in resumed[2:]] == pytest.approx([f.confidence for f in full[2:]])
    # everything finished is now in the checkpoint, so a third run generates nothing
    asked.clear()
    categorize(model, tokenizer, facts, pool, n_exp=2, seed=2, progress=False,
               checkpoint=checkpoint)
    assert asked == []
    # resuming with other settings would mix two measurements: refused, naming the file
    with pytest.raises(ValueError, match="run.partial.*n_exp"):
        categorize(model, tokenizer, facts, pool, n_exp=3, seed=2, progress=False,
                   checkpoint=checkpoint)


def test_default_pool_is_seeded_and_disjoint():
    facts = [Fact(id=f"f{i}", question=f"Question {i}?", answers=[str(i)]) for i in range(50)]
    pool, rest = default_pool(facts, pool_size=8, seed=4)
    assert len(pool) == 8 and len(rest) == 42
    assert {f.id for f in pool}.isdisjoint(f.id for f in rest)
    assert default_pool(facts, 8, 4) == (pool, rest)
    assert default_pool(facts, 8, 5)[0] != pool
    with pytest.raises(ValueError, match="pool"):
        default_pool(facts[:5], pool_size=8, seed=0)


def test_generation_does_not_track_gradients(lm, facts_and_pool):
    model, tokenizer = lm
    facts, pool = facts_and_pool
    model.train()
    generate_answers(model, tokenizer, [render(tokenizer, fewshot_messages(facts[0].question,
                                                                           pool[:4]), True)])
    assert model.training  # the caller's mode is restored
    model.eval()
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()


def test_generation_leaves_the_callers_random_state_alone(lm, facts_and_pool):
    model, tokenizer = lm
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_answers(model, tokenizer, ["Question: anything?"], max_new_tokens=2)
    assert torch.equal(torch.rand(3), expected)


def test_sharing_the_few_shot_prefix_gives_the_answers_of_plain_left_padding(lm, facts_and_pool):
    """Prompts of one few-shot set are batched together and their shots encoded once; the
    answers and their probabilities are those of the plain left-padded batches."""
    model, tokenizer = lm
    facts, pool = facts_and_pool
    shot_sets = build_fewshot_sets(pool, n_exp=3, n_shot=4, seed=7)
    prompts = [render(tokenizer, fewshot_messages(f.question, s), True)
               for f in facts for s in shot_sets]
    shared = generate_answers(model, tokenizer, prompts, batch_size=16, share_prefix=24)
    plain = generate_answers(model, tokenizer, prompts, batch_size=16, share_prefix=0)
    assert [g.text for g in shared] == [g.text for g in plain]
    for a, b in zip(shared, plain, strict=True):
        assert a.mean_token_prob == pytest.approx(b.mean_token_prob, abs=1e-4)


@pytest.mark.parametrize("max_new_tokens", [3, 32])
def test_greedy_answers_and_probabilities_are_those_of_generate(lm, facts_and_pool,
                                                                max_new_tokens):
    """The greedy loop drops rows that have ended from the batch; every answer and its mean
    token probability is still what `model.generate` gives the prompt alone, whether the row
    stopped at its end token or at `max_new_tokens` (3 cuts answers short)."""
    model, tokenizer = lm
    facts, pool = facts_and_pool
    shot_sets = build_fewshot_sets(pool, n_exp=2, n_shot=4, seed=11)
    prompts = [render(tokenizer, fewshot_messages(f.question, s), True)
               for f in facts for s in shot_sets]
    ours = generate_answers(model, tokenizer, prompts, batch_size=8,
                            max_new_tokens=max_new_tokens)
    eos = tokenizer.eos_token_id
    lengths = []
    for prompt, answer in zip(prompts, ours, strict=True):
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_scores=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
        n = new.index(eos) + 1 if eos in new else len(new)
        lengths.append(n)
        logp = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        assert answer.text == extract_answer(tokenizer.decode(new[:n], skip_special_tokens=True))
        assert answer.mean_token_prob == pytest.approx(logp[0, :n].exp().mean().item(), abs=1e-4)
    assert len(set(lengths)) > 1 or max_new_tokens in lengths  # rows ended at different steps


# ------------------------------------------------- how a categorised file was measured


def test_a_categorised_file_records_its_dtype_and_test_warns_of_another_in_one_line(
    tiny_model_dir, tiny_fact_files, tmp_path, caplog, one_thread
):
    """Categories computed in float32 and re-measured in bfloat16 after training differ by the
    dtype alone, and the shift tables would count that as training's doing: `categorize`
    records its dtype, matching rule and probe settings beside its output (the JSONL itself is
    unchanged), and `test` says in one line what differs and what to do."""
    from types import SimpleNamespace

    from lora_lightning.categorize import (
        categorization_record,
        categorize_file,
        comparability_problem,
        record_sidecar,
    )
    from lora_lightning.knowledge import ProbeConfig
    from lora_lightning.knowledge_report import KnowledgeReport

    out = tmp_path / "categorized.jsonl"
    categorize_file(model=str(tiny_model_dir), facts=str(tiny_fact_files["facts"]),
                    pool=str(tiny_fact_files["pool"]), output=str(out), n_exp=2, n_shot=2,
                    max_new_tokens=4, device="cpu", dtype="float32", progress=False)
    assert record_sidecar(out) == tmp_path / "categorized.jsonl.meta.json"
    record = categorization_record(out)
    assert record is not None
    assert (record["dtype"], record["device"], record["match"]) == ("float32", "cpu", "substring")
    assert record["compute_dtype"] == "float32"
    assert record["probe"] == {"n_exp": 2, "n_shot": 2, "max_new_tokens": 4, "seed": 0,
                               "sample": False}
    assert len(load_facts(out)) == 50  # every reader still reads the facts as before

    probe = ProbeConfig(n_exp=2, n_shot=2, max_new_tokens=4)
    assert comparability_problem(out, record, "torch.float32", probe) is None
    assert comparability_problem(out, None, "torch.bfloat16", probe) is None  # an older file
    problem = comparability_problem(out, record, "torch.bfloat16", probe)
    assert problem is not None and "\n" not in problem
    assert "dtype float32 vs bfloat16" in problem and "--dtype bfloat16" in problem
    assert "--model.dtype float32" in problem and str(out) in problem
    other = comparability_problem(out, record, "torch.float32", ProbeConfig(n_exp=3, n_shot=2,
                                                                           max_new_tokens=4))
    assert other is not None and "n_exp 2 vs 3" in other

    trainer = SimpleNamespace(is_global_zero=True,
                              datamodule=SimpleNamespace(mix_summary=lambda: {"facts": str(out)}))
    for dtype, warned in ((torch.float32, False), (torch.bfloat16, True)):
        caplog.clear()
        module = SimpleNamespace(model=torch.nn.Linear(2, 2).to(dtype), probe_config=probe)
        KnowledgeReport(world_dir=None).on_test_start(trainer, module)
        lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert lines == ([problem] if warned else [])


def test_categories_computed_in_another_arithmetic_are_said_in_one_line(tmp_path):
    """Weights held in bfloat16 and probed in float32 (the default) are not comparable with
    categories computed in bfloat16: a file categorised before the probe's arithmetic was a
    setting (its record names only the weights' dtype) was computed in that dtype."""
    from lora_lightning.categorize import comparability_problem

    out = tmp_path / "categorized.jsonl"
    now = {"dtype": "bfloat16", "compute_dtype": "float32"}
    assert comparability_problem(out, now, "torch.bfloat16", ProbeConfig()) is None
    old = {"dtype": "bfloat16"}
    problem = comparability_problem(out, old, "torch.bfloat16", ProbeConfig())
    assert problem is not None and "\n" not in problem and str(out) in problem
    assert "computed in bfloat16 vs float32" in problem
    assert "--model.probe.compute_dtype model" in problem
    assert comparability_problem(out, old, "torch.bfloat16", ProbeConfig(compute_dtype="model")
                                 ) is None
    # float32 weights compute in float32 under either setting
    assert comparability_problem(out, {"dtype": "float32"}, "torch.float32", ProbeConfig()) is None
    assert knowledge.effective_compute_dtype("model", torch.float16) == "float16"
    assert knowledge.effective_compute_dtype("float32", "torch.float64") == "float64"
