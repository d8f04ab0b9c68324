"""lm-evaluation-harness tasks run by the harness itself on the model object we hold (base plus
unmerged LoRA, or the base alone through `lora_disabled`), offline on task YAMLs of our own; and
our MMLU and TruthfulQA scorers give exactly the harness' numbers."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_evaluation import _make_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lora_lightning import harness
from lora_lightning.evaluation import (
    LETTERS,
    evaluate_mmlu,
    evaluate_truthfulqa,
    load_mmlu,
    load_truthfulqa,
    loglikelihoods,
    mmlu_context,
    mmlu_dev_shots,
    truthfulqa_context,
)
from lora_lightning.lora import inject_lora, lora_disabled, lora_modules

lm_eval = pytest.importorskip("lm_eval", reason='needs pip install "lora-lightning[harness]"')
pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
needs_data = pytest.mark.skipif(
    not (DATA / "mmlu").is_dir() or not (DATA / "truthfulqa").is_dir(),
    reason=f"benchmark copies not found under {DATA}",
)


# --------------------------------------------------------------------------- task files


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_source(folder: Path, **splits: Path) -> dict:
    """A task's data from local JSONL files: the `json` builder, nothing downloaded (and the
    datasets cache in the test's folder, not the home directory)."""
    return {
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {
            "data_files": {split: str(path) for split, path in splits.items()},
            "cache_dir": str(folder / ".hf_cache"),
        },
    }


def write_colour_tasks(folder: Path) -> list[dict]:
    """What a user writes for tasks of their own: a multiple-choice task and a generation task
    over a local JSONL file, in a folder given as `include`."""
    colours = ["red", "blue", "green", "amber"]
    docs = [
        {"question": f"What colour is item {i}?", "choices": colours, "answer": i % 4,
         "target": colours[i % 4]}
        for i in range(6)
    ]
    data = write_jsonl(folder / "colours.jsonl", docs)
    (folder / "colours_mc.yaml").write_text(yaml.safe_dump({
        "task": "colours_mc", **local_source(folder, test=data), "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc"}],
    }))
    (folder / "colours_gen.yaml").write_text(yaml.safe_dump({
        "task": "colours_gen", **local_source(folder, test=data), "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }))
    return docs


def write_mmlu_task(folder: Path, subject: str, limit: int) -> str:
    """The harness' own MMLU subject task (its `default/_default_template_yaml`: prompt,
    choices, first-n dev shots, acc), 5-shot as in the paper, over local copies of the first
    `limit` test rows and the 5 dev rows of `subject`."""
    def rows(split: str, n: int) -> list[dict]:
        return [{"question": q.question, "subject": subject, "choices": list(q.choices),
                 "answer": q.answer} for q in load_mmlu(DATA, split, [subject], n)]

    test = write_jsonl(folder / f"mmlu_{subject}_test.jsonl", rows("test", limit))
    dev = write_jsonl(folder / f"mmlu_{subject}_dev.jsonl", rows("dev", 5))
    name = f"local_mmlu_{subject}"
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({
        "include": str(HARNESS_TASKS / "mmlu" / "default" / "_default_template_yaml"),
        "task": name,
        **local_source(folder, test=test, dev=dev),
        # as in the harness' generated mmlu_<subject>.yaml
        "description": "The following are multiple choice questions (with answers) about "
                       f"{subject.replace('_', ' ')}.\n\n",
        "num_fewshot": 5,
    }))
    return name


def write_truthfulqa_tasks(folder: Path, limit: int) -> list[str]:
    """The harness' own truthfulqa_mc1 and truthfulqa_mc2 (their YAMLs included: the fixed
    6-shot preamble in doc_to_text, acc, and mc2's `process_results_mc2`) over the first `limit`
    rows of our TruthfulQA.csv in the harness' `multiple_choice` shape: MC1 the best answer
    then the incorrect ones, MC2 the correct ones then the incorrect ones."""
    docs = [{"question": q.question,
             "mc1_targets": {"choices": q.mc1_choices,
                             "labels": [1] + [0] * len(q.incorrect_answers)},
             "mc2_targets": {"choices": q.mc2_choices,
                             "labels": [1] * len(q.correct_answers)
                             + [0] * len(q.incorrect_answers)}}
            for q in load_truthfulqa(DATA)[:limit]]
    data = write_jsonl(folder / "truthfulqa.jsonl", docs)
    names = []
    for kind in ("mc1", "mc2"):
        name = f"local_truthfulqa_{kind}"
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "include": str(HARNESS_TASKS / "truthfulqa" / f"truthfulqa_{kind}.yaml"),
            "task": name, "tag": "local_truthfulqa",
            **local_source(folder, validation=data),
        }))
        names.append(name)
    return names


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    """One include folder for the module's tasks: the harness indexes it once per process."""
    folder = tmp_path_factory.mktemp("harness_tasks")
    write_colour_tasks(folder)
    if (DATA / "mmlu").is_dir() and (DATA / "truthfulqa").is_dir():
        for subject in ("anatomy", "high_school_biology"):
            write_mmlu_task(folder, subject, limit=3)
        write_truthfulqa_tasks(folder, limit=4)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The tiny test Llama with LoRA on its MLPs and a non-zero B, so the adapter matters."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    inject_lora(model, ["gate_proj", "up_proj", "down_proj"], rank=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(p, std=0.5)
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def doc_loglikelihoods(result: dict, task: str) -> dict[int, list[float]]:
    """Per document, the harness' log-likelihood of each choice."""
    return {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in result["samples"][task]}


def flat(per_document: dict[int, list[float]]) -> list[float]:
    """Every document's log-likelihoods in document order, one list (pytest 9's `approx`
    compares no nested containers)."""
    return [float(v) for doc in sorted(per_document) for v in per_document[doc]]


# --------------------------------------------------------------------------- errors


def test_task_lists_are_taken_as_the_command_line_writes_them():
    assert harness.parse_tasks("hellaswag, arc_easy,,hellaswag") == ["hellaswag", "arc_easy"]
    assert harness.parse_tasks(["a,b", "c"]) == ["a", "b", "c"]
    assert harness.parse_tasks(None) == []


def test_a_missing_lm_eval_says_how_to_install_it(monkeypatch, tiny, tmp_path, capsys):
    from lora_lightning.__main__ import main
    from lora_lightning.knowledge_report import KnowledgeReport

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now fails
    model, tokenizer = tiny
    install = r'pip install "lora-lightning\[harness\]"'
    with pytest.raises(harness.HarnessUnavailable, match=install):
        harness.evaluate_tasks(model, tokenizer, "hellaswag")
    with pytest.raises(harness.HarnessUnavailable, match="lora-lightning"):
        KnowledgeReport(harness_tasks="hellaswag").on_test_start(None, None)
    with pytest.raises(SystemExit) as exit_info:  # the command line: one line, no traceback
        main(["evaluate", "--model", str(tmp_path / "any"), "--harness_tasks", "hellaswag"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert 'error: HarnessUnavailable: ' in err and 'pip install "lora-lightning[harness]"' in err


def test_an_unknown_task_is_refused_naming_close_task_names(tasks_dir):
    manager = harness.task_manager(tasks_dir)
    with pytest.raises(ValueError, match=r"'hellaswg' \(close task names: hellaswag"):
        harness.check_tasks(manager, ["hellaswg"])
    with pytest.raises(ValueError, match=r"'colours_mcc' \(close task names: colours_mc"):
        harness.check_tasks(manager, ["colours_mc", "colours_mcc"])
    harness.check_tasks(manager, ["colours_mc", "hellaswag"])  # ours and the harness' own


def test_a_task_yaml_that_does_not_load_is_named_with_the_unknown_task(tmp_path):
    (tmp_path / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    with pytest.raises(ValueError, match=r"'broken'.*broken\.yaml: .*Error"):
        harness.check_tasks(harness.task_manager(tmp_path), ["broken"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        harness.task_manager(tmp_path / "nowhere")


# --------------------------------------------------------------------------- the model in memory


def test_local_tasks_run_on_the_model_in_memory_with_and_without_the_adapter(
    tiny, tiny_model_dir, tasks_dir
):
    model, tokenizer = tiny
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rng = random.getstate()
    tasks = ["colours_mc", "colours_gen"]

    after = harness.run_harness(model, tokenizer, tasks, tasks_dir, log_samples=True,
                                progress=False)
    with lora_disabled(model):
        before = harness.run_harness(model, tokenizer, tasks, tasks_dir, log_samples=True,
                                     progress=False)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()  # the base, no LoRA
    base = harness.run_harness(plain, tokenizer, tasks, tasks_dir, log_samples=True,
                               progress=False)

    summary = harness.summarize(after)
    assert set(summary) == set(tasks)
    assert summary["colours_mc"]["n"] == 6 and 0 <= summary["colours_mc"]["acc"] <= 1
    assert "acc_stderr" in summary["colours_mc"] and "exact_match" in summary["colours_gen"]
    # before = the base itself; after = the adapter's scores, which differ
    assert flat(doc_loglikelihoods(before, "colours_mc")) == pytest.approx(
        flat(doc_loglikelihoods(base, "colours_mc")), abs=1e-5)
    assert flat(doc_loglikelihoods(after, "colours_mc")) != pytest.approx(
        flat(doc_loglikelihoods(before, "colours_mc")), abs=1e-3)
    # the same object, untouched: no copy, no merge; its mode and the global RNG restored
    assert all(not m.merged for m in lora_modules(model).values())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert model.training and random.getstate() == rng
    model.eval()

    # generate_until: what the harness generated is the adapted model's greedy continuation
    for sample in after["samples"]["colours_gen"]:
        prompt = sample["arguments"][0][0]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0]
        assert sample["resps"][0][0].split("\n")[0] == text


def test_the_harness_does_not_give_our_tokenizer_a_pad_token(tiny):
    model, tokenizer = tiny
    padless = AutoTokenizer.from_pretrained(tokenizer.name_or_path, pad_token=None)
    padless.pad_token = None
    lm = harness.harness_lm(model, padless, progress=False)
    assert lm.tokenizer.pad_token_id is not None and padless.pad_token_id is None


def test_a_limit_and_shots_are_passed_to_the_harness(tiny, tasks_dir):
    model, tokenizer = tiny
    result = harness.run_harness(model, tokenizer, "colours_mc", tasks_dir, limit=2,
                                 num_fewshot=1, log_samples=True, progress=False)
    assert harness.summarize(result)["colours_mc"]["n"] == 2
    prompt = result["samples"]["colours_mc"][0]["arguments"][0][0]
    assert prompt.count("Question:") == 2  # one shot, then the question


@needs_data
def test_evaluate_runs_harness_tasks_alone_and_fails_early_on_a_misspelt_one(
    tiny_model_dir, tasks_dir, tmp_path
):
    from lora_lightning.commands.evaluate import evaluate_command

    out = evaluate_command(str(tiny_model_dir), harness_tasks="colours_mc,colours_gen",
                           harness_include=str(tasks_dir), output=str(tmp_path / "e.json"),
                           device="cpu", progress=False)
    assert set(out["harness"]) == {"colours_mc", "colours_gen"}
    assert "mmlu" not in out and "truthfulqa" not in out  # no data given: nothing downloaded
    assert json.loads((tmp_path / "e.json").read_text())["harness"] == out["harness"]
    with pytest.raises(ValueError, match="colours_mc"):
        evaluate_command(str(tmp_path / "no model"), harness_tasks="colours_m",
                         harness_include=str(tasks_dir), output=None)


def test_the_test_report_has_harness_rows_before_and_after(tiny, tiny_model_dir, tasks_dir,
                                                             tmp_path):
    from lora_lightning.knowledge_report import KnowledgeReport
    from lora_lightning.report import markdown, report_metrics

    model, tokenizer = tiny
    trainer = SimpleNamespace(is_global_zero=True,
                              datamodule=SimpleNamespace(tokenizer=tokenizer))
    module = SimpleNamespace(model=model, base_model_name=str(tiny_model_dir))
    report = KnowledgeReport(harness_tasks="colours_mc", harness_include=str(tasks_dir),
                             world_dir=None, before_scores=str(tmp_path / "before.json"))
    bench = report._benchmarks(trainer, module)
    row = bench["harness"]["colours_mc"]
    with lora_disabled(model):
        base = harness.evaluate_tasks(model, tokenizer, "colours_mc", tasks_dir, progress=False)
    assert row["before"] == base["colours_mc"]
    assert set(row["after"]) == set(row["before"]) and row["after"]["n"] == 6
    stored = json.loads((tmp_path / "before.json").read_text())
    assert [v["settings"]["harness"]["tasks"] for v in stored.values()] == [["colours_mc"]]
    table = markdown({"benchmarks": bench})
    assert (f"| harness colours_mc acc (n=6) | {row['before']['acc']:.3f} | "
            f"{row['after']['acc']:.3f} |") in table
    logged = report_metrics({"benchmarks": bench})
    assert logged["report/benchmarks/harness/colours_mc/after/acc"] == row["after"]["acc"]


# --------------------------------------------------------------------------- same numbers


def test_the_harness_definitions_we_reproduce_are_the_installed_ones():
    """Our prompts are the installed harness' templates rendered (if the harness changes
    them, this says so before any score differs)."""
    from lm_eval.tasks._yaml_loader import load_yaml
    from lm_eval.utils import apply_template

    mmlu = load_yaml(HARNESS_TASKS / "mmlu" / "default" / "_default_template_yaml",
                     resolve_func=False)
    assert (mmlu["output_type"], mmlu["doc_to_choice"], mmlu["fewshot_split"]) == (
        "multiple_choice", list(LETTERS), "dev")
    assert mmlu["fewshot_config"] == {"sampler": "first_n"}
    question = load_mmlu(DATA, "test", ["anatomy"], 1)[0] if (DATA / "mmlu").is_dir() else None
    if question is not None:
        doc = {"question": question.question, "choices": list(question.choices)}
        description = "The following are multiple choice questions (with answers) about "
        prompt = f"{description}anatomy.\n\n" + apply_template(mmlu["doc_to_text"], doc)
        assert prompt == mmlu_context(question, [])
    for kind in ("mc1", "mc2"):
        tqa = load_yaml(HARNESS_TASKS / "truthfulqa" / f"truthfulqa_{kind}.yaml",
                        resolve_func=False)
        assert tqa["num_fewshot"] == 0 and tqa["doc_to_target"] == 0
        assert apply_template(tqa["doc_to_text"], {"question": "Why?"}) == truthfulqa_context(
            "Why?")


def assert_same_choices(result: dict, mmlu_tasks: dict[str, list], model, tokenizer) -> None:
    """Per MMLU question: the harness' log-likelihoods of " A".." D" are ours, so is the pick."""
    for task, (questions, shots) in mmlu_tasks.items():
        requests = [(mmlu_context(q, shots), f" {letter}") for q in questions for letter in LETTERS]
        ours = [ll for ll, _ in loglikelihoods(model, tokenizer, requests, batch_size=5)]
        theirs = doc_loglikelihoods(result, task)
        assert sorted(theirs) == list(range(len(questions)))
        for k in theirs:
            mine = ours[4 * k: 4 * k + 4]
            assert theirs[k] == pytest.approx(mine, abs=1e-4)
            pick = max(range(4), key=lambda j: (mine[j], -j))
            assert pick == max(range(4), key=lambda j: (theirs[k][j], -j)), (task, k)


@needs_data
@pytest.mark.parametrize("with_bos", [True, False], ids=["bos", "no-bos"])
def test_our_mmlu_and_truthfulqa_scorers_give_the_harness_numbers(with_bos, tasks_dir):
    """A tiny Llama whose 256 positions cut the 5-shot MMLU prompts (truncation is compared
    too), with and without a BOS token; both ways on the same questions."""
    tokenizer = _make_tokenizer(with_bos=with_bos)
    torch.manual_seed(1)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    subjects = ["anatomy", "high_school_biology"]
    mmlu_tasks = {f"local_mmlu_{s}": (load_mmlu(DATA, "test", [s], 3), mmlu_dev_shots(DATA, s))
                  for s in subjects}
    tasks = [*mmlu_tasks, "local_truthfulqa_mc1", "local_truthfulqa_mc2"]
    result = harness.run_harness(model, tokenizer, tasks, tasks_dir, batch_size=4,
                                 log_samples=True, progress=False)
    theirs = harness.summarize(result)

    ours = evaluate_mmlu(model, tokenizer, DATA, subjects, limit=3, batch_size=4)
    for subject in subjects:
        assert ours["subjects"][subject]["accuracy"] == pytest.approx(
            theirs[f"local_mmlu_{subject}"]["acc"], abs=1e-6)
    assert_same_choices(result, mmlu_tasks, model, tokenizer)
    tqa = evaluate_truthfulqa(model, tokenizer, DATA, limit=4, batch_size=4)
    assert tqa["mc1"] == pytest.approx(theirs["local_truthfulqa_mc1"]["acc"], abs=1e-6)
    assert tqa["mc2"] == pytest.approx(theirs["local_truthfulqa_mc2"]["acc"], abs=1e-6)


@needs_data
@pytest.mark.slow
def test_the_small_worlds_reference_scores_are_the_harness_scores(tmp_path):
    """The numbers agreed by hand on the default (small) world's shipped base: MMLU 0.2444 on 90
    questions (the first 30 of abstract_algebra, anatomy, astronomy, 5-shot) and TruthfulQA
    MC1 0.2500 / MC2 0.4771 on the first 100; ours and the harness', question by question."""
    from lora_lightning.models import load_model
    from lora_lightning.world import WorldConfig, ensure_world

    world = ensure_world(WorldConfig(), progress=False)  # the default run's world, cached
    model, tokenizer = load_model(str(world.model_dir), None, device="cpu", dtype="float32")
    subjects = ["abstract_algebra", "anatomy", "astronomy"]
    mmlu_tasks = {write_mmlu_task(tmp_path, s, 30): (load_mmlu(DATA, "test", [s], 30),
                                                     mmlu_dev_shots(DATA, s))
                  for s in subjects}
    tasks = [*mmlu_tasks, *write_truthfulqa_tasks(tmp_path, 100)]
    result = harness.run_harness(model, tokenizer, tasks, tmp_path, batch_size=16,
                                 log_samples=True, progress=False)
    theirs = harness.summarize(result)

    ours = evaluate_mmlu(model, tokenizer, DATA, subjects, limit=30, batch_size=16)
    assert ours["n"] == 90 and round(ours["accuracy"], 4) == 0.2444
    harness_mmlu = sum(theirs[t]["acc"] * theirs[t]["n"] for t in mmlu_tasks) / 90
    assert harness_mmlu == pytest.approx(ours["accuracy"], abs=1e-6)
    assert_same_choices(result, mmlu_tasks, model, tokenizer)
    tqa = evaluate_truthfulqa(model, tokenizer, DATA, limit=100, batch_size=16)
    assert (round(tqa["mc1"], 4), round(tqa["mc2"], 4)) == (0.25, 0.4771)
    assert theirs["local_truthfulqa_mc1"]["acc"] == pytest.approx(tqa["mc1"], abs=1e-6)
    assert theirs["local_truthfulqa_mc2"]["acc"] == pytest.approx(tqa["mc2"], abs=1e-6)


def test_a_sweeps_summary_has_a_column_per_harness_task_metric_before_and_after():
    from lora_lightning.sweep.aggregate import headline

    row = headline({"benchmarks": {
        "harness": {"arc_easy": {"before": {"acc": 0.5, "acc_stderr": 0.1, "n": 10},
                                 "after": {"acc": 0.4, "acc_stderr": 0.1, "n": 10}}},
        "mmlu": {"before": {"accuracy": 0.3}, "after": {"accuracy": 0.2}},
    }})
    assert (row["harness_arc_easy_acc_before"], row["harness_arc_easy_acc_after"]) == (0.5, 0.4)
    assert row["mmlu_accuracy_after"] == 0.2 and not any("stderr" in k for k in row)
