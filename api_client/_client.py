"""The blocking client: Client submits jobs, Job follows one."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ._errors import JobTimeout
from ._schemas import JobStatus, PromptRequest, PromptResult
from ._settings import ClientSettings
from ._wire import (
    JobHandle,
    Poller,
    broker_errors,
    build_request,
    check_job_id,
    coerce_request,
    enqueue,
    job_timeout,
    new_job_id,
    poll_keys,
    read_poll,
    status_of,
    unwrap,
)


class Client:
    """Submit prompts to the promptq workers and collect their results.

    >>> with Client() as client:
    ...     job = client.submit("Summarise this ...", max_tokens=200)
    ...     print(job.wait(timeout=60).content)
    """

    def __init__(self, redis_url: str | None = None, *, settings: ClientSettings | None = None):
        self.settings = settings or ClientSettings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        self._redis = redis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=self.settings.connect_timeout_s,
            socket_timeout=self.settings.socket_timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._redis.close()

    def submit(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        model: str | None = None,
        **params: Any,
    ) -> Job:
        """Queue one prompt (plain text or OpenAI-style messages) and return its Job at once."""
        return self._publish([build_request(prompt, messages, model, params)])[0]

    def submit_many(self, requests: Iterable[PromptRequest | str | Mapping[str, Any]]) -> list[Job]:
        """Queue many prompts in one round trip to Redis; all are validated before any is queued.

        Each request is a prompt string, a mapping like ``{"prompt": ..., "temperature": 0}`` or
        ``{"messages": [...], "model": ...}``, or a PromptRequest.
        """
        return self._publish([coerce_request(item) for item in requests])

    def job(self, job_id: str) -> Job:
        """A handle on an existing job, for example one submitted by another process."""
        return Job(self, check_job_id(job_id))

    def as_completed(self, jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
        """Yield each job as it finishes (succeeded or failed), in finishing order.

        ``job.result()`` on a yielded job returns its PromptResult or raises JobFailed.
        Raises JobTimeout if some are still unfinished after ``timeout`` seconds.
        """
        pending = {job.id: job for job in jobs}
        poller = Poller(timeout)
        while pending:
            finished = self.poll(pending.values())
            for job in finished:
                del pending[job.id]
                yield job
            if not pending:
                return
            if finished:
                poller.progressed()
            time.sleep(poller.sleep_s(len(pending)))

    def poll(self, jobs: Iterable[Job]) -> list[Job]:
        """Check once, without waiting, in one round trip: the jobs among these that finished.

        Unfinished jobs keep the state seen in ``job.last_status`` (queued, running, retrying).
        """
        jobs = list(jobs)
        with self._guard():
            raws = self._redis.mget([key for job in jobs for key in poll_keys(job.id)])
        polled = read_poll([job.id for job in jobs], raws)
        return [job for job in jobs if job._settle(polled[job.id])]

    def _publish(self, requests: Sequence[PromptRequest]) -> list[Job]:
        jobs = [Job(self, new_job_id()) for _ in requests]
        with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            enqueue(pipe, [job.id for job in jobs], requests, self.settings.result_ttl_s)
            pipe.execute()
        return jobs

    def _status(self, job_id: str) -> JobStatus:
        with self._guard():
            raws = self._redis.mget(poll_keys(job_id))
        return status_of(job_id, *raws)

    def _guard(self) -> AbstractContextManager[None]:
        return broker_errors(self.settings.redis_url)


class Job(JobHandle):
    """One submitted prompt. Cheap to create; holds no connection of its own."""

    def __init__(self, client: Client, job_id: str) -> None:
        super().__init__(job_id)
        self._client = client

    def status(self) -> JobStatus:
        """queued, running, retrying, succeeded or failed; JobNotFound if unknown or expired."""
        if self._outcome is not None:
            return self._outcome.status
        return self._client._status(self.id)

    def result(self) -> PromptResult | None:
        """The result if the job succeeded, None while it is not finished; raises JobFailed."""
        if self._outcome is None:
            self._client.poll([self])
        return None if self._outcome is None else unwrap(self.id, self._outcome)

    def wait(self, timeout: float | None = None) -> PromptResult:
        """Block until the job finishes; return its result or raise JobFailed / JobTimeout."""
        try:
            for _ in self._client.as_completed([self], timeout=timeout):
                pass
        except JobTimeout as exc:
            raise job_timeout(self.id, exc.timeout_s) from None
        assert self._outcome is not None
        return unwrap(self.id, self._outcome)
