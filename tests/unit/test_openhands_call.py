"""OpenHands' LLM settings at the call: sampling defaults and LLM_MAX_INPUT_TOKENS over HTTP to
127.0.0.1, and custom_llm_provider, ollama_base_url, embedding_base_url and Bedrock's keys as
LiteLLM takes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api_client import JobFailed
from api_client._schemas import EmbeddingRequest, ErrorKind, PromptRequest
from tests.support.llm_calls import complete
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.pipeline import MakePipeline
from worker.attempt.classify import classify
from worker.errors import NotConfigured, PromptTooLong
from worker.llm import call as llm
from worker.settings import LLMSettings, load_settings

FIXTURE = Path(__file__).resolve().parents[1] / "support" / "openhands_config.toml"
AWS_SECRET = "aws-secret-canary-9d2c4b7e1a"
LONG_PROMPT = "word " * 400


def _prompt(text: str, **fields: Any) -> PromptRequest:
    return PromptRequest(messages=[{"role": "user", "content": text}], **fields)


def _openhands(server: ScriptedOpenAIServer, tmp_path: Path, **values: str) -> LLMSettings:
    """The OpenHands template's [llm] with ``values`` in place of its lines, calling
    ``server``."""
    text = FIXTURE.read_text(encoding="utf-8")
    for key, value in values.items():
        start = text.index(f"\n{key} = ")
        end = text.index("\n", start + 1)
        text = f"{text[:start]}\n{key} = {value}{text[end:]}"
    path = tmp_path / "openhands.toml"
    path.write_text(text, encoding="utf-8")
    overrides = {"base_url": server.base_url, "model": "openai/test-model", "timeout": 5}
    return load_settings(path, llm=overrides).llm


def _settings(**values: Any) -> LLMSettings:
    return load_settings(llm={"model": "openai/test-model", "timeout": 5, **values}).llm


# --- sampling defaults ----------------------------------------------------------------------


def test_a_prompt_under_the_template_carries_its_sampling_settings(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    settings = _openhands(
        server, tmp_path, temperature="0.2", top_p="0.9", max_output_tokens="64", drop_params="true"
    )

    complete(settings, _prompt("hello"))

    [sent] = server.requests
    assert sent.body["temperature"] == 0.2
    assert sent.body["top_p"] == 0.9
    assert sent.body["max_tokens"] == 64
    assert sent.body["reasoning_effort"] == "medium"
    assert "safety_settings" not in sent.body  # `safety_settings = []`: unset


def test_every_sampling_default_reaches_the_provider(server: ScriptedOpenAIServer) -> None:
    settings = _settings(
        base_url=server.base_url,
        api_key="sk-test-0123456789",
        temperature=0.3,
        top_p=0.8,
        top_k=40,
        seed=7,
        max_output_tokens=32,
        completion_kwargs={"presence_penalty": 0.5},
    )

    complete(settings, _prompt("hello"))

    [sent] = server.requests
    expected = {"temperature": 0.3, "top_p": 0.8, "top_k": 40, "seed": 7, "max_tokens": 32}
    assert {name: sent.body.get(name) for name in expected} == expected
    assert sent.body["presence_penalty"] == 0.5


def test_a_request_s_own_parameters_win_over_the_defaults(server: ScriptedOpenAIServer) -> None:
    settings = _settings(
        base_url=server.base_url,
        api_key="sk-test-0123456789",
        temperature=0.3,
        max_output_tokens=32,
    )
    request = _prompt("hi", params={"temperature": 1.0, "max_completion_tokens": 9})

    complete(settings, request)

    [sent] = server.requests
    assert sent.body["temperature"] == 1.0
    assert sent.body["max_completion_tokens"] == 9
    assert "max_tokens" not in sent.body  # the request caps its reply itself
    assert request.params == {"temperature": 1.0, "max_completion_tokens": 9}  # unchanged


def test_the_default_max_tokens_is_what_the_limiter_and_caps_count() -> None:
    settings = _settings(max_output_tokens=100)
    request = _prompt("hello")

    assert llm.reply_token_budget(settings, request) == 100
    assert llm.estimate_tokens(settings, "openai/gpt-4o", request, 512) == (
        llm.prompt_tokens("openai/gpt-4o", request) + 100
    )
    assert llm.reply_token_budget(_settings(), request) is None


def test_embeddings_get_no_sampling_defaults() -> None:
    settings = _settings(temperature=0.3, max_output_tokens=32, embedding_model="openai/e")

    arguments = llm.embedding_arguments(settings, EmbeddingRequest(input=["a"]), "openai/e")

    assert "temperature" not in arguments
    assert "max_tokens" not in arguments


# --- LLM_MAX_INPUT_TOKENS -------------------------------------------------------------------


def test_a_prompt_longer_than_max_input_tokens_is_refused_without_a_request(
    server: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    settings = _openhands(server, tmp_path, max_input_tokens="50")

    with pytest.raises(PromptTooLong) as raised:
        complete(settings, _prompt(LONG_PROMPT))

    failure = classify(raised.value)
    assert failure.kind is ErrorKind.CONTEXT_WINDOW_EXCEEDED
    assert failure.retryable is False
    assert "LLM_MAX_INPUT_TOKENS (50)" in failure.message
    assert server.requests == []
    complete(settings, _prompt("short"))  # one that fits is sent
    assert len(server.requests) == 1


def test_the_job_fails_as_context_window_exceeded_with_no_attempt(
    make_pipeline: MakePipeline, server: ScriptedOpenAIServer
) -> None:
    pipeline = make_pipeline(llm={"max_input_tokens": 50})
    long_job = pipeline.client.submit(LONG_PROMPT)
    short_job = pipeline.client.submit("short")

    assert pipeline.drain() == 2

    with pytest.raises(JobFailed) as raised:
        long_job.result()
    assert (raised.value.kind, raised.value.attempts) == ("context_window_exceeded", 0)
    assert short_job.result() is not None
    assert [request.body["messages"][0]["content"] for request in server.requests] == ["short"]


# --- the provider's arguments ---------------------------------------------------------------


def test_custom_llm_provider_sends_a_bare_model_name(server: ScriptedOpenAIServer) -> None:
    settings = _settings(
        model="my-served-model",
        custom_llm_provider="openai",
        base_url=server.base_url,
        api_key="sk-test-0123456789",
    )

    answer = complete(settings, _prompt("hello"))

    assert answer.content == "echo: hello"
    [sent] = server.requests
    assert sent.body["model"] == "my-served-model"


def test_ollama_base_url_is_the_endpoint_of_ollama_models() -> None:
    settings = _settings(base_url="http://proxy:4000/v1", ollama_base_url="http://gpu:11434")
    request = _prompt("hi")

    assert llm.call_arguments(settings, request, "ollama/llama3")["base_url"] == "http://gpu:11434"
    assert llm.call_arguments(settings, request, "ollama_chat/qwen")["base_url"] == (
        "http://gpu:11434"
    )
    assert llm.call_arguments(settings, request, "openai/gpt-4o")["base_url"] == (
        "http://proxy:4000/v1"
    )
    embedding = EmbeddingRequest(input=["a"])
    assert llm.embedding_arguments(settings, embedding, "ollama/nomic-embed-text")["api_base"] == (
        "http://gpu:11434"
    )


def test_embedding_base_url_is_the_endpoint_of_embeddings() -> None:
    settings = _settings(base_url="http://chat:8000/v1", embedding_base_url="http://emb:8001/v1")

    embedding = llm.embedding_arguments(settings, EmbeddingRequest(input=["a"]), "openai/e")
    chat = llm.call_arguments(settings, _prompt("hi"), "openai/gpt-4o")

    assert (embedding["api_base"], chat["base_url"]) == (
        "http://emb:8001/v1",
        "http://chat:8000/v1",
    )


def test_bedrock_gets_the_aws_keys_and_needs_no_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION_NAME", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    model = "bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0"
    request = _prompt("hi", model=model)
    keys = {"aws_access_key_id": "AKIATEST0123", "aws_secret_access_key": AWS_SECRET}
    settings = _settings(aws_region_name="eu-west-1", **keys)

    arguments = llm.call_arguments(settings, request, model)

    assert llm.callable_model(settings, request) == model
    assert {name: arguments[name] for name in keys} == keys
    assert arguments["aws_region_name"] == "eu-west-1"
    with pytest.raises(NotConfigured, match="AWS_ACCESS_KEY_ID"):
        llm.callable_model(_settings(), request)
    assert "aws_secret_access_key" not in llm.call_arguments(_settings(), request, model)
