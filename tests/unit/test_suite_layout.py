"""The test suite's own layout: test modules share code through tests/support, never by
importing one another (or a conftest, which pytest loads itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(TESTS.parent).with_suffix("").parts)


def _is_library_only(module: str) -> bool:
    """Whether a module is one that must not be imported: a test module or a conftest."""
    last = module.rsplit(".", 1)[-1]
    return last.startswith("test_") or last == "conftest"


def forbidden_imports(source: str, module: str) -> list[str]:
    """The test modules and conftests that ``source`` (the module named ``module``) imports."""
    package = module.rsplit(".", 1)[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_library_only(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if _is_library_only(target):
                found.append(target)
            else:  # `from tests.e2e import test_x`
                found += [
                    f"{target}.{alias.name}" for alias in node.names if _is_library_only(alias.name)
                ]
    return found


def test_no_test_module_imports_another_or_a_conftest() -> None:
    paths = sorted(TESTS.rglob("test_*.py"))
    assert len(paths) > 40  # the scan sees the whole suite

    offenders = {
        str(path.relative_to(TESTS.parent)): found
        for path in paths
        if (found := forbidden_imports(path.read_text(), _module_name(path)))
    }

    assert offenders == {}, "move what they share into tests/support"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from .test_core_loop import WAIT_S", ["tests.e2e.test_core_loop"]),
        ("from tests.e2e.test_cli import promptq", ["tests.e2e.test_cli"]),
        ("from .conftest import CANARY_KEY", ["tests.e2e.conftest"]),
        ("from ..e2e.conftest import worker_env", ["tests.e2e.conftest"]),
        ("from . import test_cli", ["tests.e2e.test_cli"]),
        ("from tests.e2e import conftest", ["tests.e2e.conftest"]),
        ("import tests.e2e.test_cli", ["tests.e2e.test_cli"]),
        ("from tests.support.waiting import wait_until", []),
        ("from api_client import Client\nimport pytest", []),
    ],
)
def test_the_scan_finds_each_form_of_import(source: str, expected: list[str]) -> None:
    assert forbidden_imports(source, "tests.e2e.test_example") == expected
