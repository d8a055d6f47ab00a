"""worker.fleet.parking: parked jobs come back to the scheduler when due, once, at their place."""

from __future__ import annotations

import time

import pytest
import redis

from api_client._constants import PARKED_KEY, QUEUE
from api_client._schedule import LANES_KEY, WAKE, Route, line_key, sched_key
from worker.fleet import parking as parking_module
from worker.fleet.parking import Parking, ParkingMover
from worker.fleet.schedule import Scheduler, queued_count

WAIT_S = 10.0
ROUTE = Route(lane="lane-a", rank=1, tenant="default", lane_name="chat test")


def taken_next(client: redis.Redis) -> bytes | None:
    """The message a worker would take next (and takes)."""
    claimed = Scheduler(client).claim("promptq:worker:test:taken")
    return None if claimed is None else claimed.message


def test_a_job_is_scheduled_only_once_due(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    parking.park(ROUTE, b"later", delay_s=30, order=None)
    parking.park(ROUTE, b"now", delay_s=0, order=None)

    moved = parking.move_due()
    assert moved.moved == 1
    assert moved.next_due_s == pytest.approx(30, abs=1)  # "later" is due in 30 s
    assert taken_next(lua_redis) == b"now"
    assert taken_next(lua_redis) is None
    assert lua_redis.zcard(PARKED_KEY) == 1
    assert parking.move_due().moved == 0  # nothing moves twice


def test_an_empty_parked_set_has_nothing_due(lua_redis: redis.Redis) -> None:
    assert Parking(lua_redis).move_due() == (0, None)


def test_a_due_job_wakes_a_worker(lua_redis: redis.Redis) -> None:
    """Idle workers block on the queue list: a job coming due pushes a wake-up there."""
    parking = Parking(lua_redis)
    parking.park(ROUTE, b"due", delay_s=0, order=None)
    parking.move_due()

    assert lua_redis.lrange(QUEUE, 0, -1) == [WAKE]
    assert queued_count(lua_redis) == 1  # the wake-up is not a message


def queue_at(client: redis.Redis, message: bytes, order: float) -> None:
    """Queue ``message`` in ROUTE's line at ``order``."""
    client.zadd(line_key(ROUTE.lane, ROUTE.rank, ROUTE.tenant), {b"1|" + message: order})
    client.zadd(sched_key(ROUTE.lane, ROUTE.rank), {ROUTE.tenant: 0})
    client.zadd(LANES_KEY, {ROUTE.lane: 0})


def test_a_due_job_goes_back_at_its_order_in_its_line(lua_redis: redis.Redis) -> None:
    """A retry coming due goes behind what its tenant queued before it, ahead of the rest."""
    queue_at(lua_redis, b"queued before", 3)
    queue_at(lua_redis, b"queued after", 5)
    parking = Parking(lua_redis)
    parking.park(ROUTE, b"due", delay_s=0, order=4)
    parking.move_due()

    taken = [taken_next(lua_redis) for _ in range(3)]
    assert taken == [b"queued before", b"due", b"queued after"]


def test_a_due_job_of_no_known_order_goes_first_in_its_line(lua_redis: redis.Redis) -> None:
    queue_at(lua_redis, b"queued", 1)
    parking = Parking(lua_redis)
    parking.park(ROUTE, b"due", delay_s=0, order=None)
    parking.move_due()

    assert [taken_next(lua_redis) for _ in range(2)] == [b"due", b"queued"]


def test_an_older_parked_message_goes_to_the_queue_list(lua_redis: redis.Redis) -> None:
    """A message parked by an older promptq (no route) is pushed where workers take next."""
    lua_redis.lpush(QUEUE, b"backlog")
    lua_redis.zadd(PARKED_KEY, {b'{"old": 1}': 0})
    Parking(lua_redis).move_due()

    assert lua_redis.rpop(QUEUE) == b'{"old": 1}'


def test_move_due_takes_at_most_its_limit(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    for n in range(5):
        parking.park(ROUTE, f"job-{n}".encode(), delay_s=0, order=None)

    assert parking.move_due(limit=3) == (3, 0.0)  # two more are due
    assert parking.move_due(limit=3) == (2, None)
    assert queued_count(lua_redis) == 5


def test_the_mover_requeues_a_job_when_it_is_due(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    mover = ParkingMover(parking, interval_s=0.01)
    mover.start()
    try:
        parked_at = time.monotonic()
        parking.park(ROUTE, b"soon", delay_s=0.3, order=None)
        deadline = parked_at + WAIT_S
        while queued_count(lua_redis) == 0:
            assert time.monotonic() < deadline, "the parked job never came back"
            time.sleep(0.01)
        assert time.monotonic() - parked_at >= 0.3 - 0.01  # Redis time is in milliseconds
    finally:
        mover.stop()
    assert lua_redis.zcard(PARKED_KEY) == 0


def test_parking_a_job_wakes_the_mover_at_once(
    lua_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle mover looks again only after IDLE_CHECK_S, unless its own process parks."""
    monkeypatch.setattr(parking_module, "IDLE_CHECK_S", 600.0)
    parking = Parking(lua_redis)
    mover = ParkingMover(parking, interval_s=0.01)
    mover.start()
    try:
        wait_for_idle = parking.move_due()  # nothing parked: the mover sleeps 600 s
        assert wait_for_idle == (0, None)
        parking.park(ROUTE, b"now", delay_s=0, order=None)
        deadline = time.monotonic() + WAIT_S
        while queued_count(lua_redis) == 0:
            assert time.monotonic() < deadline, "the mover slept through the park"
            time.sleep(0.01)
    finally:
        mover.stop()


def test_the_mover_survives_redis_errors(caplog: pytest.LogCaptureFixture) -> None:
    broken = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    mover = ParkingMover(Parking(broken), interval_s=0.01)
    mover.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while "cannot move parked jobs" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        mover.stop()
    assert caplog.text.count("cannot move parked jobs") == 1  # once per outage


def test_jobs_coming_due_together_keep_their_order(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    for n in (2, 0, 1):  # parked out of order, and all due at once
        parking.park(ROUTE, f"job-{n}".encode(), delay_s=0, order=n)
    parking.move_due()

    assert [taken_next(lua_redis) for _ in range(3)] == [b"job-0", b"job-1", b"job-2"]


def test_jobs_an_older_promptq_parked_come_back_first_in_due_order(
    lua_redis: redis.Redis,
) -> None:
    queue_at(lua_redis, b"queued", 1)
    for n in range(3):
        lua_redis.zadd(PARKED_KEY, {b"R|lane-a|1|default|1|" + f"job-{n}".encode(): n})
    Parking(lua_redis).move_due()

    taken = [taken_next(lua_redis) for _ in range(4)]
    assert taken == [b"job-0", b"job-1", b"job-2", b"queued"]
