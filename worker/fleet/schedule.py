"""Taking the next job from the scheduler's waiting structure, and putting jobs back into it.

The structure and its order are described in api_client._schedule. A worker process takes
with ``claim`` (one script: the best job of an open lane, or a message pushed on the Celery
queue list, moved into the process's taken list in the same step, worker.fleet.custody;
another Celery app's job taken so is then queued into the structure, worker.attempt.adopt);
a job whose rate limit has no slot soon goes back with ``put_back``, at its order in its
line, and closes its lane until a slot is near.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import redis

from api_client._constants import KEY_PREFIX, PARKED_KEY, QUEUE
from api_client._schedule import (
    LANES_KEY,
    LINE_PATTERN,
    LUA_READY,
    RANKS,
    SERVED_PREFIX,
    SERVED_TTL_S,
    SPLIT_LANES_KEY,
    WAITING_KEY,
    WAKE,
    WEIGHTS_KEY,
    Route,
    entry,
    message_of,
    order_arg,
)
from worker.fleet.limiter_scripts import STATE_TTL_S
from worker.fleet.scripts import LUA_NOW_MS, ScriptCall

# The header a worker process adds to a message it delivers from a claim: the job's order in
# its line (Claimed.order), which its task reads to put it back at the same place.
ORDER_HEADER = "promptq_order"

# How many wake-ups a claim pops at most from the right end of the queue list to find a
# message under them.
_MAX_WAKES_POPPED = 64

# KEYS[1] the lanes, KEYS[2] the queue list, KEYS[3] this process's taken list, KEYS[4] the
# tenants' weights; ARGV[1] a wake-up to remove from the taken list first ('' for none).
# Moves the next job into the taken list and returns {message, its order} (nil when none can
# be taken now): the best of the open lanes (highest priority, then the tenant with the lowest
# pass, then its lowest order), or {message} for a message pushed on the queue list itself,
# which ranks as the default priority and goes before the structure's jobs of that priority.
_CLAIM = (
    LUA_NOW_MS
    + f"""
if ARGV[1] ~= '' then redis.call('LREM', KEYS[3], 1, ARGV[1]) end
local pushed = redis.call('LINDEX', KEYS[2], -1)
local popped = 0
while pushed == '{WAKE.decode()}' and popped < {_MAX_WAKES_POPPED} do
  redis.call('RPOP', KEYS[2])
  popped = popped + 1
  pushed = redis.call('LINDEX', KEYS[2], -1)
end
if pushed == '{WAKE.decode()}' then pushed = false end
local best_rank, best_lane = {RANKS}, nil
local limit = pushed and 1 or best_rank
for _, lane in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms)) do
  for rank = 0, math.min(best_rank, limit) - 1 do
    if redis.call('EXISTS', '{KEY_PREFIX}sched:' .. lane .. ':' .. rank) == 1 then
      best_rank, best_lane = rank, lane
      break
    end
  end
  if best_rank == 0 then break end
end
if not best_lane then
  if not pushed then return false end
  redis.call('RPOP', KEYS[2])
  redis.call('LPUSH', KEYS[3], pushed)
  return {{pushed}}
end
local sched = '{KEY_PREFIX}sched:' .. best_lane .. ':' .. best_rank
local passes = '{KEY_PREFIX}passes:' .. best_lane .. ':' .. best_rank
while true do
  local first = redis.call('ZRANGE', sched, 0, 0, 'WITHSCORES')
  if #first == 0 then break end
  local tenant, pass = first[1], tonumber(first[2])
  local line = '{KEY_PREFIX}line:' .. best_lane .. ':' .. best_rank .. ':' .. tenant
  local taken = redis.call('ZPOPMIN', line)
  if #taken > 0 then
    local item, order = taken[1], taken[2]
    local bar = string.find(item, '|', 1, true)
    local cost = tonumber(string.sub(item, 1, bar - 1))
    local message = string.sub(item, bar + 1)
    local weight = tonumber(redis.call('HGET', KEYS[4], tenant) or '1') or 1
    local counted = best_lane .. '|' .. best_rank .. '|' .. tenant
    if redis.call('HINCRBY', '{WAITING_KEY}', counted, -cost) <= 0 then
      redis.call('HDEL', '{WAITING_KEY}', counted)
    end
    local charged = cost
    if cost > 1 and redis.call('SISMEMBER', '{SPLIT_LANES_KEY}', best_lane) == 1 then
      charged = 0  -- a pack its worker splits: each job is charged when it is taken alone
    end
    if charged > 0 then
      local served = '{SERVED_PREFIX}' .. math.floor(now_ms / 60000)
      redis.call('HINCRBY', served, best_lane .. '|' .. tenant, charged)
      redis.call('EXPIRE', served, {SERVED_TTL_S})
    end
    local after = pass + charged / weight
    redis.call('HSET', passes, '@clock', pass)
    if redis.call('ZCARD', line) == 0 then
      redis.call('ZREM', sched, tenant)
      redis.call('HSET', passes, tenant, after)
    else
      redis.call('ZADD', sched, after, tenant)
    end
    local waiting = false
    for rank = 0, {RANKS - 1} do
      if redis.call('EXISTS', '{KEY_PREFIX}sched:' .. best_lane .. ':' .. rank) == 1 then
        waiting = true
        break
      end
    end
    if waiting then
      redis.call('ZADD', KEYS[1], now_ms, best_lane)
    else
      redis.call('ZREM', KEYS[1], best_lane)
    end
    redis.call('LPUSH', KEYS[3], message)
    return {{message, order}}
  end
  redis.call('ZREM', sched, tenant)
end
redis.call('ZREM', KEYS[1], best_lane)
return false
"""
)

# KEYS[1] the lanes, KEYS[2] the parked set, KEYS[3] the tenants' weights; ARGV[1..3] the
# route (lane, rank, tenant), ARGV[4] the entry (cost|message), ARGV[5] its order ('front'
# when not known), ARGV[6] ms until the lane opens (0: it is open), ARGV[7] the jobs to
# refund. Queues the job again at its order in its line, gives its tenant back the pass its
# take cost (from the pass its take left, even if its line emptied meanwhile: a tenant whose
# jobs are all out waiting for slots has not been idle), and closes the lane until it opens,
# when a parked wake-up brings a worker back to it.
_PUT_BACK = (
    LUA_READY
    + LUA_NOW_MS
    + f"""
local lane, rank, tenant = ARGV[1], ARGV[2], ARGV[3]
local sched = '{KEY_PREFIX}sched:' .. lane .. ':' .. rank
-- The tenant's pass as its take left it (in the set, or stored when its line emptied): the
-- job is undone, not a new arrival, so the tenant keeps its place in the share.
local pass = tonumber(redis.call('ZSCORE', sched, tenant))
if not pass then
  local passes = '{KEY_PREFIX}passes:' .. lane .. ':' .. rank
  pass = tonumber(redis.call('HGET', passes, tenant) or redis.call('HGET', passes, '@clock') or '0')
end
ready_push(lane, rank, tenant, ARGV[4], ARGV[5])
local weight = tonumber(redis.call('HGET', KEYS[3], tenant) or '1') or 1
redis.call('ZADD', sched, pass - tonumber(ARGV[7]) / weight, tenant)
-- Nor was it served: the shares count the jobs that went on to their call.
if tonumber(ARGV[7]) > 0 then
  local served = '{SERVED_PREFIX}' .. math.floor(now_ms / 60000)
  if redis.call('HINCRBY', served, lane .. '|' .. tenant, -tonumber(ARGV[7])) <= 0 then
    redis.call('HDEL', served, lane .. '|' .. tenant)
  end
end
local closed_ms = tonumber(ARGV[6])
if closed_ms > 0 then
  local open_at = now_ms + closed_ms
  redis.call('ZADD', KEYS[1], open_at, lane)
  redis.call('ZADD', KEYS[2], open_at, 'W|' .. lane)
end
return 1
"""
)


# The lines of promptq before jobs had orders: lists ``promptq:ready:{lane}:{rank}:{tenant}``
# of entries, the next taken from the right.
_OLDER_LINES_PATTERN = f"{KEY_PREFIX}ready:*"

# KEYS: lines of an older promptq. Moves each one's entries into the line of today, in their
# order, behind what waits there (they keep their tenant's place and their waiting counts).
_ADOPT = (
    LUA_READY
    + f"""
local moved = 0
for _, key in ipairs(KEYS) do
  local lane, rank, tenant = string.match(key, '^{KEY_PREFIX}ready:([^:]*):([^:]*):(.*)$')
  while lane do
    local item = redis.call('RPOP', key)
    if not item then break end
    local cost = tonumber(string.match(item, '^(%d+)|')) or 1
    redis.call('HINCRBY', '{WAITING_KEY}', lane .. '|' .. rank .. '|' .. tenant, -cost)
    ready_push(lane, rank, tenant, item, '')
    moved = moved + 1
  end
end
return moved
"""
)

CLAIM_SCRIPT = _CLAIM
CLAIM_SHA = hashlib.sha1(_CLAIM.encode()).hexdigest()  # noqa: S324  (Redis names scripts so)


def claim_keys(taken_key: str) -> list[str]:
    """The keys of the claim script, for a process taking into ``taken_key``."""
    return [LANES_KEY, QUEUE, taken_key, WEIGHTS_KEY]


class Claimed(NamedTuple):
    """A job taken: its message, and its order in its line (None: not known, for a message
    pushed on the queue list)."""

    message: bytes
    order: float | None


def claimed(reply: Any) -> Claimed | None:
    """The claim script's reply, read (None: nothing could be taken)."""
    if not reply:
        return None
    message, *order = reply
    return Claimed(bytes(message), float(order[0]) if order else None)


class Scheduler:
    """The workers' side of the waiting structure: take, put back, publish tenant weights."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._claim = client.register_script(_CLAIM)
        self._put_back = client.register_script(_PUT_BACK)
        self._adopt = client.register_script(_ADOPT)

    def claim(self, taken_key: str, drop_wake: bool = False) -> Claimed | None:
        """Move the next job into ``taken_key`` and return it (None: none now), removing a
        wake-up from the taken list first when ``drop_wake``."""
        return claimed(self._claim(keys=claim_keys(taken_key), args=[WAKE if drop_wake else b""]))

    def put_back(
        self,
        route: Route,
        message: bytes,
        cost: int,
        closed_s: float,
        *,
        order: float | None,
        refund: int | None = None,
    ) -> ScriptCall[None]:
        """Queue ``message`` again at ``order`` in its line (None: ahead of it), its tenant's
        pass given back for ``refund`` jobs (default: ``cost``, what its take was charged),
        and close its lane for ``closed_s`` (0: leave it open)."""
        refunded = cost if refund is None else refund
        closed_ms = max(0, int(closed_s * 1000))
        args = [*route.args(), entry(cost, message), order_arg(order), closed_ms, refunded]
        return ScriptCall(
            self._put_back, [LANES_KEY, PARKED_KEY, WEIGHTS_KEY], args, lambda reply: None
        )

    def split_lane(self, lane: str) -> bool:
        """Record that packs of ``lane`` are split by the workers that take them (so a pack
        taken there is not charged as a whole); whether it was recorded before."""
        pipe = self._client.pipeline()
        pipe.sadd(SPLIT_LANES_KEY, lane)
        pipe.expire(SPLIT_LANES_KEY, int(STATE_TTL_S))
        added, _ = pipe.execute()
        return not added

    def adopt_older_lines(self) -> int:
        """Move the jobs an older promptq queued (in lines without orders) into today's
        lines; how many moved. A worker does it when it starts."""
        keys = list(self._client.scan_iter(match=_OLDER_LINES_PATTERN))
        return int(self._adopt(keys=keys)) if keys else 0

    def publish_weights(self, weights: Mapping[str, float]) -> None:
        """Write the tenants' weights the fleet schedules by (this worker's settings)."""
        pipe = self._client.pipeline()
        pipe.delete(WEIGHTS_KEY)
        if weights:
            pipe.hset(WEIGHTS_KEY, mapping={str(name): float(w) for name, w in weights.items()})
        pipe.execute()


def ready_messages(client: redis.Redis, chunk: int = 500) -> Iterator[bytes]:
    """Every message waiting in the structure (read in chunks; a job may move meanwhile)."""
    for key in client.scan_iter(match=LINE_PATTERN, count=chunk):
        for item, _ in client.zscan_iter(key, count=chunk):
            yield message_of(item)


def queued_count(client: redis.Redis) -> int:
    """How many messages wait to be taken: in the structure, and pushed on the queue list
    (its wake-ups are not messages)."""
    keys = list(client.scan_iter(match=LINE_PATTERN))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.zcard(key)
    pipe.llen(QUEUE)
    pipe.lpos(QUEUE, WAKE.decode(), count=0)
    *lengths, wakes = pipe.execute()
    return sum(int(n) for n in lengths) - len(wakes or [])
