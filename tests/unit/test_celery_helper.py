"""api_client.celery: typed signatures of promptq's tasks; their results and failures read back."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from api_client import EmbeddingRequest, InvalidRequest, JobFailed, PromptRequest, PromptResult
from api_client._celery_contract import request_from_task
from api_client._constants import EMBED_TASK_NAME, QUEUE, TASK_NAME
from api_client._schemas import EmbeddingResult
from api_client.celery import embedding_signature, job_failed, result_of, signature


@pytest.fixture
def app() -> Any:
    celery_app = Celery(broker="redis://127.0.0.1:1/0", backend="redis://127.0.0.1:1/0")
    celery_app.conf.update(result_serializer="json", result_accept_content=["json"])
    yield celery_app
    celery_app.close()


def test_a_signature_carries_the_request_the_worker_reads(app: Any) -> None:
    sig = signature("hello", temperature=0, priority="batch", tenant="t1", app=app)

    assert sig.task == TASK_NAME
    assert sig.options["queue"] == QUEUE
    assert sig.immutable  # anywhere in a chain, it ignores the step before
    (sent,) = sig.args
    request = request_from_task(TASK_NAME, sent)
    assert isinstance(request, PromptRequest)
    assert request.messages == [{"role": "user", "content": "hello"}]
    assert request.params == {"temperature": 0}
    assert (request.priority.value, request.tenant) == ("batch", "t1")
    embed = embedding_signature(["a", "b"], dimensions=4, app=app)
    assert embed.task == EMBED_TASK_NAME
    embedding = request_from_task(EMBED_TASK_NAME, embed.args[0])
    assert isinstance(embedding, EmbeddingRequest) and embedding.input == ["a", "b"]


def test_a_bad_request_is_refused_before_any_signature_exists() -> None:
    with pytest.raises(InvalidRequest, match="cannot be set per request"):
        signature("hi", api_key="sk-1")
    with pytest.raises(InvalidRequest, match="texts must be a string or a list"):
        embedding_signature(3)  # type: ignore[arg-type]  # the mistake under test


def test_a_result_dict_reads_back_typed() -> None:
    answer = {
        "id": "j",
        "model": "m",
        "content": "hi",
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        "cost_usd": None,
        "attempts": 1,
        "latency_s": 0.1,
        "created": "2024-06-01T00:00:00Z",
    }
    vectors = {**answer, "vectors": [[0.5]]}
    del vectors["content"], vectors["message"], vectors["finish_reason"]

    assert isinstance(result_of(answer), PromptResult)
    assert isinstance(result_of(vectors), EmbeddingResult)


def test_the_exception_celery_rebuilds_reads_as_job_failed(app: Any) -> None:
    error = {"kind": "rate_limited", "message": "429", "status_code": 429, "attempts": 4}
    stored = {"exc_type": "JobFailed", "exc_module": "promptq", "exc_message": [error]}
    rebuilt = app.backend.exception_to_python(stored)  # what AsyncResult.get() raises

    failed = job_failed(rebuilt, "job-1")

    assert isinstance(failed, JobFailed)
    assert (failed.kind, failed.status_code, failed.attempts) == ("rate_limited", 429, 4)
    assert failed.job_id == "job-1" and failed.message == "429"
    assert job_failed(ValueError("other")) is None
