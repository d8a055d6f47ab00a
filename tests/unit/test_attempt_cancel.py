"""What a worker does with cancelled jobs and deadlines, through the in-process pipeline."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from api_client import Cancellation, JobFailed, JobStatus
from api_client._constants import CONTROL_KEY, budget_key, cancel_key
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.pipeline import MakePipeline, Pipeline
from tests.support.waiting import wait_until
from worker.fleet.deadlines import DeadlineSweep

MODEL = "openai/test-model"


def metric(p: Pipeline, name: str, **labels: str) -> float:
    """A sample of the pipeline's worker metrics (0 when not counted yet)."""
    return p.rt.metrics.registry.get_sample_value(name, labels) or 0.0


def failure(p: Pipeline, job_id: str) -> JobFailed:
    """The job's stored failure, as the client raises it."""
    with pytest.raises(JobFailed) as failed:
        p.client.job(job_id).result()
    return failed.value


def control(p: Pipeline, counter: str) -> int:
    return int(p.rt.redis.hget(CONTROL_KEY, counter) or 0)


def test_a_job_cancelled_while_queued_is_dropped_when_taken_and_never_called(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    job = pipeline.client.submit("never")
    assert job.cancel() is Cancellation.CANCELLED

    assert pipeline.step()  # its message was still queued: taken, and dropped

    assert server.requests == []
    assert (failure(pipeline, job.id).kind, failure(pipeline, job.id).attempts) == ("cancelled", 0)
    assert pipeline.queued() == [] and pipeline.parked() == []
    # The client ended it: the worker counts nothing, and no call.
    assert metric(pipeline, "promptq_jobs_failed_total", kind="cancelled") == 0
    assert metric(pipeline, "promptq_calls_total", model=MODEL, outcome="ok") == 0
    assert control(pipeline, "cancelled") == 1


def test_cancelling_one_job_of_a_pack_leaves_the_others_running(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    jobs = pipeline.client.submit_many([f"packed {i}" for i in range(4)])
    assert len(pipeline.queued()) == 1  # one message for the four
    assert pipeline.client.cancel([jobs[1].id]).cancelled == [jobs[1].id]

    assert pipeline.drain() == 1

    assert server.calls_by_prompt() == {"packed 0": 1, "packed 2": 1, "packed 3": 1}
    assert failure(pipeline, jobs[1].id).kind == "cancelled"
    assert [job.status() for job in jobs] == [
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
        JobStatus.SUCCEEDED,
    ]


def _cancel_in_flight(p: Pipeline, server: ScriptedOpenAIServer, reply: Reply) -> str:
    """Run a job whose call waits at ``reply``'s gate, cancel it meanwhile, then let the
    reply go. Returns the job's id."""
    assert reply.gate is not None
    server.script(reply)
    job = p.client.submit("in flight")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(p.step)
        try:
            server.wait_for_requests(1, timeout_s=10)
            assert job.cancel() is Cancellation.RUNNING
        finally:
            reply.gate.set()
        assert running.result(timeout=30)
    return job.id


def test_a_job_cancelled_in_flight_whose_call_fails_ends_cancelled_without_a_retry(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    job_id = _cancel_in_flight(pipeline, server, Reply(status=503, gate=threading.Event()))

    failed = failure(pipeline, job_id)
    assert (failed.kind, failed.attempts) == ("cancelled", 1)
    assert pipeline.parked() == [] and pipeline.drain() == 0
    assert len(server.requests) == 1
    assert metric(pipeline, "promptq_retries_total", model=MODEL, kind="provider_unavailable") == 0
    assert metric(pipeline, "promptq_jobs_failed_total", kind="cancelled") == 1
    assert control(pipeline, "cancelled") == 1
    assert not pipeline.rt.redis.exists(cancel_key(job_id))


def test_a_job_cancelled_in_flight_whose_call_answers_is_reported(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    job_id = _cancel_in_flight(pipeline, server, Reply(gate=threading.Event()))

    result = pipeline.client.job(job_id).result()
    assert result is not None and result.content == "echo: in flight"
    assert not pipeline.rt.redis.exists(cancel_key(job_id))  # the flag left with the outcome
    assert pipeline.client.cancel([job_id]).finished == {job_id: JobStatus.SUCCEEDED}
    assert control(pipeline, "cancelled") == 0


def test_a_job_cancelled_while_running_ends_at_its_next_begin_with_its_failures(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    """Its worker died (or it came back to the queue) after the cancel found it running."""
    job = pipeline.client.submit("orphaned")
    store = pipeline.rt.store
    store.mark_retrying(job.id, 2)  # two failed calls so far
    store.begin([job.id])  # a worker took it, then died; its message is back in the queue
    assert job.cancel() is Cancellation.RUNNING

    assert pipeline.step()

    assert server.requests == []
    failed = failure(pipeline, job.id)
    assert (failed.kind, failed.attempts) == ("cancelled", 2)
    assert metric(pipeline, "promptq_jobs_failed_total", kind="cancelled") == 1
    assert control(pipeline, "cancelled") == 1
    assert not pipeline.rt.redis.exists(cancel_key(job.id))


def test_a_job_cancelled_while_it_sleeps_for_its_slot_is_not_called_and_its_money_comes_back(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    # 30 requests a minute: after the first call, the next slot is about 1 s away, which a
    # worker sleeps for with PROMPTQ_LIMITER_MAX_SLEEP_S at 2 s.
    prices = {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}
    p = make_pipeline(llm={"rpm": 30, **prices}, queue={"limiter_max_sleep_s": 2})
    budget = p.client.create_budget(1.0)
    first = p.client.submit("first", budget=budget)
    assert p.step() and first.status() is JobStatus.SUCCEEDED
    next_slot_before = float(p.limiter_state()[b"r_tat"])
    second = p.client.submit("second", budget=budget)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(p.step)
        wait_until(lambda: second.status() is JobStatus.RUNNING, 10)
        assert second.cancel() is Cancellation.RUNNING
        assert running.result(timeout=30)

    assert metric(p, "promptq_limiter_waits_total", model=MODEL, how="slept") == 1
    assert len(server.requests) == 1  # the first job's only
    assert (failure(p, second.id).kind, failure(p, second.id).attempts) == ("cancelled", 0)
    spent: dict[bytes, bytes] = p.rt.redis.hgetall(budget_key(budget))  # type: ignore[assignment]
    assert float(spent[b"reserved"]) == pytest.approx(0, abs=1e-12)  # given back
    assert int(spent[b"calls"]) == 1
    assert metric(p, "promptq_jobs_failed_total", kind="cancelled") == 1
    # Its rate-limit slot was given back: the next free slot is where it was before it.
    assert float(p.limiter_state()[b"r_tat"]) == pytest.approx(next_slot_before, abs=1e5)


# --- deadlines ------------------------------------------------------------------------------


def test_a_job_begun_past_its_deadline_ends_without_a_call(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    job = pipeline.client.submit("too late", deadline=time.time() - 5)

    assert pipeline.step()

    assert server.requests == []
    failed = failure(pipeline, job.id)
    assert (failed.kind, failed.attempts) == ("deadline_exceeded", 0)
    assert "the deadline passed 5." in failed.message  # by how much it missed
    assert metric(pipeline, "promptq_jobs_failed_total", kind="deadline_exceeded") == 1
    assert control(pipeline, "deadline_exceeded") == 1


def test_a_retry_that_would_start_past_the_deadline_ends_the_job(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    # Backoff: about 2 s before the first retry, about 4 s before the second (jitter: 10 %).
    # With a deadline 3 s ahead, the first retry fits and the second would not.
    p = make_pipeline(llm={"retry_min_wait": 0.05, "retry_max_wait": 20, "retry_multiplier": 2})
    server.script(Reply(status=503), Reply(status=503), Reply(status=503))
    job = p.client.submit("flaky", deadline_s=3)

    assert p.drain() == 2  # the retry is made due at once: only the backoff counts

    assert len(server.requests) == 2
    failed = failure(p, job.id)
    assert (failed.kind, failed.attempts) == ("deadline_exceeded", 2)
    assert "after its deadline; last error: provider_unavailable 503" in failed.message
    assert metric(p, "promptq_retries_total", model=MODEL, kind="provider_unavailable") == 1
    assert p.parked() == []


def test_the_sweep_ends_a_job_waiting_past_its_deadline(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    late = pipeline.client.submit("waited too long", deadline=time.time() - 1)
    retrying = pipeline.client.submit("failed once", deadline=time.time() - 1)
    pipeline.rt.store.mark_retrying(retrying.id, 1)
    later = pipeline.client.submit("in time", deadline_s=600)
    sweep = DeadlineSweep(pipeline.rt.redis, ttl_s=60)

    assert sweep.sweep() == (2, 2)

    assert (failure(pipeline, late.id).kind, failure(pipeline, late.id).attempts) == (
        "deadline_exceeded",
        0,
    )
    assert failure(pipeline, retrying.id).attempts == 1
    assert control(pipeline, "deadline_exceeded") == 2
    assert pipeline.drain() == 3  # their messages are dropped when taken; the third runs
    assert server.calls_by_prompt() == {"in time": 1}
    assert later.status() is JobStatus.SUCCEEDED
