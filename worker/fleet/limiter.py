"""The fleet-wide rate limiter: per-deployment RPM/TPM budgets kept atomically in Redis."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import redis

from api_client._constants import LIMITER_PREFIX
from worker.fleet.scripts import ScriptCall
from worker.settings import DEFAULT_BURST_S

# A deployment idle this long forgets its state (learned limits included).
STATE_TTL_S = 3600.0
# Token counts are estimates until a call's usage is known: slots reserved far ahead keep
# their estimated size (a refund cannot move them), so over-estimates would space calls too
# widely and refunds would overlap them. Under a token limit, slots are reserved at most this
# far ahead (measured: goodput 0.78 and 5 % 429s with 60 s, 0.99 and none with 3 s).
TOKEN_MAX_AHEAD_S = 5.0
# After a 429 without limit headers, the fleet drops to this fraction of the rate it was
# sending at, and then climbs back by RECOVERY_PER_MINUTE (a fraction of that rate) a minute.
BACKOFF_FACTOR = 0.75
RECOVERY_PER_MINUTE = 0.05
# 429s within this long of a backoff answer requests sent before it: they do not back off again.
BACKOFF_SETTLE_S = 2.0
# Fewer calls than this in the last minute say too little about the rate to back off from:
# the Retry-After pause alone answers such a 429.
BACKOFF_MIN_CALLS = 10

Outcome = Literal["ok", "rate_limited", "error"]

# The state of one deployment is a Redis hash (all times in microseconds of Redis server time):
#   rpm_cfg tpm_cfg          the limits the workers are configured with (0: none)
#   rpm_learned tpm_learned  limits learned from the provider (0: none)
#   rpm_source               "headers" (x-ratelimit-limit-*) or "429" (backed off after a 429)
#   r_tat t_tat              GCRA theoretical arrival times for requests and tokens
#   pause_until              no call starts before this (a Retry-After, shared by the fleet)
#   last_backoff created     when the rate was last lowered; when this state was created
#   minute req tok r429 (and prev_*): this and the previous minute's counts, for status
#   model base               what the deployment is, for status (never the key)
# (worker.fleet.limiter_status reads it for `promptq status`.)
_PRELUDE = """
local function num(v) return tonumber(v) or 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local flat = redis.call('HGETALL', KEYS[1])
local h = {}
for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
if h.created == nil then h.created = now end
local minute = math.floor(now / 60000000)
if num(h.minute) ~= minute then
  if num(h.minute) == minute - 1 then
    h.prev_req, h.prev_tok, h.prev_r429 = num(h.req), num(h.tok), num(h.r429)
  else
    h.prev_req, h.prev_tok, h.prev_r429 = 0, 0, 0
  end
  h.minute, h.req, h.tok, h.r429 = minute, 0, 0, 0
end
local function limit(configured, learned)
  configured, learned = num(configured), num(learned)
  if configured > 0 and learned > 0 then return math.min(configured, learned) end
  return math.max(configured, learned)
end
local function save(ttl_ms)
  local out = {}
  for k, v in pairs(h) do
    out[#out + 1] = k
    out[#out + 1] = type(v) == 'number' and string.format('%.17g', v) or v
  end
  redis.call('HSET', KEYS[1], unpack(out))
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
end
"""

# ARGV: tokens, max_ahead_us, rpm_cfg, tpm_cfg, burst_us, ttl_ms, model, base,
# token_max_ahead_us.
# Returns {granted (1/0), wait_us, rpm, tpm}: a granted call may start after wait_us (its slot
# is reserved); a refused one should ask again in wait_us (nothing is reserved).
_ACQUIRE = (
    _PRELUDE
    + """
h.rpm_cfg, h.tpm_cfg, h.model, h.base = num(ARGV[3]), num(ARGV[4]), ARGV[7], ARGV[8]
local rpm = limit(h.rpm_cfg, h.rpm_learned)
local tpm = limit(h.tpm_cfg, h.tpm_learned)
local burst = num(ARGV[5])
local earliest = math.max(now, num(h.pause_until))
if rpm > 0 then earliest = math.max(earliest, num(h.r_tat) - burst) end
if tpm > 0 then earliest = math.max(earliest, num(h.t_tat) - burst) end
local wait = earliest - now
local max_ahead = num(ARGV[2])
if tpm > 0 then max_ahead = math.min(max_ahead, num(ARGV[9])) end
if wait > max_ahead then
  save(ARGV[6])
  return {0, math.floor(wait - max_ahead), rpm, tpm}
end
if rpm > 0 then h.r_tat = math.max(num(h.r_tat), earliest) + 60000000 / rpm end
if tpm > 0 then h.t_tat = math.max(num(h.t_tat), earliest) + num(ARGV[1]) * 60000000 / tpm end
h.req = num(h.req) + 1
save(ARGV[6])
return {1, math.floor(wait), rpm, tpm}
"""
)

# ARGV: tokens the slot was charged, ttl_ms. Gives back a slot reserved for a call that was
# not made (its job was cancelled, or its deadline passed, while it waited for the slot): the
# deployment's next free slot moves back by one call and its tokens, never before now.
_GIVE_BACK = (
    _PRELUDE
    + """
local rpm = limit(h.rpm_cfg, h.rpm_learned)
local tpm = limit(h.tpm_cfg, h.tpm_learned)
if rpm > 0 and num(h.r_tat) > now then
  h.r_tat = math.max(now, num(h.r_tat) - 60000000 / rpm)
end
if tpm > 0 and num(h.t_tat) > now then
  h.t_tat = math.max(now, num(h.t_tat) - num(ARGV[1]) * 60000000 / tpm)
end
h.req = math.max(0, num(h.req) - 1)
save(ARGV[2])
return 1
"""
)

# ARGV: token correction (charged - reserved), tokens charged, outcome, retry_after_us,
# header rpm, header tpm, adaptive (1/0), ttl_ms, backoff_factor, recovery_per_minute,
# backoff_settle_us, backoff_min_calls. Returns the deployment's {rpm, tpm} afterwards.
_SETTLE = (
    _PRELUDE
    + """
local tpm = limit(h.tpm_cfg, h.tpm_learned)
local correction = num(ARGV[1])
if tpm > 0 and correction ~= 0 then
  local base = num(h.t_tat)
  if correction > 0 then base = math.max(base, now) end
  h.t_tat = base + correction * 60000000 / tpm
end
h.tok = num(h.tok) + num(ARGV[2])
local adaptive = ARGV[7] == '1'
if adaptive and num(ARGV[5]) > 0 then h.rpm_learned, h.rpm_source = num(ARGV[5]), 'headers' end
if adaptive and num(ARGV[6]) > 0 then h.tpm_learned = num(ARGV[6]) end
if ARGV[3] == 'rate_limited' then
  h.r429 = num(h.r429) + 1
  if num(ARGV[4]) > 0 then h.pause_until = math.max(num(h.pause_until), now + num(ARGV[4])) end
  if adaptive and h.rpm_source ~= 'headers' and now - num(h.last_backoff) > num(ARGV[11]) then
    -- No header says what the limit is: back off from the rate the fleet was sending at.
    local seen_us = math.min(now - num(h.created), 60000000)
    local into_minute = (now % 60000000) / 60000000
    local sent = num(h.req) + num(h.prev_req) * (1 - into_minute)
    if sent >= num(ARGV[12]) then
      local rate = sent * 60000000 / math.max(seen_us, 1000000)
      local current = limit(h.rpm_cfg, h.rpm_learned)
      if current > 0 then rate = math.min(rate, current) end
      h.rpm_learned = math.max(1, rate * num(ARGV[9]))
      h.rpm_source, h.last_backoff = '429', now
    end
  end
elseif ARGV[3] == 'ok' and h.rpm_source == '429' then
  -- Each success adds the same step, so the rate grows by a fixed fraction a minute.
  h.rpm_learned = num(h.rpm_learned) + num(ARGV[10])
end
save(ARGV[8])
return {limit(h.rpm_cfg, h.rpm_learned), limit(h.tpm_cfg, h.tpm_learned)}
"""
)


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
    rpm: float  # the deployment's effective limits (0: none)
    tpm: float


class RateLimiter:
    """Shares each deployment's budget between every worker through one Redis hash.

    ``acquire`` reserves a slot for a call (GCRA on requests and tokens, Redis server time)
    no further than ``max_ahead_s`` ahead; ``record`` corrects the token charge with what the
    call really used, learns limits from the provider's headers and 429s (when ``adaptive``),
    and shares a Retry-After with the whole fleet.
    """

    def __init__(self, client: redis.Redis, *, max_ahead_s: float, adaptive: bool) -> None:
        self._max_ahead_us = int(max_ahead_s * 1_000_000)
        self._adaptive = adaptive
        self._acquire = client.register_script(_ACQUIRE)
        self._give_back = client.register_script(_GIVE_BACK)
        self._settle = client.register_script(_SETTLE)
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

    def acquire(self, deployment: Deployment, tokens: int) -> ScriptCall[Grant]:
        """Returns the script call that reserves a slot for one call of about ``tokens``
        tokens, or says when to ask again."""

        def grant_of(reply: Any) -> Grant:
            granted, wait_us, rpm, tpm = reply
            self._tpm_seen[deployment.identity] = float(tpm)
            return Grant(bool(int(granted)), int(wait_us) / 1_000_000, float(rpm), float(tpm))

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
    ) -> ScriptCall[None]:
        """Returns the script call that records how a provider call went: its real token
        charge, the limits the provider stated, any 429."""
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
                BACKOFF_FACTOR,
                RECOVERY_PER_MINUTE,
                int(BACKOFF_SETTLE_S * 1_000_000),
                BACKOFF_MIN_CALLS,
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
