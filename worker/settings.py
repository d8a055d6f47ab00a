"""The worker's settings: LLM_* (OpenHands' names) and PROMPTQ_*, from env and config.toml."""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from api_client._constants import DEFAULT_REDIS_URL, DEFAULT_RESULT_TTL_S
from api_client._schemas import TENANT_PATTERN
from worker.errors import ConfigError

S = TypeVar("S", bound=BaseSettings)

CONFIG_ENV = "PROMPTQ_CONFIG"
DEFAULT_CONFIG_PATH = Path("config.toml")
# Tenants' weights in the environment: NAME=WEIGHT pairs separated by commas ("team-a=2,b=0.5").
TENANTS_ENV = "PROMPTQ_TENANTS"
# The weight of a tenant that [tenants] and PROMPTQ_TENANTS do not list.
DEFAULT_TENANT_WEIGHT = 1.0

# The tables of the config file being loaded, handed to the settings sources below.
_file_tables: ContextVar[Mapping[str, Mapping[str, Any]]] = ContextVar(
    "_file_tables", default=MappingProxyType({})
)


class _FileTable(PydanticBaseSettingsSource):
    """One table of config.toml as a settings source (below the environment in precedence)."""

    def __init__(self, settings_cls: type[BaseSettings], table: str) -> None:
        super().__init__(settings_cls)
        self._values = dict(_file_tables.get().get(table, {}))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._values


class _LayeredSettings(BaseSettings):
    """Precedence: explicit arguments, then environment, then the file's table, then defaults."""

    config_table: ClassVar[str] = ""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _FileTable(settings_cls, cls.config_table)


class LLMSettings(_LayeredSettings):
    """The model call, as OpenHands documents its LLM settings (env LLM_*, or [llm] in the file)."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", extra="forbid", frozen=True, allow_inf_nan=False
    )
    config_table: ClassVar[str] = "llm"

    model: str | None = None
    api_key: SecretStr | None = None
    base_url: str | None = None
    api_version: str | None = None
    embedding_model: str | None = None
    embedding_deployment_name: str | None = None
    drop_params: bool = True
    disable_vision: bool = False
    caching_prompt: bool = True
    # LLM_NUM_RETRIES counts retries after the first attempt: at most num_retries + 1 calls.
    num_retries: int = Field(default=8, ge=0, le=100)
    retry_min_wait: float = Field(default=15.0, gt=0)
    retry_max_wait: float = Field(default=120.0, gt=0)
    retry_multiplier: float = Field(default=2.0, gt=0)
    timeout: float = Field(default=300.0, gt=0)
    # The provider's limits for each model this worker calls, shared by the whole fleet
    # (requests and tokens per minute); [rate_limits."MODEL"] in the file overrides them.
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    # Prices in USD per token, for models LiteLLM's price map does not know (or prices it
    # should not use): set both, and cost_usd is computed from them instead of the map.
    input_cost_per_token: float | None = Field(default=None, ge=0)
    output_cost_per_token: float | None = Field(default=None, ge=0)


class QueueSettings(_LayeredSettings):
    """How the worker uses Redis and Celery (env PROMPTQ_*, or [promptq] in the file)."""

    model_config = SettingsConfigDict(
        env_prefix="PROMPTQ_", extra="forbid", frozen=True, allow_inf_nan=False
    )
    config_table: ClassVar[str] = "promptq"

    # Unset means "no fleet configured": workers use redis://localhost:6379/0, while
    # `promptq batch` runs an embedded broker and worker of its own.
    redis_url: str | None = None
    # An unacknowledged message returns to the queue after this long: it must stay well above
    # the longest retry wait plus the call timeout, or running jobs would be delivered twice.
    visibility_timeout_s: float = Field(default=3600.0, gt=0)
    result_ttl_s: float = Field(default=DEFAULT_RESULT_TTL_S, gt=0)
    # A job whose worker died this many times more than its retries explain fails as worker_lost.
    max_redeliveries: int = Field(default=2, ge=0)
    # A worker process that has not beaten for this long is presumed dead: any other returns
    # the messages it held to the queue (worker.fleet.custody). Each beats ten times per timeout.
    heartbeat_timeout_s: float = Field(default=10.0, ge=0.5)
    # The safety net (worker.fleet.reconcile): every interval, one worker looks for open jobs
    # with no message anywhere, and re-publishes those found so twice in a row from their copy.
    reconcile_interval_s: float = Field(default=60.0, ge=0.1)
    concurrency: int = Field(default=64, ge=1)
    # Worker processes `promptq worker` runs, each with `concurrency` calls in flight; unset:
    # one per core. A process handles a few hundred prompts a second at most (CPU-bound).
    processes: int | None = Field(default=None, ge=1)
    # The fleet-wide rate limiter (worker.fleet.limiter): learn limits from the provider's headers
    # and 429s; reserve a slot at most max_sleep ahead and wait for it in the worker, beyond
    # that the job waits in the scheduler, at its place in its line, until a slot is that
    # near (so a job of a higher priority takes the next slot: the longer this, the longer it
    # waits behind slots already reserved); charge a call whose max_tokens is not set this many
    # reply tokens until its real usage is known.
    limiter_adaptive: bool = True
    limiter_max_sleep_s: float = Field(default=0.5, ge=0)
    limiter_reply_tokens: int = Field(default=512, ge=0)
    # A cap on what the whole fleet spends (USD, by LiteLLM's prices) per spend_period:
    # "total" (since the counter began), "day" or "month" (UTC). Unset: no cap.
    max_spend_usd: float | None = Field(default=None, ge=0)
    spend_period: Literal["total", "day", "month"] = "total"
    # Prometheus metrics (worker.ops.metrics) at http://metrics_host:metrics_port/metrics, one
    # port per worker process; unset: no server. 0 takes any free port (logged at start).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @property
    def broker_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL


class ModelLimits(BaseModel):
    """One model's provider limits, from [rate_limits."MODEL"] in the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)


class Settings(BaseModel):
    """Everything a worker process runs with, checked together."""

    model_config = {"frozen": True}

    llm: LLMSettings
    queue: QueueSettings
    rate_limits: Mapping[str, ModelLimits] = Field(default_factory=dict)
    # [llm.NAME] tables: the default [llm] settings with the table's values on top.
    named_llms: Mapping[str, LLMSettings] = Field(default_factory=dict)
    # Each tenant's weight in the fleet's fair share ([tenants] and PROMPTQ_TENANTS).
    tenants: Mapping[str, float] = Field(default_factory=dict)

    def tenant_weight(self, name: str) -> float:
        """The weight of tenant ``name`` (a request's tenant_name) in the fleet's fair share:
        its [tenants] / PROMPTQ_TENANTS entry, else DEFAULT_TENANT_WEIGHT (1)."""
        return self.tenants.get(name, DEFAULT_TENANT_WEIGHT)

    def llm_named(self, name: str | None) -> LLMSettings:
        """The LLM settings a job asks for by name (None: the default [llm]); KeyError when
        this worker has no such configuration."""
        return self.llm if name is None else self.named_llms[name]

    def limits_for(self, model: str, llm: LLMSettings | None = None) -> ModelLimits:
        """The requests/tokens per minute the fleet keeps to for ``model``, called with
        ``llm`` (default: [llm]): its [rate_limits."MODEL"] entry, else the llm's rpm/tpm."""
        llm = llm or self.llm
        return self.rate_limits.get(model) or ModelLimits(rpm=llm.rpm, tpm=llm.tpm)

    @property
    def longest_wait_s(self) -> float:
        """No wait (backoff or Retry-After) may exceed this: it plus one call fits in half the
        visibility timeout, so a message held for a retry is never redelivered meanwhile."""
        return self.queue.visibility_timeout_s / 2 - self.llm.timeout


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    llm: Mapping[str, Any] | None = None,
    queue: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the settings: explicit values, then LLM_*/PROMPTQ_* env vars, then config.toml.

    The file is ``config_path``, else $PROMPTQ_CONFIG, else ./config.toml when it exists.
    Raises ConfigError naming every bad key.
    """
    path, tables = read_config_file(config_path)
    named_tables = {k: v for k, v in tables.get("llm", {}).items() if isinstance(v, dict)}
    if named_tables:  # the [llm] source reads only the table's own values
        plain = {k: v for k, v in tables["llm"].items() if k not in named_tables}
        tables = {**tables, "llm": plain}
    source = f"[{{table}}] of {path}" if path else "[{table}] of config.toml"
    problems: list[str] = []
    token = _file_tables.set(tables)
    try:
        llm_settings = _build(LLMSettings, llm, "LLM_", source.format(table="llm"), problems)
        queue_settings = _build(
            QueueSettings, queue, "PROMPTQ_", source.format(table="promptq"), problems
        )
    finally:
        _file_tables.reset(token)
    rate_limits = _model_limits(tables.get("rate_limits", {}), path, problems)
    tenants = _tenant_weights(
        tables.get("tenants", {}), os.environ.get(TENANTS_ENV), path, problems
    )
    named_llms = {}
    if llm_settings is not None:
        named_llms = _named_llms(llm_settings, named_tables, path, problems)
    if llm_settings is None or queue_settings is None or problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    settings = Settings(
        llm=llm_settings,
        queue=queue_settings,
        rate_limits=rate_limits,
        named_llms=named_llms,
        tenants=tenants,
    )
    _check_waits_fit(settings)
    _check_prices(settings.llm)
    for name, named in named_llms.items():
        try:
            _check_waits_fit(Settings(llm=named, queue=queue_settings))
            _check_prices(named)
        except ConfigError as exc:
            raise ConfigError(f"[llm.{name}]: {exc}") from None
    return settings


_LLM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def _named_llms(
    base: LLMSettings,
    tables: Mapping[str, Mapping[str, Any]],
    path: Path | None,
    problems: list[str],
) -> dict[str, LLMSettings]:
    """Each [llm.NAME] table over the default LLM settings (the table's values win)."""
    named: dict[str, LLMSettings] = {}
    inherited = base.model_dump()
    for name, table in tables.items():
        where = f"[llm.{name}] of {path or 'config.toml'}"
        if not _LLM_NAME.fullmatch(name):
            problems.append(f"{where}: a configuration name is letters, digits, _ and -")
            continue
        built = _build(LLMSettings, {**inherited, **table}, "LLM_", where, problems)
        if built is not None:
            named[name] = built
    return named


def _model_limits(
    table: Mapping[str, Any], path: Path | None, problems: list[str]
) -> dict[str, ModelLimits]:
    limits: dict[str, ModelLimits] = {}
    for model, values in table.items():
        where = f'[rate_limits."{model}"] of {path or "config.toml"}'
        if not isinstance(values, Mapping):
            problems.append(f"{where}: must be a table with rpm and/or tpm")
            continue
        try:
            limits[model] = ModelLimits(**values)
        except ValidationError as exc:
            for error in exc.errors():
                field = str(error["loc"][0]) if error["loc"] else ""
                message = error["msg"].removeprefix("Value error, ")
                if error["type"] == "extra_forbidden":
                    message = "unknown setting (rpm and tpm are)"
                problems.append(f"{field} in {where}: {message} (got {error['input']!r})")
    return limits


def _tenant_weights(
    table: Mapping[str, Any], env_text: str | None, path: Path | None, problems: list[str]
) -> dict[str, float]:
    """Each tenant's weight: the [tenants] table, then PROMPTQ_TENANTS' entries over it (the
    environment wins, tenant by tenant). A bad name or weight is a problem naming its key."""
    weights: dict[str, float] = {}
    where = f"[tenants] of {path or 'config.toml'}"
    for name, value in table.items():
        if isinstance(value, Mapping):  # `team.a = 2` is a table "team" to TOML
            problems.append(
                f"tenants.{name} in {where}: a weight is a number, not a table (quote a name "
                f'with dots: "{name}.x" = 2)'
            )
        elif (weight := _checked_tenant(name, value, value, where, problems)) is not None:
            weights[name] = weight
    seen: set[str] = set()
    for name, raw in parse_tenants_env(env_text or "", problems):
        if name in seen:
            problems.append(f"tenants.{name} in {TENANTS_ENV}: listed twice")
            continue
        seen.add(name)
        try:
            number: float | None = float(raw)
        except ValueError:
            number = None
        if (weight := _checked_tenant(name, number, raw, TENANTS_ENV, problems)) is not None:
            weights[name] = weight
    return weights


def parse_tenants_env(text: str, problems: list[str]) -> list[tuple[str, str]]:
    """The (name, weight text) pairs of PROMPTQ_TENANTS: ``NAME=WEIGHT`` separated by commas,
    spaces around either ignored. A pair without ``=`` is a problem."""
    pairs = []
    for entry in text.split(","):
        if not entry.strip():
            continue
        name, sep, weight = entry.partition("=")
        if not sep:
            problems.append(
                f"{TENANTS_ENV}: each entry is NAME=WEIGHT, separated by commas (got {entry!r})"
            )
            continue
        pairs.append((name.strip(), weight.strip()))
    return pairs


def _checked_tenant(
    name: str, value: Any, given: Any, where: str, problems: list[str]
) -> float | None:
    """``value`` as tenant ``name``'s weight, or None after naming the problem (``given``:
    the value as the user wrote it)."""
    if not re.fullmatch(TENANT_PATTERN, name):
        problems.append(
            f"tenants.{name} in {where}: a tenant name matches {TENANT_PATTERN} (letters, "
            "digits and _.:-, 1 to 64 characters)"
        )
        return None
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or not math.isfinite(number) or number <= 0:
        problems.append(
            f"tenants.{name} in {where}: a weight is a finite number > 0 (got {given!r})"
        )
        return None
    return float(number)


def _check_waits_fit(settings: Settings) -> None:
    llm, queue = settings.llm, settings.queue
    if llm.retry_min_wait > llm.retry_max_wait:
        raise ConfigError(
            f"invalid configuration:\n  - LLM_RETRY_MIN_WAIT ({llm.retry_min_wait:g} s) is "
            f"above LLM_RETRY_MAX_WAIT ({llm.retry_max_wait:g} s)"
        )
    if llm.retry_max_wait > settings.longest_wait_s:
        raise ConfigError(
            "invalid configuration:\n"
            f"  - LLM_RETRY_MAX_WAIT ({llm.retry_max_wait:g} s) plus LLM_TIMEOUT "
            f"({llm.timeout:g} s) must fit in half of PROMPTQ_VISIBILITY_TIMEOUT_S "
            f"({queue.visibility_timeout_s:g} s), or a job waiting to retry would be "
            "delivered twice: lower the waits or raise the visibility timeout"
        )


def _check_prices(llm: LLMSettings) -> None:
    # One price alone would price the other side of every call at nothing, silently.
    if (llm.input_cost_per_token is None) != (llm.output_cost_per_token is None):
        missing = "OUTPUT" if llm.output_cost_per_token is None else "INPUT"
        raise ConfigError(
            "invalid configuration:\n  - LLM_INPUT_COST_PER_TOKEN and LLM_OUTPUT_COST_PER_TOKEN "
            f"go together: set LLM_{missing}_COST_PER_TOKEN too (0 for a side that is free)"
        )


# Settings promptq had once, and why they went: named as such when a config file still sets one.
RETIRED = {
    "eta_task_limit": "no longer used (a job waiting for its retry is parked in Redis, not held "
    "in worker memory): remove it",
    "limiter_max_ahead_s": "no longer used (slots are reserved at most limiter_max_sleep_s "
    "ahead; a job waits for a later one in the scheduler): remove it",
}


def _build(
    cls: type[S],
    explicit: Mapping[str, Any] | None,
    env_prefix: str,
    where: str,
    problems: list[str],
) -> S | None:
    try:
        return cls(**dict(explicit or {}))
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                problems.append(f"{field} in {where}: {RETIRED.get(field, 'unknown setting')}")
            else:
                got = "" if field == "api_key" else f" (got {error['input']!r})"
                problems.append(f"{env_prefix}{field.upper()} ({field} in {where}): {message}{got}")
        return None


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
    for table in ("llm", "promptq", "rate_limits", "tenants"):
        if not isinstance(data.get(table, {}), dict):
            raise ConfigError(f"{table} in {path} must be a table ([{table}])")
    return path, data
