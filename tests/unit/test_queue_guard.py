"""worker.app.queue_guard's pure parts: the transport a broker URL gets, what an envelope needs."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kombu.transport import get_transport_cls

from api_client._requests import build_request
from api_client._task_messages import task_message
from worker.app.celery_app import celery_config
from worker.app.queue_guard import GuardedTransport, envelope_problem, transport_for
from worker.settings import load_settings


@pytest.mark.parametrize(
    ("url", "guarded"),
    [
        ("redis://localhost:6379/0", True),
        ("rediss://:pw@example.com:6380/1", False),  # kombu sets TLS up for "rediss" only
        ("sentinel://localhost:26379", False),
        ("memory://", False),
    ],
)
def test_redis_brokers_get_the_guarded_transport(url: str, guarded: bool) -> None:
    assert (transport_for(url) == "promptq-redis") is guarded


def test_the_worker_uses_the_guard() -> None:
    config = celery_config(load_settings())

    assert get_transport_cls(str(config["broker_transport"])) is GuardedTransport
    assert config["worker_consumer"] == "worker.app.queue_guard:GuardedConsumer"


def _envelope() -> dict[str, Any]:
    envelope: dict[str, Any] = json.loads(
        task_message("job-1", build_request("hello", None, None, {}))
    )
    return envelope


def test_the_clients_envelope_passes() -> None:
    assert envelope_problem(_envelope()) is None


def _without(*path: str) -> dict[str, Any]:
    envelope = _envelope()
    inner = envelope
    for key in path[:-1]:
        inner = inner[key]
    del inner[path[-1]]
    return envelope


def _with(key: str, value: Any, *, in_properties: bool = False) -> dict[str, Any]:
    envelope = _envelope()
    (envelope["properties"] if in_properties else envelope)[key] = value
    return envelope


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("a string", "a JSON str"),
        ([1, 2], "a JSON list"),
        (_without("properties"), "delivery_tag"),
        (_without("properties", "delivery_tag"), "delivery_tag"),
        (_without("properties", "delivery_info"), "delivery_info"),
        (_with("headers", ["task"]), "headers"),
        (_with("body_encoding", "rot13", in_properties=True), "unknown body encoding"),
        (_with("body", 42), "not base64"),
    ],
)
def test_envelope_problems_are_named(raw: Any, fragment: str) -> None:
    problem = envelope_problem(raw)

    assert problem is not None
    assert fragment in problem
