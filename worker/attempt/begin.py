"""Starting a message's jobs: which of them are attempted, and why the others end there."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api_client._celery_contract import request_from_task
from api_client._errors import InvalidRequest
from api_client._schemas import ErrorKind, JobRequest
from worker.attempt.classify import Failure, classify
from worker.attempt.delivery import Delivery
from worker.attempt.stop import end_past_deadline, ended_cancelled, fail, missed_deadline_s
from worker.errors import NotConfigured
from worker.fleet.store import NotBegun
from worker.llm import call as llm

if TYPE_CHECKING:
    from worker.attempt.runtime import Runtime

logger = logging.getLogger("promptq.worker")


@dataclass(frozen=True)
class Started:
    """A job marked running, with its request and the model it goes to."""

    delivery: Delivery
    request: JobRequest
    model: str


def begin(rt: Runtime, deliveries: list[Delivery]) -> list[Started]:
    """Mark a message's jobs running in one round trip. Returns the ones to attempt; the
    others end here: an unknown task, an invalid request, a job that already has an outcome
    (a duplicate delivery, or a job cancelled or expired while it waited), one cancelled
    while it ran, one past its deadline, a job that killed its workers too often, a model this
    worker cannot call."""
    parsed = [(d, r) for d, r in ((d, _parsed(rt, d)) for d in deliveries) if r is not None]
    starts = rt.store.begin(
        [delivery.job_id for delivery, _ in parsed],
        [delivery.deliveries for delivery, _ in parsed],
    )
    started = []
    for (delivery, request), count in zip(parsed, starts, strict=True):
        model = _model_to_call(rt, delivery, request, count)
        if model is not None:
            started.append(Started(delivery, request, model))
    return started


def _parsed(rt: Runtime, delivery: Delivery) -> JobRequest | None:
    try:
        return checked_request(delivery)
    except InvalidRequest as exc:
        fail(rt, delivery.job_id, Failure(ErrorKind.BAD_REQUEST, exc.message), attempts=0)
        return None


def checked_request(delivery: Delivery) -> JobRequest:
    """The request a delivery carries, read as the public Celery contract reads it (promptq's
    own requests are of that shape too); InvalidRequest naming the problem."""
    if delivery.problem is not None:
        raise InvalidRequest(delivery.problem)
    if delivery.request_type is None:
        raise InvalidRequest(f"unknown task {delivery.task_name[:60]!r}")
    return request_from_task(delivery.task_name, delivery.request)


def _model_to_call(
    rt: Runtime, delivery: Delivery, request: JobRequest, starts: int | NotBegun
) -> str | None:
    """The model a job marked running (``starts`` times so far) goes to; None when the job
    ends here."""
    job_id = delivery.job_id
    if starts is NotBegun.ENDED or starts is NotBegun.STALE:
        # Not a duplicate only: the message of a job cancelled or expired while it waited
        # stays queued until it is taken, and ends here; and an older copy of a job that has
        # come back since (its worker died before acknowledging it) is not run twice.
        logger.debug("job %s: dropped a delivery (%s)", job_id, starts.name.lower())
        return None
    if starts is NotBegun.CANCELLED:
        ended_cancelled(rt, job_id)
        return None
    missed_s = missed_deadline_s(request)
    if missed_s is not None:
        message = f"the deadline passed {missed_s:.1f} s before a worker could start the job"
        end_past_deadline(rt, job_id, message, attempts=delivery.state.failures)
        return None
    redeliveries = starts - delivery.deliveries
    if redeliveries > rt.settings.queue.max_redeliveries:
        message = f"the worker running this job died {redeliveries} times"
        fail(rt, job_id, Failure(ErrorKind.WORKER_LOST, message), attempts=delivery.state.failures)
        return None
    try:
        return llm.model_of(rt.llm_settings(request.llm), request)
    except NotConfigured as exc:
        fail(rt, job_id, classify(exc), attempts=0)
        return None
