"""What an attempt decides (store, retry, park, fail, drop), through the in-process pipeline."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from api_client import JobFailed, JobStatus
from api_client._constants import OPEN_JOBS_KEY, PARKED_KEY, QUEUE, starts_key
from api_client._schedule import LANES_KEY
from tests.support.broker import take_all
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.pipeline import TAKEN_KEY, MakePipeline, Message, Pipeline
from tests.support.redis_server import RedisServer
from worker.attempt.begin import begin
from worker.attempt.jobs import run_jobs
from worker.attempt.retry import JITTER
from worker.errors import REDIS_UNAVAILABLE
from worker.fleet.delivery_state import DeliveryState
from worker.fleet.scripts import redis_now_ms

MODEL = "openai/test-model"  # the deployment's model, as metrics label it


def metric(p: Pipeline, name: str, **labels: str) -> float:
    """A sample of the pipeline's worker metrics (0 when not counted yet)."""
    return p.rt.metrics.registry.get_sample_value(name, labels) or 0.0


def failure(p: Pipeline, job_id: str) -> JobFailed:
    """The job's stored failure, as the client raises it."""
    with pytest.raises(JobFailed) as failed:
        p.client.job(job_id).result()
    return failed.value


def test_a_success_is_stored_after_one_attempt(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    job = pipeline.client.submit("hello")
    assert pipeline.step()
    result = job.result()
    assert result is not None
    assert (result.content, result.attempts) == ("echo: hello", 1)
    assert not pipeline.step()  # nothing left: no retry, nothing parked
    assert pipeline.parked() == []
    assert len(server.requests) == 1
    assert metric(pipeline, "promptq_calls_total", model=MODEL, outcome="ok") == 1
    assert metric(pipeline, "promptq_jobs_succeeded_total", model=MODEL) == 1
    # An outcome leaves none of the job's working keys behind.
    assert not pipeline.rt.redis.exists(starts_key(job.id))
    assert pipeline.rt.redis.zcard(OPEN_JOBS_KEY) == 0


def test_a_503_is_parked_within_the_backoff_then_succeeds_on_attempt_two(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    p = make_pipeline(llm={"retry_min_wait": 2, "retry_max_wait": 4, "retry_multiplier": 1})
    server.script(Reply(status=503))
    job = p.client.submit("flaky")
    assert p.step()
    [parked] = p.parked()
    assert parked.message.id == job.id
    assert parked.message.retries == 1  # this delivery, counted by the next one
    assert parked.state == DeliveryState(failures=1)
    policy = p.rt.retry_policy(None)
    base = policy.base_wait_s(0)
    low, high = max(policy.min_wait_s, base * (1 - JITTER)), base * (1 + JITTER)
    assert low - 0.5 < parked.due_in_s <= high  # less the time since it was parked
    assert job.status() is JobStatus.RETRYING
    assert p.queued() == []
    assert metric(p, "promptq_retries_total", model=MODEL, kind="provider_unavailable") == 1

    assert p.advance().moved == 1
    assert p.step()
    result = job.result()
    assert result is not None and result.attempts == 2
    assert p.parked() == [] and len(server.requests) == 2
    assert metric(p, "promptq_calls_total", model=MODEL, outcome="provider_unavailable") == 1
    assert metric(p, "promptq_calls_total", model=MODEL, outcome="ok") == 1


def test_exhausted_retries_fail_the_job_with_the_providers_kind_and_status(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    retries = pipeline.rt.settings.llm.num_retries
    server.script(*[Reply(status=503)] * (retries + 1), Reply())
    job = pipeline.client.submit("doomed")
    assert pipeline.drain() == retries + 1
    failed = failure(pipeline, job.id)
    assert (failed.kind, failed.status_code, failed.attempts) == (
        "provider_unavailable",
        503,
        retries + 1,
    )
    assert len(server.requests) == retries + 1  # the last scripted reply is never asked for
    assert metric(pipeline, "promptq_retries_total", model=MODEL, kind="provider_unavailable") == 3
    assert metric(pipeline, "promptq_jobs_failed_total", kind="provider_unavailable") == 1


def test_a_429_with_retry_after_parks_for_about_the_retry_after(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    # A Retry-After within the longest backoff: a retry, after it.
    pipeline = make_pipeline(llm={"retry_max_wait": 20})
    server.script(Reply(status=429, headers={"Retry-After": "10"}))
    job = pipeline.client.submit("too fast")
    assert pipeline.step()
    [parked] = pipeline.parked()
    assert parked.state == DeliveryState(failures=1)
    # Not the backoff's 0.05 to 0.2 s: the Retry-After, spread up to 10 % beyond it.
    assert 9.0 < parked.due_in_s <= 11.0
    assert pipeline.advance(8).moved == 0  # still 1 to 3 s to go
    assert pipeline.advance(3).moved == 1 and [m.id for m in pipeline.queued()] == [job.id]
    assert job.status() is JobStatus.RETRYING
    assert metric(pipeline, "promptq_rate_limited_total", model=MODEL) == 1
    assert metric(pipeline, "promptq_retries_total", model=MODEL, kind="rate_limited") == 1
    # The whole fleet pauses this deployment as long (Redis microseconds).
    seconds, micros = pipeline.rt.redis.time()
    now_us = int(seconds) * 1_000_000 + int(micros)
    pause_s = (float(pipeline.limiter_state()[b"pause_until"]) - now_us) / 1e6
    assert 9.0 < pause_s <= 10.0


def test_a_429_with_a_retry_after_beyond_any_backoff_pauses_without_spending_a_retry(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    """A quota spent for minutes or hours: the job waits in line until the pause ends
    (longer than LLM_RETRY_MAX_WAIT, 0.2 s here), as its deployment's other jobs do."""
    server.script(Reply(status=429, headers={"Retry-After": "2"}))
    job = pipeline.client.submit("quota spent")
    assert pipeline.step()

    assert pipeline.parked() == []  # no retry parked
    [waiting] = pipeline.queued()
    assert waiting.id == job.id and DeliveryState.decode(waiting.kwargs) == DeliveryState(0)
    assert job.status() is JobStatus.QUEUED
    lanes: list[tuple[bytes, float]] = pipeline.rt.redis.zrange(LANES_KEY, 0, -1, withscores=True)  # type: ignore[assignment]
    [(_, opens_at_ms)] = lanes
    assert 1.5 < (opens_at_ms - redis_now_ms(pipeline.rt.redis)) / 1000 <= 2.0
    assert metric(pipeline, "promptq_limiter_waits_total", model=MODEL, how="paused") == 1
    assert metric(pipeline, "promptq_retries_total", model=MODEL, kind="rate_limited") == 0

    pipeline.drain(timeout_s=10, skip_waits=False)  # in real time: after the pause, it runs
    result = job.result()
    assert result is not None and result.attempts == 1  # the refused call is no attempt
    assert len(server.requests) == 2


def test_a_pause_past_the_jobs_deadline_ends_it_at_once(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    server.script(Reply(status=429, headers={"Retry-After": "600"}))
    job = pipeline.client.submit("in a hurry", deadline_s=30)
    assert pipeline.step()

    failed = failure(pipeline, job.id)
    assert (failed.kind, failed.attempts) == ("deadline_exceeded", 0)
    assert pipeline.queued() == [] and pipeline.parked() == []


def test_a_permanent_400_fails_at_once(pipeline: Pipeline, server: ScriptedOpenAIServer) -> None:
    server.script(Reply(status=400), Reply())
    job = pipeline.client.submit("malformed")
    assert pipeline.drain() == 1
    failed = failure(pipeline, job.id)
    assert (failed.kind, failed.status_code, failed.attempts) == ("bad_request", 400, 1)
    assert len(server.requests) == 1
    assert metric(pipeline, "promptq_retries_total", model=MODEL, kind="bad_request") == 0
    assert metric(pipeline, "promptq_jobs_failed_total", kind="bad_request") == 1


def test_a_job_with_no_slot_soon_waits_in_line_with_its_lane_closed_until_a_slot_is_near(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    # 30 requests a minute: a slot every 2 s, the next one 1 s away (1 s of burst); no sleep
    # in the worker at all.
    p = make_pipeline(llm={"rpm": 30, "burst_s": 1.0}, queue={"limiter_max_sleep_s": 0})
    first = p.client.submit("first")
    assert p.step() and first.status() is JobStatus.SUCCEEDED
    reserved_until = p.limiter_state()[b"r_tat"]
    second = p.client.submit("second")
    assert p.step()

    assert p.parked() == []  # no job parked: it waits in the scheduler, at its place
    [waiting] = p.queued()
    assert waiting.id == second.id and waiting.retries == 1
    assert DeliveryState.decode(waiting.kwargs) == DeliveryState(0)  # no slot held
    assert second.status() is JobStatus.QUEUED  # waiting, not retrying: no attempt spent
    assert p.limiter_state()[b"r_tat"] == reserved_until  # nothing reserved for it
    lanes: list[tuple[bytes, float]] = p.rt.redis.zrange(LANES_KEY, 0, -1, withscores=True)  # type: ignore[assignment]
    [(lane, opens_at_ms)] = lanes
    assert 0.5 < (opens_at_ms - redis_now_ms(p.rt.redis)) / 1000 <= 1.0
    parked: list[tuple[bytes, float]] = p.rt.redis.zrange(PARKED_KEY, 0, -1, withscores=True)  # type: ignore[assignment]
    assert parked == [(b"W|" + lane, opens_at_ms)]  # a worker comes back for it then
    assert not p.step()  # its lane is closed: nothing to take meanwhile
    assert metric(p, "promptq_limiter_waits_total", model=MODEL, how="parked") == 1

    p.drain(timeout_s=10, skip_waits=False)  # in real time: the lane opens, the job runs
    result = second.result()
    assert result is not None and result.attempts == 1
    assert len(server.requests) == 2


def test_jobs_sent_back_in_line_together_keep_the_order_they_were_queued_in(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    """Several workers take a tenant's next jobs at once, find no slot, and put them back in
    whatever order their threads get there: each goes back to its own place in the line."""
    p = make_pipeline(llm={"rpm": 30}, queue={"limiter_max_sleep_s": 0})
    p.client.submit("takes the burst")
    assert p.step()
    packed = p.client.submit_many(["pack 0", "pack 1", "pack 2"])
    single = p.client.submit("queued after the pack")
    assert p.step()  # the pack, split under the rate limit: its jobs back in line
    taken = [p.take() for _ in packed]
    for deliveries in taken:  # in the order taken: the last is put back last
        assert deliveries is not None
        run_jobs(p.rt, deliveries)
    p.advance()  # their lane opens

    again = [Message.decode(raw).id for raw in take_all(p.rt.redis)]
    assert again == [*(job.id for job in packed), single.id]
    assert len(server.requests) == 1


def test_a_spending_cap_with_no_room_fails_the_job_without_a_call(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    prices = {"input_cost_per_token": 1e-6, "output_cost_per_token": 1e-6}
    p = make_pipeline(llm=prices, queue={"max_spend_usd": 0})
    job = p.client.submit("costly")
    assert p.drain() == 1
    failed = failure(p, job.id)
    assert (failed.kind, failed.attempts) == ("budget_exceeded", 0)
    assert server.requests == []
    assert metric(p, "promptq_budget_refusals_total", model=MODEL) == 1


def _renamed_task(raw: bytes, index: int, task: str) -> bytes:
    """A pack message with the task of its entry ``index`` renamed."""
    envelope = json.loads(raw)
    body = json.loads(base64.b64decode(envelope["body"]))
    body[0][0][index]["task"] = task
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(envelope).encode()


def test_an_unknown_task_in_a_pack_fails_that_job_and_the_others_run(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    jobs = pipeline.client.submit_many(["one", "two", "three"])
    [message] = pipeline.queued()
    assert message.task == "promptq.pack"
    broker = pipeline.rt.redis
    claimed = pipeline.rt.scheduler.claim(TAKEN_KEY)
    assert claimed is not None
    broker.delete(TAKEN_KEY)
    broker.rpush(
        QUEUE, _renamed_task(claimed.message, 1, "promptq.nope")
    )  # a message pushed as it is
    assert pipeline.drain() == 1
    failed = failure(pipeline, jobs[1].id)
    assert (failed.kind, failed.attempts) == ("bad_request", 0)
    assert [job.status() for job in jobs] == [
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.SUCCEEDED,
    ]
    assert sorted(server.calls_by_prompt()) == ["one", "three"]
    assert metric(pipeline, "promptq_jobs_failed_total", kind="bad_request") == 1


def test_a_duplicate_delivery_of_a_finished_job_is_dropped(
    pipeline: Pipeline, server: ScriptedOpenAIServer
) -> None:
    job = pipeline.client.submit("once")
    assert pipeline.step()
    first = job.result()
    pipeline.rt.redis.rpush(QUEUE, pipeline.taken[0])  # delivered again (a lost ack, say)
    assert pipeline.step()
    assert pipeline.client.job(job.id).result() == first
    assert len(server.requests) == 1
    assert metric(pipeline, "promptq_calls_total", model=MODEL, outcome="ok") == 1
    assert not pipeline.rt.redis.exists(starts_key(job.id))
    assert pipeline.parked() == [] and pipeline.queued() == []


@pytest.mark.parametrize("deaths", [2, 3])
def test_a_job_redelivered_too_often_fails_as_worker_lost(
    pipeline: Pipeline, server: ScriptedOpenAIServer, deaths: int
) -> None:
    allowed = pipeline.rt.settings.queue.max_redeliveries
    assert allowed == 2
    job = pipeline.client.submit("cursed")
    deliveries = pipeline.take()
    assert deliveries is not None
    for _ in range(deaths):  # a worker marked it running, then died holding the message
        begin(pipeline.rt, deliveries)
    run_jobs(pipeline.rt, deliveries)  # the same message, back from the dead worker
    if deaths <= allowed:
        assert job.status() is JobStatus.SUCCEEDED
        assert len(server.requests) == 1
        return
    failed = failure(pipeline, job.id)
    assert (failed.kind, failed.attempts) == ("worker_lost", 0)
    assert server.requests == []
    assert metric(pipeline, "promptq_jobs_failed_total", kind="worker_lost") == 1


def test_retries_do_not_count_as_redeliveries(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    p = make_pipeline(queue={"max_redeliveries": 0})
    server.script(Reply(status=503), Reply(status=502))
    job = p.client.submit("persistent")
    assert p.drain() == 3
    result = job.result()
    assert result is not None and result.attempts == 3


def test_redis_down_during_an_attempt_makes_run_jobs_raise(
    tmp_path: Path, server: ScriptedOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stops while one job of a pack waits for its reply (the other already scheduled
    for retry): recording the failure fails, run_jobs raises, and nothing was parked."""
    gate = threading.Event()
    server.script(Reply(status=503), Reply(status=503, gate=gate))
    with (
        RedisServer(tmp_path / "redis", appendonly=True) as redis_server,
        Pipeline(redis_server.url, server.base_url) as p,
        ThreadPoolExecutor(1) as pool,
    ):
        marked, mark_retrying = threading.Event(), p.rt.store.mark_retrying

        def mark_and_tell(job_id: str, failures: int) -> None:
            mark_retrying(job_id, failures)
            marked.set()

        monkeypatch.setattr(p.rt.store, "mark_retrying", mark_and_tell)
        jobs = p.client.submit_many(["a", "b"])
        deliveries = p.take()
        assert deliveries is not None
        running = pool.submit(run_jobs, p.rt, deliveries)
        try:
            server.wait_for_requests(2, timeout_s=10)  # the second one waits at the gate
            assert marked.wait(10)  # the first one's retry is recorded
            redis_server.stop()
        finally:
            gate.set()  # the second reply: a 503 too, which can no longer be recorded
        with pytest.raises(REDIS_UNAVAILABLE):
            running.result(timeout=30)
        redis_server.start()  # its append-only file brings the data back
        assert p.rt.redis.zcard(PARKED_KEY) == 0
        statuses = sorted(job.status() for job in jobs)
        assert statuses == [JobStatus.RETRYING, JobStatus.RUNNING]


def test_a_sibling_meeting_redis_down_keeps_a_retry_from_being_parked(
    pipeline: Pipeline, server: ScriptedOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with Redis back by the time run_jobs would park: the message brings both
    jobs back, so parking the retry as well would run that job twice."""
    server.script(Reply(status=503), Reply(status=503))
    first, second = pipeline.client.submit_many(["a", "b"])
    store = pipeline.rt.store
    mark_retrying = store.mark_retrying

    def down_for_the_second(job_id: str, failures: int) -> None:
        if job_id == second.id:
            raise redis.ConnectionError("Redis went away for a moment")
        mark_retrying(job_id, failures)

    monkeypatch.setattr(store, "mark_retrying", down_for_the_second)
    with pytest.raises(redis.ConnectionError):
        pipeline.step()
    assert pipeline.parked() == [] and pipeline.queued() == []
    assert (first.status(), second.status()) == (JobStatus.RETRYING, JobStatus.RUNNING)
    assert len(server.requests) == 2


def test_a_pack_under_a_rate_limit_is_split_into_jobs_taken_one_by_one(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    p = make_pipeline(llm={"rpm": 600})
    jobs = p.client.submit_many(["one", "two", "three"])
    [pack] = p.queued()
    assert pack.task == "promptq.pack"

    assert p.step()

    assert server.requests == []  # no job of the pack asked for a slot
    singles = p.queued()
    assert sorted(m.id for m in singles) == sorted(job.id for job in jobs)
    assert {m.task for m in singles} == {"promptq.complete"}
    p.drain()
    assert all(job.result() is not None for job in jobs) and len(server.requests) == 3
