"""Job state and results in Redis, written so that a terminal outcome is final."""

from __future__ import annotations

from typing import Any

import redis

from api_client._constants import (
    OPEN_JOBS_KEY,
    request_key,
    result_key,
    starts_key,
    state_key,
)
from api_client._schemas import JobStatus, Outcome
from worker.fleet.scripts import LUA_NOW_MS, ScriptCall

# How long a worker keeps trying to store an outcome that cost a provider call while Redis
# is unreachable, before the job goes back to the queue (and the call is made again).
FINISH_PATIENCE_S = 60.0

# Every script that changes a job's state also scores it in the open jobs (OPEN_JOBS_KEY) with
# the time of the change, which the safety net (worker.fleet.reconcile) reads; the outcome ends it.
# KEYS[1] result, KEYS[2] state, KEYS[3] starts, KEYS[4] open jobs; ARGV[1] state value,
# ARGV[2] ttl in ms, ARGV[3] job id. Returns -1 when the job already has an outcome (a
# duplicate delivery), else the number of times the job has now been started.
_BEGIN = (
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
local starts = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
"""
    + LUA_NOW_MS
    + """
redis.call('ZADD', KEYS[4], now_ms, ARGV[3])
return starts
"""
)

# KEYS[1] result, KEYS[2] state, KEYS[3] open jobs, KEYS[4] request copy; ARGV[1] state value,
# ARGV[2] ttl in ms, ARGV[3] job id, ARGV[4] provider failures so far ('' to leave as is).
# A non-terminal state never replaces an outcome. Returns 1 when written.
_MARK = (
    """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
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

# KEYS[1] result, KEYS[2] state, KEYS[3] starts, KEYS[4] open jobs, KEYS[5] request copy;
# ARGV[1] outcome JSON, ARGV[2] ttl in ms, ARGV[3] job id. The first outcome wins; later ones
# (a redelivered duplicate) are dropped. Returns 1 if stored.
_FINISH = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[5])
  redis.call('ZREM', KEYS[4], ARGV[3])
  return 1
end
return 0
"""


class JobStore:
    """The worker's view of the job keys the client reads (see api_client._constants)."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._client = client
        self._ttl_ms = int(ttl_s * 1000)
        self._begin = client.register_script(_BEGIN)
        self._mark = client.register_script(_MARK)
        self._finish = client.register_script(_FINISH)

    def begin(self, job_ids: list[str]) -> list[int | None]:
        """Mark the jobs running, in one round trip; for each, None if it already has an
        outcome, else its start count."""
        pipe = self._client.pipeline(transaction=False)
        for job_id in job_ids:
            self._begin(
                keys=[result_key(job_id), state_key(job_id), starts_key(job_id), OPEN_JOBS_KEY],
                args=[JobStatus.RUNNING.value, self._ttl_ms, job_id],
                client=pipe,
            )
        found: list[Any] = pipe.execute()
        return [None if int(starts) < 0 else int(starts) for starts in found]

    def mark_retrying(self, job_id: str, failures: int) -> None:
        """The job failed an attempt (``failures`` provider failures so far) and waits for its
        retry."""
        self._set_state(job_id, JobStatus.RETRYING, str(failures))

    def mark_waiting(self, job_id: str) -> None:
        """The job waits for rate-limit capacity: queued again, no attempt spent."""
        self._set_state(job_id, JobStatus.QUEUED, "")

    def _set_state(self, job_id: str, status: JobStatus, failures: str) -> None:
        self._mark(
            keys=[result_key(job_id), state_key(job_id), OPEN_JOBS_KEY, request_key(job_id)],
            args=[status.value, self._ttl_ms, job_id, failures],
        )

    def finish(self, job_id: str, outcome: Outcome) -> ScriptCall[bool]:
        """Returns the script call that stores the outcome unless one is already stored; its
        reply says whether this one was."""
        return ScriptCall(
            self._finish,
            keys=[
                result_key(job_id),
                state_key(job_id),
                starts_key(job_id),
                OPEN_JOBS_KEY,
                request_key(job_id),
            ],
            args=[outcome.model_dump_json(), self._ttl_ms, job_id],
            parse=bool,
        )
