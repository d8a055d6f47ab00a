"""The deadline sweep: jobs still waiting when their deadline passes end as deadline_exceeded."""

from __future__ import annotations

from typing import NamedTuple

import redis

from api_client._cancel import LUA_END_JOB, outcome_around_attempts
from api_client._constants import DEADLINES_KEY, result_key, state_key
from api_client._schemas import ErrorKind, JobStatus
from worker.fleet.scripts import LUA_NOW_MS

# Jobs expired by one sweep at most: a few milliseconds of Redis time.
SWEEP_BATCH = 500
EXPIRED_MESSAGE = "the deadline passed while the job waited to start (queued, in line or parked)"

# KEYS[1] the deadlines (job id -> epoch ms); ARGV[1] how many at most, ARGV[2] the ttl of
# outcomes in ms, ARGV[3] and ARGV[4] the expired outcome's JSON before and after its
# attempts. Each job whose deadline has passed leaves the deadlines; one still waiting (queued
# or retrying) ends deadline_exceeded (LUA_END_JOB), its message left to be dropped when a
# worker takes it. One running is left to its attempt, which checks the deadline before
# calling and before retrying. Returns how many were due and how many of them ended here.
_SWEEP = (
    LUA_END_JOB
    + LUA_NOW_MS
    + f"""
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[1]))
local expired = 0
for _, job_id in ipairs(due) do
  if redis.call('EXISTS', '{result_key("")}' .. job_id) == 0 then
    local state = redis.call('GET', '{state_key("")}' .. job_id)
    if state and state ~= '{JobStatus.RUNNING.value}' then
      local outcome = ARGV[3] .. failures_of(job_id) .. ARGV[4]
      if end_job(job_id, outcome, ARGV[2], '{ErrorKind.DEADLINE_EXCEEDED.value}') then
        expired = expired + 1
      end
    end
  end
  redis.call('ZREM', KEYS[1], job_id)
end
return {{#due, expired}}
"""
)


class Swept(NamedTuple):
    """What one sweep did: how many deadlines were due, and how many jobs it ended."""

    due: int
    expired: int


class DeadlineSweep:
    """Ends the jobs whose deadline passed while they waited; every worker runs it from its
    ParkingMover (one script, so several never end a job twice)."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._sweep = client.register_script(_SWEEP)
        self._ttl_ms = int(ttl_s * 1000)

    def sweep(self, limit: int = SWEEP_BATCH) -> Swept:
        """Expire the jobs whose deadline has passed (at most ``limit`` due deadlines)."""
        before, after = outcome_around_attempts(ErrorKind.DEADLINE_EXCEEDED, EXPIRED_MESSAGE)
        due, expired = self._sweep(keys=[DEADLINES_KEY], args=[limit, self._ttl_ms, before, after])
        return Swept(int(due), int(expired))
