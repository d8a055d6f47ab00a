"""The worker's settings: LLM_* (OpenHands' names) and PROMPTQ_*, from env and config.toml."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from api_client._constants import DEFAULT_REDIS_URL, DEFAULT_RESULT_TTL_S
from api_client._schemas import RESERVED_PARAMS
from worker.config_file import RETIRED, ConfigFile, load_config_file
from worker.errors import ConfigError
from worker.settings_sources import LayeredSettings, file_tables, without_unset
from worker.tenant_weights import DEFAULT_TENANT_WEIGHT, TENANTS_ENV, tenant_weights

# How far ahead of its limit a deployment may run after an idle spell, unless configured
# (LLM_BURST_S): a tenth of a second of its budget, two calls ahead at 20 a second (three at
# once). A second's worth (promptq before) let 20 calls go at once, which providers
# enforcing their per-minute limit over short windows answer with 429s.
DEFAULT_BURST_S = 0.1

S = TypeVar("S", bound=BaseSettings)


class LLMSettings(LayeredSettings):
    """The model call, as OpenHands defines its LLM settings (env LLM_*, or [llm] in the file)."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", extra="forbid", frozen=True, allow_inf_nan=False
    )
    config_table: ClassVar[str] = "llm"
    # As in OpenHands: an empty value anywhere is unset, and so are the zeros its template
    # ships (`timeout = 0`...) and its embedding model "local" (a local embedder, not a LiteLLM
    # model). Unset in one source, the next one (or the default) gives the setting.
    unset_values: ClassVar[Mapping[str, frozenset[Any]]] = MappingProxyType(
        {
            "*": frozenset({""}),
            "timeout": frozenset({0}),
            "max_output_tokens": frozenset({0}),
            "max_input_tokens": frozenset({0}),
            "embedding_model": frozenset({"local"}),
        }
    )

    model: str | None = None
    api_key: SecretStr | None = None
    base_url: str | None = None
    api_version: str | None = None
    # LiteLLM's provider for a model named without one (custom_llm_provider="openai" sends
    # "my-model" to an OpenAI-compatible base_url as is).
    custom_llm_provider: str | None = None
    # The endpoint of ollama/ and ollama_chat/ models (chat and embeddings), over base_url.
    ollama_base_url: str | None = None
    # Bedrock's credentials and region, handed to LiteLLM with each call.
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    aws_region_name: str | None = None
    embedding_model: str | None = None
    embedding_base_url: str | None = None  # the endpoint of embeddings calls, over base_url
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
    # Defaults for the chat requests that do not set them (worker.llm.call.params_of); unset:
    # the provider's own. max_output_tokens is the default max_tokens.
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = None
    reasoning_effort: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    safety_settings: list[dict[str, str]] | None = None
    completion_kwargs: dict[str, Any] | None = None  # any other LiteLLM parameters
    # A chat prompt longer than this (LiteLLM's count) fails as context_window_exceeded
    # without a call.
    max_input_tokens: int | None = Field(default=None, ge=1)
    # The provider's limits for each model this worker calls, shared by the whole fleet
    # (requests and tokens per minute); [rate_limits."MODEL"] in the file overrides them.
    rpm: int | None = Field(default=None, gt=0)
    tpm: int | None = Field(default=None, gt=0)
    # How far ahead of its limit a deployment may run after an idle spell, in seconds of its
    # budget (GCRA's burst tolerance): the calls that may start at once. Short: providers that
    # enforce their per-minute limit over short windows answer a burst with 429s.
    burst_s: float = Field(default=DEFAULT_BURST_S, ge=0, le=60)
    # Prices in USD per token, for models LiteLLM's price map does not know (or prices it
    # should not use): set both, and cost_usd is computed from them instead of the map.
    input_cost_per_token: float | None = Field(default=None, ge=0)
    output_cost_per_token: float | None = Field(default=None, ge=0)

    @field_validator("completion_kwargs")
    @classmethod
    def _no_worker_parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # The same parameters a request may not set: the key, endpoint, retries are the worker's.
        owned = sorted(RESERVED_PARAMS & (value or {}).keys())
        if owned:
            raise ValueError(f"{', '.join(owned)}: the worker sets these itself")
        return value

    def secrets(self) -> tuple[str, ...]:
        """The secret values these settings hold (API key, AWS keys), to keep out of output."""
        found = (getattr(self, name) for name in type(self).model_fields)
        return tuple(s.get_secret_value() for s in found if isinstance(s, SecretStr) and s)


class QueueSettings(LayeredSettings):
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
    # reply tokens until its real usage is known. A deployment with no limit known (none
    # configured, none stated in headers yet) starts at limiter_start_rpm requests a minute and
    # grows fourfold each second its calls wait for slots (slow start; 0: none).
    limiter_adaptive: bool = True
    limiter_start_rpm: float = Field(default=60.0, ge=0)
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
    burst_s: float | None = Field(default=None, ge=0, le=60)  # default: [llm]'s burst_s


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
    # What the config file set that configures an OpenHands agent, not a queue, passed by:
    # "[agent]", "max_message_chars in [llm]"... (worker.config_file).
    ignored: tuple[str, ...] = ()

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
        own = self.rate_limits.get(model)
        if own is None:
            return ModelLimits(rpm=llm.rpm, tpm=llm.tpm, burst_s=llm.burst_s)
        return own if own.burst_s is not None else own.model_copy(update={"burst_s": llm.burst_s})

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
    problems: list[str] = []
    config = load_config_file(config_path, problems)
    tables, path = config.tables, config.path
    source = f"[{{table}}] of {config.where}"
    token = file_tables.set(tables)
    try:
        llm_settings = _build(LLMSettings, llm, "LLM_", source.format(table="llm"), problems)
        queue_settings = _build(
            QueueSettings, queue, "PROMPTQ_", source.format(table="promptq"), problems
        )
    finally:
        file_tables.reset(token)
    rate_limits = _model_limits(tables.get("rate_limits", {}), path, problems)
    tenants = tenant_weights(tables.get("tenants", {}), os.environ.get(TENANTS_ENV), path, problems)
    named_llms = {}
    if llm_settings is not None:
        named_llms = _named_llms(llm_settings, config, problems)
    if llm_settings is None or queue_settings is None or problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
    settings = Settings(
        llm=llm_settings,
        queue=queue_settings,
        rate_limits=rate_limits,
        named_llms=named_llms,
        tenants=tenants,
        ignored=config.ignored,
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
    base: LLMSettings, config: ConfigFile, problems: list[str]
) -> dict[str, LLMSettings]:
    """Each [llm.NAME] table over the default LLM settings (the table's values win; one that
    reads as unset, `timeout = 0` say, leaves [llm]'s)."""
    named: dict[str, LLMSettings] = {}
    inherited = base.model_dump()
    for name, table in config.named_llms.items():
        where = f"[llm.{name}] of {config.where}"
        if not _LLM_NAME.fullmatch(name):
            problems.append(f"{where}: a configuration name is letters, digits, _ and -")
            continue
        own = without_unset(table, LLMSettings.unset_values)
        built = _build(LLMSettings, {**inherited, **own}, "LLM_", where, problems)
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
                got = "" if _quiet(cls, field) else f" (got {error['input']!r})"
                problems.append(f"{env_prefix}{field.upper()} ({field} in {where}): {message}{got}")
        return None


def _quiet(cls: type[BaseSettings], field: str) -> bool:
    """Whether a bad value of ``field`` stays out of the message: secrets, and LiteLLM
    parameters (they may hold headers with credentials)."""
    info = cls.model_fields.get(field)
    return info is not None and (
        SecretStr in get_args(info.annotation) or field == "completion_kwargs"
    )
