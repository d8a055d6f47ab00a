"""Ending a job without an answer: it failed, was cancelled, or its deadline passed."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from api_client._schemas import ErrorKind, JobError, JobRequest, JobStatus, Outcome
from worker.attempt.classify import Failure
from worker.fleet.scripts import ScriptCall, patiently
from worker.fleet.store import FINISH_PATIENCE_S, Wanted

if TYPE_CHECKING:
    from worker.attempt.runtime import Runtime
    from worker.fleet.limiter import Deployment
    from worker.fleet.spend import Reservation

logger = logging.getLogger("promptq.worker")


def missed_deadline_s(request: JobRequest, after_s: float = 0.0) -> float | None:
    """By how many seconds a call of the job ``after_s`` from now would miss its deadline;
    None when it has none, or would start in time."""
    if request.deadline_at is None:
        return None
    missed_s = time.time() + after_s - request.deadline_at
    return missed_s if missed_s > 0 else None


def end_past_deadline(rt: Runtime, job_id: str, message: str, *, attempts: int) -> None:
    """End the job as deadline_exceeded, unless it has an outcome, or was cancelled while it
    ran: it then ends cancelled, as the client was told (blocking Redis calls)."""
    wanted = rt.store.still_wanted(job_id, attempts).run()
    if wanted is Wanted.CANCELLED:
        ended_cancelled(rt, job_id, attempts)
        return
    if wanted is Wanted.ENDED:
        return
    error = JobError(kind=ErrorKind.DEADLINE_EXCEEDED, message=message, attempts=attempts)
    outcome = Outcome(status=JobStatus.FAILED, error=error)
    if rt.store.finish(job_id, outcome, counter=ErrorKind.DEADLINE_EXCEEDED.value).run():
        rt.metrics.job_failed(ErrorKind.DEADLINE_EXCEEDED)
        logger.info("job %s: deadline exceeded: %s", job_id, message)


def ended_cancelled(rt: Runtime, job_id: str, attempts: int | None = None) -> None:
    """Count and log a job a worker's script ended as cancelled (it was cancelled while it
    ran; ``attempts``: its provider calls, when known here)."""
    rt.metrics.job_failed(ErrorKind.CANCELLED)
    made = "" if attempts is None else f" after {attempts} attempt(s)"
    logger.info("job %s was cancelled while it ran; it ends cancelled%s", job_id, made)


async def still_wanted(
    rt: Runtime,
    job_id: str,
    request: JobRequest,
    *,
    failures: int,
    slept: bool,
    reservation: Reservation | None,
    slot: tuple[Deployment, int] | None = None,
    departure: ScriptCall[float] | None = None,
) -> float | None:
    """Right before a call: None when it is not to be made, else how long it should still
    wait before it leaves (the limiter's ``departure`` check, asked in the same round trip;
    0 without one). A job past its deadline ends deadline_exceeded; one that waited for its
    slot (``slept``) is checked for a cancel meanwhile (it then ends cancelled) or an outcome.
    What was set aside for a call not made is given back: the money, and the rate-limit
    ``slot`` (its deployment and tokens)."""
    missed_s = missed_deadline_s(request)
    if missed_s is None and not slept:
        return 0.0
    if missed_s is None:
        checks: list[ScriptCall[Any]] = [rt.store.still_wanted(job_id, failures)]
        if departure is not None:
            checks.append(departure)
        wanted, *wait_s = await rt.loop_redis.run(*checks)
        if wanted is Wanted.YES:
            return wait_s[0] if wait_s else 0.0
        if wanted is Wanted.CANCELLED:
            ended_cancelled(rt, job_id, failures)
    else:
        message = f"the deadline passed {missed_s:.1f} s before its call could start"
        await rt.call_loop.offload(end_past_deadline, rt, job_id, message, attempts=failures)
    await give_back(rt, reservation, slot)
    return None


async def give_back(
    rt: Runtime, reservation: Reservation | None, slot: tuple[Deployment, int] | None
) -> None:
    """Give back what was set aside for a call that will not be made: its money and its
    rate-limit slot."""
    if reservation is not None:
        await rt.loop_redis.run_one(rt.spend.release(reservation))
    if slot is not None:
        deployment, tokens = slot
        await rt.loop_redis.run_one(rt.limiter.give_back(deployment, tokens))


def fail(rt: Runtime, job_id: str, failure: Failure, *, attempts: int) -> None:
    """Store the job's failure (unless it already has an outcome)."""
    error = JobError(
        kind=failure.kind,
        message=failure.message,
        status_code=failure.status_code,
        attempts=attempts,
    )
    # A failure that cost a provider call is worth waiting for Redis to store (up to
    # FINISH_PATIENCE_S) rather than running the job again later.
    stored = rt.store.finish(job_id, Outcome(status=JobStatus.FAILED, error=error))
    if patiently(stored.run, FINISH_PATIENCE_S):
        rt.metrics.job_failed(failure.kind)
        logger.warning("job %s failed after %d attempt(s): %s", job_id, attempts, failure.summary())


def fail_unexpectedly(rt: Runtime, job_id: str, exc: BaseException) -> None:
    """A bug in promptq ended the job's attempt: log it and fail the job as ``internal``."""
    logger.error("job %s: unexpected %s in the worker", job_id, type(exc).__name__, exc_info=exc)
    message = f"unexpected {type(exc).__name__} in the worker (see its log)"
    fail(rt, job_id, Failure(ErrorKind.INTERNAL, message), attempts=0)
