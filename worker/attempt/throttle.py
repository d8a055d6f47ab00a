"""Waiting for rate-limit capacity: a short wait on the event loop, a long one parked."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from api_client._schemas import JobRequest
from worker.attempt.later import come_back_later
from worker.fleet.delivery_state import DeliveryState
from worker.fleet.limiter import TOKEN_MAX_AHEAD_S
from worker.llm import call as llm

if TYPE_CHECKING:
    from worker.attempt.runtime import Runtime
    from worker.fleet.limiter import Deployment, Grant

logger = logging.getLogger("promptq.worker")

# A job parked for a reserved slot comes back this long before it (at most
# PROMPTQ_LIMITER_MAX_SLEEP_S) and sleeps the rest, so that moving it and handing it to a
# worker thread do not make it late.
SLOT_LEAD_S = 0.25


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
    return llm.estimate_tokens(deployment.model, request, rt.settings.queue.limiter_reply_tokens)


def slot_now(rt: Runtime, deployment: Deployment, grant: Grant, tokens: int) -> Slot | None:
    """The slot the limiter granted, if the call is to wait for it in the worker: at most
    PROMPTQ_LIMITER_MAX_SLEEP_S away; None when the job is to be parked (park_for_slot)."""
    if not grant.granted or grant.wait_s > rt.settings.queue.limiter_max_sleep_s:
        return None
    if grant.wait_s > 0:
        rt.metrics.limiter_waited(deployment.model, "slept", grant.wait_s)
    return Slot(tokens, max(grant.wait_s, 0.0))


def park_for_slot(
    rt: Runtime,
    deployment: Deployment,
    request: JobRequest,
    grant: Grant,
    tokens: int,
    *,
    job_id: str,
    deliveries: int,
    failures: int,
) -> None:
    """Give the worker back while the job waits for its rate-limit slot (blocking Redis
    calls).

    ``deliveries`` counts the job's deliveries, this one included. A granted slot stays
    reserved and the job is parked in Redis until just before it; when no slot was free
    within PROMPTQ_LIMITER_MAX_AHEAD_S, the job is parked to ask again later. Neither spends
    a retry.
    """
    state = DeliveryState(failures)
    if grant.granted:  # back shortly before the slot, then sleep the rest of the way
        delay_s = grant.wait_s - min(rt.settings.queue.limiter_max_sleep_s, SLOT_LEAD_S)
        state = DeliveryState(failures, tokens, time.time() + grant.wait_s)
    else:  # spread the jobs that found no slot, so they do not all ask again at once
        spread = random.uniform(0.25, 0.5)  # noqa: S311
        horizon_s = rt.settings.limiter_max_ahead_s
        if grant.tpm:  # token slots are reserved only a little ahead (see TOKEN_MAX_AHEAD_S)
            horizon_s = min(horizon_s, TOKEN_MAX_AHEAD_S)
        delay_s = grant.wait_s + spread * horizon_s
    rt.store.mark_waiting(job_id)
    # The message counts this delivery among the job's earlier ones.
    come_back_later(
        rt.parking, job_id, request, state=state, deliveries=deliveries, delay_s=delay_s
    )
    rt.metrics.limiter_waited(deployment.model, "parked", delay_s)
    logger.info("job %s parked %.1f s for the rate limit of %s", job_id, delay_s, deployment.model)


def until_slot_s(rt: Runtime, slot_at: float | None) -> float:
    """How long a parked job back for its reserved slot (``slot_at``, epoch seconds) waits."""
    if slot_at is None:
        return 0.0
    return max(0.0, min(slot_at - time.time(), rt.settings.queue.limiter_max_sleep_s))
