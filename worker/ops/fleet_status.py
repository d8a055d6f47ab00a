"""What `promptq status` shows: queue depth, messages in flight, held retries, workers, jobs,
the scheduler's lanes, jobs ended early, and what was recovered from dead workers and by the
safety net."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from api_client._constants import (
    CONTROL_KEY,
    PARKED_KEY,
    PRIORITY_LISTS,
    RECOVERY_KEY,
    STATE_PATTERN,
    SUSPECTS_KEY,
    UNACKED_KEY,
    WORKERS_KEY,
)
from api_client._errors import BrokerUnavailable
from api_client._polling import broker_errors, redact_url, text_of
from api_client._schemas import JobStatus
from worker.fleet.custody import taken_keys
from worker.fleet.limiter_status import LimiterState, read_limiters
from worker.fleet.schedule import queued_count
from worker.fleet.spend import SpendCounter, read_spend
from worker.ops.schedule_status import ScheduleStatus, read_schedule, schedule_lines

SCAN_COUNT = 1000
MAX_SCANNED_KEYS = 100_000  # beyond this, job counts (and held retries) are partial
COUNTED_STATES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value, JobStatus.RETRYING.value)

_CONNECT_TIMEOUT_S = 2.0
_SOCKET_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class FleetStatus:
    """A snapshot of the queue, the workers and the jobs, as read from Redis."""

    broker: str  # the Redis URL, any password redacted
    queue_depth: int  # messages waiting in the queue (all priority lists; a pack counts once)
    in_flight: int  # taken by a worker, not yet acknowledged (running or held for a retry)
    # Of those, messages a worker holds until their ETA: promptq parks its own waits in Redis,
    # so these come from elsewhere (an older promptq's retries, a Celery client's countdown).
    retries_scheduled: int
    parked: int  # jobs waiting in Redis until due: retries, rate-limit waits (worker.attempt.later)
    workers: list[str]  # names of the workers that answered a ping
    jobs: dict[str, int]  # non-terminal jobs by state: queued, running, retrying
    truncated: bool = False  # True when there were more keys than gather_status reads
    inspect_timeout_s: float = 1.0
    max_scanned_keys: int = MAX_SCANNED_KEYS
    # Each deployment's rate limiter (worker.fleet.limiter_status): limits, last minute's rate
    # and 429s.
    rate_limits: list[LimiterState] = field(default_factory=list)
    # What the fleet has spent (worker.fleet.spend), by period.
    spend: list[SpendCounter] = field(default_factory=list)
    # Worker processes in the heartbeat registry (worker.fleet.custody): beating, or dead and not
    # recovered yet.
    processes: int = 0
    # What was recovered since the counters began (worker.fleet.custody, worker.fleet.reconcile):
    # dead_workers, messages_returned, jobs_republished, jobs_abandoned.
    recovered: dict[str, int] = field(default_factory=dict)
    # Open jobs the safety net's last pass found with no message anywhere (re-published at its
    # next pass if still so): 0 in a correct fleet.
    stranded: int = 0
    # The scheduler (worker.ops.schedule_status): lanes, priorities, tenants, ended early.
    schedule: ScheduleStatus = field(default_factory=ScheduleStatus)
    # Jobs ended early since the counters began, by kind: cancelled, deadline_exceeded.
    ended_early: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field (for `promptq status --json`)."""
        return asdict(self)


def gather_status(
    redis_url: str, *, inspect_timeout_s: float = 1.0, max_scanned_keys: int = MAX_SCANNED_KEYS
) -> FleetStatus:
    """Read the fleet's state from Redis and ping the workers (waits ``inspect_timeout_s``).

    Job states (and held retries) are read from at most ``max_scanned_keys`` keys; beyond
    that the counts are partial and ``truncated`` is set. Raises BrokerUnavailable, naming
    the URL with its password redacted, when Redis cannot be reached.
    """
    client = redis.Redis.from_url(
        redis_url, socket_connect_timeout=_CONNECT_TIMEOUT_S, socket_timeout=_SOCKET_TIMEOUT_S
    )
    try:
        with broker_errors(redis_url):
            queue_depth, in_flight = _queue_counts(client)
            parked = int(client.zcard(PARKED_KEY))
            retries_scheduled, retries_truncated = _held_retries(client, max_scanned_keys)
            jobs, jobs_truncated = _job_counts(client, max_scanned_keys)
            rate_limits = read_limiters(client)
            spend = read_spend(client)
            processes, recovered, stranded = _custody_counts(client)
            schedule = read_schedule(client, max_scanned_keys)
            ended_early = ended_early_counts(client)
    finally:
        client.close()
    return FleetStatus(
        broker=redact_url(redis_url),
        queue_depth=queue_depth,
        in_flight=in_flight,
        retries_scheduled=retries_scheduled,
        parked=parked,
        workers=_ping_workers(redis_url, inspect_timeout_s),
        jobs=jobs,
        truncated=retries_truncated or jobs_truncated,
        inspect_timeout_s=inspect_timeout_s,
        max_scanned_keys=max_scanned_keys,
        rate_limits=rate_limits,
        spend=spend,
        processes=processes,
        recovered=recovered,
        stranded=stranded,
        schedule=schedule,
        ended_early=ended_early,
    )


def _queue_counts(client: redis.Redis) -> tuple[int, int]:
    """Messages queued (the scheduler's structure, the queue list and its priority lists), and
    taken by workers but not acknowledged."""
    taken = taken_keys(client)
    pipe = client.pipeline(transaction=False)
    for key in PRIORITY_LISTS:
        pipe.llen(key)
    pipe.hlen(UNACKED_KEY)
    for key in taken:
        pipe.llen(key)
    lengths = [int(n) for n in pipe.execute()]
    queued = len(PRIORITY_LISTS)
    return queued_count(client) + sum(lengths[:queued]), sum(lengths[queued:])


RECOVERY_COUNTERS = ("dead_workers", "messages_returned", "jobs_republished", "jobs_abandoned")


def _custody_counts(client: redis.Redis) -> tuple[int, dict[str, int], int]:
    pipe = client.pipeline(transaction=False)
    pipe.zcard(WORKERS_KEY)
    pipe.hgetall(RECOVERY_KEY)
    pipe.hlen(SUSPECTS_KEY)
    processes, counters, stranded = pipe.execute()
    found = {text_of(name): int(value) for name, value in counters.items()}
    return int(processes), {name: found.get(name, 0) for name in RECOVERY_COUNTERS}, int(stranded)


ENDED_EARLY_KINDS = ("cancelled", "deadline_exceeded")


def ended_early_counts(client: redis.Redis) -> dict[str, int]:
    """How many jobs ended cancelled or past their deadline, wherever they ended."""
    found = {text_of(k): int(v) for k, v in client.hgetall(CONTROL_KEY).items()}
    return {kind: found.get(kind, 0) for kind in ENDED_EARLY_KINDS}


def _held_retries(client: redis.Redis, max_keys: int) -> tuple[int, bool]:
    """Unacknowledged messages whose ETA is still ahead: retries a worker holds until due.

    A retry whose ETA has passed is running, not waiting, and is not counted.
    """
    now = datetime.now(UTC)
    held = 0
    for scanned, (_tag, raw) in enumerate(client.hscan_iter(UNACKED_KEY, count=SCAN_COUNT)):
        if scanned >= max_keys:
            return held, True
        eta = _eta_of(raw)
        if eta is not None and eta > now:
            held += 1
    return held, False


def _eta_of(raw: bytes | str) -> datetime | None:
    try:
        message = json.loads(raw)[0]
        eta = message["headers"]["eta"]
    except (ValueError, LookupError, TypeError):
        return None
    if not isinstance(eta, str):
        return None
    try:
        parsed = datetime.fromisoformat(eta)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _job_counts(client: redis.Redis, max_keys: int) -> tuple[dict[str, int], bool]:
    counts = dict.fromkeys(COUNTED_STATES, 0)
    seen: set[bytes | str] = set()
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, match=STATE_PATTERN, count=SCAN_COUNT)
        fresh = [key for key in keys if key not in seen]  # SCAN may return a key twice
        seen.update(fresh)
        if fresh:
            for value in client.mget(fresh):
                state = None if value is None else text_of(value)
                if state in counts:
                    counts[state] += 1
        if cursor == 0:
            return counts, False
        if len(seen) >= max_keys:
            return counts, True


def _ping_workers(redis_url: str, timeout_s: float) -> list[str]:
    """Names of the workers answering a broadcast ping within ``timeout_s``.

    A bare Celery app (JSON only): the worker's own app would import LiteLLM, seconds of it.
    """
    from celery import Celery  # noqa: PLC0415  (Celery's import is paid only here)
    from kombu.exceptions import OperationalError  # noqa: PLC0415

    app = Celery("promptq-status", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_backend=None,
        broker_connection_retry=False,
        broker_connection_max_retries=0,
        broker_connection_timeout=_CONNECT_TIMEOUT_S,
        broker_transport_options={
            "socket_connect_timeout": _CONNECT_TIMEOUT_S,
            "socket_timeout": _SOCKET_TIMEOUT_S,
            "max_retries": 0,
        },
    )
    try:
        replies = app.control.inspect(timeout=timeout_s).ping()
    except (OperationalError, redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"cannot reach Redis at {redact_url(redis_url)}: {exc}") from exc
    finally:
        app.close()
    return sorted(replies or {})


def format_status(status: FleetStatus) -> str:
    """Plain text, one aligned line per figure."""
    jobs = ", ".join(f"{n:,} {state}" for state, n in status.jobs.items())
    if status.truncated:
        jobs += f" (partial: only the first {status.max_scanned_keys:,} keys were read)"
    if status.workers:
        workers = f"{len(status.workers)}: " + ", ".join(status.workers)
    else:
        workers = f"none answered within {status.inspect_timeout_s:g} s"
    lines = [
        ("broker", status.broker),
        ("queue depth", f"{status.queue_depth:,}"),
        ("in flight", f"{status.in_flight:,} (taken by workers, not yet acknowledged)"),
        ("held for an ETA", f"{status.retries_scheduled:,} (messages held by workers until due)"),
        ("parked", f"{status.parked:,} (waiting in Redis until due: retries, rate-limit waits)"),
        ("workers", workers),
        ("worker processes", f"{status.processes:,} with a heartbeat"),
        ("jobs", jobs),
        ("recovered", _recovered_line(status.recovered)),
        ("stranded", f"{status.stranded:,} (found with no message; published again if still so)"),
        ("ended early", _ended_early_line(status.ended_early)),
    ]
    lines += schedule_lines(status.schedule)
    for counter in status.spend:
        line = f"${counter.spent_usd:,.4f} in {counter.calls:,} calls"
        if counter.reserved_usd > 0:
            line += f" (+${counter.reserved_usd:,.4f} reserved by calls in flight)"
        lines.append((f"spend ({counter.period})", line))
    if not status.rate_limits:
        lines.append(("rate limits", "no calls in the last hour"))
    for limiter in status.rate_limits:
        lines.append((f"rate limit {limiter.model} @ {limiter.endpoint}", _limiter_line(limiter)))
    width = max(len(label) for label, _ in lines) + 2
    return "\n".join(f"{label + ':':<{width}}{value}" for label, value in lines)


def _recovered_line(counters: dict[str, int]) -> str:
    line = (
        f"{counters.get('messages_returned', 0):,} message(s) of "
        f"{counters.get('dead_workers', 0):,} dead worker process(es) returned to the queue; "
        f"{counters.get('jobs_republished', 0):,} job(s) published again by the safety net"
    )
    abandoned = counters.get("jobs_abandoned", 0)
    if abandoned:
        line += f", {abandoned:,} failed with no stored request"
    return line


def _ended_early_line(counters: dict[str, int]) -> str:
    return (
        f"{counters.get('cancelled', 0):,} cancelled, "
        f"{counters.get('deadline_exceeded', 0):,} past their deadline"
    )


def _limiter_line(limiter: LimiterState) -> str:
    if limiter.rpm_limit:
        limit = f"{limiter.rpm_limit:,.0f} rpm ({limiter.rpm_source})"
    else:
        limit = "no request limit"
    if limiter.tpm_limit:
        limit += f", {limiter.tpm_limit:,.0f} tpm"
    line = (
        f"{limit}; last minute: {limiter.requests_per_minute:,.0f} calls, "
        f"{limiter.tokens_per_minute:,.0f} tokens, {limiter.rate_limited_per_minute:,.0f} 429s"
    )
    if limiter.paused_for_s > 0:
        line += f"; paused {limiter.paused_for_s:.1f} s more (Retry-After)"
    return line
