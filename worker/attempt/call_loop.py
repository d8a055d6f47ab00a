"""The worker process's event loop: every job's attempt runs on it, a bounded number at once."""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

# Threads for the blocking Redis work of attempts' rarer paths (see offload).
OFFLOAD_THREADS = 16


class CallLoop:
    """One asyncio loop in a daemon thread, shared by the worker's task threads.

    A task thread hands it the attempts of the jobs its message carries (``run``) and blocks
    until they are done; ``permit`` caps the attempts in flight at ``concurrency`` however
    many messages are being worked on. LiteLLM's async calls cost less CPU than its blocking
    ones in many threads, and a message carrying many jobs costs Celery once. The loop's
    one thread is the process's busiest and never waits on a round trip: an attempt's Redis
    calls on its way to an answer run on the loop itself (worker.fleet.scripts.LoopRedis);
    the blocking ones of its rarer paths (a failure, parking, a hand-back) go to ``offload``
    threads.
    """

    def __init__(self, concurrency: int) -> None:
        self._concurrency = concurrency
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._permits: asyncio.Semaphore | None = None
        self._offload = ThreadPoolExecutor(OFFLOAD_THREADS, thread_name_prefix="promptq-redis")

    def run(self, attempts: Sequence[Coroutine[Any, Any, T]]) -> list[T | BaseException]:
        """Run the coroutines concurrently on the loop and wait for all of them; each one's
        result, or the exception it raised."""
        loop = self._started()
        future = asyncio.run_coroutine_threadsafe(_gather(attempts), loop)
        return future.result()

    @asynccontextmanager
    async def permit(self, patience_s: float) -> AsyncIterator[bool]:
        """Hold one of the ``concurrency`` permits for an attempt; yields False (holding
        none) when none came free within ``patience_s``."""
        assert self._permits is not None, "permit() runs on the loop, inside run()"
        try:
            async with asyncio.timeout(patience_s):
                await self._permits.acquire()
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            self._permits.release()

    async def offload(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a blocking function (Redis calls) in an offload thread and wait for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._offload, functools.partial(fn, *args, **kwargs))

    def stop(self) -> None:
        """Stop the loop and its thread (attempts still running are abandoned)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5)
            if not thread.is_alive():
                loop.close()
        self._offload.shutdown(wait=False)

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._permits = asyncio.Semaphore(self._concurrency)
                self._thread = threading.Thread(
                    target=loop.run_forever, name="promptq-calls", daemon=True
                )
                self._thread.start()
                self._loop = loop
            return self._loop


async def _gather(attempts: Sequence[Coroutine[Any, Any, T]]) -> list[T | BaseException]:
    return await asyncio.gather(*attempts, return_exceptions=True)
