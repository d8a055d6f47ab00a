"""Submissions checked before any publish: requests built and validated, budgets, job ids."""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from ._constants import IDEMPOTENCY_NAMESPACE
from ._errors import InvalidRequest
from ._schemas import EmbeddingRequest, JobRequest, Priority, PromptRequest

_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_BUDGET_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
MAX_IDEMPOTENCY_KEY_CHARS = 1024


def build_request(
    prompt: str | None,
    messages: Any,
    model: str | None,
    params: Mapping[str, Any],
    *,
    budget: str | None = None,
    llm: str | None = None,
    priority: Priority | str | None = None,
    tenant: str | None = None,
    deadline_s: float | None = None,
    deadline: datetime | float | None = None,
) -> PromptRequest:
    """Validate one submission; raise InvalidRequest naming the problem."""
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of prompt or messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidRequest("prompt is empty")
        messages = [{"role": "user", "content": prompt}]
    elif not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise InvalidRequest("messages must be a list of {'role': ..., 'content': ...} mappings")
    scheduling = _scheduling(priority, tenant, deadline_s, deadline)
    try:
        return PromptRequest(
            messages=[dict(m) for m in messages],
            model=model,
            params=dict(params),
            budget=budget,
            llm=llm,
            **scheduling,
        )
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def build_embedding_request(
    texts: Any,
    model: str | None,
    params: Mapping[str, Any],
    *,
    budget: str | None = None,
    llm: str | None = None,
    priority: Priority | str | None = None,
    tenant: str | None = None,
    deadline_s: float | None = None,
    deadline: datetime | float | None = None,
) -> EmbeddingRequest:
    """Validate one embeddings submission (a text or a list of texts); raise InvalidRequest."""
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("texts must be a string or a list of strings")
    scheduling = _scheduling(priority, tenant, deadline_s, deadline)
    try:
        return EmbeddingRequest(
            input=list(texts),
            model=model,
            params=dict(params),
            budget=budget,
            llm=llm,
            **scheduling,
        )
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def _scheduling(priority: Any, tenant: Any, deadline_s: Any, deadline: Any) -> dict[str, Any]:
    """The request fields that submit's scheduling arguments give (None: the field's default)."""
    fields: dict[str, Any] = {"tenant": tenant, "deadline_at": deadline_at(deadline_s, deadline)}
    if priority is not None:
        fields["priority"] = priority
    return fields


def deadline_at(deadline_s: Any, deadline: Any) -> float | None:
    """The epoch seconds a job must start by, from submit's ``deadline_s`` (seconds from now)
    or ``deadline`` (a timezone-aware datetime, or epoch seconds); None when neither is given.
    Raises InvalidRequest for both, or for a value that is not a time."""
    if deadline_s is not None and deadline is not None:
        raise InvalidRequest(
            "give at most one of deadline_s (seconds from now) and deadline (an absolute time)"
        )
    if deadline_s is not None:
        seconds = _finite(deadline_s)
        if seconds is None or seconds <= 0:
            raise InvalidRequest(
                f"deadline_s must be a finite number of seconds > 0, got {deadline_s!r:.80}"
            )
        return time.time() + seconds
    if deadline is None:
        return None
    if isinstance(deadline, datetime):
        if deadline.utcoffset() is None:
            raise InvalidRequest(
                "deadline must be timezone-aware (e.g. datetime.now(timezone.utc) + "
                f"timedelta(minutes=5)), got the naive {deadline.isoformat()}"
            )
        at = deadline.timestamp()
    elif isinstance(deadline, int | float) and not isinstance(deadline, bool):
        at = deadline
    else:
        raise InvalidRequest(
            "deadline must be a timezone-aware datetime or epoch seconds, "
            f"got {type(deadline).__name__} {deadline!r:.80}"
        )
    seconds = _finite(at)
    if seconds is None or seconds <= 0:
        raise InvalidRequest(
            f"deadline must be finite epoch seconds > 0 (after 1970), got {at!r:.80}"
        )
    return seconds


def _finite(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        return None
    return number if math.isfinite(number) else None


@dataclass(frozen=True)
class Submission:
    """One validated request and the id of the job that will carry it."""

    job_id: str
    request: JobRequest
    # A job with a new id may share a message with others; one named by an idempotency key
    # is published on its own (its publish must be a no-op when the job exists).
    packable: bool = False


def submission(
    request: JobRequest, idempotency_key: str | None, max_prompt_chars: int
) -> Submission:
    """Check the request's size and give it its job id: new, or the idempotency key's."""
    check_size(request, max_prompt_chars)
    if idempotency_key is None:
        return Submission(new_job_id(), request, packable=True)
    return Submission(idempotent_job_id(idempotency_key), request)


def submissions(
    items: Iterable[JobRequest | str | Mapping[str, Any]], max_prompt_chars: int
) -> list[Submission]:
    """submit_many's input, every item checked before any is published.

    An item is a PromptRequest or an EmbeddingRequest, a prompt string, or a mapping with
    ``prompt`` or ``messages``, optional ``model``, ``llm``, ``idempotency_key``, ``budget``,
    ``priority``, ``tenant``, ``deadline_s`` and ``deadline``, and sampling parameters
    beside them (as ``submit`` takes them). An error names the item's index.
    """
    checked = []
    for index, item in enumerate(items):
        try:
            checked.append(_coerce(item, max_prompt_chars))
        except InvalidRequest as exc:
            raise InvalidRequest(f"requests[{index}]: {exc.message}") from None
    return checked


def _coerce(item: JobRequest | str | Mapping[str, Any], max_prompt_chars: int) -> Submission:
    if isinstance(item, PromptRequest | EmbeddingRequest):
        return submission(item, None, max_prompt_chars)
    if isinstance(item, str):
        return submission(build_request(item, None, None, {}), None, max_prompt_chars)
    if isinstance(item, Mapping):
        fields = dict(item)
        prompt = fields.pop("prompt", None)
        messages = fields.pop("messages", None)
        model = fields.pop("model", None)
        key = fields.pop("idempotency_key", None)
        named = {
            name: fields.pop(name, None)
            for name in ("budget", "llm", "priority", "tenant", "deadline_s", "deadline")
        }
        request = build_request(prompt, messages, model, fields, **named)
        return submission(request, key, max_prompt_chars)
    raise InvalidRequest(
        "each request must be a string, a mapping, a PromptRequest or an EmbeddingRequest, "
        f"got {type(item).__name__}"
    )


def prompt_chars(value: Any) -> int:
    """Characters of text in messages: every string in them, at any depth (content, text
    parts, tool-call arguments, data URLs), so the count bounds the message's size."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(prompt_chars(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(prompt_chars(item) for item in value)
    return 0


def check_size(request: JobRequest, max_prompt_chars: int) -> None:
    """Refuse a prompt (or all of an embedding request's texts) above the size limit."""
    if isinstance(request, EmbeddingRequest):
        chars, what = prompt_chars(request.input), "the texts to embed are"
    else:
        chars, what = prompt_chars(request.messages), "the prompt is"
    if chars > max_prompt_chars:
        raise InvalidRequest(
            f"{what} {chars:,} characters, above the limit of {max_prompt_chars:,} "
            "(max_prompt_chars, PROMPTQ_MAX_PROMPT_CHARS)"
        )


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        named = not where or message.startswith(f"{where} ")  # "priority must be one of ..."
        problems.append(message if named else f"{where}: {message}")
    return "invalid request: " + "; ".join(problems)


def check_budget(max_spend_usd: float, budget_id: str | None) -> tuple[str, float]:
    """A budget's id (a new one unless given) and its cap, both checked."""
    if isinstance(max_spend_usd, bool) or not isinstance(max_spend_usd, int | float):
        raise InvalidRequest(f"max_spend_usd must be a number, got {max_spend_usd!r}")
    if not math.isfinite(max_spend_usd) or max_spend_usd < 0:
        raise InvalidRequest(f"max_spend_usd must be a finite amount >= 0, got {max_spend_usd}")
    budget_id = budget_id if budget_id is not None else f"budget-{uuid.uuid4()}"
    if not isinstance(budget_id, str) or not _BUDGET_ID.fullmatch(budget_id):
        raise InvalidRequest(f"not a budget id (letters, digits, _.:- up to 128): {budget_id!r}")
    return budget_id, float(max_spend_usd)


def new_job_id() -> str:
    return str(uuid.uuid4())


def idempotent_job_id(idempotency_key: Any) -> str:
    """The job id an idempotency key names: the same key always gives the same job.

    The job's own keys in Redis are then the record of the key: publishing is a no-op for a
    job id that already has a state or a result (see _publish._PUBLISH), for as long as they
    are kept.
    """
    if not isinstance(idempotency_key, str) or not idempotency_key:
        raise InvalidRequest(
            f"idempotency_key must be a non-empty string, got {idempotency_key!r:.60}"
        )
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(
            f"idempotency_key is {len(idempotency_key):,} characters, above the limit of "
            f"{MAX_IDEMPOTENCY_KEY_CHARS:,}"
        )
    return f"idem-{uuid.uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key)}"


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidRequest(f"not a job id: {job_id!r}")
    return job_id
