"""`promptq status` figures, read from a real Redis with and without a real worker."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api_client import BrokerUnavailable, Client
from api_client._constants import (
    PRIORITY_SEP,
    QUEUE,
    RECOVERY_KEY,
    SUSPECTS_KEY,
    UNACKED_KEY,
    WORKERS_KEY,
    state_key,
    taken_key,
)
from tests.support.e2e_worker import module_worker
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess
from worker.ops.fleet_status import (
    FleetStatus,
    format_status,
    gather_status,
)

WAIT_S = 15.0  # bounds every wait; a healthy run takes a fraction of it
QUICK_PING_S = 0.1  # while polling a condition, do not wait a full second for pings


def wait_for(
    read: Callable[[], FleetStatus], condition: Callable[[FleetStatus], bool]
) -> FleetStatus:
    deadline = time.monotonic() + WAIT_S
    while True:
        status = read()
        if condition(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {WAIT_S} s; last status: {status}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bare_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis no worker listens to: what is queued there stays queued."""
    with RedisServer(tmp_path_factory.mktemp("bare-redis")) as server:
        yield server


@pytest.fixture
def empty_redis(bare_redis: RedisServer) -> RedisServer:
    client = bare_redis.client()
    try:
        client.flushdb()
    finally:
        client.close()
    return bare_redis


def test_queued_jobs_without_a_worker(empty_redis: RedisServer) -> None:
    with Client(empty_redis.url) as client:
        client.submit_many(["one", "two", {"prompt": "three", "temperature": 0}])
        client.submit("four")

    status = gather_status(empty_redis.url, inspect_timeout_s=0.2)

    assert status.queue_depth == 2  # messages: submit_many's three jobs travel as one pack
    assert status.in_flight == 0
    assert status.retries_scheduled == 0
    assert status.workers == []
    assert status.jobs == {"queued": 4, "running": 0, "retrying": 0}
    assert not status.truncated
    assert status.rate_limits == []
    text = format_status(status)
    assert "queue depth:" in text
    assert "none answered within 0.2 s" in text
    assert status.to_json()["queue_depth"] == 2


def test_priority_lists_count_toward_the_depth(empty_redis: RedisServer) -> None:
    with Client(empty_redis.url) as client:
        client.submit("plain priority")
    redis_client = empty_redis.client()
    try:
        # Where kombu's Redis transport queues a message of priority 3 (and 9).
        redis_client.lpush(f"{QUEUE}{PRIORITY_SEP}3", b"{}", b"{}")
        redis_client.lpush(f"{QUEUE}{PRIORITY_SEP}9", b"{}")
    finally:
        redis_client.close()

    assert gather_status(empty_redis.url, inspect_timeout_s=QUICK_PING_S).queue_depth == 4


def test_job_counts_stop_at_the_scan_cap_and_say_so(empty_redis: RedisServer) -> None:
    redis_client = empty_redis.client()
    try:
        pipe = redis_client.pipeline(transaction=False)
        for n in range(5000):
            pipe.set(state_key(f"job-{n}"), "running")
        pipe.execute()
    finally:
        redis_client.close()

    capped = gather_status(empty_redis.url, inspect_timeout_s=QUICK_PING_S, max_scanned_keys=2000)
    whole = gather_status(empty_redis.url, inspect_timeout_s=QUICK_PING_S)

    assert capped.truncated
    assert 2000 <= capped.jobs["running"] < 5000
    assert "partial: only the first 2,000 keys were read" in format_status(capped)
    assert not whole.truncated
    assert whole.jobs["running"] == 5000


def test_redis_down_raises_broker_unavailable_without_the_password(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        port = server.port
    url = f"redis://:hunter2-secret@127.0.0.1:{port}/0"

    with pytest.raises(BrokerUnavailable) as raised:
        gather_status(url)

    assert f"127.0.0.1:{port}" in str(raised.value)
    assert "hunter2-secret" not in str(raised.value)


def test_a_running_worker_answers_the_ping(
    redis_server: RedisServer, worker: WorkerProcess
) -> None:
    status = wait_for(lambda: gather_status(redis_server.url), lambda s: bool(s.workers))

    [name] = status.workers
    assert name.startswith(f"promptq-{worker.pid}@")
    assert name in format_status(status)


# The provider's Retry-After of 3 s below is a retry's wait (a longer one than
# LLM_RETRY_MAX_WAIT would pause the deployment instead).
worker = module_worker(env={"LLM_RETRY_MAX_WAIT": "4"})


def test_a_retry_parked_until_due_is_counted(
    redis_server: RedisServer, worker: WorkerProcess, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(status=429, headers={"Retry-After": "3"}))
    with Client(redis_server.url) as client:
        job = client.submit("rate limited once")

        def read() -> FleetStatus:
            return gather_status(redis_server.url, inspect_timeout_s=QUICK_PING_S)

        held = wait_for(read, lambda s: s.parked == 1)
        assert held.retries_scheduled == 0  # no worker holds it in memory
        assert held.jobs["retrying"] == 1
        assert held.queue_depth == 0
        # The 429 is on the deployment's limiter, and its Retry-After holds the whole fleet.
        [limiter] = held.rate_limits
        assert limiter.model == "openai/test-model"
        assert provider.base_url.startswith(f"http://{limiter.endpoint}/")
        assert limiter.rate_limited_per_minute == pytest.approx(1, abs=0.1)
        assert 0 < limiter.paused_for_s <= 3
        assert "openai/test-model" in format_status(held)

        assert job.wait(timeout=WAIT_S).attempts == 2
        done = wait_for(read, lambda s: s.in_flight == 0)
    assert done.retries_scheduled == 0
    assert done.jobs == {"queued": 0, "running": 0, "retrying": 0}


def test_recovery_and_stranded_jobs_are_shown(empty_redis: RedisServer) -> None:
    redis_client = empty_redis.client()
    try:
        redis_client.zadd(WORKERS_KEY, {"host:1:a": 1, "host:2:b": 2})
        redis_client.lpush(taken_key("host:1:a"), b"{}")  # taken, not yet recorded
        redis_client.hset(UNACKED_KEY, "tag", b"[]")
        redis_client.hset(
            RECOVERY_KEY, mapping={"dead_workers": 2, "messages_returned": 5, "jobs_republished": 1}
        )
        redis_client.hset(SUSPECTS_KEY, mapping={"job-a": 1, "job-b": 2})
    finally:
        redis_client.close()

    status = gather_status(empty_redis.url, inspect_timeout_s=QUICK_PING_S)

    assert status.in_flight == 2
    assert status.processes == 2
    assert status.recovered == {
        "dead_workers": 2,
        "messages_returned": 5,
        "jobs_republished": 1,
        "jobs_abandoned": 0,
    }
    assert status.stranded == 2
    text = format_status(status)
    assert "5 message(s) of 2 dead worker process(es) returned" in text
    assert "1 job(s) published again by the safety net" in text
    assert "stranded:" in text
    assert status.to_json()["recovered"]["messages_returned"] == 5
