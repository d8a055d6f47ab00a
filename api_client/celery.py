"""promptq's tasks for Celery code that imports promptq: typed signatures, and results read back.

Imports Celery (``import api_client`` does not import this module). Without it, send the
tasks by name as the README's "Use promptq from your own Celery app" shows: this module
builds exactly those messages, with the request checked before anything is sent.

>>> from celery import chain
>>> from api_client.celery import signature
>>> chain(signature("Name three primes.", temperature=0), summarise.s()).apply_async()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from celery import Celery, Signature
from celery import signature as celery_signature

from ._celery_contract import FAILED_EXC_TYPE
from ._constants import EMBED_TASK_NAME, QUEUE, TASK_NAME
from ._errors import JobFailed
from ._requests import build_embedding_request, build_request, check_size
from ._schemas import EmbeddingResult, JobError, JobRequest, Priority, PromptResult
from ._settings import ClientSettings

__all__ = ["embedding_signature", "job_failed", "result_of", "signature"]


def signature(
    prompt: str | None = None,
    *,
    messages: list[dict[str, Any]] | None = None,
    model: str | None = None,
    budget: str | None = None,
    llm: str | None = None,
    priority: Priority | str | None = None,
    tenant: str | None = None,
    deadline_s: float | None = None,
    deadline: datetime | float | None = None,
    app: Celery | None = None,
    **params: Any,
) -> Signature:
    """A signature of ``promptq.complete`` on promptq's queue, with the arguments
    Client.submit takes (checked here: InvalidRequest, and nothing is built). Its result is
    a PromptResult's fields as a dict (``result_of`` reads it back).

    The signature is immutable: in a chain it ignores the previous step's result, so it can
    stand anywhere. ``deadline_s`` counts from now. ``app``: the Celery app to bind it to.
    """
    request = build_request(
        prompt,
        messages,
        model,
        params,
        budget=budget,
        llm=llm,
        priority=priority,
        tenant=tenant,
        deadline_s=deadline_s,
        deadline=deadline,
    )
    return _signature(TASK_NAME, request, app)


def embedding_signature(
    texts: str | Sequence[str],
    model: str | None = None,
    *,
    budget: str | None = None,
    llm: str | None = None,
    priority: Priority | str | None = None,
    tenant: str | None = None,
    deadline_s: float | None = None,
    deadline: datetime | float | None = None,
    app: Celery | None = None,
    **params: Any,
) -> Signature:
    """A signature of ``promptq.embed``, as Client.embed takes its arguments; see
    ``signature``. Its result is an EmbeddingResult's fields as a dict."""
    request = build_embedding_request(
        texts,
        model,
        params,
        budget=budget,
        llm=llm,
        priority=priority,
        tenant=tenant,
        deadline_s=deadline_s,
        deadline=deadline,
    )
    return _signature(EMBED_TASK_NAME, request, app)


def _signature(task_name: str, request: JobRequest, app: Celery | None) -> Signature:
    check_size(request, ClientSettings().max_prompt_chars)
    args = [request.model_dump(mode="json")]
    return celery_signature(task_name, args=args, queue=QUEUE, immutable=True, app=app)


def result_of(value: Mapping[str, Any]) -> PromptResult | EmbeddingResult:
    """The typed result of what ``AsyncResult.get()`` returned for a promptq task."""
    if "vectors" in value:
        return EmbeddingResult.model_validate(value)
    return PromptResult.model_validate(value)


def job_failed(exc: BaseException, job_id: str | None = None) -> JobFailed | None:
    """The JobFailed (kind, message, status_code, attempts) that an exception raised by
    ``AsyncResult.get()`` for a failed promptq job holds; None for any other exception.

    >>> try:
    ...     result.get(timeout=600)
    ... except Exception as exc:
    ...     failed = job_failed(exc, result.id)
    ...     if failed is None:
    ...         raise
    ...     print(failed.kind, failed.message)
    """
    if type(exc).__name__ != FAILED_EXC_TYPE or len(exc.args) != 1:
        return None
    if isinstance(exc, JobFailed):
        return exc
    try:
        error = JobError.model_validate(exc.args[0])
    except ValueError:
        return None
    return JobFailed(
        error.message,
        job_id=job_id or "?",
        kind=error.kind.value,
        status_code=error.status_code,
        attempts=error.attempts,
    )
