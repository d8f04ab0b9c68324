"""The README and docs/ cannot drift from the code: every command in their ```bash blocks is
checked against the command line it names, and the README stays short enough to read.

A `python -m lora_lightning` line goes through the real dispatch (`lora_lightning.__main__`)
with the last step replaced: the LightningCLI commands (`fit`, `test`, ...) parse their
arguments and stop before building anything, the function commands (`ask`, `sweep`, ...)
parse theirs and return without running; `sweep`/`capacity` with `--dry_run` dry-run for
real. A file a line names that a fresh clone does not have (a run's `config.yaml`, a user's
facts) is still checked for its flags: a missing `--config` of a training command is read as
the embedded default's (`configs/default.yaml`), every other path is only a string to the
parser. A benchmark script must exist and know every flag given to it.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonargparse import auto_cli, auto_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# programs a doc may run that are not ours to check (installing and the test command)
NOT_OURS = ("pip", "ruff", "mypy", "jq")
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
DEFAULT_CONFIG = "configs/default.yaml"
SHELL_FENCES = ("```bash", "```sh", "```shell")


def bash_commands(text: str) -> Iterator[tuple[int, str]]:
    """(line number, command) for every command in the text's shell blocks: continuation
    lines joined, comments and blank lines dropped."""
    in_block, pending, start = False, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_block = not in_block and stripped in SHELL_FENCES
            continue
        if not in_block:
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command, pending = (pending + stripped).strip(), ""
        if command and not command.startswith("#"):
            yield start, command


def simple_commands(command: str) -> list[list[str]]:
    """The words of each simple command in a shell line (split at `&&`, `||`, `;`, `|`),
    redirections and leading `VAR=value` assignments left out."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    words = list(lexer)
    i = 0
    while i < len(words):
        word = words[i]
        if word in ("&&", "||", ";", "|"):
            commands.append([])
        elif word in (">", ">>", "<"):
            i += 1  # the file redirected to or from
        elif commands[-1] or not ASSIGNMENT.match(word):
            commands[-1].append(word)
        i += 1
    return [words for words in commands if words]


def doc_commands() -> list[Any]:
    """Every distinct simple command of the docs, as a pytest param named by the file and line
    it first appears on."""
    params, seen = [], set()
    for doc in DOCS:
        for number, line in bash_commands(doc.read_text()):
            for words in simple_commands(line):
                if tuple(words) in seen:
                    continue
                seen.add(tuple(words))
                where = f"{doc.relative_to(ROOT)}:{number}"
                params.append(pytest.param(words, id=f"{where} {' '.join(words[:4])}"))
    return params


class _Parsed(Exception):
    """Raised where a command would start its work: the command line parsed."""


def _training_parse_only(monkeypatch: pytest.MonkeyPatch) -> Callable[[list[str]], None]:
    """`run_training_cli` that stops once LightningCLI has parsed (and checked) the arguments,
    before any checkpoint, folder or model is touched."""
    from lora_lightning import cli

    def stop(self: Any) -> None:
        raise _Parsed

    monkeypatch.setattr(cli.KnowledgeCLI, "_set_seed", lambda self: None)
    monkeypatch.setattr(cli.KnowledgeCLI, "before_instantiate_classes", stop)

    def run(args: list[str] | None = None, run: bool = True) -> None:
        args = list(args or [])
        for i, arg in enumerate(args[:-1]):
            if arg == "--config" and not (ROOT / args[i + 1]).exists():
                args[i + 1] = str(ROOT / DEFAULT_CONFIG)  # a run's config.yaml, say
        with contextlib.suppress(_Parsed):
            cli.run_training_cli(args, run=run)

    return run


def _function_parse_only(component: Callable[..., Any], args: list[str], **kwargs: Any) -> Any:
    """`auto_cli` that parses the command line exactly as the command does, then returns
    without calling the command; a dry run runs for real."""
    parsed = auto_parser(component, **kwargs).parse_args(args)
    if parsed.get("dry_run"):
        return auto_cli(component, args=args, **kwargs)
    return None


def check_lora_lightning(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> str:
    """Run `python -m lora_lightning <argv>` up to its parsed arguments and return what it
    printed; an AssertionError with the parser's message when the arguments are wrong."""
    import jsonargparse

    from lora_lightning import __main__ as entry

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["python -m lora_lightning"])
    monkeypatch.setattr(entry, "run_training_cli", _training_parse_only(monkeypatch))
    monkeypatch.setattr(jsonargparse, "auto_cli", _function_parse_only)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            entry._main(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise AssertionError(f"exit {stop.code}:\n{out.getvalue()}") from None
    return out.getvalue()


def script_flags(script: Path) -> set[str]:
    """The option strings a script's argparse parser defines (read from its source)."""
    flags = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            flags |= {
                arg.value
                for arg in node.args
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")
            }
    return flags | {"-h", "--help"}


def check_command(words: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """One simple command of a doc: ours must parse, a script must exist and know its flags."""
    program, *args = words
    if program in NOT_OURS or words[:3] == ["python", "-m", "pytest"]:
        return
    if words[:3] == ["python", "-m", "lora_lightning"]:
        check_lora_lightning(args[2:], monkeypatch)
        return
    if program == "bash" and args and args[0].endswith(".sh"):
        assert (ROOT / args[0]).is_file(), f"no script {args[0]}"
        return
    if program == "python" and args and args[0].endswith(".py"):
        script = ROOT / args[0]
        assert script.is_file(), f"no script {args[0]}"
        given = {arg.split("=", 1)[0] for arg in args[1:] if arg.startswith("-")}
        unknown = given - script_flags(script)
        assert not unknown, f"{args[0]} has no {sorted(unknown)}"
        return
    raise AssertionError(f"a doc runs {program!r}, which this test does not know how to check")


@pytest.mark.slow
@pytest.mark.parametrize("words", doc_commands())
def test_every_documented_command_parses(words: list[str], monkeypatch: pytest.MonkeyPatch):
    check_command(words, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("python -m lora_lightning fit --model.no_such_setting 3", "no_such_setting"),
        (
            "python -m lora_lightning test --config runs/default/config.yaml --no_such_flag 1",
            "no_such_flag",
        ),
        (
            "python -m lora_lightning ask --model world --no_such_flag 1 'Where was X born?'",
            "no_such_flag",
        ),
        (
            "python -m lora_lightning sweep --config configs/sweeps/world.yaml --no_such_flag 2",
            "no_such_flag",
        ),
        ("python -m lora_lightning aggregate", "sweep_dir"),  # its sweep folder is required
        ("python -m lora_lightning fit --trainer.max_epochs many", "max_epochs"),
        ("python benchmarks/bench_lora.py --no-such-flag 1", "has no ['--no-such-flag']"),
        ("python benchmarks/no_such_bench.py --out x.json", "no script"),
        ("bash benchmarks/no_such_check.sh", "no script"),
        ("curl https://example.com", "does not know how to check"),
    ],
)
def test_a_command_the_code_does_not_have_fails(
    line: str, error: str, monkeypatch: pytest.MonkeyPatch
):
    with pytest.raises(AssertionError, match=re.escape(error)):
        for words in simple_commands(line):
            check_command(words, monkeypatch)


def test_the_doc_commands_are_read_as_a_shell_reads_them():
    text = "\n".join(
        [
            "```bash",
            "# a comment",
            "MLFLOW_ALLOW_FILE_STORE=true python -m lora_lightning fit \\",
            "    --trainer.logger MLFlowLogger  # why",
            "cell=runs/x",
            "jq -c . $cell/a.jsonl > trained.jsonl",
            'pip install -e . && python -m lora_lightning ask "Where was X born?"',
            "```",
            "```yaml",
            "task: not a command",
            "```",
        ]
    )
    found = [(n, simple_commands(c)) for n, c in bash_commands(text)]
    assert found == [
        (3, [["python", "-m", "lora_lightning", "fit", "--trainer.logger", "MLFlowLogger"]]),
        (5, []),
        (6, [["jq", "-c", ".", "$cell/a.jsonl"]]),
        (
            7,
            [
                ["pip", "install", "-e", "."],
                ["python", "-m", "lora_lightning", "ask", "Where was X born?"],
            ],
        ),
    ]


def test_the_docs_check_commands_at_all():
    commands = [param.values[0] for param in doc_commands()]
    ours = {words[3] for words in commands if words[:3] == ["python", "-m", "lora_lightning"]}
    assert {"fit", "test", "ask", "categorize", "sweep", "capacity", "aggregate"} <= ours


def test_nothing_shipped_points_at_the_ci_private_folder():
    """`../shared` is our CI's data folder; a user has none."""
    offenders = [
        f"{doc.relative_to(ROOT)}:{number}"
        for doc in DOCS
        for number, line in enumerate(doc.read_text().splitlines(), 1)
        if "../shared" in line
    ]
    assert not offenders


def test_the_readme_fits_on_a_few_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= 150
    # the quick start's two commands are one line each, whole (tests/test_repo.py)
    long = [line for line in lines if len(line) > 100]
    assert all(line.startswith("pip install torch==2.13.0 && ") for line in long), long
    assert len(long) <= 2


def test_every_relative_link_in_the_docs_resolves():
    broken = [
        f"{doc.relative_to(ROOT)}: {target}"
        for doc in DOCS
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
        if not re.match(r"[a-z]+:", target)
        and target.split("#")[0]
        and not (doc.parent / target.split("#")[0]).exists()
    ]
    assert not broken


def test_the_readmes_fact_file_example_writes_facts_that_load(tmp_path, monkeypatch):
    """The README's ten lines that build a fact file from a user's own data run as written, and
    what they write is read as facts, the answers clean under the paper's matching rule."""
    from lora_lightning.facts import answer_problems, load_facts

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    (example,) = [b for b in blocks if ".jsonl" in b]
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    (written,) = tmp_path.glob("*.jsonl")
    facts = load_facts(written)
    assert len(facts) >= 2 and all(f.answers and f.relation for f in facts)
    assert not answer_problems(facts)
