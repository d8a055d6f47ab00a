"""Spending caps: every call's estimated cost reserved in Redis first, its real cost after."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import redis

from api_client._constants import SPEND_PREFIX, budget_key
from api_client._polling import text_of
from worker.errors import BudgetExceeded
from worker.fleet.scripts import ScriptCall

Period = Literal["total", "day", "month"]
# A day's or a month's counter outlives its period long enough to be read in `promptq status`.
PERIOD_TTL_S = {"day": 3 * 86400, "month": 62 * 86400}

# KEYS: the global counter, then the job's budget ("" when none); each a hash of
# spent, reserved (and max for a budget). ARGV[1] the estimate, ARGV[2] the global cap (-1:
# none), ARGV[3] the global counter's ttl in ms (0: none).
# Returns {1} when reserved, else {0, which ("global", "budget" or "no_budget"), spent, max}.
_RESERVE = """
local estimate = tonumber(ARGV[1])
local function over(key, max)
  local spent = tonumber(redis.call('HGET', key, 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', key, 'reserved') or '0')
  return spent + reserved + estimate > max, spent
end
local global_max = tonumber(ARGV[2])
if global_max >= 0 then
  local refused, spent = over(KEYS[1], global_max)
  if refused then return {0, 'global', tostring(spent), ARGV[2]} end
end
if KEYS[2] ~= '' then
  local budget_max = redis.call('HGET', KEYS[2], 'max')
  if not budget_max then return {0, 'no_budget', '0', '0'} end
  local refused, spent = over(KEYS[2], tonumber(budget_max))
  if refused then return {0, 'budget', tostring(spent), budget_max} end
  redis.call('HINCRBYFLOAT', KEYS[2], 'reserved', estimate)
end
redis.call('HINCRBYFLOAT', KEYS[1], 'reserved', estimate)
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return {1}
"""

# KEYS as for _RESERVE; ARGV[1] what was reserved (0: nothing), ARGV[2] the real cost,
# ARGV[3] the global counter's ttl in ms (0: none), ARGV[4] calls made (1, or 0 when the
# reservation is given back unused).
_SETTLE = """
for _, key in ipairs(KEYS) do
  if key ~= '' and (key == KEYS[1] or redis.call('EXISTS', key) == 1) then
    if tonumber(ARGV[1]) ~= 0 then redis.call('HINCRBYFLOAT', key, 'reserved', -ARGV[1]) end
    redis.call('HINCRBYFLOAT', key, 'spent', ARGV[2])
    if tonumber(ARGV[4]) > 0 then redis.call('HINCRBY', key, 'calls', ARGV[4]) end
  end
end
if tonumber(ARGV[3]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


@dataclass(frozen=True)
class Reservation:
    """Money set aside for one call, to be settled with its real cost."""

    global_key: str
    budget_key: str  # "" when the job names no budget
    amount_usd: float


def global_key(period: Period, now: float | None = None) -> str:
    """The fleet's spend counter for the period containing ``now`` (UTC)."""
    if period == "total":
        return f"{SPEND_PREFIX}total"
    stamp = time.gmtime(time.time() if now is None else now)
    if period == "day":
        return f"{SPEND_PREFIX}day:{time.strftime('%Y-%m-%d', stamp)}"
    return f"{SPEND_PREFIX}month:{time.strftime('%Y-%m', stamp)}"


class SpendLedger:
    """Reserves each call's estimated cost against the global cap and its budget, atomically
    for the whole fleet, and books its real cost afterwards.

    The check counts what is spent plus what calls in flight have reserved, so the fleet
    overshoots a cap only by what calls in flight cost beyond their estimates.
    """

    def __init__(self, client: redis.Redis, *, max_usd: float | None, period: Period) -> None:
        self._max_usd = max_usd
        self._period = period
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)

    def applies(self, budget: str | None) -> bool:
        """Whether a call must be priced before it starts."""
        return self._max_usd is not None or budget is not None

    def reserve(self, budget: str | None, estimate_usd: float) -> ScriptCall[Reservation]:
        """Returns the script call that sets ``estimate_usd`` aside (its reply raises
        BudgetExceeded, naming the cap, when there is no room)."""
        key = global_key(self._period)
        budget_redis_key = budget_key(budget) if budget else ""
        cap = -1.0 if self._max_usd is None else self._max_usd

        def reservation_of(answer: Any) -> Reservation:
            if int(answer[0]) != 1:
                raise BudgetExceeded(_refusal(answer, budget, self._period, estimate_usd))
            return Reservation(key, budget_redis_key, estimate_usd)

        return ScriptCall(
            self._reserve,
            keys=[key, budget_redis_key],
            args=[estimate_usd, cap, self._ttl_ms()],
            parse=reservation_of,
        )

    def book(
        self, reservation: Reservation | None, cost_usd: float, budget: str | None
    ) -> ScriptCall[None]:
        """Returns the script call that books a call's real cost (and releases its
        reservation, if it had one)."""
        if reservation is None:
            keys = [global_key(self._period), budget_key(budget) if budget else ""]
            reserved = 0.0
        else:
            keys = [reservation.global_key, reservation.budget_key]
            reserved = reservation.amount_usd
        return ScriptCall(
            self._settle, keys=keys, args=[reserved, cost_usd, self._ttl_ms(), 1], parse=_nothing
        )

    def release(self, reservation: Reservation) -> ScriptCall[None]:
        """Returns the script call that gives a reservation back unused: its call was not
        made (the job was cancelled, or its deadline passed, while it waited for its slot)."""
        keys = [reservation.global_key, reservation.budget_key]
        args = [reservation.amount_usd, 0.0, self._ttl_ms(), 0]
        return ScriptCall(self._settle, keys=keys, args=args, parse=_nothing)

    def _ttl_ms(self) -> int:
        return int(PERIOD_TTL_S.get(self._period, 0) * 1000)


def _nothing(_reply: Any) -> None:
    return None


def _refusal(answer: Any, budget: str | None, period: Period, estimate_usd: float) -> str:
    which, spent, cap = (text_of(part) for part in answer[1:4])
    if which == "no_budget":
        return f"budget {budget!r} does not exist (never created, or expired)"
    where = f"budget {budget!r}" if which == "budget" else "PROMPTQ_MAX_SPEND_USD"
    if which == "global" and period != "total":
        where += f" (per {period})"
    return (
        f"spending cap reached: {where} is ${float(cap):.4f}, ${float(spent):.4f} is spent "
        f"and this call could cost ${estimate_usd:.4f} more"
    )


@dataclass(frozen=True)
class SpendCounter:
    """One period's spend for the whole fleet, as `promptq status` shows it."""

    period: str  # "total", "day:2026-11-25" or "month:2026-11"
    spent_usd: float
    reserved_usd: float  # set aside by calls in flight
    calls: int


def read_spend(client: redis.Redis) -> list[SpendCounter]:
    """Every spend counter in Redis: the total first, then days and months in order."""
    counters = []
    for key in client.scan_iter(match=f"{SPEND_PREFIX}*", count=1000):
        fields = {text_of(k): text_of(v) for k, v in client.hgetall(key).items()}
        counters.append(
            SpendCounter(
                period=text_of(key).removeprefix(SPEND_PREFIX),
                spent_usd=float(fields.get("spent", 0)),
                reserved_usd=float(fields.get("reserved", 0)),
                calls=int(fields.get("calls", 0)),
            )
        )
    return sorted(counters, key=lambda c: (c.period != "total", c.period))
