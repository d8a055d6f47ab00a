"""Cancellation and deadlines end to end: a real worker with one thread, the scripted provider."""

from __future__ import annotations

import threading

import pytest
import redis

from api_client import Cancellation, Client, JobFailed, JobStatus
from api_client._constants import CONTROL_KEY
from tests.support.e2e_worker import module_worker
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

WAIT_S = 30.0
RETRY_WAIT_S = 2.0

# One call at a time, so that a job waits in the queue behind a slow one; a 2 s backoff, so
# that a deadline can fall between two retries.
worker = module_worker(
    args=("--concurrency", "1"),
    env={"LLM_RETRY_MIN_WAIT": str(RETRY_WAIT_S), "LLM_RETRY_MAX_WAIT": str(RETRY_WAIT_S)},
)


def control(connection: redis.Redis) -> dict[str, int]:
    """The fleet's counts of jobs ended early, by kind."""
    found: dict[bytes, bytes] = connection.hgetall(CONTROL_KEY)  # type: ignore[assignment]
    return {name.decode(): int(count) for name, count in found.items()}


def failure_of(client: Client, job_id: str) -> JobFailed:
    with pytest.raises(JobFailed) as failed:
        client.job(job_id).wait(timeout=WAIT_S)
    return failed.value


def test_cancel_before_during_and_after_a_call_and_a_deadline_while_queued(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer
) -> None:
    connection = redis_server.client()
    before = control(connection)
    gate = threading.Event()
    provider.script(Reply(gate=gate))
    slow = client.submit("slow")
    try:
        provider.wait_for_requests(1, timeout_s=WAIT_S)  # in flight, holding the one thread
        behind = client.submit("behind")
        expiring = client.submit("expiring", deadline_s=0.2)
        # The workers' deadline sweep ends a job that waits past its deadline, as it waits.
        wait_until(lambda: expiring.status() is JobStatus.FAILED, WAIT_S)

        found = client.cancel([slow.id, behind.id])

        assert (found[slow.id], found[behind.id]) == (Cancellation.RUNNING, Cancellation.CANCELLED)
    finally:
        gate.set()
    result = slow.wait(timeout=WAIT_S)  # its call finished: reported as usual
    assert result.content == "echo: slow"
    assert failure_of(client, behind.id).kind == "cancelled"
    assert failure_of(client, expiring.id).kind == "deadline_exceeded"
    assert client.cancel([slow.id]).finished == {slow.id: JobStatus.SUCCEEDED}
    # One thread, first in first out: once the next job has run, the two queued before it
    # were taken, and dropped without a call.
    assert client.submit("last").wait(timeout=WAIT_S).content == "echo: last"
    assert provider.calls_by_prompt() == {"slow": 1, "last": 1}
    after = control(connection)
    connection.close()
    assert {name: after[name] - before.get(name, 0) for name in after} == {
        "cancelled": 1,
        "deadline_exceeded": 1,
    }


def test_a_deadline_between_two_retries_ends_the_job(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(status=503), Reply(status=503), Reply(status=503))
    # The first retry starts 2 s after the first call, within the deadline; the second would
    # start 2 s after the second call, past it.
    job = client.submit("flaky", deadline_s=RETRY_WAIT_S * 1.5)

    failed = failure_of(client, job.id)

    assert (failed.kind, failed.attempts) == ("deadline_exceeded", 2)
    assert "last error: provider_unavailable 503" in failed.message
    assert provider.calls_by_prompt() == {"flaky": 2}
