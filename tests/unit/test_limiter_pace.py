"""The rate limiter's pace (worker.fleet.limiter): backing off on 429s fleet-wide, under a
declared or a stated limit or none, climbing back along its curve while in use, slow start."""

from __future__ import annotations

import pytest
import redis

from worker.fleet.limiter import Deployment, RateLimiter
from worker.fleet.limiter_scripts import (
    BACKOFF_FACTOR,
    BACKOFF_MIN_CALLS,
    EDGE_BACKOFF_FACTOR,
    RECOVERY_S,
    SLOW_START_GROWTH,
)
from worker.fleet.limiter_status import read_limiters

KEY = "sk-limiter-pace-secret-0123456789"
START_RPM = 60.0


def limiter(lua_redis: redis.Redis, *, start_rpm: float = 0.0) -> RateLimiter:
    return RateLimiter(lua_redis, max_ahead_s=60.0, adaptive=True, start_rpm=start_rpm)


def deployment(rpm: int | None = None, tpm: int | None = None) -> Deployment:
    return Deployment.of("openai/m", "http://127.0.0.1:9/v1", KEY, rpm=rpm, tpm=tpm, burst_s=0)


def field(lua_redis: redis.Redis, target: Deployment, name: str) -> float:
    return float(lua_redis.hget(target.redis_key, name) or 0)


def answered(
    lua_redis: redis.Redis, target: Deployment, *, this_second: int, last_second: int = 0
) -> None:
    """The provider admitted this many calls this second and the last (as counted by the
    limiter's own answers), to calls the fleet sent at its pace: it has kept its pace busy
    for long, and its answers come at once."""
    seconds, _ = lua_redis.time()
    mapping: dict[str | bytes, int] = {
        "sec": seconds,
        "ok1": this_second,
        "prev_ok1": last_second,
        "busy_since": (seconds - 60) * 1_000_000,
        "answer_lag": 0,
    }
    lua_redis.hset(target.redis_key, mapping=mapping)  # type: ignore[arg-type]


def refused(rl: RateLimiter, target: Deployment, *, granted_us: int = 0) -> None:
    rl.record(
        target, reserved_tokens=0, charged_tokens=0, outcome="rate_limited", granted_us=granted_us
    ).run()


def ok(rl: RateLimiter, target: Deployment, headers: dict[str, str] | None = None) -> None:
    rl.record(target, reserved_tokens=0, charged_tokens=0, outcome="ok", headers=headers).run()


def use_for(rl: RateLimiter, lua_redis: redis.Redis, target: Deployment, seconds: int) -> None:
    """The fleet keeps calls waiting for the pace's slots for ``seconds`` (each of which the
    pace's clock is moved back, as Redis's own would have moved), one answer each."""
    for _ in range(seconds):
        rl.acquire(target, tokens=0).run()  # the next slot is ahead: the pace is in use
        lua_redis.hset(target.redis_key, "grow_at", field(lua_redis, target, "grow_at") - 1_000_000)
        ok(rl, target)


def rpm_now(rl: RateLimiter, target: Deployment) -> float:
    return rl.acquire(target, tokens=0).run().rpm


def test_429s_below_a_declared_limit_back_the_whole_fleet_off(lua_redis: redis.Redis) -> None:
    """A declared limit is an upper bound: a 429 at it lowers the pace of every worker a
    little; a 429 below the pace that set, to a fraction of what the provider admitted over
    the last second."""
    one, other, target = limiter(lua_redis), limiter(lua_redis), deployment(rpm=6000)
    assert rpm_now(one, target) == 6000
    refused(one, target)
    assert rpm_now(other, target) == pytest.approx(6000 * EDGE_BACKOFF_FACTOR, abs=1)

    answered(lua_redis, target, this_second=10, last_second=10)  # 600 to 1,200 a minute
    refused(other, target, granted_us=other.acquire(target, tokens=0).run().granted_us)
    pace = rpm_now(one, target)
    assert 600 * BACKOFF_FACTOR <= pace <= 1200 * BACKOFF_FACTOR
    assert read_limiters(lua_redis)[0].rpm_source == "paced after 429s"


def test_answers_that_lag_the_pace_are_not_read_as_the_rate_admitted(
    lua_redis: redis.Redis,
) -> None:
    """A fleet that has just begun to keep its pace busy has answers for only part of the last
    second: it backs off from its pace instead."""
    rl, target = limiter(lua_redis), deployment(rpm=1200)
    assert rpm_now(rl, target) == 1200
    refused(rl, target)
    backed_off = rpm_now(rl, target)
    answered(lua_redis, target, this_second=5)  # 300 a minute, but ...
    seconds, micros = lua_redis.time()
    lua_redis.hset(target.redis_key, "busy_since", seconds * 1_000_000 + micros)  # ... busy now
    refused(rl, target, granted_us=rl.acquire(target, tokens=0).run().granted_us)
    assert rpm_now(rl, target) == pytest.approx(backed_off * BACKOFF_FACTOR, abs=1)


def test_the_pace_is_busy_from_the_first_call_after_an_idle_spell(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=600)
    rl.acquire(target, tokens=0).run()
    since = field(lua_redis, target, "busy_since")
    rl.acquire(target, tokens=0).run()  # the slot before it was taken: still busy
    assert field(lua_redis, target, "busy_since") == since
    lua_redis.hset(target.redis_key, "r_tat", since - 1_000_000)  # no call for a second
    rl.acquire(target, tokens=0).run()
    assert field(lua_redis, target, "busy_since") > since


def test_the_pace_never_starts_above_the_declared_limit(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=600)
    assert rpm_now(rl, target) == 600
    answered(lua_redis, target, this_second=40, last_second=40)  # more than 600 a minute
    refused(rl, target)
    assert rpm_now(rl, target) == pytest.approx(600 * EDGE_BACKOFF_FACTOR, abs=1)


def test_429s_for_calls_granted_before_a_backoff_do_not_back_off_again(
    lua_redis: redis.Redis,
) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=600)
    before = rl.acquire(target, tokens=0).run()
    answered(lua_redis, target, this_second=40, last_second=40)
    refused(rl, target, granted_us=before.granted_us)
    backed_off = rpm_now(rl, target)

    refused(rl, target, granted_us=before.granted_us)  # sent at the old pace
    assert rpm_now(rl, target) == backed_off

    after = rl.acquire(target, tokens=0).run()  # a slot at the new pace: still too fast
    refused(rl, target, granted_us=after.granted_us)  # no longer at the limit: a full backoff
    assert rpm_now(rl, target) == pytest.approx(backed_off * BACKOFF_FACTOR, abs=1)  # whole rpm


def test_a_429_without_its_grant_time_backs_off_once_per_settling_spell(
    lua_redis: redis.Redis,
) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=600)
    assert rpm_now(rl, target) == 600
    refused(rl, target)
    backed_off = rpm_now(rl, target)
    refused(rl, target)
    assert backed_off == pytest.approx(600 * EDGE_BACKOFF_FACTOR, abs=1)
    assert rpm_now(rl, target) == backed_off


def test_the_pace_climbs_back_while_in_use_and_gives_way_to_the_limit(
    lua_redis: redis.Redis,
) -> None:
    """Back to the rate it backed off from after RECOVERY_S of use, beyond it after that,
    faster and faster, until the declared limit takes over again."""
    rl, target = limiter(lua_redis), deployment(rpm=1200)
    assert rpm_now(rl, target) == 1200
    refused(rl, target)  # at the limit: a gentle backoff to EDGE_BACKOFF_FACTOR of it
    answered(lua_redis, target, this_second=10)
    refused(rl, target, granted_us=rl.acquire(target, tokens=0).run().granted_us)
    assert rpm_now(rl, target) == pytest.approx(600 * BACKOFF_FACTOR, abs=1)  # 600 admitted

    use_for(rl, lua_redis, target, int(RECOVERY_S) // 2)
    halfway = rpm_now(rl, target)
    assert 600 * BACKOFF_FACTOR < halfway < 600
    use_for(rl, lua_redis, target, int(RECOVERY_S) - int(RECOVERY_S) // 2)
    assert rpm_now(rl, target) == pytest.approx(600, abs=1)

    use_for(rl, lua_redis, target, int(RECOVERY_S))  # then above it
    assert 600 < rpm_now(rl, target) < 1200
    use_for(rl, lua_redis, target, 4 * int(RECOVERY_S))
    assert rpm_now(rl, target) == 1200
    assert read_limiters(lua_redis)[0].rpm_source == "configured"


def test_a_gentle_backoff_at_the_limit_climbs_back_sooner(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=1200)
    assert rpm_now(rl, target) == 1200
    answered(lua_redis, target, this_second=10)  # not read: at its limit, the fleet sent 1,200
    refused(rl, target)
    assert rpm_now(rl, target) == pytest.approx(1200 * EDGE_BACKOFF_FACTOR, abs=1)
    back_s = RECOVERY_S * ((1 - EDGE_BACKOFF_FACTOR) / (1 - BACKOFF_FACTOR)) ** (1 / 3)
    use_for(rl, lua_redis, target, round(back_s) - 1)
    assert rpm_now(rl, target) < 1199
    use_for(rl, lua_redis, target, 1)
    assert rpm_now(rl, target) == pytest.approx(1200, abs=1)


def test_a_pace_not_in_use_does_not_climb(lua_redis: redis.Redis) -> None:
    """Answers while the fleet sends below its pace say nothing about a faster rate."""
    rl, target = limiter(lua_redis), deployment(rpm=1200)
    assert rpm_now(rl, target) == 1200
    refused(rl, target)
    backed_off = rpm_now(rl, target)
    assert backed_off == pytest.approx(1200 * EDGE_BACKOFF_FACTOR, abs=1)
    lua_redis.hset(target.redis_key, "r_tat", 0)  # no call waits for a slot
    for _ in range(5):
        lua_redis.hset(target.redis_key, "grow_at", field(lua_redis, target, "grow_at") - 10**6)
        ok(rl, target)
    assert rpm_now(rl, target) == backed_off


def test_a_429_below_a_limit_stated_in_headers_backs_off_too(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment()
    ok(rl, target, headers={"x-ratelimit-limit-requests": "1200"})
    assert rpm_now(rl, target) == 1200
    answered(lua_redis, target, this_second=10, last_second=10)
    refused(rl, target)
    assert rpm_now(rl, target) <= 1200 * EDGE_BACKOFF_FACTOR


def test_without_any_limit_a_429_paces_from_the_calls_sent(lua_redis: redis.Redis) -> None:
    """No limit, no slow start, too few answers to read a rate from: the calls sent over the
    last minute say the rate."""
    rl, target = limiter(lua_redis), deployment()
    for _ in range(30):
        rl.acquire(target, tokens=0).run()
    refused(rl, target)
    # 30 calls within (at most) the first second: a rate of 1,800 a minute, backed off.
    assert rpm_now(rl, target) == pytest.approx(1800 * EDGE_BACKOFF_FACTOR, rel=0.05)


def test_a_429_after_too_few_calls_only_pauses(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment()
    for _ in range(BACKOFF_MIN_CALLS - 1):
        rl.acquire(target, tokens=0).run()
    rl.record(
        target, reserved_tokens=0, charged_tokens=0, outcome="rate_limited", retry_after_s=1
    ).run()
    grant = rl.acquire(target, tokens=0).run()
    assert grant.rpm == 0
    assert grant.wait_s == pytest.approx(1.0, abs=0.25)


def test_slow_start_paces_a_fresh_deployment_with_no_limit_known(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis, start_rpm=START_RPM), deployment()
    waits = [rl.acquire(target, tokens=0).run().wait_s for _ in range(3)]
    assert waits == pytest.approx([0.0, 1.0, 2.0], abs=0.25)  # a call a second
    assert read_limiters(lua_redis)[0].rpm_source == "slow start"

    use_for(rl, lua_redis, target, 2)
    assert rpm_now(rl, target) == pytest.approx(START_RPM * SLOW_START_GROWTH**2, rel=0.01)


def test_slow_start_ends_at_the_limit_the_headers_state(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis, start_rpm=START_RPM), deployment()
    rl.acquire(target, tokens=0).run()
    ok(rl, target, headers={"x-ratelimit-limit-requests": "600"})
    assert rpm_now(rl, target) == START_RPM  # stated, but not tried yet

    use_for(rl, lua_redis, target, 3)
    assert rpm_now(rl, target) == 600
    assert read_limiters(lua_redis)[0].rpm_source == "headers"


def test_slow_start_ends_at_the_first_429_below_the_pace_it_reached(
    lua_redis: redis.Redis,
) -> None:
    """Backed off from its pace, not from the answers of the last second, which lag it."""
    rl, target = limiter(lua_redis, start_rpm=START_RPM), deployment()
    use_for(rl, lua_redis, target, 2)
    reached = field(lua_redis, target, "pace")
    assert reached == pytest.approx(START_RPM * SLOW_START_GROWTH**2, rel=0.05)
    answered(lua_redis, target, this_second=8)  # 480 a minute: slow start had just grown
    refused(rl, target)
    assert rpm_now(rl, target) == pytest.approx(reached * BACKOFF_FACTOR, rel=0.01)
    assert read_limiters(lua_redis)[0].rpm_source == "paced after 429s"


@pytest.mark.parametrize("limits", [{"rpm": 600}, {"tpm": 60000}], ids=["rpm", "tpm"])
def test_no_slow_start_under_a_declared_limit(
    lua_redis: redis.Redis, limits: dict[str, int]
) -> None:
    rl, target = limiter(lua_redis, start_rpm=START_RPM), deployment(**limits)
    assert rpm_now(rl, target) == limits.get("rpm", 0)


def test_without_adaptive_there_is_no_pace(lua_redis: redis.Redis) -> None:
    rl = RateLimiter(lua_redis, max_ahead_s=60.0, adaptive=False, start_rpm=START_RPM)
    target = deployment(rpm=600)
    assert rpm_now(rl, target) == 600
    refused(rl, target)
    assert rpm_now(rl, target) == 600
    assert rpm_now(rl, deployment()) == 0  # no slow start either


def test_a_state_backed_off_by_an_earlier_version_keeps_its_rate_as_the_pace(
    lua_redis: redis.Redis,
) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=1200)
    lua_redis.hset(target.redis_key, mapping={"rpm_learned": 450, "rpm_source": "429"})
    assert rpm_now(rl, target) == 450
    assert read_limiters(lua_redis)[0].rpm_source == "paced after 429s"


def test_a_call_leaves_when_its_slot_comes_if_nothing_changed(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=600)
    grant = rl.acquire(target, tokens=0).run()
    assert rl.departure(target, grant.granted_us, grant.wait_s).run() == 0


def test_a_pause_since_its_grant_holds_a_call_at_departure(lua_redis: redis.Redis) -> None:
    """Paced at departure: a Retry-After that came while a call waited for its slot."""
    rl, target = limiter(lua_redis), deployment(rpm=600)
    grant = rl.acquire(target, tokens=0).run()
    rl.record(
        target, reserved_tokens=0, charged_tokens=0, outcome="rate_limited", retry_after_s=0.3
    ).run()
    assert rl.departure(target, grant.granted_us, grant.wait_s).run() == pytest.approx(0.3, abs=0.1)


def test_a_backoff_since_its_grant_stretches_the_reserved_slots_to_the_new_pace(
    lua_redis: redis.Redis,
) -> None:
    """Slots granted before a backoff were spaced at the old pace: they stretch to the new one,
    in order, and the next slot granted follows them."""
    rl, target = limiter(lua_redis), deployment(rpm=600)
    grants = [rl.acquire(target, tokens=0).run() for _ in range(3)]  # at 0, 0.1 and 0.2 s
    refused(rl, target, granted_us=grants[0].granted_us)
    after = rl.acquire(target, tokens=0).run()
    stretch = 600 / after.rpm
    assert stretch > 1
    waits = [rl.departure(target, g.granted_us, g.wait_s).run() for g in grants[1:]]
    assert waits == pytest.approx([0.1 * stretch, 0.2 * stretch], abs=0.02)
    assert after.wait_s == pytest.approx(0.3 * stretch, abs=0.02)
    assert rl.departure(target, after.granted_us, after.wait_s).run() == pytest.approx(
        after.wait_s, abs=0.02
    )


def test_a_pause_since_its_grant_moves_the_reserved_slots_past_it_spaced_as_before(
    lua_redis: redis.Redis,
) -> None:
    """Nothing leaves at once when a pause ends: the slots reserved shift by the pause."""
    rl = RateLimiter(lua_redis, max_ahead_s=60.0, adaptive=False)
    target = deployment(rpm=600)
    grants = [rl.acquire(target, tokens=0).run() for _ in range(3)]  # at 0, 0.1 and 0.2 s
    rl.record(
        target, reserved_tokens=0, charged_tokens=0, outcome="rate_limited", retry_after_s=0.3
    ).run()
    waits = [rl.departure(target, g.granted_us, g.wait_s).run() for g in grants]
    assert waits == pytest.approx([0.3, 0.4, 0.5], abs=0.02)
    assert rl.acquire(target, tokens=0).run().wait_s == pytest.approx(0.6, abs=0.02)


def test_a_429_under_the_burst_allowance_leaves_no_burst(lua_redis: redis.Redis) -> None:
    rl = limiter(lua_redis)
    target = Deployment.of("openai/m", "http://127.0.0.1:9/v1", KEY, rpm=600, burst_s=0.5)
    assert [rl.acquire(target, tokens=0).run().wait_s for _ in range(3)] == [0, 0, 0]
    refused(rl, target)
    rl.record(target, reserved_tokens=0, charged_tokens=0, outcome="ok").run()
    lua_redis.hset(target.redis_key, mapping={"r_tat": 0, "pace": 0, "pace_phase": "done"})
    waits = [rl.acquire(target, tokens=0).run().wait_s for _ in range(3)]
    assert waits[0] == 0 and waits[1] == pytest.approx(0.1, abs=0.02)
