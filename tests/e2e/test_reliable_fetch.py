"""A worker killed with a message on its way to it loses nothing: the message sits in the
worker process's own list in Redis, and another worker returns it to the queue once the dead
one stops beating (PROMPTQ_HEARTBEAT_TIMEOUT_S), long before the visibility timeout."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from api_client import Client, ClientSettings, Job, JobFailed, JobStatus
from api_client._constants import (
    PARKED_KEY,
    QUEUE,
    RECOVERY_KEY,
    UNACKED_KEY,
    WORKERS_KEY,
    state_key,
    taken_key,
)
from api_client._polling import text_of
from api_client._requests import build_request
from api_client._task_messages import task_message
from tests.support.e2e_worker import CANARY_KEY, e2e_worker
from tests.support.invariants import assert_invariants
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess

HEARTBEAT_TIMEOUT_S = 2.0
# The documented bound (1.1 x the timeout), and room for a poll, a call and a loaded machine.
COMEBACK_S = 1.1 * HEARTBEAT_TIMEOUT_S + 4.0
VISIBILITY_S = 60.0  # far beyond the test: a job back in time did not come back through it


pytestmark = pytest.mark.usefixtures("flushed_redis")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """This module's own Redis, persistent as production runs it: a test restarts it."""
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server


@pytest.fixture
def broker(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    yield client
    client.close()


def _worker(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    directory: Path,
    name: str,
    env: Mapping[str, str] | None = None,
) -> WorkerProcess:
    """A worker of 4 threads (not started yet) with this module's heartbeat and visibility
    timeouts, and ``env`` on top."""
    timeouts = {
        "PROMPTQ_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
        "PROMPTQ_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
    }
    return e2e_worker(
        redis_server,
        provider,
        directory,
        name=name,
        env=timeouts | dict(env or {}),
        args=("-c", "4"),
    )


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
    doomed = _worker(redis_server, provider, tmp_path, "doomed")
    successor = _worker(redis_server, provider, tmp_path, "successor")
    with Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1)) as client:
        try:
            doomed.start().wait_ready()
            taken = _taken_key_of(broker, doomed)
            jobs = {}
            # Stopped while it waits for a message: Redis hands the next one pushed on the
            # queue list (as a Celery client, or the recovery of a dead worker, pushes it) to
            # its pending take, and the reply waits in a socket nobody reads (with kombu's own
            # BRPOP, the message was then in no key at all). A take that timed out just before
            # the stop leaves the message queued: try again.
            for attempt in range(5):
                os.kill(doomed.pid, signal.SIGSTOP)
                prompt = f"on its way {attempt}"
                job_id = f"on-its-way-{attempt}"
                broker.set(state_key(job_id), JobStatus.QUEUED.value)
                broker.lpush(QUEUE, task_message(job_id, build_request(prompt, None, None, {})))
                jobs[prompt] = client.job(job_id)
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
    # The gated calls hang until the kill, and the survivor may take many seconds to start on a
    # loaded machine: a call that timed out first would be retried by the doomed worker. (The
    # timeout must fit in half the visibility timeout: the worker refuses to start otherwise.)
    env = {"LLM_TIMEOUT": "29"}
    doomed = _worker(redis_server, provider, tmp_path, "doomed", env)
    survivor = _worker(redis_server, provider, tmp_path, "survivor", env)
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


def _holds_a_message_with_an_eta(broker: redis.Redis) -> bool:
    """The worker holds one message, and it waits for its ETA in the worker's memory."""
    records: list[bytes] = broker.hvals(UNACKED_KEY)  # type: ignore[assignment]
    return len(records) == 1 and json.loads(records[0])[0]["headers"]["eta"] is not None


def _pushed_with_an_eta(
    client: Client, broker: redis.Redis, prompt: str, due_in_s: float
) -> Job[Any]:
    """Push a job's message with an ETA on the queue list, as an older promptq's retry (or a
    plain Celery client's countdown) carries: promptq's own messages wait in Redis instead."""
    job_id = f"eta-{uuid.uuid4().hex[:8]}"
    envelope = json.loads(task_message(job_id, build_request(prompt, None, None, {})))
    envelope["headers"]["eta"] = (datetime.now(UTC) + timedelta(seconds=due_in_s)).isoformat()
    broker.set(state_key(job_id), JobStatus.QUEUED.value)
    broker.lpush(QUEUE, json.dumps(envelope))
    return client.job(job_id)


def test_a_message_held_for_its_eta_through_a_redis_restart_comes_back_at_once(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    broker: redis.Redis,
    tmp_path: Path,
) -> None:
    """Celery forgets the messages it holds for their ETA when its connection to Redis drops;
    they went back to the queue only after the visibility timeout (an hour by default). They
    go back as soon as the worker reconnects."""
    worker = _worker(redis_server, provider, tmp_path, "worker")
    prompt = f"held through a restart {uuid.uuid4().hex[:8]}"
    with Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1)) as client:
        try:
            broker.config_set("appendfsync", "always")  # the kill loses no write
            worker.start().wait_ready()
            job = _pushed_with_an_eta(client, broker, prompt, due_in_s=3)
            wait_until(lambda: _holds_a_message_with_an_eta(broker))
            redis_server.kill()
            redis_server.start()
            restarted_at = time.monotonic()
            result = job.wait(timeout=VISIBILITY_S / 2)
            back_after_s = time.monotonic() - restarted_at
        finally:
            worker.stop()
    assert result.content == f"echo: {prompt}"
    assert provider.calls_by_prompt()[prompt] == 1
    assert back_after_s < VISIBILITY_S / 2  # not the visibility timeout: the worker gave it back


def test_a_retry_parked_through_a_redis_restart_comes_back_when_due(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    broker: redis.Redis,
    tmp_path: Path,
) -> None:
    """A retry waits in Redis (the parked set), not in the worker: a Redis restart that keeps
    its data (AOF) keeps it, and it runs when due."""
    env = {"LLM_RETRY_MIN_WAIT": "2", "LLM_RETRY_MAX_WAIT": "2"}
    worker = _worker(redis_server, provider, tmp_path, "worker", env)
    provider.script(Reply(status=503))
    prompt = f"parked through a restart {uuid.uuid4().hex[:8]}"
    with Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1)) as client:
        try:
            worker.start().wait_ready()
            broker.config_set("appendfsync", "always")  # the kill loses no write
            job = client.submit(prompt)
            wait_until(  # parked, and the worker holds nothing
                lambda: (
                    job.status() is JobStatus.RETRYING
                    and broker.zcard(PARKED_KEY) == 1
                    and broker.hlen(UNACKED_KEY) == 0
                )
            )
            redis_server.kill()
            redis_server.start()
            result = job.wait(timeout=VISIBILITY_S / 2)
        finally:
            worker.stop()
    assert result.content == f"echo: {prompt}"
    assert result.attempts == 2
    assert provider.calls_by_prompt()[prompt] == 2
