"""The fake provider over real HTTP on 127.0.0.1: replies, limits, faults, latency, command."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import re
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from tests.support.clock import FakeClock
from tests.support.threads import off_main_thread
from worker.fake_provider import FakeProvider, FakeProviderConfig, embedding_of, main
from worker.fake_provider.limits import Shape

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


class Conn:
    """One keep-alive HTTP connection to a provider; replies as (status, headers, JSON)."""

    def __init__(self, base_url: str) -> None:
        url = urllib.parse.urlsplit(base_url)
        assert url.hostname is not None
        self._conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)

    def request(
        self, method: str, path: str, body: dict[str, Any] | bytes | None = None
    ) -> tuple[int, dict[str, str], Any]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        self._conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = self._conn.getresponse()
        raw = response.read()
        headers = {name.lower(): value for name, value in response.getheaders()}
        return response.status, headers, json.loads(raw)

    def chat(
        self, text: str = "hello", model: str = "m", **extra: Any
    ) -> tuple[int, dict[str, str], Any]:
        body = {"model": model, "messages": [{"role": "user", "content": text}], **extra}
        return self.request("POST", "/v1/chat/completions", body)

    def close(self) -> None:
        self._conn.close()


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fp:
        yield fp


def connect(fp: FakeProvider) -> Conn:
    return Conn(fp.base_url)


def openai_client(fp: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(base_url=fp.base_url, api_key="sk-fake", max_retries=0, timeout=10)


def test_chat_replies_parse_as_openai_chat_completions(provider: FakeProvider) -> None:
    messages: Any = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": None},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}],
        },
    ]
    with openai_client(provider) as client:
        completion = client.chat.completions.create(model="demo-model", messages=messages)
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "demo-model"
    assert completion.choices[0].message.content == "echo: hello world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    text_chars = len("be brief") + len("first question") + len("hello world")
    assert completion.usage.prompt_tokens == math.ceil(text_chars / 4)
    assert completion.usage.completion_tokens == 3
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 3

    conn = connect(provider)
    status, _, body = conn.chat("plain string")
    conn.close()
    assert status == 200
    assert ChatCompletion.model_validate(body).choices[0].message.content == "echo: plain string"


def test_same_request_same_reply(provider: FakeProvider) -> None:
    conn = connect(provider)
    first, second = conn.chat("same words"), conn.chat("same words")
    conn.close()
    assert first[2]["id"] != second[2]["id"]
    assert first[2]["choices"] == second[2]["choices"]
    assert first[2]["usage"] == second[2]["usage"]


def test_max_tokens_truncates_to_words(provider: FakeProvider) -> None:
    conn = connect(provider)
    _, _, cut = conn.chat("one two three four", max_tokens=3)
    _, _, whole = conn.chat("one two three four", max_tokens=10)
    _, _, newer = conn.chat("one two three four", max_completion_tokens=2)
    conn.close()
    assert cut["choices"][0]["message"]["content"] == "echo: one two"
    assert cut["choices"][0]["finish_reason"] == "length"
    assert cut["usage"]["completion_tokens"] == 3
    assert whole["choices"][0]["message"]["content"] == "echo: one two three four"
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert newer["choices"][0]["message"]["content"] == "echo: one"


def test_embeddings_parse_and_are_deterministic(provider: FakeProvider) -> None:
    conn = connect(provider)
    status, _, body = conn.request(
        "POST", "/v1/embeddings", {"model": "emb", "input": ["alpha", "beta", "alpha"]}
    )
    _, _, single = conn.request("POST", "/embeddings", {"model": "emb", "input": "alpha"})
    _, _, wide = conn.request(
        "POST", "/v1/embeddings", {"model": "emb", "input": "alpha", "dimensions": 16}
    )
    conn.close()
    assert status == 200
    parsed = CreateEmbeddingResponse.model_validate(body)
    vectors = [item.embedding for item in parsed.data]
    assert [item.index for item in parsed.data] == [0, 1, 2]
    assert len(vectors[0]) == 8
    assert vectors[0] == vectors[2] == single["data"][0]["embedding"] == embedding_of("alpha", 8)
    assert vectors[0] != vectors[1]
    assert math.isclose(sum(x * x for x in vectors[1]), 1.0)
    assert len(wide["data"][0]["embedding"]) == 16
    assert parsed.usage.prompt_tokens == parsed.usage.total_tokens > 0

    # The openai SDK asks for base64 unless told otherwise, and decodes it.
    with openai_client(provider) as client:
        decoded = client.embeddings.create(model="emb", input=["alpha", "beta"])
    assert decoded.data[1].embedding == pytest.approx(vectors[1], rel=1e-6)


def test_models_are_listed(provider: FakeProvider) -> None:
    conn = connect(provider)
    conn.chat(model="used-model")
    status, _, short = conn.request("GET", "/models")
    conn.close()
    with openai_client(provider) as client:
        ids = [model.id for model in client.models.list()]
    assert ids == ["fake-model", "used-model"]
    assert status == 200
    assert [m["id"] for m in short["data"]] == ids


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
        ("/v1/chat/completions", {"model": "m"}, "messages"),
        ("/v1/chat/completions", {"model": "m", "messages": "hi"}, "messages"),
        ("/chat/completions", {"model": "m", "messages": [{}], "max_tokens": 0}, "max_tokens"),
        ("/v1/embeddings", {"model": "m", "input": [1, 2]}, "input"),
        ("/v1/embeddings", {"input": "x"}, "model"),
    ],
)
def test_bad_requests_get_400(
    provider: FakeProvider, path: str, body: dict[str, Any] | bytes, param: str | None
) -> None:
    conn = connect(provider)
    status, _, reply = conn.request("POST", path, body)
    conn.close()
    assert status == 400
    assert reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["message"]
    assert reply["error"]["param"] == param


def test_unknown_route_is_404_and_wrong_method_405(provider: FakeProvider) -> None:
    conn = connect(provider)
    assert conn.request("GET", "/v1/nothing")[0] == 404
    assert conn.request("GET", "/v1/chat/completions")[0] == 405
    conn.close()


def test_rpm_admits_exactly_the_limit_then_429_until_retry_after() -> None:
    clock = FakeClock()
    with FakeProvider(FakeProviderConfig(rpm=5, tpm=10_000), clock=clock) as fp:
        conn = connect(fp)
        replies = [conn.chat() for _ in range(8)]
        statuses = [status for status, _, _ in replies]
        assert statuses == [200] * 5 + [429] * 3
        assert [h["x-ratelimit-remaining-requests"] for _, h, _ in replies[:5]] == [
            "4", "3", "2", "1", "0"
        ]  # fmt: skip
        for _, headers, _ in replies:
            assert all(name in headers for name in RATE_HEADERS)
            assert headers["x-ratelimit-limit-requests"] == "5"
        for _, headers, body in replies[5:]:
            retry_after = int(headers["retry-after"])
            assert 0 < retry_after <= 60
            assert retry_after == 12  # one request's worth at 5 per minute
            assert headers["retry-after-ms"] == "12000"
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert body["error"]["message"]
        assert conn.chat(model="other")[0] == 200  # limits are per model

        clock.now += 11.9
        status, headers, _ = conn.chat()
        assert status == 429
        assert headers["retry-after-ms"] == "100"
        clock.now += 0.1
        assert conn.chat()[0] == 200  # the 429s consumed nothing: exactly one is due
        assert conn.chat()[0] == 429
        conn.close()
        assert fp.stats()["rate_limited"] == 5


def test_burst_limits_how_much_of_the_minute_is_spent_at_once() -> None:
    clock = FakeClock()
    with FakeProvider(FakeProviderConfig(rpm=600, burst_s=1), clock=clock) as fp:
        conn = connect(fp)
        statuses = [conn.chat()[0] for _ in range(12)]  # 10 requests a second
        assert statuses == [200] * 10 + [429] * 2
        status, headers, _ = conn.chat()
        conn.close()
    assert (status, headers["x-ratelimit-limit-requests"]) == (429, "600")
    assert headers["retry-after-ms"] == "100"


def test_the_server_enforces_the_configured_shape() -> None:
    clock = FakeClock()
    config = FakeProviderConfig(rpm=1200, shape=Shape("window", 1))  # 20 in each second
    with FakeProvider(config, clock=clock) as fp:
        conn = connect(fp)
        statuses = [conn.chat()[0] for _ in range(21)]
        clock.now += 0.5
        status, headers, _ = conn.chat()
        conn.close()
    assert statuses == [200] * 20 + [429]
    assert (status, headers["retry-after-ms"], headers["retry-after"]) == (429, "500", "1")


def test_a_request_larger_than_the_burst_waits_for_a_full_bucket_and_leaves_a_debt() -> None:
    clock = FakeClock()
    with FakeProvider(FakeProviderConfig(tpm=600, burst_s=1), clock=clock) as fp:
        conn = connect(fp)  # 10 tokens a second, at most 10 at once
        assert conn.chat("x" * 120, max_tokens=10)[0] == 200  # 30 + 10 tokens: 30 owed
        status, headers, _ = conn.chat("x" * 4, max_tokens=1)  # 2 tokens
        conn.close()
    assert status == 429
    assert headers["retry-after-ms"] == "3200"  # the debt of 30 and the 2 tokens, at 10 a second


def test_rpm_admission_resumes_after_retry_after_in_real_time() -> None:
    with FakeProvider(FakeProviderConfig(rpm=600)) as fp:
        conn = connect(fp)
        for _ in range(800):
            started = time.monotonic()
            status, headers, _ = conn.chat()
            if status == 429:
                break
        assert status == 429
        wait_s = int(headers["retry-after-ms"]) / 1000
        assert 0 < wait_s <= 0.1  # one request every 100 ms
        assert headers["retry-after"] == "1"
        deadline = started + 5
        while (status := conn.chat()[0]) == 429 and time.monotonic() < deadline:
            pass
        admitted_after = time.monotonic() - started
        conn.close()
    assert status == 200
    assert admitted_after >= wait_s - 0.001


def test_tpm_limit_counts_prompt_plus_max_tokens() -> None:
    clock = FakeClock()
    with FakeProvider(FakeProviderConfig(tpm=100), clock=clock) as fp:
        conn = connect(fp)
        text = "x" * 40  # 10 prompt tokens; with max_tokens=10 each request costs 20
        replies = [conn.chat(text, max_tokens=10) for _ in range(6)]
        assert [status for status, _, _ in replies] == [200] * 5 + [429]
        assert [h["x-ratelimit-remaining-tokens"] for _, h, _ in replies] == [
            "80", "60", "40", "20", "0", "0"
        ]  # fmt: skip
        assert "x-ratelimit-limit-requests" not in replies[0][1]  # no rpm limit set
        assert replies[5][1]["retry-after"] == "12"  # 20 tokens at 100 per minute

        clock.now += 6  # half the cost refilled: a 10-token request fits, a 20-token one not
        assert conn.chat(text, max_tokens=10)[0] == 429
        status, headers, _ = conn.request(
            "POST", "/v1/embeddings", {"model": "m", "input": "y" * 40}
        )
        assert (status, headers["x-ratelimit-remaining-tokens"]) == (200, "0")

        status, headers, body = conn.chat(text, max_tokens=200)  # more than the whole budget
        conn.close()
    assert status == 429
    assert "retry-after" not in headers
    assert body["error"]["message"].startswith("Request too large")


def test_error_rate_one_gives_only_server_errors() -> None:
    with FakeProvider(FakeProviderConfig(error_rate=1.0)) as fp:
        conn = connect(fp)
        statuses = [conn.chat()[0] for _ in range(30)]
        _, _, body = conn.chat()
        conn.close()
        assert set(statuses) <= {500, 502, 503}
        assert len(set(statuses)) > 1
        assert body["error"]["type"] == "server_error"
        assert fp.stats()["errors"] == 31


def test_error_sequence_follows_the_seed() -> None:
    def statuses(seed: int) -> list[int]:
        with FakeProvider(FakeProviderConfig(error_rate=0.5, seed=seed)) as fp:
            conn = connect(fp)
            result = [conn.chat()[0] for _ in range(40)]
            conn.close()
        return result

    first = statuses(7)
    assert first == statuses(7)
    assert first != statuses(8)
    assert 200 in first
    assert set(first) - {200}


def test_latency_delays_replies_without_blocking_others() -> None:
    async def fire(url: str, n: int) -> list[float]:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

        async def one(session: aiohttp.ClientSession) -> float:
            started = time.monotonic()
            async with session.post(url, json=body) as response:
                assert response.status == 200
                await response.read()
            return time.monotonic() - started

        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session) for _ in range(n)))

    config = FakeProviderConfig(latency_s=0.2, jitter_s=0.05)
    with FakeProvider(config) as fp:
        started = time.monotonic()
        url = f"{fp.base_url}/chat/completions"
        durations = off_main_thread(lambda: asyncio.run(fire(url, 50)))
        total = time.monotonic() - started
    assert min(durations) >= 0.15
    assert total < 2.0  # 50 requests one after the other would take 10 s


def test_stats_count_every_request_by_path(provider: FakeProvider) -> None:
    conn = connect(provider)
    conn.chat()
    conn.request("POST", "/chat/completions", {"model": "m", "messages": [{"content": "x"}]})
    conn.request("POST", "/v1/embeddings", {"model": "m", "input": "x"})
    conn.request("POST", "/v1/chat/completions", b"nope")
    conn.request("GET", "/v1/models")
    conn.request("GET", "/elsewhere")
    status, _, stats = conn.request("GET", "/stats")
    conn.close()
    assert status == 200
    assert stats == {
        "requests": 6,
        "ok": 4,
        "rate_limited": 0,
        "errors": 0,
        "bad_requests": 2,
        "by_path": {
            "/v1/chat/completions": 2,
            "/chat/completions": 1,
            "/v1/embeddings": 1,
            "/v1/models": 1,
            "(other)": 1,
        },
    }
    assert provider.stats() == stats


def test_stats_survive_stop_and_stop_is_idempotent() -> None:
    fp = FakeProvider().start()
    conn = connect(fp)
    conn.chat()
    conn.close()
    fp.stop()
    fp.stop()
    assert fp.stats()["ok"] == 1


def test_invalid_configuration_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="error_rate"):
        FakeProviderConfig(error_rate=1.5)
    with pytest.raises(SystemExit) as exit_info:
        main(["--error-rate", "2"])
    assert exit_info.value.code == 2
    assert "--error-rate" in capsys.readouterr().err


def test_a_taken_port_is_reported(
    provider: FakeProvider, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(OSError):
        FakeProvider(FakeProviderConfig(port=provider.port)).start()
    assert off_main_thread(lambda: main(["--port", str(provider.port)])) == 1
    assert "cannot listen" in capsys.readouterr().err


LISTENING = re.compile(
    r"fake-provider listening on (http://127\.0\.0\.1:\d+/v1) "
    r"\(rpm=60, tpm=unlimited, latency=0\.01s\)\n"
)


@pytest.mark.parametrize(
    "entry",
    [
        ["-c", "import sys; from worker.fake_provider import main; sys.exit(main(sys.argv[1:]))"],
        ["-m", "worker.fake_provider"],
        ["-m", "worker", "fake-provider"],
    ],
    ids=["main", "python-m", "promptq"],
)
def test_command_prints_its_url_serves_and_stops_on_sigterm(entry: list[str]) -> None:
    args = ["--port", "0", "--rpm", "60", "--latency", "0.01"]
    with subprocess.Popen(
        [sys.executable, *entry, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            ready, _, _ = select.select([process.stdout], [], [], 30)
            assert ready, "no 'listening on' line within 30 s"
            line = process.stdout.readline()
            match = LISTENING.fullmatch(line)
            assert match, line
            with urllib.request.urlopen(f"{match.group(1)}/models", timeout=10) as response:
                assert response.status == 200
                assert json.load(response)["data"][0]["id"] == "fake-model"
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=15) == 0
            assert process.stdout.read() == ""  # exactly one line on stdout
        finally:
            if process.poll() is None:
                process.kill()


def test_importing_the_package_does_not_load_aiohttp() -> None:
    """The promptq parser imports it for every command; aiohttp loads only to serve."""
    code = "import sys, worker.fake_provider; sys.exit('aiohttp' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
