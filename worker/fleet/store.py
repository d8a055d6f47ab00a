"""Job state and results in Redis, written so that a terminal outcome is final."""

from __future__ import annotations

from enum import Enum
from typing import Any

import redis

from api_client._cancel import CANCELLED_MESSAGE, LUA_END_JOB, outcome_around_attempts
from api_client._constants import (
    OPEN_JOBS_KEY,
    cancel_key,
    newest_key,
    request_key,
    result_key,
    starts_key,
    state_key,
)
from api_client._schemas import ErrorKind, JobStatus, Outcome
from worker.fleet.scripts import LUA_NOW_MS, ScriptCall

# How long a worker keeps trying to store an outcome that cost a provider call while Redis
# is unreachable, before the job goes back to the queue (and the call is made again).
FINISH_PATIENCE_S = 60.0

# Every script that changes a job's state also scores it in the open jobs (OPEN_JOBS_KEY) with
# the time of the change, which the safety net (worker.fleet.reconcile) reads; the outcome ends it
# (LUA_END_JOB, which also names the keys an end removes).
# KEYS[1] result, KEYS[2] state, KEYS[3] starts, KEYS[4] open jobs, KEYS[5] cancel flag,
# KEYS[6] the newest delivery begun; ARGV[1] state value, ARGV[2] ttl in ms, ARGV[3] job id,
# ARGV[4] and ARGV[5] the cancelled outcome's JSON before and after its attempts, ARGV[6] this
# delivery's number. Returns -1 when the job already has an outcome (a duplicate delivery, or
# a job cancelled or expired while it waited), -2 when it was cancelled while it ran (it ends
# cancelled here, with its failures so far as attempts), -3 when a newer delivery of it has
# begun (this is a stale copy, left by a worker that died after the job came back), else
# the number of times the job has now been started. A job that arrived through Celery gets
# its STARTED record (LUA_CELERY): in the same step, so it never follows the outcome.
_BEGIN = (
    LUA_END_JOB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if redis.call('EXISTS', KEYS[5]) == 1 then
  end_job(ARGV[3], ARGV[4] .. failures_of(ARGV[3]) .. ARGV[5], ARGV[2], 'cancelled')
  return -2
end
if tonumber(ARGV[6]) < tonumber(redis.call('GET', KEYS[6]) or '0') then return -3 end
redis.call('SET', KEYS[6], ARGV[6], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
celery_record(ARGV[3], 'STARTED', 'null', ARGV[2], false)
local starts = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
"""
    + LUA_NOW_MS
    + """
redis.call('ZADD', KEYS[4], now_ms, ARGV[3])
return starts
"""
)

# KEYS[1] result, KEYS[2] state, KEYS[3] open jobs, KEYS[4] request copy, KEYS[5] cancel flag;
# ARGV[1] state value, ARGV[2] ttl in ms, ARGV[3] job id, ARGV[4] provider failures so far
# ('' to leave as is), ARGV[5] and ARGV[6] the cancelled outcome's JSON before and after its
# attempts ('' when a cancel flag does not matter). A non-terminal state never replaces an
# outcome; a job to retry that was cancelled while it ran ends cancelled instead; a job to
# retry that arrived through Celery gets its RETRY record, which an outcome's record, written
# after it, always replaces and never the reverse. Returns 1 when written, 0 when the job has
# an outcome, -2 when it ended cancelled here.
_MARK = (
    LUA_END_JOB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if ARGV[5] ~= '' and redis.call('EXISTS', KEYS[5]) == 1 then
  end_job(ARGV[3], ARGV[5] .. ARGV[4] .. ARGV[6], ARGV[2], 'cancelled')
  return -2
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
"""
    + f"""
if ARGV[1] == '{JobStatus.RETRYING.value}' then
  celery_record(ARGV[3], 'RETRY', 'null', ARGV[2], false)
end
"""
    + LUA_NOW_MS
    + """
redis.call('ZADD', KEYS[3], now_ms, ARGV[3])
if ARGV[4] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('HSET', KEYS[4], 'failures', ARGV[4])
end
return 1
"""
)

# ARGV[1] outcome JSON, ARGV[2] ttl in ms, ARGV[3] job id, ARGV[4] the CONTROL_KEY counter
# of an early end ('' for none): see LUA_END_JOB. The first outcome wins; later ones (a
# redelivered duplicate) are dropped. Returns 1 if stored.
_FINISH = (
    LUA_END_JOB
    + """
if end_job(ARGV[3], ARGV[1], ARGV[2], ARGV[4]) then return 1 end
return 0
"""
)

# KEYS[1] result, KEYS[2] cancel flag; ARGV[1] ttl in ms, ARGV[2] job id, ARGV[3] the job's
# provider failures so far, ARGV[4] and ARGV[5] the cancelled outcome's JSON before and after
# its attempts. Right before a call: returns 0 when the job is still to be called, 1 when it
# has an outcome already, 2 when it was cancelled (it ends cancelled here).
_STILL_WANTED = (
    LUA_END_JOB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  end_job(ARGV[2], ARGV[4] .. ARGV[3] .. ARGV[5], ARGV[1], 'cancelled')
  return 2
end
return 0
"""
)


class NotBegun(Enum):
    """Why a job taken was not begun: it ended before."""

    ENDED = -1  # it already has an outcome: a duplicate delivery, or it was cancelled or
    # expired while it waited
    CANCELLED = -2  # it was cancelled while it ran (its worker died, or it came back): it
    # ends cancelled now
    STALE = -3  # an older copy of a job that has come back since (a worker that put it back
    # in line, or parked it, died before its message was acknowledged): the newer one runs


class Marked(Enum):
    """What marking a job's state did."""

    MARKED = 1
    ENDED = 0  # the job has an outcome: nothing was written
    CANCELLED = -2  # a job to retry was cancelled while it ran: it ended cancelled instead


class Wanted(Enum):
    """Whether a job is still to be called, right before its call."""

    YES = 0
    ENDED = 1  # it has an outcome already
    CANCELLED = 2  # it was cancelled while it waited for its slot: it ended cancelled


def _cancelled_json() -> tuple[str, str]:
    return outcome_around_attempts(ErrorKind.CANCELLED, CANCELLED_MESSAGE)


class JobStore:
    """The worker's view of the job keys the client reads (see api_client._constants)."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_ms = int(ttl_s * 1000)
        self._begin = client.register_script(_BEGIN)
        self._mark = client.register_script(_MARK)
        self._finish = client.register_script(_FINISH)
        self._still_wanted = client.register_script(_STILL_WANTED)

    def begin(
        self, job_ids: list[str], deliveries: list[int] | None = None
    ) -> list[int | NotBegun]:
        """Mark the jobs running, in one round trip; for each, its start count, or why it
        was not begun. ``deliveries``: each one's delivery count (its message's), to drop
        stale copies; none: no copy is stale."""
        pipe = self._client.pipeline(transaction=False)
        before, after = _cancelled_json()
        for job_id, delivery in zip(job_ids, deliveries or [0] * len(job_ids), strict=True):
            self._begin(
                keys=[
                    result_key(job_id),
                    state_key(job_id),
                    starts_key(job_id),
                    OPEN_JOBS_KEY,
                    cancel_key(job_id),
                    newest_key(job_id),
                ],
                args=[JobStatus.RUNNING.value, self._ttl_ms, job_id, before, after, delivery],
                client=pipe,
            )
        found: list[Any] = pipe.execute()
        return [NotBegun(int(starts)) if int(starts) < 0 else int(starts) for starts in found]

    def mark_retrying(self, job_id: str, failures: int) -> Marked:
        """The job failed an attempt (``failures`` provider failures so far) and waits for its
        retry; unless it was cancelled meanwhile, when it ends cancelled instead."""
        return self._set_state(job_id, JobStatus.RETRYING, str(failures), _cancelled_json())

    def mark_waiting(self, job_id: str) -> None:
        """The job waits for rate-limit capacity: queued again, no attempt spent (a cancel
        meanwhile is seen when it is begun again)."""
        self._set_state(job_id, JobStatus.QUEUED, "", ("", ""))

    def _set_state(
        self, job_id: str, status: JobStatus, failures: str, cancelled: tuple[str, str]
    ) -> Marked:
        keys = [
            result_key(job_id),
            state_key(job_id),
            OPEN_JOBS_KEY,
            request_key(job_id),
            cancel_key(job_id),
        ]
        args = [status.value, self._ttl_ms, job_id, failures, *cancelled]
        return Marked(int(self._mark(keys=keys, args=args)))

    def finish(self, job_id: str, outcome: Outcome, counter: str = "") -> ScriptCall[bool]:
        """Returns the script call that stores the outcome unless one is already stored; its
        reply says whether this one was. ``counter``: the CONTROL_KEY counter of a job ended
        early (``cancelled``, ``deadline_exceeded``)."""
        return ScriptCall(
            self._finish,
            keys=[],
            args=[outcome.model_dump_json(), self._ttl_ms, job_id, counter],
            parse=bool,
        )

    def still_wanted(self, job_id: str, failures: int) -> ScriptCall[Wanted]:
        """Returns the script call that checks, right before a job's call, that it is still
        to be made (a job cancelled meanwhile, with ``failures`` so far, ends cancelled)."""
        return ScriptCall(
            self._still_wanted,
            keys=[result_key(job_id), cancel_key(job_id)],
            args=[self._ttl_ms, job_id, failures, *_cancelled_json()],
            parse=lambda reply: Wanted(int(reply)),
        )
