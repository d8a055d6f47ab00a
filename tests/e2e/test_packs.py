"""submit_many's packs end to end: many jobs in one message, each with its own attempts,
retries and outcome, through a real worker."""

from __future__ import annotations

import base64
import json

import pytest

from api_client import Client, ClientSettings, JobFailed, PromptResult
from api_client._constants import QUEUE, state_key
from api_client._requests import Submission, build_request
from api_client._task_messages import pack_message
from tests.support.e2e_worker import NUM_RETRIES
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

WAIT_S = 60.0


@pytest.fixture
def packing_client(redis_server: RedisServer, worker: WorkerProcess) -> Client:
    return Client(settings=ClientSettings(redis_url=redis_server.url, pack_size=8))


def _results(client: Client, prompts: list[str]) -> dict[str, PromptResult | JobFailed]:
    jobs = client.submit_many(prompts)
    found: dict[str, PromptResult | JobFailed] = {}
    for prompt, job in zip(prompts, jobs, strict=True):
        try:
            found[prompt] = job.wait(timeout=WAIT_S)
        except JobFailed as exc:
            found[prompt] = exc
    return found


def test_every_job_of_a_pack_gets_its_own_answer(
    packing_client: Client, provider: ScriptedOpenAIServer
) -> None:
    prompts = [f"packed {i}" for i in range(20)]  # packs of 8, 8 and 4

    results = _results(packing_client, prompts)

    for prompt, result in results.items():
        assert isinstance(result, PromptResult)
        assert (result.content, result.attempts) == (f"echo: {prompt}", 1)
    assert provider.calls_by_prompt() == dict.fromkeys(prompts, 1)


def test_a_failing_job_of_a_pack_is_retried_alone(
    packing_client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(503), Reply(429, headers={"Retry-After": "0.1"}))
    prompts = [f"retried {i}" for i in range(8)]

    results = _results(packing_client, prompts)

    attempts = sorted(r.attempts for r in results.values() if isinstance(r, PromptResult))
    assert attempts == [1] * 6 + [2, 2]  # the two that failed once, each retried on its own
    assert sorted(provider.calls_by_prompt().values()) == [1] * 6 + [2, 2]


def test_a_refused_job_fails_alone_and_a_retry_budget_is_per_job(
    packing_client: Client, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(400))
    prompts = [f"refused {i}" for i in range(4)]

    results = _results(packing_client, prompts)

    failed = [r for r in results.values() if isinstance(r, JobFailed)]
    assert [(f.kind, f.attempts) for f in failed] == [("bad_request", 1)]
    assert sum(provider.calls_by_prompt().values()) == 4
    assert NUM_RETRIES > 0  # a bad_request is not retried although retries are allowed


def test_a_pack_entry_for_an_unknown_task_fails_that_job_only(
    redis_server: RedisServer, worker: WorkerProcess, client: Client
) -> None:
    good, odd = (Submission(name, build_request(name, None, None, {})) for name in ("ok", "odd"))
    message = json.loads(pack_message("pack-odd", [good, odd]))
    body = json.loads(base64.b64decode(message["body"]))
    body[0][0][1]["task"] = "promptq.nonsense"
    message["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    redis = redis_server.client()
    for name in ("ok", "odd"):
        redis.set(state_key(name), "queued", px=60_000)
    redis.lpush(QUEUE, json.dumps(message))

    assert client.job("ok").wait(timeout=WAIT_S).content == "echo: ok"
    with pytest.raises(JobFailed) as raised:
        client.job("odd").wait(timeout=WAIT_S)
    assert raised.value.kind == "bad_request"
    assert "promptq.nonsense" in raised.value.message
