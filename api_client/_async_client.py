"""The asyncio client: AsyncClient and AsyncJob, the same verbs as coroutines."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from types import TracebackType
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

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

AsyncJobT = TypeVar("AsyncJobT", bound="AsyncJob[Any]")


class AsyncClient:
    """Like Client, for asyncio code: nothing here blocks the event loop.

    >>> async with AsyncClient() as client:
    ...     jobs = [await client.submit(p) for p in prompts]
    ...     results = await asyncio.gather(*(job.wait() for job in jobs))
    """

    def __init__(self, redis_url: str | None = None, *, settings: ClientSettings | None = None):
        self.settings = settings or ClientSettings()
        if redis_url is not None:
            self.settings = self.settings.model_copy(update={"redis_url": redis_url})
        self._redis = aioredis.Redis.from_url(
            self.settings.redis_url,
            socket_connect_timeout=self.settings.connect_timeout_s,
            socket_timeout=self.settings.socket_timeout_s,
            retry=Retry(
                ExponentialBackoff(cap=0.5, base=0.05), retries=2, supported_errors=RETRIED_ERRORS
            ),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._redis.aclose()

    async def submit(
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
    ) -> AsyncJob:
        """Queue one prompt and return its AsyncJob at once (see Client.submit)."""
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
        return AsyncJob(self, (await self._publish([job]))[0])

    async def embed(
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
    ) -> AsyncJob[EmbeddingResult]:
        """Queue one embeddings call and return its AsyncJob at once (see Client.embed)."""
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
        return AsyncJob(self, (await self._publish([job]))[0])

    async def submit_many(
        self, requests: Iterable[JobRequest | str | Mapping[str, Any]]
    ) -> list[AsyncJob[Any]]:
        """Queue many jobs in one round trip; all are validated before any is queued (see
        Client.submit_many)."""
        ids = await self._publish(submissions(requests, self.settings.max_prompt_chars))
        return [AsyncJob(self, job_id) for job_id in ids]

    async def create_budget(self, max_spend_usd: float, budget_id: str | None = None) -> str:
        """Create (or re-cap) a spending budget; see Client.create_budget."""
        budget_id, cap = check_budget(max_spend_usd, budget_id)
        with self._guard():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(budget_key(budget_id), "max", cap)
            pipe.pexpire(budget_key(budget_id), int(self.settings.result_ttl_s * 1000))
            await pipe.execute()
        return budget_id

    async def cancel(self, job_ids: str | Iterable[str]) -> CancelResult:
        """Cancel jobs by id, in one round trip; returns what each was found doing (see
        Client.cancel)."""
        ids = unique_ids(job_ids, check_job_id)
        chunked = chunks(ids)
        result = CancelResult()
        if not chunked:
            return result
        with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            for chunk in chunked:
                pipe.eval(*cancel_args(chunk, self.settings.result_ttl_s))
            replies = await pipe.execute()
        for chunk, found in zip(chunked, replies, strict=True):
            result._add(chunk, found)
        return result

    async def cancel_tenant(self, tenant: str) -> CancelResult:
        """Cancel every open job of ``tenant`` (see Client.cancel_tenant)."""
        name = tenant_to_cancel(tenant)
        result, scanned = CancelResult(), ScannedIds()
        ttl_s = self.settings.result_ttl_s
        with self._guard():
            async for raw in self._redis.sscan_iter(tenant_jobs_key(name), count=CANCEL_CHUNK):
                chunk = scanned.add(raw)
                if chunk:
                    result._add(chunk, await self._redis.eval(*cancel_args(chunk, ttl_s, name)))
            chunk = scanned.rest()
            if chunk:
                result._add(chunk, await self._redis.eval(*cancel_args(chunk, ttl_s, name)))
        return result

    def job(self, job_id: str) -> AsyncJob[Any]:
        """A handle on an existing job, for example one submitted by another process (see
        Client.job)."""
        return AsyncJob(self, check_job_id(job_id))

    async def as_completed(
        self, jobs: Iterable[AsyncJobT], timeout: float | None = None
    ) -> AsyncIterator[AsyncJobT]:
        """Yield each job as it finishes, in finishing order (see Client.as_completed)."""
        pending = {job.id: job for job in jobs}
        poller = Poller(timeout, self.settings.max_outage_s)
        while pending:
            try:
                finished = await self.poll(pending.values())
            except BrokerUnavailable as exc:
                await asyncio.sleep(poller.unreachable(exc, len(pending)))
                continue
            poller.reachable()
            for job in finished:
                del pending[job.id]
                yield job
            if not pending:
                return
            if finished:
                poller.progressed()
            await asyncio.sleep(poller.sleep_s(len(pending)))

    async def poll(self, jobs: Iterable[AsyncJobT]) -> list[AsyncJobT]:
        """Check once, without waiting, in one round trip (see Client.poll)."""
        jobs = list(jobs)
        with self._guard():
            raws = await self._redis.mget([key for job in jobs for key in poll_keys(job.id)])
        polled = read_poll([job.id for job in jobs], raws)
        return [job for job in jobs if job._settle(polled[job.id])]

    async def _publish(self, jobs: Sequence[Submission]) -> list[str]:
        """Queue the jobs in one round trip; their ids."""
        with self._guard():
            pipe = self._redis.pipeline(transaction=False)
            enqueue(pipe, jobs, self.settings.result_ttl_s, self.settings.pack_size)
            await pipe.execute()
        return [job.job_id for job in jobs]

    async def _status(self, job_id: str) -> JobStatus:
        with self._guard():
            raws = await self._redis.mget(poll_keys(job_id))
        return status_of(job_id, *raws)

    def _guard(self) -> AbstractContextManager[None]:
        return broker_errors(self.settings.redis_url)


class AsyncJob(JobHandle[ResultT], Generic[ResultT]):
    """One submitted job (see Job), followed from asyncio code."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        super().__init__(job_id)
        self._client = client

    async def status(self) -> JobStatus:
        """queued, running, retrying, succeeded or failed; JobNotFound if unknown or expired."""
        if self._outcome is not None:
            return self._outcome.status
        return await self._client._status(self.id)

    async def cancel(self) -> Cancellation:
        """Cancel the job (see Client.cancel); returns what it was found doing."""
        return (await self._client.cancel([self.id]))[self.id]

    async def result(self) -> ResultT | None:
        """The result if the job succeeded, None while it is not finished; raises JobFailed."""
        if self._outcome is None:
            await self._client.poll([self])
        return None if self._outcome is None else self._result()

    async def wait(self, timeout: float | None = None) -> ResultT:
        """Wait until the job finishes; return its result or raise JobFailed / JobTimeout."""
        try:
            async for _ in self._client.as_completed([self], timeout=timeout):
                pass
        except JobTimeout as exc:
            raise job_timeout(self.id, exc.timeout_s, exc.__cause__) from exc.__cause__
        return self._result()
