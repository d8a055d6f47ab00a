"""The only module that imports litellm: one provider call per attempt (a chat completion or
an embeddings call), its arguments, estimates and cost."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from typing import Any

# Use the model price map bundled with LiteLLM instead of fetching it from GitHub at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # after the environment above is set
from litellm.exceptions import ContentPolicyViolationError, ContextWindowExceededError
from litellm.utils import supports_prompt_caching as _litellm_supports_prompt_caching

from api_client._schemas import EmbeddingRequest, JobRequest, PromptRequest, Usage
from worker.errors import (
    ContentPolicyViolation,
    ContextWindowExceeded,
    NotConfigured,
    PromptTooLong,
)
from worker.llm.answers import Answer, completion_of, embedding_of
from worker.llm.content import with_cache_marks, without_images
from worker.settings import LLMSettings

# No "Give Feedback / Get Help" banner on stdout for every failed call, and no per-call INFO
# lines (LiteLLM's loggers inherit the worker's INFO level otherwise).
litellm.suppress_debug_info = True
# Celery owns the retry budget: every call passes max_retries=0, but LiteLLM's OpenAI
# embedding path reads it as `max_retries or litellm.DEFAULT_MAX_RETRIES`, so 0 became two
# hidden retries (three HTTP requests per attempt; tests/unit/test_embeddings.py pins this).
setattr(litellm, "DEFAULT_MAX_RETRIES", 0)  # noqa: B010 (a Final in LiteLLM's stubs)
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
    logging.getLogger(_name).setLevel(logging.WARNING)

# The parameters OpenHands' [llm] settings of the same names give the chat requests that do
# not set them (LLM_MAX_OUTPUT_TOKENS is the default max_tokens: see params_of).
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "seed", "reasoning_effort", "safety_settings")
# What a request caps its reply with: one of them set, no default cap is added.
_REPLY_CAPS = frozenset({"max_tokens", "max_completion_tokens"})
# Providers whose models Ollama serves: their endpoint is LLM_OLLAMA_BASE_URL when set.
_OLLAMA = frozenset({"ollama", "ollama_chat"})


def model_of(settings: LLMSettings, request: JobRequest) -> str:
    """The model a request is sent to; NotConfigured when neither it nor the worker names one.

    An embeddings request without a model goes to the Azure deployment
    LLM_EMBEDDING_DEPLOYMENT_NAME when set, else to LLM_EMBEDDING_MODEL.
    """
    if request.model:
        return request.model
    if isinstance(request, EmbeddingRequest):
        if settings.embedding_deployment_name:
            return f"azure/{settings.embedding_deployment_name}"
        if settings.embedding_model:
            return settings.embedding_model
        raise NotConfigured(
            "no embedding model: set LLM_EMBEDDING_MODEL (or, on Azure, "
            "LLM_EMBEDDING_DEPLOYMENT_NAME) on the worker or pass model= to embed()"
        )
    if not settings.model:
        raise NotConfigured("no model: set LLM_MODEL on the worker or pass model= to submit()")
    return settings.model


def priced_as(settings: LLMSettings, request: JobRequest, model: str) -> str:
    """The model whose prices apply to a call to ``model``: an Azure embedding deployment
    (whose name LiteLLM cannot price) is priced as LLM_EMBEDDING_MODEL on Azure."""
    deployment = isinstance(request, EmbeddingRequest) and model.startswith("azure/")
    if deployment and request.model is None and settings.embedding_model:
        name = settings.embedding_model
        return name if "/" in name else f"azure/{name}"
    return model


def params_of(settings: LLMSettings, request: PromptRequest) -> dict[str, Any]:
    """The parameters a chat call is sent with: the request's own over the worker's defaults
    (LLM_COMPLETION_KWARGS, then the SAMPLING_DEFAULTS, and LLM_MAX_OUTPUT_TOKENS as max_tokens
    unless the request caps its reply itself)."""
    defaults = dict(settings.completion_kwargs or {})
    for name in SAMPLING_DEFAULTS:
        if (value := getattr(settings, name)) is not None:
            defaults[name] = value
    if settings.max_output_tokens is not None:
        defaults["max_tokens"] = settings.max_output_tokens
    if not defaults:
        return request.params
    if _REPLY_CAPS & request.params.keys():  # max_completion_tokens and max_tokens conflict
        defaults = {k: v for k, v in defaults.items() if k not in _REPLY_CAPS}
    return {**defaults, **request.params}


def reply_token_budget(settings: LLMSettings, request: JobRequest) -> int | None:
    """The reply tokens a call caps itself at (max_tokens, the request's or the worker's
    default), which providers reserve."""
    if isinstance(request, EmbeddingRequest):
        return 0  # an embedding has no reply tokens
    params = params_of(settings, request)
    for name in ("max_completion_tokens", "max_tokens"):
        value = params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def prompt_tokens(model: str, request: JobRequest) -> int:
    """The request's prompt (or texts to embed) in tokens, by LiteLLM's counter for the model."""
    if isinstance(request, EmbeddingRequest):
        return sum(_tokens_of_text(model, text) for text in request.input)
    try:
        return int(litellm.token_counter(model=model, messages=request.messages))
    except Exception:  # an unusual message shape: fall back on ~4 characters a token
        return len(str(request.messages)) // 4


def _tokens_of_text(model: str, text: str) -> int:
    try:
        return int(litellm.token_counter(model=model, text=text))
    except Exception:  # no tokenizer for the model: ~4 characters a token
        return len(text) // 4 + 1


def reply_tokens_of(settings: LLMSettings, request: JobRequest, default: int) -> int:
    """The reply tokens to expect: the call's max_tokens when it has one, else ``default``."""
    budget = reply_token_budget(settings, request)
    return default if budget is None else budget


def estimate_tokens(
    settings: LLMSettings, model: str, request: JobRequest, reply_tokens: int
) -> int:
    """What a call will count against a tokens-per-minute limit, before it is made: the
    prompt plus max_tokens, else ``reply_tokens``."""
    return prompt_tokens(model, request) + reply_tokens_of(settings, request, reply_tokens)


def estimate_cost_usd(
    settings: LLMSettings, model: str, request: JobRequest, reply_tokens: int
) -> float:
    """The most a call could cost before it is made, for spending caps: the prompt's tokens
    plus max_tokens (else ``reply_tokens``) of reply, at the custom prices when set, else
    LiteLLM's. Raises NotConfigured when neither prices the model."""
    price_model = priced_as(settings, request, model)
    price = _priced(
        settings,
        price_model,
        prompt_tokens(model, request),
        reply_tokens_of(settings, request, reply_tokens),
    )
    if price is None:
        raise NotConfigured(
            f"a spending cap applies but the price of {price_model} is unknown: set "
            "LLM_INPUT_COST_PER_TOKEN and LLM_OUTPUT_COST_PER_TOKEN"
        )
    return price


def _priced(
    settings: LLMSettings, model: str, prompt_tokens: int, completion_tokens: int
) -> float | None:
    """Tokens at LLM_INPUT_COST_PER_TOKEN / LLM_OUTPUT_COST_PER_TOKEN when set, else at
    LiteLLM's prices for the model, else None."""
    input_cost, output_cost = settings.input_cost_per_token, settings.output_cost_per_token
    if input_cost is not None or output_cost is not None:
        return prompt_tokens * (input_cost or 0.0) + completion_tokens * (output_cost or 0.0)
    try:
        prompt_usd, reply_usd = litellm.cost_per_token(
            model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )
    except Exception:  # LiteLLM raises for models it has no price for
        return None
    return float(prompt_usd) + float(reply_usd)


def charged_tokens(settings: LLMSettings, usage: Usage, request: JobRequest) -> int:
    """What a finished call counted against the provider's token limit: the prompt plus the
    reply, or plus max_tokens when the call had one (providers reserve it up front)."""
    budget = reply_token_budget(settings, request)
    reply = usage.completion_tokens if budget is None else max(budget, usage.completion_tokens)
    return usage.prompt_tokens + reply


def call_arguments(settings: LLMSettings, request: PromptRequest, model: str) -> dict[str, Any]:
    """The keyword arguments of the one litellm.completion call for ``request`` (a pure
    function of its inputs and LiteLLM's model map, so tests can check them without HTTP).

    The parameters (params_of) come last but cannot override the worker's: the request
    schema and LLMSettings refuse those (api_client._schemas.RESERVED_PARAMS).
    """
    messages = request.messages
    if settings.disable_vision:
        messages = without_images(messages)
    if settings.caching_prompt and takes_cache_marks(_qualified(settings, model)):
        messages = with_cache_marks(messages)
    return {
        "model": model,
        "messages": messages,
        "api_key": settings.api_key.get_secret_value() if settings.api_key else None,
        "base_url": endpoint_of(settings, model),
        "api_version": settings.api_version,
        "drop_params": settings.drop_params,
        "timeout": settings.timeout,
        # Celery owns the retry budget: one HTTP request per attempt.
        "max_retries": 0,
        "num_retries": 0,
        **_provider_arguments(settings),
        **params_of(settings, request),
    }


def embedding_arguments(
    settings: LLMSettings, request: EmbeddingRequest, model: str
) -> dict[str, Any]:
    """The keyword arguments of the one litellm.embedding call for ``request`` (pure, like
    call_arguments). The request's parameters (dimensions, user) cannot override these."""
    return {
        "model": model,
        "input": request.input,
        "api_key": settings.api_key.get_secret_value() if settings.api_key else None,
        "api_base": endpoint_of(settings, model, embedding=True),
        "api_version": settings.api_version,
        "drop_params": settings.drop_params,
        "timeout": settings.timeout,
        "max_retries": 0,
        "num_retries": 0,
        **_provider_arguments(settings),
        **request.params,
    }


def endpoint_of(settings: LLMSettings, model: str, *, embedding: bool = False) -> str | None:
    """Where a call to ``model`` goes: for embeddings LLM_EMBEDDING_BASE_URL when set, for a
    model Ollama serves LLM_OLLAMA_BASE_URL when set, else LLM_BASE_URL."""
    if embedding and settings.embedding_base_url:
        return settings.embedding_base_url
    if settings.ollama_base_url and _qualified(settings, model).split("/")[0] in _OLLAMA:
        return settings.ollama_base_url
    return settings.base_url


def _provider_arguments(settings: LLMSettings) -> dict[str, Any]:
    """LiteLLM's arguments for LLM_CUSTOM_LLM_PROVIDER and Bedrock's AWS settings, when set
    (LiteLLM never sends these to a provider as request parameters)."""
    found: dict[str, Any] = {
        "custom_llm_provider": settings.custom_llm_provider,
        "aws_region_name": settings.aws_region_name,
    }
    for name in ("aws_access_key_id", "aws_secret_access_key"):
        secret = getattr(settings, name)
        found[name] = secret.get_secret_value() if secret else None
    return {name: value for name, value in found.items() if value is not None}


def _qualified(settings: LLMSettings, model: str) -> str:
    """``model`` with its provider in front: LLM_CUSTOM_LLM_PROVIDER's, when set and the name
    does not start with it already."""
    provider = settings.custom_llm_provider
    if provider and not model.startswith(f"{provider}/"):
        return f"{provider}/{model}"
    return model


async def acall(settings: LLMSettings, request: JobRequest) -> Answer:
    """Make exactly one provider request for ``request`` (the worker's form, on its event
    loop); raise on any failure (see worker.attempt.classify)."""
    model = callable_model(settings, request)
    if isinstance(request, EmbeddingRequest):
        response = await litellm.aembedding(**embedding_arguments(settings, request, model))
        price_model = priced_as(settings, request, model)

        def price(usage: Usage) -> float | None:
            return _priced(settings, price_model, usage.prompt_tokens, 0)

        return embedding_of(response, len(request.input), model, price)
    _check_prompt_fits(settings, model, request)
    with _mapped_errors():
        response = await litellm.acompletion(**call_arguments(settings, request, model))
    return completion_of(response, partial(_cost_usd, response, settings=settings))


def _check_prompt_fits(settings: LLMSettings, model: str, request: PromptRequest) -> None:
    """PromptTooLong, before any request, for a prompt longer than LLM_MAX_INPUT_TOKENS."""
    if settings.max_input_tokens is None:
        return
    counted = prompt_tokens(model, request)
    if counted > settings.max_input_tokens:
        raise PromptTooLong(
            f"the prompt is {counted} tokens (LiteLLM's count for {model}), more than "
            f"LLM_MAX_INPUT_TOKENS ({settings.max_input_tokens}): no request was sent"
        )


async def warm_up() -> None:
    """Load what LiteLLM loads on its first calls (about 0.1 s of CPU, several times that
    on a busy machine), with mock responses: no request is sent. A fresh worker's first
    calls then take no longer than the rest (under a short LLM_TIMEOUT they timed out)."""
    message = [{"role": "user", "content": "warm-up"}]
    try:
        await litellm.acompletion(model="openai/warm-up", messages=message, mock_response="ok")
        await litellm.aembedding(model="openai/warm-up", input=["warm-up"], mock_response=[0.0])
    except Exception as exc:  # a warm-up must never stop a worker
        logging.getLogger("promptq.worker").debug("LiteLLM warm-up failed: %s", exc)


def callable_model(settings: LLMSettings, request: JobRequest) -> str:
    """The model a request goes to, once it is known the worker can call it (NotConfigured
    otherwise: no model, or no key where the provider needs one)."""
    model = model_of(settings, request)
    aws_keys = settings.aws_access_key_id and settings.aws_secret_access_key
    has_credentials = settings.api_key is not None or bool(aws_keys)
    embedding = isinstance(request, EmbeddingRequest)
    endpoint = endpoint_of(settings, model, embedding=embedding)
    _check_credentials(_qualified(settings, model), has_credentials, endpoint)
    return model


@contextmanager
def _mapped_errors() -> Iterator[None]:
    """LiteLLM's errors that promptq names differently (see worker.attempt.classify)."""
    try:
        yield
    except ContextWindowExceededError as exc:
        raise ContextWindowExceeded(str(exc), status_code=exc.status_code) from exc
    except ContentPolicyViolationError as exc:
        raise ContentPolicyViolation(str(exc), status_code=exc.status_code) from exc


@lru_cache(maxsize=256)
def takes_cache_marks(model: str) -> bool:
    """Whether prompt-cache marks go on ``model``'s messages (LLM_CACHING_PROMPT): Anthropic's
    Claude models, wherever served (Anthropic, Bedrock, Vertex AI, OpenRouter), when
    LiteLLM's model map says the model supports prompt caching.

    Not the other models the map flags: OpenAI, Azure and DeepSeek cache long prompts on
    their own, and Azure is sent the marks as they are, which it need not accept; for
    Gemini, LiteLLM turns marks into cachedContents resources (extra requests, billed
    storage) instead of a per-request breakpoint.
    """
    if "claude" not in model.lower():
        return False
    try:
        return bool(_litellm_supports_prompt_caching(model=model))
    except Exception:  # LiteLLM raises for a model it cannot map to a provider
        return False


@lru_cache(maxsize=256)
def _check_credentials(model: str, has_key: bool, base_url: str | None) -> None:
    """Fail before calling when the provider needs a key the worker does not have.

    Without this LiteLLM reports a missing key as a retryable InternalServerError(500).
    """
    if has_key:
        return
    found = litellm.validate_environment(model=model, api_key=None, api_base=base_url)
    if not found.get("keys_in_environment", True):
        missing = ", ".join(found.get("missing_keys") or ["an API key"])
        raise NotConfigured(
            f"model {model} needs {missing}: set LLM_API_KEY on the worker (or, for "
            "credentials that are not one key, those variables in the worker's environment)"
        )


def _cost_usd(response: Any, usage: Usage, *, settings: LLMSettings) -> float | None:
    """The call's price: from LLM_INPUT_COST_PER_TOKEN / LLM_OUTPUT_COST_PER_TOKEN when set
    (they win over LiteLLM's map; cached prompt tokens count at the input price), else from
    the price map bundled with LiteLLM, else None."""
    if settings.input_cost_per_token is not None or settings.output_cost_per_token is not None:
        return _priced(settings, "", usage.prompt_tokens, usage.completion_tokens)  # no map
    hidden = getattr(response, "_hidden_params", None)
    if isinstance(hidden, dict) and "response_cost" in hidden:  # LiteLLM priced it already
        cost = hidden["response_cost"]
        return float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None
    try:
        return float(litellm.completion_cost(completion_response=response))
    except Exception:  # LiteLLM raises for models it has no price for
        return None
