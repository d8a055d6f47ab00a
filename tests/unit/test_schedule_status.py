"""worker.ops.schedule_status: the scheduler's figures in `promptq status`."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry

from api_client._constants import CONTROL_KEY
from api_client._schedule import LANE_NAMES_KEY, LANES_KEY, LUA_READY, Route, entry
from worker.fleet.parking import Parking
from worker.fleet.schedule import Scheduler
from worker.fleet.scripts import redis_now_ms
from worker.ops.metrics import MAX_TENANTS, Metrics, ScheduleCollector
from worker.ops.schedule_status import read_schedule, schedule_lines


def queue(client: redis.Redis, on: Route, cost: int = 1) -> None:
    """Queue a message of its own (each job's message differs) on ``on``."""
    script = LUA_READY + "ready_push(ARGV[1], ARGV[2], ARGV[3], ARGV[4], '') return 1"
    message = b"message %d" % client.incr("test:messages")
    client.eval(script, 0, *on.args(), entry(cost, message))


def test_status_counts_jobs_by_lane_priority_and_tenant(lua_redis: redis.Redis) -> None:
    lua_redis.hset(LANE_NAMES_KEY, "lane-a", "chat openai/gpt")
    batch_a = Route("lane-a", 2, "team-a", "chat openai/gpt")
    queue(lua_redis, batch_a, cost=16)  # a pack
    queue(lua_redis, batch_a, cost=4)
    queue(lua_redis, Route("lane-a", 0, "default", "chat openai/gpt"))
    Parking(lua_redis).park(Route("lane-a", 1, "team-b", ""), b"retry", delay_s=60, order=None)
    for _ in range(2):  # the interactive job, then the pack
        Scheduler(lua_redis).claim("promptq:worker:test:taken")
    lua_redis.zadd(LANES_KEY, {"lane-a": redis_now_ms(lua_redis) + 5_000})
    lua_redis.hset(CONTROL_KEY, mapping={"cancelled": 3})

    status = read_schedule(lua_redis)

    [lane] = status.lanes
    assert lane.name == "chat openai/gpt"
    assert lane.waiting == {"batch": {"team-a": 4}}
    assert lane.parked == {"default": {"team-b": 1}}
    assert lane.served_last_minute == {"default": 1, "team-a": 16}
    assert 4 < lane.opens_in_s <= 5
    assert status.ended == {"cancelled": 3}
    lines = dict(schedule_lines(status))
    assert lines["lane chat openai/gpt"].startswith("waiting batch 4 (team-a 4); parked default 1")
    assert "last minute 17 taken (default 6%, team-a 94%)" in lines["lane chat openai/gpt"]


def test_an_idle_scheduler_has_no_lanes(lua_redis: redis.Redis) -> None:
    status = read_schedule(lua_redis)
    assert status.lanes == [] and status.ended == {}


def test_metrics_export_the_schedule_by_label(lua_redis: redis.Redis) -> None:
    lua_redis.hset(LANE_NAMES_KEY, "lane-a", "chat m")
    queue(lua_redis, Route("lane-a", 2, "team-a", "chat m"), cost=3)
    lua_redis.hset(CONTROL_KEY, mapping={"deadline_exceeded": 2})
    registry = CollectorRegistry()
    registry.register(ScheduleCollector(lambda: read_schedule(lua_redis)))

    labels = {"lane": "chat m", "priority": "batch", "tenant": "team-a"}
    assert registry.get_sample_value("promptq_jobs_waiting", labels) == 3
    assert registry.get_sample_value("promptq_jobs_ended_early", {"how": "cancelled"}) == 0
    assert registry.get_sample_value("promptq_jobs_ended_early", {"how": "deadline_exceeded"}) == 2


def test_jobs_started_are_counted_by_priority_and_bounded_tenant() -> None:
    metrics = Metrics()
    metrics.job_started("interactive", "team-a")
    for n in range(MAX_TENANTS + 5):
        metrics.job_started("batch", f"t{n}")

    sample = metrics.registry.get_sample_value
    assert (
        sample("promptq_jobs_started_total", {"priority": "interactive", "tenant": "team-a"}) == 1
    )
    assert sample("promptq_jobs_started_total", {"priority": "batch", "tenant": "other"}) == 6


def test_a_job_put_back_does_not_count_as_served(lua_redis: redis.Redis) -> None:
    """The last minute's shares count jobs that went on to their call, not takes of jobs
    sent back to wait for their rate limit."""
    route = Route("lane-a", 1, "team-a", "chat m")
    queue(lua_redis, route)
    queue(lua_redis, route)
    scheduler = Scheduler(lua_redis)
    scheduler.claim("promptq:worker:test:taken")
    claimed = scheduler.claim("promptq:worker:test:taken")
    assert claimed is not None
    scheduler.put_back(route, claimed.message, cost=1, closed_s=0, order=claimed.order).run()

    [lane] = read_schedule(lua_redis).lanes
    assert lane.served_last_minute == {"team-a": 1}
