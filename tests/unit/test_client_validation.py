"""api_client input validation (before anything touches Redis) and failing fast without Redis.

The clients point at a port nothing listens on: an input error must come out as
InvalidRequest, which proves it was found before any Redis call (that would have raised
BrokerUnavailable instead); the control tests show that a valid request does raise
BrokerUnavailable there.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, TypeVar, cast

import pytest
from pydantic import ValidationError

from api_client import (
    AsyncClient,
    BrokerUnavailable,
    Client,
    ClientSettings,
    InvalidRequest,
    JobTimeout,
    PromptqError,
    PromptRequest,
)

PASSWORD = "secretpw-4d9c"

T = TypeVar("T")


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on a private loop that never becomes the thread's current loop.

    asyncio.run() resets the current loop to None when done, orphaning (unclosed) any loop
    that was current before; LiteLLM's synchronous completion() leaves one behind in the
    calling thread, so plain asyncio.run here would make a ResourceWarning in other tests.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coroutine)


@pytest.fixture
def client(closed_port: int) -> Iterator[Client]:
    with Client(f"redis://127.0.0.1:{closed_port}/0") as c:
        yield c


def _assert_invalid(raised: pytest.ExceptionInfo[InvalidRequest], *fragments: str) -> None:
    error = raised.value
    assert isinstance(error, ValueError)
    assert isinstance(error, PromptqError)
    assert not isinstance(error, BrokerUnavailable)
    for fragment in fragments:
        assert fragment in str(error), f"{fragment!r} not in {str(error)!r}"


USER_MESSAGE = {"role": "user", "content": "hello"}

# (submit keyword arguments, fragments the error message must contain)
BAD_SUBMISSIONS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "empty prompt": ({"prompt": ""}, ("prompt", "empty")),
    "whitespace prompt": ({"prompt": "  \n\t "}, ("prompt", "empty")),
    "prompt not a string": ({"prompt": 42}, ("prompt", "int")),
    "prompt and messages": (
        {"prompt": "hi", "messages": [USER_MESSAGE]},
        ("prompt", "messages"),
    ),
    "neither prompt nor messages": ({}, ("prompt", "messages")),
    "messages not a list": ({"messages": "hello"}, ("messages", "list")),
    "messages a dict": ({"messages": USER_MESSAGE}, ("messages", "list")),
    "messages of strings": ({"messages": ["hello"]}, ("messages",)),
    "messages empty": ({"messages": []}, ("messages",)),
    "bad role": ({"messages": [{"role": "wizard", "content": "hi"}]}, ("role", "wizard")),
    "missing role": ({"messages": [{"content": "hi"}]}, ("role",)),
    "user message with empty content": (
        {"messages": [{"role": "user", "content": ""}]},
        ("messages[0]", "empty content"),
    ),
    "second message with no content": (
        {"messages": [USER_MESSAGE, {"role": "system"}]},
        ("messages[1]", "empty content"),
    ),
    "non-JSON message": (
        {"messages": [{"role": "user", "content": "hi", "extra": object()}]},
        ("messages[0]", "JSON"),
    ),
    "object param": ({"prompt": "hi", "callback": object()}, ("callback", "JSON")),
    "lone surrogate in the prompt": (
        {"prompt": "half a pair: \ud800"},
        ("messages[0]", "not valid Unicode", "surrogates not allowed"),
    ),
    "lone surrogate in a param": ({"prompt": "hi", "stop": ["\udfff"]}, ("stop", "Unicode")),
    "set param": ({"prompt": "hi", "stop": {"a", "b"}}, ("stop", "JSON")),
    "NaN param": ({"prompt": "hi", "temperature": math.nan}, ("temperature", "finite")),
    "infinite param": ({"prompt": "hi", "top_p": math.inf}, ("top_p", "finite")),
    "NaN nested in a param": ({"prompt": "hi", "logit_bias": {"1": math.nan}}, ("logit_bias",)),
    "reserved api_key": ({"prompt": "hi", "api_key": "sk-x"}, ("api_key",)),
    "reserved stream": ({"prompt": "hi", "stream": True}, ("stream",)),
    "reserved base_url": ({"prompt": "hi", "base_url": "http://x"}, ("base_url",)),
    "reserved timeout": ({"prompt": "hi", "timeout": 5}, ("timeout",)),
    "reserved num_retries": ({"prompt": "hi", "num_retries": 3}, ("num_retries",)),
    "empty model": ({"prompt": "hi", "model": ""}, ("model", "empty")),
    "blank model": ({"prompt": "hi", "model": "   "}, ("model", "empty")),
}


@pytest.mark.parametrize(
    ("kwargs", "fragments"), list(BAD_SUBMISSIONS.values()), ids=list(BAD_SUBMISSIONS)
)
def test_submit_refuses_bad_input(
    client: Client, kwargs: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client.submit(**kwargs)

    _assert_invalid(raised, *fragments)


@pytest.mark.parametrize(
    ("kwargs", "fragments"), list(BAD_SUBMISSIONS.values()), ids=list(BAD_SUBMISSIONS)
)
def test_async_submit_refuses_bad_input(
    closed_port: int, kwargs: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    async def submit() -> None:
        async with AsyncClient(f"redis://127.0.0.1:{closed_port}/0") as client:
            await client.submit(**kwargs)

    with pytest.raises(InvalidRequest) as raised:
        _run(submit())

    _assert_invalid(raised, *fragments)


def test_reserved_params_are_all_named(client: Client) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client.submit("hi", api_key="sk-x", stream=True, timeout=3)

    _assert_invalid(raised, "api_key", "stream", "timeout")


def test_assistant_message_may_have_no_content(client: Client) -> None:
    # Valid input (a tool-calling assistant turn) gets past validation and reaches Redis.
    messages: list[dict[str, Any]] = [
        USER_MESSAGE,
        {"role": "assistant", "content": None},
        USER_MESSAGE,
    ]

    with pytest.raises(BrokerUnavailable):
        client.submit(messages=messages)


GOOD_ITEMS: list[PromptRequest | str | Mapping[str, Any]] = [
    "first prompt",
    {"prompt": "second prompt", "temperature": 0},
    {"messages": [USER_MESSAGE], "model": "openai/gpt-4o-mini"},
    PromptRequest(messages=[USER_MESSAGE]),
]

BAD_ITEMS: dict[str, tuple[Any, str]] = {
    "empty string": ("", "empty"),
    "reserved param": ({"prompt": "x", "stream": True}, "stream"),
    "NaN param": ({"prompt": "x", "temperature": math.nan}, "temperature"),
    "no prompt": ({"temperature": 0}, "prompt"),
    "bad role": ({"messages": [{"role": "robot", "content": "x"}]}, "robot"),
    "not a request": (42, "int"),
}


@pytest.mark.parametrize(("bad", "fragment"), list(BAD_ITEMS.values()), ids=list(BAD_ITEMS))
@pytest.mark.parametrize("position", [0, 2, 4])
def test_submit_many_validates_everything_before_publishing(
    client: Client, bad: Any, fragment: str, position: int
) -> None:
    items = list(GOOD_ITEMS)
    items.insert(position, bad)

    with pytest.raises(InvalidRequest) as raised:
        client.submit_many(items)

    _assert_invalid(raised, fragment)


def test_submit_many_of_good_items_does_reach_for_redis(client: Client) -> None:
    with pytest.raises(BrokerUnavailable):
        client.submit_many(GOOD_ITEMS)


def test_async_submit_many_validates_everything_before_publishing(closed_port: int) -> None:
    async def submit_many() -> None:
        async with AsyncClient(f"redis://127.0.0.1:{closed_port}/0") as client:
            await client.submit_many([*GOOD_ITEMS, {"prompt": "x", "api_key": "sk-x"}])

    with pytest.raises(InvalidRequest) as raised:
        _run(submit_many())

    _assert_invalid(raised, "api_key")


@pytest.mark.parametrize("job_id", ["bad id!", "", "a" * 129, "../etc", "job\n", "jöb"])
def test_job_refuses_a_malformed_id(client: Client, job_id: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        client.job(job_id)

    _assert_invalid(raised, "job id")


def test_job_refuses_a_non_string_id(client: Client) -> None:
    with pytest.raises(InvalidRequest):
        client.job(cast(Any, 123))


@pytest.mark.parametrize(
    "job_id", ["0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55", "a", "job_1.2:3-x", "a" * 128]
)
def test_job_accepts_a_well_formed_id_without_touching_redis(client: Client, job_id: str) -> None:
    assert client.job(job_id).id == job_id


def test_async_job_refuses_a_malformed_id(closed_port: int) -> None:
    client = AsyncClient(f"redis://127.0.0.1:{closed_port}/0")
    try:
        with pytest.raises(InvalidRequest):
            client.job("bad id!")
    finally:
        _run(client.close())


# --- Redis down -----------------------------------------------------------------------------


def test_submit_with_redis_down_fails_fast_without_the_password(closed_port: int) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0"
    with Client(url) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            client.submit("hello")
        elapsed_s = time.monotonic() - started

    error = raised.value
    assert isinstance(error, ConnectionError)
    assert isinstance(error, PromptqError)
    assert elapsed_s < 15  # a bound on hanging, not a performance target
    message = str(error)
    assert f"127.0.0.1:{closed_port}" in message
    assert "redis://:***@" in message
    assert PASSWORD not in message
    assert PASSWORD not in repr(error)


def test_async_submit_with_redis_down_fails_fast_without_the_password(closed_port: int) -> None:
    url = f"redis://user:{PASSWORD}@127.0.0.1:{closed_port}/0"

    async def submit() -> None:
        async with AsyncClient(url) as client:
            await client.submit("hello")

    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        _run(submit())
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 15
    message = str(raised.value)
    assert f"127.0.0.1:{closed_port}" in message
    assert PASSWORD not in message


def test_a_status_check_with_redis_down_is_broker_unavailable(closed_port: int) -> None:
    with Client(f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0") as client:
        job = client.job("0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55")
        with pytest.raises(BrokerUnavailable) as raised:
            job.status()

    assert PASSWORD not in str(raised.value)


def test_wait_rides_out_redis_down_until_its_timeout(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    with Client(f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0") as client:
        job = client.job("0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55")
        started = time.monotonic()
        with pytest.raises(JobTimeout) as raised:
            job.wait(timeout=0.5)
        elapsed_s = time.monotonic() - started

    assert 0.5 <= elapsed_s < 10  # retried until the timeout, and not much beyond it
    assert isinstance(raised.value.__cause__, BrokerUnavailable)
    assert raised.value.job_id == job.id
    assert "unreachable" in str(raised.value)
    assert f"127.0.0.1:{closed_port}" in str(raised.value)
    assert PASSWORD not in str(raised.value) + caplog.text
    # One warning for the outage, not one per retry.
    assert [r.levelname for r in caplog.records if r.name == "promptq.client"] == ["WARNING"]


def test_wait_without_timeout_gives_up_after_max_outage(closed_port: int) -> None:
    settings = ClientSettings(
        redis_url=f"redis://:{PASSWORD}@127.0.0.1:{closed_port}/0", max_outage_s=0.3
    )
    with Client(settings=settings) as client:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            client.job("0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55").wait()
        elapsed_s = time.monotonic() - started

    assert 0.3 <= elapsed_s < 10
    assert "PROMPTQ_MAX_OUTAGE_S" in str(raised.value)
    assert PASSWORD not in str(raised.value)


def test_async_wait_rides_out_redis_down_until_its_timeout(closed_port: int) -> None:
    async def wait() -> None:
        async with AsyncClient(f"redis://127.0.0.1:{closed_port}/0") as client:
            await client.job("0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55").wait(timeout=0.5)

    started = time.monotonic()
    with pytest.raises(JobTimeout) as raised:
        _run(wait())

    assert 0.5 <= time.monotonic() - started < 10
    assert isinstance(raised.value.__cause__, BrokerUnavailable)


def test_async_wait_without_timeout_gives_up_after_max_outage(closed_port: int) -> None:
    settings = ClientSettings(redis_url=f"redis://127.0.0.1:{closed_port}/0", max_outage_s=0.3)

    async def wait() -> None:
        async with AsyncClient(settings=settings) as client:
            await client.job("0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55").wait()

    with pytest.raises(BrokerUnavailable, match="PROMPTQ_MAX_OUTAGE_S"):
        _run(wait())


# --- client settings ------------------------------------------------------------------------


def test_client_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTQ_REDIS_URL", "redis://127.0.0.1:6399/2")
    monkeypatch.setenv("PROMPTQ_CONNECT_TIMEOUT_S", "0.5")

    settings = ClientSettings()

    assert settings.redis_url == "redis://127.0.0.1:6399/2"
    assert settings.connect_timeout_s == 0.5


def test_explicit_url_wins_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTQ_REDIS_URL", "redis://127.0.0.1:6399/2")

    with Client("redis://127.0.0.1:6398/1") as client:
        assert client.settings.redis_url == "redis://127.0.0.1:6398/1"


@pytest.mark.parametrize("name", ["connect_timeout_s", "socket_timeout_s", "result_ttl_s"])
@pytest.mark.parametrize("value", [0, -1])
def test_client_settings_refuse_non_positive_durations(name: str, value: float) -> None:
    with pytest.raises(ValidationError, match=name):
        ClientSettings.model_validate({name: value})


def test_client_settings_refuse_an_infinite_result_ttl() -> None:
    # With result_ttl_s=inf, submit() computes int(inf * 1000) and raises OverflowError,
    # which is neither InvalidRequest nor any PromptqError: refuse it up front.
    with pytest.raises(ValidationError, match="result_ttl_s"):
        ClientSettings(result_ttl_s=math.inf)
