"""worker.fleet.schedule and api_client._schedule: the order in which workers take jobs."""

from __future__ import annotations

import json
from collections import Counter

import redis

from api_client import Priority
from api_client._constants import PARKED_KEY, QUEUE
from api_client._publish import enqueue
from api_client._requests import Submission, build_request
from api_client._schedule import (
    LANE_NAMES_KEY,
    LANES_KEY,
    LUA_READY,
    WAITING_KEY,
    WAKE,
    WAKE_CAP,
    Route,
    entry,
    route_of,
)
from tests.support.broker import take_all
from worker.fleet.schedule import Claimed, Scheduler, queued_count
from worker.fleet.scripts import redis_now_ms

TAKEN = "promptq:worker:test:taken"


def route(tenant: str = "default", rank: int = 1, lane: str = "lane-a") -> Route:
    return Route(lane=lane, rank=rank, tenant=tenant, lane_name=f"chat {lane}")


def queue(client: redis.Redis, on: Route, message: str, cost: int = 1) -> None:
    """Queue a message as the client's publish does (at the end of its line, with a wake-up)."""
    script = LUA_READY + "ready_push(ARGV[1], ARGV[2], ARGV[3], ARGV[4], '') wake() return 1"
    client.eval(script, 0, *on.args(), entry(cost, message.encode()))


def claim(client: redis.Redis, count: int = 1) -> list[Claimed]:
    """Take up to ``count`` jobs as workers would, with their orders."""
    scheduler, taken = Scheduler(client), []
    for _ in range(count):
        claimed = scheduler.claim(TAKEN)
        if claimed is None:
            break
        taken.append(claimed)
    return taken


def take(client: redis.Redis, count: int = 1) -> list[str]:
    """Take up to ``count`` jobs as workers would; their messages."""
    return [claimed.message.decode() for claimed in claim(client, count)]


def test_a_higher_priority_is_taken_first_whatever_was_queued_before(
    lua_redis: redis.Redis,
) -> None:
    for n in range(3):
        queue(lua_redis, route(rank=2), f"batch-{n}")
    queue(lua_redis, route(rank=1), "default")
    queue(lua_redis, route(rank=0), "interactive")

    assert take(lua_redis, 6) == ["interactive", "default", "batch-0", "batch-1", "batch-2"]
    assert lua_redis.llen(TAKEN) == 5  # each take lands in the process's custody


def test_tenants_share_by_weight_while_both_wait(lua_redis: redis.Redis) -> None:
    lua_redis.hset("promptq:tenant_weights", mapping={"a": 2})
    for n in range(40):
        queue(lua_redis, route("a"), f"a-{n}")
        queue(lua_redis, route("b"), f"b-{n}")

    served = Counter(message.split("-")[0] for message in take(lua_redis, 30))
    assert served == {"a": 20, "b": 10}
    assert take(lua_redis, 1)[0].split("-")[0] in ("a", "b")


def test_each_tenant_is_first_in_first_out(lua_redis: redis.Redis) -> None:
    for n in range(3):
        queue(lua_redis, route("a"), f"a-{n}")
        queue(lua_redis, route("b"), f"b-{n}")

    taken = take(lua_redis, 6)
    assert [m for m in taken if m.startswith("a")] == ["a-0", "a-1", "a-2"]
    assert [m for m in taken if m.startswith("b")] == ["b-0", "b-1", "b-2"]


def test_a_tenant_arriving_late_is_served_at_once_and_banks_no_credit(
    lua_redis: redis.Redis,
) -> None:
    for n in range(100):
        queue(lua_redis, route("big"), f"big-{n}")
    assert len(take(lua_redis, 50)) == 50  # "small" was idle meanwhile
    for n in range(10):
        queue(lua_redis, route("small"), f"small-{n}")

    next_ten = [m.split("-")[0] for m in take(lua_redis, 10)]
    assert Counter(next_ten) == {"big": 5, "small": 5}  # neither starved nor owed 50


def test_a_tenant_that_was_idle_neither_jumps_nor_loses_its_place(lua_redis: redis.Redis) -> None:
    queue(lua_redis, route("a"), "a-0")
    queue(lua_redis, route("b"), "b-0")
    assert take(lua_redis, 2) == ["a-0", "b-0"]
    for n in range(1, 3):
        queue(lua_redis, route("b"), f"b-{n}")
        queue(lua_redis, route("a"), f"a-{n}")

    assert Counter(m[0] for m in take(lua_redis, 2)) == {"a": 1, "b": 1}


def test_a_closed_lane_is_skipped_and_taken_from_once_open(lua_redis: redis.Redis) -> None:
    queue(lua_redis, route(lane="slow", rank=0), "slow-interactive")
    queue(lua_redis, route(lane="fast", rank=2), "fast-batch")
    lua_redis.zadd(LANES_KEY, {"slow": redis_now_ms(lua_redis) + 60_000})

    assert take(lua_redis, 2) == ["fast-batch"]  # the interactive job's lane is closed
    lua_redis.zadd(LANES_KEY, {"slow": 0})
    assert take(lua_redis) == ["slow-interactive"]
    assert lua_redis.zcard(LANES_KEY) == 0  # no lane has jobs left


def test_a_message_pushed_on_the_queue_list_ranks_as_default(lua_redis: redis.Redis) -> None:
    """A Celery client's message, or one a dead worker held, waits on the queue list."""
    queue(lua_redis, route(rank=2), "batch")
    queue(lua_redis, route(rank=1), "default")
    queue(lua_redis, route(rank=0), "interactive")
    lua_redis.lpush(QUEUE, b"pushed")  # (among the wake-ups the queueing pushed)

    assert take(lua_redis, 5) == ["interactive", "pushed", "default", "batch"]
    assert lua_redis.llen(QUEUE) < WAKE_CAP and set(lua_redis.lrange(QUEUE, 0, -1)) <= {WAKE}


def test_wake_ups_are_capped_and_are_not_messages(lua_redis: redis.Redis) -> None:
    for n in range(WAKE_CAP * 3):
        queue(lua_redis, route(), f"job-{n}")

    assert lua_redis.lrange(QUEUE, 0, -1) == [WAKE] * WAKE_CAP
    assert queued_count(lua_redis) == WAKE_CAP * 3


def test_a_claim_removes_the_wake_up_that_woke_it(lua_redis: redis.Redis) -> None:
    queue(lua_redis, route(), "job")
    lua_redis.lmove(QUEUE, TAKEN, "RIGHT", "LEFT")  # the blocking take a wake-up ends

    assert Scheduler(lua_redis).claim(TAKEN, drop_wake=True) == Claimed(b"job", 1)
    assert lua_redis.lrange(TAKEN, 0, -1) == [b"job"]


def test_nothing_to_take_is_none(lua_redis: redis.Redis) -> None:
    assert Scheduler(lua_redis).claim(TAKEN) is None
    lua_redis.lpush(QUEUE, WAKE, WAKE)
    assert Scheduler(lua_redis).claim(TAKEN) is None
    assert lua_redis.llen(QUEUE) == 0  # wake-ups found on the way are spent


def test_a_job_put_back_goes_first_and_its_lane_closes_until_a_slot_is_near(
    lua_redis: redis.Redis,
) -> None:
    for n in range(2):
        queue(lua_redis, route("a"), f"a-{n}")
        queue(lua_redis, route("b"), f"b-{n}")
    [(message, order)] = claim(lua_redis)
    first = message.decode()
    scheduler = Scheduler(lua_redis)

    scheduler.put_back(route(first[0]), message, cost=1, closed_s=5, order=order).run()

    opens_at = lua_redis.zscore(LANES_KEY, "lane-a")
    assert opens_at is not None and 4_000 < opens_at - redis_now_ms(lua_redis) <= 5_000
    assert lua_redis.zscore(PARKED_KEY, b"W|lane-a") == opens_at  # a worker comes back then
    assert take(lua_redis) == []  # closed meanwhile
    lua_redis.zadd(LANES_KEY, {"lane-a": 0})
    assert take(lua_redis) == [first]  # first again: its pass was given back


def test_a_lane_put_back_with_no_wait_stays_open(lua_redis: redis.Redis) -> None:
    queue(lua_redis, route(), "job")
    [(job, order)] = claim(lua_redis)

    Scheduler(lua_redis).put_back(route(), job, cost=1, closed_s=0, order=order).run()

    assert lua_redis.zcard(PARKED_KEY) == 0 and take(lua_redis) == ["job"]


def test_jobs_put_back_in_any_order_are_taken_again_in_the_order_queued(
    lua_redis: redis.Redis,
) -> None:
    """Workers put jobs back at the same time, in no particular order: each goes back to its
    place, ahead of what was queued after it."""
    for n in range(6):
        queue(lua_redis, route(), f"job-{n}")
    taken = claim(lua_redis, 4)
    scheduler = Scheduler(lua_redis)
    for message, order in (taken[2], taken[0], taken[3], taken[1]):
        scheduler.put_back(route(), message, cost=1, closed_s=0, order=order).run()

    assert take(lua_redis, 7) == [f"job-{n}" for n in range(6)]


def test_a_job_put_back_whose_order_is_not_known_goes_first(lua_redis: redis.Redis) -> None:
    """A message pushed on the queue list has no place in a line: it goes ahead of it."""
    queue(lua_redis, route(), "queued")
    lua_redis.lpush(QUEUE, b"pushed")
    [pushed] = claim(lua_redis)
    assert pushed == Claimed(b"pushed", None)

    Scheduler(lua_redis).put_back(route(), b"pushed", cost=1, closed_s=0, order=None).run()

    assert take(lua_redis, 3) == ["pushed", "queued"]


def test_the_client_queues_each_job_on_its_route(lua_redis: redis.Redis) -> None:
    """submit_many's batch packs wait below a later interactive submit; tenants apart."""
    pipe = lua_redis.pipeline(transaction=False)
    batch = [
        Submission(
            f"b{n}",
            build_request(f"b{n}", None, None, {}).model_copy(
                update={"priority": Priority.BATCH, "tenant": "team-a"}
            ),
            packable=True,
        )
        for n in range(4)
    ]
    agent = Submission(
        "agent",
        build_request("hi", None, None, {}).model_copy(update={"priority": Priority.INTERACTIVE}),
    )
    enqueue(pipe, [*batch, agent], ttl_s=60, pack_size=2)
    pipe.execute()

    taken = [json.loads(message)["headers"]["id"] for message in take_all(lua_redis)]
    assert taken[0] == "agent" and len(taken) == 3  # then the two packs of the batch
    assert lua_redis.hget(LANE_NAMES_KEY, route_of(agent.request).lane) == b"chat (default model)"


def test_a_tenant_whose_jobs_all_went_back_keeps_its_share(lua_redis: redis.Redis) -> None:
    """Jobs taken and put back (no slot for them yet) leave their tenant's pass where it was,
    even when every job of the tenant was out meanwhile: it was never idle, so it does not
    restart at the clock the others pushed on. Each round, workers take every job waiting,
    one gets the rate limit's slot and the others go back."""
    lua_redis.hset("promptq:tenant_weights", mapping={"a": 2})
    scheduler = Scheduler(lua_redis)
    for n in range(3):
        queue(lua_redis, route("a"), f"a-{n}")
        queue(lua_redis, route("b"), f"b-{n}")
    ran: Counter[str] = Counter()
    for round_ in range(30):
        (first, _), *others = claim(lua_redis, 6)
        tenant = chr(first[0])
        ran[tenant] += 1
        for job, order in others:
            scheduler.put_back(route(chr(job[0])), job, cost=1, closed_s=0, order=order).run()
        queue(lua_redis, route(tenant), f"{tenant}-{round_ + 3}")  # its tenant queues more
    assert ran == {"a": 20, "b": 10}


def test_a_pack_taken_in_a_lane_whose_packs_are_split_is_not_charged_whole(
    lua_redis: redis.Redis,
) -> None:
    """Under a rate limit a worker splits the packs it takes: the tenant is charged for each
    job when it is taken alone, not for the pack at once (which would let the other tenant
    run ahead while the pack's jobs come back)."""
    scheduler = Scheduler(lua_redis)
    queue(lua_redis, route("a"), "pack-before", cost=16)
    queue(lua_redis, route("a"), "pack-after", cost=16)
    assert take(lua_redis) == ["pack-before"]
    assert lua_redis.zscore("promptq:sched:lane-a:1", "a") == 16  # charged whole

    assert scheduler.split_lane("lane-a") is False  # first marked now
    assert take(lua_redis) == ["pack-after"]
    assert lua_redis.hget("promptq:passes:lane-a:1", "a") == b"16"  # not charged again
    assert scheduler.split_lane("lane-a") is True


def test_jobs_an_older_promptq_queued_are_taken_in_their_order(lua_redis: redis.Redis) -> None:
    """Before jobs had orders, lines were lists taken from the right; a worker starting moves
    them into today's lines, in order, their counts unchanged."""
    older = "promptq:ready:lane-a:1:default"
    lua_redis.lpush(older, b"1|first", b"1|second")
    lua_redis.zadd("promptq:sched:lane-a:1", {"default": 0})
    lua_redis.zadd(LANES_KEY, {"lane-a": 0})
    lua_redis.hset(WAITING_KEY, "lane-a|1|default", 2)
    queue(lua_redis, route(), "queued since")

    assert Scheduler(lua_redis).adopt_older_lines() == 2
    assert Scheduler(lua_redis).adopt_older_lines() == 0
    assert lua_redis.hget(WAITING_KEY, "lane-a|1|default") == b"3"
    assert take(lua_redis, 4) == ["queued since", "first", "second"]
