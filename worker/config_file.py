"""The config file: where it is, its tables, and what of an OpenHands config promptq passes by."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import ConfigError

CONFIG_ENV = "PROMPTQ_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")

# The tables promptq reads.
PROMPTQ_TABLES = ("llm", "promptq", "rate_limits", "tenants")
# OpenHands' own tables (its config loader's sections, and those its template ships): they
# configure the agent, its sandbox and its server, nothing a queue does. Read past, named once
# at worker start; any other table is a mistake and refused.
OPENHANDS_TABLES = frozenset(
    {
        "core",
        "agent",
        "sandbox",
        "security",
        "condenser",
        "extended",
        "mcp",
        "kubernetes",
        "model_routing",
        "router_config",
        "cli",
    }
)
# Keys of OpenHands' [llm] tables that shape the agent's conversation, not one call: read past
# like the tables above. Every other key of its LLMConfig is one of LLMSettings' fields.
OPENHANDS_AGENT_KEYS = frozenset(
    {
        "max_message_chars",  # truncates the agent's observations before they reach a prompt
        "native_tool_calling",  # whether the agent mocks function calling in its prompts
        "disable_stop_word",  # the stop words of that mocked function calling
        "custom_tokenizer",  # the agent's own token counts
        "log_completions",  # promptq never logs prompts or answers
        "log_completions_folder",
        "modify_params",  # a LiteLLM global the agent sets before each call
        "openrouter_site_url",  # OpenRouter's attribution headers, set as process globals
        "openrouter_app_name",
        "for_routing",  # OpenHands' model router
        "correct_num",  # the draft editor's retries ([llm.draft_editor])
    }
)
# [llm] keys whose value is a table but which are settings, not [llm.NAME] configurations.
TABLE_VALUED_KEYS = frozenset({"completion_kwargs"})

# Settings promptq had once, and why they went: named as such when a config file still sets one.
RETIRED = {
    "eta_task_limit": "no longer used (a job waiting for its retry is parked in Redis, not held "
    "in worker memory): remove it",
    "limiter_max_ahead_s": "no longer used (slots are reserved at most limiter_max_sleep_s "
    "ahead; a job waits for a later one in the scheduler): remove it",
}


@dataclass(frozen=True)
class ConfigFile:
    """A config file's tables as promptq reads them: [llm]'s own values apart from its
    [llm.NAME] configurations, and what was passed by (OpenHands' tables and agent keys)."""

    path: Path | None = None
    tables: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    named_llms: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # "[agent]", "max_message_chars in [llm.NAME]", ...

    @property
    def where(self) -> str:
        return str(self.path or "config.toml")


def load_config_file(config_path: str | os.PathLike[str] | None, problems: list[str]) -> ConfigFile:
    """The config file load_settings reads (see read_config_file), sorted: a top-level key or
    table that neither promptq nor OpenHands defines is a problem naming it."""
    path, data = read_config_file(config_path)
    where = str(path or "config.toml")
    ignored: list[str] = []
    for name, value in data.items():
        if name in PROMPTQ_TABLES:
            continue
        if name in OPENHANDS_TABLES and isinstance(value, dict):
            ignored.append(f"[{name}]")
        elif isinstance(value, dict):
            problems.append(
                f"[{name}] in {where}: unknown table (promptq reads [llm], [promptq], "
                "[rate_limits] and [tenants], and passes by OpenHands' own tables)"
            )
        else:
            problems.append(
                f"{name} in {where}: unknown top-level key (settings go in a table: [llm], "
                "[promptq], [rate_limits] or [tenants])"
            )
    llm = {k: v for k, v in data.get("llm", {}).items() if not _is_group(k, v)}
    tables = {**data, "llm": _without_agent_keys(llm, "[llm]", ignored)}
    named = {
        key: _without_agent_keys(value, f"[llm.{key}]", ignored)
        for key, value in data.get("llm", {}).items()
        if _is_group(key, value)
    }
    return ConfigFile(path, tables, named, tuple(ignored))


def _is_group(key: str, value: Any) -> bool:
    """Whether [llm]'s ``key`` is a [llm.NAME] configuration rather than a setting."""
    return isinstance(value, dict) and key not in TABLE_VALUED_KEYS


def _without_agent_keys(table: dict[str, Any], where: str, ignored: list[str]) -> dict[str, Any]:
    ignored += [f"{key} in {where}" for key in table if key in OPENHANDS_AGENT_KEYS]
    return {k: v for k, v in table.items() if k not in OPENHANDS_AGENT_KEYS}


def ignored_notice(ignored: Sequence[str]) -> str | None:
    """The one line a worker writes at start about what of the file it passed by, or None."""
    if not ignored:
        return None
    return (
        f"the config file's OpenHands agent settings mean nothing to a queue and are passed by: "
        f"{', '.join(ignored)} (see 'Coming from OpenHands' in the README)"
    )


def read_config_file(
    config_path: str | os.PathLike[str] | None = None,
) -> tuple[Path | None, dict[str, Any]]:
    """The config file load_settings reads for ``config_path`` and its tables; (None, {})
    when there is none. Raises ConfigError naming the problem."""
    named = config_path if config_path is not None else os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            given_by = "the config file given" if config_path is not None else CONFIG_ENV
            raise ConfigError(f"{given_by}: config file {path} does not exist")
    elif DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    else:
        return None, {}
    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    for table in PROMPTQ_TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{table} in {path} must be a table ([{table}])")
    return path, data
