"""The fake provider's enforcement shapes (worker.fake_provider.limits): what each admits and
refuses, and when it says to come back, on a clock moved by hand."""

from __future__ import annotations

import math

import pytest

from tests.support.clock import FakeClock
from worker.fake_provider import main
from worker.fake_provider.limits import Limiter, Ramp, Shape


def limiter(
    clock: FakeClock,
    *,
    rpm: int = 0,
    tpm: int = 0,
    shape: str = "bucket",
    burst_s: float = 60.0,
    ramp: Ramp | None = None,
) -> Limiter:
    return Limiter(rpm, tpm, clock, burst_s, shape=Shape.parse(shape), ramp=ramp)


def waits(lim: Limiter, count: int, tokens: int = 0) -> list[float]:
    """The waits of ``count`` requests at one instant (0.0: admitted)."""
    return [lim.admit("m", tokens)[0] for _ in range(count)]


@pytest.mark.parametrize("depth", [1, 2, 5])
def test_a_bucket_of_n_requests_admits_n_at_once_then_one_per_interval(depth: int) -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=1200, shape=f"bucket:{depth}")  # one request every 50 ms
    assert waits(lim, depth + 1)[:depth] == [0.0] * depth
    assert lim.admit("m", 0)[0] == pytest.approx(0.05)
    clock.now += 0.049
    assert lim.admit("m", 0)[0] == pytest.approx(0.001)
    clock.now += 0.001
    assert waits(lim, 2) == [0.0, pytest.approx(0.05)]
    clock.now += 60  # a minute idle refills no more than the depth
    assert waits(lim, depth + 1)[depth] == pytest.approx(0.05)


def test_a_bucket_depth_applies_to_requests_and_the_tokens_bucket_keeps_burst_s() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=1200, tpm=600, shape="bucket:1", burst_s=2)  # 20 tokens at once
    wait, headers = lim.admit("m", 15)
    assert wait == 0.0
    assert headers["x-ratelimit-remaining-tokens"] == "5"
    clock.now += 0.05  # the requests bucket is full again; 5 + 0.5 tokens are not enough
    assert lim.admit("m", 15)[0] == pytest.approx((15 - 5.5) * 60 / 600)


def test_a_fixed_window_admits_its_share_then_refuses_until_the_next_window() -> None:
    clock = FakeClock()  # at 1000.0: a window starts
    lim = limiter(clock, rpm=1200, shape="window:1")  # 20 a second
    clock.now += 0.25
    assert waits(lim, 20) == [0.0] * 20
    wait, headers = lim.admit("m", 0)
    assert wait == pytest.approx(0.75)  # until the window ends, at 1001.0
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "750ms"
    clock.now += 0.7499
    assert lim.admit("m", 0)[0] > 0
    clock.now = 1001.0  # a new window: its whole share at once, right after the last one's
    assert waits(lim, 21) == [0.0] * 20 + [pytest.approx(1.0)]


def test_a_sliding_window_counts_any_span_and_waits_for_the_oldest_to_leave() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=120, shape="sliding:10")  # 20 in any 10 s
    assert waits(lim, 10) == [0.0] * 10
    clock.now += 5
    assert waits(lim, 11) == [0.0] * 10 + [pytest.approx(5.0)]  # until the first ten leave
    clock.now += 4.5
    wait, headers = lim.admit("m", 0)
    assert wait == pytest.approx(0.5)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    clock.now += 0.5  # the first ten have left: ten more fit, not eleven
    assert waits(lim, 11) == [0.0] * 10 + [pytest.approx(5.0)]


def test_a_sliding_window_frees_as_much_as_a_costly_request_needs() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=60, shape="sliding:10")  # 10 tokens in any 10 s
    for cost in (4, 3, 3):
        assert lim.admit("m", cost)[0] == 0.0
        clock.now += 1
    assert lim.admit("m", 6)[0] == pytest.approx(8.0)  # the 4 and the first 3 must leave
    assert lim.admit("m", 4)[0] == pytest.approx(7.0)  # the 4 alone
    clock.now += 20
    assert lim.admit("m", 30)[0] == 0.0  # larger than the window, admitted into an empty one
    assert lim.admit("m", 1)[0] == pytest.approx(10.0)
    assert lim.admit("m", 61)[0] == math.inf  # larger than the minute: never


def test_a_window_counts_tokens_under_a_token_limit() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=600, shape="window:1")  # 10 tokens a second
    assert lim.admit("m", 6)[0] == 0.0
    assert lim.admit("m", 4)[0] == 0.0
    assert lim.admit("m", 1)[0] == pytest.approx(1.0)
    clock.now += 1
    assert lim.admit("m", 25)[0] == 0.0  # larger than the window, admitted into an empty one
    assert lim.admit("m", 1)[0] == pytest.approx(1.0)
    assert lim.admit("m", 601)[0] == math.inf


def test_the_default_tokens_bucket_charges_tokens_and_refills_continuously() -> None:
    clock = FakeClock()
    lim = limiter(clock, tpm=1200, burst_s=1)  # 20 tokens a second, 20 at once
    assert lim.admit("m", 15)[0] == 0.0
    wait, headers = lim.admit("m", 15)
    assert wait == pytest.approx(0.5)  # 10 tokens short at 20 a second
    assert headers["x-ratelimit-limit-tokens"] == "1200"
    clock.now += 0.5
    assert waits(lim, 2, tokens=15) == [0.0, pytest.approx(0.75)]


def test_ramp_factor_and_allowance() -> None:
    ramp = Ramp(100, start=0.5)  # doubles a minute: whole after one minute
    assert ramp.factor(0) == 0.5
    assert ramp.factor(30) == pytest.approx(0.5 * math.sqrt(2))
    assert ramp.factor(60) == pytest.approx(1.0)
    assert ramp.factor(600) == 1.0
    # The first minute lets 0.5 / ln 2 of a minute's worth through; every minute after, one.
    assert ramp.allowance_min(60) == pytest.approx(0.5 / math.log(2))
    assert ramp.allowance_min(180) == pytest.approx(0.5 / math.log(2) + 2)
    assert Ramp(50, start=1.0).allowance_min(90) == pytest.approx(1.5)


def test_a_ramp_starts_low_grows_to_the_limit_and_starts_again_after_idling() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=600, shape="bucket:1", ramp=Ramp(100, start=0.5))  # to 10/s
    assert waits(lim, 2) == [0.0, pytest.approx(0.2)]  # 5 a second at first
    clock.now += 30
    wait, headers = lim.admit("m", 0)  # 30 s in, the ramp allows 5 * sqrt(2) a second
    assert wait == 0.0
    assert headers["x-ratelimit-limit-requests"] == "600"  # the headers state the whole limit
    assert lim.admit("m", 0)[0] == pytest.approx(0.1 * math.sqrt(2))
    clock.now += 30
    assert waits(lim, 2) == [0.0, pytest.approx(0.1)]  # a minute in: the whole limit
    clock.now += 60.1  # idle past RAMP_IDLE_S: the ramp begins again
    assert waits(lim, 2) == [0.0, pytest.approx(0.2)]


def test_a_ramp_scales_a_window_share() -> None:
    clock = FakeClock()
    lim = limiter(clock, rpm=1200, shape="window:1", ramp=Ramp(100, start=0.5))
    assert waits(lim, 11) == [0.0] * 10 + [pytest.approx(1.0)]  # half of 20 a second


@pytest.mark.parametrize(
    ("text", "shape"),
    [
        ("bucket", Shape()),
        ("bucket:1", Shape("bucket", 1)),
        ("window:1", Shape("window", 1)),
        ("sliding:10", Shape("sliding", 10)),
    ],
)
def test_shapes_parse_and_print_back(text: str, shape: Shape) -> None:
    assert Shape.parse(text) == shape
    assert str(shape) == text


@pytest.mark.parametrize(
    "text", ["square", "bucket:0.5", "window", "window:0", "sliding:61", "bucket:x", ""]
)
def test_bad_shapes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an enforcement shape"):
        Shape.parse(text)


def test_bad_ramps_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="more than 0"):
        Ramp(0)
    with pytest.raises(ValueError, match="start"):
        Ramp(10, start=1.5)
    for argv in (["--enforce", "window:0"], ["--ramp-start", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "--enforce" in capsys.readouterr().err
