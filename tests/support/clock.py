"""A clock moved by hand, for code that takes its time from a callable."""

from __future__ import annotations


class FakeClock:
    """Returns ``now``, which only the test moves (``clock.now += 0.5``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
