"""Polling: reading a job's outcome or state, pacing the polls, and Redis errors on the way."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import redis

from ._constants import result_key, state_key
from ._errors import BrokerUnavailable, JobFailed, JobNotFound, JobTimeout
from ._schemas import JobResult, JobStatus, Outcome

# redis-py retries a command on these only: a refused or reset connection is worth a second
# try on a fresh socket (a restarted Redis), a timeout is not (an unresponsive Redis would
# make each call take (retries + 1) timeouts). Publishing is safe to retry: see _publish._PUBLISH.
RETRIED_ERRORS = (redis.ConnectionError,)

logger = logging.getLogger("promptq.client")


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
