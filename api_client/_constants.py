"""Names both sides agree on: the task, the queue, every Redis key and the shared defaults."""

import uuid
from typing import Final

TASK_NAME: Final = "promptq.complete"  # a chat completion (PromptRequest)
EMBED_TASK_NAME: Final = "promptq.embed"  # an embeddings call (EmbeddingRequest)
PACK_TASK_NAME: Final = "promptq.pack"  # several jobs in one message (submit_many)
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


def budget_key(budget_id: str) -> str:
    """A spending budget jobs can name: its cap (max), what is spent and what is reserved."""
    return f"{KEY_PREFIX}budget:{budget_id}"
