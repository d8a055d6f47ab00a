"""api_client._task_messages: the hand-built Celery messages (a job's, a pack's) match Celery's own.

Celery (and kombu) are used here only as the reference the light client must match; the
client itself never imports them.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from kombu.transport.virtual import base as kombu_virtual

from api_client._celery_contract import CONTRACT_VERSION, PROMPTQ_HEADER
from api_client._constants import PACK_TASK_NAME, QUEUE, TASK_NAME
from api_client._requests import Submission
from api_client._schemas import PromptRequest
from api_client._task_messages import pack_message, task_message
from worker.app.celery_app import celery_config
from worker.settings import load_settings

JOB_ID = "0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55"
PROMPT = "The secret plan is: bake a cake for Ada."
REQUEST = PromptRequest(
    messages=[{"role": "user", "content": PROMPT}],
    model="openai/gpt-4o-mini",
    params={"temperature": 0, "max_tokens": 50},
)
# Headers that legitimately differ: who sent it, and how the arguments are shown in logs.
# promptq's mark of its own messages is no Celery header (test_headers_match_... checks it).
UNCOMPARED_HEADERS = {"origin", "argsrepr", "kwargsrepr", PROMPTQ_HEADER}


@pytest.fixture
def ours() -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(task_message(JOB_ID, REQUEST))
    return envelope


def _request_args() -> tuple[dict[str, Any]]:
    return (REQUEST.model_dump(mode="json"),)


@pytest.fixture
def celery_app() -> Iterator[Celery]:
    """A Celery app with the worker's own configuration, on kombu's in-memory transport."""
    config = celery_config(load_settings())
    config["broker_url"] = "memory://"
    config["broker_transport"] = None  # the worker's is for Redis
    app = Celery("promptq-reference", set_as_current=False)
    app.conf.update(config)
    yield app
    app.close()


def _celery_envelope(app: Celery) -> dict[str, Any]:
    """What Celery itself puts in the queue for the same job (via the virtual transport)."""
    # The registered task has ignore_result=True; send_task does not know that by name alone.
    app.send_task(TASK_NAME, args=_request_args(), task_id=JOB_ID, ignore_result=True)
    with app.connection_for_write() as connection:
        envelope: dict[str, Any] = connection.default_channel._get(QUEUE)
    return envelope


def test_headers_match_celerys_task_protocol_2(ours: dict[str, Any]) -> None:
    app = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False)
    reference = app.amqp.as_task_v2(
        JOB_ID, TASK_NAME, args=_request_args(), kwargs={}, ignore_result=True
    )

    headers = ours["headers"]
    expected = {k: v for k, v in reference.headers.items() if k not in UNCOMPARED_HEADERS}
    # Celery's headers, and promptq's mark of its own messages (the public Celery contract).
    assert set(headers) == set(reference.headers) | {PROMPTQ_HEADER}
    assert headers[PROMPTQ_HEADER] == CONTRACT_VERSION
    assert {k: v for k, v in headers.items() if k not in UNCOMPARED_HEADERS} == expected
    assert headers["task"] == TASK_NAME
    assert headers["id"] == headers["root_id"] == JOB_ID
    assert headers["retries"] == 0
    assert headers["ignore_result"] is True
    assert reference.properties["correlation_id"] == ours["properties"]["correlation_id"]


def test_body_matches_celerys(ours: dict[str, Any]) -> None:
    app = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False)
    reference = app.amqp.as_task_v2(JOB_ID, TASK_NAME, args=_request_args(), kwargs={})

    body = json.loads(base64.b64decode(ours["body"], validate=True))

    assert body == json.loads(json.dumps(reference.body))
    args, kwargs, embed = body
    assert PromptRequest.model_validate(args[0]) == REQUEST
    assert kwargs == {}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_envelope_matches_what_celery_puts_in_the_queue(
    ours: dict[str, Any], celery_app: Celery
) -> None:
    theirs = _celery_envelope(celery_app)

    assert set(ours) == set(theirs)
    for key in ("content-type", "content-encoding", "body"):
        assert ours[key] == theirs[key], key
    assert ours["content-type"] == "application/json"
    assert ours["content-encoding"] == "utf-8"
    assert {k: v for k, v in ours["headers"].items() if k not in UNCOMPARED_HEADERS} == {
        k: v for k, v in theirs["headers"].items() if k not in UNCOMPARED_HEADERS
    }
    # reply_to differs by design (nothing replies: results go to promptq's own keys) and
    # delivery_tag is a fresh uuid on each side; Celery also leaks argsrepr into properties.
    compared = ("correlation_id", "delivery_mode", "delivery_info", "priority", "body_encoding")
    for key in compared:
        assert ours["properties"][key] == theirs["properties"][key], key
    assert ours["properties"]["delivery_info"] == {"exchange": "", "routing_key": QUEUE}
    assert ours["properties"]["body_encoding"] == "base64"
    assert ours["properties"]["delivery_mode"] == 2  # persistent
    uuid.UUID(ours["properties"]["delivery_tag"])


def test_delivery_tags_are_unique() -> None:
    tags = {
        json.loads(task_message(JOB_ID, REQUEST))["properties"]["delivery_tag"] for _ in range(3)
    }
    assert len(tags) == 3


def test_kombu_decodes_our_envelope(ours: dict[str, Any], celery_app: Celery) -> None:
    with celery_app.connection_for_write() as connection:
        # kombu's virtual transports (Redis among them) wrap each raw envelope in this class.
        message_cls: Any = kombu_virtual.Message
        message = message_cls(ours, channel=connection.default_channel)

        assert message.content_type == "application/json"
        assert message.headers["task"] == TASK_NAME
        assert message.delivery_info["routing_key"] == QUEUE
        args, kwargs, _ = message.decode()

    assert PromptRequest.model_validate(args[0]) == REQUEST
    assert kwargs == {}


def test_prompt_stays_out_of_argsrepr(ours: dict[str, Any]) -> None:
    headers = ours["headers"]

    assert PROMPT not in headers["argsrepr"]
    assert "cake" not in headers["argsrepr"]
    assert PROMPT not in headers["kwargsrepr"]


def test_prompt_appears_only_in_the_encoded_body(ours: dict[str, Any]) -> None:
    without_body = {k: v for k, v in ours.items() if k != "body"}
    assert PROMPT not in json.dumps(without_body)
    assert PROMPT in base64.b64decode(ours["body"]).decode()


def test_non_ascii_prompt_round_trips() -> None:
    request = PromptRequest(messages=[{"role": "user", "content": "Grüß Gott — 你好 🎉"}])

    envelope = json.loads(task_message(JOB_ID, request))
    body = json.loads(base64.b64decode(envelope["body"]).decode("utf-8"))

    assert PromptRequest.model_validate(body[0][0]) == request


def test_a_pack_message_is_a_celery_task_message_with_one_argument() -> None:
    jobs = [Submission(f"job-{i}", REQUEST, packable=True) for i in range(3)]
    ours = json.loads(pack_message("pack-1", jobs))
    entries = [
        {"task": TASK_NAME, "id": j.job_id, "request": REQUEST.model_dump(mode="json")}
        for j in jobs
    ]
    app = Celery(broker="redis://127.0.0.1:1/0", set_as_current=False)
    reference = app.amqp.as_task_v2(
        "pack-1", PACK_TASK_NAME, args=(entries,), kwargs={}, ignore_result=True
    )

    headers = ours["headers"]
    expected = {k: v for k, v in reference.headers.items() if k not in UNCOMPARED_HEADERS}
    assert {k: v for k, v in headers.items() if k not in UNCOMPARED_HEADERS} == expected
    assert headers["argsrepr"] == "(<3 jobs>,)"
    body = json.loads(base64.b64decode(ours["body"], validate=True))
    assert body == json.loads(json.dumps(reference.body))
