"""The worker's import graph, read from the source: no cycle, and each package imports only the
packages beneath it (the layers worker/__init__.py draws)."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKER = Path(__file__).resolve().parents[2] / "worker"

# What each of worker's packages may import of worker's own; "" is the top level (settings,
# errors). The entry point (worker/__main__.py) is left out: it only starts the CLI.
ALLOWED: dict[str, set[str]] = {
    "": set(),
    "fake_provider": set(),
    "fleet": {""},
    "llm": {""},
    "ops": {"", "fleet"},
    "attempt": {"", "fleet", "llm", "ops"},
    "app": {"", "attempt", "fleet", "llm", "ops"},
    "batch": {""},
    "cli": {"", "app", "batch", "fake_provider", "ops"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in WORKER.rglob("*.py"):
        parts = path.relative_to(WORKER.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "worker.__main__":
            found[name] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """Every worker module ``name`` imports, wherever the import stands (TYPE_CHECKING and
    function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parents, *([node.module] if node.module else [])])
            for target in (base, *(f"{base}.{alias.name}" for alias in node.names)):
                if target in modules and target != name:
                    yield target
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in modules)


def _package_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (WORKER / parts[1]).is_dir()) else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: set(_imports(name, path, modules)) for name, path in modules.items()}


def test_the_probe_sees_imports(graph: dict[str, set[str]]) -> None:
    # A control: the graph is not empty, and it sees a known edge of each kind.
    assert "worker.fleet.store" in graph["worker.attempt.run"]  # module level
    assert "worker.attempt.runtime" in graph["worker.attempt.run"]  # under TYPE_CHECKING
    assert "worker.cli.supervisor" in graph["worker.cli.worker_command"]  # in a function


def test_no_worker_module_imports_itself_back(graph: dict[str, set[str]]) -> None:
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_each_package_imports_only_the_layers_beneath_it(graph: dict[str, set[str]]) -> None:
    wrong = sorted(
        f"{module} imports {imported}"
        for module, imports in graph.items()
        for imported in imports
        if (package := _package_of(module)) != (target := _package_of(imported))
        and target not in ALLOWED[package]
    )
    assert not wrong, wrong
    assert set(ALLOWED) == {_package_of(module) for module in graph}


def test_every_package_is_installed() -> None:
    # setuptools lists the packages by hand: one left out installs without its modules.
    with (WORKER.parent / "pyproject.toml").open("rb") as file:
        listed = set(tomllib.load(file)["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(WORKER.parent).parts)
        for top in ("worker", "api_client")
        for init in (WORKER.parent / top).rglob("__init__.py")
    }
    assert listed == found
