"""A `promptq worker` with PROMPTQ_METRICS_PORT set: a small batch, then its /metrics scraped."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_client import Client, JobFailed, PromptResult
from tests.support.e2e_worker import CANARY_KEY, e2e_worker
from tests.support.metrics import Samples, metrics_url, sample, scrape
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess
from worker.app.embedded import free_port

WAIT_S = 30.0
MODEL = "openai/test-model"
INPUT_COST, OUTPUT_COST = 0.001, 0.002


@pytest.fixture(scope="module")
def metrics_worker(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[WorkerProcess, str]]:
    port = free_port()
    env = {
        "PROMPTQ_METRICS_PORT": str(port),
        "LLM_INPUT_COST_PER_TOKEN": str(INPUT_COST),
        "LLM_OUTPUT_COST_PER_TOKEN": str(OUTPUT_COST),
    }
    directory = tmp_path_factory.mktemp("metrics-worker")
    with e2e_worker(
        redis_server, provider, directory, env=env, args=("--concurrency", "4")
    ) as process:
        yield process, f"http://127.0.0.1:{port}/metrics"


def ended(samples: Samples) -> float:
    """Jobs counted as succeeded or failed."""
    return sample(samples, "promptq_jobs_succeeded_total", model=MODEL) + sum(
        v for (name, _), v in samples.items() if name == "promptq_jobs_failed_total"
    )


def test_a_batch_is_counted_exactly(
    metrics_worker: tuple[WorkerProcess, str],
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    tmp_path: Path,
) -> None:
    worker, url = metrics_worker
    assert metrics_url(worker) == url
    # Whichever jobs get them: one 429 (retried, then answered), one 400 (failed), and 200s.
    provider.script(Reply(status=429), Reply(status=400))

    results: list[PromptResult] = []
    failures: list[JobFailed] = []
    with Client(redis_server.url) as client:
        jobs = client.submit_many([f"prompt number {n}" for n in range(5)])
        for job in jobs:
            try:
                results.append(job.wait(timeout=WAIT_S))
            except JobFailed as exc:
                failures.append(exc)

    assert len(results) == 4
    assert [f.kind for f in failures] == ["bad_request"]
    # The worker counts a job just after storing its outcome: wait for the last counts.
    deadline = time.monotonic() + WAIT_S
    samples = scrape(url)
    while ended(samples) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
        samples = scrape(url)

    def value(name: str, **labels: str) -> float:
        return sample(samples, name, **labels)

    assert value("promptq_calls_total", model=MODEL, outcome="ok") == 4
    assert value("promptq_calls_total", model=MODEL, outcome="rate_limited") == 1
    assert value("promptq_calls_total", model=MODEL, outcome="bad_request") == 1
    assert value("promptq_rate_limited_total", model=MODEL) == 1
    assert value("promptq_retries_total", model=MODEL, kind="rate_limited") == 1
    assert value("promptq_jobs_succeeded_total", model=MODEL) == 4
    assert value("promptq_jobs_failed_total", kind="bad_request") == 1
    assert value("promptq_call_duration_seconds_count", model=MODEL) == 6
    assert value("promptq_call_duration_seconds_bucket", model=MODEL, le="+Inf") == 6
    prompt_tokens = sum(r.usage.prompt_tokens for r in results)
    completion_tokens = sum(r.usage.completion_tokens for r in results)
    assert value("promptq_prompt_tokens_total", model=MODEL) == prompt_tokens
    assert value("promptq_completion_tokens_total", model=MODEL) == completion_tokens
    assert value("promptq_spend_usd_total", model=MODEL) == pytest.approx(
        sum(r.cost_usd or 0 for r in results)
    )
    assert value("promptq_spend_usd_total", model=MODEL) == pytest.approx(
        prompt_tokens * INPUT_COST + completion_tokens * OUTPUT_COST
    )
    assert len(provider.requests) == 6
    text = "\n".join(str(key) for key in samples)
    assert CANARY_KEY not in text
    assert "prompt number" not in text
    assert not any(job.id in text for job in jobs)


def test_port_0_serves_on_a_free_port_logged_at_start_and_released_at_stop(
    redis_server: RedisServer, provider: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    env = {"PROMPTQ_METRICS_PORT": "0"}
    process = e2e_worker(redis_server, provider, tmp_path, env=env).start().wait_ready()
    try:
        url = metrics_url(process)
        assert url.startswith("http://127.0.0.1:")
        assert ("promptq_calls_total", frozenset()) not in scrape(url)  # served, nothing yet
    finally:
        assert process.stop() == 0
    port = int(url.rsplit(":", 1)[1].removesuffix("/metrics"))
    with socket.socket() as sock:  # nothing listens there any more
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the scrape's TIME_WAIT
        sock.bind(("127.0.0.1", port))
