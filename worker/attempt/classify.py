"""Whether a failed attempt is retried, and what kind of failure it was: decided here only."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import openai

from api_client._schemas import ErrorKind
from worker.errors import (
    AttemptProblem,
    ContentPolicyViolation,
    ContextWindowExceeded,
    MalformedResponse,
    NotConfigured,
)
from worker.llm.retry_after import retry_after_s as stated_retry_after_s

# Statuses worth another attempt: rate limits, timeouts, conflicts and server-side trouble
# (529 is Anthropic's "overloaded").
TRANSIENT_STATUSES = {
    408: ErrorKind.TIMEOUT,
    409: ErrorKind.PROVIDER_UNAVAILABLE,
    429: ErrorKind.RATE_LIMITED,
    500: ErrorKind.PROVIDER_UNAVAILABLE,
    502: ErrorKind.PROVIDER_UNAVAILABLE,
    503: ErrorKind.PROVIDER_UNAVAILABLE,
    504: ErrorKind.TIMEOUT,
    529: ErrorKind.PROVIDER_UNAVAILABLE,
}
PERMANENT_STATUSES = {
    400: ErrorKind.BAD_REQUEST,
    401: ErrorKind.AUTHENTICATION,
    402: ErrorKind.BAD_REQUEST,
    403: ErrorKind.PERMISSION_DENIED,
    404: ErrorKind.NOT_FOUND,
    413: ErrorKind.BAD_REQUEST,
    422: ErrorKind.BAD_REQUEST,
}

MAX_MESSAGE_CHARS = 2000
_KEY_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-]{6,}|AIza[0-9A-Za-z_\-]{20,}|gsk_[A-Za-z0-9]{10,})")


# Checked in order; the first match decides.
_CLASS_RULES: tuple[tuple[type[BaseException], ErrorKind, bool], ...] = (
    (NotConfigured, ErrorKind.CONFIGURATION, False),
    (MalformedResponse, ErrorKind.MALFORMED_RESPONSE, True),
    (ContextWindowExceeded, ErrorKind.CONTEXT_WINDOW_EXCEEDED, False),
    (ContentPolicyViolation, ErrorKind.CONTENT_POLICY, False),
    # LiteLLM raises Timeout (an APITimeoutError) for client timeouts and for HTTP 504.
    (openai.APITimeoutError, ErrorKind.TIMEOUT, True),
    (openai.APIConnectionError, ErrorKind.PROVIDER_UNAVAILABLE, True),
    (openai.APIResponseValidationError, ErrorKind.MALFORMED_RESPONSE, True),
)

# LiteLLM reports different failures as one InternalServerError(500) (connection refused,
# unparseable bodies) or a plain BadRequestError(400) (OpenAI's content-policy wording):
# their messages tell them apart.
_MESSAGE_RULES: tuple[tuple[re.Pattern[str], ErrorKind, bool], ...] = (
    # A model name without a provider LiteLLM can infer: fix LLM_MODEL or the request's model.
    (re.compile(r"LLM Provider NOT provided"), ErrorKind.CONFIGURATION, False),
    (re.compile(r"Connection error", re.I), ErrorKind.PROVIDER_UNAVAILABLE, True),
    (
        re.compile(
            r"Expecting value|Unterminated string|Invalid control character|Extra data"
            r"|Empty or invalid response|no 'choices'|JSONDecodeError"
        ),
        ErrorKind.MALFORMED_RESPONSE,
        True,
    ),
    (
        re.compile(r"safety system|content[ _]?policy|content management policy", re.I),
        ErrorKind.CONTENT_POLICY,
        False,
    ),
    (
        re.compile(r"maximum context length|context_length_exceeded|context window", re.I),
        ErrorKind.CONTEXT_WINDOW_EXCEEDED,
        False,
    ),
)


@dataclass(frozen=True)
class Failure:
    """One failed attempt, classified."""

    kind: ErrorKind
    message: str
    retryable: bool = False
    status_code: int | None = None
    retry_after_s: float | None = None

    def summary(self) -> str:
        status = f" {self.status_code}" if self.status_code else ""
        return f"{self.kind.value}{status}: {self.message}"


def classify(exc: BaseException, secrets: Iterable[str] = ()) -> Failure:
    """Map any exception from an attempt to a Failure; messages are scrubbed of secrets."""
    kind, retryable = _kind_of(exc)
    message = _message_of(exc)
    if kind is ErrorKind.INTERNAL:
        message = f"{type(exc).__name__}: {message}"
    return Failure(
        kind=kind,
        message=scrub(message, secrets)[:MAX_MESSAGE_CHARS],
        retryable=retryable,
        status_code=_received_status_of(exc),
        retry_after_s=retry_after_s(exc) if retryable else None,
    )


def _kind_of(exc: BaseException) -> tuple[ErrorKind, bool]:
    for cls, kind, retryable in _CLASS_RULES:
        if isinstance(exc, cls):
            return kind, retryable
    if not isinstance(exc, openai.APIError):
        return ErrorKind.INTERNAL, False  # a bug on our side: retrying would not help
    message = str(exc)
    for pattern, kind, retryable in _MESSAGE_RULES:
        if pattern.search(message):
            return kind, retryable
    status = _status_of(exc)
    if status in TRANSIENT_STATUSES:
        return TRANSIENT_STATUSES[status], True
    if status is None or status >= 500:
        return ErrorKind.PROVIDER_UNAVAILABLE, True
    return PERMANENT_STATUSES.get(status, ErrorKind.BAD_REQUEST), False


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _received_status_of(exc: BaseException) -> int | None:
    """The HTTP status the provider actually sent, if a response arrived.

    LiteLLM invents statuses (500 for connection refused and unparseable bodies, 408 for
    client timeouts); only errors built from a real response carry its headers.
    """
    if isinstance(exc, AttemptProblem) or getattr(exc, "litellm_response_headers", None):
        return _status_of(exc)
    return None


def _message_of(exc: BaseException) -> str:
    return str(getattr(exc, "message", None) or exc) or type(exc).__name__


def retry_after_s(exc: BaseException) -> float | None:
    """How long the provider asked to wait before calling again, if it said (its headers, or
    its error's body: worker.llm.retry_after)."""
    return stated_retry_after_s(response_headers(exc), body=_body_of(exc))


def _body_of(exc: BaseException) -> str:
    """The error's text: LiteLLM's message (which quotes the provider's body) and the
    response's body when it was read."""
    text = _message_of(exc)
    try:
        body = getattr(getattr(exc, "response", None), "text", "")
    except Exception:  # an httpx response not read: no body to add
        body = ""
    return f"{text}\n{body}" if isinstance(body, str) and body else text


def response_headers(exc: BaseException) -> list[Mapping[str, Any]]:
    """The provider's response headers carried by a failure, where LiteLLM keeps them
    (httpx.Headers look up case-insensitively); empty when no response arrived."""
    found: list[Mapping[str, Any]] = []
    for headers in (
        getattr(getattr(exc, "response", None), "headers", None),
        getattr(exc, "litellm_response_headers", None),
    ):
        if isinstance(headers, Mapping):
            found.append(headers)
    return found


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove API keys from text: the configured ones, and anything shaped like a key."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return _KEY_PATTERN.sub("***", text)
