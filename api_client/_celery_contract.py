"""The public Celery contract: what any Celery app may send to promptq's tasks, read into requests.

Version 1 (CONTRACT_VERSION): ``send_task("promptq.complete", args=[REQUEST], queue="promptq")``
and ``send_task("promptq.embed", args=[REQUEST], queue="promptq")``, one positional argument
and no keyword arguments. REQUEST is a JSON object in the shape ``Client.submit_many`` takes:

- ``promptq.complete``: ``prompt`` (a string) or ``messages`` (OpenAI-style), and optionally
  ``model``, ``llm``, ``budget``, ``priority``, ``tenant``, one of ``deadline_s`` (seconds
  from when a worker first takes the message), ``deadline`` or ``deadline_at`` (epoch
  seconds), and sampling parameters beside them or in a ``params`` object.
- ``promptq.embed``: ``input`` (a string or a list of strings) and the same options.

promptq's own messages carry the same tasks with the request as promptq stores it
(``PromptRequest``/``EmbeddingRequest`` JSON: ``params`` and ``deadline_at``), which reads the
same way; they also carry the PROMPTQ_HEADER, which tells a worker the message is its own.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

from ._constants import EMBED_TASK_NAME, QUEUE, TASK_NAME, request_key
from ._errors import InvalidRequest
from ._requests import build_embedding_request, build_request
from ._schemas import JobRequest

CONTRACT_VERSION: Final = 1

# The header promptq's own task messages carry (its value: CONTRACT_VERSION). A message
# without it came from another Celery app: the worker takes the job in (worker.attempt.adopt).
PROMPTQ_HEADER: Final = "promptq"

# The request's own fields beside its content (every other key is a sampling parameter).
_OPTIONS = ("model", "llm", "budget", "priority", "tenant", "deadline_s", "deadline")
_TASKS = (TASK_NAME, EMBED_TASK_NAME)


def task_arguments_problem(task_name: str, args: Any, kwargs: Mapping[str, Any]) -> str | None:
    """Why a Celery message's arguments are not one request (None when they are): the
    contract takes one positional argument and no keyword arguments."""
    count = len(args) if isinstance(args, list | tuple) else 0
    if count != 1:
        return (
            f"{task_name} takes one positional argument, the request (a JSON object), got {count}"
        )
    if kwargs:
        return (
            f"{task_name} takes no keyword arguments (got {sorted(kwargs)[:5]}): put the "
            "request's fields in its one argument"
        )
    return None


def request_from_task(task_name: str, value: Any) -> JobRequest:
    """The request a task's argument carries, validated as Client.submit validates it;
    InvalidRequest naming the problem."""
    if not isinstance(value, Mapping):
        raise InvalidRequest(
            f"the request must be a JSON object with "
            f"{'prompt or messages' if task_name == TASK_NAME else 'input'}, "
            f"got {type(value).__name__}"
        )
    if task_name not in _TASKS:
        raise InvalidRequest(f"unknown task {task_name[:60]!r}")
    fields = dict(value)
    if "idempotency_key" in fields:
        raise InvalidRequest(
            "idempotency_key is not taken over Celery: the task id names the job (send the "
            "same task_id again and the job runs once)"
        )
    options = {name: fields.pop(name, None) for name in _OPTIONS}
    deadline_at = fields.pop("deadline_at", None)
    if deadline_at is not None:
        if options["deadline"] is not None:
            raise InvalidRequest("give at most one of deadline and deadline_at")
        options["deadline"] = deadline_at
    content = ("input",) if task_name == EMBED_TASK_NAME else ("prompt", "messages")
    params = _params(fields, content)
    model = options.pop("model")
    if task_name == EMBED_TASK_NAME:
        return build_embedding_request(fields.pop("input", None), model, params, **options)
    prompt, messages = fields.pop("prompt", None), fields.pop("messages", None)
    return build_request(prompt, messages, model, params, **options)


def _params(fields: dict[str, Any], content: tuple[str, ...]) -> dict[str, Any]:
    """The sampling parameters: those in ``params`` and those beside the request's fields,
    taken out of ``fields`` (which keeps its ``content``: the prompt, messages or input)."""
    nested = fields.pop("params", None) or {}
    if not isinstance(nested, Mapping):
        raise InvalidRequest(f"params must be an object, got {type(nested).__name__}")
    flat = {name: fields.pop(name) for name in list(fields) if name not in content}
    both = sorted(set(nested) & set(flat))
    if both:
        raise InvalidRequest(f"parameter(s) {both} given both in params and beside it")
    return {**nested, **flat}


# Celery's Redis result backend keeps a task's state under this key, as JSON, and publishes
# each update on the channel of the same name (celery/backends/redis.py, base.py).
CELERY_META_PREFIX: Final = "celery-task-meta-"
# A failed job's exception, as Celery's JSON result format names it: a module no program
# imports, so Celery rebuilds it as an exception class named JobFailed whose one argument is
# the job's error (kind, message, status_code, attempts).
FAILED_EXC_TYPE: Final = "JobFailed"
FAILED_EXC_MODULE: Final = "promptq"

# The request copy's fields of a job that arrived through Celery (api_client._constants.
# request_key): ``celery``, the members its Celery records end with (task_id, and group_id and
# parent_id when it has them), or '' when its sender asked for no result (ignore_result): a
# copy with this field is a job taken in from Celery; ``followup``, the task message that runs
# its canvas (callbacks, chain, chord, errbacks) once it has ended, when it has one.
COPY_CELERY_FIELD: Final = "celery"
COPY_FOLLOWUP_FIELD: Final = "followup"


def celery_meta_tail(job_id: str, group_id: str | None, parent_id: str | None) -> str:
    """The members a job's Celery record ends with, as JSON text (without braces)."""
    members = {"task_id": job_id, "group_id": group_id, "parent_id": parent_id}
    return ", ".join(
        f"{json.dumps(name)}: {json.dumps(value)}"
        for name, value in members.items()
        if value is not None
    )


def _outcome_prefix(status: str) -> str:
    """How a stored outcome of ``status`` starts, up to its result or error (pinned by a test
    against Outcome's JSON)."""
    return '{"status":"' + status + '","result":'


# Lua functions, the keys built from the job's id:
# celery_record(id, state, result, ttl_ms, done): writes the job's Celery record (state, the
# result's JSON text, date_done when ``done``) and publishes it, as Celery's Redis backend
# does; only for a job whose request copy has a ``celery`` field that is not empty.
# celery_end(id, outcome, ttl_ms, queue): writes the record of the job's outcome (SUCCESS with
# the result, or FAILURE with the error as a JobFailed exception), and queues its follow-up
# message when it has one. Both run before end_job removes the copy (api_client._cancel).
LUA_CELERY = f"""
local function iso_now()
  local t = redis.call('TIME')
  local secs = tonumber(t[1])
  local days = math.floor(secs / 86400)
  local rem = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%06d+00:00', year, month, day,
    math.floor(rem / 3600), math.floor(rem % 3600 / 60), rem % 60, tonumber(t[2]))
end
local function celery_record(job_id, state, result, ttl_ms, done)
  local tail = redis.call('HGET', '{request_key("")}' .. job_id, '{COPY_CELERY_FIELD}')
  if not tail or tail == '' then return end
  local date = done and ('"' .. iso_now() .. '"') or 'null'
  local meta = '{{"status": "' .. state .. '", "result": ' .. result
    .. ', "traceback": null, "children": [], "date_done": ' .. date .. ', ' .. tail .. '}}'
  local key = '{CELERY_META_PREFIX}' .. job_id
  redis.call('SET', key, meta, 'PX', ttl_ms)
  redis.call('PUBLISH', key, meta)
end
local function celery_end(job_id, outcome, ttl_ms)
  local succeeded = '{_outcome_prefix("succeeded")}'
  local failed = '{_outcome_prefix("failed")}null,"error":'
  if string.sub(outcome, 1, #succeeded) == succeeded then
    local result = string.sub(outcome, #succeeded + 1, -(#',"error":null}}' + 1))
    celery_record(job_id, 'SUCCESS', result, ttl_ms, true)
  else
    local error = string.sub(outcome, #failed + 1, -2)
    local exc = '{{"exc_type": "{FAILED_EXC_TYPE}", "exc_module": "{FAILED_EXC_MODULE}", '
      .. '"exc_message": [' .. error .. ']}}'
    celery_record(job_id, 'FAILURE', exc, ttl_ms, true)
  end
  local followup = redis.call('HGET', '{request_key("")}' .. job_id, '{COPY_FOLLOWUP_FIELD}')
  if followup then redis.call('LPUSH', '{QUEUE}', followup) end
end
"""
