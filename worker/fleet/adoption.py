"""Taking in a job another Celery app sent: its state, request copy and place in line, at once."""

from __future__ import annotations

from enum import Enum

import redis

from api_client._cancel import LUA_END_JOB
from api_client._celery_contract import COPY_CELERY_FIELD, COPY_FOLLOWUP_FIELD
from api_client._constants import request_key, result_key, state_key
from api_client._publish import LUA_OPEN_JOB, queued_args
from api_client._schedule import LANE_NAMES_KEY, LUA_READY, Route
from api_client._schemas import DEFAULT_TENANT, JobStatus
from worker.fleet.scripts import LUA_NOW_MS


class Taken(Enum):
    """What taking in a message another Celery app sent found, and did."""

    DROP = 0  # the job has an outcome, or was taken in already (this is a second copy)
    RUN = 1  # promptq knows the job: the delivery runs as it is
    QUEUED = 2  # taken in: the job waits in the scheduler's line, by its priority and tenant
    FAILED = 3  # taken in and ended: its request is not valid


# KEYS[1] the job's result, KEYS[2] its state, KEYS[3] the lane names; ARGV[1..5] the entry
# (cost|message, '' for an invalid request) and its route (see api_client._publish.QUEUE_IT),
# ARGV[6] the queued state's value, ARGV[7] the ttl in ms, ARGV[8] the job id, ARGV[9] its
# task name, ARGV[10] its request JSON, ARGV[11] its deadline in epoch ms ('' for none),
# ARGV[12] '1' when the message is promptq's own, ARGV[13] its Celery records' tail (''
# when its sender wants no result), ARGV[14] its follow-up message ('' for none), ARGV[15] the
# failed outcome of an invalid request. Returns a Taken value.
_TAKE_IN = (
    LUA_READY
    + LUA_END_JOB
    + LUA_OPEN_JOB
    + LUA_NOW_MS
    + f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return {Taken.DROP.value} end
local copy = '{request_key("")}' .. ARGV[8]
if redis.call('EXISTS', KEYS[2]) == 1 then
  -- The message a Celery app sent for a job taken in already (its worker died before
  -- acknowledging it): the job runs from its own message, in line.
  if ARGV[12] == '0' and redis.call('HEXISTS', copy, '{COPY_CELERY_FIELD}') == 1 then
    return {Taken.DROP.value}
  end
  return {Taken.RUN.value}
end
if ARGV[12] == '1' then return {Taken.RUN.value} end
open_job(ARGV[8], ARGV[9], ARGV[10], ARGV[4], ARGV[11], ARGV[6], ARGV[7], now_ms)
redis.call('HSET', copy, '{COPY_CELERY_FIELD}', ARGV[13])
if ARGV[14] ~= '' then redis.call('HSET', copy, '{COPY_FOLLOWUP_FIELD}', ARGV[14]) end
if ARGV[1] == '' then
  end_job(ARGV[8], ARGV[15], ARGV[7], '')
  return {Taken.FAILED.value}
end
ready_push(ARGV[2], ARGV[3], ARGV[4], ARGV[1], '')
redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[5])
wake()
return {Taken.QUEUED.value}
"""
)


class Adoption:
    """The workers' side of the public Celery contract: jobs that other Celery apps push on
    the queue list are taken into promptq's keys and scheduler on their first delivery."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self._take_in = client.register_script(_TAKE_IN)
        self._ttl_ms = int(ttl_s * 1000)

    def take_in(
        self,
        job_id: str,
        task_name: str,
        *,
        own: bool,
        queued: tuple[Route, bytes, str, int | str] | None,
        failed: str = "",
        records_tail: str = "",
        followup: bytes | None = None,
    ) -> Taken:
        """Take in a job a message pushed on the queue list carries (blocking Redis call).

        ``own``: the message is promptq's own (it runs if its job is known). ``queued``: the
        job's route, its message (as promptq builds it), its request JSON and its deadline in
        epoch ms ('' for none); None for an invalid request, which ends at once with the
        ``failed`` outcome JSON. ``records_tail`` and ``followup``: the Celery fields of its
        request copy (api_client._celery_contract)."""
        deadline_ms: int | str = ""
        if queued is None:
            route_args: list[str | int | bytes] = ["", "", "", DEFAULT_TENANT, ""]
            request_json = ""
        else:
            route, message, request_json, deadline_ms = queued
            route_args = queued_args(route, message, 1)
        args = [
            *route_args,
            JobStatus.QUEUED.value,
            self._ttl_ms,
            job_id,
            task_name,
            request_json,
            deadline_ms,
            "1" if own else "0",
            records_tail,
            followup or b"",
            failed,
        ]
        keys = [result_key(job_id), state_key(job_id), LANE_NAMES_KEY]
        return Taken(int(self._take_in(keys=keys, args=args)))
