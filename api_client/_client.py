"""The blocking client: Client submits jobs, Job follows one."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from ._cancel import (
    CANCEL_CHUNK,
    Cancellation,
    CancelResult,
    ScannedIds,
    cancel_args,
    chunks,
    tenant_to_cancel,
    unique_ids,
)
from ._constants import budget_key, tenant_jobs_key
from ._errors import BrokerUnavailable, JobTimeout
from ._handle import JobHandle, ResultT
from ._polling import (
    RETRIED_ERRORS,
    Poller,
    broker_errors,
    job_timeout,
    poll_keys,
    read_poll,
    status_of,
)
from ._publish import enqueue
from ._requests import (
    Submission,
    build_embedding_request,
    build_request,
    check_budget,
    check_job_id,
    submission,
    submissions,
)
from ._schemas import EmbeddingResult, JobRequest, JobStatus, Priority
from ._settings import ClientSettings

JobT = TypeVar("JobT", bound="Job[Any]")


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
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05), retries=2, supported_errors=RETRIED_ERRORS
            ),
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
        idempotency_key: str | None = None,
        budget: str | None = None,
        llm: str | None = None,
        priority: Priority | str | None = None,
        tenant: str | None = None,
        deadline_s: float | None = None,
        deadline: datetime | float | None = None,
        **params: Any,
    ) -> Job:
        """Queue one prompt (plain text or OpenAI-style messages) and return its Job at once.

        With ``idempotency_key``, every submit with that key returns the same job and queues it
        once, from any thread or process, as long as the job's state or result is kept
        (PROMPTQ_RESULT_TTL_S). With ``budget``, its calls are charged to that budget
        (see create_budget). With ``llm``, the workers call it with their [llm.NAME] settings
        of that name (model, endpoint, key, retries) instead of [llm].

        Scheduling: ``priority`` is ``"interactive"``, ``"default"`` (the default) or
        ``"batch"`` (see Priority), highest first. ``tenant`` names whose job it is (letters,
        digits and ``_.:-``, up to 64; None: the tenant ``"default"``): the fleet shares its
        capacity between tenants by the weights of the workers' [tenants] settings. A deadline
        is ``deadline_s`` seconds from now or ``deadline``, a timezone-aware datetime or epoch
        seconds (not both): a job that cannot start, or retry, before it fails with kind
        ``deadline_exceeded``. None of these is sent to the provider.

        Raises InvalidRequest for bad input (nothing is queued) and BrokerUnavailable when
        Redis cannot be reached within the client's timeouts.
        """
        request = build_request(
            prompt,
            messages,
            model,
            params,
            budget=budget,
            llm=llm,
            priority=priority,
            tenant=tenant,
            deadline_s=deadline_s,
            deadline=deadline,
        )
        job = submission(request, idempotency_key, self.settings.max_prompt_chars)
        return Job(self, self._publish([job])[0])

    def embed(
        self,
        texts: str | Sequence[str],
        model: str | None = None,
        *,
        idempotency_key: str | None = None,
        budget: str | None = None,
        llm: str | None = None,
        priority: Priority | str | None = None,
        tenant: str | None = None,
        deadline_s: float | None = None,
        deadline: datetime | float | None = None,
        **params: Any,
    ) -> Job[EmbeddingResult]:
        """Queue one embeddings call for ``texts`` (up to 2,048) and return its Job at once.

        Its result holds one vector per text, in order, with usage and cost. ``model``
        defaults to the workers' LLM_EMBEDDING_MODEL (or their Azure
        LLM_EMBEDDING_DEPLOYMENT_NAME); ``params`` are the provider's embedding parameters,
        such as ``dimensions``. The other arguments (scheduling included), retries, rate
        limits and spending caps work as for submit.
        """
        request = build_embedding_request(
            texts,
            model,
            params,
            budget=budget,
            llm=llm,
            priority=priority,
            tenant=tenant,
            deadline_s=deadline_s,
            deadline=deadline,
        )
        job = submission(request, idempotency_key, self.settings.max_prompt_chars)
        return Job(self, self._publish([job])[0])

    def submit_many(
        self, requests: Iterable[JobRequest | str | Mapping[str, Any]]
    ) -> list[Job[Any]]:
        """Queue many jobs in one round trip to Redis; all are validated before any is queued.

        Each request is a prompt string, a mapping like ``{"prompt": ..., "temperature": 0}`` or
        ``{"messages": [...], "model": ...}``, a PromptRequest, or an EmbeddingRequest (whose
        job's result is an EmbeddingResult); a mapping may carry ``idempotency_key``,
        ``budget``, ``llm``, ``priority``, ``tenant``, ``deadline_s`` and ``deadline`` as submit
        takes them, and a request object carries its own priority, tenant and deadline_at.
        An InvalidRequest names the bad item's index: ``requests[2]: ...``.
        """
        ids = self._publish(submissions(requests, self.settings.max_prompt_chars))
        return [Job(self, job_id) for job_id in ids]

    def create_budget(self, max_spend_usd: float, budget_id: str | None = None) -> str:
        """Create a spending budget of ``max_spend_usd`` (or re-cap an existing one) and
        return its id; jobs submitted with ``budget=`` that id are refused with
        ``budget_exceeded`` once it is spent. It is kept for PROMPTQ_RESULT_TTL_S."""
        budget_id, cap = check_budget(max_spend_usd, budget_id)
        with self._guard():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(budget_key(budget_id), "max", cap)
            pipe.pexpire(budget_key(budget_id), int(self.settings.result_ttl_s * 1000))
            pipe.execute()
        return budget_id

    def cancel(self, job_ids: str | Iterable[str]) -> CancelResult:
        """Cancel jobs by id, in one round trip; returns what each was found doing.

        A job still waiting (queued, in line for its rate limit, or for a retry) ends at once:
        status ``failed``, kind ``cancelled``, and no call of it is made any more. A job whose
        call is in flight (``running``) keeps that call's outcome, but is not retried: if the
        call fails, it ends ``cancelled``. A finished job is left as it is (``finished``, with
        its status); an id of no job is ``unknown``. See CancelResult.

        >>> client.cancel([job.id for job in jobs]).counts()

        Raises InvalidRequest for a malformed id (nothing is cancelled) and BrokerUnavailable
        when Redis cannot be reached.
        """
        ids = unique_ids(job_ids, check_job_id)
        chunked = chunks(ids)
        result = CancelResult()
        if not chunked:
            return result
        with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            for chunk in chunked:
                pipe.eval(*cancel_args(chunk, self.settings.result_ttl_s))
            replies = pipe.execute()
        for chunk, found in zip(chunked, replies, strict=True):
            result._add(chunk, found)
        return result

    def cancel_tenant(self, tenant: str) -> CancelResult:
        """Cancel every open job of ``tenant`` (its name as submitted; ``"default"`` for jobs
        that named none), as cancel does; returns what each was found doing. A batch is a
        tenant of its own (``batch-<OUTPUT's stem>`` unless ``--tenant``): this cancels it.

        Jobs submitted while it runs may be missed. Raises InvalidRequest for a malformed
        name and BrokerUnavailable when Redis cannot be reached.
        """
        name = tenant_to_cancel(tenant)
        result, scanned = CancelResult(), ScannedIds()
        ttl_s = self.settings.result_ttl_s
        with self._guard():
            for raw in self._redis.sscan_iter(tenant_jobs_key(name), count=CANCEL_CHUNK):
                chunk = scanned.add(raw)
                if chunk:
                    result._add(chunk, self._redis.eval(*cancel_args(chunk, ttl_s, name)))
            chunk = scanned.rest()
            if chunk:
                result._add(chunk, self._redis.eval(*cancel_args(chunk, ttl_s, name)))
        return result

    def job(self, job_id: str) -> Job[Any]:
        """A handle on an existing job, for example one submitted by another process: its
        result is a PromptResult, or an EmbeddingResult for a job made by embed()."""
        return Job(self, check_job_id(job_id))

    def as_completed(self, jobs: Iterable[JobT], timeout: float | None = None) -> Iterator[JobT]:
        """Yield each job as it finishes (succeeded or failed), in finishing order.

        ``job.result()`` on a yielded job returns its result or raises JobFailed.
        Raises JobTimeout if some are still unfinished after ``timeout`` seconds. While Redis is
        unreachable it keeps retrying, until ``timeout``, or with no timeout for
        ``settings.max_outage_s`` (then BrokerUnavailable).
        """
        pending = {job.id: job for job in jobs}
        poller = Poller(timeout, self.settings.max_outage_s)
        while pending:
            try:
                finished = self.poll(pending.values())
            except BrokerUnavailable as exc:
                time.sleep(poller.unreachable(exc, len(pending)))
                continue
            poller.reachable()
            for job in finished:
                del pending[job.id]
                yield job
            if not pending:
                return
            if finished:
                poller.progressed()
            time.sleep(poller.sleep_s(len(pending)))

    def poll(self, jobs: Iterable[JobT]) -> list[JobT]:
        """Check once, without waiting, in one round trip: the jobs among these that finished.

        Unfinished jobs keep the state seen in ``job.last_status`` (queued, running, retrying).
        """
        jobs = list(jobs)
        with self._guard():
            raws = self._redis.mget([key for job in jobs for key in poll_keys(job.id)])
        polled = read_poll([job.id for job in jobs], raws)
        return [job for job in jobs if job._settle(polled[job.id])]

    def _publish(self, jobs: Sequence[Submission]) -> list[str]:
        """Queue the jobs in one round trip; their ids."""
        with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            enqueue(pipe, jobs, self.settings.result_ttl_s, self.settings.pack_size)
            pipe.execute()
        return [job.job_id for job in jobs]

    def _status(self, job_id: str) -> JobStatus:
        with self._guard():
            raws = self._redis.mget(poll_keys(job_id))
        return status_of(job_id, *raws)

    def _guard(self) -> AbstractContextManager[None]:
        return broker_errors(self.settings.redis_url)


class Job(JobHandle[ResultT], Generic[ResultT]):
    """One submitted job: a prompt (its result a PromptResult) or, from embed(), texts to
    embed (an EmbeddingResult). Cheap to create; holds no connection of its own."""

    def __init__(self, client: Client, job_id: str) -> None:
        super().__init__(job_id)
        self._client = client

    def status(self) -> JobStatus:
        """queued, running, retrying, succeeded or failed; JobNotFound if unknown or expired."""
        if self._outcome is not None:
            return self._outcome.status
        return self._client._status(self.id)

    def cancel(self) -> Cancellation:
        """Cancel the job (see Client.cancel); returns what it was found doing: cancelled,
        running (its call's outcome stands, but it is not retried), finished or unknown."""
        return self._client.cancel([self.id])[self.id]

    def result(self) -> ResultT | None:
        """The result if the job succeeded, None while it is not finished; raises JobFailed."""
        if self._outcome is None:
            self._client.poll([self])
        return None if self._outcome is None else self._result()

    def wait(self, timeout: float | None = None) -> ResultT:
        """Block until the job finishes; return its result or raise JobFailed / JobTimeout.

        Rides out a Redis outage as as_completed does.
        """
        try:
            for _ in self._client.as_completed([self], timeout=timeout):
                pass
        except JobTimeout as exc:
            raise job_timeout(self.id, exc.timeout_s, exc.__cause__) from exc.__cause__
        return self._result()
