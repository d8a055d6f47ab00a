"""The configuration every end-to-end worker runs with, scaled down for tests, and a worker
started with it: as a context manager, or as a module's fixture."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

# Used as the worker's API key through every end-to-end run; it must never surface in Redis,
# a result, an error or a log line.
CANARY_KEY = "sk-canary-7f3a9c2e51d84b06"

NUM_RETRIES = 3


def worker_env(redis_url: str, base_url: str) -> dict[str, str]:
    """The scaled-down configuration every end-to-end worker runs with."""
    return {
        "PROMPTQ_REDIS_URL": redis_url,
        "PROMPTQ_VISIBILITY_TIMEOUT_S": "60",
        "LLM_MODEL": "openai/test-model",
        "LLM_API_KEY": CANARY_KEY,
        "LLM_BASE_URL": base_url,
        "LLM_NUM_RETRIES": str(NUM_RETRIES),
        "LLM_RETRY_MIN_WAIT": "0.05",
        "LLM_RETRY_MAX_WAIT": "0.2",
        "LLM_RETRY_MULTIPLIER": "0.01",
        "LLM_TIMEOUT": "1",
        # No slow start (tests/e2e/test_ratelimit turns it on): a test's first calls are not
        # paced by a limit nobody stated.
        "PROMPTQ_LIMITER_START_RPM": "0",
    }


def e2e_worker(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    directory: Path,
    *,
    env: Mapping[str, str] | None = None,
    name: str = "worker",
    args: tuple[str, ...] = (),
    loglevel: str | None = "INFO",
    processes: int | None = 1,
) -> WorkerProcess:
    """A `promptq worker` on ``redis_server`` calling ``provider``, with worker_env's
    configuration and ``env`` on top, logging to DIRECTORY/NAME.log; not started yet.

    As a context manager it starts, waits until it is ready, and stops at the end; or call
    start() and wait_ready(). ``args``, ``loglevel`` and ``processes`` are WorkerProcess's.
    """
    return WorkerProcess(
        worker_env(redis_server.url, provider.base_url) | dict(env or {}),
        directory / f"{name}.log",
        args=args,
        loglevel=loglevel,
        processes=processes,
    )


def module_worker(
    *,
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    loglevel: str | None = "INFO",
    directory: str = "worker",
) -> Callable[..., Iterator[WorkerProcess]]:
    """A module-scoped fixture running one e2e_worker (``env``, ``args`` and ``loglevel`` as
    there) on the module's ``redis_server`` and ``provider`` fixtures: ready before the first
    test that asks for it, stopped after the module. Assign it to the fixture's name::

        worker = module_worker(args=("--concurrency", "4"))
    """

    @pytest.fixture(scope="module")
    def running_worker(
        redis_server: RedisServer,
        provider: ScriptedOpenAIServer,
        tmp_path_factory: pytest.TempPathFactory,
    ) -> Iterator[WorkerProcess]:
        where = tmp_path_factory.mktemp(directory)
        with e2e_worker(
            redis_server, provider, where, env=env, args=args, loglevel=loglevel
        ) as process:
            yield process

    return running_worker
