"""Sans-IO protocol shared by both clients: requests, Celery messages, outcomes, polling."""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import re
import socket
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, cast
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import ValidationError
from typing_extensions import TypeVar

from ._constants import (
    EMBED_TASK_NAME,
    IDEMPOTENCY_NAMESPACE,
    OPEN_JOBS_KEY,
    PACK_TASK_NAME,
    QUEUE,
    TASK_NAME,
    request_key,
    result_key,
    state_key,
)
from ._errors import BrokerUnavailable, InvalidRequest, JobFailed, JobNotFound, JobTimeout
from ._schemas import (
    EmbeddingRequest,
    JobRequest,
    JobResult,
    JobStatus,
    Outcome,
    PromptRequest,
    PromptResult,
)

# The result a job's handle returns: a PromptResult unless it was made by embed().
ResultT = TypeVar("ResultT", default=PromptResult)

_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_BUDGET_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")
_ORIGIN = f"promptq-client@{socket.gethostname()}:{os.getpid()}"
MAX_IDEMPOTENCY_KEY_CHARS = 1024

# redis-py retries a command on these only: a refused or reset connection is worth a second
# try on a fresh socket (a restarted Redis), a timeout is not (an unresponsive Redis would
# make each call take (retries + 1) timeouts). Publishing is safe to retry: see _PUBLISH.
RETRIED_ERRORS = (redis.ConnectionError,)

logger = logging.getLogger("promptq.client")


def build_request(
    prompt: str | None,
    messages: Any,
    model: str | None,
    params: Mapping[str, Any],
    *,
    budget: str | None = None,
    llm: str | None = None,
) -> PromptRequest:
    """Validate one submission; raise InvalidRequest naming the problem."""
    if (prompt is None) == (messages is None):
        raise InvalidRequest("give exactly one of prompt or messages")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise InvalidRequest("prompt is empty")
        messages = [{"role": "user", "content": prompt}]
    elif not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise InvalidRequest("messages must be a list of {'role': ..., 'content': ...} mappings")
    try:
        return PromptRequest(
            messages=[dict(m) for m in messages],
            model=model,
            params=dict(params),
            budget=budget,
            llm=llm,
        )
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def build_embedding_request(
    texts: Any,
    model: str | None,
    params: Mapping[str, Any],
    *,
    budget: str | None = None,
    llm: str | None = None,
) -> EmbeddingRequest:
    """Validate one embeddings submission (a text or a list of texts); raise InvalidRequest."""
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, list | tuple) or not all(isinstance(t, str) for t in texts):
        raise InvalidRequest("texts must be a string or a list of strings")
    try:
        return EmbeddingRequest(
            input=list(texts), model=model, params=dict(params), budget=budget, llm=llm
        )
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


@dataclass(frozen=True)
class Submission:
    """One validated request and the id of the job that will carry it."""

    job_id: str
    request: JobRequest
    # A job with a new id may share a message with others; one named by an idempotency key
    # is published on its own (its publish must be a no-op when the job exists).
    packable: bool = False


def submission(
    request: JobRequest, idempotency_key: str | None, max_prompt_chars: int
) -> Submission:
    """Check the request's size and give it its job id: new, or the idempotency key's."""
    check_size(request, max_prompt_chars)
    if idempotency_key is None:
        return Submission(new_job_id(), request, packable=True)
    return Submission(idempotent_job_id(idempotency_key), request)


def submissions(
    items: Iterable[JobRequest | str | Mapping[str, Any]], max_prompt_chars: int
) -> list[Submission]:
    """submit_many's input, every item checked before any is published.

    An item is a PromptRequest or an EmbeddingRequest, a prompt string, or a mapping with
    ``prompt`` or ``messages``, optional ``model``, ``llm``, ``idempotency_key`` and
    ``budget``, and sampling parameters beside them (as ``submit`` takes them). An error
    names the item's index.
    """
    checked = []
    for index, item in enumerate(items):
        try:
            checked.append(_coerce(item, max_prompt_chars))
        except InvalidRequest as exc:
            raise InvalidRequest(f"requests[{index}]: {exc.message}") from None
    return checked


def _coerce(item: JobRequest | str | Mapping[str, Any], max_prompt_chars: int) -> Submission:
    if isinstance(item, PromptRequest | EmbeddingRequest):
        return submission(item, None, max_prompt_chars)
    if isinstance(item, str):
        return submission(build_request(item, None, None, {}), None, max_prompt_chars)
    if isinstance(item, Mapping):
        fields = dict(item)
        prompt = fields.pop("prompt", None)
        messages = fields.pop("messages", None)
        model = fields.pop("model", None)
        key = fields.pop("idempotency_key", None)
        budget = fields.pop("budget", None)
        llm = fields.pop("llm", None)
        request = build_request(prompt, messages, model, fields, budget=budget, llm=llm)
        return submission(request, key, max_prompt_chars)
    raise InvalidRequest(
        "each request must be a string, a mapping, a PromptRequest or an EmbeddingRequest, "
        f"got {type(item).__name__}"
    )


def prompt_chars(value: Any) -> int:
    """Characters of text in messages: every string in them, at any depth (content, text
    parts, tool-call arguments, data URLs), so the count bounds the message's size."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return sum(prompt_chars(item) for item in value.values())
    if isinstance(value, list | tuple):
        return sum(prompt_chars(item) for item in value)
    return 0


def check_size(request: JobRequest, max_prompt_chars: int) -> None:
    """Refuse a prompt (or all of an embedding request's texts) above the size limit."""
    if isinstance(request, EmbeddingRequest):
        chars, what = prompt_chars(request.input), "the texts to embed are"
    else:
        chars, what = prompt_chars(request.messages), "the prompt is"
    if chars > max_prompt_chars:
        raise InvalidRequest(
            f"{what} {chars:,} characters, above the limit of {max_prompt_chars:,} "
            "(max_prompt_chars, PROMPTQ_MAX_PROMPT_CHARS)"
        )


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "invalid request: " + "; ".join(problems)


def check_budget(max_spend_usd: float, budget_id: str | None) -> tuple[str, float]:
    """A budget's id (a new one unless given) and its cap, both checked."""
    if isinstance(max_spend_usd, bool) or not isinstance(max_spend_usd, int | float):
        raise InvalidRequest(f"max_spend_usd must be a number, got {max_spend_usd!r}")
    if not math.isfinite(max_spend_usd) or max_spend_usd < 0:
        raise InvalidRequest(f"max_spend_usd must be a finite amount >= 0, got {max_spend_usd}")
    budget_id = budget_id if budget_id is not None else f"budget-{uuid.uuid4()}"
    if not isinstance(budget_id, str) or not _BUDGET_ID.fullmatch(budget_id):
        raise InvalidRequest(f"not a budget id (letters, digits, _.:- up to 128): {budget_id!r}")
    return budget_id, float(max_spend_usd)


def new_job_id() -> str:
    return str(uuid.uuid4())


def idempotent_job_id(idempotency_key: Any) -> str:
    """The job id an idempotency key names: the same key always gives the same job.

    The job's own keys in Redis are then the record of the key: publishing is a no-op for a
    job id that already has a state or a result (see _PUBLISH), for as long as they are kept.
    """
    if not isinstance(idempotency_key, str) or not idempotency_key:
        raise InvalidRequest(
            f"idempotency_key must be a non-empty string, got {idempotency_key!r:.60}"
        )
    if len(idempotency_key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(
            f"idempotency_key is {len(idempotency_key):,} characters, above the limit of "
            f"{MAX_IDEMPOTENCY_KEY_CHARS:,}"
        )
    return f"idem-{uuid.uuid5(IDEMPOTENCY_NAMESPACE, idempotency_key)}"


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidRequest(f"not a job id: {job_id!r}")
    return job_id


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


class JobHandle(Generic[ResultT]):
    """What Job and AsyncJob share: the id, and what the latest poll found.

    ``ResultT`` is the type of the job's result: PromptResult for a prompt, EmbeddingResult
    for embed(); Any where the handle does not know (Client.job, submit_many).
    """

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self._outcome: Outcome | None = None
        self.last_status: JobStatus | None = None  # as seen by the latest poll

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    def _result(self) -> ResultT:
        """The result of the finished job, or its error raised as JobFailed."""
        assert self._outcome is not None
        return cast(ResultT, unwrap(self.id, self._outcome))

    def _settle(self, found: Outcome | JobStatus) -> bool:
        """Record what a poll found; True when the job has finished."""
        if isinstance(found, Outcome):
            self._outcome = found
            self.last_status = found.status
            return True
        self.last_status = found
        return False


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


Raw = bytes | str | None  # a value as redis-py returns it


def text_of(value: bytes | str | int) -> str:
    """A value redis-py returned (bytes unless decoding is on; a number from Lua) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def poll_keys(job_id: str) -> list[str]:
    """The keys read to learn a job's status: its outcome, then its non-terminal state."""
    return [result_key(job_id), state_key(job_id)]


def read_poll(job_ids: Sequence[str], raws: Sequence[Raw]) -> dict[str, Outcome | JobStatus]:
    """Read an MGET of poll_keys for each job: its outcome if finished, else its state."""
    return {
        job_id: _outcome_or_state(job_id, raws[2 * index], raws[2 * index + 1])
        for index, job_id in enumerate(job_ids)
    }


def _outcome_or_state(job_id: str, outcome_raw: Raw, state_raw: Raw) -> Outcome | JobStatus:
    if outcome_raw is not None:
        return Outcome.model_validate_json(outcome_raw)
    if state_raw is None:
        raise _not_found(job_id)
    return JobStatus(text_of(state_raw))


def status_of(job_id: str, outcome_raw: Raw, state_raw: Raw) -> JobStatus:
    """A stored terminal outcome always wins over a (possibly late) non-terminal state."""
    found = _outcome_or_state(job_id, outcome_raw, state_raw)
    return found.status if isinstance(found, Outcome) else found


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id} (never submitted, or expired)", job_id=job_id)


def job_timeout(job_id: str, timeout_s: float, cause: BaseException | None) -> JobTimeout:
    """wait()'s JobTimeout; ``cause`` is the BrokerUnavailable it ended in, if Redis was down."""
    message = f"job {job_id} did not finish within {timeout_s:g} s; it is still queued or running"
    if isinstance(cause, BrokerUnavailable):
        message = (
            f"job {job_id}: wait() gave up after {timeout_s:g} s with Redis unreachable "
            f"({cause.message}); the job may be queued, running or finished"
        )
    return JobTimeout(message, job_id=job_id, timeout_s=timeout_s)


def unwrap(job_id: str, outcome: Outcome) -> JobResult:
    """The result of a finished job, or its error raised as JobFailed."""
    if outcome.result is not None:
        return outcome.result
    assert outcome.error is not None
    error = outcome.error
    raise JobFailed(
        error.message,
        job_id=job_id,
        kind=error.kind.value,
        status_code=error.status_code,
        attempts=error.attempts,
    )


@contextmanager
def broker_errors(redis_url: str) -> Iterator[None]:
    """Turn Redis connection failures into BrokerUnavailable, naming the (redacted) URL."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise BrokerUnavailable(f"cannot reach Redis at {redact_url(redis_url)}: {exc}") from exc


def redact_url(url: str) -> str:
    """The Redis URL with any password replaced, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Poller:
    """Paces result polling: eager at first, backing off to a ceiling, never past the deadline.

    It also rides out a Redis outage: while polls fail it keeps retrying with a backoff, until
    the deadline (JobTimeout), or with no deadline for ``max_outage_s`` (BrokerUnavailable).
    """

    FIRST_S = 0.005
    CEILING_S = 0.1
    OUTAGE_FIRST_S = 0.05
    OUTAGE_CEILING_S = 1.0

    def __init__(self, timeout_s: float | None, max_outage_s: float = math.inf) -> None:
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._next_s = self.FIRST_S
        self._max_outage_s = max_outage_s
        self._outage_since: float | None = None
        self._outage_next_s = self.OUTAGE_FIRST_S

    def progressed(self) -> None:
        """Something finished: poll eagerly again."""
        self._next_s = self.FIRST_S

    def sleep_s(self, pending: int) -> float:
        """How long to sleep before the next poll; JobTimeout once the deadline has passed."""
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2, self.CEILING_S)
        return self._bounded(delay_s, pending, None)

    def reachable(self) -> None:
        """A poll got through: end any outage."""
        if self._outage_since is not None:
            logger.warning(
                "Redis is reachable again after %.1f s; waiting goes on",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None
            self._outage_next_s = self.OUTAGE_FIRST_S

    def unreachable(self, exc: BrokerUnavailable, pending: int) -> float:
        """A poll failed: how long to sleep before trying again.

        Raises JobTimeout (caused by ``exc``) once the deadline has passed, or, with no
        deadline, BrokerUnavailable once Redis has been unreachable for ``max_outage_s``.
        """
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            limit = (
                f"until the timeout ({self._timeout_s:g} s)"
                if self._timeout_s is not None
                else f"for up to {self._max_outage_s:g} s (PROMPTQ_MAX_OUTAGE_S)"
            )
            logger.warning(
                "Redis unreachable, still waiting for %d job(s) and retrying %s: %s",
                pending,
                limit,
                exc,
            )
        outage_s = now - self._outage_since
        if self._deadline is None and outage_s >= self._max_outage_s:
            raise BrokerUnavailable(
                f"{exc.message} (unreachable for {outage_s:.1f} s, beyond max_outage_s / "
                f"PROMPTQ_MAX_OUTAGE_S = {self._max_outage_s:g} s); {pending} job(s) unfinished"
            ) from exc
        delay_s = self._outage_next_s
        self._outage_next_s = min(self._outage_next_s * 2, self.OUTAGE_CEILING_S)
        if self._deadline is None:
            return min(delay_s, self._max_outage_s - outage_s)
        return self._bounded(delay_s, pending, exc)

    def _bounded(self, delay_s: float, pending: int, cause: BrokerUnavailable | None) -> float:
        if self._deadline is None or self._timeout_s is None:
            return delay_s
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise JobTimeout(
                f"{pending} job(s) unfinished after {self._timeout_s:g} s"
                + (f"; Redis unreachable ({cause.message})" if cause is not None else ""),
                job_id=None,
                timeout_s=self._timeout_s,
            ) from cause
        return min(delay_s, remaining_s)
