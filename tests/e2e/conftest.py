"""Real parts for end-to-end tests: a redis-server, a scripted provider, a `promptq worker`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api_client import Client
from api_client._constants import LIMITER_PREFIX
from tests.support.e2e_worker import module_worker
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def flushed_redis(redis_server: RedisServer) -> RedisServer:
    """The module's redis-server, emptied for this test: no job or message of the last one."""
    client = redis_server.client()
    client.flushall()
    client.close()
    return redis_server


@pytest.fixture(scope="module")
def provider() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as server:
        yield server


# The module's worker; a module may run its own instead (module_worker, or a fixture of its own).
worker = module_worker(args=("--concurrency", "16"))


@pytest.fixture
def client(redis_server: RedisServer, worker: WorkerProcess) -> Iterator[Client]:
    with Client(redis_server.url) as client:
        yield client


@pytest.fixture(autouse=True)
def _fresh_script(provider: ScriptedOpenAIServer) -> None:
    provider.reset()


@pytest.fixture(autouse=True)
def _fresh_limiter(redis_server: RedisServer) -> None:
    """Each test starts with no rate-limit state: a 429 scripted by one test would otherwise
    make the workers' adaptive limiter slow down the next."""
    client = redis_server.client()
    try:
        keys = list(client.scan_iter(match=f"{LIMITER_PREFIX}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
