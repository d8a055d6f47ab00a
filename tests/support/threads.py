"""Running test code off the main thread, where event loops it leaves behind harm no one."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def off_main_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread and return its result (or raise its exception).

    A synchronous LiteLLM call leaves an event loop set, unclosed, on its thread; on the main
    thread a later asyncio.run() would replace and orphan it, and its ResourceWarning would
    fail whichever test the garbage collector happens to run in. An asyncio.run() of its own
    is kept off the main thread for the same reason.
    """
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(fn).result(timeout=60)
