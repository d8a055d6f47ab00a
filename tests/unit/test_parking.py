"""worker.fleet.parking: parked jobs come back to the queue when due, once, at the end taken nex."""

from __future__ import annotations

import time

import pytest
import redis

from api_client._constants import PARKED_KEY, QUEUE
from worker.fleet import parking as parking_module
from worker.fleet.parking import Parking, ParkingMover

WAIT_S = 10.0


def test_a_job_is_queued_only_once_due(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    parking.park(b"later", delay_s=30)
    parking.park(b"now", delay_s=0)

    moved = parking.move_due()
    assert moved.moved == 1
    assert moved.next_due_s == pytest.approx(30, abs=1)  # "later" is due in 30 s
    assert lua_redis.lrange(QUEUE, 0, -1) == [b"now"]
    assert lua_redis.zrange(PARKED_KEY, 0, -1) == [b"later"]
    assert parking.move_due().moved == 0  # nothing moves twice


def test_an_empty_parked_set_has_nothing_due(lua_redis: redis.Redis) -> None:
    assert Parking(lua_redis).move_due() == (0, None)


def test_due_jobs_go_where_workers_take_next(lua_redis: redis.Redis) -> None:
    """kombu takes from the right end (BRPOP): a due job overtakes the backlog."""
    lua_redis.lpush(QUEUE, b"backlog-1", b"backlog-2")
    parking = Parking(lua_redis)
    parking.park(b"due", delay_s=0)
    parking.move_due()

    assert lua_redis.rpop(QUEUE) == b"due"


def test_move_due_takes_at_most_its_limit(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    for n in range(5):
        parking.park(f"job-{n}".encode(), delay_s=0)

    assert parking.move_due(limit=3) == (3, 0.0)  # two more are due
    assert parking.move_due(limit=3) == (2, None)
    assert lua_redis.llen(QUEUE) == 5


def test_the_mover_requeues_a_job_when_it_is_due(lua_redis: redis.Redis) -> None:
    parking = Parking(lua_redis)
    mover = ParkingMover(parking, interval_s=0.01)
    mover.start()
    try:
        parked_at = time.monotonic()
        parking.park(b"soon", delay_s=0.3)
        deadline = parked_at + WAIT_S
        while lua_redis.llen(QUEUE) == 0:
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
        parking.park(b"now", delay_s=0)
        deadline = time.monotonic() + WAIT_S
        while lua_redis.llen(QUEUE) == 0:
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
