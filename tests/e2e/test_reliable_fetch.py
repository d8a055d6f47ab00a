"""A worker killed with a message on its way to it loses nothing: the message sits in the
worker process's own list in Redis, and another worker returns it to the queue once the dead
one stops beating (PROMPTQ_HEARTBEAT_TIMEOUT_S), long before the visibility timeout."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from api_client import Client, ClientSettings, JobFailed
from api_client._constants import QUEUE, RECOVERY_KEY, WORKERS_KEY, taken_key
from api_client._wire import text_of
from tests.support.invariants import assert_invariants
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

from .conftest import CANARY_KEY, worker_env
from .test_core_loop import WAIT_S

HEARTBEAT_TIMEOUT_S = 2.0
# The documented bound (1.1 x the timeout), and room for a poll, a call and a loaded machine.
COMEBACK_S = 1.1 * HEARTBEAT_TIMEOUT_S + 4.0
VISIBILITY_S = 60.0  # far beyond the test: a job back in time did not come back through it


pytestmark = pytest.mark.usefixtures("flushed_redis")


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def _env(redis_server: RedisServer, provider: ScriptedOpenAIServer) -> dict[str, str]:
    return worker_env(redis_server.url, provider.base_url) | {
        "PROMPTQ_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        "PROMPTQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    }


def _taken_key_of(broker: redis.Redis, process: WorkerProcess) -> str:
    found: list[bytes] = list(broker.zrange(WORKERS_KEY, 0, -1))  # type: ignore[arg-type]
    members = [text_of(member) for member in found]
    [member] = [m for m in members if f":{process.pid}:" in m]
    return taken_key(member)


def test_a_worker_killed_with_a_message_on_its_way_loses_nothing(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    broker: redis.Redis,
    tmp_path: Path,
) -> None:
    env = _env(redis_server, provider)
    doomed = WorkerProcess(env, tmp_path / "doomed.log", args=("-c", "4"))
    successor = WorkerProcess(env, tmp_path / "successor.log", args=("-c", "4"))
    with Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1)) as client:
        try:
            doomed.start().wait_ready()
            taken = _taken_key_of(broker, doomed)
            jobs = {}
            # Stopped while it waits for a message: Redis hands the next one to its pending
            # take, and the reply waits in a socket nobody reads (with kombu's own BRPOP, the
            # message was then in no key at all). A take that timed out just before the stop
            # leaves the message queued: try again.
            for attempt in range(5):
                os.kill(doomed.pid, signal.SIGSTOP)
                prompt = f"on its way {attempt}"
                jobs[prompt] = client.submit(prompt)
                time.sleep(0.3)  # the scenario: how long the reply waits unread
                if broker.llen(QUEUE) == 0:
                    break
                os.kill(doomed.pid, signal.SIGCONT)
                jobs.pop(prompt).wait(timeout=WAIT_S)
            else:
                pytest.fail("the stopped worker never had a take pending")
            assert broker.llen(taken) == 1
            [job] = jobs.values()
            doomed.kill()
            # A worker starting on a busy machine takes seconds: the bound runs from when it
            # can take jobs (the dead one has been silent since its stop).
            successor.start().wait_ready()
            ready_at = time.monotonic()
            result = job.wait(timeout=COMEBACK_S + 30)  # the bound is checked below
            back_after_s = provider.requests[-1].received_at - ready_at
        finally:
            successor.stop()
            doomed.kill()
        assert result.content == f"echo: {prompt}"
        assert result.attempts == 1
        assert back_after_s < COMEBACK_S, back_after_s
        assert provider.calls_by_prompt()[prompt] == 1  # the killed worker never called
        assert broker.exists(taken) == 0
        assert int(broker.hget(RECOVERY_KEY, "messages_returned") or 0) >= 1


def test_jobs_running_on_a_killed_worker_come_back_after_the_heartbeat_timeout(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    broker: redis.Redis,
    tmp_path: Path,
) -> None:
    """Running jobs (held by the worker, unacknowledged) come back too, once the worker has
    been silent for the timeout: not at the kill, and not after the visibility timeout."""
    env = _env(redis_server, provider) | {"LLM_TIMEOUT": "10"}
    doomed = WorkerProcess(env, tmp_path / "doomed.log", args=("-c", "4"))
    survivor = WorkerProcess(env, tmp_path / "survivor.log", args=("-c", "4"))
    gate = threading.Event()  # the calls hang until the kill
    provider.script(*[Reply(gate=gate)] * 3)
    prompts = [f"running {n}" for n in range(3)]
    with Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1)) as client:
        try:
            doomed.start().wait_ready()
            jobs = {prompt: client.submit(prompt) for prompt in prompts}
            provider.wait_for_requests(3, timeout_s=WAIT_S)  # all three on the doomed worker
            survivor.start().wait_ready()
            doomed.kill()
            killed_at = time.monotonic()
            gate.set()  # the dead worker's sockets are gone: these answers reach nobody
            outcomes = assert_invariants(
                client,
                jobs,
                redis_server=redis_server,
                provider=provider,
                workers=[doomed, survivor],
                secret=CANARY_KEY,
                max_calls=2,
                timeout_s=COMEBACK_S + 30,
            )
        finally:
            gate.set()
            survivor.stop()
            doomed.kill()
    again = [r.received_at for r in provider.requests[3:6]]
    assert len(again) == 3
    for came_back_at in again:
        assert HEARTBEAT_TIMEOUT_S * 0.9 <= came_back_at - killed_at < COMEBACK_S
    for outcome in outcomes.values():
        assert not isinstance(outcome, JobFailed), outcome
        assert outcome.attempts == 1
    assert broker.hget(RECOVERY_KEY, "dead_workers") == b"1"
