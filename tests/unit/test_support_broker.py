"""The end-to-end tests' readers of Redis (tests/support/broker.py, queue_events.py) on a real
redis-server: they must see each place a message can be, or the waits built on them prove
nothing."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from api_client._constants import (
    PRIORITY_LISTS,
    QUEUE,
    UNACKED_KEY,
    WORKERS_KEY,
    held_key,
    taken_key,
)
from api_client._requests import Submission, build_request
from api_client._task_messages import pack_message, task_message
from tests.support.broker import held_jobs, process_id, settled
from tests.support.queue_events import QueueEvents
from tests.support.redis_server import RedisServer

PROCESS = "host-a:4242:0f1e2d3c"


@pytest.fixture
def broker(real_redis: RedisServer) -> Iterator[redis.Redis]:
    client = real_redis.client()
    client.flushall()
    client.zadd(WORKERS_KEY, {PROCESS: 1, "host-a:42:aaaaaaaa": 2})
    try:
        yield client
    finally:
        client.close()


def _message(job_id: str) -> bytes:
    return task_message(job_id, build_request(f"prompt of {job_id}", None, None, {}))


@pytest.mark.parametrize(
    "where",
    ["queue", "priority list", "taken list", "unacked hash"],
)
def test_settled_sees_a_message_in_each_place(broker: redis.Redis, where: str) -> None:
    assert settled(broker)
    if where == "queue":
        broker.lpush(QUEUE, _message("job-1"))
    elif where == "priority list":
        broker.lpush(PRIORITY_LISTS[0], _message("job-1"))
    elif where == "taken list":
        broker.lpush(taken_key(PROCESS), _message("job-1"))
    else:
        broker.hset(UNACKED_KEY, "tag-1", b"[]")

    assert not settled(broker)


def test_held_jobs_reads_the_held_hash_of_the_process_with_that_pid(
    broker: redis.Redis,
) -> None:
    pack = pack_message(
        "pack-1",
        [Submission(job_id, build_request(job_id, None, None, {})) for job_id in ("a", "b")],
    )
    broker.hset(held_key(PROCESS), mapping={"tag-1": _message("job-1"), "tag-2": pack})

    assert process_id(broker, 4242) == PROCESS
    assert sorted(held_jobs(broker, 4242)) == ["a", "b", "job-1"]
    assert held_jobs(broker, 42) == []  # registered, holding nothing
    assert held_jobs(broker, 424) == []  # not registered
    assert process_id(broker, 42) == "host-a:42:aaaaaaaa"  # a pid is matched whole
    assert process_id(broker, 2) is None


def test_queue_events_counts_pushes_and_takes_while_open(broker: redis.Redis) -> None:
    broker.lpush(QUEUE, _message("before"))  # before the block: not counted
    with QueueEvents(broker) as events:
        broker.eval("redis.call('LPUSH', KEYS[1], ARGV[1])", 1, QUEUE, _message("by a script"))
        broker.rpush(QUEUE, _message("given back"))
        broker.blmove(QUEUE, taken_key(PROCESS), 1, "RIGHT", "LEFT")  # a worker's take

        assert (events.pushes(), events.takes()) == (2, 1)
        assert (events.pushes(), events.takes()) == (2, 1)  # reading twice counts nothing twice
    assert broker.config_get("notify-keyspace-events")["notify-keyspace-events"] == ""
