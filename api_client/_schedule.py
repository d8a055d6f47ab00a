"""The scheduler's waiting structure in Redis: where queued jobs wait, in what order, and its Lua.

Both sides write it: the client queues new jobs into it; the workers take the next job from
it (worker.fleet.schedule), and put jobs back into it when they come due or must wait for
their rate limit. It is the one place a job waits to run:

- A *lane* is what a job calls: its task kind, its named LLM and its model (``lane_of``).
  Each lane may be *closed* until a time, when its rate limit has no slot free soon: workers
  then take jobs of other lanes, and one of them is woken when it opens.
- In a lane, jobs wait by *priority* (``interactive`` before ``default`` before ``batch``):
  a job of a higher priority is always taken first.
- Within a lane and a priority, *tenants* share by weight (start-time fair queueing): each
  tenant with waiting jobs has a pass (virtual time); the tenant with the lowest pass is served
  next, and its pass grows by the job's cost (its count of jobs) divided by its weight. A
  tenant that was idle starts at the virtual clock, so it neither banks credit while idle
  nor waits behind what others were served meanwhile.
- Within a tenant, jobs are first in, first out: each waits at its *order*, a number the
  structure gives it when it is queued (``promptq:admitted`` counts them). A job taken and put
  back (for its rate limit, or a retry) keeps its order, so it goes back ahead of the jobs
  queued after it and behind the ones queued before it, however many workers put jobs back
  at once; a pack's jobs split apart stand at the pack's order in the pack's order.

Keys (``{lane}`` is a short hash of the lane, ``{rank}`` a priority's rank, 0 = highest):

- ``promptq:lanes``                       zset lane -> Redis ms when it opens (0: open); the
                                          lanes with waiting jobs
- ``promptq:sched:{lane}:{rank}``         zset tenant -> pass; the tenants with waiting jobs
- ``promptq:passes:{lane}:{rank}``        hash tenant -> pass when it last went idle, and
                                          ``@clock``: the pass of the last tenant served
- ``promptq:line:{lane}:{rank}:{tenant}`` zset ``cost|message`` entry -> order; the lowest
                                          is taken first
- ``promptq:admitted``                    the last order given to a job queued
- ``promptq:tenant_weights``              hash tenant -> weight (the workers write it)
- ``promptq:waiting``                     hash ``lane|rank|tenant`` -> jobs waiting, and
  ``promptq:served:{minute}``             hash ``lane|tenant`` -> jobs taken that minute
                                          (UTC minutes since the epoch): for status

Each job queued also pushes a *wake-up* (``WAKE``) on the Celery queue list, which idle
workers block on, unless the list already holds a few: an idle worker wakes and takes from
the structure. Messages pushed on that list directly (a message a dead worker held, a job's
canvas follow-up, another Celery app's job) are taken too, at the default priority; another
Celery app's job is then queued into the structure by its own priority and tenant
(worker.attempt.adopt), and runs when it is taken from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from ._constants import KEY_PREFIX, QUEUE
from ._schemas import PRIORITY_ORDER, JobRequest
from ._task_messages import task_name_of

RANKS: Final = len(PRIORITY_ORDER)  # 0 the highest (Priority.rank)
LANES_KEY: Final = f"{KEY_PREFIX}lanes"
WEIGHTS_KEY: Final = f"{KEY_PREFIX}tenant_weights"
LANE_NAMES_KEY: Final = f"{KEY_PREFIX}lane_names"  # hash lane -> what it calls, for status
WAITING_KEY: Final = f"{KEY_PREFIX}waiting"
# Lanes whose packs the workers split (a configured rate limit): a pack taken there is not
# charged to its tenant as a whole; its jobs are, one by one (worker.attempt.jobs).
SPLIT_LANES_KEY: Final = f"{KEY_PREFIX}split_lanes"
SERVED_PREFIX: Final = f"{KEY_PREFIX}served:"
SERVED_TTL_S: Final = 180
LINE_PATTERN: Final = f"{KEY_PREFIX}line:*"
ADMITTED_KEY: Final = f"{KEY_PREFIX}admitted"
# The Celery queue entry that wakes an idle worker (a JSON string: never a message envelope).
WAKE: Final = b'"promptq:wake"'
# Wake-ups are pushed while the queue list holds fewer entries than this.
WAKE_CAP: Final = 8


def lane_of(task_name: str, llm: str | None, model: str | None) -> str:
    """The lane of a job: a short stable id of what it calls."""
    what = f"{task_name}\x1f{llm or ''}\x1f{model or ''}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def lane_name(task_name: str, llm: str | None, model: str | None) -> str:
    """What a lane calls, as `promptq status` shows it."""
    kind = "embed" if task_name.endswith("embed") else "chat"
    named = f"[llm.{llm}] " if llm else ""
    return f"{kind} {named}{model or '(default model)'}"


def line_key(lane: str, rank: int, tenant: str) -> str:
    return f"{KEY_PREFIX}line:{lane}:{rank}:{tenant}"


def sched_key(lane: str, rank: int) -> str:
    return f"{KEY_PREFIX}sched:{lane}:{rank}"


def passes_key(lane: str, rank: int) -> str:
    return f"{KEY_PREFIX}passes:{lane}:{rank}"


def entry(cost: int, message: bytes | str) -> bytes:
    """A line's entry: the job count the message carries, and the message."""
    raw = message.encode() if isinstance(message, str) else message
    return b"%d|" % cost + raw


def order_arg(order: float | None) -> str:
    """A job's order as the scripts take it ('front' when it is not known)."""
    return "front" if order is None else repr(order)


def message_of(raw_entry: bytes) -> bytes:
    """The message of a line's entry."""
    return raw_entry.split(b"|", 1)[1]


# Lua functions: ready_push(lane, rank, tenant, entry, order) queues an entry in its line at
# ``order`` ('' for a new job: the next order; 'front': ahead of the line, for a job whose
# order is not known) and makes its tenant and lane active; wake() pushes a wake-up unless
# the queue list holds WAKE_CAP entries.
LUA_READY = f"""
local function ready_push(lane, rank, tenant, entry, order)
  local line = '{KEY_PREFIX}line:' .. lane .. ':' .. rank .. ':' .. tenant
  if order == '' then
    order = redis.call('INCR', '{ADMITTED_KEY}')
  elseif order == 'front' then
    local first = redis.call('ZRANGE', line, 0, 0, 'WITHSCORES')
    order = tonumber(first[2] or redis.call('GET', '{ADMITTED_KEY}') or '0') - 1
  end
  -- The same entry twice is the same delivery of the same job: it waits once.
  if redis.call('ZADD', line, 'NX', order, entry) == 0 then return end
  local sched = '{KEY_PREFIX}sched:' .. lane .. ':' .. rank
  if not redis.call('ZSCORE', sched, tenant) then
    local passes = '{KEY_PREFIX}passes:' .. lane .. ':' .. rank
    local idle = tonumber(redis.call('HGET', passes, tenant) or '0')
    local clock = tonumber(redis.call('HGET', passes, '@clock') or '0')
    redis.call('ZADD', sched, math.max(idle, clock), tenant)
  end
  redis.call('ZADD', '{LANES_KEY}', 'NX', 0, lane)
  local cost = tonumber(string.match(entry, '^(%d+)|')) or 1
  redis.call('HINCRBY', '{WAITING_KEY}', lane .. '|' .. rank .. '|' .. tenant, cost)
end
local function wake()
  if redis.call('LLEN', '{QUEUE}') < {WAKE_CAP} then
    redis.call('LPUSH', '{QUEUE}', '{WAKE.decode()}')
  end
end
"""


@dataclass(frozen=True)
class Route:
    """Where a job waits: its lane, its priority's rank and its tenant."""

    lane: str
    rank: int
    tenant: str
    lane_name: str  # what the lane calls, for status

    def args(self) -> list[str | int]:
        """The route as a script's arguments: lane, rank, tenant."""
        return [self.lane, self.rank, self.tenant]


def route_of(request: JobRequest) -> Route:
    """Where ``request``'s job waits."""
    task = task_name_of(request)
    return Route(
        lane=lane_of(task, request.llm, request.model),
        rank=request.priority.rank,
        tenant=request.tenant_name,
        lane_name=lane_name(task, request.llm, request.model),
    )
