"""The fleet-wide rate limiter: per-deployment RPM/TPM budgets kept atomically in Redis."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis

from api_client._constants import LIMITER_PREFIX
from worker.fleet.limiter_scripts import (
    ACQUIRE,
    DEPART,
    GIVE_BACK,
    SETTLE,
    STATE_TTL_S,
    TOKEN_MAX_AHEAD_S,
    Outcome,
)
from worker.fleet.scripts import ScriptCall
from worker.settings import DEFAULT_BURST_S


@dataclass(frozen=True)
class Deployment:
    """One rate-limited target: a model at an endpoint with one key, and its configured limits.

    The key is identified by a digest only: the key itself never reaches Redis.
    """

    model: str
    endpoint: str  # the base URL's host (no credentials, no path), or "default"
    identity: str  # digest of model, base URL and key: names the Redis state
    rpm: int | None = None
    tpm: int | None = None
    burst_s: float = DEFAULT_BURST_S  # GCRA's burst tolerance (LLM_BURST_S)

    @property
    def limited(self) -> bool:
        """Whether calls to it have a configured rate limit."""
        return bool(self.rpm or self.tpm)

    @classmethod
    def of(
        cls,
        model: str,
        base_url: str | None,
        api_key: str | None,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        burst_s: float | None = None,
    ) -> Deployment:
        burst_s = DEFAULT_BURST_S if burst_s is None else burst_s
        key_digest = hashlib.sha256((api_key or "").encode()).hexdigest()
        identity = hashlib.sha256(f"{model}\n{base_url or ''}\n{key_digest}".encode()).hexdigest()
        return cls(model, _endpoint_of(base_url), identity[:24], rpm, tpm, burst_s)

    @property
    def redis_key(self) -> str:
        return f"{LIMITER_PREFIX}{self.identity}"


def _endpoint_of(base_url: str | None) -> str:
    if not base_url:
        return "default"
    parts = urlsplit(base_url)
    host = parts.hostname or base_url
    return f"{host}:{parts.port}" if parts.port else host


@dataclass(frozen=True)
class Grant:
    """The limiter's answer to one call that wants to start."""

    granted: bool  # a slot is reserved: start after wait_s
    wait_s: float  # granted: until the slot; refused: until asking again can succeed
    rpm: float  # the deployment's effective limits (0: none): its pace, under any limit
    tpm: float
    granted_us: int = 0  # when it was asked for, on Redis's clock (microseconds)


class RateLimiter:
    """Shares each deployment's budget between every worker through one Redis hash.

    ``start_rpm``: slow start's first pace (0: none).
    ``acquire`` reserves a slot for a call (GCRA on requests and tokens, Redis server time)
    no further than ``max_ahead_s`` ahead; ``record`` corrects the token charge with what the
    call really used, shares a Retry-After with the whole fleet and, when ``adaptive``, learns
    limits from the provider's headers and the fleet's pace from 429s.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_ahead_s: float,
        adaptive: bool,
        start_rpm: float = 0.0,
    ) -> None:
        self._max_ahead_us = int(max_ahead_s * 1_000_000)
        self._adaptive = adaptive
        self._start_rpm = start_rpm if adaptive else 0.0
        self._acquire = client.register_script(ACQUIRE)
        self._give_back = client.register_script(GIVE_BACK)
        self._settle = client.register_script(SETTLE)
        self._depart = client.register_script(DEPART)
        # The token limit each deployment had at its last call, so that tokens are only
        # estimated (LiteLLM's counter costs CPU) where a token limit applies.
        self._tpm_seen: dict[str, float] = {}

    def counts_tokens(self, deployment: Deployment) -> bool:
        """Whether a call to this deployment must be charged tokens before it starts."""
        return bool(deployment.tpm) or self._tpm_seen.get(deployment.identity, 0.0) > 0

    def give_back(self, deployment: Deployment, tokens: int) -> ScriptCall[None]:
        """Returns the script call that gives back a slot reserved for a call not made."""
        return ScriptCall(
            self._give_back,
            keys=[deployment.redis_key],
            args=[tokens, int(STATE_TTL_S * 1000)],
            parse=lambda reply: None,
        )

    def departure(
        self, deployment: Deployment, granted_us: int, slot_wait_s: float
    ) -> ScriptCall[float]:
        """Returns the script call that says how long (seconds) a call whose slot has come
        should still wait before it leaves: its slot (``slot_wait_s`` after ``granted_us``,
        Grant's) as moved by the pauses and backoffs since it was granted."""
        return ScriptCall(
            self._depart,
            keys=[deployment.redis_key],
            args=[granted_us, granted_us + int(slot_wait_s * 1_000_000), self._max_ahead_us],
            parse=lambda reply: int(reply) / 1_000_000,
        )

    def acquire(self, deployment: Deployment, tokens: int) -> ScriptCall[Grant]:
        """Returns the script call that reserves a slot for one call of about ``tokens``
        tokens, or says when to ask again."""

        def grant_of(reply: Any) -> Grant:
            granted, wait_us, rpm, tpm, now_us = reply
            self._tpm_seen[deployment.identity] = float(tpm)
            return Grant(
                bool(int(granted)),
                int(wait_us) / 1_000_000,
                float(rpm),
                float(tpm),
                int(now_us),
            )

        return ScriptCall(
            self._acquire,
            keys=[deployment.redis_key],
            args=[
                max(0, tokens),
                self._max_ahead_us,
                deployment.rpm or 0,
                deployment.tpm or 0,
                int(deployment.burst_s * 1_000_000),
                int(STATE_TTL_S * 1000),
                deployment.model,
                deployment.endpoint,
                int(TOKEN_MAX_AHEAD_S * 1_000_000),
                self._start_rpm,
            ],
            parse=grant_of,
        )

    def record(
        self,
        deployment: Deployment,
        *,
        reserved_tokens: int,
        charged_tokens: int,
        outcome: Outcome,
        retry_after_s: float | None = None,
        headers: Mapping[str, Any] | None = None,
        granted_us: int = 0,
    ) -> ScriptCall[None]:
        """Returns the script call that records how a provider call went: its real token
        charge, the limits the provider stated, any 429 (``granted_us``: when the call's slot
        was granted, Grant.granted_us; 0 when unknown)."""
        learned_rpm, learned_tpm = limits_from_headers(headers or {})

        def remember_tpm(reply: Any) -> None:
            self._tpm_seen[deployment.identity] = float(reply[1])

        return ScriptCall(
            self._settle,
            keys=[deployment.redis_key],
            args=[
                charged_tokens - reserved_tokens,
                max(0, charged_tokens),
                outcome,
                int((retry_after_s or 0) * 1_000_000),
                learned_rpm or 0,
                learned_tpm or 0,
                1 if self._adaptive else 0,
                int(STATE_TTL_S * 1000),
                granted_us,
            ],
            parse=remember_tpm,
        )


# Where providers state their limits. OpenAI, Azure OpenAI, OpenRouter and most
# OpenAI-compatible servers send x-ratelimit-limit-*; LiteLLM also passes them on prefixed with
# "llm_provider-". Groq's x-ratelimit-limit-requests counts a day, not a minute: read as a
# minute's it is only a looser upper bound, and 429s still pause the fleet.
_RPM_HEADERS = ("x-ratelimit-limit-requests", "anthropic-ratelimit-requests-limit")
_TPM_HEADERS = ("x-ratelimit-limit-tokens", "anthropic-ratelimit-tokens-limit")


def limits_from_headers(headers: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """The (requests, tokens) per minute a provider's response headers state, where stated."""
    lowered = {str(k).lower().removeprefix("llm_provider-"): v for k, v in headers.items()}
    return _first_count(lowered, _RPM_HEADERS), _first_count(lowered, _TPM_HEADERS)


def _first_count(headers: Mapping[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        try:
            value = float(headers[name])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(value) and value >= 1:
            return int(value)
    return None
