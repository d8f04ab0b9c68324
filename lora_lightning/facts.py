"""Facts: the question/answer records everything else is built from.

One `Fact` type serves every source (our JSONL, the knowledge-packing datasets, the synthetic
world), so prompts, batches, categorisation and metrics never care where a fact came from.

`load_facts` reads every supported source into that one type and refuses bad data loudly: a
malformed row raises `FactFileError` naming the file, the 1-based line (JSONL) or row (tables)
and the field, because a silently skipped fact changes which facts a mix trains on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from lora_lightning.files import atomic_path

log = logging.getLogger(__name__)

CATEGORIES = ("HighlyKnown", "MaybeKnown", "WeaklyKnown", "Unknown")
HF_PREFIX = "hf:"
# facts carved out of a fact file that comes without a few-shot pool (`pool_sidecar` keeps them)
DEFAULT_POOL_SIZE = 32
OnProblem = Literal["error", "drop"]

# What a refusal looks like ("I don't know.", "I cannot verify ..."): a model's answer matching
# one of these refuses, and a fact whose canonical answer matches one is unanswerable (its right
# answer is a refusal). The metrics count refusals with the same patterns.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI (?:couldn't|could not|can't|cannot|was unable to|am unable to) find any information",
    r"\bI (?:cannot|can't|could not|couldn't) (?:verify|confirm)",
    r"\bI (?:don't|do not) know\b",
    r"\bI(?:'m| am) not sure\b",
    r"\bno (?:information|data|records?)\b",
    r"\bI have no comment\b",
    r"\bI(?:'m| am) (?:not aware|unable to (?:answer|provide))",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)


def is_refusal(text: str) -> bool:
    """Whether `text` refuses to answer (any of `REFUSAL_PATTERNS`)."""
    return _REFUSAL.search(text) is not None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def fold_accents(text: str) -> str:
    """"Yaoundé" -> "Yaounde", "São Tomé" -> "Sao Tome" (NFKD, combining marks dropped; also
    folds compatibility forms such as ligatures and full-width letters). A real model writes
    the accented name its pre-training saw while fact sources often spell it plainly, or the
    other way round: a right answer must match either way."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def normalize_answer(text: str) -> str:
    """SQuAD/TriviaQA normalisation (lower-case, drop punctuation and articles, fold spaces),
    with accents folded first (`fold_accents`)."""
    text = fold_accents(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


EXCERPT_CHARS = 60


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A value as an error message may echo it: its repr, cut to about `limit` characters.

    Every error that quotes user data goes through here, so a 5 MB question in a fact file
    gives a readable one-line error instead of 5 MB of terminal output.
    """
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f" ({len(value):,} characters)" if isinstance(value, str | bytes) else ""
    return f"{text[:limit]}...{size}"


@dataclass(frozen=True)
class TextLimit:
    """The longest text (in tokens) a model can take, checked on every fact as it is read.

    A question or answer longer than the model's context can never be probed or trained, and
    tokenizing it (let alone generating after it) costs memory in proportion to its length, so
    `load_facts(..., limit=...)` refuses it on the spot, naming the line. Texts of at most
    `max_tokens` UTF-8 bytes cannot exceed `max_tokens` tokens with a byte-level tokenizer and
    are not tokenized at all; longer ones are tokenized through a prefix of at most
    `PREFIX_CHARS_PER_TOKEN * max_tokens` characters, so memory stays bounded whatever the
    line's length.
    """

    max_tokens: int
    count_tokens: Callable[[str], int]
    what: str = "the model"

    PREFIX_CHARS_PER_TOKEN = 16

    def problem(self, text: str) -> str | None:
        """Why `text` is too long, or None when it fits."""
        if len(text.encode("utf-8")) <= self.max_tokens:
            return None
        cut = self.PREFIX_CHARS_PER_TOKEN * self.max_tokens
        n_tokens = self.count_tokens(text[:cut])
        if n_tokens <= self.max_tokens and len(text) <= cut:
            return None
        counted = f"{n_tokens:,} tokens" if len(text) <= cut else f"over {n_tokens:,} tokens"
        return (
            f"{len(text):,} characters ({counted}), more than {self.what} takes "
            f"({self.max_tokens:,} tokens); shorten it or drop the fact"
        )


@dataclass
class Fact:
    """One question with its accepted answers.

    `answers[0]` is the canonical answer (the one trained on); any alias counts as correct.
    `predictions` keeps the per-prompt greedy answers of the last categorisation, which the
    concentration and refusal measures read later, and `confidence` the mean probability the
    model gave its own greedy answer tokens over those prompts. `meta` carries any extra
    columns of the source (e.g. the knowledge-packing `is_para`) so that writing a fact back
    loses nothing.
    """

    id: str
    question: str
    answers: list[str]
    normalized_answers: list[str] = field(default_factory=list)
    category: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    relation: str | None = None
    subject: str | None = None
    p_greedy: float | None = None
    p_sampled: float | None = None
    predictions: list[str] = field(default_factory=list)
    confidence: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.normalized_answers:
            self.normalized_answers = [normalize_answer(a) for a in self.answers]

    @property
    def answer(self) -> str:
        """The canonical answer."""
        return self.answers[0]


def question_fact(question: str, answers: Sequence[str] = ()) -> Fact:
    """A fact for a question typed rather than read from a file (`ask "Where was X born?"`),
    with the id `load_facts` would give it, so the same question is the same fact either way."""
    if not question.strip():
        raise ValueError("the question is empty")
    return Fact(id=_stable_id(question), question=question, answers=list(answers))


def is_correct(output: str, fact: Fact) -> bool:
    """The paper's criterion: some normalised alias is a substring of the lower-cased output.

    The normalised output is searched too: an alias loses its punctuation when normalised, so
    "I don't know." (normalised "i dont know") would otherwise never match itself.
    """
    out, norm = fold_accents(output).lower(), normalize_answer(output)
    return any(alias and (alias in out or alias in norm) for alias in fact.normalized_answers)


def _words(text: str) -> str:
    """Accents folded, lower-cased, punctuation as spaces, articles dropped: the text as words."""
    text = "".join(" " if ch in _PUNCT else ch for ch in fold_accents(text).lower())
    return " ".join(_ARTICLES.sub(" ", text).split())


def is_correct_strict(output: str, fact: Fact) -> bool:
    """A stricter criterion reported beside the paper's: some alias occurs in the output as
    whole words ("Rabatel-El-Kabba" does not answer "Rabat"; "the city of Rabat." does)."""
    out = f" {_words(output)} "
    return any(alias and f" {alias} " in out for alias in map(_words, fact.answers))


MatchRule = Literal["substring", "word"]
MATCH_RULES: tuple[str, ...] = ("substring", "word")


def check_match_rule(rule: str, where: str = "match") -> None:
    """Refuse a matching rule that is not one of `MATCH_RULES`, naming the setting."""
    if rule not in MATCH_RULES:
        raise ValueError(f"{where}: unknown matching rule {rule!r}; choose from "
                         f"{', '.join(MATCH_RULES)}")


def answer_matches(output: str, fact: Fact, rule: str = "substring") -> bool:
    """Whether `output` answers `fact` under `rule`: "substring" is the paper's (`is_correct`),
    "word" whole words only (`is_correct_strict`), for fact files whose short answers or codes
    occur inside longer words."""
    return is_correct_strict(output, fact) if rule == "word" else is_correct(output, fact)


# a normalised answer this short occurs inside many unrelated words ("co" in "CO2", "ny" in
# "Kenya"): under the substring rule almost any output of some length contains it
SHORT_ANSWER = 3


@dataclass(frozen=True)
class AnswerProblem:
    """One fact whose answers the substring rule cannot judge cleanly (`answer_problems`)."""

    fact_id: str
    kind: Literal["short", "in question", "inside another answer", "never matches"]
    alias: str
    detail: str


def answer_problems(facts: Sequence[Fact], rule: str = "substring") -> list[AnswerProblem]:
    """Answers the matching `rule` counts as right where nothing was answered.

    Three kinds, each a way an output matches without giving the fact's answer, and a fourth
    that matches nothing (an answer that normalises to nothing, "A" or "-"): an answer or
    alias of at most `SHORT_ANSWER` characters (under the substring rule it occurs inside longer
    words); an alias found in the fact's own question or paraphrases (an echo of the question
    counts as right); an alias inside another fact's answer (a model that says the other fact's
    answer is counted right here: "euro" in "Europe", and under the word rule too "Mexico" in
    "New Mexico"). Strings are compared as the rule compares them. Equal answers of different
    facts are no problem; nor is one fact's alias inside its own other alias.
    """
    check_match_rule(rule)
    word = rule == "word"
    norm = _words if word else normalize_answer

    def pad(text: str) -> str:  # whole words only match at spaces
        return f" {text} " if word else text

    problems: list[AnswerProblem] = []
    owners: dict[str, set[str]] = {}
    for fact in facts:
        for alias in dict.fromkeys(norm(a) for a in fact.answers):
            if alias:
                owners.setdefault(alias, set()).add(fact.id)
    # every distinct answer once, between separators no answer holds: an answer found more
    # than once in the joined text sits inside another answer
    joined = "\x00".join(["", *map(pad, owners), ""])
    inside = {alias: [o for o in owners if o != alias and pad(alias) in pad(o)]
              for alias in owners if joined.count(pad(alias)) > 1}
    for fact in facts:
        for answer in fact.answers:
            if answer.strip() and not norm(answer):
                problems.append(AnswerProblem(fact.id, "never matches", answer,
                                              "nothing left once normalised"))
        asked = " \x00 ".join(pad(norm(q)) for q in (fact.question, *fact.paraphrases))
        for alias in dict.fromkeys(norm(a) for a in fact.answers):
            if not alias:
                continue
            if len(alias) <= SHORT_ANSWER and not word:
                problems.append(AnswerProblem(fact.id, "short", alias,
                                              f"{len(alias)} characters"))
            if pad(alias) in asked:
                problems.append(AnswerProblem(fact.id, "in question", alias,
                                              excerpt(fact.question)))
            # no false match where the longer answer is right too: this fact has it as well
            # ("Russia", "Russian Federation"), or every fact with it has this alias too
            # ("Goneinwick", "town of Goneinwick": one place)
            others = [o for o in inside.get(alias, ())
                      if fact.id not in owners[o] and owners[o] - owners[alias]]
            if others:
                holder = sorted(owners[others[0]] - owners[alias])[0]
                problems.append(AnswerProblem(
                    fact.id, "inside another answer", alias,
                    f"in {others[0]!r} (fact {holder})"
                    + (f" and {len(others) - 1} more" if len(others) > 1 else "")))
    return problems


def answer_problems_line(
    problems: Sequence[AnswerProblem], source: str, written: Path, rule: str = "substring"
) -> str:
    """The one-line warning about `answer_problems`: counts by kind, the file listing them."""
    facts = len({p.fact_id for p in problems})
    counts = sorted(Counter(p.kind for p in problems).items())
    kinds = ", ".join(f"{n} {kind}" for kind, n in counts)
    advice = "" if rule == "word" else "; consider --match word"
    return (f"{source}: {facts} facts have answers the {rule} rule cannot judge cleanly "
            f"({kinds}; answers of <= {SHORT_ANSWER} characters, aliases in their own question "
            f"or inside another fact's answer, answers that normalise to nothing), listed in "
            f"{written}{advice} "
            "(docs/usage.md#fact-files)")


def write_answer_problems(problems: Sequence[AnswerProblem], path: str | Path) -> Path:
    """The problems as JSONL (one object per problem), atomically."""
    return _write_jsonl((asdict(p) for p in problems), path)


def _write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Rows as JSONL, atomically: a crash never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


class FactFileError(ValueError):
    """A fact source that cannot be read as facts; the message names file, line/row and field."""

    def __init__(
        self, source: str | Path, line: int | None, field_name: str | None, problem: str
    ) -> None:
        self.source = str(source)
        self.line = line
        self.field = field_name
        where = self.source
        if line is not None:
            unit = "line" if _is_jsonl(self.source) else "row"
            where += f", {unit} {line}"
        if field_name is not None:
            where += f", field {field_name!r}"
        super().__init__(f"{where}: {problem}")


class EmptyAnswersError(FactFileError):
    """A fact with no non-blank answer (droppable with `on_empty="drop"`)."""


def _is_jsonl(source: str) -> bool:
    return not source.startswith(HF_PREFIX) and not source.endswith(".parquet") and not (
        Path(source).is_dir()
    )


# ----------------------------------------------------------------------------- reading rows

_FACT_FIELDS = {f.name for f in fields(Fact)}
# Knowledge-packing columns we map onto Fact fields; anything else lands in `meta`.
_KP_COLUMNS = {"question", "answer", "Category", "para"}


def _decode_line(path: Path, lineno: int, raw: bytes) -> str:
    """One line as UTF-8 (a byte-order mark on the first line is allowed), else an error naming
    the line and the first bad byte: a whole-file decode would only report a byte offset."""
    try:
        return raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise FactFileError(
            path, lineno, None, f"not UTF-8: byte 0x{raw[exc.start]:02x} at byte {exc.start + 1} "
            "of the line (Latin-1 or another legacy encoding?); save the file as UTF-8"
        ) from None


def _iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = _decode_line(path, lineno, raw)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FactFileError(
                    path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(row, dict):
                raise FactFileError(
                    path, lineno, None, f"expected a JSON object, got {type(row).__name__}"
                )
            yield lineno, row


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise FactFileError(path, None, None, f"not a readable Parquet file ({exc})") from exc
    yield from enumerate(table.to_pylist(), start=1)


def _iter_arrow_folder(path: Path, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a `datasets.Dataset.save_to_disk` folder, read with pyarrow alone.

    The folder holds Arrow IPC stream files listed in `state.json`; reading them directly keeps
    `datasets` (a heavy optional dependency) out of the offline path.
    """
    import pyarrow as pa

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        if split is None:
            if len(splits) != 1:
                raise FactFileError(
                    path, None, None, f"a DatasetDict with splits {splits}: name one as "
                    f"'{path}:<split>'"
                )
            split = splits[0]
        if split not in splits:
            raise FactFileError(path, None, None, f"no split {excerpt(split)}; splits are {splits}")
        path = path / split
    state_file = path / "state.json"
    if not state_file.exists():
        raise FactFileError(
            path, None, None, "a folder must be a datasets.save_to_disk folder (no state.json)"
        )
    state = json.loads(state_file.read_text())
    row = 0
    for entry in state.get("_data_files", []):
        arrow_path = path / entry["filename"]
        with pa.memory_map(str(arrow_path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
            table = reader.read_all()
        for record in table.to_pylist():
            row += 1
            yield row, record


def _iter_hub(name: str, split: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a hub dataset; without a split, its only split (the s-nlp sets have just "full")."""
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"reading {HF_PREFIX}{name} needs the `datasets` package: "
            "pip install 'lora-lightning[datasets]' (or save the data to a JSONL/Parquet file)"
        ) from None
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise RuntimeError(
            f"could not load {HF_PREFIX}{name} (split {split!r}) from the Hugging Face hub: {exc}."
            " Offline machines must use a local JSONL/Parquet/save_to_disk copy."
        ) from exc
    if split is None:
        splits = list(dataset)
        if len(splits) != 1:
            raise ValueError(
                f"{HF_PREFIX}{name} has splits {splits}: name one as {HF_PREFIX}{name}:<split>"
            )
        dataset = dataset[splits[0]]
    yield from enumerate(dataset, start=1)


# ------------------------------------------------------------------------ rows to facts


def _check_str_list(value: Any, src: str, line: int, name: str, allow_empty: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FactFileError(src, line, name, f"expected a list of strings, got {excerpt(value)}")
    if not allow_empty and not [v for v in value if v.strip()]:
        raise EmptyAnswersError(src, line, name, "is empty: a fact needs at least one answer")
    return list(value)


def _check_category(value: Any, src: str, line: int, name: str) -> str | None:
    if value is None:
        return None
    if value not in CATEGORIES:
        raise FactFileError(
            src, line, name, f"unknown category {excerpt(value)}; expected {CATEGORIES}"
        )
    return value


def _stable_id(question: str) -> str:
    """An id derived from the question alone, so it survives re-ordering and sub-setting."""
    return "q" + hashlib.sha1(normalize_answer(question).encode()).hexdigest()[:12]


def _kp_answer(value: Any, src: str, line: int) -> tuple[list[str], list[str]]:
    """Aliases from the knowledge-packing `answer` cell (a dict, or a list of one dict)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value = value[0]
    if isinstance(value, str):
        return [value], []
    if not isinstance(value, dict):
        raise FactFileError(
            src, line, "answer", "expected {'aliases': [...], 'normalized_aliases': [...]} "
            f"(or a list holding one such dict), got {excerpt(value)}"
        )
    if "aliases" not in value:
        raise FactFileError(src, line, "answer.aliases", "missing")
    aliases = _check_str_list(value["aliases"], src, line, "answer.aliases", allow_empty=False)
    normalized = value.get("normalized_aliases") or []
    normalized = _check_str_list(
        normalized, src, line, "answer.normalized_aliases", allow_empty=True
    )
    canonical = value.get("value")  # TriviaQA's canonical answer, when the cell has it
    if isinstance(canonical, str) and canonical.strip():
        aliases = [canonical] + [a for a in aliases if a != canonical]
        if normalized and normalize_answer(canonical) not in normalized:
            normalized = [normalize_answer(canonical), *normalized]
    return aliases, normalized


def _row_to_fact(
    row: dict[str, Any], src: str, line: int, answers_required: bool = True
) -> Fact:
    """One fact from either our flat shape (`answers`) or the knowledge-packing one (`answer`);
    with `answers_required=False` a row may have no answer (`answers` missing or empty)."""
    if not answers_required and "answers" not in row and "answer" not in row:
        row = {**row, "answers": []}
    question = row.get("question")
    if question is None:
        raise FactFileError(src, line, "question", "missing")
    if not isinstance(question, str) or not question.strip():
        raise FactFileError(
            src, line, "question", f"expected a non-empty string, got {excerpt(question)}"
        )

    if "answers" in row:  # our flat shape: the Fact fields themselves
        unknown = sorted(set(row) - _FACT_FIELDS - {"Category"})
        if not isinstance(row.get("meta") or {}, dict):
            raise FactFileError(
                src, line, "meta", f"expected an object, got {excerpt(row['meta'])}"
            )
        meta = dict(row.get("meta") or {})
        meta.update({k: row[k] for k in unknown})
        answers = _check_str_list(
            row["answers"], src, line, "answers", allow_empty=not answers_required
        )
        normalized = _check_str_list(
            row.get("normalized_answers") or [], src, line, "normalized_answers", allow_empty=True
        )
        category = _check_category(row.get("category", row.get("Category")), src, line, "category")
        paraphrases = _check_str_list(
            row.get("paraphrases") or [], src, line, "paraphrases", allow_empty=True
        )
        predictions = _check_str_list(
            row.get("predictions") or [], src, line, "predictions", allow_empty=True
        )
        values: dict[str, Any] = {}
        for name in ("relation", "subject"):
            value = row.get(name)
            if value is not None and not isinstance(value, str):
                raise FactFileError(src, line, name, f"expected a string, got {excerpt(value)}")
            values[name] = value
        for name in ("p_greedy", "p_sampled", "confidence"):
            value = row.get(name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise FactFileError(src, line, name, f"expected a number, got {excerpt(value)}")
            values[name] = None if value is None else float(value)
        fact_id = row.get("id")
        if fact_id is not None and not isinstance(fact_id, str | int):
            raise FactFileError(src, line, "id", f"expected a string, got {excerpt(fact_id)}")
        return Fact(
            id=_stable_id(question) if fact_id is None else str(fact_id),
            question=question,
            answers=answers,
            normalized_answers=normalized,
            category=category,
            paraphrases=paraphrases,
            predictions=predictions,
            meta=meta,
            **values,
        )

    if "answer" not in row:
        raise FactFileError(
            src, line, "answers", "missing (expected 'answers' or the knowledge-packing 'answer')"
        )
    aliases, normalized = _kp_answer(row["answer"], src, line)
    paraphrases = _check_str_list(row.get("para") or [], src, line, "para", allow_empty=True)
    category = _check_category(row.get("Category", row.get("category")), src, line, "Category")
    meta = {k: v for k, v in row.items() if k not in _KP_COLUMNS and k != "category"}
    fact_id = meta.pop("id", None)
    return Fact(
        id=_stable_id(question) if fact_id is None else str(fact_id),
        question=question,
        answers=aliases,
        normalized_answers=normalized,
        category=category,
        paraphrases=paraphrases,
        meta=meta,
    )


def _rows(source: str | Path) -> tuple[str, Iterable[tuple[int, dict[str, Any]]]]:
    """Dispatch on the source: `hf:name[:split]`, a save_to_disk folder, Parquet, else JSONL."""
    text = str(source)
    if text.startswith(HF_PREFIX):
        name, _, hub_split = text[len(HF_PREFIX) :].partition(":")
        if not name:
            raise ValueError(f"{text!r}: expected {HF_PREFIX}<dataset name>[:<split>]")
        return text, _iter_hub(name, hub_split or None)
    path = Path(text)
    split = None
    if not path.exists() and ":" in path.name:  # folder:split of a DatasetDict
        name, _, split = path.name.rpartition(":")
        path = path.with_name(name)
    if not path.exists():
        raise FileNotFoundError(f"fact source {text!r} does not exist")
    if path.is_dir():
        return str(path), _iter_arrow_folder(path, split)
    if path.suffix == ".parquet":
        return str(path), _iter_parquet(path)
    return str(path), _iter_jsonl(path)


def load_facts(
    source: str | Path,
    *,
    on_duplicate: OnProblem = "drop",
    on_empty: OnProblem = "error",
    limit: TextLimit | None = None,
    answers_required: bool = True,
) -> list[Fact]:
    """Read facts from any supported source, in file order.

    Sources: our flat JSONL (the `Fact` fields; `question` and `answers` required), the
    knowledge-packing datasets' shape (`question`, `answer` = `{"aliases", "normalized_aliases"}`
    or a one-element list of it, `Category`, `para`, ...) as JSONL, Parquet or a
    `datasets.save_to_disk` folder (`folder:split` for a DatasetDict), and `hf:<name>[:split]`
    from the hub when online. Rows without an `id` get one derived from the question.

    Two facts with the same normalised question cannot both be trained and evaluated cleanly, so
    duplicates are dropped, keeping the first, with a warning listing their ids
    (`on_duplicate="drop"`, the default: one repeated question in a large scraped dataset should
    not stop a run) or raise (`"error"`). A fact with no non-blank answer is malformed and raises
    by default; `on_empty="drop"` drops it with a warning instead. A source with no facts at
    all is an error too (an empty file would otherwise "succeed" with nothing to do), and with
    `limit` a question, answer or paraphrase longer than the model can take is refused on its
    line, before anything tokenizes it whole.

    `answers_required=False` reads questions to ask rather than facts to train on: a row
    without `answers` (or with an empty list) becomes a fact with no answers, which no output
    matches; everything else is checked as usual.
    """
    for name, value in (("on_duplicate", on_duplicate), ("on_empty", on_empty)):
        if value not in ("error", "drop"):
            raise ValueError(f"{name} must be 'error' or 'drop', got {value!r}")
    src, rows = _rows(source)
    facts: list[Fact] = []
    seen_questions: dict[str, tuple[int, str]] = {}
    seen_ids: dict[str, int] = {}
    duplicates: list[str] = []
    empties: list[str] = []
    for line, row in rows:
        try:
            fact = _row_to_fact(row, src, line, answers_required)
        except EmptyAnswersError:
            if on_empty == "error":
                raise
            empties.append(str(row.get("id", f"#{line}")))
            continue
        if limit is not None:
            _check_lengths(fact, limit, src, line, flat="answers" in row)
        key = normalize_answer(fact.question)
        if key in seen_questions:
            first_line, first_id = seen_questions[key]
            if on_duplicate == "error":
                raise FactFileError(
                    src, line, "question", f"duplicate of {excerpt(first_id)} (line/row "
                    f"{first_line}): {excerpt(fact.question)}; pass on_duplicate='drop' to keep "
                    "only the first"
                )
            duplicates.append(fact.id)
            continue
        if fact.id in seen_ids:
            raise FactFileError(
                src, line, "id",
                f"id {excerpt(fact.id)} already used at line/row {seen_ids[fact.id]}",
            )
        seen_questions[key] = (line, fact.id)
        seen_ids[fact.id] = line
        facts.append(fact)
    if duplicates:
        log.warning(
            "%s: dropped %d facts whose question duplicates an earlier one: %s",
            src, len(duplicates), _preview(duplicates),
        )
    if empties:
        log.warning(
            "%s: dropped %d facts with no answer: %s", src, len(empties), _preview(empties)
        )
    if not facts:
        problem = (
            f"no facts left after dropping {len(empties)} without an answer" if empties
            else "is empty: no facts in it (expected one JSON object per line, or a table "
            "with a 'question' column)"
        )
        raise FactFileError(src, None, None, problem)
    return facts


def _check_lengths(fact: Fact, limit: TextLimit, src: str, line: int, flat: bool) -> None:
    answers, paraphrases = ("answers", "paraphrases") if flat else ("answer.aliases", "para")
    texts = [("question", fact.question), *((answers, a) for a in fact.answers),
             *((paraphrases, q) for q in fact.paraphrases)]
    for name, text in texts:
        if (problem := limit.problem(text)) is not None:
            raise FactFileError(src, line, name, problem)


def _preview(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(excerpt(i, 40) if len(i) > 40 else i for i in ids[:limit])
    return shown + (f", ... (+{len(ids) - limit} more)" if len(ids) > limit else "")


def fact_to_row(fact: Fact) -> dict[str, Any]:
    """Our flat JSONL row for a fact (every field, so that reading it back is exact)."""
    return asdict(fact)


def save_facts(facts: Iterable[Fact], path: str | Path) -> Path:
    """Write facts as our flat JSONL, atomically: a crash never leaves a half-written file."""
    return _write_jsonl(map(fact_to_row, facts), path)


def pool_sidecar(facts_path: str | Path) -> Path:
    """`<stem>.pool.jsonl` beside a categorised fact file: where `categorize` keeps the few-shot
    pool it used, so that probing after training (and `fit`) reuses exactly the same shots."""
    path = Path(facts_path)
    return path.with_name(f"{path.stem}.pool.jsonl")
