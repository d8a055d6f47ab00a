"""Spending caps end to end: two workers, one Redis, LiteLLM's prices for a known model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_client import Client, JobFailed, PromptResult
from api_client._constants import SPEND_PREFIX
from tests.support.cli import promptq
from tests.support.e2e_worker import worker_env
from tests.support.metrics import summed, wait_for_total
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess, worker_fleet
from worker.ops.fleet_status import format_status, gather_status

# A model LiteLLM prices ($0.15 / $0.60 per million tokens in and out), served locally.
MODEL = "openai/gpt-4o-mini"
MAX_TOKENS = 1000
# Each reply reports 1 prompt token and MAX_TOKENS completion tokens: it costs about
# $0.0006, never more than the worker's estimate before the call (its prompt counts more).
CALL_USD = (1 * 0.15 + MAX_TOKENS * 0.60) / 1e6
GLOBAL_CAP_USD = 5.5 * CALL_USD  # room for five calls
WAIT_S = 60.0


def reply() -> Reply:
    body = {
        "id": "chatcmpl-spend",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "costly"},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": MAX_TOKENS, "total_tokens": 1001},
    }
    return Reply(body=body)


@pytest.fixture(scope="module")
def workers(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[WorkerProcess]]:
    directory = tmp_path_factory.mktemp("spend")
    env = worker_env(redis_server.url, provider.base_url) | {
        "LLM_MODEL": MODEL,
        "PROMPTQ_MAX_SPEND_USD": repr(GLOBAL_CAP_USD),
        "PROMPTQ_METRICS_PORT": "0",
    }
    with worker_fleet(env, directory, count=2, concurrency=4) as processes:
        yield processes


@pytest.fixture
def client(redis_server: RedisServer, workers: list[WorkerProcess]) -> Iterator[Client]:
    connection = redis_server.client()
    for key in connection.scan_iter(match=f"{SPEND_PREFIX}*"):
        connection.delete(key)
    connection.close()
    with Client(redis_server.url) as client:
        yield client


def outcomes(client: Client, jobs: list[str]) -> tuple[list[PromptResult], list[JobFailed]]:
    done, refused = [], []
    for job_id in jobs:
        try:
            done.append(client.job(job_id).wait(timeout=WAIT_S))
        except JobFailed as exc:
            refused.append(exc)
    return done, refused


def test_the_fleet_stops_calling_at_the_global_cap(
    client: Client, provider: ScriptedOpenAIServer, workers: list[WorkerProcess]
) -> None:
    provider.script(*[reply()] * 12)
    jobs = client.submit_many({"prompt": f"spend {n}", "max_tokens": MAX_TOKENS} for n in range(12))
    done, refused = outcomes(client, [job.id for job in jobs])

    # Each call is estimated at least at its real cost: the cap is never passed.
    spent = sum(result.cost_usd or 0 for result in done)
    assert spent <= GLOBAL_CAP_USD
    assert len(done) == 5
    assert len(refused) == 7
    assert {exc.kind for exc in refused} == {"budget_exceeded"}
    assert all(exc.attempts == 0 for exc in refused)
    assert "PROMPTQ_MAX_SPEND_USD" in refused[0].message
    # Every job past the cap failed without a provider request.
    assert len(provider.requests) == len(done)
    # promptq status shows what was spent, nothing left reserved.
    status = gather_status(client.settings.redis_url, inspect_timeout_s=0.1)
    [total] = status.spend
    assert (total.period, total.calls) == ("total", 5)
    assert total.spent_usd == pytest.approx(spent)
    assert total.reserved_usd == pytest.approx(0, abs=1e-12)
    assert "spend (total)" in format_status(status)
    # The workers' metrics count the refusals and what was spent.
    wait_for_total(workers, "promptq_jobs_failed_total", 7, kind="budget_exceeded")
    wait_for_total(workers, "promptq_jobs_succeeded_total", 5, model=MODEL)
    assert summed(workers, "promptq_budget_refusals_total", model=MODEL) == 7
    assert summed(workers, "promptq_spend_usd_total", model=MODEL) == pytest.approx(spent)


def test_a_budget_caps_its_own_jobs_only(client: Client, provider: ScriptedOpenAIServer) -> None:
    provider.script(*[reply()] * 6)
    budget = client.create_budget(2.5 * CALL_USD)
    capped = [
        client.submit(f"capped {n}", budget=budget, max_tokens=MAX_TOKENS).id for n in range(4)
    ]
    free = [client.submit(f"free {n}", max_tokens=MAX_TOKENS).id for n in range(2)]

    capped_done, capped_refused = outcomes(client, capped)
    free_done, free_refused = outcomes(client, free)

    assert len(capped_done) == 2
    assert [exc.kind for exc in capped_refused] == ["budget_exceeded"] * 2
    assert f"budget {budget!r}" in capped_refused[0].message
    assert (len(free_done), free_refused) == (2, [])
    assert len(provider.requests) == 4


def test_batch_max_spend_caps_the_run(
    client: Client, provider: ScriptedOpenAIServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    provider.script(*[reply()] * 5)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"custom_id": f"c{n}", "prompt": f"batch {n}", "max_tokens": MAX_TOKENS} for n in range(5)
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))

    completed = promptq(
        "batch",
        str(source),
        "-o",
        str(output),
        "--max-spend",
        repr(2.5 * CALL_USD),
        env={"PROMPTQ_REDIS_URL": redis_server.url},
    )

    assert completed.returncode == 1, completed.stderr  # some prompts failed
    answers = [json.loads(line) for line in output.read_text().splitlines()]
    codes = sorted(a["error"]["code"] if a["error"] else "ok" for a in answers)
    assert codes == ["budget_exceeded"] * 3 + ["ok"] * 2
    assert len(provider.requests) == 2
    assert "budget_exceeded: 3" in completed.stderr


def test_batch_refuses_a_negative_max_spend(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "x"}\n')
    completed = promptq("batch", str(source), "-o", str(tmp_path / "o.jsonl"), "--max-spend", "-1")
    assert completed.returncode == 2
    assert "--max-spend" in completed.stderr
