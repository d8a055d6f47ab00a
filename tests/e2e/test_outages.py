"""Redis outages: submit fails fast, waiting clients ride them out, workers wait for Redis.

A real redis-server (persistent: appendonly, as production runs it) is stopped, paused with
SIGSTOP, and restarted on the same port with the same data directory.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from api_client import AsyncClient, BrokerUnavailable, Client, PromptResult
from tests.support.e2e_worker import CANARY_KEY, e2e_worker, module_worker
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.threads import off_main_thread
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess
from worker.batch.run import run_batch

PASSWORD = "pw-never-shown-3c9d"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis"), appendonly=True) as server:
        yield server


# A provider call has to outlast the outage: a longer call timeout (and a visibility timeout
# that fits it) than the other end-to-end workers use.
worker = module_worker(env={"LLM_TIMEOUT": "30", "PROMPTQ_VISIBILITY_TIMEOUT_S": "120"})


@pytest.fixture
def fast_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client timeouts scaled down through the settings the client reads from the environment."""
    monkeypatch.setenv("PROMPTQ_CONNECT_TIMEOUT_S", "0.5")
    monkeypatch.setenv("PROMPTQ_SOCKET_TIMEOUT_S", "0.5")


def _url_with_password(server: RedisServer) -> str:
    return f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"


SUBMITS: dict[str, Callable[[str], object]] = {
    "submit": lambda url: Client(url).submit("hello"),
    "submit_many": lambda url: Client(url).submit_many(["one", {"prompt": "two"}]),
    "async submit": lambda url: off_main_thread(lambda: asyncio.run(_async_submit(url))),
}


async def _async_submit(url: str) -> object:
    async with AsyncClient(url) as client:
        return await client.submit("hello")


def _assert_fails_fast(submit: Callable[[str], object], server: RedisServer) -> float:
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        submit(_url_with_password(server))
    elapsed_s = time.monotonic() - started

    message = str(raised.value)
    assert f"redis://:***@127.0.0.1:{server.port}/0" in message
    assert PASSWORD not in message
    return elapsed_s


# --- 1. Redis down when an agent submits ------------------------------------------------------


@pytest.mark.parametrize("submit", list(SUBMITS.values()), ids=list(SUBMITS))
def test_submit_to_a_stopped_redis_fails_fast(
    tmp_path: Path, fast_timeouts: None, submit: Callable[[str], object]
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    server.stop()  # connection refused from now on

    assert _assert_fails_fast(submit, server) < 5


@pytest.mark.parametrize("submit", list(SUBMITS.values()), ids=list(SUBMITS))
def test_submit_to_an_unresponsive_redis_fails_after_the_socket_timeout(
    tmp_path: Path, fast_timeouts: None, submit: Callable[[str], object]
) -> None:
    with RedisServer(tmp_path) as server:
        server.pause()  # connections are accepted, nothing answers
        try:
            elapsed_s = _assert_fails_fast(submit, server)
        finally:
            server.resume()

        # It waited for the socket timeout (0.5 s), and once: a timeout is not retried.
        assert 0.5 <= elapsed_s < 3
        # Redis is back: the same kind of call goes through.
        with Client(server.url) as client:
            assert client.submit("hello again").id


def test_a_client_works_again_once_redis_is_back(tmp_path: Path, fast_timeouts: None) -> None:
    server = RedisServer(tmp_path, appendonly=True)
    server.start()
    with Client(server.url) as client:
        first = client.submit("before")
        server.stop()
        with pytest.raises(BrokerUnavailable):
            client.submit("during")
        server.start()
        try:
            second = client.submit("after")
            assert first.status() == "queued"
            assert second.status() == "queued"
        finally:
            server.stop()


# --- 2. Waiting clients ride out an outage ----------------------------------------------------


def _wait_sync(client: Client, job_id: str) -> PromptResult:
    result = client.job(job_id).wait(timeout=WAIT_S)
    assert isinstance(result, PromptResult)
    return result


def _as_completed(client: Client, job_id: str) -> PromptResult:
    [done] = client.as_completed([client.job(job_id)], timeout=WAIT_S)
    result = done.result()
    assert isinstance(result, PromptResult)
    return result


def _wait_async(client: Client, job_id: str) -> PromptResult:
    async def wait() -> PromptResult:
        async with AsyncClient(client.settings.redis_url) as async_client:
            result = await async_client.job(job_id).wait(timeout=WAIT_S)
            assert isinstance(result, PromptResult)
            return result

    return off_main_thread(lambda: asyncio.run(wait()))


WAITS: dict[str, Callable[[Client, str], PromptResult]] = {
    "Job.wait": _wait_sync,
    "as_completed": _as_completed,
    "AsyncJob.wait": _wait_async,
}


@pytest.mark.parametrize("wait", list(WAITS.values()), ids=list(WAITS))
def test_waiting_rides_out_a_redis_restart(
    client: Client,
    *,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    wait: Callable[[Client, str], PromptResult],
) -> None:
    gate = threading.Event()
    provider.script(Reply(gate=gate))  # the call stays in flight until the test opens the gate
    job = client.submit("through the outage")
    provider.wait_for_requests(1, timeout_s=WAIT_S)  # the worker is calling the provider

    outcome: dict[str, Any] = {}

    def waiter() -> None:
        try:
            outcome["result"] = wait(client, job.id)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=waiter, daemon=True)
    thread.start()
    try:
        redis_server.stop()
        wait_until(lambda: "Redis unreachable" in caplog.text)
        redis_server.start()
    finally:
        gate.set()  # the provider answers; the worker stores the result in the restarted Redis
    thread.join(WAIT_S)

    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].content == "echo: through the outage"
    assert "Redis is reachable again" in caplog.text
    # The worker lived through the outage (kombu 5.7 alone stops it when Redis goes away with
    # a job in flight): the same process reconnects and takes new work.
    assert client.submit("after the restart").wait(timeout=WAIT_S).content == (
        "echo: after the restart"
    )
    assert worker.running()
    assert CANARY_KEY not in worker.log()


def test_a_fleet_batch_rides_out_a_redis_restart(
    client: Client,
    *,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    gate = threading.Event()
    provider.script(Reply(gate=gate))
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text('{"custom_id": "only", "prompt": "batch through the outage"}\n')
    outcome: dict[str, Any] = {}

    def batch() -> None:
        try:
            outcome["tally"] = run_batch(client, source, output, valid_items=1)
        except BaseException as exc:  # reported by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=batch, daemon=True)
    thread.start()
    try:
        provider.wait_for_requests(1, timeout_s=WAIT_S)
        redis_server.stop()
        wait_until(lambda: "Redis unreachable" in caplog.text)
        redis_server.start()
    finally:
        gate.set()
    thread.join(WAIT_S)

    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert outcome["tally"].succeeded == 1
    [line] = [json.loads(text) for text in output.read_text().splitlines()]
    assert line["custom_id"] == "only" and line["error"] is None


# --- 3. Redis down when a worker starts -------------------------------------------------------


def test_a_worker_started_before_redis_consumes_once_it_is_up(
    tmp_path: Path, provider: ScriptedOpenAIServer
) -> None:
    server = RedisServer(tmp_path / "redis")  # a free port, nothing listening on it yet
    process = e2e_worker(server, provider, tmp_path).start()
    try:
        refused = f"Error 111 connecting to 127.0.0.1:{server.port}"
        wait_until(lambda: refused in process.log())
        with server:
            process.wait_ready(timeout_s=WAIT_S)
            with Client(server.url) as client:
                result = client.submit("late redis").wait(timeout=WAIT_S)
            assert result.content == "echo: late redis"
    finally:
        process.stop()
    assert CANARY_KEY not in process.log()
