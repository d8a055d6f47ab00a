"""Waiting for rate-limit capacity: a short wait on the event loop, a longer one in line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api_client._schedule import route_of
from api_client._schemas import JobRequest
from api_client._task_messages import task_message
from worker.fleet.delivery_state import DeliveryState
from worker.llm import call as llm

if TYPE_CHECKING:
    from worker.attempt.runtime import Runtime
    from worker.fleet.limiter import Deployment, Grant

logger = logging.getLogger("promptq.worker")


@dataclass(frozen=True)
class Slot:
    """A call's place under its deployment's rate limit."""

    tokens: int  # charged to the limiter
    wait_s: float  # to wait before calling (at most PROMPTQ_LIMITER_MAX_SLEEP_S)


def tokens_to_charge(rt: Runtime, deployment: Deployment, request: JobRequest) -> int:
    """The tokens a call is charged before it starts: estimated only where a token limit
    applies (LiteLLM's counter costs CPU)."""
    if not rt.limiter.counts_tokens(deployment):
        return 0
    reply_tokens = rt.settings.queue.limiter_reply_tokens
    return llm.estimate_tokens(
        rt.llm_settings(request.llm), deployment.model, request, reply_tokens
    )


def slot_now(rt: Runtime, deployment: Deployment, grant: Grant, tokens: int) -> Slot | None:
    """The slot the limiter granted (at most PROMPTQ_LIMITER_MAX_SLEEP_S away: the call waits
    for it in the worker); None when none was free that soon (wait_in_line)."""
    if not grant.granted:
        return None
    if grant.wait_s > 0:
        rt.metrics.limiter_waited(deployment.model, "slept", grant.wait_s)
    return Slot(tokens, max(grant.wait_s, 0.0))


def wait_in_line(
    rt: Runtime,
    deployment: Deployment,
    request: JobRequest,
    grant: Grant,
    *,
    job_id: str,
    deliveries: int,
    failures: int,
) -> None:
    """Give the worker back while the job waits for its rate limit: it goes back into the
    scheduler first in its line, and its lane closes until a slot is near, so that the next
    slot goes to the best job waiting then, not to whichever asked first (blocking Redis
    call). ``deliveries`` counts the job's deliveries, this one included. No retry is spent.
    """
    back_in_line(
        rt, request, job_id=job_id, deliveries=deliveries, failures=failures, closed_s=grant.wait_s
    )
    rt.metrics.limiter_waited(deployment.model, "parked", grant.wait_s)
    logger.info(
        "job %s waits %.1f s in line for the rate limit of %s",
        job_id,
        grant.wait_s,
        deployment.model,
    )


def back_in_line(
    rt: Runtime,
    request: JobRequest,
    *,
    job_id: str,
    deliveries: int,
    failures: int,
    closed_s: float = 0.0,
    refund: int = 1,
) -> None:
    """Put a job back into the scheduler as a message of its own, first in its line, its
    tenant's pass given back for ``refund`` jobs (blocking Redis calls); close its lane for
    ``closed_s``."""
    rt.store.mark_waiting(job_id)
    message = task_message(
        job_id, request, kwargs=DeliveryState(failures).encode(), retries=deliveries
    )
    route = route_of(request)
    rt.scheduler.put_back(route, message, cost=1, closed_s=closed_s, refund=refund).run()


def until_slot_s(rt: Runtime, slot_at: float | None) -> float:
    """How long a parked job back for its reserved slot (``slot_at``, epoch seconds) waits."""
    if slot_at is None:
        return 0.0
    return max(0.0, min(slot_at - time.time(), rt.settings.queue.limiter_max_sleep_s))
