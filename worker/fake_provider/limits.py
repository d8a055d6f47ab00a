"""Per-model requests/tokens-per-minute limits in the shapes providers enforce them, and their
x-ratelimit-* headers."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

_EPSILON = 1e-9
SHAPE_KINDS = ("bucket", "window", "sliding")
# A model with no request admitted for this long starts its ramp again from the bottom.
RAMP_IDLE_S = 60.0


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


@dataclass(frozen=True)
class Shape:
    """How a per-minute limit is enforced, written ``KIND`` or ``KIND:SIZE``:

    - ``bucket`` (the default): a bucket refilled continuously at the limit's rate, holding
      ``burst_s`` seconds of it; ``bucket:N`` holds N requests instead (its tokens bucket, if
      any, keeps ``burst_s``), down to 1: no burst at all.
    - ``window:S``: at most S seconds' worth of the limit in each fixed S-second window
      (windows start at whole multiples of S on the provider's clock).
    - ``sliding:S``: at most S seconds' worth of the limit in any S seconds.

    Whatever the shape, a request costing more than what one window or bucket holds is
    admitted when nothing else is in it, and one costing more than the whole minute never.
    """

    kind: str = "bucket"
    size: float = 0.0  # bucket: requests it holds (0: burst_s decides); windows: seconds

    def __post_init__(self) -> None:
        if self.kind not in SHAPE_KINDS:
            raise ValueError(f"shape must be one of {', '.join(SHAPE_KINDS)}: {self.kind!r}")
        if self.kind == "bucket" and self.size and self.size < 1:
            raise ValueError("a bucket must hold at least 1 request")
        if self.kind != "bucket" and not 0 < self.size <= 60:
            raise ValueError(f"{self.kind}:S needs S above 0 and at most 60 (seconds)")

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``bucket``, ``bucket:N``, ``window:S`` or ``sliding:S`` (ValueError otherwise)."""
        kind, _, size = text.strip().partition(":")
        try:
            return cls(kind, float(size) if size else 0.0)
        except ValueError as exc:
            raise ValueError(f"not an enforcement shape: {text!r} ({exc})") from None

    def __str__(self) -> str:
        return f"{self.kind}:{self.size:g}" if self.size else self.kind


@dataclass(frozen=True)
class Ramp:
    """A cap on how fast load may rise: from ``start`` (a fraction of the limit) when a model's
    traffic begins, or resumes after RAMP_IDLE_S with nothing admitted, the rate allowed grows
    by ``percent_per_minute`` a minute, compounded continuously, up to the whole limit. The
    headers still state the whole limit: a provider does not say where the ramp stands."""

    percent_per_minute: float
    start: float = 0.5

    def __post_init__(self) -> None:
        if not self.percent_per_minute > 0:
            raise ValueError("a ramp must grow by more than 0 % a minute")
        if not 0 < self.start <= 1:
            raise ValueError("a ramp must start above 0 and at most at the whole limit")

    @property
    def _growth_per_s(self) -> float:
        return math.log1p(self.percent_per_minute / 100) / 60

    def factor(self, elapsed_s: float) -> float:
        """The fraction of the limit allowed ``elapsed_s`` into the ramp."""
        return min(1.0, self.start * math.exp(self._growth_per_s * max(0.0, elapsed_s)))

    def allowance_min(self, elapsed_s: float) -> float:
        """Minutes' worth of the whole limit the ramp lets through in its first ``elapsed_s``:
        the integral of ``factor`` (burst aside)."""
        elapsed_s, growth = max(0.0, elapsed_s), self._growth_per_s
        full_at_s = math.log(1 / self.start) / growth
        ramping_s = min(elapsed_s, full_at_s)
        ramped = self.start * math.expm1(growth * ramping_s) / growth
        return (ramped + max(0.0, elapsed_s - full_at_s)) / 60


class Meter(Protocol):
    """One limit of one model (requests or tokens) in one shape; ``factor`` scales its rate
    (a ramp's)."""

    kind: str
    limit: int

    def wait(self, cost: int, now: float, factor: float) -> float:
        """Seconds until ``cost`` fits (0: now; inf: never, it exceeds the whole minute)."""
        ...

    def charge(self, cost: int, now: float) -> None: ...

    def headers(self, now: float, factor: float) -> dict[str, str]: ...


def _headers(kind: str, limit: int, remaining: float, reset_s: float) -> dict[str, str]:
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(remaining + _EPSILON))),
        f"x-ratelimit-reset-{kind}": reset_duration(reset_s),
    }


class Bucket:
    """``limit`` units a minute, refilled continuously at ``limit / 60`` per second, holding
    ``depth`` units or else at most ``burst_s`` seconds' worth (by default a whole minute: the
    full budget at once). A cost above the capacity fits once the bucket is full; it then leaves
    a debt."""

    def __init__(
        self, kind: str, limit: int, now: float, burst_s: float = 60.0, depth: float = 0.0
    ) -> None:
        self.kind, self.limit, self.stamp = kind, limit, now
        self.capacity = depth or max(1.0, limit * min(burst_s, 60.0) / 60)
        self.level = self.capacity

    def _refill(self, now: float, factor: float) -> None:
        elapsed = max(0.0, now - self.stamp)
        self.level = min(self.capacity, self.level + elapsed * self.limit * factor / 60)
        self.stamp = now

    def wait(self, cost: int, now: float, factor: float = 1.0) -> float:
        self._refill(now, factor)
        if cost > self.limit:
            return math.inf
        shortfall = min(cost, self.capacity) - self.level
        return 0.0 if shortfall <= _EPSILON else shortfall * 60 / (self.limit * factor)

    def charge(self, cost: int, now: float) -> None:
        self.level -= cost

    def headers(self, now: float, factor: float = 1.0) -> dict[str, str]:
        reset_s = (self.capacity - self.level) * 60 / (self.limit * factor)
        return _headers(self.kind, self.limit, self.level, reset_s)


class Window:
    """At most ``span_s`` seconds' worth of ``limit`` (a minute's) in each fixed window of
    ``span_s`` seconds, the windows starting at whole multiples of ``span_s``."""

    def __init__(self, kind: str, limit: int, span_s: float) -> None:
        self.kind, self.limit, self.span_s = kind, limit, span_s
        self.start, self.used = -math.inf, 0

    def _capacity(self, factor: float) -> float:
        return self.limit * self.span_s / 60 * factor

    def _roll(self, now: float) -> None:
        start = math.floor(now / self.span_s) * self.span_s
        if start != self.start:
            self.start, self.used = start, 0

    def wait(self, cost: int, now: float, factor: float = 1.0) -> float:
        self._roll(now)
        if cost > self.limit:
            return math.inf
        if self.used == 0 or self.used + cost <= self._capacity(factor) + _EPSILON:
            return 0.0
        return self.start + self.span_s - now

    def charge(self, cost: int, now: float) -> None:
        self.used += cost

    def headers(self, now: float, factor: float = 1.0) -> dict[str, str]:
        remaining = self._capacity(factor) - self.used
        return _headers(self.kind, self.limit, remaining, self.start + self.span_s - now)


class Sliding:
    """At most ``span_s`` seconds' worth of ``limit`` (a minute's) in any ``span_s`` seconds:
    a log of what was admitted, forgotten ``span_s`` after."""

    def __init__(self, kind: str, limit: int, span_s: float) -> None:
        self.kind, self.limit, self.span_s = kind, limit, span_s
        self.log: deque[tuple[float, int]] = deque()
        self.total = 0

    def _capacity(self, factor: float) -> float:
        return self.limit * self.span_s / 60 * factor

    def _forget(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.span_s:
            self.total -= self.log.popleft()[1]

    def wait(self, cost: int, now: float, factor: float = 1.0) -> float:
        self._forget(now)
        if cost > self.limit:
            return math.inf
        excess = self.total + cost - self._capacity(factor)
        if not self.log or excess <= _EPSILON:
            return 0.0
        freed = 0
        for admitted_at, admitted in self.log:  # the oldest first: they leave the window first
            freed += admitted
            if freed >= excess - _EPSILON:
                return admitted_at + self.span_s - now
        return self.log[-1][0] + self.span_s - now  # too large for the window: when it is empty

    def charge(self, cost: int, now: float) -> None:
        self.log.append((now, cost))
        self.total += cost

    def headers(self, now: float, factor: float = 1.0) -> dict[str, str]:
        reset_s = self.log[-1][0] + self.span_s - now if self.log else 0.0
        return _headers(self.kind, self.limit, self._capacity(factor) - self.total, reset_s)


def meter(kind: str, limit: int, now: float, shape: Shape, burst_s: float) -> Meter:
    """The meter enforcing ``limit`` of ``kind`` ("requests" or "tokens") in ``shape``."""
    if shape.kind == "window":
        return Window(kind, limit, shape.size)
    if shape.kind == "sliding":
        return Sliding(kind, limit, shape.size)
    return Bucket(kind, limit, now, burst_s, shape.size if kind == "requests" else 0.0)


class _ModelLimits:
    """One model's meters, and when its ramp began."""

    def __init__(self, meters: list[Meter], now: float) -> None:
        self.meters = meters
        self.ramp_began = self.last_admitted = now


class Limiter:
    """The rpm and tpm limits of every model (0: unlimited); check and charge in one step."""

    def __init__(
        self,
        rpm: int,
        tpm: int,
        clock: Callable[[], float],
        burst_s: float = 60.0,
        *,
        shape: Shape | None = None,
        ramp: Ramp | None = None,
    ) -> None:
        self._limits = [
            (kind, limit) for kind, limit in (("requests", rpm), ("tokens", tpm)) if limit
        ]
        self._clock = clock
        self._burst_s = burst_s
        self._shape = shape or Shape()
        self._ramp = ramp
        self._models: dict[str, _ModelLimits] = {}

    def admit(self, model: str, tokens: int) -> tuple[float, dict[str, str]]:
        """Charge one request of ``tokens`` if it fits now and return (0.0, headers); else
        charge nothing and return (seconds until it would fit, math.inf if never; headers)."""
        if not self._limits:
            return 0.0, {}
        now = self._clock()
        state = self._models.get(model)
        if state is None:
            meters = [meter(k, limit, now, self._shape, self._burst_s) for k, limit in self._limits]
            state = self._models[model] = _ModelLimits(meters, now)
        factor = 1.0
        if self._ramp is not None:
            if now - state.last_admitted > RAMP_IDLE_S:
                state.ramp_began = now
            factor = self._ramp.factor(now - state.ramp_began)
        costs = [1 if m.kind == "requests" else tokens for m in state.meters]
        wait = max(m.wait(cost, now, factor) for m, cost in zip(state.meters, costs, strict=True))
        headers: dict[str, str] = {}
        for m, cost in zip(state.meters, costs, strict=True):
            if wait == 0.0:
                m.charge(cost, now)
            headers.update(m.headers(now, factor))
        if wait == 0.0:
            state.last_admitted = now
        return wait, headers
