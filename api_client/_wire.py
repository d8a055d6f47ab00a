"""Sans-IO protocol shared by both clients: requests, Celery messages, outcomes, polling."""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from pydantic import ValidationError

from ._constants import QUEUE, TASK_NAME, result_key, state_key
from ._errors import BrokerUnavailable, InvalidRequest, JobFailed, JobNotFound, JobTimeout
from ._schemas import JobStatus, Outcome, PromptRequest, PromptResult

_JOB_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_ORIGIN = f"promptq-client@{socket.gethostname()}:{os.getpid()}"


def build_request(
    prompt: str | None, messages: Any, model: str | None, params: Mapping[str, Any]
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
        return PromptRequest(messages=[dict(m) for m in messages], model=model, params=dict(params))
    except ValidationError as exc:
        raise InvalidRequest(_describe(exc)) from None


def coerce_request(item: PromptRequest | str | Mapping[str, Any]) -> PromptRequest:
    """Turn one element of submit_many's input into a request.

    Accepts a PromptRequest, a prompt string, or a mapping with ``prompt`` or ``messages``,
    optional ``model``, and sampling parameters beside them (as ``submit`` takes them).
    """
    if isinstance(item, PromptRequest):
        return item
    if isinstance(item, str):
        return build_request(item, None, None, {})
    if isinstance(item, Mapping):
        fields = dict(item)
        prompt = fields.pop("prompt", None)
        messages = fields.pop("messages", None)
        model = fields.pop("model", None)
        return build_request(prompt, messages, model, fields)
    raise InvalidRequest(
        f"each request must be a string, a mapping or a PromptRequest, got {type(item).__name__}"
    )


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "invalid request: " + "; ".join(problems)


def new_job_id() -> str:
    return str(uuid.uuid4())


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise InvalidRequest(f"not a job id: {job_id!r}")
    return job_id


def enqueue(
    pipe: Any, job_ids: Sequence[str], requests: Sequence[PromptRequest], ttl_s: float
) -> None:
    """Add each job's queued state and its task message to a (sync or async) Redis pipeline."""
    ttl_ms = int(ttl_s * 1000)
    for job_id, request in zip(job_ids, requests, strict=True):
        pipe.set(state_key(job_id), JobStatus.QUEUED.value, px=ttl_ms)
        pipe.lpush(QUEUE, task_message(job_id, request))


class JobHandle:
    """What Job and AsyncJob share: the id, and what the latest poll found."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self._outcome: Outcome | None = None
        self.last_status: JobStatus | None = None  # as seen by the latest poll

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"

    def _settle(self, found: Outcome | JobStatus) -> bool:
        """Record what a poll found; True when the job has finished."""
        if isinstance(found, Outcome):
            self._outcome = found
            self.last_status = found.status
            return True
        self.last_status = found
        return False


def task_message(
    job_id: str,
    request: PromptRequest,
    *,
    kwargs: Mapping[str, Any] | None = None,
    retries: int = 0,
) -> bytes:
    """The message Celery's Redis transport expects in the queue (task protocol 2, JSON).

    Built here rather than by Celery so the client stays light and can pipeline many
    publishes in one round trip. argsrepr hides the prompt from worker logs. The worker
    builds one too when it parks a job (``kwargs`` carry its state, ``retries`` counts the
    deliveries before it).
    """
    body = [[request.model_dump(mode="json")], dict(kwargs or {}), _NO_CANVAS]
    envelope = {
        "body": base64.b64encode(json.dumps(body).encode()).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": TASK_NAME,
            "id": job_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": retries,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": "(<request>,)",
            "kwargsrepr": "{}",
            "origin": _ORIGIN,
            "ignore_result": True,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope).encode()


_NO_CANVAS = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


Raw = bytes | str | None  # a value as redis-py returns it


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
    return JobStatus(state_raw.decode() if isinstance(state_raw, bytes) else state_raw)


def status_of(job_id: str, outcome_raw: Raw, state_raw: Raw) -> JobStatus:
    """A stored terminal outcome always wins over a (possibly late) non-terminal state."""
    found = _outcome_or_state(job_id, outcome_raw, state_raw)
    return found.status if isinstance(found, Outcome) else found


def _not_found(job_id: str) -> JobNotFound:
    return JobNotFound(f"no job {job_id} (never submitted, or expired)", job_id=job_id)


def job_timeout(job_id: str, timeout_s: float) -> JobTimeout:
    return JobTimeout(
        f"job {job_id} did not finish within {timeout_s:g} s; it is still queued or running",
        job_id=job_id,
        timeout_s=timeout_s,
    )


def unwrap(job_id: str, outcome: Outcome) -> PromptResult:
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
    """Paces result polling: eager at first, backing off to a ceiling, never past the deadline."""

    FIRST_S = 0.005
    CEILING_S = 0.1

    def __init__(self, timeout_s: float | None) -> None:
        self._timeout_s = timeout_s
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._next_s = self.FIRST_S

    def progressed(self) -> None:
        """Something finished: poll eagerly again."""
        self._next_s = self.FIRST_S

    def sleep_s(self, pending: int) -> float:
        """How long to sleep before the next poll; JobTimeout once the deadline has passed."""
        delay_s = self._next_s
        self._next_s = min(self._next_s * 2, self.CEILING_S)
        if self._deadline is None or self._timeout_s is None:
            return delay_s
        remaining_s = self._deadline - time.monotonic()
        if remaining_s <= 0:
            raise JobTimeout(
                f"{pending} job(s) unfinished after {self._timeout_s:g} s",
                job_id=None,
                timeout_s=self._timeout_s,
            )
        return min(delay_s, remaining_s)
