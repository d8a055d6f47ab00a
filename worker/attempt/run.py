"""One attempt at one job, on the worker's event loop: its slot, its call and its outcome."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from api_client._schemas import (
    EmbeddingResult,
    ErrorKind,
    JobRequest,
    JobResult,
    JobStatus,
    Outcome,
    PromptResult,
)
from worker.attempt.begin import Started
from worker.attempt.classify import Failure, classify, response_headers
from worker.attempt.delivery import Delivery
from worker.attempt.later import come_back_later
from worker.attempt.stop import (
    end_past_deadline,
    ended_cancelled,
    fail,
    give_back,
    missed_deadline_s,
    still_wanted,
)
from worker.attempt.throttle import (
    Slot,
    paused_for_long,
    slot_now,
    tokens_to_charge,
    until_slot_s,
    wait_in_line,
    wait_out_pause,
)
from worker.errors import (
    REDIS_DOWN,
    REDIS_UNAVAILABLE,
    AttemptProblem,
    BudgetExceeded,
    NotConfigured,
)
from worker.fleet.scripts import ScriptCall, patiently_on_loop
from worker.fleet.spend import Reservation
from worker.fleet.store import FINISH_PATIENCE_S, Marked
from worker.llm import call as llm
from worker.llm.answers import Answer, Embedding

if TYPE_CHECKING:
    from worker.attempt.runtime import Runtime
    from worker.fleet.limiter import Deployment
    from worker.settings import LLMSettings

logger = logging.getLogger("promptq.worker")


@dataclass(frozen=True)
class Reschedule:
    """An attempt failed and the job is to be retried: after ``wait_s``, with its retry
    budget spent up to ``failures``."""

    request: JobRequest
    wait_s: float
    failures: int
    summary: str = field(repr=False)


async def attempt(rt: Runtime, job: Started) -> Reschedule | None:
    """Run one attempt of a started job: store its outcome, send it back in line for
    rate-limit capacity, or say when to retry it. Redis errors propagate (the message then
    goes back to the queue).

    The rate-limit slot comes before a call permit: a job with no slot soon goes back in line
    at once, instead of holding its tenant's place while it waits for a permit behind the
    jobs of a pack that got there first (the scheduler, not the order of permits, decides
    who gets the slots)."""
    delivery, offload = job.delivery, rt.call_loop.offload
    call = await _prepare(rt, delivery, job.request, job.model)
    if call is None:
        return None
    loop = asyncio.get_running_loop()
    prepared_at = loop.time()
    patience_s = rt.settings.queue.visibility_timeout_s / 4
    async with rt.call_loop.permit(patience_s) as permitted:
        if not permitted:  # the process is full for too long: give the job to another
            await give_back(rt, call.reservation, (call.deployment, call.reserved_tokens))
            await offload(_hand_back, rt, job)
            return None
        waited_s = loop.time() - prepared_at
        if call.wait_s > waited_s:
            await asyncio.sleep(call.wait_s - waited_s)
        slept = max(call.wait_s, waited_s) > 0
        wait_s = await still_wanted(
            rt,
            delivery.job_id,
            call.request,
            failures=delivery.state.failures,
            slept=slept,
            reservation=call.reservation,
            slot=(call.deployment, call.reserved_tokens),
            # Paced at departure: a pause or a backoff since the slot was granted moves it.
            departure=rt.limiter.departure(call.deployment, call.granted_us, call.wait_s)
            if slept and call.granted_us
            else None,
        )
        if wait_s is None:
            return None
        if wait_s > 0:
            await asyncio.sleep(wait_s)
        # Counted here, not when the job is taken: a take that ends in line for the rate
        # limit is no attempt.
        rt.metrics.job_started(call.request.priority.value, call.request.tenant_name)
        started = time.monotonic()
        try:
            with rt.metrics.timing(call.deployment.model):
                answer = await llm.acall(call.llm, call.request)
        except Exception as exc:  # every failure is classified
            return await offload(_after_failure, rt, delivery, call, exc)
        await _after_success(rt, delivery, call, answer, time.monotonic() - started)
        return None


def _hand_back(rt: Runtime, job: Started) -> None:
    """Queue the job again as a message of its own, its state kept."""
    delivery = job.delivery
    rt.store.mark_waiting(delivery.job_id)
    come_back_later(
        rt.parking,
        delivery.job_id,
        job.request,
        state=delivery.state,
        deliveries=delivery.deliveries,
        delay_s=0.0,
        order=delivery.order,
    )


@dataclass(frozen=True)
class _Call:
    """One provider call about to be made, and what was set aside for it."""

    request: JobRequest
    llm: LLMSettings  # the job's LLM settings: the default [llm] or its [llm.NAME]
    deployment: Deployment
    reserved_tokens: int  # charged to the rate limiter
    reservation: Reservation | None  # money set aside under a spending cap
    wait_s: float  # until the rate-limit slot
    granted_us: int  # when the slot was granted, on Redis's clock (0: unknown)


async def _prepare(
    rt: Runtime, delivery: Delivery, request: JobRequest, model: str
) -> _Call | None:
    """Take a rate-limit slot (unless the delivery holds one) and set money aside under a
    spending cap; None when the job went back in line or was refused."""
    job_id, offload = delivery.job_id, rt.call_loop.offload
    llm_settings = rt.llm_settings(request.llm)
    deployment = rt.deployment(model, request.llm)
    if delivery.state.reserved_tokens is None:
        tokens = tokens_to_charge(rt, deployment, request)
        grant = await rt.loop_redis.run_one(rt.limiter.acquire(deployment, tokens))
        slot = slot_now(rt, deployment, grant, tokens)
        if slot is None:  # no slot soon: back in line, for the next one
            await offload(wait_in_line, rt, deployment, request, grant, delivery)
            return None
    else:
        slot = Slot(delivery.state.reserved_tokens, until_slot_s(rt, delivery.state.slot_at))
    try:
        reservation = await _reserve_spend(rt, request, model, llm_settings)
    except BudgetExceeded as exc:
        rt.metrics.budget_refused(model)
        failure = Failure(ErrorKind.BUDGET_EXCEEDED, str(exc))
        await offload(fail, rt, job_id, failure, attempts=delivery.state.failures)
        return None
    except NotConfigured as exc:
        await offload(fail, rt, job_id, classify(exc), attempts=delivery.state.failures)
        return None
    return _Call(
        request, llm_settings, deployment, slot.tokens, reservation, slot.wait_s, slot.granted_us
    )


async def _reserve_spend(
    rt: Runtime, request: JobRequest, model: str, llm_settings: LLMSettings
) -> Reservation | None:
    """Under a spending cap, set the call's highest likely cost aside (BudgetExceeded when
    there is no room; NotConfigured when the model has no price)."""
    if not rt.spend.applies(request.budget):
        return None
    reply_tokens = rt.settings.queue.limiter_reply_tokens
    estimate_usd = llm.estimate_cost_usd(llm_settings, model, request, reply_tokens)
    return await rt.loop_redis.run_one(rt.spend.reserve(request.budget, estimate_usd))


async def _after_success(
    rt: Runtime, delivery: Delivery, call: _Call, answer: Answer, latency_s: float
) -> None:
    """Store the answer and book what it cost, in one round trip."""
    job_id, attempts = delivery.job_id, delivery.state.failures + 1
    cost_usd = answer.cost_usd
    if cost_usd is None and call.reservation is not None:
        cost_usd = call.reservation.amount_usd  # priced before the call; keep the cap honest
    result = _result_of(job_id, answer, cost_usd, attempts, latency_s)
    store = rt.store.finish(job_id, Outcome(status=JobStatus.SUCCEEDED, result=result))
    usage = answer.usage
    charged = llm.charged_tokens(call.llm, usage, call.request) if usage.total_tokens else 0
    book = _book_calls(
        rt,
        call,
        cost_usd=cost_usd or 0.0,
        charged_tokens=charged or call.reserved_tokens,
        outcome="ok",
        headers=answer.headers,
    )
    loop_redis = rt.loop_redis
    try:
        await loop_redis.run(store, *book)
    except REDIS_DOWN:
        # The paid answer is worth waiting for (riding out a short Redis outage); the
        # bookkeeping after it is best effort. (Had the first round trip reached Redis before
        # its connection dropped, the call is booked twice: an over-count, the safe side of
        # a spending cap.)
        await patiently_on_loop(lambda: loop_redis.run(store), FINISH_PATIENCE_S)
        try:
            await loop_redis.run(*book)
        except REDIS_DOWN as exc:
            _not_booked(call, exc)
    rt.metrics.call_succeeded(call.deployment.model, usage, cost_usd)


def _result_of(
    job_id: str, answer: Answer, cost_usd: float | None, attempts: int, latency_s: float
) -> JobResult:
    """The stored result of a successful call."""
    common: dict[str, Any] = {
        "id": job_id,
        "model": answer.model,
        "usage": answer.usage,
        "cost_usd": cost_usd,
        "attempts": attempts,
        "latency_s": latency_s,
        "created": datetime.now(UTC),
    }
    if isinstance(answer, Embedding):
        return EmbeddingResult(vectors=answer.vectors, **common)
    return PromptResult(
        content=answer.content,
        message=answer.message,
        finish_reason=answer.finish_reason,
        **common,
    )


def _after_failure(
    rt: Runtime, delivery: Delivery, call: _Call, exc: Exception
) -> Reschedule | None:
    """Classify a failed call; say when to retry it while the budget lasts, else store it."""
    failure = classify(exc, secrets=rt.secrets)
    rt.metrics.call_failed(call.deployment.model, failure.kind)
    rate_limited = failure.kind is ErrorKind.RATE_LIMITED
    headers: dict[str, Any] = {}
    for found in response_headers(exc):
        headers.update(found)
    _book(
        rt,
        call,
        cost_usd=0.0,  # providers do not bill failed calls
        # A refused request costs nothing; anything else may have been counted.
        charged_tokens=0 if rate_limited else call.reserved_tokens,
        outcome="rate_limited" if rate_limited else "error",
        retry_after_s=failure.retry_after_s,
        headers=headers,
    )
    if rate_limited and paused_for_long(call.llm, failure.retry_after_s):
        wait_out_pause(rt, delivery, call.request, call.deployment.model, failure)
        return None
    failures = delivery.state.failures
    # A call refused before it was sent (missing key, prompt too long) is not an attempt.
    attempts = failures if isinstance(exc, AttemptProblem) and exc.before_call else failures + 1
    if failure.retryable and failures < call.llm.num_retries:
        wait_s = rt.retry_policy(call.request.llm).wait_s(failures, failure.retry_after_s)
        missed_s = missed_deadline_s(call.request, after_s=wait_s)
        if missed_s is not None:
            message = (
                f"its next retry would start {missed_s:.1f} s after its deadline; "
                f"last error: {failure.summary()}"
            )
            end_past_deadline(rt, delivery.job_id, message, attempts=attempts)
            return None
        marked = rt.store.mark_retrying(delivery.job_id, attempts)
        if marked is Marked.CANCELLED:  # cancelled while its call was in flight
            ended_cancelled(rt, delivery.job_id, attempts)
        if marked is not Marked.MARKED:
            return None
        rt.metrics.retry_scheduled(call.deployment.model, failure.kind)
        return Reschedule(call.request, wait_s, attempts, failure.summary())
    fail(rt, delivery.job_id, failure, attempts=attempts)
    return None


def _book(rt: Runtime, call: _Call, *, cost_usd: float, **limiter_news: Any) -> None:
    """Tell the rate limiter how the call went and book its cost (blocking); a Redis outage
    only costs this bookkeeping."""
    try:
        for script_call in _book_calls(rt, call, cost_usd=cost_usd, **limiter_news):
            script_call.run()
    except REDIS_UNAVAILABLE as exc:
        _not_booked(call, exc)


def _book_calls(
    rt: Runtime, call: _Call, *, cost_usd: float, **limiter_news: Any
) -> tuple[ScriptCall[None], ScriptCall[None]]:
    """Returns the script calls that tell the rate limiter how the call went and book its
    cost with the spend ledger."""
    return (
        rt.limiter.record(
            call.deployment,
            reserved_tokens=call.reserved_tokens,
            granted_us=call.granted_us,
            **limiter_news,
        ),
        rt.spend.book(call.reservation, cost_usd, call.request.budget),
    )


def _not_booked(call: _Call, exc: BaseException) -> None:
    logger.warning("rate limit and spend of %s not updated: %s", call.deployment.model, exc)
