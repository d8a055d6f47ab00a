"""What `promptq config` shows: every setting's value in use and where it came from."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, SecretStr

from api_client._polling import redact_url
from worker.config_file import load_config_file
from worker.settings import ModelLimits, load_settings
from worker.settings_sources import without_unset
from worker.tenant_weights import TENANTS_ENV, parse_tenants_env

MASK = "********"
NOT_SET = "(not set)"
PASSED_BY = "(passed by: OpenHands' agent setting)"


@dataclass(frozen=True)
class SettingRow:
    """One setting as `promptq config` lists it."""

    name: str  # the environment variable, e.g. LLM_NUM_RETRIES
    value: str  # the value in use, for display; secrets are always MASK, unset is NOT_SET
    source: str  # 'default' | 'file (<path>) [<table>]' | 'environment' | 'flag'


def describe_settings(
    config_path: str | None = None, *, llm_overrides: Mapping[str, Any] | None = None
) -> list[SettingRow]:
    """Every LLM_* and PROMPTQ_* setting with the value a worker would run with, and its source,
    then what the file's [llm.NAME] and [rate_limits."MODEL"] tables set, each weight of a
    tenant listed by [tenants] or PROMPTQ_TENANTS (``tenants.NAME``), and what of an OpenHands
    config the worker passes by (``[agent]``, ``max_message_chars in [llm]``...).

    Settings are loaded as a worker loads them (``llm_overrides`` as explicit values, the
    way `-s KEY=VALUE` gives them), so a bad value raises ConfigError naming its key.
    Precedence, highest first: flag, environment, the config file's table, default.
    """
    settings = load_settings(config_path, llm=llm_overrides)
    config = load_config_file(config_path, [])
    path, tables = config.path, config.tables
    env_names = {name.upper() for name in os.environ}  # pydantic-settings ignores case
    rows: list[SettingRow] = []
    for model, overrides in ((settings.llm, llm_overrides or {}), (settings.queue, {})):
        cls = type(model)
        prefix = str(cls.model_config.get("env_prefix", ""))
        table = without_unset(tables.get(cls.config_table, {}), cls.unset_values)
        for field_name in cls.model_fields:
            env_name = f"{prefix}{field_name}".upper()
            if field_name in overrides:
                source = "flag"
            elif env_name in env_names:
                source = "environment"
            elif field_name in table:
                source = f"file ({path}) [{cls.config_table}]"
            else:
                source = "default"
            rows.append(SettingRow(env_name, _display(model, field_name), source))
    for name, named in settings.named_llms.items():  # what each [llm.NAME] table sets
        for field_name in without_unset(config.named_llms[name], named.unset_values):
            rows.append(
                SettingRow(
                    f"[llm.{name}] {field_name}", _display(named, field_name), f"file ({path})"
                )
            )
    for model_name, limits in settings.rate_limits.items():  # only the file sets these
        for field_name in ModelLimits.model_fields:
            name = f'rate_limits."{model_name}".{field_name}'
            rows.append(SettingRow(name, _display(limits, field_name), f"file ({path})"))
    from_env = {name for name, _ in parse_tenants_env(os.environ.get(TENANTS_ENV, ""), [])}
    for tenant, weight in settings.tenants.items():  # the others weigh 1
        source = "environment" if tenant in from_env else f"file ({path}) [tenants]"
        rows.append(SettingRow(f"tenants.{tenant}", _number(weight), source))
    rows += [SettingRow(name, PASSED_BY, f"file ({path})") for name in settings.ignored]
    return rows


def _display(model: BaseModel, field_name: str) -> str:
    value = getattr(model, field_name)
    if value is None:
        return NOT_SET
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, dict):  # LiteLLM parameters: headers may hold credentials
        return "{" + ", ".join(f"{key}: {MASK}" for key in value) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _number(value)
    return _redacted_url(str(value)) if field_name.endswith("url") else str(value)


def _number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _redacted_url(url: str) -> str:
    try:
        return redact_url(url)
    except ValueError:  # unparseable (a bad port, say): it could still hold a password
        return MASK


def format_rows(rows: Sequence[SettingRow]) -> str:
    """An aligned table: setting, value, source."""
    table = [("SETTING", "VALUE", "SOURCE"), *((r.name, r.value, r.source) for r in rows)]
    name_width = max(len(name) for name, _, _ in table) + 2
    value_width = max(len(value) for _, value, _ in table) + 2
    return "\n".join(
        f"{name:<{name_width}}{value:<{value_width}}{source}" for name, value, source in table
    )
