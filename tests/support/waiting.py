"""Waiting in tests for a condition that other processes make true, with a deadline."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable

WAIT_S = 30.0  # bounds every wait; a healthy run takes a fraction of it


def wait_until(
    condition: Callable[[], object],
    timeout_s: float = WAIT_S,
    *,
    what: str | None = None,
    interval_s: float = 0.01,
) -> None:
    """Return once ``condition()`` is true; raise AssertionError if it is still false after
    ``timeout_s``, naming the condition (``what``, or the source of the callable)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout_s:g} s: {what or describe(condition)}")
        time.sleep(interval_s)


def describe(condition: Callable[[], object]) -> str:
    """A lambda's source at its call site, or a function's name."""
    name = getattr(condition, "__qualname__", repr(condition))
    if not name.endswith("<lambda>"):
        return name
    try:
        source = inspect.getsource(condition)
    except (OSError, TypeError):
        return name
    return " ".join(source.split())
