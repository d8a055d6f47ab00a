"""worker.ops.config_report: each setting's value in use, where it came from, no secret shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.ops.config_report import MASK, NOT_SET, SettingRow, describe_settings, format_rows
from worker.settings import LLMSettings, QueueSettings

SECRET = "sk-canary-report-5e1d0c9b7a"


def _by_name(rows: list[SettingRow]) -> dict[str, SettingRow]:
    return {row.name: row for row in rows}


def test_every_setting_is_listed_with_its_default() -> None:
    rows = describe_settings()

    expected = [f"LLM_{name.upper()}" for name in LLMSettings.model_fields] + [
        f"PROMPTQ_{name.upper()}" for name in QueueSettings.model_fields
    ]
    assert [row.name for row in rows] == expected
    assert {row.source for row in rows} == {"default"}
    by_name = _by_name(rows)
    assert by_name["LLM_MODEL"].value == NOT_SET
    assert by_name["LLM_API_KEY"].value == NOT_SET
    assert by_name["LLM_NUM_RETRIES"].value == "8"
    assert by_name["LLM_RETRY_MIN_WAIT"].value == "15"
    assert by_name["LLM_DROP_PARAMS"].value == "true"
    assert by_name["PROMPTQ_REDIS_URL"].value == NOT_SET
    assert by_name["PROMPTQ_VISIBILITY_TIMEOUT_S"].value == "3600"


def test_environment_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_NUM_RETRIES", "3")
    monkeypatch.setenv("LLM_RETRY_MIN_WAIT", "0.05")
    monkeypatch.setenv("PROMPTQ_CONCURRENCY", "8")

    by_name = _by_name(describe_settings())

    assert by_name["LLM_NUM_RETRIES"] == SettingRow("LLM_NUM_RETRIES", "3", "environment")
    assert by_name["LLM_RETRY_MIN_WAIT"] == SettingRow("LLM_RETRY_MIN_WAIT", "0.05", "environment")
    assert by_name["PROMPTQ_CONCURRENCY"] == SettingRow("PROMPTQ_CONCURRENCY", "8", "environment")
    assert by_name["LLM_TIMEOUT"].source == "default"


def test_file_source_names_the_file_and_table(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[llm]\nmodel = "openai/gpt-4o-mini"\nnum_retries = 2\n'
        '[promptq]\nredis_url = "redis://queue.internal:6379/1"\n',
        encoding="utf-8",
    )

    by_name = _by_name(describe_settings(str(path)))

    assert by_name["LLM_MODEL"] == SettingRow(
        "LLM_MODEL", "openai/gpt-4o-mini", f"file ({path}) [llm]"
    )
    assert by_name["LLM_NUM_RETRIES"].source == f"file ({path}) [llm]"
    assert by_name["PROMPTQ_REDIS_URL"] == SettingRow(
        "PROMPTQ_REDIS_URL", "redis://queue.internal:6379/1", f"file ({path}) [promptq]"
    )
    assert by_name["LLM_TIMEOUT"].source == "default"


def test_per_model_rate_limits_are_listed_with_their_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[rate_limits."openai/gpt-4o"]\nrpm = 500\n')

    by_name = _by_name(describe_settings(str(path)))

    rpm = by_name['rate_limits."openai/gpt-4o".rpm']
    assert (rpm.value, rpm.source) == ("500", f"file ({path})")
    assert by_name['rate_limits."openai/gpt-4o".tpm'].value == NOT_SET


def test_named_configurations_list_what_their_tables_set(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[llm.cheap]\nmodel = "openai/mini"\napi_key = "{SECRET}"\n')

    rows = describe_settings(str(path))
    by_name = _by_name(rows)

    assert by_name["[llm.cheap] model"].value == "openai/mini"
    assert by_name["[llm.cheap] model"].source == f"file ({path})"
    assert by_name["[llm.cheap] api_key"].value == MASK
    assert SECRET not in format_rows(rows)


def test_tenant_weights_are_listed_with_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[tenants]\nteam-a = 3\nteam-b = 0.5\n"org.eu" = 2\n', encoding="utf-8")
    monkeypatch.setenv("PROMPTQ_TENANTS", "team-b=1.5,team-c=2")

    rows = describe_settings(str(path))

    tenants = [row for row in rows if row.name.startswith("tenants.")]
    assert tenants == [
        SettingRow("tenants.team-a", "3", f"file ({path}) [tenants]"),
        SettingRow("tenants.team-b", "1.5", "environment"),
        SettingRow("tenants.org.eu", "2", f"file ({path}) [tenants]"),
        SettingRow("tenants.team-c", "2", "environment"),
    ]


def test_no_tenant_rows_when_none_is_listed() -> None:
    assert not [row for row in describe_settings() if row.name.startswith("tenants")]


def test_a_bad_tenant_weight_raises_config_error_naming_the_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROMPTQ_TENANTS", "team-a=0")

    with pytest.raises(ConfigError, match=r"tenants\.team-a in PROMPTQ_TENANTS"):
        describe_settings()


def test_default_config_toml_and_promptq_config_are_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Path("config.toml").write_text("[llm]\nnum_retries = 4\n", encoding="utf-8")
    assert _by_name(describe_settings())["LLM_NUM_RETRIES"] == SettingRow(
        "LLM_NUM_RETRIES", "4", "file (config.toml) [llm]"
    )

    named = tmp_path / "named.toml"
    named.write_text("[llm]\nnum_retries = 5\n", encoding="utf-8")
    monkeypatch.setenv("PROMPTQ_CONFIG", str(named))
    assert _by_name(describe_settings())["LLM_NUM_RETRIES"] == SettingRow(
        "LLM_NUM_RETRIES", "5", f"file ({named}) [llm]"
    )


def test_precedence_flag_then_environment_then_file(monkeypatch: pytest.MonkeyPatch) -> None:
    Path("config.toml").write_text(
        "[llm]\nnum_retries = 4\ntimeout = 60\nretry_multiplier = 3\n", encoding="utf-8"
    )
    monkeypatch.setenv("LLM_NUM_RETRIES", "6")
    monkeypatch.setenv("LLM_TIMEOUT", "90")

    by_name = _by_name(describe_settings(llm_overrides={"num_retries": "1"}))

    assert by_name["LLM_NUM_RETRIES"] == SettingRow("LLM_NUM_RETRIES", "1", "flag")
    assert by_name["LLM_TIMEOUT"] == SettingRow("LLM_TIMEOUT", "90", "environment")
    assert by_name["LLM_RETRY_MULTIPLIER"] == SettingRow(
        "LLM_RETRY_MULTIPLIER", "3", "file (config.toml) [llm]"
    )


@pytest.mark.parametrize("where", ["environment", "file", "flag"])
def test_api_key_is_masked_from_every_source(
    where: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    overrides = None
    if where == "environment":
        monkeypatch.setenv("LLM_API_KEY", SECRET)
    elif where == "file":
        Path("config.toml").write_text(f'[llm]\napi_key = "{SECRET}"\n', encoding="utf-8")
    else:
        overrides = {"api_key": SECRET}

    rows = describe_settings(llm_overrides=overrides)

    row = _by_name(rows)["LLM_API_KEY"]
    assert row.value == MASK
    assert row.source.startswith(where)
    for fragment in (SECRET, SECRET[:6], SECRET[-6:]):
        assert all(fragment not in part for r in rows for part in (r.value, r.source))
        assert fragment not in format_rows(rows)


def test_a_password_in_a_url_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTQ_REDIS_URL", "redis://:hunter2-secret@queue.internal:6379/0")
    monkeypatch.setenv("LLM_BASE_URL", "https://user:hunter3-secret@llm.internal/v1")

    text = format_rows(describe_settings())

    assert "hunter2-secret" not in text
    assert "hunter3-secret" not in text
    assert "redis://:***@queue.internal:6379/0" in text


def test_format_rows_aligns_the_columns() -> None:
    rows = [
        SettingRow("LLM_MODEL", "openai/gpt-4o", "flag"),
        SettingRow("PROMPTQ_CONCURRENCY", "64", "default"),
    ]

    lines = format_rows(rows).splitlines()

    assert lines[0].split() == ["SETTING", "VALUE", "SOURCE"]
    assert len(lines) == 3
    value_column = lines[0].index("VALUE")
    source_column = lines[0].index("SOURCE")
    assert lines[1][value_column:].startswith("openai/gpt-4o")
    assert lines[2][value_column:].startswith("64")
    assert lines[1][source_column:] == "flag"
    assert lines[2][source_column:] == "default"
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLM_NUM_RETRIES": "many"}, "LLM_NUM_RETRIES"),
        ({"PROMPTQ_CONCURRENCY": "0"}, "PROMPTQ_CONCURRENCY"),
        ({"LLM_RETRY_MIN_WAIT": "30", "LLM_RETRY_MAX_WAIT": "10"}, "LLM_RETRY_MIN_WAIT"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_key(
    env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    with pytest.raises(ConfigError, match=named):
        describe_settings()


def test_a_bad_flag_raises_config_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="LLM_TIMEOUT"):
        describe_settings(llm_overrides={"timeout": "-1"})
