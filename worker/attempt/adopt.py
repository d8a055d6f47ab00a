"""Jobs another Celery app sent (the public Celery contract): taken in on their first delivery."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from api_client._errors import InvalidRequest
from api_client._schedule import route_of
from api_client._schemas import ErrorKind, JobError, JobStatus, Outcome
from api_client._task_messages import request_json, task_message
from worker.attempt.begin import checked_request
from worker.attempt.delivery import Delivery
from worker.fleet.adoption import Taken

if TYPE_CHECKING:
    from worker.attempt.runtime import Runtime

logger = logging.getLogger("promptq.worker")


def taken_in(rt: Runtime, deliveries: Sequence[Delivery]) -> list[Delivery]:
    """The deliveries to begin now. A job another Celery app sent is taken in first (one
    script, worker.fleet.adoption): given the state, request copy and tenant's entry a
    submitted job has, with what its Celery records and canvas need, and queued in the
    scheduler's line by its request's priority and tenant, where it is taken again as
    promptq's own message; an invalid request fails there, bad_request, naming the problem."""
    return [d for d in deliveries if d.origin is None or _take_in(rt, d)]


def _take_in(rt: Runtime, delivery: Delivery) -> bool:
    """Take in one job from another Celery app; whether this delivery runs as it is."""
    origin = delivery.origin
    assert origin is not None
    try:
        request = checked_request(delivery)
    except InvalidRequest as exc:
        request, problem = None, exc.message
    queued, failed = None, ""
    if request is None:
        error = JobError(kind=ErrorKind.BAD_REQUEST, message=problem)
        failed = Outcome(status=JobStatus.FAILED, error=error).model_dump_json()
    else:
        message = task_message(delivery.job_id, request)
        deadline = "" if request.deadline_at is None else int(request.deadline_at * 1000)
        queued = (route_of(request), message, request_json(request), deadline)
    taken = rt.adoption.take_in(
        delivery.job_id,
        delivery.task_name,
        own=False,
        queued=queued,
        failed=failed,
        records_tail=origin.records_tail,
        followup=origin.followup,
    )
    if taken is Taken.FAILED:
        rt.metrics.job_failed(ErrorKind.BAD_REQUEST)
        logger.warning("job %s from a Celery app failed: bad_request: %s", delivery.job_id, problem)
    elif taken is Taken.QUEUED and request is not None:
        logger.info(
            "job %s from a Celery app waits in line (priority %s, tenant %s)",
            delivery.job_id,
            request.priority.value,
            request.tenant_name,
        )
    return taken is Taken.RUN
