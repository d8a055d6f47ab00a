"""worker.fleet.custody: heartbeats; a dead worker process's messages back in the queue, once."""

from __future__ import annotations

import pytest
import redis

from api_client._constants import (
    PRIORITY_LISTS,
    QUEUE,
    RECOVERY_KEY,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    WORKERS_CLOCK_KEY,
    WORKERS_KEY,
)
from worker.fleet.custody import Heartbeat, ProcessCustody

TIMEOUT_S = 5.0


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _process(client: redis.Redis) -> tuple[ProcessCustody, Heartbeat]:
    custody = ProcessCustody()  # each with an id of its own, as if in processes of their own
    heartbeat = Heartbeat(client, custody, TIMEOUT_S)
    custody.register(client)
    return custody, heartbeat


def _silent(client: redis.Redis, custody: ProcessCustody, for_s: float) -> None:
    """Make ``custody``'s last beat ``for_s`` old, the fleet's clock still fresh."""
    now_ms = _now_ms(client)
    client.zadd(WORKERS_KEY, {custody.process_id: now_ms - int(for_s * 1000)})
    client.set(WORKERS_CLOCK_KEY, now_ms)


def _hold(client: redis.Redis, custody: ProcessCustody, tag: str, message: bytes) -> None:
    """A message delivered to ``custody`` and recorded as kombu does (CustodyQoS.append)."""
    client.hset(UNACKED_KEY, tag, b"[...]")
    client.zadd(UNACKED_INDEX_KEY, {tag: 1.0})
    client.hset(custody.held_key, tag, message)


def test_a_silent_process_is_recovered_by_a_live_one(lua_redis: redis.Redis) -> None:
    dead, _ = _process(lua_redis)
    _alive, heartbeat = _process(lua_redis)
    lua_redis.lpush(dead.taken_key, b"taken")
    _hold(lua_redis, dead, "tag-1", b"held, unacknowledged")
    lua_redis.hset(dead.held_key, "tag-2", b"held, acknowledged meanwhile")  # not in unacked
    _silent(lua_redis, dead, TIMEOUT_S + 1)

    assert heartbeat.beat() == [dead.process_id]

    assert sorted(lua_redis.lrange(QUEUE, 0, -1)) == [b"held, unacknowledged", b"taken"]
    assert lua_redis.hlen(UNACKED_KEY) == 0
    assert lua_redis.zcard(UNACKED_INDEX_KEY) == 0
    assert not lua_redis.exists(dead.taken_key, dead.held_key)
    assert lua_redis.zscore(WORKERS_KEY, dead.process_id) is None
    assert lua_redis.hgetall(RECOVERY_KEY) == {b"dead_workers": b"1", b"messages_returned": b"2"}


def test_returned_messages_are_taken_next(lua_redis: redis.Redis) -> None:
    dead, _ = _process(lua_redis)
    _alive, heartbeat = _process(lua_redis)
    lua_redis.lpush(QUEUE, b"backlog")
    lua_redis.lpush(dead.taken_key, b"taken")
    _silent(lua_redis, dead, TIMEOUT_S + 1)

    heartbeat.beat()

    assert lua_redis.rpop(QUEUE) == b"taken"  # workers take from the right


def test_a_process_within_its_timeout_is_left_alone(lua_redis: redis.Redis) -> None:
    quiet, _ = _process(lua_redis)
    _alive, heartbeat = _process(lua_redis)
    lua_redis.lpush(quiet.taken_key, b"taken")
    _silent(lua_redis, quiet, TIMEOUT_S - 1)

    assert heartbeat.beat() == []
    assert lua_redis.lrange(quiet.taken_key, 0, -1) == [b"taken"]


def test_a_dead_process_is_recovered_once(lua_redis: redis.Redis) -> None:
    dead, _ = _process(lua_redis)
    _one, first = _process(lua_redis)
    _other, second = _process(lua_redis)
    lua_redis.lpush(dead.taken_key, b"taken")
    _silent(lua_redis, dead, TIMEOUT_S + 1)

    assert first.beat() == [dead.process_id]
    assert second.beat() == []
    assert lua_redis.lrange(QUEUE, 0, -1) == [b"taken"]
    assert lua_redis.hget(RECOVERY_KEY, "dead_workers") == b"1"


def test_after_a_fleet_wide_silence_every_process_gets_a_fresh_timeout(
    lua_redis: redis.Redis,
) -> None:
    """Redis down (or every worker stopped) for longer than the timeout: nobody could beat, so
    nobody is presumed dead at once when beats resume."""
    others, _ = _process(lua_redis)
    _first, heartbeat = _process(lua_redis)
    lua_redis.lpush(others.taken_key, b"taken")
    long_ago = _now_ms(lua_redis) - int((TIMEOUT_S + 30) * 1000)
    lua_redis.zadd(WORKERS_KEY, {others.process_id: long_ago})
    lua_redis.set(WORKERS_CLOCK_KEY, long_ago)

    assert heartbeat.beat() == []
    assert lua_redis.lrange(others.taken_key, 0, -1) == [b"taken"]
    score = lua_redis.zscore(WORKERS_KEY, others.process_id)
    assert score is not None and score > long_ago


def test_a_process_presumed_dead_registers_again(
    lua_redis: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    custody, heartbeat = _process(lua_redis)
    heartbeat.beat()
    lua_redis.zrem(WORKERS_KEY, custody.process_id)  # recovered by another meanwhile

    heartbeat.beat()

    assert lua_redis.zscore(WORKERS_KEY, custody.process_id) is not None
    assert "presumed dead" in caplog.text


def test_leaving_returns_leftovers_without_counting_a_death(lua_redis: redis.Redis) -> None:
    custody, _ = _process(lua_redis)
    lua_redis.lpush(custody.taken_key, b"taken")

    assert custody.leave(lua_redis) == 1

    assert lua_redis.lrange(QUEUE, 0, -1) == [b"taken"]
    assert lua_redis.zscore(WORKERS_KEY, custody.process_id) is None
    assert not lua_redis.exists(RECOVERY_KEY)


def test_a_take_whose_reply_was_lost_is_returned_before_the_next(lua_redis: redis.Redis) -> None:
    custody, _ = _process(lua_redis)
    custody.before_take(lua_redis, block_s=0.0)
    lua_redis.lpush(custody.taken_key, b"taken by the lost take")  # its reply never came

    custody.before_take(lua_redis, block_s=0.0)

    assert lua_redis.lrange(QUEUE, 0, -1) == [b"taken by the lost take"]
    assert lua_redis.llen(custody.taken_key) == 0


def test_an_answered_take_leaves_the_list_alone(lua_redis: redis.Redis) -> None:
    custody, _ = _process(lua_redis)
    custody.before_take(lua_redis, block_s=0.0)
    custody.answered()
    lua_redis.lpush(custody.taken_key, b"being delivered")

    custody.before_take(lua_redis, block_s=0.0)

    assert lua_redis.llen(QUEUE) == 0


def test_the_first_take_registers_the_process(lua_redis: redis.Redis) -> None:
    custody = ProcessCustody()

    custody.before_take(lua_redis, block_s=1.0)

    assert lua_redis.zscore(WORKERS_KEY, custody.process_id) is not None


def test_messages_with_a_celery_priority_are_folded_into_the_queue(
    lua_redis: redis.Redis,
) -> None:
    _custody, heartbeat = _process(lua_redis)
    lua_redis.lpush(QUEUE, b"waiting")
    lua_redis.lpush(PRIORITY_LISTS[0], b"priority 3, first", b"priority 3, second")
    lua_redis.lpush(PRIORITY_LISTS[2], b"priority 9")

    heartbeat.beat()

    assert lua_redis.lrange(QUEUE, 0, -1) == [
        b"priority 9",
        b"priority 3, second",
        b"priority 3, first",
        b"waiting",
    ]
    assert not any(lua_redis.exists(key) for key in PRIORITY_LISTS)


def test_messages_the_process_dropped_go_back_before_its_next_take(
    lua_redis: redis.Redis,
) -> None:
    custody, _ = _process(lua_redis)
    _hold(lua_redis, custody, "dropped", b"a retry held until due")
    _hold(lua_redis, custody, "running", b"a call in flight")
    custody.settle_later(["dropped", "gone"], give_back=True)  # "gone": acknowledged meanwhile

    custody.before_take(lua_redis, block_s=0.0)

    assert lua_redis.lrange(QUEUE, 0, -1) == [b"a retry held until due"]
    assert lua_redis.hkeys(custody.held_key) == [b"running"]
    assert lua_redis.hkeys(UNACKED_KEY) == [b"running"]
    custody.before_take(lua_redis, block_s=0.0)
    assert lua_redis.llen(QUEUE) == 1  # once


def test_a_lost_acknowledgement_is_made_before_the_next_take(lua_redis: redis.Redis) -> None:
    custody, _ = _process(lua_redis)
    _hold(lua_redis, custody, "done", b"a job that has its outcome")

    custody.settle_later(["done"], give_back=False)
    custody.before_take(lua_redis, block_s=0.0)

    assert lua_redis.llen(QUEUE) == 0  # not run again
    assert lua_redis.hlen(custody.held_key) == 0
    assert lua_redis.hlen(UNACKED_KEY) == 0
    assert lua_redis.zcard(UNACKED_INDEX_KEY) == 0
