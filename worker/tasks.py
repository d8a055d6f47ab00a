"""The promptq.complete task: one attempt at one prompt, then success, retry or failure."""

from __future__ import annotations

import logging
import random
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
from .classify import Failure, NotConfigured, classify, response_headers

if TYPE_CHECKING:
    from celery import Task

    from .app import PromptqCelery
    from .limiter import Deployment

logger = logging.getLogger("promptq.worker")

# What Celery logs instead of the arguments when it re-publishes a retry: never the prompt.
REDACTED_ARGS = {"argsrepr": "(<request>,)", "kwargsrepr": "{}"}


class RetryableFailure(Exception):
    """A transient provider failure, as Celery logs it when scheduling the retry."""


class WaitingForCapacity(Exception):
    """The deployment's rate limit has no slot now, as Celery logs the re-queue."""


def register(app: PromptqCelery) -> None:
    # shared=False: the task belongs to this app only, bound to its settings. max_retries=None:
    # Celery puts no cap on re-publishes; complete() counts provider failures against
    # LLM_NUM_RETRIES itself, and waits for rate-limit capacity count against nothing.
    app.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        ignore_result=True,
        shared=False,
        max_retries=None,
    )(complete)


def complete(
    task: Task,
    request: dict[str, Any],
    failures: int = 0,
    reserved_tokens: int | None = None,
) -> None:
    """Run one attempt of a job; schedule a retry, or store its outcome.

    ``failures`` counts the provider failures so far (the retry budget); ``reserved_tokens``
    is set when this delivery already holds a rate-limit slot, charged that many tokens.
    """
    app: PromptqCelery = task.app
    job_id: str = task.request.id
    # Every re-publish (a retry or a wait for capacity) is a new delivery of the same job.
    deliveries = task.request.retries + 1
    starts = app.store.begin(job_id)
    if starts is None:
        logger.info("job %s already has an outcome; dropped a duplicate delivery", job_id)
        return
    redeliveries = starts - deliveries
    if redeliveries > app.settings.queue.max_redeliveries:
        message = f"the worker running this job died {redeliveries} times"
        _fail(app, job_id, Failure(ErrorKind.WORKER_LOST, message), attempts=failures)
        return
    try:
        parsed = PromptRequest.model_validate(request)
        model = llm.model_of(app.settings.llm, parsed)
    except ValidationError as exc:
        _fail(app, job_id, Failure(ErrorKind.BAD_REQUEST, f"invalid request: {exc}"), attempts=0)
        return
    except NotConfigured as exc:
        _fail(app, job_id, classify(exc), attempts=0)
        return

    deployment = app.deployment(model)
    if reserved_tokens is None:
        reserved_tokens = _take_slot(task, deployment, parsed, failures)
    attempts = failures + 1
    started = time.monotonic()
    try:
        completion = llm.complete(app.settings.llm, parsed)
    except Exception as exc:  # every failure is classified; none escapes to Celery
        failure = classify(exc, secrets=_secrets(app))
        _settle_failure(app, deployment, reserved_tokens, failure, exc)
        num_retries = app.settings.llm.num_retries
        if failure.retryable and failures < num_retries:
            wait_s = app.retry_policy.wait_s(failures, failure.retry_after_s)
            app.store.mark_retrying(job_id)
            raise task.retry(
                countdown=wait_s,
                kwargs={"failures": attempts},
                exc=RetryableFailure(failure.summary()),
                **REDACTED_ARGS,
            ) from None
        _fail(app, job_id, failure, attempts=attempts)
        return

    charged = llm.charged_tokens(completion.usage, parsed) if completion.usage.total_tokens else 0
    app.limiter.settle(
        deployment,
        reserved_tokens=reserved_tokens,
        charged_tokens=charged or reserved_tokens,
        outcome="ok",
        headers=completion.headers,
    )
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


def _take_slot(task: Task, deployment: Deployment, request: PromptRequest, failures: int) -> int:
    """Wait for the deployment's rate limit to allow this call; return the tokens charged.

    A short wait is slept in this worker thread. A longer one gives the thread back: the job
    is re-queued to come back at its reserved slot (or, when no slot is free within
    PROMPTQ_LIMITER_MAX_AHEAD_S, to ask again later). Neither spends a retry.
    """
    app: PromptqCelery = task.app
    queue = app.settings.queue
    limiter = app.limiter
    tokens = 0
    if limiter.counts_tokens(deployment):
        tokens = llm.estimate_tokens(deployment.model, request, queue.limiter_reply_tokens)
    grant = limiter.acquire(deployment, tokens)
    if grant.granted and grant.wait_s <= queue.limiter_max_sleep_s:
        if grant.wait_s > 0:
            time.sleep(grant.wait_s)
        return tokens
    if grant.granted:
        countdown, reserved = grant.wait_s, tokens
    else:  # spread the jobs that found no slot, so they do not all ask again at once
        countdown = grant.wait_s + random.uniform(0.25, 0.5) * app.settings.limiter_max_ahead_s  # noqa: S311
        reserved = None
    app.store.mark_waiting(task.request.id)
    raise task.retry(
        countdown=countdown,
        kwargs={"failures": failures, "reserved_tokens": reserved},
        exc=WaitingForCapacity(f"rate limit of {deployment.model}: next slot in {countdown:.1f}s"),
        **REDACTED_ARGS,
    )


def _settle_failure(
    app: PromptqCelery,
    deployment: Deployment,
    reserved_tokens: int,
    failure: Failure,
    exc: BaseException,
) -> None:
    """Tell the limiter how a failed call went: a 429 (and its Retry-After) slows the fleet."""
    rate_limited = failure.kind is ErrorKind.RATE_LIMITED
    headers: dict[str, Any] = {}
    for found in response_headers(exc):
        headers.update(found)
    app.limiter.settle(
        deployment,
        reserved_tokens=reserved_tokens,
        # A refused request costs nothing; anything else may have been counted.
        charged_tokens=0 if rate_limited else reserved_tokens,
        outcome="rate_limited" if rate_limited else "error",
        retry_after_s=failure.retry_after_s,
        headers=headers,
    )


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
