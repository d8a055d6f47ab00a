"""worker.fleet.limiter's Lua scripts (and limiter_status's reading of their state), on fakeredis
(lupa) and on a real redis-server alike; the pace learned from 429s: test_limiter_pace."""

from __future__ import annotations

import pytest
import redis

from api_client._constants import LIMITER_PREFIX
from worker.fleet.limiter import (
    Deployment,
    RateLimiter,
    limits_from_headers,
)
from worker.fleet.limiter_scripts import TOKEN_MAX_AHEAD_S
from worker.fleet.limiter_status import read_limiters
from worker.settings import DEFAULT_BURST_S

KEY = "sk-limiter-test-secret-0123456789"
# Waits are computed from Redis server time: allow for the time the test itself takes.
SLACK_S = 0.25


def limiter(
    lua_redis: redis.Redis, *, max_ahead_s: float = 60.0, adaptive: bool = True
) -> RateLimiter:
    return RateLimiter(lua_redis, max_ahead_s=max_ahead_s, adaptive=adaptive)


def deployment(
    rpm: int | None = None, tpm: int | None = None, key: str = KEY, burst_s: float = 1.0
) -> Deployment:
    """A deployment of one model; a second of burst unless told (the default's own test:
    test_the_burst_is_a_setting_a_tenth_of_a_second_by_default)."""
    return Deployment.of(
        "openai/m", "http://127.0.0.1:9/v1", key, rpm=rpm, tpm=tpm, burst_s=burst_s
    )


def test_without_any_limit_every_call_starts_at_once(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment()
    grants = [rl.acquire(target, tokens=100).run() for _ in range(50)]
    assert all(g.granted and g.wait_s == 0 for g in grants)
    assert grants[-1].rpm == 0 and grants[-1].tpm == 0


def test_configured_rpm_spaces_calls_after_the_burst(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=600)  # one call every 100 ms
    burst = int(1.0 / 0.1) + 1  # GCRA lets this many start at once after idling
    waits = [rl.acquire(target, tokens=0).run().wait_s for _ in range(burst + 20)]

    assert all(w <= SLACK_S / 10 for w in waits[:burst])
    for n, wait in enumerate(waits[burst:], start=1):
        assert wait == pytest.approx(n * 0.1, abs=SLACK_S), n


@pytest.mark.parametrize(("burst_s", "at_once"), [(None, 2), (0.0, 1), (0.5, 6)])
def test_the_burst_is_a_setting_a_tenth_of_a_second_by_default(
    lua_redis: redis.Redis, burst_s: float | None, at_once: int
) -> None:
    """After an idle spell, the calls that start at once: the burst tolerance's worth of the
    budget and one (LLM_BURST_S; default DEFAULT_BURST_S, two at 10 a second)."""
    target = Deployment.of("openai/m", None, KEY, rpm=600, burst_s=burst_s)
    rl = limiter(lua_redis)
    waits = [rl.acquire(target, tokens=0).run().wait_s for _ in range(at_once + 1)]

    assert all(w <= SLACK_S / 10 for w in waits[:at_once]), waits
    assert waits[at_once] == pytest.approx(0.1, abs=SLACK_S)
    assert DEFAULT_BURST_S == 0.1


def test_two_limiters_share_one_budget(lua_redis: redis.Redis) -> None:
    """Two workers (two limiters, the same Redis) together get the rate, not twice it."""
    first, second, target = limiter(lua_redis), limiter(lua_redis), deployment(rpm=60)
    waits = [rl.acquire(target, tokens=0).run().wait_s for _ in range(10) for rl in (first, second)]
    # One call a second between both, whichever limiter asks: 20 calls span 18 s after a burst
    # of two (one second of tolerance).
    assert max(waits) == pytest.approx(18.0, abs=SLACK_S)
    assert sorted(waits) == waits


def test_no_slot_is_reserved_beyond_max_ahead(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis, max_ahead_s=5), deployment(rpm=60)
    grants = [rl.acquire(target, tokens=0).run() for _ in range(12)]
    granted = [g for g in grants if g.granted]
    refused = [g for g in grants if not g.granted]

    assert len(granted) == 7  # the burst of 2, then one a second up to 5 s ahead
    assert max(g.wait_s for g in granted) <= 5.0
    assert len(refused) == 5
    # Refusals reserve nothing: each is told the same time to ask again.
    assert all(g.wait_s == pytest.approx(refused[0].wait_s, abs=SLACK_S) for g in refused)
    assert 0 < refused[0].wait_s <= 1.0 + SLACK_S


def test_under_a_token_limit_slots_are_reserved_only_a_little_ahead(
    lua_redis: redis.Redis,
) -> None:
    rl, target = limiter(lua_redis, max_ahead_s=60), deployment(tpm=6000)  # 100 tokens/s
    grants = [rl.acquire(target, tokens=100).run() for _ in range(10)]  # a second's worth each
    granted = [g for g in grants if g.granted]
    assert max(g.wait_s for g in granted) <= TOKEN_MAX_AHEAD_S
    assert len(granted) == 7  # the burst of 2, then one a second up to 5 s ahead
    assert not grants[-1].granted


def test_tokens_are_charged_and_reconciled(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(tpm=6000)  # 100 tokens a second
    assert rl.acquire(target, tokens=1000).run().wait_s == 0
    # 1,000 tokens are 10 s of budget (one second of it burst tolerance): the next slot is 9 s
    # away, further than token slots are reserved, so the call is told to ask again.
    refused = rl.acquire(target, tokens=10).run()
    assert not refused.granted
    assert refused.wait_s == pytest.approx(9.0 - TOKEN_MAX_AHEAD_S, abs=SLACK_S)

    # The first call really used 100 tokens: a second of budget, within the burst.
    rl.record(target, reserved_tokens=1000, charged_tokens=100, outcome="ok").run()
    assert rl.acquire(target, tokens=10).run().wait_s == pytest.approx(0, abs=SLACK_S)


def test_tokens_are_counted_only_where_a_token_limit_applies(lua_redis: redis.Redis) -> None:
    rl = limiter(lua_redis)
    assert rl.counts_tokens(deployment(tpm=1000))
    learned = deployment()
    assert not rl.counts_tokens(learned)
    rl.acquire(learned, tokens=0).run()
    rl.record(
        learned,
        reserved_tokens=0,
        charged_tokens=50,
        outcome="ok",
        headers={"x-ratelimit-limit-tokens": "40000"},
    ).run()
    assert rl.counts_tokens(learned)


def test_limits_are_learned_from_headers_and_configured_ones_cap_them(
    lua_redis: redis.Redis,
) -> None:
    rl = limiter(lua_redis)
    headers = {"llm_provider-x-ratelimit-limit-requests": "120", "x-ratelimit-limit-tokens": "9000"}
    target = deployment()
    rl.record(target, reserved_tokens=0, charged_tokens=10, outcome="ok", headers=headers).run()
    grant = rl.acquire(target, tokens=0).run()
    assert (grant.rpm, grant.tpm) == (120, 9000)

    capped = deployment(rpm=60, tpm=20000)  # the same deployment, configured by another worker
    grant = rl.acquire(capped, tokens=0).run()
    assert (grant.rpm, grant.tpm) == (60, 9000)


def test_a_retry_after_pauses_the_whole_fleet(lua_redis: redis.Redis) -> None:
    one, other, target = limiter(lua_redis), limiter(lua_redis), deployment()
    one.record(
        target, reserved_tokens=0, charged_tokens=0, outcome="rate_limited", retry_after_s=3
    ).run()
    assert other.acquire(target, tokens=0).run().wait_s == pytest.approx(3.0, abs=SLACK_S)


def test_without_adaptive_only_configured_limits_apply(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis, adaptive=False), deployment()
    rl.record(
        target,
        reserved_tokens=0,
        charged_tokens=0,
        outcome="rate_limited",
        headers={"x-ratelimit-limit-requests": "10"},
    ).run()
    assert rl.acquire(target, tokens=0).run().rpm == 0


def test_the_key_never_reaches_redis_and_keys_tell_deployments_apart(
    lua_redis: redis.Redis,
) -> None:
    rl = limiter(lua_redis)
    one, other = deployment(rpm=60), deployment(rpm=60, key="sk-another-key-abcdefghij")
    rl.acquire(one, tokens=0).run()
    rl.acquire(other, tokens=0).run()

    assert one.identity != other.identity
    dump = ""
    for key in lua_redis.scan_iter(match=f"{LIMITER_PREFIX}*"):
        dump += repr(key) + repr(lua_redis.hgetall(key))
    assert KEY not in dump
    assert "openai/m" in dump and "127.0.0.1:9" in dump


def test_state_expires_when_idle(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=60)
    rl.acquire(target, tokens=0).run()
    assert 0 < lua_redis.pttl(target.redis_key) <= 3600 * 1000


def test_read_limiters_reports_the_last_minute(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis, adaptive=False), deployment(rpm=600)
    for _ in range(5):
        rl.acquire(target, tokens=0).run()
        rl.record(target, reserved_tokens=0, charged_tokens=40, outcome="ok").run()
    rl.record(
        target, reserved_tokens=0, charged_tokens=0, outcome="rate_limited", retry_after_s=9
    ).run()

    (state,) = read_limiters(lua_redis)
    assert (state.model, state.endpoint) == ("openai/m", "127.0.0.1:9")
    assert (state.rpm_limit, state.rpm_source, state.tpm_limit) == (600, "configured", 0)
    # (approx: should the test cross a minute, the last minute's counts are prorated)
    assert state.requests_per_minute == pytest.approx(5, abs=0.1)
    assert state.tokens_per_minute == pytest.approx(200, abs=4)
    assert state.rate_limited_per_minute == pytest.approx(1, abs=0.1)
    assert state.paused_for_s == pytest.approx(9, abs=SLACK_S)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, (None, None)),
        ({"x-ratelimit-limit-requests": "500", "x-ratelimit-limit-tokens": "30000"}, (500, 30000)),
        ({"X-RateLimit-Limit-Requests": "7"}, (7, None)),
        ({"llm_provider-x-ratelimit-limit-tokens": "1000"}, (None, 1000)),
        ({"anthropic-ratelimit-requests-limit": "50"}, (50, None)),
        ({"x-ratelimit-limit-requests": "lots", "x-ratelimit-limit-tokens": "-3"}, (None, None)),
        ({"x-ratelimit-limit-requests": "nan"}, (None, None)),
    ],
)
def test_limits_from_headers(
    headers: dict[str, str], expected: tuple[int | None, int | None]
) -> None:
    assert limits_from_headers(headers) == expected


def test_a_slot_given_back_is_the_next_one_granted(lua_redis: redis.Redis) -> None:
    """A call not made (its job cancelled, or past its deadline, while it waited for its slot)
    gives its slot back: the next call takes it, instead of waiting one more interval."""
    rl, target = limiter(lua_redis), deployment(rpm=60, tpm=6000)  # a call a second
    waits = [rl.acquire(target, tokens=100).run().wait_s for _ in range(4)]
    assert waits[-1] == pytest.approx(2.0, abs=SLACK_S)  # a burst of two, then 1 s, 2 s

    rl.give_back(target, tokens=100).run()

    assert rl.acquire(target, tokens=100).run().wait_s == pytest.approx(2.0, abs=SLACK_S)


def test_giving_back_never_frees_slots_in_the_past(lua_redis: redis.Redis) -> None:
    rl, target = limiter(lua_redis), deployment(rpm=60)
    rl.acquire(target, tokens=0).run()  # starts at once: its slot is now
    for _ in range(5):
        rl.give_back(target, tokens=0).run()

    waits = [rl.acquire(target, tokens=0).run().wait_s for _ in range(4)]
    assert waits[2] == pytest.approx(1.0, abs=SLACK_S)  # no more than the usual burst
