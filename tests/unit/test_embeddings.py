"""Embeddings: the request schema, the message, the model and price chosen, and the one HTTP
call LiteLLM makes for it (OpenAI and an Azure deployment, against a local server)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import litellm
import pytest
from celery import Celery

from api_client import (
    EmbeddingRequest,
    EmbeddingResult,
    InvalidRequest,
    JobStatus,
    Priority,
    Usage,
)
from api_client._constants import EMBED_TASK_NAME
from api_client._requests import build_embedding_request, check_size
from api_client._schemas import Outcome
from api_client._task_messages import task_message
from tests.support.llm_calls import embed
from tests.support.openai_server import Reply, ScriptedOpenAIServer, echo_vectors, same_vectors
from tests.support.threads import off_main_thread
from worker.attempt.classify import classify
from worker.errors import MalformedResponse, NotConfigured
from worker.fake_provider.replies import estimate_tokens
from worker.llm import answers
from worker.llm import call as llm
from worker.settings import LLMSettings, load_settings

TEST_KEY = "sk-canary-embeddings-5d1e2f"
TEXTS = ["alpha", "beta gamma"]


def _settings(**values: Any) -> LLMSettings:
    return load_settings(llm={"timeout": 5, **values}).llm


# --- the request ------------------------------------------------------------------------------


def test_one_text_becomes_a_list_of_one() -> None:
    assert build_embedding_request("hi", None, {}).input == ["hi"]


@pytest.mark.parametrize(
    ("texts", "params", "problem"),
    [
        ([], {}, "input: List should have at least 1 item"),
        (["ok", " "], {}, "input[1] is empty"),
        ([1, 2], {}, "texts must be a string or a list of strings"),
        (None, {}, "texts must be a string or a list of strings"),
        (["x"] * 2049, {}, "input: List should have at most 2048 items"),
        (["x"], {"encoding_format": "base64"}, "encoding_format must be 'float'"),
        (["x"], {"api_key": "k"}, "cannot be set per request"),
        (["x"], {"dimensions": float("nan")}, "must be a finite number"),
        (["\ud800"], {}, "input[0] is not valid Unicode text"),
    ],
)
def test_bad_input_is_refused_naming_the_problem(
    texts: Any, params: dict[str, Any], problem: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        build_embedding_request(texts, None, params)

    assert problem in raised.value.message


def test_the_size_limit_counts_every_text() -> None:
    request = build_embedding_request(["a" * 60, "b" * 50], None, {})

    check_size(request, 110)
    with pytest.raises(InvalidRequest, match="the texts to embed are 110 characters"):
        check_size(request, 100)


def test_the_message_names_the_embed_task_as_celery_would() -> None:
    request = build_embedding_request(TEXTS, "openai/text-embedding-3-small", {"dimensions": 4})
    ours = json.loads(task_message("job-1", request))
    reference = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False).amqp.as_task_v2(
        "job-1", EMBED_TASK_NAME, args=(request.model_dump(mode="json"),), kwargs={}
    )

    assert ours["headers"]["task"] == reference.headers["task"] == "promptq.embed"
    body = json.loads(base64.b64decode(ours["body"]))
    assert body == json.loads(json.dumps(reference.body))
    assert EmbeddingRequest.model_validate(body[0][0]) == request


def test_an_embedding_outcome_reads_back_as_an_embedding_result() -> None:
    result = EmbeddingResult(
        id="job-1",
        model="m",
        vectors=[[0.5, -0.25]],
        usage=Usage(prompt_tokens=3, total_tokens=3),
        cost_usd=1e-7,
        attempts=1,
        latency_s=0.1,
        created=datetime.now(UTC),
    )

    stored = Outcome(status=JobStatus.SUCCEEDED, result=result).model_dump_json()

    assert Outcome.model_validate_json(stored).result == result


# --- the model, the tokens and the price ------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "model", "expected"),
    [
        (
            {"embedding_model": "openai/text-embedding-3-small"},
            None,
            "openai/text-embedding-3-small",
        ),
        ({"embedding_model": "openai/text-embedding-3-small"}, "cohere/embed", "cohere/embed"),
        (
            {"embedding_model": "text-embedding-3-small", "embedding_deployment_name": "emb"},
            None,
            "azure/emb",
        ),
        (
            {"model": "openai/gpt-4o"},
            "openai/text-embedding-3-large",
            "openai/text-embedding-3-large",
        ),
    ],
)
def test_the_model_an_embedding_goes_to(
    settings: dict[str, Any], model: str | None, expected: str
) -> None:
    request = EmbeddingRequest(input=TEXTS, model=model)

    assert llm.model_of(_settings(**settings), request) == expected


def test_no_embedding_model_is_a_configuration_error_naming_the_settings() -> None:
    request = EmbeddingRequest(input=TEXTS)

    with pytest.raises(NotConfigured) as raised:
        llm.model_of(_settings(model="openai/gpt-4o"), request)  # the chat model is not used

    assert "LLM_EMBEDDING_MODEL" in str(raised.value)
    assert "LLM_EMBEDDING_DEPLOYMENT_NAME" in str(raised.value)
    assert classify(raised.value).kind == "configuration"


def test_an_azure_deployment_is_priced_as_its_embedding_model() -> None:
    settings = _settings(embedding_model="text-embedding-3-small", embedding_deployment_name="emb")
    request = EmbeddingRequest(input=TEXTS)

    assert llm.priced_as(settings, request, "azure/emb") == "azure/text-embedding-3-small"
    estimate = llm.estimate_cost_usd(settings, "azure/emb", request, reply_tokens=512)
    tokens = llm.prompt_tokens("azure/emb", request)
    price, _ = litellm.cost_per_token(model="azure/text-embedding-3-small", prompt_tokens=tokens)
    assert estimate == pytest.approx(price)


def test_embeddings_reserve_no_reply_tokens() -> None:
    request = EmbeddingRequest(input=TEXTS)
    tokens = llm.prompt_tokens("openai/text-embedding-3-small", request)

    assert tokens >= len(TEXTS)
    settings = _settings(max_output_tokens=100)  # a default for chat replies only
    assert llm.estimate_tokens(settings, "openai/text-embedding-3-small", request, 512) == tokens
    usage = Usage(prompt_tokens=7, total_tokens=7)
    assert llm.charged_tokens(settings, usage, request) == 7


def test_the_worker_owns_the_call_arguments() -> None:
    settings = _settings(api_key=TEST_KEY, base_url="http://127.0.0.1:1/v1", api_version="v1")
    request = EmbeddingRequest(input=TEXTS, params={"dimensions": 4, "user": "u"})

    arguments = llm.embedding_arguments(settings, request, "openai/e")

    assert arguments == {
        "model": "openai/e",
        "input": TEXTS,
        "api_key": TEST_KEY,
        "api_base": "http://127.0.0.1:1/v1",
        "api_version": "v1",
        "drop_params": True,  # LLM_DROP_PARAMS' default
        "timeout": 5.0,
        "max_retries": 0,
        "num_retries": 0,
        "dimensions": 4,
        "user": "u",
    }


def test_priority_tenant_and_deadline_are_not_call_arguments() -> None:
    settings = _settings(api_key=TEST_KEY)
    scheduled = EmbeddingRequest(
        input=TEXTS,
        params={"dimensions": 4},
        priority=Priority.BATCH,
        tenant="team-a",
        deadline_at=4e9,
    )

    arguments = llm.embedding_arguments(settings, scheduled, "openai/e")

    unscheduled = EmbeddingRequest(input=TEXTS, params={"dimensions": 4})
    assert arguments == llm.embedding_arguments(settings, unscheduled, "openai/e")
    assert arguments["dimensions"] == 4
    assert not {"priority", "tenant", "deadline_at"} & arguments.keys()


# --- over HTTP --------------------------------------------------------------------------------


def test_openai_embedding_over_http(server: ScriptedOpenAIServer) -> None:
    settings = _settings(
        embedding_model="openai/text-embedding-3-small", api_key=TEST_KEY, base_url=server.base_url
    )

    answer = off_main_thread(lambda: embed(settings, EmbeddingRequest(input=TEXTS)))

    [request] = server.requests
    assert request.path == "/v1/embeddings"
    assert request.body["input"] == TEXTS
    assert request.body["model"] == "text-embedding-3-small"
    assert request.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert same_vectors(answer.vectors, echo_vectors(TEXTS))
    assert answer.usage.prompt_tokens == estimate_tokens(TEXTS)
    assert answer.cost_usd == pytest.approx(estimate_tokens(TEXTS) * 2e-8)


def test_azure_embedding_deployment_over_http(server: ScriptedOpenAIServer) -> None:
    settings = _settings(
        embedding_model="text-embedding-3-small",
        embedding_deployment_name="my-embeddings",
        api_key=TEST_KEY,
        base_url=server.base_url.removesuffix("/v1"),  # https://<resource>.openai.azure.com
        api_version="2024-10-21",
    )

    answer = off_main_thread(lambda: embed(settings, EmbeddingRequest(input=TEXTS)))

    [request] = server.requests
    assert request.path == "/openai/deployments/my-embeddings/embeddings"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == TEST_KEY
    assert same_vectors(answer.vectors, echo_vectors(TEXTS))
    price, _ = litellm.cost_per_token(
        model="azure/text-embedding-3-small", prompt_tokens=estimate_tokens(TEXTS)
    )
    assert answer.cost_usd == pytest.approx(price)


@pytest.mark.parametrize("status", [429, 503])
def test_a_failed_embedding_is_one_http_request(server: ScriptedOpenAIServer, status: int) -> None:
    """LiteLLM's OpenAI embedding path once turned max_retries=0 into two hidden retries."""
    server.script(Reply(status))
    settings = _settings(model="openai/e", api_key=TEST_KEY, base_url=server.base_url)

    with pytest.raises(Exception) as raised:
        off_main_thread(lambda: embed(settings, EmbeddingRequest(input=TEXTS, model="openai/e")))

    assert classify(raised.value).status_code == status
    assert len(server.requests) == 1


def _response(data: list[Any]) -> Any:
    return SimpleNamespace(data=data)


def test_vectors_come_back_in_input_order() -> None:
    data = [{"index": 1, "embedding": [2.0]}, SimpleNamespace(index=0, embedding=[1])]

    assert answers._vectors_of(_response(data), 2) == [[1.0], [2.0]]


@pytest.mark.parametrize(
    "data",
    [
        [{"index": 0, "embedding": [1.0]}],  # one vector for two texts
        [{"index": 0, "embedding": [1.0]}, {"index": 0, "embedding": [2.0]}],  # same index
        [{"index": 0, "embedding": [1.0]}, {"index": 5, "embedding": [2.0]}],  # no such text
        [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": "AAAA"}],  # base64
        [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": []}],
        [{"index": 0, "embedding": [1.0]}, {"index": 1, "embedding": [True]}],
    ],
)
def test_a_malformed_embedding_response_is_malformed(data: list[Any]) -> None:
    with pytest.raises(MalformedResponse):
        answers._vectors_of(_response(data), 2)
