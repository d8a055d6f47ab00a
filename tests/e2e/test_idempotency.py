"""Idempotency keys end to end: one key, one job, one provider call, however many submits."""

from __future__ import annotations

import asyncio
import threading

from api_client import AsyncClient, Client, PromptResult
from api_client._constants import QUEUE
from tests.support.broker import settled
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.queue_events import QueueEvents
from tests.support.redis_server import RedisServer
from tests.support.threads import off_main_thread
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess

THREADS = 50


def _settled(redis_server: RedisServer) -> bool:
    """No message queued, taken or delivered but unacknowledged: no call can still come."""
    return settled(redis_server.client())


def test_one_key_from_50_threads_is_one_job_and_one_call(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    barrier = threading.Barrier(THREADS)
    job_ids: list[str] = []
    results: list[PromptResult] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def agent() -> None:
        try:
            barrier.wait(WAIT_S)  # all submit at once
            job = client.submit("summarise the report", idempotency_key="report-2026-q3")
            result = job.wait(timeout=WAIT_S)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            job_ids.append(job.id)
            results.append(result)

    threads = [threading.Thread(target=agent) for _ in range(THREADS)]
    with QueueEvents(redis_server.client()) as queue:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)

        assert errors == []
        assert len(job_ids) == THREADS
        assert len(set(job_ids)) == 1
        assert all(result == results[0] for result in results)
        assert results[0].content == "echo: summarise the report"
        wait_until(lambda: _settled(redis_server))
        # One message was queued and taken once: no duplicate was published or delivered.
        assert (queue.pushes(), queue.takes()) == (1, 1)
    assert len(provider.requests) == 1


def test_one_key_from_50_coroutines_is_one_job_and_one_call(
    provider: ScriptedOpenAIServer, redis_server: RedisServer, worker: WorkerProcess
) -> None:
    async def run() -> tuple[set[str], list[str | None]]:
        async with AsyncClient(redis_server.url) as client:
            jobs = await asyncio.gather(
                *(client.submit("async once", idempotency_key="async-key") for _ in range(50))
            )
            results = await asyncio.gather(*(job.wait(timeout=WAIT_S) for job in jobs))
            return {job.id for job in jobs}, [result.content for result in results]

    with QueueEvents(redis_server.client()) as queue:
        job_ids, contents = off_main_thread(lambda: asyncio.run(run()))

        assert len(job_ids) == 1
        assert contents == ["echo: async once"] * 50
        wait_until(lambda: _settled(redis_server))
        # One message was queued and taken once: no duplicate was published or delivered.
        assert (queue.pushes(), queue.takes()) == (1, 1)
    assert len(provider.requests) == 1


def test_submit_many_takes_keys_per_item(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    items = [
        {"prompt": "first", "idempotency_key": "batch-1"},
        {"prompt": "first", "idempotency_key": "batch-1"},  # the same submission twice
        {"prompt": "second", "idempotency_key": "batch-2"},
        {"prompt": "no key"},
    ]

    first = client.submit_many(items)
    again = client.submit_many(items)

    assert first[0].id == first[1].id == again[0].id == again[1].id
    assert first[2].id == again[2].id != first[0].id
    assert first[3].id != again[3].id  # without a key every submit is a new job
    finished = list(client.as_completed([*first, again[3]], timeout=WAIT_S))
    assert len(finished) == 4  # first[0] and first[1] are one job
    wait_until(lambda: _settled(redis_server))
    # batch-1, batch-2, and the two keyless jobs.
    assert sorted(r.body["messages"][0]["content"] for r in provider.requests) == [
        "first",
        "no key",
        "no key",
        "second",
    ]


def test_a_finished_job_is_returned_again_not_rerun(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    result = client.submit("only once", idempotency_key="finished-key").wait(timeout=WAIT_S)
    wait_until(lambda: _settled(redis_server))

    again = client.submit("only once", idempotency_key="finished-key")

    assert again.id == result.id
    assert again.wait(timeout=WAIT_S) == result
    assert redis_server.client().llen(QUEUE) == 0
    assert len(provider.requests) == 1
