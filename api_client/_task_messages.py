"""The Celery task messages the client builds (single jobs and packs) and reads back."""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from ._celery_contract import CONTRACT_VERSION, PROMPTQ_HEADER
from ._constants import EMBED_TASK_NAME, FOLLOWUP_TASK_NAME, PACK_TASK_NAME, QUEUE, TASK_NAME
from ._requests import Submission
from ._schemas import EmbeddingRequest, JobRequest, PromptRequest

_ORIGIN = f"promptq-client@{socket.gethostname()}:{os.getpid()}"


# The request each single-job task carries, by task name.
REQUEST_TYPES: dict[str, type[JobRequest]] = {
    TASK_NAME: PromptRequest,
    EMBED_TASK_NAME: EmbeddingRequest,
}


def task_name_of(request: JobRequest) -> str:
    """The Celery task that runs ``request``."""
    return next(name for name, kind in REQUEST_TYPES.items() if isinstance(request, kind))


def request_json(request: JobRequest) -> str:
    """The request as the JSON its message and its request copy carry."""
    return json.dumps(request.model_dump(mode="json"))


def task_message(
    job_id: str,
    request: JobRequest,
    *,
    kwargs: Mapping[str, Any] | None = None,
    retries: int = 0,
) -> bytes:
    """The message Celery's Redis transport expects in the queue (task protocol 2, JSON).

    Built here rather than by Celery so the client stays light and can pipeline many
    publishes in one round trip. argsrepr hides the prompt from worker logs. The worker
    builds one too when it parks or re-publishes a job (``kwargs`` carry its state,
    ``retries`` counts the deliveries before it).
    """
    return _task_envelope(job_id, request, request_json(request), kwargs or {}, retries=retries)


def _task_envelope(
    job_id: str, request: JobRequest, request_text: str, kwargs: Mapping[str, Any], retries: int
) -> bytes:
    task = task_name_of(request)
    return _envelope(
        task, job_id, f"[{request_text}]", kwargs, retries=retries, argsrepr="(<request>,)"
    )


def pack_message(pack_id: str, jobs: Sequence[Submission]) -> bytes:
    """One message carrying several jobs, for the promptq.pack task: its one argument is a
    list of {"task": the job's own task, "id": job id, "request": its request}."""
    return _pack_envelope(pack_id, jobs, [request_json(job.request) for job in jobs])


def _pack_envelope(pack_id: str, jobs: Sequence[Submission], requests: Sequence[str]) -> bytes:
    entries = ", ".join(
        f'{{"task": {json.dumps(task_name_of(job.request))}, "id": {json.dumps(job.job_id)}, '
        f'"request": {request}}}'
        for job, request in zip(jobs, requests, strict=True)
    )
    argsrepr = f"(<{len(jobs)} jobs>,)"
    return _envelope(PACK_TASK_NAME, pack_id, f"[[{entries}]]", {}, retries=0, argsrepr=argsrepr)


def followup_message(job_id: str, context: Mapping[str, Any]) -> bytes:
    """The message that runs the canvas of a job a Celery app sent, once the job has ended:
    the promptq.followup task, its arguments the job id and the Celery request ``context``
    its first message carried (callbacks, chain, chord, errbacks, group...)."""
    args = f"[{json.dumps(job_id)}, {json.dumps(dict(context))}]"
    return _envelope(
        FOLLOWUP_TASK_NAME, f"followup-{job_id}", args, {}, retries=0, argsrepr="(<job>,)"
    )


def job_ids_of(message: Mapping[str, Any]) -> list[str]:
    """The jobs a queue message (a parsed envelope) carries: its own id, or a pack's job ids;
    an empty list for a message that is not a promptq job."""
    headers = message.get("headers")
    if not isinstance(headers, Mapping) or not isinstance(headers.get("id"), str):
        return []
    if headers.get("task") != PACK_TASK_NAME:
        return [headers["id"]]
    try:
        body = message["body"]
        if message["properties"]["body_encoding"] == "base64":
            body = base64.b64decode(body)
        entries = json.loads(body)[0][0]
        return [entry["id"] for entry in entries if isinstance(entry["id"], str)]
    except (LookupError, TypeError, ValueError):
        return []


def _envelope(
    task: str,
    message_id: str,
    args_json: str,
    kwargs: Mapping[str, Any],
    *,
    retries: int,
    argsrepr: str,
) -> bytes:
    body = f"[{args_json}, {json.dumps(dict(kwargs))}, {_NO_CANVAS}]"
    envelope = {
        "body": base64.b64encode(body.encode()).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": message_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": message_id,
            "parent_id": None,
            "argsrepr": argsrepr,
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
            PROMPTQ_HEADER: CONTRACT_VERSION,  # a message of promptq's own
        },
        "properties": {
            "correlation_id": message_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


_NO_CANVAS = json.dumps({"callbacks": None, "errbacks": None, "chain": None, "chord": None})
