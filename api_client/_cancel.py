"""Cancelling jobs: the cancel script, what it found (CancelResult), and the Lua that ends a job."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ._celery_contract import LUA_CELERY
from ._constants import (
    CONTROL_KEY,
    DEADLINES_KEY,
    OPEN_JOBS_KEY,
    cancel_key,
    newest_key,
    request_key,
    result_key,
    starts_key,
    state_key,
    tenant_jobs_key,
)
from ._errors import InvalidRequest
from ._polling import text_of
from ._schemas import (
    ErrorKind,
    JobError,
    JobStatus,
    Outcome,
    checked_tenant,
)

# Job ids per cancel script: 1,000 jobs take a few milliseconds of Redis time, so no script
# holds Redis up for long, and a pipeline of them cancels 10,000 jobs in one round trip.
CANCEL_CHUNK = 1000
CANCELLED_MESSAGE = "cancelled by the client"

_TENANT_BEFORE, _TENANT_AFTER = tenant_jobs_key("\0").split("\0")

# Lua functions, the keys built from the job's id (see api_client._constants):
# failures_of(id): the provider failures so far, from the job's request copy (0 without one);
# end_job(id, outcome, ttl_ms, counter): stores the terminal outcome (JSON) unless one is
# stored, and then removes the job's state, starts, request copy and cancel flag, its entries
# in the open jobs, the deadlines and its tenant's set, and counts it in CONTROL_KEY under
# ``counter`` ('' for none); for a job that arrived through Celery it also writes its Celery
# record and queues its canvas follow-up (LUA_CELERY). Returns true when it stored the
# outcome. Every end of a job, a worker's finish included, goes through it.
LUA_END_JOB = (
    LUA_CELERY
    + f"""
local function failures_of(job_id)
  return tonumber(redis.call('HGET', '{request_key("")}' .. job_id, 'failures') or '0') or 0
end
local function end_job(job_id, outcome, ttl_ms, counter)
  if not redis.call('SET', '{result_key("")}' .. job_id, outcome, 'NX', 'PX', ttl_ms) then
    return false
  end
  celery_end(job_id, outcome, ttl_ms)
  local copy = '{request_key("")}' .. job_id
  local tenant = redis.call('HGET', copy, 'tenant')
  if tenant then
    redis.call('SREM', '{_TENANT_BEFORE}' .. tenant .. '{_TENANT_AFTER}', job_id)
  end
  redis.call('DEL', '{state_key("")}' .. job_id, '{starts_key("")}' .. job_id, copy,
    '{cancel_key("")}' .. job_id, '{newest_key("")}' .. job_id)
  redis.call('ZREM', '{OPEN_JOBS_KEY}', job_id)
  redis.call('ZREM', '{DEADLINES_KEY}', job_id)
  if counter ~= '' then redis.call('HINCRBY', '{CONTROL_KEY}', counter, 1) end
  return true
end
"""
)

# The outcome of a job ended early carries its attempts so far, which a script fills in: the
# outcome JSON is split around a number no job reaches.
_ATTEMPTS_MARK = 271828182


def outcome_around_attempts(kind: ErrorKind, message: str) -> tuple[str, str]:
    """Returns the JSON of a failed outcome of ``kind`` and ``message``, before and after its
    attempts count: a script joins them around the count."""
    error = JobError(kind=kind, message=message, attempts=_ATTEMPTS_MARK)
    before, after = (
        Outcome(status=JobStatus.FAILED, error=error).model_dump_json().split(str(_ATTEMPTS_MARK))
    )
    return before, after


# ARGV[1] the ttl of outcomes and flags in ms, ARGV[2] and ARGV[3] the cancelled outcome's
# JSON before and after its attempts, ARGV[4] the tenant's job set ('' for none), ARGV[5..]
# the job ids (keys built from each id, as in LUA_END_JOB). For each job: one with an outcome
# is left as it is (its status is returned); one with no state either is unknown; a running
# one gets its cancel flag (it is not retried); any other (queued, retrying) ends cancelled
# here, its message left to be dropped when a worker takes it. The ids not running leave the
# tenant's set. Returns, per job, succeeded, failed, unknown, running or cancelled.
_CANCEL = (
    LUA_END_JOB
    + f"""
local found = {{}}
for i = 5, #ARGV do
  local job_id = ARGV[i]
  local what = nil
  local status = redis.call('GETRANGE', '{result_key("")}' .. job_id, 0, 24)
  if status ~= '' then
    what = string.match(status, '^{{"status":"(%a+)"') or 'failed'
  else
    local state = redis.call('GET', '{state_key("")}' .. job_id)
    if not state then
      what = 'unknown'
    elseif state == '{JobStatus.RUNNING.value}' then
      redis.call('SET', '{cancel_key("")}' .. job_id, '1', 'PX', ARGV[1])
      what = 'running'
    else
      end_job(job_id, ARGV[2] .. failures_of(job_id) .. ARGV[3], ARGV[1], 'cancelled')
      what = 'cancelled'
    end
  end
  if ARGV[4] ~= '' and what ~= 'running' then redis.call('SREM', ARGV[4], job_id) end
  found[#found + 1] = what
end
return found
"""
)


class Cancellation(StrEnum):
    """What cancelling found a job doing, and so did to it."""

    CANCELLED = "cancelled"  # queued, waiting or retrying: it ended now, failed as cancelled
    RUNNING = "running"  # a call was in flight: its outcome stands, but it is not retried
    FINISHED = "finished"  # it already had an outcome, which stays
    UNKNOWN = "unknown"  # no such job (never submitted, or expired)


@dataclass(frozen=True)
class CancelResult:
    """What a cancel did, by job id.

    ``cancelled``: the jobs that were waiting (queued, in line, retrying): each now ends as
    status ``failed``, kind ``cancelled``, and no further call of it is made. ``running``: a
    call was in flight: its outcome is reported as usual, but if it fails the job is not
    retried (it ends ``cancelled``). ``finished``: the jobs that already had an outcome,
    unchanged, with their status. ``unknown``: ids of no job (never submitted, or expired).

    >>> result = client.cancel([job.id for job in jobs])
    >>> result[jobs[0].id]
    <Cancellation.CANCELLED: 'cancelled'>
    """

    cancelled: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    finished: dict[str, JobStatus] = field(default_factory=dict)
    unknown: list[str] = field(default_factory=list)

    def __getitem__(self, job_id: str) -> Cancellation:
        """What cancelling found job ``job_id`` doing; KeyError for an id not asked about."""
        for what, ids in (
            (Cancellation.CANCELLED, self.cancelled),
            (Cancellation.RUNNING, self.running),
            (Cancellation.FINISHED, self.finished),
            (Cancellation.UNKNOWN, self.unknown),
        ):
            if job_id in ids:
                return what
        raise KeyError(job_id)

    def counts(self) -> dict[Cancellation, int]:
        """Returns how many jobs fell in each category."""
        return {
            Cancellation.CANCELLED: len(self.cancelled),
            Cancellation.RUNNING: len(self.running),
            Cancellation.FINISHED: len(self.finished),
            Cancellation.UNKNOWN: len(self.unknown),
        }

    def _add(self, job_ids: Sequence[str], found: Sequence[Any]) -> None:
        """Record a cancel script's reply for ``job_ids``."""
        for job_id, raw in zip(job_ids, found, strict=True):
            what = text_of(raw)
            if what == Cancellation.CANCELLED:
                self.cancelled.append(job_id)
            elif what == Cancellation.RUNNING:
                self.running.append(job_id)
            elif what == Cancellation.UNKNOWN:
                self.unknown.append(job_id)
            else:
                self.finished[job_id] = JobStatus(what)


def cancel_args(job_ids: Sequence[str], ttl_s: float, tenant: str | None = None) -> list[Any]:
    """The arguments of ``eval`` that cancel ``job_ids`` (up to CANCEL_CHUNK), removing the
    ended ones from ``tenant``'s job set when given."""
    before, after = outcome_around_attempts(ErrorKind.CANCELLED, CANCELLED_MESSAGE)
    tenant_key = "" if tenant is None else tenant_jobs_key(tenant)
    return [_CANCEL, 0, int(ttl_s * 1000), before, after, tenant_key, *job_ids]


def chunks(job_ids: Sequence[str]) -> list[Sequence[str]]:
    """``job_ids`` in chunks of CANCEL_CHUNK, one cancel script each."""
    return [job_ids[i : i + CANCEL_CHUNK] for i in range(0, len(job_ids), CANCEL_CHUNK)]


def unique_ids(job_ids: str | Iterable[str], check: Callable[[str], str]) -> list[str]:
    """The job ids to cancel, each once, in order, each checked by ``check`` (InvalidRequest);
    a single id may be given as a string."""
    ids = [job_ids] if isinstance(job_ids, str) else list(job_ids)
    return list(dict.fromkeys(check(job_id) for job_id in ids))


def tenant_to_cancel(tenant: str) -> str:
    """A tenant's name as cancel_tenant takes it ("default" included); InvalidRequest for
    anything else."""
    if not isinstance(tenant, str):
        raise InvalidRequest(f"tenant must be a tenant's name, got {tenant!r:.80}")
    try:
        checked_tenant(tenant)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    return tenant


class ScannedIds:
    """Gathers the job ids an SSCAN of a tenant's set returns into chunks of CANCEL_CHUNK,
    each id once (SSCAN may return a member twice)."""

    def __init__(self) -> None:
        self._seen: set[str] = set()
        self._chunk: list[str] = []

    def add(self, raw: bytes | str) -> list[str] | None:
        """Take one scanned id; returns a chunk once one is full."""
        job_id = text_of(raw)
        if job_id not in self._seen:
            self._seen.add(job_id)
            self._chunk.append(job_id)
        if len(self._chunk) < CANCEL_CHUNK:
            return None
        return self.rest()

    def rest(self) -> list[str]:
        """Returns the ids not yet in a chunk."""
        chunk, self._chunk = self._chunk, []
        return chunk
