"""Celery's side of a job another Celery app sent: its request context, and its canvas once it ends.

The job's Celery records (celery-task-meta-<id>: STARTED, RETRY, then SUCCESS or FAILURE) are
written by promptq's own scripts, in the steps that change its state (api_client.
_celery_contract). What Celery's tracer would do after a task returns (callbacks, the next
step of a chain, a chord's count, errbacks) waits until the job has ended, whatever message
ended it: the end queues a promptq.followup message, whose task (worker.app.tasks) does it
here (``run_canvas``) with Celery's own result backend, through a small "relay" app on the
same Redis.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Celery, signature, states
from celery.app.task import Context
from celery.utils.serialization import create_exception_cls

from api_client._celery_contract import (
    FAILED_EXC_MODULE,
    FAILED_EXC_TYPE,
    PROMPTQ_HEADER,
    celery_meta_tail,
)
from api_client._schemas import Outcome
from api_client._task_messages import followup_message
from worker.attempt.delivery import CeleryOrigin
from worker.settings import Settings

logger = logging.getLogger("promptq.worker")

# The canvas a task message may carry, which promptq runs when the job ends, not when its
# message's task returns.
_CANVAS = ("callbacks", "errbacks", "chain", "chord")
# The request context a follow-up needs (Celery's names), besides the canvas.
_CONTEXT = ("task", "group", "group_index", "root_id", "parent_id", *_CANVAS)

# The exception a failed job is to Celery, as a caller rebuilds it from the job's record: a
# class named JobFailed whose one argument is the job's error (kind, message, ...).
JobFailedInCelery = create_exception_cls(FAILED_EXC_TYPE, FAILED_EXC_MODULE)


def origin_of(request: Context) -> CeleryOrigin | None:
    """What a job keeps of the Celery request that delivered it, when another Celery app sent
    it (None for promptq's own messages). Its canvas is taken out of the request, so Celery's
    tracer does not run it when the task returns: promptq runs it when the job ends."""
    if request.get(PROMPTQ_HEADER) is not None:
        return None
    context = {name: request.get(name) for name in _CONTEXT}
    canvas = any(context[name] for name in _CANVAS)
    for name in _CANVAS:
        setattr(request, name, None)
    wants_result = not request.get("ignore_result")
    tail = celery_meta_tail(request.id, context["group"], context["parent_id"])
    return CeleryOrigin(
        records_tail=tail if wants_result else "",
        followup=followup_message(request.id, context) if canvas else None,
    )


def relay_app(settings: Settings) -> Celery:
    """The app a worker publishes a job's callbacks with and counts its chords in: Celery's
    defaults (a callback whose signature names no queue goes to Celery's queue ``celery``),
    JSON only, its result backend the broker's Redis, results kept PROMPTQ_RESULT_TTL_S."""
    url = settings.queue.broker_url
    app = Celery("promptq-relay", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        result_expires=int(settings.queue.result_ttl_s),
        broker_connection_timeout=5,
        broker_transport_options={"socket_connect_timeout": 5, "socket_timeout": 30},
    )
    return app


def run_canvas(relay: Celery, job_id: str, context: dict[str, Any], outcome: Outcome) -> None:
    """Do what Celery's tracer does when a task ends (celery/app/trace.py): on success, send
    the callbacks and the chain's next step the result, and count a chord's part; on failure,
    through the result backend's mark_as_failure: the chord's part, the chain's failure and
    the errbacks. The job's own record is already written."""
    request = Context({**context, "id": job_id, "delivery_info": {}})
    root_id = request.root_id or job_id
    if outcome.result is None:
        assert outcome.error is not None
        exc = JobFailedInCelery(outcome.error.model_dump(mode="json"))
        relay.backend.mark_as_failure(job_id, exc, request=request, store_result=False)
        return
    result = json.loads(outcome.result.model_dump_json())
    for callback in request.callbacks or []:
        signature(callback, app=relay).apply_async((result,), parent_id=job_id, root_id=root_id)
    if request.chain:
        step = signature(request.chain[-1], app=relay)
        step.apply_async((result,), chain=request.chain[:-1], parent_id=job_id, root_id=root_id)
    if request.chord:
        relay.backend.on_chord_part_return(request, states.SUCCESS, result)
