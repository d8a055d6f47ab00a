"""The Celery tasks: a message carries one job (promptq.complete, promptq.embed) or a pack of
them (promptq.pack, from submit_many); each job gets one attempt, then a retry or its outcome."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Reject

from api_client._constants import EMBED_TASK_NAME, PACK_TASK_NAME, TASK_NAME
from api_client._schemas import EmbeddingRequest, ErrorKind, JobRequest, PromptRequest
from api_client._task_messages import REQUEST_TYPES

from .attempt import (
    REDIS_UNAVAILABLE,
    Delivery,
    Reschedule,
    attempt,
    begin,
    fail,
    fail_unexpectedly,
)
from .classify import Failure

if TYPE_CHECKING:
    from celery import Task

    from .app import PromptqCelery

logger = logging.getLogger("promptq.worker")

# What Celery logs instead of the arguments when it re-publishes a retry: never the prompt.
REDACTED_ARGS = {"argsrepr": "(<request>,)", "kwargsrepr": "{}"}


class RetryableFailure(Exception):
    """A transient provider failure, as Celery logs it when scheduling the retry."""


def register(app: PromptqCelery) -> None:
    # shared=False: the tasks belong to this app only, bound to its settings. max_retries=None:
    # an attempt counts provider failures against LLM_NUM_RETRIES itself (Celery's count
    # also includes the deliveries of a job parked for rate-limit capacity).
    for name, run in ((TASK_NAME, complete), (EMBED_TASK_NAME, embed), (PACK_TASK_NAME, pack)):
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
    """Run one attempt of a chat-completion job (see run_single)."""
    run_single(task, PromptRequest, request, failures, (reserved_tokens, slot_at))


def embed(
    task: Task,
    request: dict[str, Any],
    failures: int = 0,
    reserved_tokens: int | None = None,
    slot_at: float | None = None,
) -> None:
    """Run one attempt of an embeddings job (see run_single)."""
    run_single(task, EmbeddingRequest, request, failures, (reserved_tokens, slot_at))


def run_single(
    task: Task,
    request_type: type[JobRequest],
    request: Any,
    failures: int,
    reserved: tuple[int | None, float | None],
) -> None:
    """Run one attempt of the message's job; schedule its retry, or leave it stored.

    ``failures`` counts the provider failures so far (the retry budget); ``reserved`` holds
    (tokens, slot_at) when this delivery already holds a rate-limit slot, else (None, None).
    When Redis cannot be reached the message is rejected back to the queue (or, if that
    fails too, left unacknowledged until the visibility timeout returns it): a job is never
    acknowledged without an outcome or a follow-up message.
    """
    delivery = Delivery(
        job_id=task.request.id,
        request_type=request_type,
        request=request,
        failures=failures,
        deliveries=task.request.retries + 1,  # a retry or a parked job is a new delivery
        reserved_tokens=reserved[0],
        slot_at=reserved[1],
    )
    [ended] = _attempt_all(task, [delivery])
    if ended is not None:
        raise task.retry(
            countdown=ended.wait_s,
            kwargs={"failures": ended.failures},
            exc=RetryableFailure(ended.summary),
            **REDACTED_ARGS,
        ) from None


def pack(task: Task, jobs: list[Any]) -> None:
    """Run one attempt of each job of a pack, concurrently; a job to retry is parked as a
    message of its own. See api_client._task_messages.pack_message for the format."""
    app: PromptqCelery = task.app
    try:
        deliveries = [d for d in (_unpacked(app, entry) for entry in jobs) if d is not None]
    except REDIS_UNAVAILABLE as exc:
        _requeue(task, exc)
    ended = _attempt_all(task, deliveries)
    try:
        for delivery, retry in zip(deliveries, ended, strict=True):
            if retry is not None:
                app.parking.park_job(
                    delivery.job_id,
                    retry.request,
                    state={"failures": retry.failures},
                    deliveries=delivery.deliveries,
                    delay_s=retry.wait_s,
                )
                logger.info(
                    "job %s: retry in %.2f s: %s", delivery.job_id, retry.wait_s, retry.summary
                )
    except REDIS_UNAVAILABLE as exc:
        _requeue(task, exc)


def _attempt_all(task: Task, deliveries: Sequence[Delivery]) -> list[Reschedule | None]:
    """Attempt the message's jobs on the worker's event loop; each one's retry, if any.
    Rejects the message back to the queue if Redis could not be reached for one of them."""
    app: PromptqCelery = task.app
    try:
        started = begin(app, list(deliveries))
    except REDIS_UNAVAILABLE as exc:
        _requeue(task, exc)
    ended = app.call_loop.run([attempt(app, job) for job in started]) if started else []
    redis_error = next((e for e in ended if isinstance(e, REDIS_UNAVAILABLE)), None)
    retry_of: dict[str, Reschedule] = {}
    try:
        for job, outcome in zip(started, ended, strict=True):
            if isinstance(outcome, Reschedule):
                retry_of[job.delivery.job_id] = outcome
            elif isinstance(outcome, BaseException) and redis_error is None:
                fail_unexpectedly(app, job.delivery.job_id, outcome)
    except REDIS_UNAVAILABLE as exc:
        redis_error = exc
    if redis_error is not None:
        _requeue(task, redis_error)
    return [retry_of.get(delivery.job_id) for delivery in deliveries]


def _requeue(task: Task, exc: BaseException) -> NoReturn:
    """Give the message back to the queue: Redis cannot be reached."""
    what = "pack" if task.name == PACK_TASK_NAME else "job"
    logger.warning(
        "%s %s goes back to the queue: Redis is unavailable (%s)", what, task.request.id, exc
    )
    raise Reject(f"Redis unavailable: {exc}", requeue=True) from None


def _unpacked(app: PromptqCelery, entry: Any) -> Delivery | None:
    """A pack's entry as a delivery of its job; None (logged) for an entry that names no
    job a worker could run."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        logger.warning("dropped a pack entry that names no job")
        return None
    request_type = REQUEST_TYPES.get(str(entry.get("task")))
    if request_type is None:
        failure = Failure(ErrorKind.BAD_REQUEST, f"unknown task {str(entry.get('task'))[:60]!r}")
        fail(app, entry["id"], failure, attempts=0)
        return None
    return Delivery(job_id=entry["id"], request_type=request_type, request=entry.get("request"))
