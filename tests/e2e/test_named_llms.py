"""Named LLM configurations end to end: a job picks [llm.NAME] with submit(..., llm=NAME)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from api_client import Client, InvalidRequest, JobFailed
from tests.support.e2e_worker import e2e_worker
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

OTHER_KEY = "sk-other-canary-0c4f1e9a77"
WAIT_S = 60.0


@pytest.fixture(scope="module")
def other_provider() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer() as server:
        yield server


@pytest.fixture(scope="module")
def named_worker(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    other_provider: ScriptedOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    directory = tmp_path_factory.mktemp("named")
    config = directory / "config.toml"
    config.write_text(
        '[llm.cheap]\nmodel = "openai/cheap-model"\n\n'
        f'[llm.other]\nmodel = "openai/other-model"\napi_key = "{OTHER_KEY}"\n'
        f'base_url = "{other_provider.base_url}"\n'
    )
    env = {"PROMPTQ_CONFIG": str(config)}
    with e2e_worker(redis_server, provider, directory, env=env) as process:
        yield process


@pytest.fixture
def client(redis_server: RedisServer, named_worker: WorkerProcess) -> Iterator[Client]:
    with Client(redis_server.url) as client:
        yield client


@pytest.fixture(autouse=True)
def _fresh_other(other_provider: ScriptedOpenAIServer) -> None:
    other_provider.reset()


def test_each_job_uses_the_configuration_it_names(
    client: Client, provider: ScriptedOpenAIServer, other_provider: ScriptedOpenAIServer
) -> None:
    default = client.submit("plain")
    cheap = client.submit("thrifty", llm="cheap")
    other = client.submit_many([{"prompt": "elsewhere", "llm": "other"}])[0]

    assert default.wait(timeout=WAIT_S).content == "echo: plain"
    assert cheap.wait(timeout=WAIT_S).content == "echo: thrifty"
    assert other.wait(timeout=WAIT_S).content == "echo: elsewhere"
    models = {r.body["messages"][-1]["content"]: r.body["model"] for r in provider.requests}
    assert models == {"plain": "test-model", "thrifty": "cheap-model"}
    [elsewhere] = other_provider.requests
    assert elsewhere.body["model"] == "other-model"
    assert elsewhere.headers["authorization"] == f"Bearer {OTHER_KEY}"


def test_a_configuration_the_workers_lack_fails_without_a_call(
    client: Client, provider: ScriptedOpenAIServer, named_worker: WorkerProcess
) -> None:
    job = client.submit("lost", llm="missing")
    with pytest.raises(JobFailed) as raised:
        job.wait(timeout=WAIT_S)

    assert (raised.value.kind, raised.value.attempts) == ("configuration", 0)
    assert "[llm.missing]" in raised.value.message
    assert "cheap, other" in raised.value.message
    assert provider.requests == []
    assert OTHER_KEY not in named_worker.log()


def test_a_bad_configuration_name_is_refused_at_submit(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="llm"):
        client.submit("x", llm="no spaces allowed")
