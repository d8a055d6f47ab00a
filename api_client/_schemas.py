"""The wire contract: the requests a job carries, their results, a job's error and its status."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

# submit's scheduling arguments and the request fields they become: never sampling parameters.
SCHEDULING_PARAMS = frozenset({"priority", "tenant", "deadline", "deadline_s", "deadline_at"})
# Parameters the worker owns: a request may not set them (the key and endpoint live in the
# worker's settings, retries belong to Celery, results are never streamed), nor the scheduling
# ones.
RESERVED_PARAMS = SCHEDULING_PARAMS | frozenset(
    {
        "model",
        "messages",
        "prompt",
        "stream",
        "api_key",
        "api_base",
        "base_url",
        "api_version",
        "timeout",
        "max_retries",
        "num_retries",
        "custom_llm_provider",
        "metadata",
        "budget",
        "llm",
    }
)
# Embedding requests also own their input; vectors come back as floats (base64 is refused).
RESERVED_EMBEDDING_PARAMS = RESERVED_PARAMS | {"input"}
# OpenAI's limit on the texts of one embeddings request.
MAX_EMBEDDING_INPUTS = 2048
MESSAGE_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class JobStatus(StrEnum):
    """Where a job is in its life. ``succeeded`` and ``failed`` are terminal.

    A job that is cancelled, or whose deadline passes before it could run, ends ``failed``
    too, with the error kind ``cancelled`` or ``deadline_exceeded``.
    """

    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED)


class ErrorKind(StrEnum):
    """Why a job failed. Stable: clients branch on these values.

    Cancelled and expired jobs are failed jobs: status ``failed``, and the client raises
    ``JobFailed`` with kind ``cancelled`` or ``deadline_exceeded``.
    """

    RATE_LIMITED = "rate_limited"  # 429 until the retry budget ran out
    PROVIDER_UNAVAILABLE = "provider_unavailable"  # 5xx / connection errors, budget exhausted
    TIMEOUT = "timeout"  # the provider did not answer within LLM_TIMEOUT, budget exhausted
    MALFORMED_RESPONSE = "malformed_response"  # unparseable provider replies, budget exhausted
    BAD_REQUEST = "bad_request"  # 400 / 422: the provider refused the request as given
    AUTHENTICATION = "authentication"  # 401: key missing or wrong
    PERMISSION_DENIED = "permission_denied"  # 403
    NOT_FOUND = "not_found"  # 404: unknown model or endpoint
    CONTEXT_WINDOW_EXCEEDED = "context_window_exceeded"
    CONTENT_POLICY = "content_policy"
    CONFIGURATION = "configuration"  # the worker cannot call this model as configured
    WORKER_LOST = "worker_lost"  # the worker died on every delivery of the job
    BUDGET_EXCEEDED = "budget_exceeded"  # a spending cap left no room: no call was made
    CANCELLED = "cancelled"  # the job was cancelled: no call was made after the cancel
    DEADLINE_EXCEEDED = "deadline_exceeded"  # it could not start, or retry, before its deadline
    INTERNAL = "internal"  # a bug in promptq; the message says where


class Priority(StrEnum):
    """How soon a job should run beside the others queued: PRIORITY_ORDER, highest first."""

    INTERACTIVE = "interactive"  # someone is waiting for the answer
    DEFAULT = "default"
    BATCH = "batch"  # bulk work, such as `promptq batch`'s prompts

    @property
    def rank(self) -> int:
        """The level's place in PRIORITY_ORDER: 0 for the highest (interactive)."""
        return PRIORITY_ORDER.index(self)


# The priority levels, highest first.
PRIORITY_ORDER = (Priority.INTERACTIVE, Priority.DEFAULT, Priority.BATCH)
# A tenant's name: the fleet shares its capacity fairly between tenants with jobs waiting.
TENANT_PATTERN = r"^[A-Za-z0-9_.:\-]{1,64}$"
# The tenant of a request that names none (its ``tenant`` is None).
DEFAULT_TENANT = "default"


def checked_priority(value: Any) -> Priority:
    """``value`` as a priority level; ValueError naming the levels when it is none."""
    if isinstance(value, str) and value in PRIORITY_ORDER:
        return Priority(value)
    levels = ", ".join(PRIORITY_ORDER)
    raise ValueError(f"priority must be one of {levels}, got {value!r:.80}")


def checked_tenant(value: Any) -> str | None:
    """A request's tenant: None for the default tenant, whether named or not (so a request has
    one form on the wire); ValueError naming the pattern for a malformed name."""
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(TENANT_PATTERN, value):
        raise ValueError(
            f"tenant must match {TENANT_PATTERN} (letters, digits and _.:-, 1 to 64 "
            f"characters), got {value!r:.80}"
        )
    return None if value == DEFAULT_TENANT else value


def checked_deadline_at(value: Any) -> float | None:
    """A deadline in epoch seconds: a finite number > 0, or None for none."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"deadline_at must be a number of epoch seconds, got {value!r:.80}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"deadline_at must be finite epoch seconds > 0, got {value!r:.80}")
    return seconds


def _check_json(name: str, value: Any) -> None:
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} is not JSON-serialisable: {exc}") from None
    try:
        text.encode("utf-8")  # what the HTTP request to the provider will do
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise ValueError(f"{name} is not valid Unicode text: {exc.reason} ({bad!r})") from None


def _checked_model(model: str | None) -> str | None:
    if model is not None and not model.strip():
        raise ValueError("model must not be empty")
    return model


def _checked_params(params: dict[str, Any], reserved_names: frozenset[str]) -> dict[str, Any]:
    scheduling = sorted(SCHEDULING_PARAMS & params.keys())
    if scheduling:
        raise ValueError(
            f"parameter(s) {scheduling} are not sampling parameters: priority, tenant and a "
            "deadline are submit's own arguments (deadline_s or deadline) and the request's "
            "own fields (deadline_at)"
        )
    reserved = sorted(reserved_names & params.keys())
    if reserved:
        raise ValueError(f"parameter(s) {reserved} cannot be set per request: the worker owns them")
    for name, value in params.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"parameter {name!r} must be a finite number, got {value}")
        _check_json(f"parameter {name!r}", value)
    return params


# The fields both kinds of request share.
ModelName = Annotated[str | None, AfterValidator(_checked_model)]
# A spending budget (Client.create_budget) the job's calls are charged to, besides the
# fleet's PROMPTQ_MAX_SPEND_USD.
BudgetId = Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]
# A named LLM configuration of the workers ([llm.NAME] in their config.toml); None: [llm].
LLMName = Annotated[str | None, Field(pattern=r"^[A-Za-z0-9_\-]{1,64}$")]
PriorityLevel = Annotated[Priority, BeforeValidator(checked_priority)]
TenantName = Annotated[str | None, BeforeValidator(checked_tenant)]
DeadlineAt = Annotated[float | None, BeforeValidator(checked_deadline_at)]

# The scheduling fields and their defaults, which a request's JSON leaves out.
_SCHEDULING_DEFAULTS: dict[str, Any] = {
    "priority": Priority.DEFAULT.value,
    "tenant": None,
    "deadline_at": None,
}


class _ScheduledRequest(BaseModel):
    """What every request carries for the scheduler: its priority, tenant and deadline.

    A field at its default is left out of the request's JSON (model_dump), so a request that
    uses none of them reads as before to a worker that predates them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    priority: PriorityLevel = Priority.DEFAULT
    # None: the tenant named "default" (DEFAULT_TENANT), which a request never names itself.
    tenant: TenantName = None
    # When the job must have started by, in epoch seconds; past it, it fails as
    # deadline_exceeded instead of starting (or retrying). None: no deadline.
    deadline_at: DeadlineAt = None

    @property
    def tenant_name(self) -> str:
        """The tenant the job belongs to: ``tenant``, or "default" when it names none."""
        return self.tenant or DEFAULT_TENANT

    @model_serializer(mode="wrap")
    def _leave_out_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name, default in _SCHEDULING_DEFAULTS.items():
            if name in data and data[name] == default:
                del data[name]
        return data


class PromptRequest(_ScheduledRequest):
    """One chat completion to run: OpenAI-style messages, an optional model, sampling params,
    and how to schedule it (priority, tenant, deadline_at)."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: ModelName = None
    params: dict[str, Any] = Field(default_factory=dict)
    budget: BudgetId = None
    llm: LLMName = None

    @field_validator("messages")
    @classmethod
    def _check_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in MESSAGE_ROLES:
                raise ValueError(
                    f"messages[{index}].role must be one of {sorted(MESSAGE_ROLES)}, got {role!r}"
                )
            content = message.get("content")
            if role != "assistant" and content in (None, "", []):
                raise ValueError(f"messages[{index}] ({role}) has empty content")
            _check_json(f"messages[{index}]", message)
        return messages

    @field_validator("params")
    @classmethod
    def _check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        return _checked_params(params, RESERVED_PARAMS)


class EmbeddingRequest(_ScheduledRequest):
    """Texts to embed in one provider call: the vectors come back in the same order. It is
    scheduled like a prompt (priority, tenant, deadline_at)."""

    input: list[str] = Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
    # None: the worker's LLM_EMBEDDING_MODEL (or its Azure LLM_EMBEDDING_DEPLOYMENT_NAME).
    model: ModelName = None
    params: dict[str, Any] = Field(default_factory=dict)  # e.g. dimensions, user
    budget: BudgetId = None
    llm: LLMName = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, texts: list[str]) -> list[str]:
        for index, text in enumerate(texts):
            if not text.strip():
                raise ValueError(f"input[{index}] is empty")  # providers refuse empty texts
            _check_json(f"input[{index}]", text)
        return texts

    @field_validator("params")
    @classmethod
    def _check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        encoding = params.get("encoding_format", "float")
        if encoding != "float":
            raise ValueError(
                f"encoding_format must be 'float' (results hold lists of floats), got {encoding!r}"
            )
        return _checked_params(params, RESERVED_EMBEDDING_PARAMS)


# What a job can carry: a chat completion or an embeddings call.
JobRequest = PromptRequest | EmbeddingRequest


class Usage(BaseModel):
    """Tokens the provider counted for one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # Of prompt_tokens, those read from the provider's prompt cache (0 when none, or unknown).
    cached_tokens: int = 0


class PromptResult(BaseModel):
    """The answer to one prompt."""

    id: str  # the job id
    model: str  # the model that answered, as the provider names it
    content: str | None  # the assistant's text; None when it only called tools
    message: dict[str, Any]  # the whole assistant message, tool calls included
    finish_reason: str | None
    usage: Usage
    cost_usd: float | None  # LiteLLM's price for the call; None when the model is unpriced
    attempts: int  # provider calls made, the successful one included
    latency_s: float  # how long the successful provider call took
    created: datetime  # when the answer arrived (UTC)


class EmbeddingResult(BaseModel):
    """The vectors of one embeddings request, one per input text, in the same order."""

    id: str  # the job id
    model: str  # the model that answered, as the provider names it
    vectors: list[list[float]]
    usage: Usage  # prompt_tokens (and total_tokens): what the texts counted
    cost_usd: float | None  # the call's price; None when the model is unpriced
    attempts: int  # provider calls made, the successful one included
    latency_s: float  # how long the successful provider call took
    created: datetime  # when the answer arrived (UTC)


# What a successful job holds: the result type of the request it carried.
JobResult = PromptResult | EmbeddingResult


class JobError(BaseModel):
    """Why a job failed, as stored in Redis; the client raises it as JobFailed."""

    kind: ErrorKind
    message: str
    status_code: int | None = None
    attempts: int = 0


class Outcome(BaseModel):
    """The terminal record of a job: exactly one of result or error."""

    status: Literal[JobStatus.SUCCEEDED, JobStatus.FAILED]
    result: PromptResult | EmbeddingResult | None = None
    error: JobError | None = None

    @model_validator(mode="after")
    def _one_of(self) -> Outcome:
        if (self.result is None) == (self.error is None):
            raise ValueError("an outcome holds exactly one of result and error")
        return self
