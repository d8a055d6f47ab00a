"""worker.app.queue_guard with a real redis-server and kombu (no Celery): a message is always in the
queue, the process's taken list or its held hash, until acknowledged or returned."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.messaging import Consumer

from api_client._constants import QUEUE, UNACKED_KEY, WORKERS_KEY
from api_client._requests import build_request
from api_client._task_messages import task_message
from tests.support.redis_server import RedisServer
from worker.app.queue_guard import GuardedTransport
from worker.fleet.custody import this_process

QUEUES = [Queue(QUEUE, Exchange(""), routing_key=QUEUE)]  # type: ignore[no-untyped-call]  # kombu


@pytest.fixture
def broker(real_redis: RedisServer) -> Iterator[redis.Redis]:
    client = real_redis.client()
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def connection(real_redis: RedisServer) -> Iterator[Connection]:
    with Connection(real_redis.url, transport=GuardedTransport) as conn:  # type: ignore[no-untyped-call]
        yield conn


def _message(job_id: str) -> bytes:
    return task_message(job_id, build_request("hello", None, None, {}))


def _take(connection: Connection, on_message: Any) -> None:
    with Consumer(connection, QUEUES, callbacks=[on_message], accept=["json"]):  # type: ignore[no-untyped-call]
        connection.drain_events(timeout=5)  # type: ignore[no-untyped-call]


def test_a_delivered_message_is_held_by_the_process_until_acknowledged(
    connection: Connection, broker: redis.Redis
) -> None:
    custody = this_process()
    message = _message("job-1")
    broker.lpush(QUEUE, message)
    seen: dict[str, Any] = {}

    def on_message(body: Any, delivered: Any) -> None:
        seen["held"] = broker.hgetall(custody.held_key)
        seen["taken"] = broker.llen(custody.taken_key)
        seen["unacked"] = broker.hlen(UNACKED_KEY)
        delivered.ack()

    _take(connection, on_message)

    assert seen["held"] == {json.loads(message)["properties"]["delivery_tag"].encode(): message}
    assert seen["taken"] == 0  # moved out in the same step that recorded the delivery
    assert seen["unacked"] == 1
    assert broker.zscore(WORKERS_KEY, custody.process_id) is not None  # registered first
    assert broker.hlen(custody.held_key) == 0
    assert broker.hlen(UNACKED_KEY) == 0
    assert broker.llen(QUEUE) == 0


def test_a_rejected_message_leaves_the_process_and_goes_back(
    connection: Connection, broker: redis.Redis
) -> None:
    custody = this_process()
    broker.lpush(QUEUE, _message("job-2"))

    _take(connection, lambda body, delivered: delivered.reject(requeue=True))

    assert broker.llen(QUEUE) == 1
    assert broker.hlen(custody.held_key) == 0
    assert broker.hlen(UNACKED_KEY) == 0


@pytest.mark.parametrize("garbage", [b"not json", b'"a JSON string"', b"\xff\xfe"])
def test_garbage_is_dropped_from_the_processs_custody(
    connection: Connection, broker: redis.Redis, garbage: bytes
) -> None:
    custody = this_process()
    broker.lpush(QUEUE, garbage)
    delivered: list[Any] = []

    consumer = Consumer(connection, QUEUES, callbacks=[lambda b, m: delivered.append(m)])  # type: ignore[no-untyped-call]
    with consumer, pytest.raises(TimeoutError):  # nothing is delivered: drain_events waits
        connection.drain_events(timeout=0.5)  # type: ignore[no-untyped-call]

    assert delivered == []
    assert broker.llen(custody.taken_key) == 0
    assert broker.llen(QUEUE) == 0


def test_a_message_acknowledged_while_redis_is_down_is_acknowledged_once_it_is_up(
    tmp_path: Path,
) -> None:
    """The ack is lost with Redis; the message would stay held by this live process until the
    visibility timeout, then run again. It is acknowledged before the next take instead."""
    with RedisServer(tmp_path, appendonly=True) as server:
        broker = server.client()
        custody = this_process()
        broker.lpush(QUEUE, _message("job-3"))
        held: list[Any] = []
        with Connection(server.url, transport=GuardedTransport) as connection:  # type: ignore[no-untyped-call]
            _take(connection, lambda body, delivered: held.append(delivered))
            server.stop()
            with pytest.raises(redis.ConnectionError):
                held[0].ack()
            server.start()
            wait_for_redis(broker)
            assert broker.hlen(custody.held_key) == 1  # still held, as Redis saw it last

            custody.before_take(broker, block_s=0.0)

        assert broker.llen(QUEUE) == 0
        assert broker.hlen(custody.held_key) == 0
        assert broker.hlen(UNACKED_KEY) == 0
        broker.close()


def wait_for_redis(client: redis.Redis, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
