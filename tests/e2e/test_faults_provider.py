"""Provider faults, each ending in the right terminal state, kind and attempt count.

tests/e2e/test_core_loop.py covers a 429 then success, two 503s then success, a 400, 429s
until the retries run out and one hang then success; these are the rest.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_client import Client, ClientSettings, Job, JobFailed
from tests.support.e2e_worker import CANARY_KEY, NUM_RETRIES, e2e_worker
from tests.support.invariants import Outcome, assert_invariants
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess
from worker.ops.fleet_status import gather_status

ATTEMPTS = NUM_RETRIES + 1  # every call a job may make


def run(
    client: Client,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    workers: list[WorkerProcess],
) -> Outcome:
    """Submit one prompt, check the invariants, return its outcome."""
    prompt = f"provider fault {uuid.uuid4().hex[:8]}"
    jobs: dict[str, Job] = {prompt: client.submit(prompt)}
    ended = assert_invariants(
        client,
        jobs,
        redis_server=redis_server,
        provider=provider,
        workers=workers,
        secret=CANARY_KEY,
        max_calls=ATTEMPTS,
        timeout_s=WAIT_S,
    )
    return ended[prompt]


def failure(outcome: Outcome) -> JobFailed:
    assert isinstance(outcome, JobFailed), outcome
    return outcome


# (the replies, one per attempt, then the kind, HTTP status and attempts the job ends with)
FAILING_SEQUENCES: dict[str, tuple[list[Reply], str, int | None]] = {
    "5xx until the retries run out": (
        [Reply(status=s) for s in (500, 502, 503, 529)],
        "provider_unavailable",
        529,
    ),
    "5xx ending in a 504": (
        [Reply(status=s) for s in (503, 500, 502, 504)],
        "timeout",
        504,
    ),
    "a hang on every attempt": ([Reply(delay_s=5)] * ATTEMPTS, "timeout", None),
    "a body that is not JSON": (
        [Reply(body=b"<html>502 Bad Gateway</html>")] * ATTEMPTS,
        "malformed_response",
        None,
    ),
    "a truncated body": (
        [Reply(body=b'{"id": "chatcmpl-1", "object": "chat.completion", "choices": [{"mess')]
        * ATTEMPTS,
        "malformed_response",
        None,
    ),
    "JSON without choices": (
        [Reply(body={"id": "chatcmpl-1", "object": "chat.completion"})] * ATTEMPTS,
        "malformed_response",
        None,
    ),
}


@pytest.mark.parametrize(
    ("replies", "kind", "status_code"),
    list(FAILING_SEQUENCES.values()),
    ids=list(FAILING_SEQUENCES),
)
def test_a_fault_on_every_attempt_fails_with_its_kind(
    client: Client,
    *,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
    replies: list[Reply],
    kind: str,
    status_code: int | None,
) -> None:
    provider.script(*replies)

    outcome = run(client, provider, redis_server, [worker])

    failed = failure(outcome)
    assert (failed.kind, failed.status_code, failed.attempts) == (kind, status_code, ATTEMPTS)
    assert len(provider.requests) == ATTEMPTS + 1  # and the invariants' last job


@pytest.mark.parametrize(
    "replies",
    [
        [Reply(status=500), Reply(status=502), Reply(status=504)],
        [Reply(body=b"not json"), Reply(delay_s=5), Reply(status=503)],
    ],
    ids=["5xx", "malformed, hang, 503"],
)
def test_faults_then_an_answer_on_the_last_attempt(
    client: Client,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
    replies: list[Reply],
) -> None:
    provider.script(*replies)

    outcome = run(client, provider, redis_server, [worker])

    assert not isinstance(outcome, JobFailed), outcome
    assert outcome.attempts == ATTEMPTS


def test_connection_refused_fails_as_provider_unavailable(
    client: Client,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
) -> None:
    provider.stop()  # nothing listens on its port: every call is refused
    try:
        prompt = f"nobody home {uuid.uuid4().hex[:8]}"
        job = client.submit(prompt)
        with pytest.raises(JobFailed) as refused:
            job.wait(timeout=WAIT_S)
    finally:
        provider.start()  # the same port: the worker's LLM_BASE_URL serves again

    assert refused.value.kind == "provider_unavailable"
    assert refused.value.status_code is None  # no response: LiteLLM's invented 500 is not kept
    assert refused.value.attempts == ATTEMPTS
    assert provider.requests == []
    assert_invariants(
        client,
        {prompt: job},
        redis_server=redis_server,
        provider=provider,
        workers=[worker],
        secret=CANARY_KEY,
        max_calls=ATTEMPTS,
        timeout_s=WAIT_S,
    )


# --- A 429 storm ------------------------------------------------------------------------------

STORM_JOBS = 100
STORM_RETRIES = 1
STORM_CONCURRENCY = 16
STORM_REQUESTS = 150  # 429s to this many requests, then the storm is over
RSS_GROWTH_BYTES = 150 * 2**20


def _one_job_per_message(redis_server: RedisServer) -> Client:
    """A client without packs: each job and each of its retries is a message of its own."""
    return Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=1))


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis for one worker alone: the module's worker must not take these jobs."""
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def storm_worker(
    own_redis: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> Iterator[WorkerProcess]:
    env = {
        "LLM_NUM_RETRIES": str(STORM_RETRIES),
        # Waits longer than the worker takes to go through the queue, so that many retries
        # wait at once (in Redis: the worker holds none in memory).
        "LLM_RETRY_MIN_WAIT": "4",
        "LLM_RETRY_MAX_WAIT": "4.5",
        # The storm must reach the provider: no pace learned from its 429s slows it down.
        "PROMPTQ_LIMITER_ADAPTIVE": "false",
    }
    args = ("--concurrency", str(STORM_CONCURRENCY))
    with e2e_worker(own_redis, provider, tmp_path, name="storm", env=env, args=args) as process:
        yield process


def test_a_429_storm_keeps_worker_memory_bounded_and_its_retries_in_redis(
    provider: ScriptedOpenAIServer, own_redis: RedisServer, storm_worker: WorkerProcess
) -> None:
    with _one_job_per_message(own_redis) as client:
        run(client, provider, own_redis, [storm_worker])  # warm: LiteLLM fully loaded
        rss_before = storm_worker.rss_bytes()
        held: list[int] = []  # messages waiting for an ETA in the worker's memory
        parked: list[int] = []  # jobs waiting in Redis: the retries
        holding: list[int] = []  # every job the worker holds
        calm = threading.Event()

        def watch() -> None:  # sample what the worker holds until the storm is over
            while not calm.wait(0.02):
                status = gather_status(own_redis.url, inspect_timeout_s=0.01)
                held.append(status.retries_scheduled)
                parked.append(status.parked)
                holding.append(status.in_flight)

        # The 429s state a generous limit, so the fleet's limiter keeps its pace (a 429 from a
        # provider stating none slows it down, and jobs would wait in Redis, not in memory).
        provider.default = Reply(status=429, headers={"x-ratelimit-limit-requests": "100000"})
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            prompts = [f"storm {i} {uuid.uuid4().hex[:8]}" for i in range(STORM_JOBS)]
            jobs = dict(zip(prompts, client.submit_many(prompts), strict=True))
            provider.wait_for_requests(STORM_REQUESTS, timeout_s=WAIT_S)
            provider.heal()
            ended = assert_invariants(
                client,
                jobs,
                redis_server=own_redis,
                provider=provider,
                workers=[storm_worker],
                secret=CANARY_KEY,
                max_calls=STORM_RETRIES + 1,
                timeout_s=WAIT_S,
            )
        finally:
            calm.set()
            watcher.join(WAIT_S)
        rss_after = storm_worker.rss_bytes()

    failed = [failure(o) for o in ended.values() if isinstance(o, JobFailed)]
    assert failed, "the storm was too short to exhaust any job's retries"
    assert {(f.kind, f.status_code, f.attempts) for f in failed} == {
        ("rate_limited", 429, STORM_RETRIES + 1)
    }
    assert max(parked) > 1, "few retries waited at once: the queue took longer than the waits"
    assert max(held) == 0  # none in the worker's memory
    assert max(holding) <= STORM_CONCURRENCY  # its calls in flight, and nothing more
    assert rss_after - rss_before < RSS_GROWTH_BYTES, (rss_before, rss_after)


def test_retries_waiting_do_not_take_the_workers_threads(
    provider: ScriptedOpenAIServer, own_redis: RedisServer, tmp_path: Path
) -> None:
    """Retries wait parked in Redis: every thread of the worker takes new jobs meanwhile."""
    concurrency, retrying = 4, 2
    env = {
        "LLM_RETRY_MIN_WAIT": "4",  # the retries stay parked while the test looks
        "LLM_RETRY_MAX_WAIT": "4",
        "LLM_TIMEOUT": "4",  # and the calls beside them wait at the gate without timing out
    }
    args = ("--concurrency", str(concurrency))
    gate = threading.Event()
    provider.script(*[Reply(status=503)] * retrying)
    provider.default = Reply(gate=gate)
    with (
        e2e_worker(own_redis, provider, tmp_path, env=env, args=args) as process,
        _one_job_per_message(own_redis) as client,
    ):
        try:
            prompts = [f"parked {i} {uuid.uuid4().hex[:8]}" for i in range(retrying)]
            jobs = dict(zip(prompts, client.submit_many(prompts), strict=True))

            def parked() -> int:
                status = gather_status(own_redis.url, inspect_timeout_s=0.01)
                assert status.retries_scheduled == 0  # none held in the worker's memory
                return status.parked

            wait_until(lambda: parked() == retrying)
            more = [f"beside {i} {uuid.uuid4().hex[:8]}" for i in range(concurrency)]
            jobs |= dict(zip(more, client.submit_many(more), strict=True))
            # Every thread takes a job while the retries wait (4 s): a call each reaches the
            # provider, well before the retries are due.
            provider.wait_for_requests(retrying + concurrency, timeout_s=2.5)
            assert parked() == retrying
        finally:
            gate.set()
        assert_invariants(
            client,
            jobs,
            redis_server=own_redis,
            provider=provider,
            workers=[process],
            secret=CANARY_KEY,
            max_calls=2,
            timeout_s=WAIT_S,
        )
