"""The Celery tasks: a message carries one job (promptq.complete, promptq.embed) or a pack of
them (promptq.pack, from submit_many), turned here into deliveries for worker.attempt.jobs;
promptq.followup runs the canvas of a job another Celery app sent (worker.app.canvas)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from celery.exceptions import Reject

from api_client._celery_contract import task_arguments_problem
from api_client._constants import (
    EMBED_TASK_NAME,
    FOLLOWUP_TASK_NAME,
    PACK_TASK_NAME,
    TASK_NAME,
    result_key,
)
from api_client._schemas import Outcome
from api_client._task_messages import REQUEST_TYPES
from worker.app.canvas import origin_of, run_canvas
from worker.attempt.delivery import CeleryOrigin, Delivery
from worker.attempt.jobs import run_jobs
from worker.errors import REDIS_UNAVAILABLE
from worker.fleet.delivery_state import DeliveryState
from worker.fleet.schedule import ORDER_HEADER

if TYPE_CHECKING:
    from celery import Celery, Task

    from worker.attempt.runtime import Runtime

logger = logging.getLogger("promptq.worker")


def register(app: Celery) -> None:
    # shared=False: the tasks belong to this app only, bound to its settings. max_retries=None:
    # Celery's own retries are not used (a job to retry is parked: worker.attempt.later).
    tasks = (
        (TASK_NAME, complete),
        (EMBED_TASK_NAME, embed),
        (PACK_TASK_NAME, pack),
        (FOLLOWUP_TASK_NAME, followup),
    )
    for name, run in tasks:
        app.task(
            name=name,
            bind=True,
            acks_late=True,
            ignore_result=True,
            shared=False,
            max_retries=None,
        )(run)


def complete(task: Task, *args: Any, **kwargs: Any) -> None:
    """Run one attempt of a chat-completion job: its one argument is the request, ``kwargs``
    its DeliveryState, encoded (none from another Celery app)."""
    _run(task, _deliveries(task, args, kwargs))


def embed(task: Task, *args: Any, **kwargs: Any) -> None:
    """Run one attempt of an embeddings job, as ``complete`` does."""
    _run(task, _deliveries(task, args, kwargs))


def pack(task: Task, jobs: list[Any]) -> None:
    """Run one attempt of each job of a pack, concurrently; a job to retry is parked as a
    message of its own. See api_client._task_messages.pack_message for the format."""
    _run(task, _deliveries(task, [jobs], {}))


def followup(task: Task, job_id: Any, context: Any) -> None:
    """Run the canvas of job ``job_id``, which another Celery app sent and which has ended,
    with its first message's Celery request ``context`` (worker.app.canvas)."""
    app = task.app  # a worker.app.celery_app.PromptqCelery
    try:
        raw = app.runtime.redis.get(result_key(str(job_id)))
    except REDIS_UNAVAILABLE as exc:
        _requeue(task, exc)
    if raw is None or not isinstance(context, dict):
        logger.warning("job %s: no outcome to run its Celery canvas with (expired)", job_id)
        return
    run_canvas(app.relay, str(job_id), context, Outcome.model_validate_json(raw))


def deliveries_of(
    task_name: str,
    message_id: str,
    retries: int,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    order: float | None = None,
    origin: CeleryOrigin | None = None,
) -> list[Delivery]:
    """The deliveries a message carries, from its task's name, id and ``retries`` header (the
    job's deliveries before this one), its arguments, its order in its line (a pack's jobs
    stand at the pack's order, in the pack's order) and, for a message another Celery app
    sent, its ``origin``. Pure: the tasks above use it, and so does the tests' in-process
    pipeline (tests/support/pipeline.py)."""
    if task_name == PACK_TASK_NAME:
        (jobs,) = args
        orders = [None if order is None else order + n / len(jobs) for n in range(len(jobs))]
        unpacked = (_unpacked(entry, at) for entry, at in zip(jobs, orders, strict=True))
        return [d for d in unpacked if d is not None]
    # Another Celery app's message carries the request alone; promptq's own, its state too.
    problem = task_arguments_problem(task_name, args, {} if origin is None else kwargs)
    delivery = Delivery(
        job_id=message_id,
        request_type=REQUEST_TYPES.get(task_name),
        request=args[0] if problem is None else None,
        state=DeliveryState.decode(kwargs) if origin is None else DeliveryState(),
        deliveries=retries + 1,  # a parked job comes back as a new delivery
        task_name=task_name,
        order=order,
        origin=origin,
        problem=problem,
    )
    return [delivery]


def _deliveries(task: Task, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Delivery]:
    request = task.request
    order = request.get(ORDER_HEADER)  # set by worker.app.queue_guard from the claim
    origin = origin_of(request) if task.name != PACK_TASK_NAME else None
    return deliveries_of(
        task.name, request.id, request.retries, args, kwargs, order=order, origin=origin
    )


def _run(task: Task, deliveries: Sequence[Delivery]) -> None:
    """Attempt the message's jobs. When Redis cannot be reached the message is rejected back
    to the queue (or, if that fails too, left in this worker's custody until it is returned):
    a job is never acknowledged without an outcome or a message that brings it back."""
    runtime: Runtime = task.app.runtime  # the app is a worker.app.celery_app.PromptqCelery
    try:
        run_jobs(runtime, deliveries)
    except REDIS_UNAVAILABLE as exc:
        _requeue(task, exc)


def _requeue(task: Task, exc: BaseException) -> NoReturn:
    """Give the message back to the queue: Redis cannot be reached."""
    what = "pack" if task.name == PACK_TASK_NAME else "job"
    logger.warning(
        "%s %s goes back to the queue: Redis is unavailable (%s)", what, task.request.id, exc
    )
    raise Reject(f"Redis unavailable: {exc}", requeue=True) from None


def _unpacked(entry: Any, order: float | None) -> Delivery | None:
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
        order=order,
    )
