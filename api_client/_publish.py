"""Publishing jobs: the Lua scripts that queue them once, added to a Redis pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._constants import (
    DEADLINES_KEY,
    OPEN_JOBS_KEY,
    request_key,
    result_key,
    state_key,
    tenant_jobs_key,
)
from ._requests import Submission, new_job_id
from ._schedule import LANE_NAMES_KEY, LUA_READY, Route, entry, route_of
from ._schemas import JobStatus
from ._task_messages import _pack_envelope, _task_envelope, request_json, task_name_of

_TENANT_BEFORE, _TENANT_AFTER = tenant_jobs_key("\0").split("\0")
_LUA_NOW_MS = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Lua function open_job(id, task, request, tenant, deadline_ms, queued, ttl_ms, now_ms): what a
# queued job has in Redis beside its message: its state (``queued``), its entry in the open
# jobs, its request copy (task, request JSON, tenant: what the safety net re-publishes it from
# and the job's end reads), its tenant's job set and its deadline (epoch ms, '' for none).
# Returns the copy's key.
LUA_OPEN_JOB = f"""
local function open_job(job_id, task, request, tenant, deadline_ms, queued, ttl_ms, now_ms)
  redis.call('SET', '{state_key("")}' .. job_id, queued, 'PX', ttl_ms)
  redis.call('ZADD', '{OPEN_JOBS_KEY}', now_ms, job_id)
  local copy = '{request_key("")}' .. job_id
  redis.call('HSET', copy, 'task', task, 'request', request, 'tenant', tenant)
  redis.call('PEXPIRE', copy, ttl_ms)
  local tenant_jobs = '{_TENANT_BEFORE}' .. tenant .. '{_TENANT_AFTER}'
  redis.call('SADD', tenant_jobs, job_id)
  redis.call('PEXPIRE', tenant_jobs, ttl_ms)
  if deadline_ms ~= '' then redis.call('ZADD', '{DEADLINES_KEY}', deadline_ms, job_id) end
  return copy
end
"""

# Both scripts end by queueing the message into the scheduler's waiting structure
# (api_client._schedule): ARGV[1..5] are the entry (cost|message), the lane, the priority's
# rank, the tenant and what the lane calls.
QUEUE_IT = """
ready_push(ARGV[2], ARGV[3], ARGV[4], ARGV[1], '')
redis.call('HSETNX', KEYS[#KEYS], ARGV[2], ARGV[5])
wake()
return 1
"""

# KEYS[1] the job's result, KEYS[2] its state, KEYS[3] the lane names; ARGV[1..5] the entry
# and its route (see QUEUE_IT), ARGV[6] the queued state's value, ARGV[7] its ttl in ms,
# ARGV[8] the job id, ARGV[9] its task name, ARGV[10] its request JSON, ARGV[11] its deadline
# in epoch ms ('' for none). Queues a job once: what open_job writes and the message are
# written together, or nothing when the job id already has a result or a state. So a
# pipeline that redis-py sends again after a lost reply, or a second submit with the same
# idempotency key, never queues the job twice, and a crash cannot leave a state without its
# message. Returns 1 when queued, 0 when it existed.
_PUBLISH = (
    LUA_READY
    + LUA_OPEN_JOB
    + _LUA_NOW_MS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
open_job(ARGV[8], ARGV[9], ARGV[10], ARGV[4], ARGV[11], ARGV[6], ARGV[7], now_ms)
"""
    + QUEUE_IT
)


# KEYS[1] the first job's state, KEYS[2] the lane names; ARGV[1..5] the pack's entry and its
# route (see QUEUE_IT), ARGV[6] the queued state's value, ARGV[7] its ttl in ms, then each
# job's id, task name, request JSON and deadline in epoch ms ('' for none). The jobs of a pack
# have new ids and one route: the first one's state guards the whole pack, so a pipeline
# re-sent after a lost reply queues it once.
_PUBLISH_PACK = (
    LUA_READY
    + LUA_OPEN_JOB
    + _LUA_NOW_MS
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for at = 8, #ARGV, 4 do
  open_job(ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[4], ARGV[at + 3], ARGV[6], ARGV[7], now_ms)
end
"""
    + QUEUE_IT
)


def enqueue(pipe: Any, jobs: Sequence[Submission], ttl_s: float, pack_size: int = 1) -> None:
    """Add each job's publish (its queued state, request copy and task message) to a Redis
    pipeline; the packable jobs go in packs of up to ``pack_size`` per message, each pack's
    jobs sharing one route (lane, priority and tenant)."""
    ttl_ms = int(ttl_s * 1000)
    routes = {job.job_id: route_of(job.request) for job in jobs}
    singles = [job for job in jobs if not job.packable]
    by_route: dict[Route, list[Submission]] = {}
    for job in jobs:
        if job.packable:
            by_route.setdefault(routes[job.job_id], []).append(job)
    for route, packable in by_route.items():
        for start in range(0, len(packable), pack_size):
            chunk = packable[start : start + pack_size]
            if len(chunk) == 1:
                singles.append(chunk[0])
                continue
            requests = [request_json(job.request) for job in chunk]
            copies = [
                part
                for job, request in zip(chunk, requests, strict=True)
                for part in (job.job_id, task_name_of(job.request), request, _deadline_ms(job))
            ]
            pipe.eval(
                _PUBLISH_PACK,
                2,
                state_key(chunk[0].job_id),
                LANE_NAMES_KEY,
                *queued_args(route, _pack_envelope(new_job_id(), chunk, requests), len(chunk)),
                JobStatus.QUEUED.value,
                ttl_ms,
                *copies,
            )
    for job in singles:
        request = request_json(job.request)
        message = _task_envelope(job.job_id, job.request, request, {}, retries=0)
        pipe.eval(
            _PUBLISH,
            3,
            result_key(job.job_id),
            state_key(job.job_id),
            LANE_NAMES_KEY,
            *queued_args(routes[job.job_id], message, 1),
            JobStatus.QUEUED.value,
            ttl_ms,
            job.job_id,
            task_name_of(job.request),
            request,
            _deadline_ms(job),
        )


def _deadline_ms(job: Submission) -> int | str:
    """The job's deadline in epoch ms, as the publish scripts take it ('' for none)."""
    deadline_at = job.request.deadline_at
    return "" if deadline_at is None else int(deadline_at * 1000)


def queued_args(route: Route, message: bytes, cost: int) -> list[Any]:
    """The arguments that queue a message on its route (ARGV[1..5] of QUEUE_IT)."""
    return [entry(cost, message), *route.args(), route.lane_name]
