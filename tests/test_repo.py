"""The repository keeps its promises about how it is installed and tested."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick, flags=re.S)


def test_quick_start_has_exactly_two_commands_installing_pinned_torch_first():
    commands = _readme_commands()
    assert len(commands) == 2
    for command in commands:
        assert "\n" not in command.strip()
        assert command.startswith("pip install torch==2.13.0 && ")


def test_ci_runs_the_readme_test_command():
    main_job, test_command = _readme_commands()
    assert "python -m lora_lightning fit" in main_job
    # the type checker runs beside the linter, before the tests (configured in pyproject.toml)
    assert " && ruff check . && mypy && python -m pytest" in test_command
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def _module_name(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _imports_of(root: Path, path: Path, package: str) -> set[str]:
    """Every `package` module that importing this file runs, at module level or inside a
    function.

    Importing `pkg.sub.mod` runs `pkg/__init__` and `pkg/sub/__init__` first, so those count
    too, except the packages this module is itself inside (they are already running when it
    is imported). A package's `__init__` imports what it re-exports, like any other module.
    """
    import ast

    module = _module_name(root, path)
    own_packages = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    if path.name == "__init__.py":
        own_packages.add(module)
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                parent = module.split(".")
                parent = parent[: len(parent) - node.level + (path.name == "__init__.py")]
                base = ".".join([*parent, base] if base else parent)
            # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        named |= {n for n in names if n == package or n.startswith(package + ".")}
    found = set()
    for name in named:
        parts = name.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return found - own_packages


def _module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules importing it runs (files only, itself left out)."""
    files = {_module_name(root, p): p for p in (root / package).rglob("*.py")}
    return {
        name: {m for m in _imports_of(root, path, package) if m in files and m != name}
        for name, path in files.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports, or None. Every edge counts, a package's `__init__` importing its
    own submodules included: a module that imports `pkg.x` runs all of `pkg/__init__`."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = _module_graph(ROOT, "lora_lightning")
    assert {"lora_lightning.lora.layer", "lora_lightning.world.cache"} <= set(graph)
    assert "lora_lightning.knowledge" in graph["lora_lightning.world.cache"]  # imports are seen
    assert "lora_lightning.world.cache" in graph["lora_lightning.world"]  # re-exports too
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from cyclic.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from cyclic.b import g\n")
    (pkg / "b.py").write_text("from cyclic import a\n\ndef g():\n    pass\n")
    assert _find_cycle(_module_graph(tmp_path, "cyclic")) == ["cyclic.a", "cyclic.b", "cyclic.a"]


def test_the_cycle_check_finds_a_cycle_through_a_package_that_re_exports(tmp_path):
    """The shape of the circle issue 37 found: `knowledge -> models -> world` (whose
    `__init__` re-exports `world.cache`) `-> world.cache -> knowledge`."""
    pkg = tmp_path / "house"
    (pkg / "world").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "knowledge.py").write_text("def f():\n    from house.models import g\n")
    (pkg / "models.py").write_text("from house.world.config import C\n")
    (pkg / "world" / "__init__.py").write_text("from house.world.cache import build\n")
    (pkg / "world" / "config.py").write_text("C = 1\n")
    (pkg / "world" / "cache.py").write_text("from house.knowledge import f\n")
    cycle = _find_cycle(_module_graph(tmp_path, "house"))
    assert cycle is not None and {"house.world", "house.world.cache"} <= set(cycle)
    # a sibling import inside a package is no cycle: the package is already running
    (pkg / "knowledge.py").write_text("")
    assert _find_cycle(_module_graph(tmp_path, "house")) is None


def _private_imports(root: Path, package: str) -> list[str]:
    """`from m import _name` across modules of `package`: a private name used outside its
    module (dunder names such as `__version__` are public)."""
    import ast

    found = []
    for path in sorted((root / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package):
                found += [f"{path.relative_to(root)}: from {node.module} import {alias.name}"
                          for alias in node.names
                          if alias.name.startswith("_") and not alias.name.endswith("__")]
    return found


def test_no_module_imports_a_private_name_of_another():
    offenders = _private_imports(ROOT, "lora_lightning")
    assert not offenders, "\n".join(offenders)


def test_the_private_import_check_sees_one(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("def _helper():\n    pass\n")
    (tmp_path / "pkg" / "b.py").write_text("def g():\n    from pkg.a import _helper\n")
    assert _private_imports(tmp_path, "pkg") == ["pkg/b.py: from pkg.a import _helper"]


def test_loading_a_model_imports_no_world_builder_knowledge_or_evaluation(tmp_path):
    """`models` is what every command loads a model through: a Hugging Face model must not
    pull in the world's builder (and through it SliCK and the benchmarks)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import lora_lightning.models\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('lora_lightning.world',"
        " 'lora_lightning.knowledge', 'lora_lightning.evaluation')))\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    assert out.stdout.strip() == "[]"


def test_the_library_never_imports_the_command_layer():
    """Data flows one way: the commands use the library (sweep and capacity machinery
    included), never the reverse; only `__main__` dispatches to them."""
    import ast

    package = ROOT / "lora_lightning"
    offenders = []
    for path in sorted(package.rglob("*.py")):
        if path.parent.name == "commands" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {name}" for name in names
                          if name.startswith("lora_lightning.commands")]
    assert not offenders
