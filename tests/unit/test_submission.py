"""What submit checks before publishing (prompt size, idempotency keys) and the publish itself
(one job per message, or submit_many's packs).

The publish script runs against fakeredis (Lua under lupa); the clients point at a closed
port, so an InvalidRequest proves the problem was found before any Redis call.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import fakeredis
import pytest

from api_client import BrokerUnavailable, Client, ClientSettings, InvalidRequest, PromptRequest
from api_client._constants import result_key, state_key
from api_client._publish import enqueue
from api_client._requests import (
    Submission,
    build_embedding_request,
    build_request,
    idempotent_job_id,
    prompt_chars,
    submission,
)
from tests.support.broker import queued_messages, take_all

TTL_S = 60.0


@pytest.fixture
def small_client(closed_port: int) -> Iterator[Client]:
    settings = ClientSettings(redis_url=f"redis://127.0.0.1:{closed_port}/0", max_prompt_chars=100)
    with Client(settings=settings) as client:
        yield client


# --- prompt size ----------------------------------------------------------------------------


def test_the_default_limit_is_a_million_characters() -> None:
    assert ClientSettings().max_prompt_chars == 1_000_000


def test_the_limit_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTQ_MAX_PROMPT_CHARS", "5000")

    assert ClientSettings().max_prompt_chars == 5000


def test_prompt_chars_counts_every_string_in_the_messages() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "abc"},
        {"role": "user", "content": [{"type": "text", "text": "de"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"arguments": "{}"}]},
    ]

    # Roles and part types count too: they are text the message carries.
    expected = sum(len(s) for s in ("system", "abc", "user", "text", "de", "image_url"))
    expected += len("assistant") + len("{}")
    assert prompt_chars(messages) == expected


def test_a_prompt_at_the_limit_reaches_for_redis(small_client: Client) -> None:
    # "user" is 4 characters of the 100.
    with pytest.raises(BrokerUnavailable):
        small_client.submit("x" * 96)


def test_an_oversize_prompt_is_refused_naming_the_limit(small_client: Client) -> None:
    with pytest.raises(InvalidRequest) as raised:
        small_client.submit("x" * 97)

    message = str(raised.value)
    assert "101 characters" in message
    assert "limit of 100" in message
    assert "PROMPTQ_MAX_PROMPT_CHARS" in message


def test_oversize_messages_are_refused(small_client: Client) -> None:
    messages = [{"role": "user", "content": "a" * 60}, {"role": "user", "content": "b" * 60}]

    with pytest.raises(InvalidRequest, match="PROMPTQ_MAX_PROMPT_CHARS"):
        small_client.submit(messages=messages)


def test_submit_many_names_the_oversize_item_and_publishes_nothing(small_client: Client) -> None:
    with pytest.raises(InvalidRequest) as raised:
        small_client.submit_many(["short", "fine", "y" * 500])

    assert str(raised.value).startswith("requests[2]: ")
    assert "limit of 100" in str(raised.value)


def test_submit_many_names_the_index_of_any_bad_item(small_client: Client) -> None:
    with pytest.raises(InvalidRequest) as raised:
        small_client.submit_many(["fine", {"prompt": "x", "stream": True}])

    assert str(raised.value).startswith("requests[1]: ")
    assert "stream" in str(raised.value)


# --- idempotency keys -----------------------------------------------------------------------


def test_the_same_key_names_the_same_job() -> None:
    assert idempotent_job_id("order-17") == idempotent_job_id("order-17")
    assert idempotent_job_id("order-17") != idempotent_job_id("order-18")


def test_an_idempotent_job_id_is_a_valid_job_id(closed_port: int) -> None:
    with Client(f"redis://127.0.0.1:{closed_port}/0") as client:
        job_id = idempotent_job_id("any key at all: ünïcode, spaces\n and newlines")
        assert client.job(job_id).id == job_id


@pytest.mark.parametrize(
    ("key", "fragment"),
    [("", "non-empty string"), (17, "non-empty string"), ("k" * 1025, "limit of 1,024")],
)
def test_bad_idempotency_keys_are_refused(small_client: Client, key: Any, fragment: str) -> None:
    with pytest.raises(InvalidRequest, match=fragment):
        small_client.submit("hello", idempotency_key=key)
    with pytest.raises(InvalidRequest, match=fragment):
        small_client.submit_many([{"prompt": "hello", "idempotency_key": key}])


def test_the_idempotency_key_is_not_sent_as_a_parameter() -> None:
    job = submission(build_request("hi", None, None, {}), "k", 1000)

    assert job.job_id == idempotent_job_id("k")
    assert "idempotency_key" not in job.request.params


# --- the publish script ---------------------------------------------------------------------


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


def _publish(redis_client: fakeredis.FakeRedis, *jobs: Submission) -> list[Any]:
    pipe = redis_client.pipeline(transaction=False)
    enqueue(pipe, jobs, TTL_S)
    result: list[Any] = pipe.execute()
    return result


def _job(job_id: str, prompt: str = "hello") -> Submission:
    return Submission(job_id, build_request(prompt, None, None, {}))


def _queued_ids(redis_client: fakeredis.FakeRedis) -> list[str]:
    return [json.loads(raw)["headers"]["id"] for raw in queued_messages(redis_client)]


def test_publish_sets_the_state_and_pushes_the_message(redis_client: fakeredis.FakeRedis) -> None:
    assert _publish(redis_client, _job("a"), _job("b")) == [1, 1]

    assert sorted(_queued_ids(redis_client)) == ["a", "b"]  # in what order: test_schedule
    assert redis_client.get(state_key("a")) == b"queued"
    assert 0 < redis_client.pttl(state_key("a")) <= TTL_S * 1000


def test_publishing_a_job_id_again_queues_nothing(redis_client: fakeredis.FakeRedis) -> None:
    _publish(redis_client, _job("a"))

    # As a pipeline re-sent after a lost reply, or a second submit with the same key, would.
    assert _publish(redis_client, _job("a", "another prompt"), _job("a")) == [0, 0]
    assert _queued_ids(redis_client) == ["a"]


def test_a_job_with_a_result_is_not_published_again(redis_client: fakeredis.FakeRedis) -> None:
    # A finished job: the worker stored its result and deleted its state.
    redis_client.set(result_key("a"), b"{}")

    assert _publish(redis_client, _job("a")) == [0]
    assert queued_messages(redis_client) == []
    assert redis_client.get(state_key("a")) is None


# --- packs ------------------------------------------------------------------------------------


def _packable(job_id: str, prompt: str = "hello") -> Submission:
    return Submission(job_id, build_request(prompt, None, None, {}), packable=True)


def _publish_packed(redis_client: fakeredis.FakeRedis, pack_size: int, *jobs: Submission) -> None:
    pipe = redis_client.pipeline(transaction=False)
    enqueue(pipe, jobs, TTL_S, pack_size)
    pipe.execute()


def _messages(redis_client: fakeredis.FakeRedis) -> list[dict[str, Any]]:
    """The queue's messages in the order workers take them, each with its decoded body."""
    found = []
    for raw in take_all(redis_client):
        envelope = json.loads(raw)
        envelope["args"] = json.loads(base64.b64decode(envelope["body"]))[0]
        found.append(envelope)
    return found


def test_new_jobs_go_in_packs_of_pack_size(redis_client: fakeredis.FakeRedis) -> None:
    jobs = [_packable(f"j{i}", f"prompt {i}") for i in range(37)]

    _publish_packed(redis_client, 16, *jobs)

    messages = _messages(redis_client)
    assert [m["headers"]["task"] for m in messages] == [
        "promptq.pack",
        "promptq.pack",
        "promptq.pack",
    ]
    packs = [m["args"][0] for m in messages]
    assert [len(p) for p in packs] == [16, 16, 5]
    entries = [entry for p in packs for entry in p]
    assert [e["id"] for e in entries] == [f"j{i}" for i in range(37)]
    assert {e["task"] for e in entries} == {"promptq.complete"}
    assert PromptRequest.model_validate(entries[3]["request"]) == jobs[3].request
    assert all(redis_client.get(state_key(f"j{i}")) == b"queued" for i in range(37))
    assert messages[0]["headers"]["argsrepr"] == "(<16 jobs>,)"  # never the prompts
    assert "prompt 1" not in json.dumps(messages[0]["headers"])


def test_a_pack_carries_each_jobs_own_task(redis_client: fakeredis.FakeRedis) -> None:
    embeddings = [
        Submission(f"e{n}", build_embedding_request(["text"], None, {}), packable=True)
        for n in range(2)
    ]

    _publish_packed(redis_client, 16, *embeddings)

    [message] = _messages(redis_client)
    assert [(e["task"], e["id"]) for e in message["args"][0]] == [
        ("promptq.embed", "e0"),
        ("promptq.embed", "e1"),
    ]


def test_jobs_that_wait_in_different_lines_never_share_a_pack(
    redis_client: fakeredis.FakeRedis,
) -> None:
    """A pack waits on one route: chat and embeddings calls (different lanes) go apart."""
    embeddings = [
        Submission(f"e{n}", build_embedding_request(["text"], None, {}), packable=True)
        for n in range(2)
    ]

    _publish_packed(
        redis_client, 16, _packable("p0"), embeddings[0], _packable("p1"), embeddings[1]
    )

    packs = sorted([e["id"] for e in m["args"][0]] for m in _messages(redis_client))
    assert packs == [["e0", "e1"], ["p0", "p1"]]


def test_a_pack_of_one_and_idempotent_jobs_are_single_messages(
    redis_client: fakeredis.FakeRedis,
) -> None:
    _publish_packed(redis_client, 16, _packable("alone"), _job("idem-1"), _job("idem-2"))

    messages = _messages(redis_client)
    assert sorted((m["headers"]["task"], m["headers"]["id"]) for m in messages) == [
        ("promptq.complete", "alone"),
        ("promptq.complete", "idem-1"),
        ("promptq.complete", "idem-2"),
    ]


def test_a_pack_published_again_is_pushed_once(redis_client: fakeredis.FakeRedis) -> None:
    jobs = [_packable("a"), _packable("b")]

    _publish_packed(redis_client, 16, *jobs)
    _publish_packed(redis_client, 16, *jobs)  # as a pipeline re-sent after a lost reply

    assert len(queued_messages(redis_client)) == 1


def test_pack_size_one_publishes_a_message_per_job(redis_client: fakeredis.FakeRedis) -> None:
    _publish_packed(redis_client, 1, _packable("a"), _packable("b"))

    assert [m["headers"]["task"] for m in _messages(redis_client)] == ["promptq.complete"] * 2
