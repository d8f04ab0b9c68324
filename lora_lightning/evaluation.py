"""External benchmarks: MMLU (5-shot) and TruthfulQA MC1/MC2, scored by log-likelihood.

The paper measures what a LoRA fit costs the model outside the trained facts with
lm-evaluation-harness. We reproduce the harness' conventions (docs/science.md) so the numbers
are comparable with it, while reading a local copy of the data (no network at run time):

- prompts exactly as the harness builds them;
- a continuation is scored as the summed log-probability of its tokens given the context, where
  the continuation tokens are found the harness' way: encode context+continuation and context,
  and split the first at the length of the second (so a merge across the boundary is scored as
  the model would see it). A tokenizer that adds a BOS token gets it in front of the context.

Scoring is batched: requests are de-duplicated by model input (the four " A".." D" answers of an
MMLU question share one forward pass), sorted by length, left-padded with explicit position ids,
and only the last positions' logits are materialised (`logits_to_keep`).

The package ships the data the shipped configs use, with their licences: MMLU's dev and test
splits and TruthfulQA.csv under `lora_lightning/benchmark_data/`, named wherever a command runs
as `pkg:lora_lightning/benchmark_data` (`SHIPPED_DATA`; or `.../mmlu` and
`.../truthfulqa/TruthfulQA.csv`).

`score_benchmarks` runs every benchmark a `BenchmarkSettings` configures (lm-evaluation-harness
tasks included): the `evaluate` command and the `test` report both score through it.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_lightning import harness
from lora_lightning.files import package_file
from lora_lightning.inference import (
    PaddedBatch,
    evaluating,
    left_padded_batches,
    model_device,
    pad_token_id,
)
from lora_lightning.progress import progress_bar

__all__ = [
    "LETTERS",
    "SHIPPED_DATA",
    "TRUTHFULQA_PREAMBLE",
    "BenchmarkSettings",
    "MMLUQuestion",
    "TruthfulQAQuestion",
    "encode_pair",
    "evaluate_mmlu",
    "evaluate_truthfulqa",
    "load_mmlu",
    "load_truthfulqa",
    "loglikelihoods",
    "mmlu_context",
    "mmlu_dev_shots",
    "mmlu_subjects",
    "score_benchmarks",
    "truthfulqa_context",
]

# MMLU (dev, test) and TruthfulQA as shipped in this package (see the module docstring)
SHIPPED_DATA = "pkg:lora_lightning/benchmark_data"

LETTERS = ("A", "B", "C", "D")
_MMLU_SPLITS = {"dev": "dev", "val": "validation", "validation": "validation", "test": "test"}

# lm-evaluation-harness truthfulqa_mc1/mc2 `doc_to_text`: a fixed 6-shot QA preamble.
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MMLUQuestion:
    """One MMLU row; `answer` indexes `choices` (0..3 for A..D)."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: int


@dataclass(frozen=True)
class TruthfulQAQuestion:
    """One TruthfulQA row with its answer lists already split on "; "."""

    question: str
    best_answer: str
    correct_answers: tuple[str, ...]
    incorrect_answers: tuple[str, ...]
    type: str = ""
    category: str = ""

    @property
    def mc1_choices(self) -> list[str]:
        """Best answer first, then the incorrect ones (MC1 is right iff index 0 wins)."""
        return [self.best_answer, *self.incorrect_answers]

    @property
    def mc2_choices(self) -> list[str]:
        """Correct answers first, then the incorrect ones."""
        return [*self.correct_answers, *self.incorrect_answers]


def _offline() -> bool:
    return any(
        os.environ.get(v, "") in ("1", "true", "True", "yes")
        for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hf_load(name: str, config: str, split: str):
    """Load a Hugging Face dataset lazily, failing clearly when that cannot work."""
    if _offline():
        raise RuntimeError(
            f"cannot load {name!r} from Hugging Face: offline mode is set (HF_HUB_OFFLINE / "
            "HF_DATASETS_OFFLINE); pass the path of a local copy instead"
        )
    try:
        import datasets
    except ImportError as err:
        raise RuntimeError(
            f"loading {name!r} from Hugging Face needs the `datasets` package "
            "(pip install 'lora-lightning[datasets]'), or pass the path of a local copy"
        ) from err
    return datasets.load_dataset(name, config, split=split)


def _mmlu_root(data_dir: str | os.PathLike) -> Path:
    """Accept the data folder holding `mmlu/` or the `mmlu` folder itself, or either as
    `pkg:<package>/<path>` (the shipped copy: `pkg:lora_lightning/benchmark_data`)."""
    root = Path(package_file(str(data_dir), "MMLU data")).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"MMLU data directory not found: {root}")
    if (root / "mmlu").is_dir():
        root = root / "mmlu"
    if not (root / "dev").is_dir() and not (root / "test").is_dir():
        raise FileNotFoundError(
            f"{root} has no MMLU layout: expected dev/, val/, test/ folders of "
            "{subject}_{split}.csv files (or a folder holding mmlu/)"
        )
    return root


def mmlu_subjects(data_dir: str | os.PathLike, split: str = "test") -> list[str]:
    """The subjects with a CSV file in `split`, sorted (file names without `_{split}.csv`)."""
    folder = _mmlu_root(data_dir) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"MMLU split folder not found: {folder}")
    suffix = f"_{split}.csv"
    return sorted(p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}"))


def _read_mmlu_csv(path: Path, subject: str, limit: int | None) -> list[MMLUQuestion]:
    if not path.is_file():
        raise FileNotFoundError(f"MMLU file not found: {path}")
    rows: list[MMLUQuestion] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row:
                continue
            if len(row) != 6:
                raise ValueError(
                    f"{path}:{reader.line_num}: expected 6 fields (question, A, B, C, D, answer), "
                    f"got {len(row)}"
                )
            letter = row[5].strip()
            if letter not in LETTERS:
                raise ValueError(
                    f"{path}:{reader.line_num}: answer must be one of A, B, C, D, got {letter!r}"
                )
            rows.append(MMLUQuestion(subject, row[0], tuple(row[1:5]), LETTERS.index(letter)))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def load_mmlu(
    data_dir: str | os.PathLike | None,
    split: str = "test",
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[MMLUQuestion]:
    """MMLU questions of `split` ("dev", "val" or "test") for `subjects` (all by default).

    `data_dir` is a local copy in the original layout (`mmlu/{split}/{subject}_{split}.csv`,
    no header); `None` loads `cais/mmlu` from Hugging Face (needs `datasets` and the network).
    `limit` keeps the first `limit` questions of each subject (the harness' `--limit` is per
    task, and each subject is a task). Questions come subject by subject in file order.
    """
    if split not in _MMLU_SPLITS:
        raise ValueError(f"split must be one of {sorted(_MMLU_SPLITS)}, got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if data_dir is None:
        return _load_mmlu_hf(split, subjects, limit)
    root = _mmlu_root(data_dir)
    folder = "val" if split == "validation" else split
    names = list(subjects) if subjects is not None else mmlu_subjects(root, folder)
    out: list[MMLUQuestion] = []
    for subject in names:
        out += _read_mmlu_csv(root / folder / f"{subject}_{folder}.csv", subject, limit)
    return out


def _load_mmlu_hf(
    split: str, subjects: Sequence[str] | None, limit: int | None
) -> list[MMLUQuestion]:
    data = _hf_load("cais/mmlu", "all", _MMLU_SPLITS[split])
    wanted = set(subjects) if subjects is not None else None
    per_subject: dict[str, list[MMLUQuestion]] = {}
    for row in data:
        subject = row["subject"]
        if wanted is not None and subject not in wanted:
            continue
        bucket = per_subject.setdefault(subject, [])
        if limit is None or len(bucket) < limit:
            bucket.append(
                MMLUQuestion(subject, row["question"], tuple(row["choices"]), int(row["answer"]))
            )
    missing = (wanted or set()) - per_subject.keys()
    if missing:
        raise ValueError(f"cais/mmlu has no {split} rows for subjects {sorted(missing)}")
    order = list(subjects) if subjects is not None else sorted(per_subject)
    return [q for s in order for q in per_subject[s]]


def _mmlu_block(q: MMLUQuestion) -> str:
    lines = [q.question.strip()] + [f"{L}. {c}" for L, c in zip(LETTERS, q.choices, strict=True)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_context(question: MMLUQuestion, shots: Sequence[MMLUQuestion]) -> str:
    """The harness' MMLU prompt: description, solved shots, then the question up to "Answer:"."""
    text = (
        "The following are multiple choice questions (with answers) about "
        f"{question.subject.replace('_', ' ')}.\n\n"
    )
    for shot in shots:
        text += f"{_mmlu_block(shot)} {LETTERS[shot.answer]}\n\n"
    return text + _mmlu_block(question)


def mmlu_dev_shots(
    data_dir: str | os.PathLike | None, subject: str, n_shot: int = 5
) -> list[MMLUQuestion]:
    """The first `n_shot` dev rows of `subject`: the harness' fixed few-shot examples."""
    if n_shot == 0:
        return []
    shots = load_mmlu(data_dir, "dev", [subject], limit=n_shot)
    if len(shots) < n_shot:
        raise ValueError(f"MMLU dev split of {subject!r} has {len(shots)} rows, need {n_shot}")
    return shots


def _truthfulqa_file(path: str | os.PathLike) -> Path:
    p = Path(package_file(str(path), "TruthfulQA data")).expanduser()
    for candidate in (p, p / "TruthfulQA.csv", p / "truthfulqa" / "TruthfulQA.csv"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"TruthfulQA CSV not found at {p} (looked for the file itself, {p}/TruthfulQA.csv and "
        f"{p}/truthfulqa/TruthfulQA.csv)"
    )


def _split_answers(cell: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in cell.split(";") if a.strip())


_TQA_COLUMNS = (
    "Type",
    "Category",
    "Question",
    "Best Answer",
    "Correct Answers",
    "Incorrect Answers",
)


def load_truthfulqa(path: str | os.PathLike | None) -> list[TruthfulQAQuestion]:
    """TruthfulQA questions from `TruthfulQA.csv` (or a folder holding it, or `truthfulqa/`).

    `None` loads `truthfulqa/truthful_qa` ("generation" config) from Hugging Face.
    Answers in a cell are separated by "; ".
    """
    if path is None:
        data = _hf_load("truthfulqa/truthful_qa", "generation", "validation")
        return [
            TruthfulQAQuestion(
                r["question"],
                r["best_answer"],
                tuple(r["correct_answers"]),
                tuple(r["incorrect_answers"]),
                r["type"],
                r["category"],
            )
            for r in data
        ]
    file = _truthfulqa_file(path)
    out: list[TruthfulQAQuestion] = []
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{file}: empty file, expected a header row")
        missing = [c for c in _TQA_COLUMNS if c not in header]
        if missing:
            raise ValueError(f"{file}:1: header lacks columns {missing}")
        col = {name: header.index(name) for name in _TQA_COLUMNS}
        for row in reader:
            if not row:
                continue
            where = f"{file}:{reader.line_num}"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} fields, got {len(row)}")
            best = row[col["Best Answer"]].strip()
            incorrect = _split_answers(row[col["Incorrect Answers"]])
            correct = _split_answers(row[col["Correct Answers"]])
            question = row[col["Question"]].strip()
            if not question or not best or not incorrect or not correct:
                raise ValueError(
                    f"{where}: Question, Best Answer, Correct Answers and Incorrect Answers "
                    "must all be non-empty"
                )
            out.append(
                TruthfulQAQuestion(
                    question, best, correct, incorrect, row[col["Type"]], row[col["Category"]]
                )
            )
    return out


def truthfulqa_context(question: str, preamble: str = TRUTHFULQA_PREAMBLE) -> str:
    """The harness' TruthfulQA MC prompt: fixed preamble, then the question and "A:"."""
    return f"{preamble}\n\nQ: {question}\nA:"


# --------------------------------------------------------------------------- scoring


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer) -> list[int]:
    """Tokens the tokenizer puts before any text (BOS), found by encoding with and without."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


def encode_pair(
    tokenizer,
    context: str,
    continuation: str,
    prefix: Sequence[int] | None = None,
    context_cache: dict[str, list[int]] | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of `context` (BOS included) and of `continuation`, harness style.

    Trailing whitespace of the context moves to the continuation; then context+continuation is
    encoded whole and the continuation ids are its tokens past the length of the encoded
    context (lm-evaluation-harness' `_encode_pair`), so a continuation that would merge with the
    context's last characters is still scored as the tokens the model reads. `prefix` (the
    tokenizer's BOS tokens) and `context_cache` (context text -> ids) spare repeated work when
    many continuations share a context.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    prefix = _special_prefix(tokenizer) if prefix is None else list(prefix)
    whole = _encode(tokenizer, stripped + continuation)
    if context_cache is None:
        ctx = _encode(tokenizer, stripped)
    else:
        if stripped not in context_cache:
            context_cache[stripped] = _encode(tokenizer, stripped)
        ctx = context_cache[stripped]
    cont = whole[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    ctx = prefix + ctx
    if not ctx:  # the model needs something to condition on: use EOS, as the harness does
        if tokenizer.eos_token_id is None:
            raise ValueError("empty context and the tokenizer has no BOS or EOS token")
        ctx = [tokenizer.eos_token_id]
    return ctx, cont


def _max_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _forward_last(model, batch: PaddedBatch, keep: int) -> torch.Tensor:
    """Logits of the last `keep` positions of a left-padded batch."""
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "position_ids": batch.position_ids,
    }
    try:
        logits = model(**kwargs, logits_to_keep=keep).logits
    except TypeError:  # models without `logits_to_keep`
        logits = model(**kwargs).logits
    return logits[:, -keep:]


def loglikelihoods(
    model,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    progress: bool | str = False,
) -> list[tuple[float, bool]]:
    """Summed log-probability of each (context, continuation) and whether it is the greedy one.

    `progress`: show progress (a string: the phase to name in the progress lines).

    One forward pass per batch of distinct model inputs (longest first, as the harness does, so
    an out-of-memory batch shows at once); inputs longer than the model's
    `max_position_embeddings` lose tokens on the left (the continuation must fit).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prefix = _special_prefix(tokenizer)
    context_cache: dict[str, list[int]] = {}
    max_len = _max_length(model)
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    desc = progress if isinstance(progress, str) else "loglikelihood"
    # a phase of its own: a full MMLU's 56,000 prompts take minutes to encode on a CPU
    encoding = progress_bar(len(requests), f"{desc}, encoding", enabled=bool(progress))
    for i, (context, continuation) in enumerate(requests):
        encoding.update()
        ctx, cont = encode_pair(tokenizer, context, continuation, prefix, context_cache)
        whole = ctx + cont
        if max_len is not None and len(whole) - 1 > max_len:
            if len(cont) > max_len:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens exceeds "
                    f"the model's {max_len} positions"
                )
            whole = whole[-(max_len + 1) :]
        groups.setdefault(tuple(whole[:-1]), []).append((i, cont))
    encoding.close()

    inputs = list(groups)
    results: list[tuple[float, bool] | None] = [None] * len(requests)
    batches = left_padded_batches(
        inputs, batch_size, pad_token_id(tokenizer), model_device(model), longest_first=True
    )
    bar = progress_bar(len(inputs), desc, enabled=bool(progress))
    with bar, evaluating(model, use_cache=False):
        for batch in batches:
            rows_of = [groups[inputs[i]] for i in batch.indices]
            keep = max(len(c) for conts in rows_of for _, c in conts)
            logits = _forward_last(model, batch, keep)
            for b, conts in enumerate(rows_of):
                for i, cont in conts:
                    rows = logits[b, keep - len(cont) :].float().log_softmax(-1)
                    target = torch.tensor(cont, device=rows.device).unsqueeze(-1)
                    logp = rows.gather(-1, target).sum().item()
                    greedy = bool((rows.argmax(-1) == target.squeeze(-1)).all())
                    results[i] = (logp, greedy)
            bar.update(len(batch.indices))
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- benchmarks


def evaluate_mmlu(
    model,
    tokenizer,
    data_dir: str | os.PathLike | None,
    subjects: Sequence[str] | None = None,
    limit: int | None = None,
    n_shot: int = 5,
    batch_size: int = 8,
    progress: bool | str = False,
) -> dict[str, Any]:
    """MMLU accuracy with the harness' 5-shot prompt and " A".." D" log-likelihood scoring.

    Returns ``accuracy`` (mean over questions, not over subjects), ``n`` (questions),
    ``n_shot`` and ``subjects``: ``{subject: {"accuracy", "n"}}``. `limit` is per subject.
    """
    if not 0 <= n_shot <= 5:
        raise ValueError(f"n_shot must be between 0 and 5 (the dev split has 5 rows), got {n_shot}")
    questions = load_mmlu(data_dir, "test", subjects, limit)
    if not questions:
        raise ValueError("no MMLU questions selected")
    shots = {
        s: mmlu_dev_shots(data_dir, s, n_shot) for s in dict.fromkeys(q.subject for q in questions)
    }
    requests = []
    for q in questions:
        context = mmlu_context(q, shots[q.subject])
        requests += [(context, f" {letter}") for letter in LETTERS]
    scores = loglikelihoods(model, tokenizer, requests, batch_size, progress)
    per_subject: dict[str, list[int]] = {}
    for k, q in enumerate(questions):
        lls = [scores[4 * k + j][0] for j in range(4)]
        pred = max(range(4), key=lambda j: (lls[j], -j))  # first maximum, like numpy.argmax
        per_subject.setdefault(q.subject, []).append(int(pred == q.answer))
    n_correct = sum(sum(v) for v in per_subject.values())
    return {
        "accuracy": n_correct / len(questions),
        "n": len(questions),
        "n_shot": n_shot,
        "subjects": {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in per_subject.items()},
    }


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def evaluate_truthfulqa(
    model,
    tokenizer,
    path: str | os.PathLike | None,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool | str = False,
    preamble: str = TRUTHFULQA_PREAMBLE,
) -> dict[str, Any]:
    """TruthfulQA MC1 and MC2 (0-shot with the harness' QA preamble), by log-likelihood.

    MC1: the best answer must have the highest summed log-likelihood among the best answer and
    the incorrect answers (ties go to the best answer, as numpy's argmax would). MC2: the
    probability mass of the correct answers normalised over correct + incorrect, computed in
    log space so long answers do not underflow. Returns ``mc1``, ``mc2`` and ``n``.
    `preamble` replaces the harness' six QA examples (the synthetic world has its own).
    """
    questions = load_truthfulqa(path)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        questions = questions[:limit]
    if not questions:
        raise ValueError("no TruthfulQA questions selected")
    index: dict[tuple[str, str], int] = {}
    for q in questions:
        context = truthfulqa_context(q.question, preamble)
        for choice in (*q.mc1_choices, *q.mc2_choices):
            index.setdefault((context, f" {choice}"), len(index))
    scores = loglikelihoods(model, tokenizer, list(index), batch_size, progress)
    mc1, mc2 = [], []
    for q in questions:
        context = truthfulqa_context(q.question, preamble)

        def ll(choice: str, context: str = context) -> float:
            return scores[index[(context, f" {choice}")]][0]

        best = ll(q.best_answer)
        mc1.append(float(all(best >= ll(c) for c in q.incorrect_answers)))
        true = [ll(c) for c in q.correct_answers]
        false = [ll(c) for c in q.incorrect_answers]
        mc2.append(math.exp(_logsumexp(true) - _logsumexp(true + false)))
    return {"mc1": sum(mc1) / len(mc1), "mc2": sum(mc2) / len(mc2), "n": len(questions)}


# --------------------------------------------------------------------------- all configured


@dataclass(frozen=True)
class BenchmarkSettings:
    """Which external benchmarks to score and how: what the `evaluate` command's flags and the
    `test` report's `--report.*` keys both configure, so that both score the same way.

    `benchmarks` picks from "mmlu" and "truthfulqa" (None: those whose data is given); a chosen
    one whose data path is None is loaded from Hugging Face. Limits count per MMLU subject, over
    TruthfulQA questions and per harness task (a float below 1: that share of each task);
    `harness_num_fewshot` None keeps each harness task's own shots. `batch_size` is the number of
    distinct model inputs per forward pass.
    """

    benchmarks: Sequence[str] | None = None
    mmlu_dir: str | None = None
    mmlu_subjects: Sequence[str] | None = None
    mmlu_limit: int | None = None
    n_shot: int = 5
    truthfulqa_path: str | None = None
    truthfulqa_limit: int | None = None
    harness_tasks: Sequence[str] | str | None = None
    harness_include: Sequence[str] | str | None = None
    harness_limit: int | float | None = None
    harness_num_fewshot: int | None = None
    batch_size: int = 8

    def __post_init__(self) -> None:
        unknown = set(self.benchmarks or ()) - {"mmlu", "truthfulqa"}
        if unknown:
            raise ValueError(f"benchmarks: unknown {sorted(unknown)}; choose from mmlu, truthfulqa")

    @property
    def chosen(self) -> list[str]:
        """The log-likelihood benchmarks to run, "mmlu" and/or "truthfulqa", in that order."""
        if self.benchmarks is not None:
            return list(self.benchmarks)
        return [name for name, data in (("mmlu", self.mmlu_dir),
                                         ("truthfulqa", self.truthfulqa_path)) if data]

    @property
    def tasks(self) -> list[str]:
        """The harness tasks, parsed ("hellaswag,arc_easy" -> two)."""
        return harness.parse_tasks(self.harness_tasks)

    def check_tasks(self) -> None:
        """A missing lm_eval or a misspelt harness task fails here: call it before the model
        loads, not after an hour of scoring."""
        if self.tasks:
            harness.check_tasks(harness.task_manager(self.harness_include), self.tasks)

    def check_data(self) -> None:
        """A local data path that is not there (a config carried to a machine without that
        folder) fails here, in one line naming it, before the model loads; a chosen benchmark
        without one is read from Hugging Face when it runs."""
        if "mmlu" in self.chosen and self.mmlu_dir is not None:
            _mmlu_root(self.mmlu_dir)
        if "truthfulqa" in self.chosen and self.truthfulqa_path is not None:
            _truthfulqa_file(self.truthfulqa_path)


def score_benchmarks(
    model: Any,
    tokenizer: Any,
    settings: BenchmarkSettings,
    *,
    name: str | None = None,
    progress: bool | str = True,
    more: Callable[[], dict[str, Any]] | None = None,
    on_scored: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """Every benchmark `settings` configures, on `model` as it is now: what `evaluate` prints
    and writes and what the `test` report scores before and after.

    Returns ``{"mmlu": ..., "truthfulqa": ..., "harness": {task: {metric: value, "n": ...}}}``
    with the configured ones only. `name` is the model's name in the harness' results;
    `progress` shows progress (a string: the phase to name in each benchmark's progress lines,
    e.g. "(base)"). `more` scores further benchmarks after TruthfulQA, its keys joining the
    result (the synthetic world's, which are built on this module's scorers and so cannot be
    imported here). `on_scored(key, result)` is called as each result comes: a full MMLU takes
    an hour, and the `evaluate` command shows each score when it has it.
    """
    def shown(benchmark: str) -> bool | str:
        return f"{benchmark} {progress}" if isinstance(progress, str) else progress

    out: dict[str, Any] = {}

    def scored(results: dict[str, Any]) -> None:
        for key, result in results.items():
            out[key] = result
            if on_scored is not None:
                on_scored(key, result)

    s = settings
    if "mmlu" in s.chosen:
        scored({"mmlu": evaluate_mmlu(
            model, tokenizer, s.mmlu_dir, subjects=s.mmlu_subjects, limit=s.mmlu_limit,
            n_shot=s.n_shot, batch_size=s.batch_size, progress=shown("MMLU"),
        )})
    if "truthfulqa" in s.chosen:
        scored({"truthfulqa": evaluate_truthfulqa(
            model, tokenizer, s.truthfulqa_path, limit=s.truthfulqa_limit,
            batch_size=s.batch_size, progress=shown("TruthfulQA"),
        )})
    if more is not None:
        scored(more())
    if s.tasks:
        scored({"harness": harness.evaluate_tasks(
            model, tokenizer, s.tasks, s.harness_include, s.harness_limit, s.harness_num_fewshot,
            s.batch_size, name=name, progress=bool(progress),
        )})
    return out
