"""The synthetic world: a seeded generator, a byte-level tokenizer with a chat template, and a
tiny pre-trained Llama that loads like any Hugging Face checkpoint and knows its known facts."""

from __future__ import annotations

import csv
import dataclasses
import errno
import json
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

from lora_lightning import world
from lora_lightning.facts import Fact, load_facts
from lora_lightning.prompts import encode_example, fewshot_messages, qa_messages, render
from lora_lightning.world import (
    REFUSAL,
    RELATIONS,
    WorldConfig,
    ensure_world,
    generate_world,
    split_world,
    train_tokenizer,
    world_texts,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _tiny_config(seed: int = 0) -> WorldConfig:
    """The small world with barely any training: enough to test plumbing, not knowledge."""
    return dataclasses.replace(
        WorldConfig.tiny(seed), n_subjects=10, train_steps=8, n_exp=2, pool_size=4
    )


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- generator


def test_generator_is_a_function_of_its_seed():
    config = WorldConfig(seed=7)
    assert generate_world(config) == generate_world(WorldConfig(seed=7))
    other = generate_world(WorldConfig(seed=8))
    assert [f.question for f in other] != [f.question for f in generate_world(config)]


def test_facts_have_paraphrases_unique_ids_and_relation_templates():
    facts = generate_world(WorldConfig(seed=3))
    assert len({f.id for f in facts}) == len(facts)
    assert len({f.question for f in facts}) == len(facts)
    templates = {r.name: r.templates for r in RELATIONS}
    for fact in facts:
        expected = [t.format(s=fact.subject) for t in templates[fact.relation][:5]]
        assert [fact.question, *fact.paraphrases] == expected
        assert len(set(expected)) == len(expected) >= 3
        assert fact.subject in fact.question
        assert fact.answers and all(a.strip() for a in fact.answers)


def test_answers_are_skewed_towards_a_few_frequent_ones():
    facts = generate_world(WorldConfig(seed=11))
    by_relation: dict[str, Counter] = {}
    for fact in facts:
        by_relation.setdefault(fact.relation, Counter())[fact.answer] += 1
    for relation, counts in by_relation.items():
        if relation == "thought":
            continue
        top = counts.most_common(1)[0][1]
        mean = sum(counts.values()) / len(counts)
        assert top >= 2.5 * mean, (relation, counts.most_common(3))


def test_some_questions_are_unanswerable_and_trained_as_refusals():
    config = WorldConfig(seed=5)
    facts = generate_world(config)
    refusals = [f for f in facts if f.answer == REFUSAL]
    assert 0 < len(refusals) < 0.1 * len(facts)
    assert {f.relation for f in refusals} == {"thought"}
    known, unseen = split_world(facts, config)
    assert any(f.answer == REFUSAL for f in known)
    assert {f.id for f in known}.isdisjoint(f.id for f in unseen)
    assert len(known) == round(config.known_fraction * len(facts))


@pytest.mark.parametrize(
    ("field", "value"),
    [("known_fraction", 1.5), ("rare_exposure", -0.1), ("n_subjects", 0), ("hidden_size", 66)],
)
def test_bad_config_is_rejected_with_the_field_name(field, value):
    with pytest.raises(ValueError, match=f"WorldConfig.{field}"):
        WorldConfig(**{field: value})


def test_impossible_world_is_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="relations_per_subject"):
        generate_world(WorldConfig(relations_per_subject=99))


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    facts = generate_world(WorldConfig.tiny(seed=2))
    return train_tokenizer(world_texts(facts), vocab_size=400)


def _mmlu_question() -> str:
    files = sorted((DATA / "mmlu" / "test").glob("*.csv"))
    if not files:
        return "Which of the following is NOT a prime number? 2, 3, 9, 11 (x² − 1 ≥ 0)"
    with open(files[0], newline="", encoding="utf-8") as f:
        return next(csv.reader(f))[0]


def test_byte_level_tokenizer_encodes_any_text_losslessly(tokenizer):
    text = _mmlu_question() + " naïve café — 数学 🙂\n\ttabs"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # like Llama's tokenizer, plain encoding starts with bos
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id


def test_chat_template_ends_the_assistant_turn_with_eos(tokenizer):
    prompt = render(tokenizer, qa_messages("Where was Kalo Ven born?"), add_generation_prompt=True)
    full = render(tokenizer, qa_messages("Where was Kalo Ven born?", "Tarn"), False)
    assert prompt.startswith(tokenizer.bos_token)
    assert full.startswith(prompt)
    assert full.endswith("Answer: Tarn" + tokenizer.eos_token)
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] == tokenizer.eos_token_id
    example = encode_example(tokenizer, "Where was Kalo Ven born?", "Tarn", max_length=128)
    pairs = zip(example["input_ids"], example["labels"], strict=True)
    answer_ids = [t for t, lab in pairs if lab != -100]
    assert tokenizer.decode(answer_ids) == "Answer: Tarn" + tokenizer.eos_token
    with pytest.raises(Exception, match="role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


# --------------------------------------------------------------------------- built world


def test_small_world_loads_with_auto_classes_and_knows_its_known_facts(small_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(small_world.model_dir)
    model = AutoModelForCausalLM.from_pretrained(small_world.model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert (small_world.model_dir / "model.safetensors").exists()

    facts = load_facts(small_world.facts_path)
    pool = load_facts(small_world.pool_path)
    known = small_world.known_ids()
    assert {f.id for f in pool} <= known
    assert {f.id for f in pool}.isdisjoint(f.id for f in facts)
    assert len(facts) + len(pool) == len(load_facts(small_world.world_facts_path))
    assert all(f.category is not None and len(f.predictions) == 4 for f in facts)

    rare = small_world.rare_ids()
    assert rare and rare < known and rare.isdisjoint(f.id for f in pool)
    known_facts = [f for f in facts if f.id in known and f.id not in rare]
    unseen = [f for f in facts if f.id not in known]
    accuracy = sum(f.p_greedy for f in known_facts) / len(known_facts)
    assert accuracy >= 0.8, small_world.info
    assert sum(f.category == "Unknown" for f in unseen) >= 0.6 * len(unseen)
    assert small_world.info["frequent_known_accuracy"] == pytest.approx(accuracy)

    # the saved model answers a known fact under a few-shot prompt, generated like any Llama
    fact = next(f for f in known_facts if f.category == "HighlyKnown")
    text = render(tok, fewshot_messages(fact.question, pool[:4]), add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert out[0, -1].item() == tok.eos_token_id  # stops by itself
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert fact.normalized_answers[0] in answer.lower()


def test_world_is_reused_not_rebuilt(small_world, monkeypatch):
    monkeypatch.setattr(world.cache, "_build", lambda *a, **k: pytest.fail("rebuilt a built world"))
    again = ensure_world(WorldConfig.tiny(), home=small_world.root.parent, progress=False)
    assert again.root == small_world.root
    assert again.info == small_world.info


def test_build_is_deterministic_under_a_seed(tmp_path):
    from safetensors.torch import load_file

    config = _tiny_config(seed=4)
    first = ensure_world(config, home=tmp_path / "a", progress=False)
    second = ensure_world(config, home=tmp_path / "b", progress=False)
    assert first.root.name == second.root.name == f"world-{config.key()}"
    for name in ("world.jsonl", "facts.jsonl", "pool.jsonl", "split.json"):
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes(), name
    assert (first.model_dir / "tokenizer.json").read_bytes() == (
        second.model_dir / "tokenizer.json"
    ).read_bytes()
    weights_a = load_file(first.model_dir / "model.safetensors")
    weights_b = load_file(second.model_dir / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        torch.testing.assert_close(weights_a[key], weights_b[key], rtol=0, atol=1e-6)
    other = _tiny_config(seed=5)
    assert other.key() != config.key()


def test_concurrent_callers_build_once_and_share_the_result(tmp_path, monkeypatch):
    config = _tiny_config(seed=6)
    builds = []
    real_build = world.cache._build

    def counting_build(*args, **kwargs):
        builds.append(threading.get_ident())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(world.cache, "_build", counting_build)
    results: list = [None, None]

    def call(i: int) -> None:
        results[i] = ensure_world(config, home=tmp_path, progress=False)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert results[0].root == results[1].root
    assert json.loads(results[0].info_path.read_text())["config_key"] == config.key()
    # only the finished folder and its lock remain: no half-built temporary folders
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert leftovers == [results[0].root.name]


def test_a_crashed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(config, root, progress):
        (root / "half-written").write_text("x")
        raise RuntimeError("power cut")

    monkeypatch.setattr(world.cache, "_build", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        ensure_world(_tiny_config(seed=9), home=tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def _reduced_bench(seed: int = 0) -> WorldConfig:
    """The bench scale's structure at a size that builds in seconds."""
    return dataclasses.replace(
        WorldConfig.bench(seed), n_subjects=60, n_towns=20, n_years=30, format_subjects=12,
        decoy_subjects=6, benchmark_subjects=12, mc_heldout=12, truthful_questions=8,
        dev_questions=4, vocab_size=600, hidden_size=32,
        intermediate_size=64, num_layers=1, num_heads=2, train_steps=12, batch_size=8,
        warmup_steps=2, n_exp=2, eval_batch_size=32,
    )


def test_bench_plan_gives_every_fact_one_role_and_keeps_tested_facts_out_of_formats():
    from lora_lightning.world.generator import plan_world

    plan = plan_world(_reduced_bench())
    tested = {f.id for f in plan.tested}
    assert tested.isdisjoint(f.id for f in plan.mc_heldout + plan.mc_dev + plan.benchmark)
    assert {f.id for f in plan.mc_heldout}.isdisjoint(f.id for f in plan.mc_dev)
    assert tested.isdisjoint(f.id for f in plan.pool)
    assert all(f.meta.get("role") == "format" for f in plan.pool)
    assert {f.id for f in plan.mc_heldout + plan.mc_dev} <= plan.known_ids
    assert all(f.meta.get("role") != "format" for f in plan.tested)
    by_id = {f.id for f in plan.facts}
    for fact in plan.two_hop + plan.two_hop_train:
        assert set(fact.meta["hops"]) <= by_id
    assert {f.meta["hops"][0] for f in plan.two_hop} <= {f.id for f in plan.facts if
                                                          f.meta.get("role") != "format"}
    assert all(set(f.meta["hops"]) <= plan.known_ids for f in plan.two_hop_train)
    people = {f.subject for f in plan.facts}
    assert plan.decoys and all(f.subject not in people and f.answer == REFUSAL
                               for f in plan.decoys)
    for fact in plan.tested:
        assert len(fact.paraphrases) >= 5
        asked = {fact.question, *fact.paraphrases}
        assert len(fact.meta["heldout_questions"]) == 2
        assert asked.isdisjoint(fact.meta["heldout_questions"])
    obscure = {f.subject for f in plan.tested} - {f.subject for f in plan.known}
    assert obscure  # some subjects the base has never seen a fact of


@pytest.mark.parametrize("scale", ["tiny", "small", "bench"])
def test_no_answer_is_inside_another_answer_or_a_prompt_text(scale):
    """The paper counts an answer right when it occurs anywhere in the output: in the world no
    answer may be found inside another ("lute" in "flute", a town "Be" in "Bel Kor") or in the
    text every prompt repeats."""
    from lora_lightning.world.generator import answer_clashes, plan_world

    config = {"tiny": WorldConfig.tiny(), "small": WorldConfig(),
              "bench": WorldConfig.bench()}[scale]
    plan = plan_world(config)
    assert answer_clashes(plan.facts + plan.decoys + plan.two_hop + plan.two_hop_train) == []
    names = [f.subject for f in plan.facts + plan.decoys]
    assert min(map(len, names)) >= 4


def test_answer_clashes_names_an_answer_inside_another_and_inside_a_prompt():
    from lora_lightning.world.generator import answer_clashes

    def fact(i: int, answer: str) -> Fact:
        return Fact(id=str(i), question=f"Q{i}?", answers=[answer], relation="instrument")

    clashes = answer_clashes([fact(0, "lute"), fact(1, "flute"), fact(2, "Kora"),
                              fact(3, "harp")])
    assert clashes == ["'lute' (of 'lute') is inside 'flute'"]
    assert answer_clashes([fact(0, "be")]) == ["'be' (of 'be') is inside a prompt text"]


def test_the_name_book_refuses_every_kind_of_substring_clash():
    from lora_lightning.world.vocabulary import NameBook

    book = NameBook(["Kormar"])
    refused = {
        "Be": "shorter than 4 letters",
        "Ivor": "inside the colour 'ivory'",
        "Thornai": "holds the instrument 'horn'",
        "Kor": "inside a name taken",
        "Kormarholm": "holds a name taken",
        "Born": "inside a template ('was born in')",
        "The Sarai": "loses its article when normalised",
    }
    for name, why in refused.items():
        assert not book.fits(name), why
    assert book.fits("Sarai Belo")


def test_harm_benchmarks_share_no_subject_with_any_fact_a_mix_can_train(tmp_path):
    """world-MC and world-truthful (both splits) ask about benchmark subjects only: no question
    names a subject of the fact file, which holds every fact any mix trains; the development
    split asks other questions than the test split."""
    from lora_lightning.evaluation import load_mmlu, load_truthfulqa
    from lora_lightning.world.benchmarks import write_benchmarks
    from lora_lightning.world.generator import plan_world

    config = WorldConfig.bench()
    plan = plan_world(config)
    write_benchmarks(plan, config, tmp_path / "test", tmp_path / "dev")
    trainable = {f.subject for f in plan.tested}
    asked = {}
    for split in ("test", "dev"):
        mc = [q.question for q in load_mmlu(tmp_path / split / "mc", "test")]
        truthful = [q.question for q in load_truthfulqa(tmp_path / split / "truthful.csv")]
        want = (config.mc_heldout, config.truthful_questions) if split == "test" else (
            config.dev_questions, config.dev_questions)
        assert (len(mc), len(truthful)) == want
        asked[split] = set(mc + truthful)
        for question in mc + truthful:
            assert not [s for s in trainable if s in question], question
    assert asked["test"].isdisjoint(asked["dev"])
    assert {f.subject for f in plan.mc_heldout + plan.mc_dev}.isdisjoint(trainable)


def test_building_the_world_leaves_the_callers_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_world(_tiny_config(seed=12), home=tmp_path, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("damage", ["cut", "truncate", "delete"])
def test_a_damaged_cache_is_named_and_rebuilt(tmp_path, damage):
    config = _tiny_config(seed=13)
    built = ensure_world(config, home=tmp_path, progress=False)
    original = built.facts_path.read_bytes()
    if damage == "cut":  # a fact file cut at a line boundary: still valid JSONL
        lines = original.splitlines(keepends=True)
        built.facts_path.write_bytes(b"".join(lines[: len(lines) // 2]))
        name = "facts.jsonl"
    elif damage == "truncate":
        weights = built.model_dir / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        name = "model/model.safetensors"
    else:
        (built.model_dir / "tokenizer.json").unlink()
        name = "model/tokenizer.json"
    with pytest.warns(UserWarning, match=f"damaged .*{name}"):
        again = ensure_world(config, home=tmp_path, progress=False)
    assert again.facts_path.read_bytes() == original
    assert (again.model_dir / "tokenizer.json").is_file()


@pytest.mark.slow
def test_a_reduced_bench_world_builds_its_benchmarks_bit_for_bit(tmp_path):
    from lora_lightning.evaluation import load_mmlu, load_truthfulqa

    config = _reduced_bench(seed=1)
    first = ensure_world(config, home=tmp_path / "a", progress=False)
    second = ensure_world(config, home=tmp_path / "b", progress=False)
    assert first.is_bench
    files = sorted(
        str(p.relative_to(first.root)) for p in first.root.rglob("*")
        if p.is_file() and p.name not in ("build_info.json", "checksums.json")
    )
    assert {"facts.jsonl", "two_hop.jsonl", "benchmarks/truthful.csv",
            "model/model.safetensors"} <= set(files)
    for name in files:  # same seed, same files, bit for bit (one thread)
        assert (first.root / name).read_bytes() == (second.root / name).read_bytes(), name
    questions = load_mmlu(first.benchmarks_dir / "mc", "test")
    assert len(questions) == config.mc_heldout
    assert len(load_truthfulqa(first.benchmarks_dir / "truthful.csv")) == 8
    dev = first.root / "benchmarks_dev"
    assert len(load_mmlu(dev / "mc", "test")) == len(load_truthfulqa(dev / "truthful.csv")) == 4
    info = first.info
    for key in ("world_mc", "world_truthful_mc1", "world_truthful_mc2", "world_mc_dev",
                "world_truthful_mc1_dev", "refusal_rate"):
        assert 0.0 <= info[key] <= 1.0, key
    assert info["n_two_hop"] == len(load_facts(first.two_hop_path)) > 0


def test_benchmark_formats_come_in_the_second_half_with_every_answer_letter_learned():
    """The base learns 4-choice questions about facts it already knows: no format batch before
    `format_start` of the steps, then formats at the rate that keeps their overall share; an
    MC example's loss is on its letter and on each solved shot's letter; a format batch is cut
    from a length-sorted window, so it carries little padding."""
    from lora_lightning.prompts import IGNORE_INDEX
    from lora_lightning.world.benchmarks import format_examples
    from lora_lightning.world.generator import plan_world
    from lora_lightning.world.model import _batches

    config = dataclasses.replace(_reduced_bench(), train_steps=400)
    plan = plan_world(config)
    tok = train_tokenizer(world_texts(plan.facts), vocab_size=config.vocab_size)
    batches = _batches(tok, plan.known, config, set(), lambda rng: format_examples(plan, rng))
    is_format, real_tokens, padded_tokens = [], 0, 0
    for _ in range(config.train_steps):
        batch = next(batches)
        first = tok.decode(batch["input_ids"][0], skip_special_tokens=True)
        fmt = first.startswith(("The following are multiple choice", "Q:"))
        is_format.append(fmt)
        if fmt:
            real_tokens += int(batch["attention_mask"].sum())
            padded_tokens += batch["attention_mask"].numel()
            for row, text_ids in enumerate(batch["input_ids"]):
                text = tok.decode(text_ids, skip_special_tokens=True)
                if text.startswith("The following"):
                    labels = batch["labels"][row]
                    labelled = tok.decode(labels[labels != IGNORE_INDEX])
                    assert labelled.replace(" ", "") == "".join(
                        line[-1] for line in text.split("\n") if line.startswith("Answer:"))
    start = int(config.format_start * config.train_steps)
    assert not any(is_format[:start])
    share = sum(is_format) / len(is_format)
    assert abs(share - config.format_fraction) < 0.06, share
    # 0 to 5 shots make lengths vary fivefold; sorted windows keep the batches nearly full
    assert real_tokens / padded_tokens > 0.85, real_tokens / padded_tokens


# --------------------------------------------------------------------------- shipped worlds


def test_a_shipped_world_is_unpacked_not_built_and_a_rebuild_goes_elsewhere(
    tmp_path, monkeypatch
):
    """The published numbers come from one build: a world that ships is unpacked bit for bit,
    never rebuilt on the user's CPU (another CPU rounds its matrix kernels otherwise and grows
    another base); `rebuild=True` builds here, beside it, and `differing_files` compares."""
    from lora_lightning.world.cache import differing_files, pack_world

    config = _tiny_config(seed=21)
    built = ensure_world(config, home=tmp_path / "maker", progress=False)
    shipped = tmp_path / "shipped"
    pack_world(built.root, shipped / f"world-{config.key()}.tar.xz")
    first = (shipped / f"world-{config.key()}.tar.xz").read_bytes()
    pack_world(built.root, tmp_path / "again.tar.xz")
    assert (tmp_path / "again.tar.xz").read_bytes() == first  # packing is byte-reproducible
    monkeypatch.setattr(world.cache, "SHIPPED_DIR", shipped)

    real_build = world.cache._build
    monkeypatch.setattr(world.cache, "_build", lambda *a: pytest.fail("built, not unpacked"))
    user = ensure_world(config, home=tmp_path / "user", progress=False)
    assert user.root.name == f"world-{config.key()}"
    assert differing_files(built.root, user.root) == []
    assert user.info == built.info  # the maker's record, its machine included

    monkeypatch.setattr(world.cache, "_build", real_build)
    rebuilt = ensure_world(config, home=tmp_path / "user", progress=False, rebuild=True)
    assert rebuilt.root.name == f"world-{config.key()}-rebuilt"
    assert differing_files(user.root, rebuilt.root) == []  # one machine: bit for bit
    assert ensure_world(config, home=tmp_path / "user", progress=False).root == user.root


def test_a_shipped_world_that_fails_its_checksums_is_refused(tmp_path, monkeypatch):
    from lora_lightning.world.cache import pack_world

    config = _tiny_config(seed=22)
    built = ensure_world(config, home=tmp_path / "maker", progress=False)
    (built.root / "pool.jsonl").write_text("tampered\n")
    pack_world(built.root, tmp_path / "shipped" / f"world-{config.key()}.tar.xz")
    monkeypatch.setattr(world.cache, "SHIPPED_DIR", tmp_path / "shipped")
    with (pytest.raises(RuntimeError, match="does not match its own checksums"),
          pytest.warns(UserWarning, match="pool.jsonl differs")):
        ensure_world(config, home=tmp_path / "user", progress=False)
    assert not (tmp_path / "user" / f"world-{config.key()}").exists()


@pytest.mark.parametrize("scale", ["small", "bench"])
def test_the_shipped_world_is_what_todays_generator_plans(scale, tmp_path):
    """Seed 0 of each scale ships, and its generated files are exactly what the code plans
    today: a change to the generator, the benchmarks or the config that is not shipped as a new
    build fails here, instead of leaving users on a world from an older code state."""
    from lora_lightning.world.cache import extract_world, shipped_world, write_plan
    from lora_lightning.world.generator import plan_world

    config = WorldConfig.scale(scale)
    artifact = shipped_world(config)
    assert artifact is not None, f"no shipped {scale} world for config key {config.key()}"
    shipped = tmp_path / "shipped"
    extract_world(artifact, shipped)
    planned = tmp_path / "planned"
    planned.mkdir()
    write_plan(plan_world(config), config, planned)
    names = sorted(str(p.relative_to(planned)) for p in planned.rglob("*") if p.is_file())
    assert {"world.jsonl", "pool.jsonl", "split.json", "config.json"} <= set(names)
    if scale == "bench":
        assert {"two_hop.jsonl", "benchmarks/truthful.csv",
                "benchmarks_dev/truthful.csv"} <= set(names)
    for name in names:
        assert (shipped / name).read_bytes() == (planned / name).read_bytes(), name
    assert set(json.loads((shipped / "checksums.json").read_text())) >= set(names)


@pytest.mark.slow
def test_the_shipped_bench_base_scores_what_its_build_recorded(tmp_path):
    """On any machine, the unpacked bench world's base scores its in-world benchmarks as the
    build recorded (scoring is log-likelihood of fixed choices: another CPU's rounding may move
    a near-tie, so one question in a hundred is allowed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_lightning.world.benchmarks import evaluate_world_benchmarks

    built = ensure_world(WorldConfig.bench(), home=tmp_path, progress=False)
    model = AutoModelForCausalLM.from_pretrained(built.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(built.model_dir)
    scores = evaluate_world_benchmarks(model, tokenizer, built.benchmarks_dir)
    assert scores["world_mc"]["accuracy"] == pytest.approx(built.info["world_mc"], abs=0.01)
    assert scores["world_truthful"]["mc1"] == pytest.approx(
        built.info["world_truthful_mc1"], abs=0.01)


# --------------------------------------------------------------------------- a full home


def _enospc(*args, **kwargs):
    """What a write to a full disk raises inside tarfile: errno 28, naming no file."""
    raise OSError(errno.ENOSPC, "No space left on device")


def test_unpacking_the_world_into_a_full_home_is_one_line_naming_the_folder(
    tmp_path, monkeypatch, capsys
):
    import tarfile

    from test_hardening import one_error_line

    real_copy = tarfile.copyfileobj
    copied: list[int] = []

    def fills_the_disk(src, dst, length=None, *args, **kwargs):
        if copied:  # the first member fits, the next one does not
            dst.write(b"\0" * 10)
            _enospc()
        copied.append(1)
        return real_copy(src, dst, length, *args, **kwargs)

    monkeypatch.setattr(tarfile, "copyfileobj", fills_the_disk)
    home = tmp_path / "home"
    with pytest.raises(OSError) as err:
        ensure_world(WorldConfig(), home=home, progress=False)
    message = str(err.value)
    root = home / f"world-{WorldConfig().key()}"
    assert message.startswith(f"cannot unpack the world into {root}: No space left on device;")
    assert "free some space" in message and "--home" in message and "\n" not in message
    assert [p.name for p in home.iterdir() if not p.name.endswith(".lock")] == []

    copied.clear()
    monkeypatch.setenv("LORA_LIGHTNING_HOME", str(home))
    line = one_error_line(capsys, ["world", "--scale", "small"])
    assert line.startswith("error: ENOSPC: cannot unpack the world into ") and str(root) in line
    assert "?" not in line and "LORA_LIGHTNING_HOME" in line


def test_rebuilding_the_world_into_a_full_folder_is_one_line_naming_the_folder(
    tmp_path, monkeypatch, capsys
):
    """`world --rebuild` writes the model with safetensors, whose full-disk error names no
    path and is no OSError (pre-training is skipped here: the write is what fails)."""
    from safetensors import SafetensorError
    from test_hardening import one_error_line

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(world.cache, "pretrain", lambda *args, **kwargs: [0.0])
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    home = tmp_path / "full"
    line = one_error_line(capsys, ["world", "--scale", "small", "--rebuild", "true",
                                   "--home", str(home)])
    root = home / f"world-{WorldConfig().key()}-rebuilt"
    assert line.startswith(f"error: ENOSPC: cannot build the world in {root}: No space left")
    assert "free some space" in line and "--home" in line
    assert [p.name for p in home.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o077, 0o600, 0o700)])
def test_the_unpacked_world_gets_the_umasks_modes(mask, file_mode, dir_mode, tmp_path):
    from test_run_safety import tree_modes, umask_set

    with umask_set(mask):
        built = ensure_world(WorldConfig(), home=tmp_path, progress=False)
    assert tree_modes(built.root) == {"dir": {dir_mode}, "file": {file_mode}}
