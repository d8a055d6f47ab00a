"""Names both sides agree on: the task, the queue, every Redis key and the shared defaults."""

import uuid
from typing import Final

TASK_NAME: Final = "promptq.complete"  # a chat completion (PromptRequest)
EMBED_TASK_NAME: Final = "promptq.embed"  # an embeddings call (EmbeddingRequest)
PACK_TASK_NAME: Final = "promptq.pack"  # several jobs in one message (submit_many)
# The canvas of a job a Celery app sent (callbacks, chain, chord), run once it has ended.
FOLLOWUP_TASK_NAME: Final = "promptq.followup"
QUEUE: Final = "promptq"

DEFAULT_REDIS_URL: Final = "redis://localhost:6379/0"
DEFAULT_RESULT_TTL_S: Final = 24 * 3600.0

# Job ids for idempotency keys are uuid5(IDEMPOTENCY_NAMESPACE, key): changing it would make
# every key name a new job.
IDEMPOTENCY_NAMESPACE: Final = uuid.UUID("5b0c1f9e-7d3a-4c62-9f1e-2a8d6b4e0c17")

# Every Redis key promptq writes starts with this prefix (the queue itself is named by QUEUE,
# because Celery's Redis transport owns that key).
KEY_PREFIX: Final = "promptq:"


def result_key(job_id: str) -> str:
    """The terminal outcome of a job, written once (SET NX) by the worker."""
    return f"{KEY_PREFIX}result:{job_id}"


def state_key(job_id: str) -> str:
    """The non-terminal state of a job: queued, running or retrying."""
    return f"{KEY_PREFIX}state:{job_id}"


def starts_key(job_id: str) -> str:
    """How many times a worker has started the job (retries and redeliveries alike)."""
    return f"{KEY_PREFIX}starts:{job_id}"


def newest_key(job_id: str) -> str:
    """The newest delivery of the job a worker has started (its messages count them): an
    older copy taken later is stale, and dropped."""
    return f"{KEY_PREFIX}newest:{job_id}"


def budget_key(budget_id: str) -> str:
    """A spending budget jobs can name: its cap (max), what is spent and what is reserved."""
    return f"{KEY_PREFIX}budget:{budget_id}"


# Every job accepted and not yet ended, scored by the time (Redis ms) of its last change of
# custody or state: what the safety net (worker.fleet.reconcile) checks for jobs with no message.
OPEN_JOBS_KEY: Final = f"{KEY_PREFIX}open"


def request_key(job_id: str) -> str:
    """A copy of an open job's request (hash: task, request JSON, failures so far), written at
    submit and deleted with its outcome: what the safety net re-publishes a lost job from."""
    return f"{KEY_PREFIX}request:{job_id}"


def cancel_key(job_id: str) -> str:
    """Set when a job was cancelled while a call of it was in flight: it is not retried, and a
    worker that begins it again ends it as cancelled."""
    return f"{KEY_PREFIX}cancel:{job_id}"


def tenant_jobs_key(tenant: str) -> str:
    """The ids of a tenant's open jobs (set), written at submit: what cancel_tenant ends."""
    return f"{KEY_PREFIX}tenant:{tenant}:jobs"


# zset: job id -> its deadline in epoch ms, written at submit for jobs with a deadline: what
# the workers' deadline sweep (worker.fleet.deadlines) expires while they wait.
DEADLINES_KEY: Final = f"{KEY_PREFIX}deadlines"
# hash: how many jobs ended early, by kind: ``cancelled``, ``deadline_exceeded``.
CONTROL_KEY: Final = f"{KEY_PREFIX}control"

# Worker processes' custody of the messages they take (worker.fleet.custody).
WORKERS_KEY: Final = f"{KEY_PREFIX}workers"  # zset: process id -> Redis ms of its last heartbeat
WORKERS_CLOCK_KEY: Final = f"{KEY_PREFIX}workers:clock"  # Redis ms of the fleet's last heartbeat
RECOVERY_KEY: Final = f"{KEY_PREFIX}recovery"  # hash: counters of what was recovered, and how
SUSPECTS_KEY: Final = f"{KEY_PREFIX}suspects"  # hash: job id -> its open score, found nowhere
RECONCILE_LOCK_KEY: Final = f"{KEY_PREFIX}reconcile:lock"  # one safety-net pass at a time


def taken_key(process_id: str) -> str:
    """Messages a worker process took from the queue and has not yet recorded as delivered."""
    return f"{KEY_PREFIX}worker:{process_id}:taken"


def held_key(process_id: str) -> str:
    """Messages delivered to a worker process and not yet acknowledged (delivery tag -> the
    message as it was taken): what goes back to the queue if the process dies."""
    return f"{KEY_PREFIX}worker:{process_id}:held"


# The fleet's own state, kept by the workers.
PARKED_KEY: Final = (
    f"{KEY_PREFIX}parked"  # zset: message -> Redis ms when due (worker.fleet.parking)
)
LIMITER_PREFIX: Final = f"{KEY_PREFIX}limiter:"  # + a deployment's identity (worker.fleet.limiter)
SPEND_PREFIX: Final = f"{KEY_PREFIX}spend:"  # + a period's name (worker.fleet.spend)
STATE_PATTERN: Final = f"{KEY_PREFIX}state:*"  # every job's state key, for `promptq status`

# kombu's Redis transport names these (kombu/transport/redis.py, Channel); promptq sets no
# ``global_keyprefix``, so they are used as they are.
UNACKED_KEY: Final = "unacked"  # hash: delivery tag -> JSON [message, exchange, routing_key]
UNACKED_INDEX_KEY: Final = "unacked_index"  # zset: delivery tag -> when it was delivered
PRIORITY_SEP: Final = "\x06\x16"  # a message of priority n > 0 is queued in QUEUE + sep + n
PRIORITY_LISTS: Final = tuple(f"{QUEUE}{PRIORITY_SEP}{step}" for step in (3, 6, 9))
