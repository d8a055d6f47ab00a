"""Jobs waiting to come back (retries, hand-backs): parked in Redis until due, then scheduled."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import redis

from api_client._constants import PARKED_KEY, QUEUE
from api_client._schedule import LUA_READY, Route, entry, order_arg
from worker.fleet.deadlines import SWEEP_BATCH, DeadlineSweep
from worker.fleet.scripts import LUA_NOW_MS

# How often at most each worker moves due jobs back to the queue, how many at a time at most,
# and how long it waits at most to look again when nothing parked is due sooner (it is woken
# at once when it parks a job itself).
MOVE_INTERVAL_S = 0.05
MOVE_BATCH = 500
IDLE_CHECK_S = 0.25
# How often each worker's mover also runs the deadline sweep (worker.fleet.deadlines): a job
# waiting past its deadline ends within about this long after it.
SWEEP_INTERVAL_S = 1.0

logger = logging.getLogger("promptq.worker")

# KEYS[1] the parked set; ARGV[1] the member (see below), ARGV[2] delay in ms. Scores are
# Redis time in ms.
_PARK = (
    LUA_NOW_MS
    + """
redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# Members of the parked set: ``Q|lane|rank|tenant|order|cost|message``, a job that goes back
# into the scheduler's structure (api_client._schedule) at its order in its line ('front':
# ahead of it); ``W|lane``, a wake-up for a lane that opens (worker.fleet.schedule); from an
# older promptq, ``R|lane|rank|tenant|cost|message`` (a job that goes back ahead of its line)
# and anything else, a message pushed on the queue list as it is.
# KEYS[1] the parked set, KEYS[2] the queue; ARGV[1] how many at most. Returns how many moved
# and the ms until the next parked member is due (-1: none is parked).
_MOVE_DUE = (
    LUA_READY
    + LUA_NOW_MS
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
-- The latest due first: of jobs going back ahead of their line, the earliest is taken first.
for i = #due, 1, -1 do
  local member = due[i]
  local kind = string.sub(member, 1, 2)
  if kind == 'Q|' then
    local lane, rank, tenant, order, rest =
      string.match(member, '^Q|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    ready_push(lane, rank, tenant, rest, order)
    wake()
  elseif kind == 'R|' then
    local lane, rank, tenant, rest = string.match(member, '^R|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    ready_push(lane, rank, tenant, rest, 'front')
    wake()
  elseif kind == 'W|' then
    wake()
  else
    redis.call('RPUSH', KEYS[2], member)
  end
  redis.call('ZREM', KEYS[1], member)
end
local next = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #next == 0 then return {#due, -1} end
return {#due, math.max(0, tonumber(next[2]) - now_ms)}
"""
)


def parked_member(route: Route, message: bytes, order: float | None, cost: int = 1) -> bytes:
    """The parked set's member for a job on ``route`` at ``order`` (see _MOVE_DUE)."""
    where = f"Q|{route.lane}|{route.rank}|{route.tenant}|{order_arg(order)}|"
    return where.encode() + entry(cost, message)


class RoutedMember(NamedTuple):
    """A parked job's member, read: where it goes back to, its job count and its message."""

    lane: str
    rank: int
    tenant: str
    cost: int
    message: bytes


def routed_member(member: bytes) -> RoutedMember | None:
    """A parked member of a job with a route, read (None for a wake-up or an older
    promptq's message)."""
    if member.startswith(b"Q|"):
        _, lane, rank, tenant, _order, cost, message = member.split(b"|", 6)
    elif member.startswith(b"R|"):
        _, lane, rank, tenant, cost, message = member.split(b"|", 5)
    else:
        return None
    return RoutedMember(lane.decode(), int(rank), tenant.decode(), int(cost), message)


def message_of_member(member: bytes) -> bytes | None:
    """The message a parked member carries (None for a wake-up)."""
    if member.startswith(b"W|"):
        return None
    routed = routed_member(member)
    return member if routed is None else routed.message


class Moved(NamedTuple):
    """What one move did: how many jobs it queued, and when the next is due (None: none is
    parked)."""

    moved: int
    next_due_s: float | None


class Parking:
    """The parked set: ``park`` a task message for a while; ``move_due`` requeues the due ones.

    Parked jobs live in Redis, not in worker memory: a fleet can hold any number of them, and
    a worker that stops loses none.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._park = client.register_script(_PARK)
        self._move_due = client.register_script(_MOVE_DUE)
        self.parked = threading.Event()  # set by park(): wakes this process's mover

    def park(self, route: Route, message: bytes, delay_s: float, *, order: float | None) -> None:
        """Park a job's message for ``delay_s``: then it goes back to the scheduler on
        ``route``, at ``order`` in its line (None: ahead of it)."""
        member = parked_member(route, message, order)
        self._park(keys=[PARKED_KEY], args=[member, max(0, int(delay_s * 1000))])
        self.parked.set()

    def move_due(self, limit: int = MOVE_BATCH) -> Moved:
        """Queue the parked messages that are due (at most ``limit``)."""
        count, next_in_ms = self._move_due(keys=[PARKED_KEY, QUEUE], args=[limit])
        return Moved(int(count), None if int(next_in_ms) < 0 else int(next_in_ms) / 1000)


class ParkingMover:
    """A daemon thread moving due parked jobs back to the queue as they come due (at most
    every MOVE_INTERVAL_S; when none is due sooner, it looks again after IDLE_CHECK_S, or at
    once when this process parks a job), and running the deadline sweep every
    SWEEP_INTERVAL_S (at once again while a sweep finds a full batch due).

    Every worker runs one; the move and the sweep are Lua scripts, so several never move or
    end a job twice.
    """

    def __init__(
        self,
        parking: Parking,
        interval_s: float = MOVE_INTERVAL_S,
        sweep: DeadlineSweep | None = None,
        on_expired: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._parking = parking
        self._interval_s = interval_s
        self._sweep = sweep
        self._on_expired = on_expired
        self._next_sweep = 0.0  # time.monotonic() of the next sweep
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="promptq-parking", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._parking.parked.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            self._parking.parked.clear()
            wait_s = self._interval_s
            try:
                moved = self._parking.move_due()
                while moved.moved >= MOVE_BATCH:  # a backlog came due: keep moving
                    moved = self._parking.move_due()
                if moved.next_due_s is None or moved.next_due_s > self._interval_s:
                    wait_s = min(IDLE_CHECK_S, moved.next_due_s or IDLE_CHECK_S)
                self._sweep_if_due()
                if failing:
                    logger.info("parked jobs are being moved to the queue again")
                failing = False
            except redis.RedisError as exc:
                if not failing:  # once per outage, not every interval
                    logger.warning("cannot move parked jobs to the queue (will retry): %s", exc)
                failing = True
            self._parking.parked.wait(wait_s)

    def _sweep_if_due(self) -> None:
        """Run the deadline sweep once its interval has passed (a full batch: again next tick)."""
        if self._sweep is None or time.monotonic() < self._next_sweep:
            return
        swept = self._sweep.sweep()
        if swept.expired:
            self._on_expired(swept.expired)
            logger.info("%d job(s) passed their deadline while waiting: ended", swept.expired)
        pause_s = 0.0 if swept.due >= SWEEP_BATCH else SWEEP_INTERVAL_S
        self._next_sweep = time.monotonic() + pause_s
