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
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def _imports_of(root: Path, path: Path, package: str) -> set[str]:
    """Every `package` module a file imports, at module level or inside a function."""
    import ast

    module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    found = set()
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
        found |= {n for n in names if n == package or n.startswith(package + ".")}
    return found


def _module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (files only, the module itself left out)."""
    files = {
        ".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (root / package).rglob("*.py")
    }
    return {
        name: {m for m in _imports_of(root, path, package) if m in files and m != name}
        for name, path in files.items()
    }


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of imports, or None. A package's `__init__` re-exporting its own submodules
    (`pkg` -> `pkg.sub`) is how Python packages work, not a cycle, so that edge is skipped."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue
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
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "cyclic"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from cyclic.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from cyclic.b import g\n")
    (pkg / "b.py").write_text("from cyclic import a\n\ndef g():\n    pass\n")
    assert _find_cycle(_module_graph(tmp_path, "cyclic")) == ["cyclic.a", "cyclic.b", "cyclic.a"]


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
