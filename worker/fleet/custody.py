"""Custody of the messages a worker process takes: its heartbeat, and a dead process's
messages back in the queue.

Each worker process has an id and two keys of its own in Redis: ``taken`` (a list: messages
moved there from the queue by the same BLMOVE that takes them, worker.app.queue_guard) and
``held`` (a hash: delivery tag -> message, for the messages delivered to it and not yet
acknowledged). A message is always in the queue, in one process's ``taken`` or ``held``, in
the parked set or acknowledged; each move is one atomic step. The process beats every tenth
of PROMPTQ_HEARTBEAT_TIMEOUT_S; any live process returns the messages of one that has not
beaten for the timeout to the queue, so a killed worker's jobs run again within about
1.1 x the timeout (kombu's visibility timeout stays as the last resort).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable

import redis

from api_client._constants import (
    PRIORITY_LISTS,
    QUEUE,
    RECOVERY_KEY,
    UNACKED_INDEX_KEY,
    UNACKED_KEY,
    WORKERS_CLOCK_KEY,
    WORKERS_KEY,
    held_key,
    taken_key,
)
from api_client._polling import text_of
from worker.fleet.scripts import LUA_NOW_MS, redis_now_ms

logger = logging.getLogger("promptq.worker")


# A process beats this many times per timeout, and looks for dead ones each time.
BEATS_PER_TIMEOUT = 10
MAX_DEAD_PER_BEAT = 10
FOLD_BATCH = 1000

# move_all(from, to): every message of the list ``from`` to the end of ``to`` that workers take
# next; returns how many.
_MOVE_ALL = """
local function move_all(from, to)
  local moved = 0
  local message = redis.call('RPOP', from)
  while message do
    redis.call('RPUSH', to, message)
    moved = moved + 1
    message = redis.call('RPOP', from)
  end
  return moved
end
"""

# KEYS[1] the process registry, KEYS[2] the fleet's clock, KEYS[3] the queue, KEYS[4..] the
# queue's priority lists; ARGV[1] this process's id, ARGV[2] the timeout in ms, ARGV[3] how
# many dead processes to name at most, ARGV[4] how many messages to fold at most.
# Records this process's beat and names the processes that have not beaten for the timeout.
# When no process has beaten for longer than the timeout (Redis was down, or the whole fleet
# was stopped), every registered process first gets a fresh timeout: a process is presumed
# dead only after the timeout passed with Redis up and the fleet beating. Messages queued with
# a Celery priority are folded into the queue, which is the one list workers take from.
# Returns {1 if this process was not registered (new, or presumed dead meanwhile), dead ids}.
_BEAT = (
    LUA_NOW_MS
    + """
local last = tonumber(redis.call('GET', KEYS[2]) or '0')
if now_ms - last > tonumber(ARGV[2]) then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    redis.call('ZADD', KEYS[1], now_ms, member)
  end
end
redis.call('SET', KEYS[2], now_ms)
local new = redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
for i = 4, #KEYS do
  for _ = 1, tonumber(ARGV[4]) do
    local message = redis.call('RPOP', KEYS[i])
    if not message then break end
    redis.call('LPUSH', KEYS[3], message)
  end
end
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[2]),
                        'LIMIT', 0, tonumber(ARGV[3]))
return {new, dead}
"""
)

# KEYS[1] the process registry, KEYS[2] the process's taken list, KEYS[3] its held hash,
# KEYS[4] kombu's unacked hash, KEYS[5] kombu's unacked index, KEYS[6] the queue, KEYS[7] the
# recovery counters; ARGV[1] the process id, ARGV[2] the timeout in ms ('' for a process
# leaving of its own accord: no check, not counted as dead).
# Returns the process's messages to the queue, where workers take them next: the ones it took
# and the ones delivered to it and still unacknowledged (not acknowledged, nor returned by
# kombu's visibility timeout meanwhile). Returns how many, or -1 when the process beat again
# or another worker recovered it first.
_RECOVER = (
    _MOVE_ALL
    + LUA_NOW_MS
    + """
local dead = ARGV[2] ~= ''
if dead then
  local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not beat or tonumber(beat) > now_ms - tonumber(ARGV[2]) then return -1 end
end
local moved = move_all(KEYS[2], KEYS[6])
local held = redis.call('HGETALL', KEYS[3])
for i = 1, #held, 2 do
  if redis.call('HDEL', KEYS[4], held[i]) == 1 then
    redis.call('ZREM', KEYS[5], held[i])
    redis.call('RPUSH', KEYS[6], held[i + 1])
    moved = moved + 1
  end
end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[1], ARGV[1])
if dead then
  redis.call('HINCRBY', KEYS[7], 'dead_workers', 1)
  redis.call('HINCRBY', KEYS[7], 'messages_returned', moved)
end
return moved
"""
)

# KEYS[1] this process's taken list, KEYS[2] the queue. Returns to the queue what a take whose
# reply never arrived (a dropped connection, a restarted Redis) moved into the list; how many.
_RECLAIM = _MOVE_ALL + "return move_all(KEYS[1], KEYS[2])"


# KEYS[1] this process's held hash, KEYS[2] kombu's unacked hash, KEYS[3] kombu's unacked
# index, KEYS[4] the queue; ARGV[1] 'return' or 'drop', ARGV[2..] delivery tags. Settles
# messages this process could not settle while Redis was out of reach: each one still
# unacknowledged goes back to the queue, where workers take it next ('return': it was never
# run, or its return was lost), or is acknowledged ('drop': its ack was lost). Returns how
# many were still unacknowledged.
_SETTLE = """
local settled = 0
for i = 2, #ARGV do
  local message = redis.call('HGET', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[1], ARGV[i])
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    redis.call('ZREM', KEYS[3], ARGV[i])
    if ARGV[1] == 'return' and message then redis.call('RPUSH', KEYS[4], message) end
    settled = settled + 1
  end
end
return settled
"""


class ProcessCustody:
    """This process's id and keys, and the state of its takes from the queue.

    The consuming channel calls ``before_take`` before each BLMOVE and ``answered`` once its
    reply has been handled; one process has one such take in flight at a time.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.process_id = f"{socket.gethostname()}:{self.pid}:{uuid.uuid4().hex[:8]}"
        self.taken_key = taken_key(self.process_id)
        self.held_key = held_key(self.process_id)
        self.registered = False
        self._unanswered_until: float | None = None  # monotonic: when a lost take expires
        # Delivery tags to settle before the next take (see settle_later): True to return the
        # message to the queue, False to acknowledge it.
        self._unsettled: dict[str, bool] = {}
        self._unsettled_lock = threading.Lock()  # settle_later() runs in task threads too

    def register(self, client: redis.Redis) -> None:
        """Enter the registry (before the first take): from now on, this process's messages
        come back if it dies."""
        client.zadd(WORKERS_KEY, {self.process_id: redis_now_ms(client)})
        self.registered = True

    def before_take(self, client: redis.Redis, block_s: float) -> None:
        """Called before a take that blocks up to ``block_s``. Registers the process, and
        settles the messages it could not (see ``settle_later``), and returns what a take whose
        reply was lost may have moved into its list."""
        if not self.registered:
            self.register(client)
        with self._unsettled_lock:
            unsettled = dict(self._unsettled)
        if unsettled:
            self._settle(client, unsettled)
        if self._unanswered_until is not None:
            # Redis ends a lost take at its own timeout at the latest: after that, nothing more
            # can land in the list, and whatever is there was never delivered.
            time.sleep(max(0.0, self._unanswered_until - time.monotonic()))
            moved = int(client.eval(_RECLAIM, 2, self.taken_key, QUEUE))
            if moved:
                logger.warning(
                    "%d message(s) taken by a lost request went back to the queue", moved
                )
        self._unanswered_until = time.monotonic() + block_s + 0.1

    def settle_later(self, delivery_tags: Iterable[str], *, give_back: bool) -> None:
        """Messages delivered to this process that it could not settle while Redis was out of
        reach, or will never run (the consumer dropped them with its connection): before the
        next take, each goes back to the queue (``give_back``) or is acknowledged. Either way
        it does not wait for the visibility timeout."""
        with self._unsettled_lock:
            self._unsettled.update(dict.fromkeys(delivery_tags, give_back))

    def _settle(self, client: redis.Redis, unsettled: dict[str, bool]) -> None:
        keys = [self.held_key, UNACKED_KEY, UNACKED_INDEX_KEY, QUEUE]
        for mode, give_back in (("return", True), ("drop", False)):
            tags = [tag for tag, back in unsettled.items() if back is give_back]
            if not tags:
                continue
            settled = int(client.eval(_SETTLE, len(keys), *keys, mode, *tags))
            if settled and give_back:
                logger.info(
                    "%d message(s) held through a lost connection went back to the queue", settled
                )
        with self._unsettled_lock:
            for tag, give_back in unsettled.items():
                if self._unsettled.get(tag) is give_back:
                    del self._unsettled[tag]

    def answered(self) -> None:
        """The take's reply has been handled: a message it brought is recorded as delivered
        (or was dropped)."""
        self._unanswered_until = None

    def leave(self, client: redis.Redis) -> int:
        """Leave the registry at a clean stop; returns how many messages were still in this
        process's keys (they go back to the queue)."""
        self.registered = False
        return int(client.eval(_RECOVER, 7, *_recover_keys(self.process_id), self.process_id, ""))


def _recover_keys(process_id: str) -> list[str]:
    return [
        WORKERS_KEY,
        taken_key(process_id),
        held_key(process_id),
        UNACKED_KEY,
        UNACKED_INDEX_KEY,
        QUEUE,
        RECOVERY_KEY,
    ]


def taken_keys(client: redis.Redis) -> list[str]:
    """The taken list of every worker process in the registry (live, or dead and not yet
    recovered)."""
    processes: list[bytes] = client.zrange(WORKERS_KEY, 0, -1)  # type: ignore[assignment]
    return [taken_key(text_of(process_id)) for process_id in processes]


_this_process: ProcessCustody | None = None
_lock = threading.Lock()


def this_process() -> ProcessCustody:
    """The custody of the current process (a new one after a fork)."""
    global _this_process  # noqa: PLW0603  (one per process, made on first use)
    with _lock:
        if _this_process is None or _this_process.pid != os.getpid():
            _this_process = ProcessCustody()
        return _this_process


class Heartbeat:
    """A daemon thread beating for this process and returning dead processes' messages to
    the queue, every ``timeout_s / BEATS_PER_TIMEOUT``.

    ``on_returned(count)`` is called with each dead process's count of returned messages.
    """

    def __init__(
        self,
        client: redis.Redis,
        custody: ProcessCustody,
        timeout_s: float,
        on_returned: Callable[[int], None] = lambda count: None,
    ) -> None:
        self._client = client
        self._custody = custody
        self._timeout_ms = int(timeout_s * 1000)
        self._interval_s = timeout_s / BEATS_PER_TIMEOUT
        self._on_returned = on_returned
        self._beat = client.register_script(_BEAT)
        self._recover = client.register_script(_RECOVER)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Register this process (before it takes anything: else its first take does) and
        beat until the process exits.

        Beating stops at exit, not when the worker stops consuming: a warm shutdown waits for
        the calls in flight, and a process that stopped beating meanwhile would see them
        given to other workers.
        """
        try:
            self._custody.register(self._client)
        except redis.RedisError as exc:
            logger.warning("cannot register this worker process yet (will retry): %s", exc)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="promptq-heartbeat", daemon=True)
            self._thread.start()
            atexit.register(self.stop)

    def stop(self) -> None:
        """Stop beating and leave the registry, returning anything left to the queue (at exit,
        or once an in-process worker has stopped: when it has acknowledged or given back what
        it held)."""
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        atexit.unregister(self.stop)
        self._thread.join(timeout=5)
        try:
            left = self._custody.leave(self._client)
        except redis.RedisError as exc:
            logger.warning("cannot leave the worker registry (others will recover): %s", exc)
            return
        if left:
            logger.warning("%d message(s) held at the stop went back to the queue", left)

    def beat(self) -> list[str]:
        """Beat once; returns the ids of the processes found dead (and recovered)."""
        keys = [WORKERS_KEY, WORKERS_CLOCK_KEY, QUEUE, *PRIORITY_LISTS]
        args: list[str | int] = [
            self._custody.process_id,
            self._timeout_ms,
            MAX_DEAD_PER_BEAT,
            FOLD_BATCH,
        ]
        was_registered = self._custody.registered
        new, dead = self._beat(keys=keys, args=args)
        self._custody.registered = True
        if int(new) and was_registered:  # missing since: presumed dead meanwhile
            logger.warning(
                "this worker process was presumed dead (no heartbeat for %.1f s); its jobs "
                "were given to other workers and may run twice",
                self._timeout_ms / 1000,
            )
        recovered = []
        for raw in dead:
            process_id = text_of(raw)
            moved = int(
                self._recover(keys=_recover_keys(process_id), args=[process_id, self._timeout_ms])
            )
            if moved >= 0:
                recovered.append(process_id)
                logger.warning(
                    "worker process %s stopped beating: %d message(s) went back to the queue",
                    process_id,
                    moved,
                )
                self._on_returned(moved)
        return recovered

    def _run(self) -> None:
        failing = False
        while not self._stopping.wait(self._interval_s):
            try:
                self.beat()
                if failing:
                    logger.info("heartbeats reach Redis again")
                failing = False
            except redis.RedisError as exc:
                if not failing:
                    logger.warning("cannot beat (will retry): %s", exc)
                failing = True
            except Exception:  # a process that stops beating would see its jobs given away
                logger.exception("a heartbeat failed (will retry)")
