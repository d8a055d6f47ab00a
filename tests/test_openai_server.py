"""Tests for the scripted OpenAI-compatible test server."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from tests.support.openai_server import Reply, ScriptedOpenAIServer


@pytest.fixture
def server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as srv:
        yield srv


def _post_chat(base_url: str, text: str) -> tuple[int, dict[str, str], bytes]:
    body = {"model": "test-model", "messages": [{"role": "user", "content": text}]}
    request = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer sk-test"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers.items()), err.read()


def test_default_reply_is_a_valid_chat_completion(server: ScriptedOpenAIServer) -> None:
    status, _, raw = _post_chat(server.base_url, "hello there world")

    assert status == 200
    completion = ChatCompletion.model_validate(json.loads(raw))
    assert completion.model == "test-model"
    assert completion.choices[0].message.content == "echo: hello there world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 3
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    (recorded,) = server.requests
    assert recorded.path == "/v1/chat/completions"
    assert recorded.headers["authorization"] == "Bearer sk-test"
    assert recorded.body["model"] == "test-model"


def test_scripted_429_carries_status_and_retry_after(server: ScriptedOpenAIServer) -> None:
    server.script(Reply(status=429, headers={"Retry-After": "1"}))

    status, headers, raw = _post_chat(server.base_url, "hi")

    assert status == 429
    assert headers["Retry-After"] == "1"
    assert "error" in json.loads(raw)


def test_script_is_consumed_in_order_then_default_resumes(server: ScriptedOpenAIServer) -> None:
    server.script(Reply(status=500), Reply(status=200, body={"custom": True}), Reply(status=503))

    results: list[tuple[int, Any]] = []
    for i in range(5):
        status, _, raw = _post_chat(server.base_url, f"n{i}")
        results.append((status, json.loads(raw)))

    assert [status for status, _ in results] == [500, 200, 503, 200, 200]
    assert results[1][1] == {"custom": True}
    assert results[3][1]["choices"][0]["message"]["content"] == "echo: n3"
    assert results[4][1]["choices"][0]["message"]["content"] == "echo: n4"
    assert len(server.requests) == 5


def test_stop_returns_promptly_while_a_request_hangs() -> None:
    srv = ScriptedOpenAIServer(default=Reply(delay_s=30)).start()
    port = int(srv.base_url.rsplit(":", 1)[1].split("/", 1)[0])
    outcome: list[BaseException | int] = []

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", "/v1/chat/completions", body=b"{}")
            outcome.append(conn.getresponse().status)
        except (OSError, http.client.HTTPException) as exc:
            outcome.append(exc)
        finally:
            conn.close()

    client = threading.Thread(target=call, daemon=True)
    client.start()
    try:
        srv.wait_for_requests(1, timeout_s=5)
    finally:
        started = time.monotonic()
        srv.stop()
        elapsed = time.monotonic() - started

    assert elapsed < 5
    client.join(timeout=5)
    assert not client.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], BaseException)  # connection dropped, no reply


def test_wait_for_requests_raises_clear_assertion_on_deadline(
    server: ScriptedOpenAIServer,
) -> None:
    with pytest.raises(AssertionError, match=r"expected >= 1 request\(s\) within 0.05s, got 0"):
        server.wait_for_requests(1, timeout_s=0.05)
