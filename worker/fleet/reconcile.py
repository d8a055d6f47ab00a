"""The safety net: open jobs whose message is nowhere are re-published from their stored request.

With reliable takes (worker.fleet.custody) no job should ever lose its message; this exists so that
a future bug strands nothing. Every PROMPTQ_RECONCILE_INTERVAL_S one worker of the fleet (a
lock in Redis) makes a pass: the open jobs (OPEN_JOBS_KEY) unchanged for an interval are
looked for in every place a message can be (the scheduler's structure, the queue and its
priority lists, each worker
process's taken list, kombu's unacked hash, the parked set). One found nowhere becomes a
suspect; a suspect found nowhere again by the next pass, and unchanged meanwhile, is
re-published from its request copy (or failed as worker_lost where no copy was stored), by
one script that checks it is still open and unchanged, so two passes never publish it twice.
A pass reads every message only while some job is a candidate, and stops as soon as all
candidates are found.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import redis
from redis.typing import EncodableT, FieldT

from api_client._constants import (
    OPEN_JOBS_KEY,
    PARKED_KEY,
    PRIORITY_LISTS,
    QUEUE,
    RECONCILE_LOCK_KEY,
    RECOVERY_KEY,
    SUSPECTS_KEY,
    UNACKED_KEY,
    request_key,
    result_key,
    starts_key,
    state_key,
)
from api_client._polling import text_of
from api_client._schemas import ErrorKind, JobError, JobStatus, Outcome
from api_client._task_messages import REQUEST_TYPES, job_ids_of, task_message
from worker.fleet.custody import taken_keys
from worker.fleet.delivery_state import DeliveryState
from worker.fleet.parking import message_of_member
from worker.fleet.schedule import ready_messages
from worker.fleet.scripts import LUA_NOW_MS, redis_now_ms
from worker.fleet.store import JobStore

logger = logging.getLogger("promptq.worker")

MAX_CANDIDATES = 1000  # open jobs looked for in one pass, the longest unchanged first
SCAN_CHUNK = 500  # messages read per round trip

# KEYS[1] result, KEYS[2] state, KEYS[3] open jobs, KEYS[4] suspects, KEYS[5] the queue,
# KEYS[6] recovery counters; ARGV[1] job id, ARGV[2] its open score as the passes saw it,
# ARGV[3] the message to publish. Publishes the job (next in line) only if it is still open,
# unchanged since it was seen, and has no outcome; a job with an outcome, or whose state
# expired, leaves the open jobs. Returns 1 when published, 0 when the job changed meanwhile,
# -1 when it has ended.
_REPUBLISH = (
    LUA_NOW_MS
    + """
redis.call('HDEL', KEYS[4], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return -1
end
local score = redis.call('ZSCORE', KEYS[3], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[3], now_ms, ARGV[1])
redis.call('SET', KEYS[2], 'queued', 'KEEPTTL')
redis.call('RPUSH', KEYS[5], ARGV[3])
redis.call('HINCRBY', KEYS[6], 'jobs_republished', 1)
return 1
"""
)


@dataclass(frozen=True)
class PassReport:
    """What one pass did."""

    candidates: int = 0  # open jobs unchanged for an interval, looked for
    suspects: int = 0  # of those, found nowhere for the first time
    republished: int = 0  # found nowhere twice: published again from the request copy
    abandoned: int = 0  # found nowhere twice with no request copy: failed as worker_lost


class Reconciler:
    """Runs the safety net's passes (``run_pass``), and a daemon thread making one every
    ``interval_s`` when it holds the fleet's lock.

    ``on_recovered(how)`` is called for each job re-published ("republished") or failed for
    want of a request copy ("abandoned").
    """

    def __init__(
        self,
        client: redis.Redis,
        store: JobStore,
        interval_s: float,
        on_recovered: Callable[[str], None] = lambda how: None,
    ) -> None:
        self._client = client
        self._store = store
        self._interval_s = interval_s
        self._on_recovered = on_recovered
        self._republish = client.register_script(_REPUBLISH)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="promptq-reconcile", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def maybe_pass(self) -> PassReport | None:
        """Make a pass if no other worker made one within the interval; None if one did."""
        lock_ms = max(1, int(self._interval_s * 900))  # expires before the next try
        if not self._client.set(RECONCILE_LOCK_KEY, "1", nx=True, px=lock_ms):
            return None
        return self.run_pass()

    def run_pass(self) -> PassReport:
        """Look for the open jobs unchanged for an interval; suspect the ones found nowhere,
        and re-publish the suspects of the last pass found nowhere again."""
        client = self._client
        now_ms = redis_now_ms(client)
        unchanged_since_ms = now_ms - int(self._interval_s * 1000)
        found: list[tuple[bytes, float]] = client.zrangebyscore(  # type: ignore[assignment]
            OPEN_JOBS_KEY, "-inf", unchanged_since_ms, start=0, num=MAX_CANDIDATES, withscores=True
        )
        candidates = {text_of(job_id): int(score) for job_id, score in found}
        if not candidates:
            client.delete(SUSPECTS_KEY)
            return PassReport()
        present = present_jobs(client, set(candidates))
        earlier = {text_of(k): int(v) for k, v in client.hgetall(SUSPECTS_KEY).items()}
        suspects: dict[FieldT, EncodableT] = {}
        republished = abandoned = 0
        for job_id, score in candidates.items():
            if job_id in present:
                continue
            if earlier.get(job_id) != score:  # new, or changed since
                suspects[job_id] = score
                continue
            outcome = self._recover(job_id, score)
            republished += outcome == "republished"
            abandoned += outcome == "abandoned"
        # Found somewhere: looked for again once an interval has passed (a later change, which
        # scores it later, is kept).
        seen = {job_id: score for job_id, score in candidates.items() if job_id in present}
        pipe = client.pipeline(transaction=False)
        if seen:
            pipe.zadd(OPEN_JOBS_KEY, dict.fromkeys(seen, now_ms), xx=True, gt=True)
        pipe.delete(SUSPECTS_KEY)
        if suspects:
            pipe.hset(SUSPECTS_KEY, mapping=suspects)
        pipe.execute()
        return PassReport(len(candidates), len(suspects), republished, abandoned)

    def _recover(self, job_id: str, score: int) -> str | None:
        """Publish a job found nowhere twice again, or fail it when it has no request copy;
        how, or None when it changed or ended meanwhile."""
        client = self._client
        copy = {text_of(k): text_of(v) for k, v in client.hgetall(request_key(job_id)).items()}
        starts = int(client.get(starts_key(job_id)) or 0)
        request_type = REQUEST_TYPES.get(copy.get("task", ""))
        if request_type is None or "request" not in copy:
            return self._abandon(job_id, score)
        try:
            request = request_type.model_validate_json(copy["request"])
            failures = int(copy.get("failures", 0))
        except ValueError:  # pydantic's ValidationError among them
            return self._abandon(job_id, score)
        # The deliveries so far are the job's starts: the new one is no redelivery.
        state = DeliveryState(failures).encode()
        message = task_message(job_id, request, kwargs=state, retries=starts)
        keys = [
            result_key(job_id),
            state_key(job_id),
            OPEN_JOBS_KEY,
            SUSPECTS_KEY,
            QUEUE,
            RECOVERY_KEY,
        ]
        if int(self._republish(keys=keys, args=[job_id, score, message])) != 1:
            return None
        logger.warning(
            "job %s had no message anywhere: published again from its stored request (%d "
            "provider failure(s) so far)",
            job_id,
            failures,
        )
        self._on_recovered("republished")
        return "republished"

    def _abandon(self, job_id: str, score: int) -> str | None:
        current = self._client.zscore(OPEN_JOBS_KEY, job_id)
        if current is None or int(current) != score:
            return None
        error = JobError(
            kind=ErrorKind.WORKER_LOST,
            message="the job's message was lost and no copy of its request was stored to "
            "run it again (submitted by an older promptq client, or not through promptq's)",
            attempts=0,
        )
        if not self._store.finish(job_id, Outcome(status=JobStatus.FAILED, error=error)).run():
            return None
        self._client.hincrby(RECOVERY_KEY, "jobs_abandoned", 1)
        logger.error("job %s had no message anywhere and no stored request: failed", job_id)
        self._on_recovered("abandoned")
        return "abandoned"

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s * random.uniform(0.9, 1.1)):  # noqa: S311
            try:
                report = self.maybe_pass()
            except (redis.RedisError, OSError) as exc:
                logger.warning("the safety net's pass failed (will retry): %s", exc)
                continue
            except Exception:  # a bug here must not end the safety net for good
                logger.exception("the safety net's pass failed (will retry)")
                continue
            if report is not None and report.suspects:
                logger.info("%d open job(s) found with no message; looking again", report.suspects)


def present_jobs(client: redis.Redis, wanted: set[str]) -> set[str]:
    """The ``wanted`` jobs that have a message somewhere.

    Places are read in the order messages move through them (the scheduler's structure, the
    queue list, taken, unacked, parked),
    so a message moving on while they are read is still seen; a job missed by a move the
    other way (back to the queue) is only a suspect until the next pass.
    """
    found: set[str] = set()
    for raw in _messages(client):
        try:
            message = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(message, list) and message:  # an unacked record: [message, ...]
            message = message[0]
        if isinstance(message, dict):
            found.update(job_id for job_id in job_ids_of(message) if job_id in wanted)
        if found == wanted:
            break
    return found


def _messages(client: redis.Redis) -> Iterator[Any]:
    yield from ready_messages(client, SCAN_CHUNK)
    for key in (QUEUE, *PRIORITY_LISTS):
        start = 0
        while chunk := client.lrange(key, start, start + SCAN_CHUNK - 1):
            yield from chunk
            start += len(chunk)
    for key in taken_keys(client):
        yield from client.lrange(key, 0, -1)
    for _tag, record in client.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
        yield record
    for member, _score in client.zscan_iter(PARKED_KEY, count=SCAN_CHUNK):
        message = message_of_member(member)
        if message is not None:
            yield message
