"""Bad input against real parts: refused at submit with nothing published, or failed by the
worker with a structured error when only the provider side can tell (an unknown model)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from api_client import Client, InvalidRequest, JobFailed
from api_client._constants import QUEUE
from tests.support.e2e_worker import CANARY_KEY
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S
from tests.support.worker_process import WorkerProcess

BAD_SUBMISSIONS: dict[str, tuple[dict[str, Any], str]] = {
    "oversize prompt": ({"prompt": "x" * 2001}, "PROMPTQ_MAX_PROMPT_CHARS"),
    "oversize messages": (
        {"messages": [{"role": "user", "content": "y" * 1000}] * 3},
        "PROMPTQ_MAX_PROMPT_CHARS",
    ),
    "empty prompt": ({"prompt": "   "}, "empty"),
    "empty messages": ({"messages": []}, "messages"),
    "message with empty content": ({"messages": [{"role": "user", "content": ""}]}, "empty"),
    "param not JSON": ({"prompt": "hi", "logit_bias": {1: object()}}, "logit_bias"),
    "NaN param": ({"prompt": "hi", "temperature": math.nan}, "temperature"),
    # Would fail at the worker as a retried provider_unavailable: UTF-8 cannot encode it.
    "lone surrogate": ({"prompt": "half a pair: \ud800"}, "not valid Unicode"),
    "bad idempotency key": ({"prompt": "hi", "idempotency_key": ""}, "idempotency_key"),
}


@pytest.mark.parametrize(
    ("kwargs", "named"), list(BAD_SUBMISSIONS.values()), ids=list(BAD_SUBMISSIONS)
)
def test_bad_input_is_refused_at_submit_and_nothing_is_published(
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    kwargs: dict[str, Any],
    named: str,
) -> None:
    monkeypatch.setenv("PROMPTQ_MAX_PROMPT_CHARS", "2000")
    redis = redis_server.client()
    keys_before = redis.dbsize()

    with Client(redis_server.url) as client, pytest.raises(InvalidRequest) as raised:
        client.submit(**kwargs)

    assert named in str(raised.value)
    assert redis.dbsize() == keys_before
    assert redis.llen(QUEUE) == 0


def test_submit_many_with_one_bad_item_publishes_none(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMPTQ_MAX_PROMPT_CHARS", "2000")
    redis = redis_server.client()
    keys_before = redis.dbsize()

    with Client(redis_server.url) as client, pytest.raises(InvalidRequest) as raised:
        client.submit_many(["fine", "also fine", "z" * 5000, "fine again"])

    assert str(raised.value).startswith("requests[2]: ")
    assert redis.dbsize() == keys_before


def test_an_unknown_provider_fails_as_configuration_without_a_call(
    client: Client, provider: ScriptedOpenAIServer, worker: WorkerProcess
) -> None:
    job = client.submit("hello", model="no-such-provider/some-model")

    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=WAIT_S)

    assert failed.value.kind == "configuration"
    assert "no-such-provider" in failed.value.message
    assert provider.requests == []
    assert CANARY_KEY not in str(failed.value) + worker.log()


def test_a_model_the_provider_does_not_know_fails_as_not_found_after_one_call(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    error = {
        "error": {
            "message": "The model `ghost-model` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    }
    provider.default = Reply(status=404, body=error)

    with pytest.raises(JobFailed) as failed:
        client.submit("hello", model="openai/ghost-model").wait(timeout=WAIT_S)

    assert failed.value.kind == "not_found"
    assert failed.value.status_code == 404
    assert failed.value.attempts == 1
    assert "ghost-model" in failed.value.message
    assert len(provider.requests) == 1
