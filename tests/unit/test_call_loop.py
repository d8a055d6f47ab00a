"""The worker's event loop: attempts from several task threads, at most `concurrency` at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from worker.attempt.call_loop import CallLoop


@pytest.fixture
def loop() -> Iterator[CallLoop]:
    call_loop = CallLoop(concurrency=2)
    yield call_loop
    call_loop.stop()


def test_run_returns_each_result_or_exception_in_order(loop: CallLoop) -> None:
    async def double(x: int) -> int:
        await asyncio.sleep(0)
        return 2 * x

    async def broken() -> int:
        raise ValueError("boom")

    results = loop.run([double(1), broken(), double(3)])

    assert results[0] == 2 and results[2] == 6
    assert isinstance(results[1], ValueError)


def test_permits_cap_the_attempts_in_flight_across_threads(loop: CallLoop) -> None:
    running = 0
    most = 0

    async def held() -> bool:
        nonlocal running, most
        async with loop.permit(patience_s=30) as permitted:
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.01)
            running -= 1
            return permitted

    results: list[list[object]] = []
    threads = [
        threading.Thread(target=lambda: results.append(loop.run([held() for _ in range(5)])))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert [r for batch in results for r in batch] == [True] * 15
    assert most == 2


def test_no_permit_within_the_patience_is_said(loop: CallLoop) -> None:
    release = asyncio.Event()

    async def hold() -> bool:
        async with loop.permit(patience_s=30) as permitted:
            await release.wait()
            return permitted

    async def late() -> bool:
        await asyncio.sleep(0.01)  # after both holders
        async with loop.permit(patience_s=0.05) as permitted:
            release.set()
            return permitted

    assert loop.run([hold(), hold(), late()]) == [True, True, False]
    # The permits came back: a later attempt gets one.
    assert loop.run([hold_briefly(loop)]) == [True]


async def hold_briefly(loop: CallLoop) -> bool:
    async with loop.permit(patience_s=1) as permitted:
        return permitted
