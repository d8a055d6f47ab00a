"""worker.llm.call: each LLM setting, as it reaches the provider (HTTP to 127.0.0.1) or the result.

LLM_API_VERSION, LLM_DROP_PARAMS, LLM_DISABLE_VISION, LLM_CACHING_PROMPT, the cached tokens
in the usage, and LLM_INPUT_COST_PER_TOKEN / LLM_OUTPUT_COST_PER_TOKEN.
"""

from __future__ import annotations

import json
from typing import Any

import litellm
import pytest
from litellm.exceptions import UnsupportedParamsError

from api_client._schemas import ErrorKind, Priority, PromptRequest, PromptResult, Usage
from tests.support.llm_calls import complete
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from worker.attempt.classify import classify
from worker.errors import ConfigError
from worker.llm import answers
from worker.llm import call as llm
from worker.llm.content import IMAGE_PLACEHOLDER
from worker.settings import LLMSettings, load_settings

TEST_KEY = "sk-canary-llm-call-8d6b4f2a0e"
MARK = {"type": "ephemeral"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
CONVERSATION = PromptRequest(
    messages=[
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {"role": "user", "content": "Second question"},
    ]
)


def _settings(server: ScriptedOpenAIServer, **values: Any) -> LLMSettings:
    defaults = {"model": "openai/test-model", "api_key": TEST_KEY, "base_url": server.base_url}
    return load_settings(llm={"timeout": 5, **defaults, **values}).llm


def _sent_messages(server: ScriptedOpenAIServer) -> Any:
    [request] = server.requests
    return request.body["messages"]


def _reply_with_usage(model: str, **usage: Any) -> Reply:
    return Reply(
        body={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


# --- LLM_API_VERSION ------------------------------------------------------------------------


def test_api_version_is_passed_to_litellm(server: ScriptedOpenAIServer) -> None:
    # Azure's case, over HTTP, is in test_providers; here: any provider gets it.
    settings = _settings(server, api_version="2024-10-21")

    arguments = llm.call_arguments(settings, CONVERSATION, "openai/test-model")

    assert arguments["api_version"] == "2024-10-21"


# --- LLM_DROP_PARAMS ------------------------------------------------------------------------


def _azure(server: ScriptedOpenAIServer, **values: Any) -> LLMSettings:
    return _settings(
        server,
        model="azure/my-gpt-4o",
        base_url=server.base_url.removesuffix("/v1"),
        api_version="2024-10-21",
        **values,
    )


def test_a_parameter_the_provider_does_not_support_is_dropped(
    server: ScriptedOpenAIServer,
) -> None:
    # LiteLLM knows Azure's chat completions take no service_tier.
    request = PromptRequest(messages=CONVERSATION.messages, params={"service_tier": "flex"})

    complete(_azure(server, drop_params=True), request)

    [sent] = server.requests
    assert "service_tier" not in sent.body
    assert sent.body["messages"][-1]["content"] == "Second question"


def test_without_drop_params_it_fails_as_a_bad_request_before_any_request(
    server: ScriptedOpenAIServer,
) -> None:
    request = PromptRequest(messages=CONVERSATION.messages, params={"service_tier": "flex"})

    with pytest.raises(UnsupportedParamsError) as raised:
        complete(_azure(server, drop_params=False), request)

    failure = classify(raised.value, secrets=(TEST_KEY,))
    assert failure.kind is ErrorKind.BAD_REQUEST
    assert failure.retryable is False
    assert "service_tier" in failure.message
    assert server.requests == []


# --- LLM_DISABLE_VISION ---------------------------------------------------------------------

VISION_REQUEST = PromptRequest(
    messages=[
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]},
        {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": [IMAGE]},
    ]
)


def test_disable_vision_sends_no_image(server: ScriptedOpenAIServer) -> None:
    complete(_settings(server, disable_vision=True), VISION_REQUEST)

    assert _sent_messages(server) == [
        {"role": "user", "content": "What is this?"},
        {"role": "assistant", "content": "A chart."},
        {"role": "user", "content": IMAGE_PLACEHOLDER},
    ]


def test_images_are_sent_by_default(server: ScriptedOpenAIServer) -> None:
    complete(_settings(server), VISION_REQUEST)

    assert _sent_messages(server) == VISION_REQUEST.messages


# --- LLM_CACHING_PROMPT ---------------------------------------------------------------------


def test_cache_marks_on_the_system_and_last_user_message_of_a_claude_model(
    server: ScriptedOpenAIServer,
) -> None:
    settings = _settings(
        server,
        model="openrouter/anthropic/claude-sonnet-4",
        base_url=server.base_url.removesuffix("/v1") + "/api/v1",
    )

    complete(settings, CONVERSATION)

    assert _sent_messages(server) == [
        {
            "role": "system",
            "content": [{"type": "text", "text": "You are terse.", "cache_control": MARK}],
        },
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "First answer"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Second question", "cache_control": MARK}],
        },
    ]


def test_caching_prompt_off_sends_no_marks() -> None:
    settings = load_settings(llm={"caching_prompt": False}).llm

    arguments = llm.call_arguments(settings, CONVERSATION, "anthropic/claude-sonnet-4-5")

    assert arguments["messages"] == CONVERSATION.messages


@pytest.mark.parametrize(
    ("model", "marked"),
    [
        ("anthropic/claude-sonnet-4-5", True),
        ("bedrock/anthropic.claude-sonnet-4-20250514-v1:0", True),
        ("vertex_ai/claude-sonnet-4@20250514", True),
        ("openrouter/anthropic/claude-sonnet-4", True),
        # OpenAI, Azure and DeepSeek cache on their own; Gemini's caches are billed resources.
        ("openai/gpt-4o", False),
        ("azure/gpt-4o", False),
        ("deepseek/deepseek-chat", False),
        ("gemini/gemini-2.5-pro", False),
        ("vertex_ai/gemini-2.5-pro", False),
        # Not in LiteLLM's model map: nothing says it supports caching.
        ("openai/test-model", False),
        ("anthropic/claude-no-such-model", False),
    ],
)
def test_which_models_get_cache_marks(model: str, marked: bool) -> None:
    settings = load_settings().llm  # caching_prompt defaults to true

    messages = llm.call_arguments(settings, CONVERSATION, model)["messages"]

    assert (messages != CONVERSATION.messages) is marked


def test_vision_is_stripped_before_cache_marks_are_set() -> None:
    settings = load_settings(llm={"disable_vision": True}).llm
    request = PromptRequest(messages=[{"role": "user", "content": [IMAGE, IMAGE]}])

    arguments = llm.call_arguments(settings, request, "anthropic/claude-sonnet-4-5")

    assert arguments["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": IMAGE_PLACEHOLDER, "cache_control": MARK}],
        }
    ]


# --- the scheduling fields stay in promptq --------------------------------------------------

SCHEDULING_NAMES = {"priority", "tenant", "deadline", "deadline_s", "deadline_at"}
SCHEDULED = PromptRequest(
    messages=CONVERSATION.messages,
    params={"temperature": 0},
    priority=Priority.INTERACTIVE,
    tenant="team-a",
    deadline_at=4_102_444_800.0,
)


def test_priority_tenant_and_deadline_are_not_call_arguments(server: ScriptedOpenAIServer) -> None:
    settings = _settings(server)
    unscheduled = PromptRequest(messages=CONVERSATION.messages, params={"temperature": 0})

    arguments = llm.call_arguments(settings, SCHEDULED, "openai/test-model")

    assert arguments == llm.call_arguments(settings, unscheduled, "openai/test-model")
    assert arguments["temperature"] == 0  # the control: the request's parameters do get there
    assert not SCHEDULING_NAMES & arguments.keys()


def test_priority_tenant_and_deadline_are_not_sent_to_the_provider(
    server: ScriptedOpenAIServer,
) -> None:
    complete(_settings(server), SCHEDULED)

    [sent] = server.requests
    assert sent.body["temperature"] == 0
    assert not SCHEDULING_NAMES & sent.body.keys()
    assert "team-a" not in json.dumps(sent.body)


# --- cached tokens in the usage -------------------------------------------------------------


def test_cached_prompt_tokens_are_reported(server: ScriptedOpenAIServer) -> None:
    server.script(
        _reply_with_usage(
            "test-model",
            prompt_tokens=1200,
            completion_tokens=10,
            total_tokens=1210,
            prompt_tokens_details={"cached_tokens": 1024},
        )
    )

    completion = complete(_settings(server), CONVERSATION)

    assert completion.usage == Usage(
        prompt_tokens=1200, completion_tokens=10, total_tokens=1210, cached_tokens=1024
    )


def test_anthropic_cache_reads_are_reported() -> None:
    usage = litellm.Usage(
        prompt_tokens=2000, completion_tokens=5, total_tokens=2005, cache_read_input_tokens=1500
    )

    assert answers._usage_of(usage).cached_tokens == 1500


def test_no_cache_information_means_zero_cached_tokens(server: ScriptedOpenAIServer) -> None:
    completion = complete(_settings(server), CONVERSATION)

    assert completion.usage.cached_tokens == 0


def test_results_without_cached_tokens_still_parse() -> None:
    # A result stored by an older worker, and an older client reading a newer result.
    old = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert Usage.model_validate(old).cached_tokens == 0
    newer = PromptResult.model_json_schema()["$defs"]["Usage"]["properties"]
    assert set(newer) == {*old, "cached_tokens"}


# --- LLM_INPUT_COST_PER_TOKEN / LLM_OUTPUT_COST_PER_TOKEN -----------------------------------


def _priced_call(server: ScriptedOpenAIServer, model: str, **prices: float) -> float | None:
    server.script(
        _reply_with_usage(
            model.split("/", 1)[1], prompt_tokens=1000, completion_tokens=500, total_tokens=1500
        )
    )
    return complete(_settings(server, model=model, **prices), CONVERSATION).cost_usd


def test_a_model_litellm_does_not_price_has_no_cost(server: ScriptedOpenAIServer) -> None:
    assert _priced_call(server, "openai/test-model") is None


def test_custom_prices_price_a_model_litellm_does_not_know(server: ScriptedOpenAIServer) -> None:
    cost = _priced_call(
        server, "openai/test-model", input_cost_per_token=2e-6, output_cost_per_token=8e-6
    )

    assert cost == pytest.approx(1000 * 2e-6 + 500 * 8e-6)


def test_litellm_prices_a_model_it_knows(server: ScriptedOpenAIServer) -> None:
    price = litellm.model_cost["gpt-4o"]
    expected = 1000 * price["input_cost_per_token"] + 500 * price["output_cost_per_token"]

    assert _priced_call(server, "openai/gpt-4o") == pytest.approx(expected)


def test_custom_prices_win_over_litellms_map(server: ScriptedOpenAIServer) -> None:
    cost = _priced_call(server, "openai/gpt-4o", input_cost_per_token=1e-7, output_cost_per_token=0)

    assert cost == pytest.approx(1000 * 1e-7)


def test_prices_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_INPUT_COST_PER_TOKEN", "0.000003")
    monkeypatch.setenv("LLM_OUTPUT_COST_PER_TOKEN", "1.5e-5")

    settings = load_settings().llm

    assert settings.input_cost_per_token == 3e-6
    assert settings.output_cost_per_token == 1.5e-5


def test_prices_default_to_unset() -> None:
    settings = load_settings().llm

    assert settings.input_cost_per_token is None
    assert settings.output_cost_per_token is None


def test_a_negative_price_is_refused() -> None:
    with pytest.raises(ConfigError, match="LLM_INPUT_COST_PER_TOKEN"):
        load_settings(llm={"input_cost_per_token": -1e-6, "output_cost_per_token": 0})


@pytest.mark.parametrize(
    ("given", "missing"),
    [
        ({"input_cost_per_token": 1e-6}, "LLM_OUTPUT_COST_PER_TOKEN"),
        ({"output_cost_per_token": 1e-6}, "LLM_INPUT_COST_PER_TOKEN"),
    ],
)
def test_one_price_alone_is_refused(given: dict[str, float], missing: str) -> None:
    with pytest.raises(ConfigError, match=f"set {missing} too"):
        load_settings(llm=given)
