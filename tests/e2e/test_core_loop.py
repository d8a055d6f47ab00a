"""Submit → Celery worker → LiteLLM over HTTP → result through Redis, with retries."""

from __future__ import annotations

import asyncio

import pytest

from api_client import (
    AsyncClient,
    Client,
    JobFailed,
    JobNotFound,
    JobStatus,
    JobTimeout,
    Usage,
)
from api_client._constants import QUEUE, starts_key, state_key
from api_client._requests import build_request
from api_client._task_messages import task_message
from tests.support.broker import settled
from tests.support.e2e_worker import CANARY_KEY, NUM_RETRIES, module_worker
from tests.support.invariants import dump_redis
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.threads import off_main_thread
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess


def test_success_carries_content_usage_and_one_attempt(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    job = client.submit("hello brave world", temperature=0, max_tokens=7)

    result = job.wait(timeout=WAIT_S)

    assert result.id == job.id
    assert result.content == "echo: hello brave world"
    assert result.message == {"role": "assistant", "content": "echo: hello brave world"}
    assert result.finish_reason == "stop"
    assert result.model == "test-model"
    assert result.usage == Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    assert result.attempts == 1
    assert result.cost_usd is None  # the scripted model has no price
    assert result.latency_s > 0
    assert job.status() is JobStatus.SUCCEEDED
    [request] = provider.requests
    assert request.body["model"] == "test-model"
    assert request.body["temperature"] == 0
    assert request.body["max_tokens"] == 7
    assert request.headers["authorization"] == f"Bearer {CANARY_KEY}"


def test_messages_and_per_request_model(client: Client, provider: ScriptedOpenAIServer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "second question"},
    ]

    result = client.submit(messages=messages, model="openai/other-model").wait(timeout=WAIT_S)

    assert result.content == "echo: second question"
    [request] = provider.requests
    assert request.body["model"] == "other-model"
    assert request.body["messages"] == messages


# A provider's Retry-After up to 4 s is a retry's wait here (a longer one would pause the
# deployment: test_ratelimit); the backoff alone waits 0.05 s.
worker = module_worker(args=("--concurrency", "16"), env={"LLM_RETRY_MAX_WAIT": "4"})


def test_429_with_retry_after_then_success(client: Client, provider: ScriptedOpenAIServer) -> None:
    provider.script(Reply(status=429, headers={"Retry-After": "0.6"}))

    result = client.submit("rate limited once").wait(timeout=WAIT_S)

    assert result.attempts == 2
    first, second = provider.requests
    # The backoff alone would wait 0.05 s: Retry-After won.
    assert second.received_at - first.received_at >= 0.6


def test_two_503s_then_success(client: Client, provider: ScriptedOpenAIServer) -> None:
    provider.script(Reply(status=503), Reply(status=503))

    result = client.submit("flaky provider").wait(timeout=WAIT_S)

    assert result.attempts == 3
    assert len(provider.requests) == 3


def test_400_fails_at_once_after_one_request(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.default = Reply(status=400)
    job = client.submit("a request the provider refuses")

    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=WAIT_S)

    assert failed.value.kind == "bad_request"
    assert failed.value.status_code == 400
    assert failed.value.attempts == 1
    assert failed.value.job_id == job.id
    assert job.status() is JobStatus.FAILED
    assert len(provider.requests) == 1


def test_429_forever_fails_rate_limited_after_every_retry(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.default = Reply(status=429)

    with pytest.raises(JobFailed) as failed:
        client.submit("never admitted").wait(timeout=WAIT_S)

    assert failed.value.kind == "rate_limited"
    assert failed.value.status_code == 429
    assert failed.value.attempts == NUM_RETRIES + 1
    assert len(provider.requests) == NUM_RETRIES + 1


def test_hanging_provider_times_out_and_is_retried(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(delay_s=10))  # far beyond LLM_TIMEOUT = 1 s

    result = client.submit("slow then fine").wait(timeout=WAIT_S)

    assert result.attempts == 2
    assert len(provider.requests) == 2


def test_statuses_follow_the_job(client: Client, provider: ScriptedOpenAIServer) -> None:
    provider.script(Reply(status=429, headers={"Retry-After": "1.5"}), Reply(delay_s=0.8))
    job = client.submit("watch me")

    wait_until(lambda: job.status() is JobStatus.RETRYING)
    wait_until(lambda: job.status() is JobStatus.RUNNING)
    assert job.result() is None  # not finished: non-blocking
    with pytest.raises(JobTimeout) as timed_out:
        job.wait(timeout=0.01)
    assert timed_out.value.job_id == job.id

    assert job.wait(timeout=WAIT_S).attempts == 2
    assert job.status() is JobStatus.SUCCEEDED


def test_another_client_reattaches_by_id(client: Client, redis_server: RedisServer) -> None:
    job_id = client.submit("find me later").id

    with Client(redis_server.url) as other:
        result = other.job(job_id).wait(timeout=WAIT_S)
        assert result.content == "echo: find me later"
        with pytest.raises(JobNotFound):
            other.job("no-such-job").status()


def test_submit_many_200_all_come_back(client: Client, provider: ScriptedOpenAIServer) -> None:
    prompts = [f"prompt number {i}" for i in range(200)]

    jobs = client.submit_many(prompts)
    finished = list(client.as_completed(jobs, timeout=WAIT_S))

    assert sorted(job.id for job in finished) == sorted(job.id for job in jobs)
    contents = {job.id: job.result().content for job in finished}  # type: ignore[union-attr]
    assert all(contents[job.id] == f"echo: {p}" for job, p in zip(jobs, prompts, strict=True))
    assert len(provider.requests) == 200


def test_async_client_gathers_50(redis_server: RedisServer, worker: WorkerProcess) -> None:
    async def run() -> list[str | None]:
        async with AsyncClient(redis_server.url) as client:
            jobs = await client.submit_many([f"async {i}" for i in range(50)])
            results = await asyncio.gather(*(job.wait(timeout=WAIT_S) for job in jobs))
            assert [await job.status() for job in jobs] == [JobStatus.SUCCEEDED] * 50
            return [result.content for result in results]

    assert off_main_thread(lambda: asyncio.run(run())) == [f"echo: async {i}" for i in range(50)]


def test_a_job_redelivered_too_often_fails_as_worker_lost(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    # As if three workers had died running this job (PROMPTQ_MAX_REDELIVERIES defaults to 2).
    job_id = "died-three-times"
    redis = redis_server.client()
    redis.set(starts_key(job_id), 3)
    redis.set(state_key(job_id), "queued")  # as submit() leaves it
    redis.lpush(QUEUE, task_message(job_id, build_request("deadly", None, None, {})))

    with pytest.raises(JobFailed) as failed:
        client.job(job_id).wait(timeout=WAIT_S)

    assert failed.value.kind == "worker_lost"
    assert provider.requests == []


def test_a_duplicate_delivery_of_a_finished_job_is_dropped(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    request = build_request("only once", None, None, {})
    first = client.submit_many([request])[0].wait(timeout=WAIT_S)
    # Deliver the same job again, as a redelivery after a lost acknowledgement would.
    redis = redis_server.client()
    redis.lpush(QUEUE, task_message(first.id, request))

    # The worker took the duplicate and acknowledged it (a call it made would come first).
    wait_until(lambda: settled(redis))
    assert len(provider.requests) == 1
    assert client.job(first.id).wait(timeout=WAIT_S) == first


# Last in the module: it inspects everything the runs above left behind.
def test_canary_key_never_reaches_redis_results_or_logs(
    client: Client,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
) -> None:
    # A provider that echoes the key in its error, as some do for a wrong key.
    echo_key = {"error": {"message": f"Incorrect API key provided: {CANARY_KEY}", "code": None}}
    provider.script(Reply(status=503), Reply(status=401, body=echo_key))
    with pytest.raises(JobFailed) as failed:
        client.submit("leak test").wait(timeout=WAIT_S)
    assert failed.value.kind == "authentication"
    assert CANARY_KEY not in str(failed.value)

    # Everything the module's runs left in Redis, and everything the worker logged.
    stored = dump_redis(redis_server)
    assert stored  # the runs above left results to inspect
    assert CANARY_KEY.encode() not in stored
    assert CANARY_KEY not in worker.log()
    assert "leak test" not in worker.log()  # prompts are not logged either
