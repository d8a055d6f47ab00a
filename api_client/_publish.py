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

# Both scripts end by queueing the message into the scheduler's waiting structure
# (api_client._schedule): ARGV[1..5] are the entry (cost|message), the lane, the priority's
# rank, the tenant and what the lane calls.
_QUEUE_IT = """
ready_push(ARGV[2], ARGV[3], ARGV[4], ARGV[1], '')
redis.call('HSETNX', KEYS[#KEYS], ARGV[2], ARGV[5])
wake()
return 1
"""

# KEYS[1] the job's result, KEYS[2] its state, KEYS[3] the open jobs, KEYS[4] the job's
# request copy, KEYS[5] its tenant's job set, KEYS[6] the deadlines, KEYS[7] the lane names;
# ARGV[1..5] the entry and its route (see _QUEUE_IT), ARGV[6] the queued state's value,
# ARGV[7] its ttl in ms, ARGV[8] the job id, ARGV[9] its task name, ARGV[10] its request JSON,
# ARGV[11] its deadline in epoch ms ('' for none). Queues a job once: the state, the open-jobs
# entry, the request copy (with its tenant, which the job's end reads), its tenant's and
# deadline's entries and the message are written together, or nothing when the job id already
# has a result or a state. So a pipeline that redis-py sends again after a lost reply, or a
# second submit with the same idempotency key, never queues the job twice, and a crash cannot
# leave a state without its message. Returns 1 when queued, 0 when it existed.
_PUBLISH = (
    LUA_READY
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if not redis.call('SET', KEYS[2], ARGV[6], 'NX', 'PX', ARGV[7]) then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[3], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[8])
redis.call('HSET', KEYS[4], 'task', ARGV[9], 'request', ARGV[10], 'tenant', ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
redis.call('SADD', KEYS[5], ARGV[8])
redis.call('PEXPIRE', KEYS[5], ARGV[7])
if ARGV[11] ~= '' then redis.call('ZADD', KEYS[6], ARGV[11], ARGV[8]) end
"""
    + _QUEUE_IT
)


# KEYS[1] the open jobs, KEYS[2] the tenant's job set, KEYS[3] the deadlines, then each job's
# state and request copy, and last the lane names; ARGV[1..5] the pack's entry and its route
# (see _QUEUE_IT), ARGV[6] the queued state's value, ARGV[7] its ttl in ms, then each job's id,
# task name, request JSON and deadline in epoch ms ('' for none). The jobs of a pack have new
# ids and one route: the first one's state guards the whole pack, so a pipeline re-sent after
# a lost reply queues it once.
_PUBLISH_PACK = (
    LUA_READY
    + """
if not redis.call('SET', KEYS[4], ARGV[6], 'NX', 'PX', ARGV[7]) then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 0, (#KEYS - 4) / 2 - 1 do
  local state, copy, at = KEYS[4 + 2 * i], KEYS[5 + 2 * i], 8 + 4 * i
  redis.call('SET', state, ARGV[6], 'PX', ARGV[7])
  redis.call('HSET', copy, 'task', ARGV[at + 1], 'request', ARGV[at + 2], 'tenant', ARGV[4])
  redis.call('PEXPIRE', copy, ARGV[7])
  redis.call('ZADD', KEYS[1], now_ms, ARGV[at])
  redis.call('SADD', KEYS[2], ARGV[at])
  if ARGV[at + 3] ~= '' then redis.call('ZADD', KEYS[3], ARGV[at + 3], ARGV[at]) end
end
redis.call('PEXPIRE', KEYS[2], ARGV[7])
"""
    + _QUEUE_IT
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
                4 + 2 * len(chunk),
                OPEN_JOBS_KEY,
                tenant_jobs_key(route.tenant),
                DEADLINES_KEY,
                *(key for job in chunk for key in (state_key(job.job_id), request_key(job.job_id))),
                LANE_NAMES_KEY,
                *_queued(route, _pack_envelope(new_job_id(), chunk, requests), len(chunk)),
                JobStatus.QUEUED.value,
                ttl_ms,
                *copies,
            )
    for job in singles:
        request = request_json(job.request)
        message = _task_envelope(job.job_id, job.request, request, {}, retries=0)
        pipe.eval(
            _PUBLISH,
            7,
            result_key(job.job_id),
            state_key(job.job_id),
            OPEN_JOBS_KEY,
            request_key(job.job_id),
            tenant_jobs_key(routes[job.job_id].tenant),
            DEADLINES_KEY,
            LANE_NAMES_KEY,
            *_queued(routes[job.job_id], message, 1),
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


def _queued(route: Route, message: bytes, cost: int) -> list[Any]:
    """The arguments that queue a message on its route (ARGV[1..5] of _QUEUE_IT)."""
    return [entry(cost, message), *route.args(), route.lane_name]
