"""worker.attempt.retry.RetryPolicy: the backoff schedule, its jitter, and Retry-After."""

from __future__ import annotations

import random

import pytest

from worker.attempt.retry import JITTER, RetryPolicy
from worker.settings import load_settings

DEFAULT_SCHEDULE = [15, 15, 15, 16, 32, 64, 120, 120]
SAMPLES = 500


@pytest.fixture
def default_policy() -> RetryPolicy:
    return RetryPolicy.from_settings(load_settings())


@pytest.fixture
def scaled_policy() -> RetryPolicy:
    settings = load_settings(
        llm={"retry_multiplier": 0.01, "retry_min_wait": 0.01, "retry_max_wait": 0.08}
    )
    return RetryPolicy.from_settings(settings)


def _bounds(policy: RetryPolicy, retry: int) -> tuple[float, float]:
    base = policy.base_wait_s(retry)
    low = max(policy.min_wait_s, base * (1 - JITTER))
    high = min(policy.max_wait_s, base * (1 + JITTER))
    return low, high


def test_from_settings_copies_the_llm_settings() -> None:
    settings = load_settings(
        llm={
            "num_retries": 3,
            "retry_min_wait": 0.5,
            "retry_max_wait": 4,
            "retry_multiplier": 0.25,
            "timeout": 10,
        },
        queue={"visibility_timeout_s": 100},
    )

    policy = RetryPolicy.from_settings(settings)

    assert policy == RetryPolicy(
        num_retries=3,
        min_wait_s=0.5,
        max_wait_s=4,
        multiplier=0.25,
        longest_wait_s=100 / 2 - 10,
    )


def test_default_base_schedule_is_openhands_wait_exponential(
    default_policy: RetryPolicy,
) -> None:
    assert default_policy.num_retries == len(DEFAULT_SCHEDULE)
    assert [default_policy.base_wait_s(n) for n in range(8)] == DEFAULT_SCHEDULE


def test_base_schedule_stays_at_max_wait_far_out(default_policy: RetryPolicy) -> None:
    assert default_policy.base_wait_s(8) == 120
    assert default_policy.base_wait_s(10_000) == 120


def test_scaled_down_base_schedule(scaled_policy: RetryPolicy) -> None:
    schedule = [scaled_policy.base_wait_s(n) for n in range(8)]

    assert schedule == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.08, 0.08, 0.08, 0.08])


@pytest.mark.parametrize("policy_name", ["default_policy", "scaled_policy"])
def test_jittered_waits_stay_within_bounds_and_vary(
    request: pytest.FixtureRequest, policy_name: str
) -> None:
    policy: RetryPolicy = request.getfixturevalue(policy_name)
    rng = random.Random(20240611)

    for retry in range(10):
        low, high = _bounds(policy, retry)
        waits = [policy.wait_s(retry, rng=rng) for _ in range(SAMPLES)]

        assert min(waits) >= low, f"retry {retry}"
        assert max(waits) <= high, f"retry {retry}"
        assert min(waits) >= policy.min_wait_s
        assert max(waits) <= policy.max_wait_s
        # The jitter is real: many distinct values, spread over most of the band.
        assert len(set(waits)) > SAMPLES // 2
        assert max(waits) - min(waits) > 0.5 * (high - low)


def test_jitter_band_for_the_defaults(default_policy: RetryPolicy) -> None:
    # Never below min_wait (15 s), never above max_wait (120 s), +-10 % otherwise.
    expected = {0: (15, 16.5), 3: (15, 17.6), 4: (28.8, 35.2), 7: (108, 120)}
    for retry, (low, high) in expected.items():
        assert _bounds(default_policy, retry) == pytest.approx((low, high)), retry


def test_the_same_seed_gives_the_same_waits(default_policy: RetryPolicy) -> None:
    first = [default_policy.wait_s(n, rng=random.Random(7)) for n in range(8)]
    second = [default_policy.wait_s(n, rng=random.Random(7)) for n in range(8)]

    assert first == second


def test_wait_without_an_rng_uses_the_module_random(default_policy: RetryPolicy) -> None:
    waits = {default_policy.wait_s(4) for _ in range(50)}

    assert all(28.8 <= w <= 35.2 for w in waits)
    assert len(waits) > 1


def test_longer_retry_after_wins(default_policy: RetryPolicy) -> None:
    rng = random.Random(1)
    assert 100 <= default_policy.wait_s(0, retry_after_s=100, rng=rng) <= 100 * (1 + JITTER)
    # Retry-After may exceed max_wait_s: the provider knows best, up to longest_wait_s.
    assert 600 <= default_policy.wait_s(6, retry_after_s=600, rng=rng) <= 600 * (1 + JITTER)


def test_jobs_refused_together_come_back_spread_never_before_the_retry_after(
    default_policy: RetryPolicy,
) -> None:
    waits = [default_policy.wait_s(0, retry_after_s=60, rng=random.Random(n)) for n in range(50)]
    assert all(60 <= w <= 60 * (1 + JITTER) for w in waits)
    assert max(waits) - min(waits) > 60 * JITTER / 2  # not in lockstep


def test_shorter_retry_after_does_not_shorten_the_backoff(default_policy: RetryPolicy) -> None:
    rng = random.Random(2)
    for retry in range(8):
        low, high = _bounds(default_policy, retry)
        wait = default_policy.wait_s(retry, retry_after_s=1, rng=rng)
        assert low <= wait <= high


def test_zero_retry_after_does_not_shorten_the_backoff(default_policy: RetryPolicy) -> None:
    wait = default_policy.wait_s(0, retry_after_s=0, rng=random.Random(3))
    assert wait >= 15


def test_retry_after_is_capped_at_longest_wait(default_policy: RetryPolicy) -> None:
    assert default_policy.longest_wait_s == 3600 / 2 - 300

    wait = default_policy.wait_s(0, retry_after_s=86_400, rng=random.Random(4))

    assert wait == default_policy.longest_wait_s


def test_retry_after_cap_in_a_scaled_down_config() -> None:
    settings = load_settings(
        llm={
            "retry_multiplier": 0.01,
            "retry_min_wait": 0.01,
            "retry_max_wait": 0.08,
            "timeout": 1,
        },
        queue={"visibility_timeout_s": 4},
    )
    policy = RetryPolicy.from_settings(settings)

    assert policy.longest_wait_s == 1
    assert 0.5 <= policy.wait_s(0, retry_after_s=0.5, rng=random.Random(5)) <= 0.5 * (1 + JITTER)
    assert policy.wait_s(0, retry_after_s=30, rng=random.Random(5)) == 1
