"""The provider guides in the README, checked: what promptq's request to each provider carries.

Each HTTP case points the worker's base URL at a scripted server on 127.0.0.1 and checks the
path, query, auth header and model name LiteLLM sent, as the provider expects them. Vertex AI
needs Google credentials to reach the wire, so its case checks the call's keyword arguments.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import litellm
import pytest
from litellm.exceptions import ModelNotMappedError

from api_client._schemas import PromptRequest
from tests.support.llm_calls import complete
from tests.support.openai_server import RecordedRequest, Reply, ScriptedOpenAIServer
from worker.errors import NotConfigured
from worker.llm import call as llm
from worker.settings import LLMSettings, load_settings

TEST_KEY = "sk-canary-providers-3e5f7a9b1c"
REQUEST = PromptRequest(messages=[{"role": "user", "content": "Name three prime numbers."}])


def _root(server: ScriptedOpenAIServer) -> str:
    return server.base_url.removesuffix("/v1")


def _settings(**values: Any) -> LLMSettings:
    return load_settings(llm={"timeout": 5, **values}).llm


def _one_call(server: ScriptedOpenAIServer, settings: LLMSettings) -> tuple[RecordedRequest, str]:
    completion = complete(settings, REQUEST)
    [request] = server.requests
    assert completion.content is not None
    return request, completion.content


def test_azure_deployment_path_api_version_and_api_key_header(
    server: ScriptedOpenAIServer,
) -> None:
    settings = _settings(
        model="azure/my-gpt-4o",
        api_key=TEST_KEY,
        base_url=_root(server),  # https://<resource>.openai.azure.com in real use
        api_version="2024-10-21",
    )

    request, content = _one_call(server, settings)

    assert request.path == "/openai/deployments/my-gpt-4o/chat/completions"
    assert request.query == {"api-version": "2024-10-21"}
    assert request.headers["api-key"] == TEST_KEY
    assert "authorization" not in request.headers
    assert request.body["model"] == "my-gpt-4o"
    assert content == "echo: Name three prime numbers."


@pytest.mark.parametrize(
    ("model", "prefix", "sent_model"),
    [
        ("openai/gpt-4o", "/v1", "gpt-4o"),
        (
            "openrouter/meta-llama/llama-3.1-405b-instruct",
            "/api/v1",
            "meta-llama/llama-3.1-405b-instruct",
        ),
    ],
    ids=["openai", "openrouter"],
)
def test_openai_and_openrouter_chat_completions_with_a_bearer_key(
    server: ScriptedOpenAIServer, model: str, prefix: str, sent_model: str
) -> None:
    settings = _settings(model=model, api_key=TEST_KEY, base_url=_root(server) + prefix)

    request, _ = _one_call(server, settings)

    assert request.path == f"{prefix}/chat/completions"
    assert request.query == {}
    assert request.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert request.body["model"] == sent_model


def test_groq_chat_completions_with_a_bearer_key(server: ScriptedOpenAIServer) -> None:
    # LiteLLM's Groq adapter reads the service_tier every Groq reply carries.
    server.script(Reply(body=_completion("llama-3.3-70b-versatile", service_tier="on_demand")))
    settings = _settings(
        model="groq/llama-3.3-70b-versatile",
        api_key=TEST_KEY,
        base_url=_root(server) + "/openai/v1",  # Groq's own: https://api.groq.com/openai/v1
    )

    request, content = _one_call(server, settings)

    assert request.path == "/openai/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {TEST_KEY}"
    assert request.body["model"] == "llama-3.3-70b-versatile"
    assert content == "scripted"


def test_gemini_generate_content_with_the_key_in_a_header(server: ScriptedOpenAIServer) -> None:
    settings = _settings(
        model="gemini/gemini-2.5-flash",
        api_key=TEST_KEY,
        # https://generativelanguage.googleapis.com/v1beta is LiteLLM's default
        base_url=_root(server) + "/v1beta",
    )

    request, content = _one_call(server, settings)

    assert request.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request.headers["x-goog-api-key"] == TEST_KEY
    assert request.query == {}  # the key never rides in the URL
    assert request.body["contents"] == [
        {"role": "user", "parts": [{"text": "Name three prime numbers."}]}
    ]
    assert content == "echo: Name three prime numbers."


@pytest.mark.parametrize(
    ("model", "api_key", "sent_model"),
    [
        ("hosted_vllm/meta-llama/Llama-3.1-8B-Instruct", None, "meta-llama/Llama-3.1-8B-Instruct"),
        ("lm_studio/qwen2.5-7b-instruct", None, "qwen2.5-7b-instruct"),
        ("openai/llama3.1", "ollama", "llama3.1"),  # Ollama's OpenAI-compatible /v1
    ],
    ids=["vllm", "lm-studio", "ollama"],
)
def test_local_openai_compatible_servers(
    server: ScriptedOpenAIServer, model: str, api_key: str | None, sent_model: str
) -> None:
    settings = _settings(model=model, api_key=api_key, base_url=server.base_url)

    request, _ = _one_call(server, settings)

    assert request.path == "/v1/chat/completions"
    assert request.body["model"] == sent_model


def test_vertex_ai_call_arguments() -> None:
    # Vertex AI authenticates with Google credentials (GOOGLE_APPLICATION_CREDENTIALS) and
    # reads VERTEXAI_PROJECT / VERTEXAI_LOCATION from the worker's environment: no key, no URL.
    settings = _settings(model="vertex_ai/gemini-2.5-pro")

    arguments = llm.call_arguments(settings, REQUEST, "vertex_ai/gemini-2.5-pro")

    assert arguments == {
        "model": "vertex_ai/gemini-2.5-pro",
        "messages": REQUEST.messages,
        "api_key": None,
        "base_url": None,
        "api_version": None,
        "drop_params": True,
        "timeout": 5,
        "max_retries": 0,
        "num_retries": 0,
    }


def test_vertex_ai_without_its_environment_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("VERTEXAI_PROJECT", "VERTEXAI_LOCATION", "VERTEX_PROJECT", "VERTEX_LOCATION"):
        monkeypatch.delenv(name, raising=False)
    llm._check_credentials.cache_clear()
    settings = _settings(model="vertex_ai/gemini-2.5-pro")

    with pytest.raises(NotConfigured, match="VERTEXAI_PROJECT") as raised:
        complete(settings, REQUEST)

    assert "environment" in raised.value.message


def _completion(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "scripted"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        **extra,
    }


def test_every_model_the_readme_names_resolves_to_a_provider() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    models = re.findall(r"^LLM_MODEL=(\S+)", readme, flags=re.MULTILINE)
    models += re.findall(
        r"`((?:anthropic|openai|fireworks_ai|vertex_ai|deepseek)/[^`\s]+)`", readme
    )
    assert len(models) >= 10

    for model in models:
        if "..." in model:
            continue
        _, provider, _, _ = litellm.get_llm_provider(model)
        assert provider == model.split("/", 1)[0], model


@pytest.mark.parametrize(
    "model",
    [
        "anthropic/claude-sonnet-4-6",
        "anthropic/claude-sonnet-5",
        "openai/gpt-4o",
        "fireworks_ai/accounts/fireworks/models/llama-v3p1-405b-instruct",
        "vertex_ai/meta/llama-3.1-405b-instruct-maas",
        "fireworks_ai/accounts/fireworks/models/deepseek-v2p5",
        "deepseek/deepseek-v3.2",
        "gemini/gemini-3.5-flash",
        "groq/openai/gpt-oss-120b",
    ],
)
def test_the_readmes_recommendations_are_priced_in_litellms_map(model: str) -> None:
    # The README's "Which model (2026-11)" describes LiteLLM's bundled map: when an upgrade
    # changes it, this says the README is out of date.
    info = litellm.get_model_info(model)

    assert (info.get("input_cost_per_token") or 0) > 0


def test_claude_3_5_sonnet_is_no_longer_in_litellms_map() -> None:
    with pytest.raises(ModelNotMappedError, match="claude-3-5-sonnet"):
        litellm.get_model_info("anthropic/claude-3-5-sonnet-20241022")
