"""Redis killed (SIGKILL) and restarted mid-batch: with AOF, every job still ends, once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from api_client import Client, JobFailed, JobStatus
from tests.support.broker import held_jobs
from tests.support.e2e_worker import CANARY_KEY, NUM_RETRIES, worker_env
from tests.support.invariants import assert_invariants
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess, worker_fleet

JOBS = 50
CALL_S = 0.4  # the provider's latency: the batch takes some 3 s on two workers of 3 threads
# A delivery or acknowledgement lost with the last second of writes comes back after the
# visibility timeout: short, to bound the test.
VISIBILITY_S = 6.0
MAX_REDELIVERIES = 2  # PROMPTQ_MAX_REDELIVERIES' default
# appendfsync everysec can lose the last second of writes: kill Redis only once every job
# was submitted longer ago than this.
FSYNC_S = 1.5
LOST_CONNECTION = "Connection to broker lost"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own Redis, persistent as production runs it: the test kills it."""
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server


@pytest.fixture(scope="module")
def workers(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[WorkerProcess]]:
    directory = tmp_path_factory.mktemp("workers")
    env = worker_env(redis_server.url, provider.base_url) | {
        "PROMPTQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        # Calls held through the outage must not time out (and become retries) meanwhile.
        "LLM_TIMEOUT": "2.5",
    }
    with worker_fleet(env, directory, count=2, concurrency=3) as processes:
        yield processes


def crash_mid_batch(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    workers: list[WorkerProcess],
    *,
    calls_end_in_the_outage: bool,
) -> None:
    """Run JOBS prompts, SIGKILL Redis mid-batch with calls in flight, restart it; check that
    every job ends, from the same client, nothing resubmitted.

    The calls in flight at the kill are held by the provider until Redis is back, or, with
    ``calls_end_in_the_outage``, answered while it is down (their results cannot be stored).
    """
    gate = threading.Event()
    gate.set()
    provider.default = Reply(delay_s=CALL_S, gate=gate)
    prompts = [f"through a Redis crash {n} {uuid.uuid4().hex[:8]}" for n in range(JOBS)]
    lost_before = [w.log().count(LOST_CONNECTION) for w in workers]
    with Client(redis_server.url) as client:
        jobs = dict(zip(prompts, client.submit_many(prompts), strict=True))
        submitted_at = time.monotonic()

        def finished() -> int:
            ended = (JobStatus.SUCCEEDED, JobStatus.FAILED)
            return sum(job.status() in ended for job in jobs.values())

        wait_until(lambda: time.monotonic() - submitted_at > FSYNC_S and finished() >= 6)
        gate.clear()  # calls from now on wait for the gate
        # The answered ones are stored, and a call waits at the gate (a worker may take a
        # moment to start its next one: asserting at once failed in CI).
        wait_until(
            lambda: finished() == provider.answered and len(provider.requests) > provider.answered
        )
        assert len(provider.requests) > provider.answered, "no call in flight at the kill"
        assert finished() < JOBS // 2, "the batch ended too soon to be interrupted"
        redis_server.kill()
        try:
            wait_until(
                lambda: all(
                    w.log().count(LOST_CONNECTION) > n
                    for w, n in zip(workers, lost_before, strict=True)
                )
            )
            if calls_end_in_the_outage:
                gate.set()
                wait_until(lambda: provider.answered == len(provider.requests))
        finally:
            redis_server.start()
            gate.set()

        outcomes = assert_invariants(
            client,
            jobs,
            redis_server=redis_server,
            provider=provider,
            workers=workers,
            secret=CANARY_KEY,
            max_calls=1 + NUM_RETRIES + MAX_REDELIVERIES,
            timeout_s=VISIBILITY_S + 6,
        )
        failed = {p: o for p, o in outcomes.items() if isinstance(o, JobFailed)}
        assert not failed, failed
        assert_both_work_again(client, redis_server, provider, workers)


def assert_both_work_again(
    client: Client,
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    workers: list[WorkerProcess],
) -> None:
    """Both workers came back to work after the restart: six jobs at once (one message each)
    take all three threads of each worker, which holds three of them while the calls hang."""
    assert all(process.running() for process in workers)
    gate = threading.Event()
    provider.default = Reply(gate=gate)
    broker = redis_server.client()
    try:
        calls_before = len(provider.requests)
        jobs = [client.submit(f"after the restart {n} {uuid.uuid4().hex[:8]}") for n in range(6)]
        provider.wait_for_requests(calls_before + 6, timeout_s=WAIT_S)
        held = [set(held_jobs(broker, process.pid)) for process in workers]
    finally:
        gate.set()
        broker.close()
    assert [len(jobs_held) for jobs_held in held] == [3, 3], held
    assert set.union(*held) == {job.id for job in jobs}
    for job in jobs:
        job.wait(timeout=WAIT_S)


def test_redis_killed_mid_batch_loses_no_job(
    redis_server: RedisServer, provider: ScriptedOpenAIServer, workers: list[WorkerProcess]
) -> None:
    crash_mid_batch(redis_server, provider, workers, calls_end_in_the_outage=False)


def test_calls_ending_while_redis_is_down_are_not_lost(
    redis_server: RedisServer, provider: ScriptedOpenAIServer, workers: list[WorkerProcess]
) -> None:
    # Their outcomes wait for Redis (worker.fleet.store.FINISH_PATIENCE_S) instead of being
    # dropped with an acknowledgement that Celery sends once the worker has reconnected.
    crash_mid_batch(redis_server, provider, workers, calls_end_in_the_outage=True)
