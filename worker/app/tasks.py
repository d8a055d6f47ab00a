"""The Celery tasks: a message carries one job (promptq.complete, promptq.embed) or a pack of
them (promptq.pack, from submit_many), turned here into deliveries for worker.attempt.jobs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Reject

from api_client._constants import EMBED_TASK_NAME, PACK_TASK_NAME, TASK_NAME
from api_client._schemas import EmbeddingRequest, JobRequest, PromptRequest
from api_client._task_messages import REQUEST_TYPES
from worker.attempt.delivery import Delivery
from worker.attempt.jobs import run_jobs
from worker.errors import REDIS_UNAVAILABLE
from worker.fleet.delivery_state import DeliveryState

if TYPE_CHECKING:
    from celery import Celery, Task

    from worker.attempt.runtime import Runtime

logger = logging.getLogger("promptq.worker")


def register(app: Celery) -> None:
    # shared=False: the tasks belong to this app only, bound to its settings. max_retries=None:
    # Celery's own retries are not used (a job to retry is parked: worker.attempt.later).
    for name, run in ((TASK_NAME, complete), (EMBED_TASK_NAME, embed), (PACK_TASK_NAME, pack)):
        app.task(
            name=name,
            bind=True,
            acks_late=True,
            ignore_result=True,
            shared=False,
            max_retries=None,
        )(run)


def complete(task: Task, request: dict[str, Any], **state: Any) -> None:
    """Run one attempt of a chat-completion job; ``state`` is its DeliveryState, encoded."""
    _run(task, [_single(task, PromptRequest, request, state)])


def embed(task: Task, request: dict[str, Any], **state: Any) -> None:
    """Run one attempt of an embeddings job; ``state`` is its DeliveryState, encoded."""
    _run(task, [_single(task, EmbeddingRequest, request, state)])


def pack(task: Task, jobs: list[Any]) -> None:
    """Run one attempt of each job of a pack, concurrently; a job to retry is parked as a
    message of its own. See api_client._task_messages.pack_message for the format."""
    _run(task, [d for d in (_unpacked(entry) for entry in jobs) if d is not None])


def _run(task: Task, deliveries: Sequence[Delivery]) -> None:
    """Attempt the message's jobs. When Redis cannot be reached the message is rejected back
    to the queue (or, if that fails too, left in this worker's custody until it is returned):
    a job is never acknowledged without an outcome or a message that brings it back."""
    runtime: Runtime = task.app.runtime  # the app is a worker.app.celery_app.PromptqCelery
    try:
        run_jobs(runtime, deliveries)
    except REDIS_UNAVAILABLE as exc:
        _requeue(task, exc)


def _single(
    task: Task, request_type: type[JobRequest], request: Any, state: dict[str, Any]
) -> Delivery:
    return Delivery(
        job_id=task.request.id,
        request_type=request_type,
        request=request,
        state=DeliveryState.decode(state),
        deliveries=task.request.retries + 1,  # a parked job comes back as a new delivery
        task_name=task.name,
    )


def _requeue(task: Task, exc: BaseException) -> NoReturn:
    """Give the message back to the queue: Redis cannot be reached."""
    what = "pack" if task.name == PACK_TASK_NAME else "job"
    logger.warning(
        "%s %s goes back to the queue: Redis is unavailable (%s)", what, task.request.id, exc
    )
    raise Reject(f"Redis unavailable: {exc}", requeue=True) from None


def _unpacked(entry: Any) -> Delivery | None:
    """A pack's entry as a delivery of its job; None (logged) for an entry that names no job."""
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
        logger.warning("dropped a pack entry that names no job")
        return None
    task_name = str(entry.get("task"))
    return Delivery(
        job_id=entry["id"],
        request_type=REQUEST_TYPES.get(task_name),
        request=entry.get("request"),
        task_name=task_name,
    )
