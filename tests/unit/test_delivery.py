"""DeliveryState's encoding, and the deliveries the Celery tasks make of a message."""

from __future__ import annotations

from typing import Any

import pytest

from api_client._constants import EMBED_TASK_NAME, PACK_TASK_NAME, TASK_NAME
from api_client._schemas import EmbeddingRequest, PromptRequest
from worker.app.tasks import deliveries_of
from worker.fleet.delivery_state import DeliveryState


@pytest.mark.parametrize(
    "state",
    [DeliveryState(), DeliveryState(3), DeliveryState(1, 250, 1_700_000_000.5)],
)
def test_a_state_survives_encoding(state: DeliveryState) -> None:
    assert DeliveryState.decode(state.encode()) == state


def test_no_slot_is_encoded_as_no_slot_keys() -> None:
    assert DeliveryState(2).encode() == {"failures": 2}


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, DeliveryState()),
        ({"failures": None}, DeliveryState()),
        ({"failures": "2"}, DeliveryState(2)),  # a number in a string is still read
        ({"failures": -4}, DeliveryState()),
        ({"failures": "many"}, DeliveryState()),
        ({"failures": [1]}, DeliveryState()),
        ({"failures": 1, "reserved_tokens": "lots", "slot_at": 5.0}, DeliveryState()),
        ({"failures": 1, "reserved_tokens": 10, "slot_at": {}}, DeliveryState()),
        ({"failures": 1, "reserved_tokens": 10}, DeliveryState(1, 10, None)),
        ({"failures": 1, "slot_at": 5.0}, DeliveryState(1)),  # a slot_at alone holds nothing
        ({"failures": 1, "other": "ignored"}, DeliveryState(1)),
        ({"failures": float("inf")}, DeliveryState()),  # JSON reads 1e400 so
        ({"failures": 1, "reserved_tokens": float("inf"), "slot_at": 5.0}, DeliveryState()),
    ],
)
def test_values_of_the_wrong_type_count_as_absent(
    kwargs: dict[str, Any], expected: DeliveryState
) -> None:
    assert DeliveryState.decode(kwargs) == expected


def test_a_single_jobs_message_is_one_delivery_carrying_its_state() -> None:
    request = {"messages": [{"role": "user", "content": "hi"}]}
    [delivery] = deliveries_of(TASK_NAME, "job-1", 2, [request], {"failures": 1})
    assert delivery.job_id == "job-1"
    assert delivery.request_type is PromptRequest
    assert delivery.request == request
    assert delivery.state == DeliveryState(1)
    assert delivery.deliveries == 3  # two before this one
    assert delivery.task_name == TASK_NAME
    [embedding] = deliveries_of(EMBED_TASK_NAME, "job-2", 0, [{"input": ["x"]}], {})
    assert (embedding.request_type, embedding.deliveries) == (EmbeddingRequest, 1)


def test_a_packs_entries_are_deliveries_and_entries_naming_no_job_are_dropped() -> None:
    entries = [
        {"task": TASK_NAME, "id": "a", "request": {"prompt": "x"}},
        {"task": "promptq.nope", "id": "b", "request": {}},
        {"task": TASK_NAME, "id": 7},
        "garbage",
    ]
    found = deliveries_of(PACK_TASK_NAME, "pack-1", 0, [entries], {})
    assert [(d.job_id, d.request_type, d.task_name) for d in found] == [
        ("a", PromptRequest, TASK_NAME),
        ("b", None, "promptq.nope"),  # fails as bad_request when run
    ]
    assert all(d.state == DeliveryState() and d.deliveries == 1 for d in found)


def test_a_delivery_stands_at_its_messages_order_and_a_packs_jobs_in_turn_within_it() -> None:
    request = {"messages": [{"role": "user", "content": "hi"}]}
    [single] = deliveries_of(TASK_NAME, "job-1", 0, [request], {}, order=7.0)
    [unknown] = deliveries_of(TASK_NAME, "job-1", 0, [request], {})
    assert (single.order, unknown.order) == (7.0, None)

    entries = [{"task": TASK_NAME, "id": f"j{n}", "request": request} for n in range(4)]
    packed = deliveries_of(PACK_TASK_NAME, "pack-1", 0, [entries], {}, order=12.0)
    orders = [d.order for d in packed if d.order is not None]
    assert len(orders) == len(entries) and orders[0] == 12.0
    assert orders == sorted(set(orders)) and all(order < 13 for order in orders)
    assert all(d.order is None for d in deliveries_of(PACK_TASK_NAME, "p", 0, [entries], {}))
