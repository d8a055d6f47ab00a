"""The promptq.complete task: one attempt at one prompt, then success, retry or failure."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from api_client._constants import TASK_NAME
from api_client._schemas import (
    ErrorKind,
    JobError,
    JobStatus,
    Outcome,
    PromptRequest,
    PromptResult,
)

from . import llm
from .classify import Failure, classify

if TYPE_CHECKING:
    from celery import Task

    from .app import PromptqCelery

logger = logging.getLogger("promptq.worker")

# What Celery logs instead of the arguments when it re-publishes a retry: never the prompt.
REDACTED_ARGS = {"argsrepr": "(<request>,)", "kwargsrepr": "{}"}


class RetryableFailure(Exception):
    """A transient provider failure, as Celery logs it when scheduling the retry."""


def register(app: PromptqCelery) -> None:
    # shared=False: the task belongs to this app only, bound to its settings.
    app.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True, shared=False)(complete)


def complete(task: Task, request: dict[str, Any]) -> None:
    """Run one attempt of a job; schedule a retry, or store its outcome."""
    app: PromptqCelery = task.app
    job_id: str = task.request.id
    retries: int = task.request.retries
    attempts = retries + 1
    starts = app.store.begin(job_id)
    if starts is None:
        logger.info("job %s already has an outcome; dropped a duplicate delivery", job_id)
        return
    redeliveries = starts - attempts
    if redeliveries > app.settings.queue.max_redeliveries:
        message = f"the worker running this job died {redeliveries} times"
        _fail(app, job_id, Failure(ErrorKind.WORKER_LOST, message), attempts=retries)
        return
    try:
        parsed = PromptRequest.model_validate(request)
    except ValidationError as exc:
        _fail(app, job_id, Failure(ErrorKind.BAD_REQUEST, f"invalid request: {exc}"), attempts=0)
        return

    started = time.monotonic()
    try:
        completion = llm.complete(app.settings.llm, parsed)
    except Exception as exc:  # every failure is classified; none escapes to Celery
        failure = classify(exc, secrets=_secrets(app))
        num_retries = app.settings.llm.num_retries
        if failure.retryable and retries < num_retries:
            wait_s = app.retry_policy.wait_s(retries, failure.retry_after_s)
            app.store.mark_retrying(job_id)
            raise task.retry(
                countdown=wait_s,
                max_retries=num_retries,
                exc=RetryableFailure(failure.summary()),
                **REDACTED_ARGS,
            ) from None
        _fail(app, job_id, failure, attempts=attempts)
        return

    result = PromptResult(
        id=job_id,
        model=completion.model,
        content=completion.content,
        message=completion.message,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
        cost_usd=completion.cost_usd,
        attempts=attempts,
        latency_s=time.monotonic() - started,
        created=datetime.now(UTC),
    )
    app.store.finish(job_id, Outcome(status=JobStatus.SUCCEEDED, result=result))


def _fail(app: PromptqCelery, job_id: str, failure: Failure, *, attempts: int) -> None:
    error = JobError(
        kind=failure.kind,
        message=failure.message,
        status_code=failure.status_code,
        attempts=attempts,
    )
    if app.store.finish(job_id, Outcome(status=JobStatus.FAILED, error=error)):
        logger.warning("job %s failed after %d attempt(s): %s", job_id, attempts, failure.summary())


def _secrets(app: PromptqCelery) -> tuple[str, ...]:
    key = app.settings.llm.api_key
    return (key.get_secret_value(),) if key else ()
