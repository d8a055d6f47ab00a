"""Fixtures shared by the unit tests: a clean environment, a scratch working directory, Redis
for Lua scripts, a scripted OpenAI-compatible server and the in-process pipeline over both."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fakeredis
import pytest
import redis

from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer

if TYPE_CHECKING:  # the pipeline imports LiteLLM: only its tests pay for that
    from tests.support.pipeline import MakePipeline, Pipeline

_OWNED_PREFIXES = ("LLM_", "PROMPTQ_")

# Test modules that import litellm themselves may do so before worker.llm.call sets this: LiteLLM
# would then fetch its price map from GitHub at import. Tests never reach the network.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No LLM_* / PROMPTQ_* variable from the caller's shell, and no ./config.toml in reach.

    Returns the scratch directory the test runs in.
    """
    for name in list(os.environ):
        if name.upper().startswith(_OWNED_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def closed_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def real_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the unit tests that run their scripts on the real thing too."""
    with RedisServer(tmp_path_factory.mktemp("unit-redis")) as server:
        yield server


@pytest.fixture(params=["fakeredis", "redis-server"])
def lua_redis(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """An empty Redis for Lua scripts: fakeredis (lupa), then a real redis-server."""
    if request.param == "fakeredis":
        yield fakeredis.FakeRedis(server=fakeredis.FakeServer())
        return
    server: RedisServer = request.getfixturevalue("real_redis")
    connection = server.client()
    connection.flushall()
    try:
        yield connection
    finally:
        connection.close()


@pytest.fixture(scope="module")
def _module_server() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as srv:
        yield srv


@pytest.fixture
def server(_module_server: ScriptedOpenAIServer) -> ScriptedOpenAIServer:
    """A scripted OpenAI-compatible server on 127.0.0.1, one per test module, its script and
    recorded requests cleared for each test."""
    _module_server.reset()
    return _module_server


@pytest.fixture
def make_pipeline(real_redis: RedisServer, server: ScriptedOpenAIServer) -> Iterator[MakePipeline]:
    """Makes in-process pipelines (tests/support/pipeline.py; keyword arguments: its settings
    overrides) on the session's redis-server, emptied first, and the module's provider."""
    from tests.support.pipeline import Pipeline  # noqa: PLC0415  (LiteLLM: paid here only)

    client = real_redis.client()
    client.flushall()
    client.close()
    made: list[Pipeline] = []

    def make(**overrides: Any) -> Pipeline:
        made.append(Pipeline(real_redis.url, server.base_url, **overrides))
        return made[-1]

    yield make
    for pipeline in made:
        pipeline.close()


@pytest.fixture
def pipeline(make_pipeline: MakePipeline) -> Pipeline:
    """An in-process pipeline with the default test settings."""
    return make_pipeline()
