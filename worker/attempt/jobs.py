"""The jobs one message carries, attempted together on the call loop; each retried or ended."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from api_client._schedule import route_of
from worker.attempt.adopt import taken_in
from worker.attempt.begin import Started, begin
from worker.attempt.delivery import Delivery
from worker.attempt.later import come_back_later
from worker.attempt.run import Reschedule, attempt
from worker.attempt.runtime import Runtime
from worker.attempt.stop import fail_unexpectedly
from worker.attempt.throttle import back_in_line
from worker.errors import REDIS_UNAVAILABLE
from worker.fleet.delivery_state import DeliveryState

logger = logging.getLogger("promptq.worker")


def run_jobs(rt: Runtime, deliveries: Sequence[Delivery]) -> None:
    """Give each job of a message one attempt, concurrently; park the ones to retry. A job
    another Celery app sent is first taken in (worker.attempt.adopt), and attempted when it
    is taken again from the scheduler.

    A pack whose calls go to a rate-limited deployment is split instead: its jobs go back into
    the scheduler one by one, first in their line, and each is taken on its own. Under a rate
    limit a pack saves nothing, and its jobs asking for slots all at once would take them
    ahead of better jobs (other tenants', by their weights) that the scheduler would have
    chosen.

    Raises one of REDIS_UNAVAILABLE when Redis could not be reached for one of them: the
    message must then go back to the queue, and no retry is parked (the message brings the
    job back; a parked retry as well would run it twice). A job is never left without an
    outcome or a message that brings it back.
    """
    started = begin(rt, taken_in(rt, deliveries))
    if len(started) > 1 and _under_a_rate_limit(rt, started):
        # A pack taken after its lane was marked split was not charged as a whole: its jobs
        # are refunded nothing. Each goes back at its place in its line (the pack's); the last
        # first, so that a pack of no known order (pushed on the queue list), whose jobs each
        # go ahead of the line, keeps its order too.
        charged = not rt.scheduler.split_lane(route_of(started[0].request).lane)
        for job in reversed(started):
            back_in_line(rt, job.request, job.delivery, refund=1 if charged else 0)
        return
    ended = rt.call_loop.run([attempt(rt, job) for job in started]) if started else []
    redis_error = next((e for e in ended if isinstance(e, REDIS_UNAVAILABLE)), None)
    retries: list[tuple[Started, Reschedule]] = []
    for job, outcome in zip(started, ended, strict=True):
        if isinstance(outcome, Reschedule):
            retries.append((job, outcome))
        elif isinstance(outcome, BaseException) and redis_error is None:
            fail_unexpectedly(rt, job.delivery.job_id, outcome)
    if redis_error is not None:
        raise redis_error
    for job, retry in retries:
        delivery = job.delivery
        come_back_later(
            rt.parking,
            delivery.job_id,
            retry.request,
            state=DeliveryState(retry.failures),
            deliveries=delivery.deliveries,
            delay_s=retry.wait_s,
            order=delivery.order,
        )
        logger.info("job %s: retry in %.2f s: %s", delivery.job_id, retry.wait_s, retry.summary)


def _under_a_rate_limit(rt: Runtime, started: Sequence[Started]) -> bool:
    """Whether the message's first job calls a deployment with a configured rate limit (the
    jobs of a pack share their route, hence their deployment)."""
    first = started[0]
    return rt.deployment(first.model, first.request.llm).limited
