"""The safety net with real workers: jobs whose messages were deleted by hand run once, with two
workers reconciling; jobs answered, running or waiting somewhere are never published again."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from api_client import Client, ClientSettings, JobFailed
from api_client._constants import OPEN_JOBS_KEY, RECOVERY_KEY
from tests.support.broker import take_all
from tests.support.e2e_worker import CANARY_KEY, worker_env
from tests.support.invariants import assert_invariants
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import worker_fleet

INTERVAL_S = 0.3


pytestmark = pytest.mark.usefixtures("flushed_redis")


def _moved_on(scores: list[float | None], score: float | None) -> bool:
    if score is not None and score != scores[-1]:
        scores.append(score)
        return True
    return False


def test_lost_messages_run_once_and_nothing_else_runs_twice(
    redis_server: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    env = worker_env(redis_server.url, provider.base_url) | {
        "PROMPTQ_RECONCILE_INTERVAL_S": str(INTERVAL_S),
        "LLM_TIMEOUT": "10",
    }
    broker = redis_server.client()
    settings = ClientSettings(redis_url=redis_server.url, pack_size=4)
    with Client(settings=settings) as client:
        label = uuid.uuid4().hex[:8]
        # Queued while no worker runs, then their messages deleted by hand: two packs and
        # two jobs of their own (idempotency keys publish a job alone).
        lost = dict(
            zip(
                (prompts := [f"lost {n} {label}" for n in range(8)]),
                client.submit_many(prompts),
                strict=True,
            )
        )
        for n in range(2):
            prompt = f"lost alone {n} {label}"
            lost[prompt] = client.submit(prompt, idempotency_key=prompt)
        assert len(take_all(broker)) == 4  # taken, and gone with nobody holding them

        gate = threading.Event()
        with worker_fleet(env, tmp_path, count=2, concurrency=8) as workers:
            try:
                outcomes = assert_invariants(
                    client,
                    lost,
                    redis_server=redis_server,
                    provider=provider,
                    workers=workers,
                    secret=CANARY_KEY,
                    max_calls=1,
                    timeout_s=WAIT_S,
                )
                answered = client.submit(f"answered {label}")
                answered.wait(timeout=WAIT_S)
                # A call that hangs across many passes: its job is held by a worker.
                provider.script(Reply(gate=gate))
                slow_job = client.submit(f"slow {label}")
                wait_until(lambda: provider.calls_by_prompt()[f"slow {label}"] == 1)
                # Two passes found the slow job held: each moves its open score on.
                scores = [broker.zscore(OPEN_JOBS_KEY, slow_job.id)]
                wait_until(lambda: _moved_on(scores, broker.zscore(OPEN_JOBS_KEY, slow_job.id)))
                wait_until(lambda: _moved_on(scores, broker.zscore(OPEN_JOBS_KEY, slow_job.id)))
                gate.set()
                slow_result = slow_job.wait(timeout=WAIT_S)
            finally:
                gate.set()

    calls = provider.calls_by_prompt()
    assert all(not isinstance(o, JobFailed) for o in outcomes.values())
    assert all(calls[prompt] == 1 for prompt in lost)  # once each, with two reconcilers
    assert calls[f"answered {label}"] == 1
    assert calls[f"slow {label}"] == 1
    assert slow_result.attempts == 1
    assert broker.hget(RECOVERY_KEY, "jobs_republished") == str(len(lost)).encode()
    broker.close()
