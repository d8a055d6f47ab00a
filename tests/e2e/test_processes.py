"""`promptq worker --processes N`: N worker processes consume, a warm shutdown loses nothing, a
killed process is replaced and its jobs come back, each process serves its own metrics."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from api_client import Client, ClientSettings, Job, JobStatus
from api_client._constants import QUEUE
from tests.support.broker import answering, consuming, held_jobs
from tests.support.e2e_worker import e2e_worker
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess

# A killed process's jobs come back after this long; it must fit twice LLM_RETRY_MAX_WAIT +
# LLM_TIMEOUT (see the kill tests in test_faults_workers).
KILL_VISIBILITY_S = 6.0
KILL_CALL_TIMEOUT_S = 2.5


pytestmark = pytest.mark.usefixtures("flushed_redis")


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[Client]:
    """One message per job (no packs): the scenarios spread jobs over processes by message."""
    with Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1)) as client:
        yield client


def supervised(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    directory: Path,
    env: Mapping[str, str] | None = None,
) -> WorkerProcess:
    """`promptq worker --processes 2 -c 2` (not started yet): two processes of two threads."""
    return e2e_worker(redis_server, provider, directory, env=env, processes=2, args=("-c", "2"))


def submit(client: Client, n: int, label: str) -> dict[str, Job]:
    prompts = [f"{label} {i} {uuid.uuid4().hex[:8]}" for i in range(n)]
    return dict(zip(prompts, client.submit_many(prompts), strict=True))


def by_index(worker: WorkerProcess) -> dict[int, int]:
    """The pid of each worker process the supervisor runs, by its --process-index."""
    found = {}
    for pid in worker.children():
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        found[int(argv[argv.index(b"--process-index") + 1])] = pid
    return found


def held_by(redis_server: RedisServer, worker: WorkerProcess) -> dict[int, set[str]]:
    """The jobs each worker process holds (delivered, not acknowledged), by its index."""
    broker = redis_server.client()
    try:
        return {index: set(held_jobs(broker, pid)) for index, pid in by_index(worker).items()}
    finally:
        broker.close()


def test_every_process_takes_calls_under_its_own_node_name(
    client: Client, redis_server: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    gate = threading.Event()
    provider.script(*[Reply(gate=gate)] * 4)
    worker = supervised(redis_server, provider, tmp_path)
    with worker:
        try:
            jobs = submit(client, 4, "spread")
            # Two threads a process: four calls at once need both processes.
            provider.wait_for_requests(4, timeout_s=WAIT_S)
            held = held_by(redis_server, worker)  # while the calls hang
        finally:
            gate.set()
        for job in jobs.values():
            assert job.wait(timeout=WAIT_S).attempts == 1
        children = worker.children()
        supervisor = worker.pid
        # Distinct Celery node names: each process answers the ping under its own.
        nodes = [f"promptq-{supervisor}-{index}" for index in (1, 2)]
        wait_until(lambda: sorted(n.split("@")[0] for n in answering(redis_server.url)) == nodes)

    assert len(children) == 2
    assert sorted(held) == [1, 2]
    assert all(len(jobs_held) == 2 for jobs_held in held.values()), held
    assert set.union(*held.values()) == {job.id for job in jobs.values()}


def test_sigterm_drains_calls_in_flight_and_leaves_the_rest_queued(
    client: Client, redis_server: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    gate = threading.Event()
    provider.script(*[Reply(gate=gate)] * 4)
    worker = supervised(redis_server, provider, tmp_path, {"LLM_TIMEOUT": "10"})
    worker.start().wait_ready()
    redis = redis_server.client()
    try:
        in_flight = submit(client, 4, "in flight")
        provider.wait_for_requests(4, timeout_s=WAIT_S)
        waiting = submit(client, 3, "still queued")
        children = worker.children()
        assert consuming(redis) == 2
        try:
            worker.terminate()
            wait_until(lambda: consuming(redis) == 0)  # both processes' warm shutdowns began
        finally:
            gate.set()  # the calls the stopping processes wait for are answered
        # No second signal: the supervisor would take it for a cold shutdown.
        assert worker.wait_exit(timeout_s=WAIT_S) == 0
    finally:
        worker.stop()

    for job in in_flight.values():  # finished and stored before the processes exited
        assert job.wait(timeout=0.1).attempts == 1
    assert {job.status() for job in waiting.values()} == {JobStatus.QUEUED}
    assert redis.llen(QUEUE) == 3
    assert redis.hlen("unacked") == 0
    assert len(provider.requests) == 4
    assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    redis.close()


def test_a_killed_process_is_replaced_and_its_jobs_come_back(
    client: Client, redis_server: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    env = {
        "PROMPTQ_VISIBILITY_TIMEOUT_S": str(KILL_VISIBILITY_S),
        "LLM_TIMEOUT": str(KILL_CALL_TIMEOUT_S),
    }
    gate = threading.Event()
    provider.script(*[Reply(gate=gate)] * 4)
    worker = supervised(redis_server, provider, tmp_path, env)
    with worker:
        try:
            jobs = submit(client, 4, "killed")
            provider.wait_for_requests(4, timeout_s=WAIT_S)
            lost = [job for job in jobs.values() if job.id in held_by(redis_server, worker)[1]]
            doomed = by_index(worker)[1]
            os.kill(doomed, signal.SIGKILL)
            wait_until(lambda: doomed not in worker.children())  # reaped by the supervisor
        finally:
            gate.set()
        worker.wait_ready(timeout_s=WAIT_S, count=3)  # the replacement consumes too
        for job in jobs.values():
            assert job.wait(timeout=KILL_VISIBILITY_S + WAIT_S).attempts == 1

    assert len(lost) == 2
    calls = provider.calls_by_prompt()
    for prompt, job in jobs.items():
        assert calls[prompt] == (2 if job in lost else 1)


def two_free_ports() -> int:
    """A port p such that p and p + 1 are both free now."""
    for _ in range(50):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return int(port)
    raise AssertionError("no two consecutive free ports")


def test_each_process_serves_metrics_on_its_own_port(
    client: Client, redis_server: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    port = two_free_ports()
    env = {"PROMPTQ_METRICS_PORT": str(port)}
    with supervised(redis_server, provider, tmp_path, env) as worker:
        pages = []
        for each in (port, port + 1):
            assert f"metrics at http://127.0.0.1:{each}/metrics" in worker.log()
            with urllib.request.urlopen(f"http://127.0.0.1:{each}/metrics", timeout=5) as page:
                pages.append(page.read().decode())

    for page in pages:
        assert "promptq_calls_total" in page
        assert "process_resident_memory_bytes" in page
