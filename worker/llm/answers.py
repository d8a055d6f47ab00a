"""What a provider's answer means in promptq's terms: completions, embeddings, usage, headers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api_client._schemas import Usage
from worker.errors import MalformedResponse


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


@dataclass(frozen=True)
class Embedding:
    """What one successful embeddings call produced, in promptq's terms."""

    model: str
    vectors: list[list[float]]  # one per input text, in input order
    usage: Usage
    cost_usd: float | None
    headers: dict[str, str]


Answer = Completion | Embedding


def completion_of(response: Any, price: Callable[[Usage], float | None]) -> Completion:
    """A chat completion response, priced by ``price``; MalformedResponse without choices."""
    choices = getattr(response, "choices", None)
    if not choices:
        raise MalformedResponse("the provider returned a completion without choices")
    choice = choices[0]
    message = {k: v for k, v in choice.message.model_dump().items() if v is not None}
    usage = _usage_of(getattr(response, "usage", None))
    return Completion(
        model=str(response.model),
        message=message,
        content=choice.message.content,
        finish_reason=choice.finish_reason,
        usage=usage,
        cost_usd=price(usage),
        headers=_headers_of(response),
    )


def _usage_of(usage: Any) -> Usage:
    """LiteLLM's usage in promptq's terms. Prompt tokens read from the provider's cache are
    in prompt_tokens_details.cached_tokens (OpenAI's form, which LiteLLM fills for most
    providers) or cache_read_input_tokens (Anthropic's)."""
    details = getattr(usage, "prompt_tokens_details", None)
    cached = getattr(details, "cached_tokens", None) or getattr(
        usage, "cache_read_input_tokens", None
    )
    return Usage(
        prompt_tokens=_count(getattr(usage, "prompt_tokens", 0)),
        completion_tokens=_count(getattr(usage, "completion_tokens", 0)),
        total_tokens=_count(getattr(usage, "total_tokens", 0)),
        cached_tokens=_count(cached),
    )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _headers_of(response: Any) -> dict[str, str]:
    hidden = getattr(response, "_hidden_params", None) or {}
    headers = hidden.get("additional_headers") if isinstance(hidden, dict) else None
    return {str(k): str(v) for k, v in headers.items()} if isinstance(headers, dict) else {}


def embedding_of(
    response: Any, texts: int, model: str, price: Callable[[Usage], float | None]
) -> Embedding:
    """An embeddings response for ``texts`` texts sent to ``model``, priced by ``price``."""
    usage = _usage_of(getattr(response, "usage", None))
    return Embedding(
        model=str(getattr(response, "model", None) or model),
        vectors=_vectors_of(response, texts),
        usage=usage,
        cost_usd=price(usage),
        headers=_headers_of(response),
    )


def _vectors_of(response: Any, expected: int) -> list[list[float]]:
    """The response's vectors in input order; MalformedResponse unless there is one list of
    numbers per input text."""
    data = getattr(response, "data", None)
    if not isinstance(data, list) or len(data) != expected:
        found = len(data) if isinstance(data, list) else "no"
        raise MalformedResponse(f"the provider returned {found} embeddings for {expected} texts")
    by_index: dict[int, list[float]] = {}
    for position, item in enumerate(data):
        index, vector = _field(item, "index"), _field(item, "embedding")
        index = position if index is None else index
        numbers = isinstance(vector, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in vector
        )
        if not numbers or not vector or not isinstance(index, int) or index in by_index:
            raise MalformedResponse(f"the provider returned a malformed embedding at {position}")
        by_index[index] = [float(x) for x in vector]
    if sorted(by_index) != list(range(expected)):
        raise MalformedResponse("the provider's embedding indexes do not match the texts")
    return [by_index[index] for index in range(expected)]


def _field(item: Any, name: str) -> Any:
    """A field of a response item, which LiteLLM gives as a dict or an object."""
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)
