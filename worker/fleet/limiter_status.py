"""Reads the rate limiter's per-deployment state in Redis for `promptq status`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis

from api_client._constants import LIMITER_PREFIX
from api_client._polling import text_of

# The fields read here are those of the hash worker.fleet.limiter_scripts keeps (its layout is
# drawn there).


@dataclass(frozen=True)
class LimiterState:
    """One deployment's limiter as `promptq status` shows it (over the last minute)."""

    model: str
    endpoint: str
    rpm_limit: float  # 0: no limit known
    tpm_limit: float
    rpm_source: str  # "configured", "headers", "paced after 429s", "slow start" or ""
    requests_per_minute: float  # calls started in the last minute
    tokens_per_minute: float  # tokens charged in the last minute
    rate_limited_per_minute: float  # 429s in the last minute
    paused_for_s: float  # a Retry-After still holding the fleet


def read_limiters(client: redis.Redis, *, max_keys: int = 1000) -> list[LimiterState]:
    """Every deployment's limiter state in Redis (at most ``max_keys``), busiest first."""
    seconds, micros = client.time()
    now_us = seconds * 1_000_000 + micros
    keys = list(client.scan_iter(match=f"{LIMITER_PREFIX}*", count=1000))
    states = []
    for key in keys[:max_keys]:
        fields = {text_of(k): text_of(v) for k, v in client.hgetall(key).items()}
        if fields:
            states.append(_state_of(fields, now_us))
    return sorted(states, key=lambda s: (-s.requests_per_minute, s.model, s.endpoint))


def _state_of(h: Mapping[str, str], now_us: int) -> LimiterState:
    def num(name: str) -> float:
        try:
            return float(h.get(name, 0))
        except ValueError:
            return 0.0

    def last_minute(name: str) -> float:
        """A sliding minute: this minute's count plus the part of the last one still in it."""
        minute = now_us // 60_000_000
        into = (now_us % 60_000_000) / 60_000_000
        if num("minute") == minute:
            return num(name) + num(f"prev_{name}") * (1 - into)
        if num("minute") == minute - 1:
            return num(name) * (1 - into)
        return 0.0

    def effective(configured: float, learned: float) -> float:
        # As the scripts' limit(): the lower of two limits, or the one there is.
        return min(configured, learned) if configured and learned else max(configured, learned)

    rpm_cfg, rpm_learned, pace = num("rpm_cfg"), num("rpm_learned"), num("pace")
    ceiling = effective(rpm_cfg, rpm_learned)
    # As the scripts' paced(): the pace learned from 429s (or slow start), under the limit.
    rpm = pace if pace and (not ceiling or pace < ceiling) else ceiling
    source = ""
    if rpm == pace and pace:
        source = "slow start" if h.get("pace_phase") == "start" else "paced after 429s"
    elif rpm:
        source = "configured" if rpm == rpm_cfg else "headers"
    return LimiterState(
        model=h.get("model", "?"),
        endpoint=h.get("base", "?"),
        rpm_limit=rpm,
        tpm_limit=effective(num("tpm_cfg"), num("tpm_learned")),
        rpm_source=source,
        requests_per_minute=last_minute("req"),
        tokens_per_minute=last_minute("tok"),
        rate_limited_per_minute=last_minute("r429"),
        paused_for_s=max(0.0, (num("pause_until") - now_us) / 1_000_000),
    )
