"""The promptq.complete and promptq.embed tasks: one attempt at one job, then success, retry
or failure."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import redis
from celery.exceptions import Reject
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from api_client._constants import EMBED_TASK_NAME, TASK_NAME
from api_client._schemas import (
    EmbeddingRequest,
    EmbeddingResult,
    ErrorKind,
    JobError,
    JobRequest,
    JobResult,
    JobStatus,
    Outcome,
    PromptRequest,
    PromptResult,
)

from . import llm
from .classify import Failure, NotConfigured, classify, response_headers
from .spend import BudgetExceeded, Reservation
from .throttle import sleep_until_slot, take_slot

if TYPE_CHECKING:
    from celery import Task

    from .app import PromptqCelery
    from .limiter import Deployment
    from .settings import LLMSettings

logger = logging.getLogger("promptq.worker")

# Redis (or the broker connection through it) cannot be reached right now.
REDIS_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OperationalError)

# What Celery logs instead of the arguments when it re-publishes a retry: never the prompt.
REDACTED_ARGS = {"argsrepr": "(<request>,)", "kwargsrepr": "{}"}


class RetryableFailure(Exception):
    """A transient provider failure, as Celery logs it when scheduling the retry."""


def register(app: PromptqCelery) -> None:
    # shared=False: the task belongs to this app only, bound to its settings. max_retries=None:
    # complete() counts provider failures against LLM_NUM_RETRIES itself (Celery's count
    # also includes the deliveries of a job parked for rate-limit capacity).
    for name, run in ((TASK_NAME, complete), (EMBED_TASK_NAME, embed)):
        app.task(
            name=name,
            bind=True,
            acks_late=True,
            ignore_result=True,
            shared=False,
            max_retries=None,
        )(run)


def complete(
    task: Task,
    request: dict[str, Any],
    failures: int = 0,
    reserved_tokens: int | None = None,
    slot_at: float | None = None,
) -> None:
    """Run one attempt of a chat-completion job (see run)."""
    run(task, PromptRequest, request, failures, (reserved_tokens, slot_at))


def embed(
    task: Task,
    request: dict[str, Any],
    failures: int = 0,
    reserved_tokens: int | None = None,
    slot_at: float | None = None,
) -> None:
    """Run one attempt of an embeddings job (see run)."""
    run(task, EmbeddingRequest, request, failures, (reserved_tokens, slot_at))


def run(
    task: Task,
    request_type: type[JobRequest],
    request: dict[str, Any],
    failures: int,
    reserved: tuple[int | None, float | None],
) -> None:
    """Run one attempt of a job; schedule a retry, or store its outcome.

    ``request`` is the message's request, read as ``request_type``; ``failures`` counts the
    provider failures so far (the retry budget); ``reserved`` holds (tokens, slot_at) when
    this delivery already holds a rate-limit slot, charged that many tokens, starting at
    slot_at (epoch seconds), else (None, None). When Redis cannot be reached the message is
    rejected back to the queue (or, if that fails too, left unacknowledged until the
    visibility timeout returns it): a job is never acknowledged without an outcome or a
    follow-up message.
    """
    try:
        _attempt(task, request_type, request, failures, reserved)
    except REDIS_UNAVAILABLE as exc:
        logger.warning(
            "job %s goes back to the queue: Redis is unavailable (%s)", task.request.id, exc
        )
        raise Reject(f"Redis unavailable: {exc}", requeue=True) from None


def _attempt(
    task: Task,
    request_type: type[JobRequest],
    request: dict[str, Any],
    failures: int,
    reserved: tuple[int | None, float | None],
) -> None:
    started_job = _start(task, request_type, request, failures)
    if started_job is None:
        return
    parsed, model = started_job
    call = _prepare(task, parsed, model, failures, reserved=reserved)
    if call is None:
        return
    started = time.monotonic()
    try:
        with task.app.metrics.timing(call.deployment.model):
            answer = llm.call(call.llm, call.request)
    except Exception as exc:  # every failure is classified; none escapes to Celery
        _after_failure(task, call, exc, failures)
        return
    _after_success(task, call, answer, failures + 1, time.monotonic() - started)


def _start(
    task: Task, request_type: type[JobRequest], request: dict[str, Any], failures: int
) -> tuple[JobRequest, str] | None:
    """Mark the job running and read its request and model; None when it ends here."""
    app: PromptqCelery = task.app
    job_id: str = task.request.id
    # Every re-publish (a retry or a wait for capacity) is a new delivery of the same job.
    deliveries = task.request.retries + 1
    starts = app.store.begin(job_id)
    if starts is None:
        logger.info("job %s already has an outcome; dropped a duplicate delivery", job_id)
        return None
    redeliveries = starts - deliveries
    if redeliveries > app.settings.queue.max_redeliveries:
        message = f"the worker running this job died {redeliveries} times"
        _fail(app, job_id, Failure(ErrorKind.WORKER_LOST, message), attempts=failures)
        return None
    try:
        parsed = request_type.model_validate(request)
        return parsed, llm.model_of(app.llm_settings(parsed.llm), parsed)
    except ValidationError as exc:
        _fail(app, job_id, Failure(ErrorKind.BAD_REQUEST, f"invalid request: {exc}"), attempts=0)
    except NotConfigured as exc:
        _fail(app, job_id, classify(exc), attempts=0)
    return None


def _prepare(
    task: Task,
    request: JobRequest,
    model: str,
    failures: int,
    *,
    reserved: tuple[int | None, float | None],
) -> _Call | None:
    """Take a rate-limit slot (unless ``reserved`` holds one: its tokens and time) and set
    money aside under a spending cap; None when the job was parked or refused."""
    app: PromptqCelery = task.app
    reserved_tokens, slot_at = reserved
    llm_settings = app.llm_settings(request.llm)
    deployment = app.deployment(model, request.llm)
    if reserved_tokens is None:
        reserved_tokens = take_slot(task, deployment, request, failures)
        if reserved_tokens is None:
            return None  # parked: it comes back for its slot
    else:
        sleep_until_slot(app, slot_at)
    try:
        reservation = _reserve_spend(app, request, model, llm_settings)
    except BudgetExceeded as exc:
        failure = Failure(ErrorKind.BUDGET_EXCEEDED, str(exc))
        app.metrics.budget_refused(model)
        _fail(app, task.request.id, failure, attempts=failures)
        return None
    except NotConfigured as exc:
        _fail(app, task.request.id, classify(exc), attempts=failures)
        return None
    return _Call(request, llm_settings, deployment, reserved_tokens, reservation)


def _after_success(
    task: Task, call: _Call, answer: llm.Answer, attempts: int, latency_s: float
) -> None:
    """Store the answer, then book what it cost."""
    app: PromptqCelery = task.app
    cost_usd = answer.cost_usd
    if cost_usd is None and call.reservation is not None:
        cost_usd = call.reservation.amount_usd  # priced before the call; keep the cap honest
    result = _result_of(task.request.id, answer, cost_usd, attempts, latency_s)
    # The paid answer is stored first (riding out a short Redis outage); the bookkeeping
    # after it is best effort.
    outcome = Outcome(status=JobStatus.SUCCEEDED, result=result)
    app.store.finish(task.request.id, outcome, patient=True)
    app.metrics.call_succeeded(call.deployment.model, answer.usage, cost_usd)
    usage = answer.usage
    charged = llm.charged_tokens(usage, call.request) if usage.total_tokens else 0
    _book(
        app,
        call,
        cost_usd=cost_usd or 0.0,
        charged_tokens=charged or call.reserved_tokens,
        outcome="ok",
        headers=answer.headers,
    )


def _result_of(
    job_id: str, answer: llm.Answer, cost_usd: float | None, attempts: int, latency_s: float
) -> JobResult:
    """The stored result of a successful call."""
    if isinstance(answer, llm.Embedding):
        return EmbeddingResult(
            id=job_id,
            model=answer.model,
            vectors=answer.vectors,
            usage=answer.usage,
            cost_usd=cost_usd,
            attempts=attempts,
            latency_s=latency_s,
            created=datetime.now(UTC),
        )
    return PromptResult(
        id=job_id,
        model=answer.model,
        content=answer.content,
        message=answer.message,
        finish_reason=answer.finish_reason,
        usage=answer.usage,
        cost_usd=cost_usd,
        attempts=attempts,
        latency_s=latency_s,
        created=datetime.now(UTC),
    )


@dataclass(frozen=True)
class _Call:
    """One provider call about to be made, and what was set aside for it."""

    request: JobRequest
    llm: LLMSettings  # the job's LLM settings: the default [llm] or its [llm.NAME]
    deployment: Deployment
    reserved_tokens: int  # charged to the rate limiter
    reservation: Reservation | None  # money set aside under a spending cap


def _reserve_spend(
    app: PromptqCelery, request: JobRequest, model: str, llm_settings: LLMSettings
) -> Reservation | None:
    """Under a spending cap, set the call's highest likely cost aside (BudgetExceeded when
    there is no room; NotConfigured when the model has no price)."""
    if not app.spend.applies(request.budget):
        return None
    reply_tokens = app.settings.queue.limiter_reply_tokens
    estimate_usd = llm.estimate_cost_usd(llm_settings, model, request, reply_tokens)
    return app.spend.reserve(request.budget, estimate_usd)


def _after_failure(task: Task, call: _Call, exc: Exception, failures: int) -> None:
    """Classify a failed call; schedule its retry while the budget lasts, else store it."""
    app: PromptqCelery = task.app
    job_id: str = task.request.id
    failure = classify(exc, secrets=app.secrets)
    app.metrics.call_failed(call.deployment.model, failure.kind)
    rate_limited = failure.kind is ErrorKind.RATE_LIMITED
    headers: dict[str, Any] = {}
    for found in response_headers(exc):
        headers.update(found)
    _book(
        app,
        call,
        cost_usd=0.0,  # providers do not bill failed calls
        # A refused request costs nothing; anything else may have been counted.
        charged_tokens=0 if rate_limited else call.reserved_tokens,
        outcome="rate_limited" if rate_limited else "error",
        retry_after_s=failure.retry_after_s,
        headers=headers,
    )
    # A call refused before it was sent (missing key, say) is not an attempt.
    attempts = failures if isinstance(exc, NotConfigured) else failures + 1
    if failure.retryable and failures < call.llm.num_retries:
        wait_s = app.retry_policy(call.request.llm).wait_s(failures, failure.retry_after_s)
        app.store.mark_retrying(job_id)
        app.metrics.retry_scheduled(call.deployment.model, failure.kind)
        raise task.retry(
            countdown=wait_s,
            kwargs={"failures": attempts},
            exc=RetryableFailure(failure.summary()),
            **REDACTED_ARGS,
        ) from None
    _fail(app, job_id, failure, attempts=attempts)


def _book(app: PromptqCelery, call: _Call, *, cost_usd: float, **limiter_news: Any) -> None:
    """Tell the rate limiter how the call went and book its cost; a Redis outage only costs
    this bookkeeping."""
    try:
        app.limiter.settle(call.deployment, reserved_tokens=call.reserved_tokens, **limiter_news)
        app.spend.settle(call.reservation, cost_usd, call.request.budget)
    except REDIS_UNAVAILABLE as exc:
        logger.warning("rate limit and spend of %s not updated: %s", call.deployment.model, exc)


def _fail(app: PromptqCelery, job_id: str, failure: Failure, *, attempts: int) -> None:
    error = JobError(
        kind=failure.kind,
        message=failure.message,
        status_code=failure.status_code,
        attempts=attempts,
    )
    if app.store.finish(job_id, Outcome(status=JobStatus.FAILED, error=error), patient=True):
        app.metrics.job_failed(failure.kind)
        logger.warning("job %s failed after %d attempt(s): %s", job_id, attempts, failure.summary())
