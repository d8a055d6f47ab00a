"""The promptq.complete task: one attempt at one prompt, then success, retry or failure."""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import Reject
from kombu.exceptions import OperationalError
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
from api_client._wire import task_message

from . import llm
from .classify import Failure, NotConfigured, classify, response_headers

if TYPE_CHECKING:
    from celery import Task

    from .app import PromptqCelery
    from .limiter import Deployment

logger = logging.getLogger("promptq.worker")

# Redis (or the broker connection through it) cannot be reached right now.
REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OperationalError)

# What Celery logs instead of the arguments when it re-publishes a retry: never the prompt.
REDACTED_ARGS = {"argsrepr": "(<request>,)", "kwargsrepr": "{}"}


class RetryableFailure(Exception):
    """A transient provider failure, as Celery logs it when scheduling the retry."""


# A job parked for a reserved slot comes back this long before it (at most
# PROMPTQ_LIMITER_MAX_SLEEP_S) and sleeps the rest, so that moving it and handing it to a
# worker thread do not make it late.
SLOT_LEAD_S = 0.25


def register(app: PromptqCelery) -> None:
    # shared=False: the task belongs to this app only, bound to its settings. max_retries=None:
    # complete() counts provider failures against LLM_NUM_RETRIES itself (Celery's count
    # also includes the deliveries of a job parked for rate-limit capacity).
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
    slot_at: float | None = None,
) -> None:
    """Run one attempt of a job; schedule a retry, or store its outcome.

    ``failures`` counts the provider failures so far (the retry budget); ``reserved_tokens``
    is set when this delivery already holds a rate-limit slot, charged that many tokens,
    starting at ``slot_at`` (epoch seconds). When Redis cannot be reached the message is
    rejected back to the queue (or, if that fails too, left unacknowledged until the
    visibility timeout returns it): a job is never acknowledged without an outcome or a
    follow-up message.
    """
    try:
        _attempt(task, request, failures, reserved_tokens, slot_at)
    except REDIS_UNAVAILABLE as exc:
        logger.warning(
            "job %s goes back to the queue: Redis is unavailable (%s)", task.request.id, exc
        )
        raise Reject(f"Redis unavailable: {exc}", requeue=True) from None


def _attempt(
    task: Task,
    request: dict[str, Any],
    failures: int,
    reserved_tokens: int | None,
    slot_at: float | None,
) -> None:
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
        if reserved_tokens is None:
            return  # parked: it comes back for its slot
    elif slot_at is not None and slot_at > time.time():
        time.sleep(min(slot_at - time.time(), app.settings.queue.limiter_max_sleep_s))
    started = time.monotonic()
    try:
        completion = llm.complete(app.settings.llm, parsed)
    except Exception as exc:  # every failure is classified; none escapes to Celery
        _after_failure(task, deployment, reserved_tokens, exc, failures)
        return

    result = PromptResult(
        id=job_id,
        model=completion.model,
        content=completion.content,
        message=completion.message,
        finish_reason=completion.finish_reason,
        usage=completion.usage,
        cost_usd=completion.cost_usd,
        attempts=failures + 1,
        latency_s=time.monotonic() - started,
        created=datetime.now(UTC),
    )
    # The paid answer is stored first (riding out a short Redis outage); the limiter's
    # bookkeeping after it is best effort.
    app.store.finish(job_id, Outcome(status=JobStatus.SUCCEEDED, result=result), patient=True)
    charged = llm.charged_tokens(completion.usage, parsed) if completion.usage.total_tokens else 0
    _settle(
        app,
        deployment,
        reserved_tokens=reserved_tokens,
        charged_tokens=charged or reserved_tokens,
        outcome="ok",
        headers=completion.headers,
    )


def _after_failure(
    task: Task, deployment: Deployment, reserved_tokens: int, exc: Exception, failures: int
) -> None:
    """Classify a failed call; schedule its retry while the budget lasts, else store it."""
    app: PromptqCelery = task.app
    job_id: str = task.request.id
    failure = classify(exc, secrets=_secrets(app))
    rate_limited = failure.kind is ErrorKind.RATE_LIMITED
    headers: dict[str, Any] = {}
    for found in response_headers(exc):
        headers.update(found)
    _settle(
        app,
        deployment,
        reserved_tokens=reserved_tokens,
        # A refused request costs nothing; anything else may have been counted.
        charged_tokens=0 if rate_limited else reserved_tokens,
        outcome="rate_limited" if rate_limited else "error",
        retry_after_s=failure.retry_after_s,
        headers=headers,
    )
    # A call refused before it was sent (missing key, say) is not an attempt.
    attempts = failures if isinstance(exc, NotConfigured) else failures + 1
    if failure.retryable and failures < app.settings.llm.num_retries:
        wait_s = app.retry_policy.wait_s(failures, failure.retry_after_s)
        app.store.mark_retrying(job_id)
        raise task.retry(
            countdown=wait_s,
            kwargs={"failures": attempts},
            exc=RetryableFailure(failure.summary()),
            **REDACTED_ARGS,
        ) from None
    _fail(app, job_id, failure, attempts=attempts)


def _settle(app: PromptqCelery, deployment: Deployment, **how: Any) -> None:
    """Tell the limiter how a call went; a Redis outage only costs that bookkeeping."""
    try:
        app.limiter.settle(deployment, **how)
    except REDIS_UNAVAILABLE as exc:
        logger.warning("rate limiter of %s not updated: %s", deployment.model, exc)


def _take_slot(
    task: Task, deployment: Deployment, request: PromptRequest, failures: int
) -> int | None:
    """Wait for the deployment's rate limit to allow this call: return the tokens charged,
    or None when the job was parked to come back later (the task then ends).

    A wait of up to PROMPTQ_LIMITER_MAX_SLEEP_S is slept in this worker thread. A longer
    one gives the thread back: the slot stays reserved and the job is parked in Redis until
    just before it; when no slot is free within PROMPTQ_LIMITER_MAX_AHEAD_S, the job is
    parked to ask again later. Neither spends a retry.
    """
    app: PromptqCelery = task.app
    max_sleep_s = app.settings.queue.limiter_max_sleep_s
    limiter = app.limiter
    tokens = 0
    if limiter.counts_tokens(deployment):
        reply_tokens = app.settings.queue.limiter_reply_tokens
        tokens = llm.estimate_tokens(deployment.model, request, reply_tokens)
    grant = limiter.acquire(deployment, tokens)
    if grant.granted and grant.wait_s <= max_sleep_s:
        if grant.wait_s > 0:
            time.sleep(grant.wait_s)
        return tokens
    state: dict[str, Any] = {"failures": failures}
    if grant.granted:  # back shortly before the slot, then sleep the rest of the way
        delay_s = grant.wait_s - min(max_sleep_s, SLOT_LEAD_S)
        state |= {"reserved_tokens": tokens, "slot_at": time.time() + grant.wait_s}
    else:  # spread the jobs that found no slot, so they do not all ask again at once
        spread = random.uniform(0.25, 0.5)  # noqa: S311
        delay_s = grant.wait_s + spread * app.settings.limiter_max_ahead_s
    job_id: str = task.request.id
    app.store.mark_waiting(job_id)
    retries = task.request.retries + 1  # one more delivery of this job
    app.parking.park(task_message(job_id, request, kwargs=state, retries=retries), delay_s)
    logger.info("job %s parked %.1f s for the rate limit of %s", job_id, delay_s, deployment.model)
    return None


def _fail(app: PromptqCelery, job_id: str, failure: Failure, *, attempts: int) -> None:
    error = JobError(
        kind=failure.kind,
        message=failure.message,
        status_code=failure.status_code,
        attempts=attempts,
    )
    if app.store.finish(job_id, Outcome(status=JobStatus.FAILED, error=error), patient=True):
        logger.warning("job %s failed after %d attempt(s): %s", job_id, attempts, failure.summary())


def _secrets(app: PromptqCelery) -> tuple[str, ...]:
    key = app.settings.llm.api_key
    return (key.get_secret_value(),) if key else ()
