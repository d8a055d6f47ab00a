"""Publishing jobs: the Lua scripts that queue them once, added to a Redis pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._constants import OPEN_JOBS_KEY, QUEUE, request_key, result_key, state_key
from ._requests import Submission, new_job_id
from ._schemas import JobStatus
from ._task_messages import _pack_envelope, _task_envelope, request_json, task_name_of

# KEYS[1] the job's result, KEYS[2] its state, KEYS[3] the queue, KEYS[4] the open jobs,
# KEYS[5] the job's request copy; ARGV[1] the task message, ARGV[2] the queued state's value,
# ARGV[3] its ttl in ms, ARGV[4] the job id, ARGV[5] its task name, ARGV[6] its request JSON.
# Queues a job once: the state, the open-jobs entry, the request copy and the message are
# written together, or nothing when the job id already has a result or a state. So a pipeline
# that redis-py sends again after a lost reply, or a second submit with the same idempotency
# key, never queues the job twice, and a crash cannot leave a state without its message.
# Returns 1 when queued, 0 when it existed.
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if not redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return 0 end
local t = redis.call('TIME')
redis.call('ZADD', KEYS[4], tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), ARGV[4])
redis.call('HSET', KEYS[5], 'task', ARGV[5], 'request', ARGV[6])
redis.call('PEXPIRE', KEYS[5], ARGV[3])
redis.call('LPUSH', KEYS[3], ARGV[1])
return 1
"""


# KEYS[1] the queue, KEYS[2] the open jobs, then each job's state and request copy; ARGV[1] the
# pack's message, ARGV[2] the queued state's value, ARGV[3] its ttl in ms, then each job's id,
# task name and request JSON. The jobs of a pack have new ids: the first one's state guards
# the whole pack, so a pipeline re-sent after a lost reply pushes it once.
_PUBLISH_PACK = """
if not redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ARGV[3]) then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 0, (#KEYS - 2) / 2 - 1 do
  local state, copy, at = KEYS[3 + 2 * i], KEYS[4 + 2 * i], 4 + 3 * i
  redis.call('SET', state, ARGV[2], 'PX', ARGV[3])
  redis.call('HSET', copy, 'task', ARGV[at + 1], 'request', ARGV[at + 2])
  redis.call('PEXPIRE', copy, ARGV[3])
  redis.call('ZADD', KEYS[2], now_ms, ARGV[at])
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return 1
"""


def enqueue(pipe: Any, jobs: Sequence[Submission], ttl_s: float, pack_size: int = 1) -> None:
    """Add each job's publish (its queued state, request copy and task message) to a Redis
    pipeline; the packable jobs go in packs of up to ``pack_size`` per message."""
    ttl_ms = int(ttl_s * 1000)
    packable = [job for job in jobs if job.packable]
    singles = [job for job in jobs if not job.packable]
    for start in range(0, len(packable), pack_size):
        chunk = packable[start : start + pack_size]
        if len(chunk) == 1:
            singles.append(chunk[0])
            continue
        requests = [request_json(job.request) for job in chunk]
        copies = [
            part
            for job, request in zip(chunk, requests, strict=True)
            for part in (job.job_id, task_name_of(job.request), request)
        ]
        pipe.eval(
            _PUBLISH_PACK,
            2 + 2 * len(chunk),
            QUEUE,
            OPEN_JOBS_KEY,
            *(key for job in chunk for key in (state_key(job.job_id), request_key(job.job_id))),
            _pack_envelope(new_job_id(), chunk, requests),
            JobStatus.QUEUED.value,
            ttl_ms,
            *copies,
        )
    for job in singles:
        request = request_json(job.request)
        pipe.eval(
            _PUBLISH,
            5,
            result_key(job.job_id),
            state_key(job.job_id),
            QUEUE,
            OPEN_JOBS_KEY,
            request_key(job.job_id),
            _task_envelope(job.job_id, job.request, request, {}, retries=0),
            JobStatus.QUEUED.value,
            ttl_ms,
            job.job_id,
            task_name_of(job.request),
            request,
        )
