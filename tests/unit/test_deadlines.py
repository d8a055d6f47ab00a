"""worker.fleet.deadlines: the sweep that ends jobs waiting past their deadline, and its mover."""

from __future__ import annotations

import threading

import redis

from api_client._constants import (
    CONTROL_KEY,
    DEADLINES_KEY,
    OPEN_JOBS_KEY,
    request_key,
    result_key,
    state_key,
    tenant_jobs_key,
)
from api_client._schemas import ErrorKind, JobError, JobStatus, Outcome
from tests.support.waiting import wait_until
from worker.fleet.deadlines import SWEEP_BATCH, DeadlineSweep
from worker.fleet.parking import Parking, ParkingMover
from worker.fleet.scripts import redis_now_ms
from worker.fleet.store import JobStore

TTL_S = 60.0


def queued(r: redis.Redis, job_id: str, deadline_ms: int, tenant: str = "default") -> None:
    """A job as submit leaves it: its state, open-jobs entry, request copy, tenant and deadline
    entries."""
    r.set(state_key(job_id), JobStatus.QUEUED.value)
    r.zadd(OPEN_JOBS_KEY, {job_id: 1})
    r.hset(request_key(job_id), mapping={"task": "t", "request": "{}", "tenant": tenant})
    r.sadd(tenant_jobs_key(tenant), job_id)
    r.zadd(DEADLINES_KEY, {job_id: deadline_ms})


def error_of(r: redis.Redis, job_id: str) -> JobError | None:
    raw = r.get(result_key(job_id))
    if raw is None:
        return None
    outcome = Outcome.model_validate_json(raw)
    return outcome.error


def test_a_waiting_job_past_its_deadline_ends_and_leaves_every_index(
    lua_redis: redis.Redis,
) -> None:
    past = redis_now_ms(lua_redis) - 1000
    queued(lua_redis, "late", past, tenant="team-a")
    lua_redis.hset(request_key("late"), "failures", 2)

    assert DeadlineSweep(lua_redis, TTL_S).sweep() == (1, 1)

    error = error_of(lua_redis, "late")
    assert error is not None
    assert (error.kind, error.attempts) == (ErrorKind.DEADLINE_EXCEEDED, 2)
    assert lua_redis.exists(state_key("late"), request_key("late")) == 0
    assert lua_redis.zcard(OPEN_JOBS_KEY) == 0
    assert lua_redis.zcard(DEADLINES_KEY) == 0
    assert lua_redis.scard(tenant_jobs_key("team-a")) == 0
    assert lua_redis.hget(CONTROL_KEY, "deadline_exceeded") == b"1"
    assert 0 < lua_redis.pttl(result_key("late")) <= TTL_S * 1000


def test_running_finished_and_gone_jobs_only_leave_the_deadlines(lua_redis: redis.Redis) -> None:
    past = redis_now_ms(lua_redis) - 1000
    store = JobStore(lua_redis, TTL_S)
    queued(lua_redis, "running", past)
    store.begin(["running"])
    queued(lua_redis, "done", past)
    error = JobError(kind=ErrorKind.TIMEOUT, message="slow")
    lua_redis.set(
        result_key("done"), Outcome(status=JobStatus.FAILED, error=error).model_dump_json()
    )
    lua_redis.zadd(DEADLINES_KEY, {"gone": past})  # its keys expired

    assert DeadlineSweep(lua_redis, TTL_S).sweep() == (3, 0)

    assert lua_redis.zcard(DEADLINES_KEY) == 0
    assert lua_redis.get(state_key("running")) == b"running"  # its attempt decides
    done = error_of(lua_redis, "done")
    assert done is not None and done.kind is ErrorKind.TIMEOUT
    assert lua_redis.hget(CONTROL_KEY, "deadline_exceeded") is None


def test_a_job_before_its_deadline_is_left_alone(lua_redis: redis.Redis) -> None:
    queued(lua_redis, "in-time", redis_now_ms(lua_redis) + 60_000)

    assert DeadlineSweep(lua_redis, TTL_S).sweep() == (0, 0)

    assert lua_redis.get(state_key("in-time")) == b"queued"
    assert lua_redis.zcard(DEADLINES_KEY) == 1


def test_one_sweep_does_a_bounded_batch(lua_redis: redis.Redis) -> None:
    past = redis_now_ms(lua_redis) - 1000
    for i in range(7):
        queued(lua_redis, f"job-{i}", past + i)
    sweep = DeadlineSweep(lua_redis, TTL_S)

    assert sweep.sweep(limit=5) == (5, 5)
    assert sweep.sweep(limit=5) == (2, 2)  # the earliest deadlines went first
    assert lua_redis.exists(*(result_key(f"job-{i}") for i in range(7))) == 7
    assert SWEEP_BATCH == 500


def test_the_parking_mover_runs_the_sweep(lua_redis: redis.Redis) -> None:
    queued(lua_redis, "late", redis_now_ms(lua_redis) - 1000)
    expired: list[int] = []
    counted = threading.Event()

    def on_expired(count: int) -> None:
        expired.append(count)
        counted.set()

    mover = ParkingMover(
        Parking(lua_redis), sweep=DeadlineSweep(lua_redis, TTL_S), on_expired=on_expired
    )
    mover.start()
    try:
        wait_until(lambda: lua_redis.exists(result_key("late")), 10)
        assert counted.wait(10)
    finally:
        mover.stop()

    assert expired == [1]
    error = error_of(lua_redis, "late")
    assert error is not None and error.kind is ErrorKind.DEADLINE_EXCEEDED


def test_the_mover_sweeps_again_for_deadlines_that_pass_later(lua_redis: redis.Redis) -> None:
    queued(lua_redis, "soon", redis_now_ms(lua_redis) + 300)
    mover = ParkingMover(Parking(lua_redis), sweep=DeadlineSweep(lua_redis, TTL_S))
    mover.start()
    try:
        wait_until(lambda: lua_redis.exists(result_key("soon")), 10)
    finally:
        mover.stop()

    error = error_of(lua_redis, "soon")
    assert error is not None and error.kind is ErrorKind.DEADLINE_EXCEEDED
