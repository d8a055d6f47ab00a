"""The classification table: real LiteLLM exceptions, from real HTTP, mapped to a Failure.

Each case makes one call through worker.llm.call.acall to a scripted OpenAI-compatible server
on 127.0.0.1 and classifies what it raised, exactly as the task does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from api_client._schemas import ErrorKind, PromptRequest
from tests.support.llm_calls import complete
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.threads import off_main_thread
from worker.attempt.classify import MAX_MESSAGE_CHARS, Failure, classify, scrub
from worker.settings import LLMSettings, load_settings

API_KEY = "sk-canary-4f1e2d3c4b5a69788796a5b4"
TIMEOUT_S = 0.5
REQUEST = PromptRequest(messages=[{"role": "user", "content": "Name three prime numbers."}])

CONTEXT_LENGTH_BODY = {
    "error": {
        "message": (
            "This model's maximum context length is 8192 tokens. However, your messages "
            "resulted in 9000 tokens. Please reduce the length of the messages."
        ),
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
CONTENT_POLICY_BODY = {
    "error": {
        "message": (
            "Your request was rejected as a result of our safety system. Your prompt may "
            "contain text that is not allowed by our safety system."
        ),
        "type": "invalid_request_error",
        "param": None,
        "code": "content_policy_violation",
    }
}

COMPLETION_WITHOUT_CHOICES = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 0,
    "model": "test-model",
}


def _settings(**llm_values: Any) -> LLMSettings:
    return load_settings(llm={"timeout": TIMEOUT_S, **llm_values}).llm


def _server_settings(server: ScriptedOpenAIServer, **extra: Any) -> LLMSettings:
    return _settings(model="openai/test-model", api_key=API_KEY, base_url=server.base_url, **extra)


@dataclass(frozen=True)
class Attempt:
    failure: Failure
    requests: int  # HTTP requests the server recorded during the call


def _attempt(
    server: ScriptedOpenAIServer, settings: LLMSettings, reply: Reply | None = None
) -> Attempt:
    """One call; ``reply`` answers every request it makes (then the echo default returns).

    The reply is set as the server's default rather than scripted, so a call that never
    reaches the server cannot leave a reply behind for the next test.
    """
    previous = server.default
    if reply is not None:
        server.default = reply
    before = len(server.requests)
    try:
        off_main_thread(lambda: complete(settings, REQUEST))
    except Exception as exc:  # the task classifies every exception the same way
        secrets = (settings.api_key.get_secret_value(),) if settings.api_key else ()
        failure = classify(exc, secrets=secrets)
    else:
        pytest.fail("the call succeeded; the scripted reply should have made it fail")
    finally:
        server.default = previous
    return Attempt(failure, len(server.requests) - before)


# What the Failure must say: (kind, retryable, status_code, retry_after_s).
Expected = tuple[ErrorKind, bool, int | None, float | None]

HTTP_CASES: dict[str, tuple[Reply, Expected]] = {
    "429 Retry-After": (
        Reply(429, headers={"Retry-After": "2"}),
        (ErrorKind.RATE_LIMITED, True, 429, 2.0),
    ),
    "429 retry-after-ms": (
        Reply(429, headers={"retry-after-ms": "1500"}),
        (ErrorKind.RATE_LIMITED, True, 429, 1.5),
    ),
    "429 x-ms-retry-after-ms": (
        Reply(429, headers={"x-ms-retry-after-ms": "250"}),
        (ErrorKind.RATE_LIMITED, True, 429, 0.25),
    ),
    "429 reset duration": (
        Reply(
            429,
            headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m3s"},
        ),
        (ErrorKind.RATE_LIMITED, True, 429, 63.0),
    ),
    "429 retry_after in the body": (
        Reply(429, body={"error": {"message": "slow down", "retry_after": 30}}),
        (ErrorKind.RATE_LIMITED, True, 429, 30.0),
    ),
    "429 try again in the message": (
        Reply(429, body={"error": {"message": "Rate limit reached. Please try again in 1.5s."}}),
        (ErrorKind.RATE_LIMITED, True, 429, 1.5),
    ),
    "429 no header": (Reply(429), (ErrorKind.RATE_LIMITED, True, 429, None)),
    "429 Retry-After not a number": (
        Reply(429, headers={"Retry-After": "soon"}),
        (ErrorKind.RATE_LIMITED, True, 429, None),
    ),
    "429 Retry-After negative": (
        Reply(429, headers={"Retry-After": "-3"}),
        (ErrorKind.RATE_LIMITED, True, 429, None),
    ),
    "500": (Reply(500), (ErrorKind.PROVIDER_UNAVAILABLE, True, 500, None)),
    "502": (Reply(502), (ErrorKind.PROVIDER_UNAVAILABLE, True, 502, None)),
    "503": (Reply(503), (ErrorKind.PROVIDER_UNAVAILABLE, True, 503, None)),
    "503 Retry-After": (
        Reply(503, headers={"Retry-After": "7"}),
        (ErrorKind.PROVIDER_UNAVAILABLE, True, 503, 7.0),
    ),
    "529 overloaded": (Reply(529), (ErrorKind.PROVIDER_UNAVAILABLE, True, 529, None)),
    "504": (Reply(504), (ErrorKind.TIMEOUT, True, 504, None)),
    "400": (Reply(400), (ErrorKind.BAD_REQUEST, False, 400, None)),
    "400 context length": (
        Reply(400, body=CONTEXT_LENGTH_BODY),
        (ErrorKind.CONTEXT_WINDOW_EXCEEDED, False, 400, None),
    ),
    "400 content policy": (
        Reply(400, body=CONTENT_POLICY_BODY),
        (ErrorKind.CONTENT_POLICY, False, 400, None),
    ),
    "401": (Reply(401), (ErrorKind.AUTHENTICATION, False, 401, None)),
    "403": (Reply(403), (ErrorKind.PERMISSION_DENIED, False, 403, None)),
    "404": (Reply(404), (ErrorKind.NOT_FOUND, False, 404, None)),
    "422": (Reply(422), (ErrorKind.BAD_REQUEST, False, 422, None)),
}


@pytest.mark.parametrize(("reply", "expected"), list(HTTP_CASES.values()), ids=list(HTTP_CASES))
def test_http_error_statuses(
    server: ScriptedOpenAIServer, reply: Reply, expected: Expected
) -> None:
    attempt = _attempt(server, _server_settings(server), reply)

    failure = attempt.failure
    assert (failure.kind, failure.retryable, failure.status_code, failure.retry_after_s) == (
        expected
    )
    assert attempt.requests == 1  # LiteLLM's own retries are off: one HTTP request a call
    assert API_KEY not in failure.message


MALFORMED_REPLIES = {
    "truncated JSON": Reply(200, body=b'{"id": "chatcmpl-1", "choices": [{"message": {"con'),
    "HTML body": Reply(
        200,
        body=b"<html><body><h1>Bad gateway</h1></body></html>",
        headers={"Content-Type": "text/html"},
    ),
    "JSON without choices": Reply(200, body=COMPLETION_WITHOUT_CHOICES),
    "empty choices": Reply(200, body={**COMPLETION_WITHOUT_CHOICES, "choices": []}),
}


@pytest.mark.parametrize("reply", list(MALFORMED_REPLIES.values()), ids=list(MALFORMED_REPLIES))
def test_malformed_200_replies(server: ScriptedOpenAIServer, reply: Reply) -> None:
    attempt = _attempt(server, _server_settings(server), reply)

    assert attempt.failure.kind is ErrorKind.MALFORMED_RESPONSE
    assert attempt.failure.retryable is True
    assert attempt.failure.retry_after_s is None
    assert attempt.requests == 1


def test_hang_beyond_the_timeout_is_a_retryable_timeout(server: ScriptedOpenAIServer) -> None:
    attempt = _attempt(server, _server_settings(server), Reply(200, delay_s=5))

    assert attempt.failure.kind is ErrorKind.TIMEOUT
    assert attempt.failure.retryable is True
    assert attempt.requests == 1


def test_connection_refused_is_retryable_provider_unavailable(
    server: ScriptedOpenAIServer, closed_port: int
) -> None:
    settings = _settings(
        model="openai/test-model",
        api_key=API_KEY,
        base_url=f"http://127.0.0.1:{closed_port}/v1",
    )

    attempt = _attempt(server, settings)

    assert attempt.failure.kind is ErrorKind.PROVIDER_UNAVAILABLE
    assert attempt.failure.retryable is True
    assert attempt.failure.retry_after_s is None
    assert "Connection error" in attempt.failure.message


# JobFailed.status_code is documented as "the provider's HTTP status when there was one".
# In these cases the provider sent no error status (it was unreachable, said nothing in
# time, or answered 200 with an unusable body): a 500 or 408 here is LiteLLM's invention.
NO_ERROR_STATUS_CASES = {
    "hang": Reply(200, delay_s=5),
    **MALFORMED_REPLIES,
}


@pytest.mark.parametrize(
    "reply", list(NO_ERROR_STATUS_CASES.values()), ids=list(NO_ERROR_STATUS_CASES)
)
def test_no_invented_error_status_when_the_provider_sent_none(
    server: ScriptedOpenAIServer, reply: Reply
) -> None:
    attempt = _attempt(server, _server_settings(server), reply)

    assert attempt.failure.status_code in (None, 200)


def test_no_invented_error_status_when_the_connection_is_refused(
    server: ScriptedOpenAIServer, closed_port: int
) -> None:
    settings = _settings(
        model="openai/test-model",
        api_key=API_KEY,
        base_url=f"http://127.0.0.1:{closed_port}/v1",
    )

    attempt = _attempt(server, settings)

    assert attempt.failure.status_code is None


def test_no_model_configured_is_a_configuration_error(server: ScriptedOpenAIServer) -> None:
    settings = _settings(api_key=API_KEY, base_url=server.base_url)

    attempt = _attempt(server, settings)

    assert attempt.failure.kind is ErrorKind.CONFIGURATION
    assert attempt.failure.retryable is False
    assert attempt.failure.status_code is None
    assert "LLM_MODEL" in attempt.failure.message
    assert attempt.requests == 0


def test_a_model_without_a_known_provider_is_a_configuration_error(
    server: ScriptedOpenAIServer,
) -> None:
    settings = _settings(model="no-such-provider-model", api_key=API_KEY, base_url=server.base_url)

    attempt = _attempt(server, settings)

    assert attempt.failure.kind is ErrorKind.CONFIGURATION
    assert attempt.failure.retryable is False
    assert attempt.requests == 0


def test_missing_api_key_is_a_configuration_error_before_any_request(
    server: ScriptedOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    settings = _settings(model="openai/test-model", base_url=server.base_url)

    attempt = _attempt(server, settings)

    assert attempt.failure.kind is ErrorKind.CONFIGURATION
    assert attempt.failure.retryable is False
    assert "OPENAI_API_KEY" in attempt.failure.message
    assert attempt.requests == 0


def test_request_model_overrides_a_missing_worker_model(server: ScriptedOpenAIServer) -> None:
    # The control for the two cases above: with a model and a key, the call reaches the server.
    settings = _settings(api_key=API_KEY, base_url=server.base_url)
    request = PromptRequest(messages=REQUEST.messages, model="openai/test-model")
    before = len(server.requests)

    completion = off_main_thread(lambda: complete(settings, request))

    assert completion.content == "echo: Name three prime numbers."
    assert len(server.requests) - before == 1


def test_a_key_echoed_in_a_401_body_is_not_in_the_message(server: ScriptedOpenAIServer) -> None:
    body = {
        "error": {
            "message": f"Incorrect API key provided: {API_KEY}. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }

    attempt = _attempt(server, _server_settings(server), Reply(401, body=body))

    assert attempt.failure.kind is ErrorKind.AUTHENTICATION
    assert "Incorrect API key provided" in attempt.failure.message
    assert API_KEY not in attempt.failure.message
    assert API_KEY not in attempt.failure.summary()


def test_a_configured_key_of_any_shape_echoed_in_a_401_body_is_removed(
    server: ScriptedOpenAIServer,
) -> None:
    odd_key = "azure-0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c"
    body = {"error": {"message": f"bad key {odd_key}", "type": "x", "param": None, "code": None}}
    settings = _settings(model="openai/test-model", api_key=odd_key, base_url=server.base_url)

    attempt = _attempt(server, settings, Reply(401, body=body))

    assert attempt.failure.kind is ErrorKind.AUTHENTICATION
    assert "bad key" in attempt.failure.message
    assert odd_key not in attempt.failure.message


# --- exceptions that are not the provider's ------------------------------------------------


NON_PROVIDER_EXCEPTIONS = [
    KeyError("choices"),
    ValueError("boom"),
    TypeError("bad"),
    RuntimeError(),
]


@pytest.mark.parametrize("exc", NON_PROVIDER_EXCEPTIONS, ids=repr)
def test_non_provider_exception_is_internal_and_not_retried(exc: Exception) -> None:
    failure = classify(exc)

    assert failure.kind is ErrorKind.INTERNAL
    assert failure.retryable is False
    assert failure.status_code is None
    assert failure.retry_after_s is None


def test_internal_failure_without_arguments_still_has_a_message() -> None:
    # _message_of falls back to the class name, but only if the exception is falsy, which no
    # exception is: RuntimeError() yields an empty JobError.message.
    assert classify(RuntimeError()).message != ""


def test_internal_failure_message_names_the_exception_type() -> None:
    # ErrorKind.INTERNAL is "a bug in promptq; the message says where". KeyError('choices')
    # becomes the message "'choices'", which says neither what went wrong nor where.
    assert "KeyError" in classify(KeyError("choices")).message


def test_long_messages_are_truncated() -> None:
    failure = classify(RuntimeError("x" * (MAX_MESSAGE_CHARS * 3)))

    assert len(failure.message) <= MAX_MESSAGE_CHARS + 3


def test_a_secret_cut_by_truncation_does_not_leak_its_prefix() -> None:
    secret = "azure-0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c"
    # The secret straddles the truncation point: its first half is kept, its second cut off.
    text = "x" * (MAX_MESSAGE_CHARS - len(secret) // 2) + secret + " trailing"

    failure = classify(RuntimeError(text), secrets=[secret])

    assert secret[: len(secret) // 2] not in failure.message


# --- scrub ----------------------------------------------------------------------------------


def test_scrub_removes_the_configured_secret() -> None:
    secret = "my-very-private-token-1234"
    text = f"auth failed for {secret} (twice: {secret})"

    scrubbed = scrub(text, [secret])

    assert secret not in scrubbed
    assert scrubbed == "auth failed for *** (twice: ***)"


@pytest.mark.parametrize(
    "key",
    [
        "sk-proj-AbCdEf0123456789xyz",
        "sk-ant-api03-abcdefGHIJKL_0123-xyz",
        "sk-0123456789abcdef0123456789abcdef",
        "gsk_abcdefghij0123456789ABCD",
        "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
    ],
)
def test_scrub_removes_key_shaped_strings(key: str) -> None:
    scrubbed = scrub(f"Incorrect API key provided: {key}. Try again.", [])

    assert key not in scrubbed
    assert scrubbed == "Incorrect API key provided: ***. Try again."


def test_scrub_leaves_ordinary_text_alone() -> None:
    text = "scripted error 429: Too Many Requests (task-queue skipped)"

    assert scrub(text, ["", "not-present-secret"]) == text


def test_classify_scrubs_the_message() -> None:
    failure = classify(
        RuntimeError("leaked sk-canary-0123456789 and hunter2-secret"), ["hunter2-secret"]
    )

    assert "sk-canary-0123456789" not in failure.message
    assert "hunter2-secret" not in failure.message
    assert failure.message == "RuntimeError: leaked *** and ***"
