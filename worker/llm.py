"""The only module that imports litellm: one provider call per attempt, and its cost."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

# Use the model price map bundled with LiteLLM instead of fetching it from GitHub at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # after the environment above is set
from litellm.exceptions import ContentPolicyViolationError, ContextWindowExceededError

from api_client._schemas import PromptRequest, Usage

from .classify import (
    ContentPolicyViolation,
    ContextWindowExceeded,
    MalformedResponse,
    NotConfigured,
)
from .settings import LLMSettings

# No "Give Feedback / Get Help" banner on stdout for every failed call, and no per-call INFO
# lines (LiteLLM's loggers inherit the worker's INFO level otherwise).
litellm.suppress_debug_info = True
for _name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
    logging.getLogger(_name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class Completion:
    """What one successful call produced, in promptq's terms."""

    model: str
    message: dict[str, Any]
    content: str | None
    finish_reason: str | None
    usage: Usage
    cost_usd: float | None
    headers: dict[str, str]  # the provider's response headers, as LiteLLM passes them on


def model_of(settings: LLMSettings, request: PromptRequest) -> str:
    """The model a request is sent to; NotConfigured when neither it nor the worker names one."""
    model = request.model or settings.model
    if not model:
        raise NotConfigured("no model: set LLM_MODEL on the worker or pass model= to submit()")
    return model


def reply_token_budget(request: PromptRequest) -> int | None:
    """The reply tokens the request caps itself at (max_tokens), which providers reserve."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = request.params.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def prompt_tokens(model: str, request: PromptRequest) -> int:
    """The request's prompt in tokens, by LiteLLM's counter for the model."""
    try:
        return int(litellm.token_counter(model=model, messages=request.messages))
    except Exception:  # an unusual message shape: fall back on ~4 characters a token
        return len(str(request.messages)) // 4


def reply_tokens_of(request: PromptRequest, default: int) -> int:
    """The reply tokens to expect: max_tokens when the request sets it, else ``default``."""
    budget = reply_token_budget(request)
    return default if budget is None else budget


def estimate_tokens(model: str, request: PromptRequest, reply_tokens: int) -> int:
    """What a call will count against a tokens-per-minute limit, before it is made: the
    prompt plus max_tokens, else ``reply_tokens``."""
    return prompt_tokens(model, request) + reply_tokens_of(request, reply_tokens)


def estimate_cost_usd(model: str, request: PromptRequest, reply_tokens: int) -> float:
    """The most a call could cost before it is made, for spending caps: LiteLLM's price for
    the prompt's tokens plus max_tokens (else ``reply_tokens``) of reply. Raises
    NotConfigured when LiteLLM has no price for the model."""
    try:
        prompt_usd, reply_usd = litellm.cost_per_token(
            model=model,
            prompt_tokens=prompt_tokens(model, request),
            completion_tokens=reply_tokens_of(request, reply_tokens),
        )
    except Exception as exc:  # LiteLLM raises for models it has no price for
        raise NotConfigured(
            f"a spending cap applies but the price of {model} is unknown: {type(exc).__name__}"
        ) from None
    return float(prompt_usd) + float(reply_usd)


def charged_tokens(usage: Usage, request: PromptRequest) -> int:
    """What a finished call counted against the provider's token limit: the prompt plus the
    reply, or plus max_tokens when the request set it (providers reserve it up front)."""
    budget = reply_token_budget(request)
    reply = usage.completion_tokens if budget is None else max(budget, usage.completion_tokens)
    return usage.prompt_tokens + reply


def complete(settings: LLMSettings, request: PromptRequest) -> Completion:
    """Make exactly one chat-completion request; raise on any failure (see worker.classify)."""
    model = model_of(settings, request)
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    _check_credentials(model, api_key is not None, settings.base_url)
    try:
        response = litellm.completion(
            model=model,
            messages=request.messages,
            api_key=api_key,
            base_url=settings.base_url,
            api_version=settings.api_version,
            drop_params=settings.drop_params,
            timeout=settings.timeout,
            # Celery owns the retry budget: one HTTP request per attempt.
            max_retries=0,
            num_retries=0,
            **request.params,
        )
    except ContextWindowExceededError as exc:
        raise ContextWindowExceeded(str(exc), status_code=exc.status_code) from exc
    except ContentPolicyViolationError as exc:
        raise ContentPolicyViolation(str(exc), status_code=exc.status_code) from exc
    return _completion_of(response)


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
        raise NotConfigured(f"model {model} needs {missing}: set LLM_API_KEY on the worker")


def _completion_of(response: Any) -> Completion:
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedResponse("the provider returned a completion without choices")
    choice = choices[0]
    message = {k: v for k, v in choice.message.model_dump().items() if v is not None}
    usage = getattr(response, "usage", None)
    return Completion(
        model=str(response.model),
        message=message,
        content=choice.message.content,
        finish_reason=choice.finish_reason,
        usage=Usage(
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            total_tokens=getattr(usage, "total_tokens", 0) or 0,
        ),
        cost_usd=_cost_usd(response),
        headers=_headers_of(response),
    )


def _headers_of(response: Any) -> dict[str, str]:
    hidden = getattr(response, "_hidden_params", None) or {}
    headers = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}


def _cost_usd(response: Any) -> float | None:
    try:
        return float(litellm.completion_cost(completion_response=response))
    except Exception:  # LiteLLM raises for models it has no price for
        return None
