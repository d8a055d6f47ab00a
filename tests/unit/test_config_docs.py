"""Every worker setting is documented: in config.example.toml and in the README's table."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from worker.settings import LLMSettings, QueueSettings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = REPO_ROOT / "config.example.toml"
SETTINGS = [("llm", "LLM_", name) for name in LLMSettings.model_fields] + [
    ("promptq", "PROMPTQ_", name) for name in QueueSettings.model_fields
]


@pytest.mark.parametrize(("table", "prefix", "name"), SETTINGS)
def test_the_example_file_names_every_setting(table: str, prefix: str, name: str) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")

    assert re.search(rf"^#? ?{name} = ", text, flags=re.MULTILINE), name
    assert f"{prefix}{name.upper()}" in text


@pytest.mark.parametrize(("table", "prefix", "name"), SETTINGS)
def test_the_readme_table_names_every_setting(table: str, prefix: str, name: str) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")

    assert f"| `{prefix}{name.upper()}` |" in readme


def test_the_example_file_loads_with_the_uncommented_defaults() -> None:
    tables = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    defaults = load_settings()

    settings = load_settings(EXAMPLE)

    assert settings.llm.model_dump() == {**defaults.llm.model_dump(), **tables["llm"]}


def test_tenant_weights_are_documented_and_the_example_loads(tmp_path: Path) -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "(PROMPTQ_TENANTS)" in text
    assert "| `PROMPTQ_TENANTS` |" in readme

    # The commented [tenants] example, uncommented, is a valid table.
    example = text[text.index("# [tenants]\n") :].splitlines()
    uncommented = tmp_path / "tenants.toml"
    uncommented.write_text("\n".join(line.removeprefix("# ") for line in example) + "\n")
    weights = load_settings(uncommented).tenants

    assert weights
    assert all(f"# {name} = " in text for name in weights)
