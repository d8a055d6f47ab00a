"""Waiting for rate-limit capacity: a short wait on the event loop, a longer one in line."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api_client._schedule import route_of
from api_client._schemas import JobRequest
from api_client._task_messages import task_message
from worker.attempt.stop import end_past_deadline, missed_deadline_s
from worker.fleet.delivery_state import DeliveryState
from worker.llm import call as llm

if TYPE_CHECKING:
    from worker.attempt.classify import Failure
    from worker.attempt.delivery import Delivery
    from worker.attempt.runtime import Runtime
    from worker.fleet.limiter import Deployment, Grant
    from worker.settings import LLMSettings

logger = logging.getLogger("promptq.worker")


@dataclass(frozen=True)
class Slot:
    """A call's place under its deployment's rate limit."""

    tokens: int  # charged to the limiter
    wait_s: float  # to wait before calling (at most PROMPTQ_LIMITER_MAX_SLEEP_S)
    granted_us: int = 0  # when the limiter granted it, on Redis's clock (0: unknown)


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
    return Slot(tokens, max(grant.wait_s, 0.0), grant.granted_us)


def wait_in_line(
    rt: Runtime,
    deployment: Deployment,
    request: JobRequest,
    grant: Grant,
    delivery: Delivery,
) -> None:
    """Give the worker back while the job waits for its rate limit: it goes back into the
    scheduler at its place in its line, and its lane closes until a slot is near, so that the
    next slot goes to the best job waiting then, not to whichever asked first (blocking Redis
    call). No retry is spent.
    """
    back_in_line(rt, request, delivery, closed_s=grant.wait_s)
    rt.metrics.limiter_waited(deployment.model, "parked", grant.wait_s)
    logger.info(
        "job %s waits %.1f s in line for the rate limit of %s",
        delivery.job_id,
        grant.wait_s,
        deployment.model,
    )


def paused_for_long(llm_settings: LLMSettings, retry_after_s: float | None) -> bool:
    """Whether a provider's Retry-After on a 429 is a pause (a quota spent for minutes or
    hours) rather than a wait before a retry: longer than the longest backoff
    (LLM_RETRY_MAX_WAIT)."""
    return retry_after_s is not None and retry_after_s > llm_settings.retry_max_wait


def wait_out_pause(
    rt: Runtime, delivery: Delivery, request: JobRequest, model: str, failure: Failure
) -> None:
    """The job waits in line until its deployment's pause ends (the limiter holds the whole
    fleet's calls to ``model`` until then): no retry is spent, and the refused call is not
    counted as an attempt. A job whose deadline comes first ends now (blocking Redis calls)."""
    pause_s = failure.retry_after_s or 0.0
    missed_s = missed_deadline_s(request, after_s=pause_s)
    if missed_s is not None:
        message = f"the provider paused calls until {missed_s:.1f} s after its deadline"
        end_past_deadline(rt, delivery.job_id, message, attempts=delivery.state.failures)
        return
    back_in_line(rt, request, delivery, closed_s=pause_s)
    rt.metrics.limiter_waited(model, "paused", pause_s)
    logger.warning(
        "job %s waits %.0f s in line: the provider paused calls (%s)",
        delivery.job_id,
        pause_s,
        failure.summary(),
    )


def back_in_line(
    rt: Runtime,
    request: JobRequest,
    delivery: Delivery,
    *,
    closed_s: float = 0.0,
    refund: int = 1,
) -> None:
    """Put a delivered job back into the scheduler as a message of its own, at its order in
    its line, its tenant's pass given back for ``refund`` jobs (blocking Redis calls); close
    its lane for ``closed_s``. Its failures so far go with it; no slot does."""
    rt.store.mark_waiting(delivery.job_id)
    state = DeliveryState(delivery.state.failures).encode()
    message = task_message(delivery.job_id, request, kwargs=state, retries=delivery.deliveries)
    put_back = rt.scheduler.put_back(
        route_of(request), message, 1, closed_s, order=delivery.order, refund=refund
    )
    put_back.run()


def until_slot_s(rt: Runtime, slot_at: float | None) -> float:
    """How long a parked job back for its reserved slot (``slot_at``, epoch seconds) waits."""
    if slot_at is None:
        return 0.0
    return max(0.0, min(slot_at - time.time(), rt.settings.queue.limiter_max_sleep_s))
