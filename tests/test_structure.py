"""The package's shape: no import cycle among cllm's modules (function-level imports included),
spec.py and the CLI's parser free of torch, no source file over the size a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).parent.parent / "src" / "cllm"
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The cllm modules a file imports anywhere in it (a `from package import name` counts the
    submodule `name` when there is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in SOURCE.rglob("*.py")}
    graph = {name: imported_modules(path, set(files)) for name, path in files.items()}
    for name in graph:  # a package's __init__ runs before its submodules, but re-exports are not edges back
        graph[name] = {other for other in graph[name] if not name.startswith(other + ".") and other != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_cllm_modules():
    graph = import_graph()
    assert "cllm.metrics" in graph["cllm.fidelity"] and "cllm.fidelity" in graph["cllm.bench"]
    assert find_cycle(graph) is None


def test_spec_and_the_cli_parser_import_without_torch():
    code = ("import sys; import cllm.decoding.spec; from cllm.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_source_file_grows_past_the_limit():
    sizes = {str(path.relative_to(SOURCE)): len(path.read_text().splitlines()) for path in SOURCE.rglob("*.py")}
    too_long = {name: size for name, size in sizes.items() if size > MAX_LINES}
    assert not too_long


def test_ruff_import_order_and_line_length():
    root = SOURCE.parent.parent  # line length: 120, pyproject.toml
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "I,E501", "src", "tests", "scripts"],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
