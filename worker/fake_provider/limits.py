"""Per-model requests/tokens-per-minute buckets and the x-ratelimit-* headers they advertise."""

from __future__ import annotations

import math
from collections.abc import Callable

_EPSILON = 1e-9


def reset_duration(seconds: float) -> str:
    """A wait in OpenAI's x-ratelimit-reset-* style: "120ms", "8.64s", "1m0s"."""
    ms = math.ceil(seconds * 1000 - _EPSILON)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class Bucket:
    """``limit`` units a minute, refilled continuously at ``limit / 60`` per second, holding at
    most ``burst_s`` seconds' worth (a whole minute by default: the full budget at once)."""

    def __init__(self, kind: str, limit: int, now: float, burst_s: float = 60.0) -> None:
        self.kind, self.limit, self.stamp = kind, limit, now
        self.capacity = max(1.0, limit * min(burst_s, 60.0) / 60)
        self.level = self.capacity

    def refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.level = min(self.capacity, self.level + elapsed * self.limit / 60)
        self.stamp = now

    def wait(self, cost: int) -> float:
        """Seconds until ``cost`` fits (0: now; inf: never, it exceeds the whole budget).

        A cost above the capacity fits once the bucket is full; it then leaves a debt.
        """
        if cost > self.limit:
            return math.inf
        shortfall = min(cost, self.capacity) - self.level
        return 0.0 if shortfall <= _EPSILON else shortfall * 60 / self.limit

    def headers(self) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{self.kind}": str(self.limit),
            f"x-ratelimit-remaining-{self.kind}": str(max(0, math.floor(self.level + _EPSILON))),
            f"x-ratelimit-reset-{self.kind}": reset_duration(
                (self.capacity - self.level) * 60 / self.limit
            ),
        }


class Limiter:
    """The rpm and tpm buckets of every model (0: unlimited); check and charge in one step."""

    def __init__(
        self, rpm: int, tpm: int, clock: Callable[[], float], burst_s: float = 60.0
    ) -> None:
        self._limits = [
            (kind, limit) for kind, limit in (("requests", rpm), ("tokens", tpm)) if limit
        ]
        self._clock = clock
        self._burst_s = burst_s
        self._buckets: dict[str, list[Bucket]] = {}

    def admit(self, model: str, tokens: int) -> tuple[float, dict[str, str]]:
        """Charge one request of ``tokens`` if it fits now and return (0.0, headers); else
        charge nothing and return (seconds until it would fit, math.inf if never; headers)."""
        if not self._limits:
            return 0.0, {}
        now = self._clock()
        buckets = self._buckets.get(model)
        if buckets is None:
            buckets = [Bucket(kind, limit, now, self._burst_s) for kind, limit in self._limits]
            self._buckets[model] = buckets
        costs = [1 if bucket.kind == "requests" else tokens for bucket in buckets]
        for bucket in buckets:
            bucket.refill(now)
        wait = max(bucket.wait(cost) for bucket, cost in zip(buckets, costs, strict=True))
        headers: dict[str, str] = {}
        for bucket, cost in zip(buckets, costs, strict=True):
            if wait == 0.0:
                bucket.level -= cost
            headers.update(bucket.headers())
        return wait, headers
