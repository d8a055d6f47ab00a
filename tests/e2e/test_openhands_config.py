"""A worker started with an OpenHands config.toml starts, says once what it passes by, and sends
its prompts with the file's sampling settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api_client import Client, JobFailed
from tests.support.e2e_worker import CANARY_KEY, e2e_worker
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

FIXTURE = Path(__file__).resolve().parents[1] / "support" / "openhands_config.toml"
FIXTURE_KEY = "sk-openhands-fixture-5c1d9e7a3b"
WAIT_S = 60.0
NOTICE = "promptq worker: the config file's OpenHands agent settings mean nothing to a queue"


@pytest.fixture(scope="module")
def openhands_worker(
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WorkerProcess]:
    """Two worker processes under a supervisor, on the template with its sampling lines set
    (model, key and endpoint come from the e2e environment, which wins over the file)."""
    directory = tmp_path_factory.mktemp("openhands")
    text = FIXTURE.read_text(encoding="utf-8")
    for line, filled in (
        ("temperature = 0.0", "temperature = 0.2"),
        ("top_p = 1.0", "top_p = 0.9"),
        ("max_output_tokens = 0", "max_output_tokens = 64"),
        ("max_input_tokens = 0", "max_input_tokens = 200"),
    ):
        assert f"\n{line}\n" in text
        text = text.replace(f"\n{line}\n", f"\n{filled}\n")
    config = directory / "config.toml"
    config.write_text(text, encoding="utf-8")
    env = {"PROMPTQ_CONFIG": str(config)}
    with e2e_worker(redis_server, provider, directory, env=env, processes=2) as process:
        yield process


@pytest.fixture
def client(redis_server: RedisServer, openhands_worker: WorkerProcess) -> Iterator[Client]:
    with Client(redis_server.url) as client:
        yield client


def test_the_worker_starts_and_names_what_it_passes_by_once(
    openhands_worker: WorkerProcess,
) -> None:
    log = openhands_worker.log()

    [notice] = [line for line in log.splitlines() if line.startswith(NOTICE)]
    for passed_by in ("[core]", "[agent]", "[sandbox]", "[security]", "max_message_chars in [llm]"):
        assert passed_by in notice
    assert "Traceback" not in log
    assert FIXTURE_KEY not in log and CANARY_KEY not in log


def test_a_prompt_carries_the_file_s_sampling_settings(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    job = client.submit("hello from openhands")

    assert job.wait(timeout=WAIT_S).content == "echo: hello from openhands"
    [sent] = provider.requests
    assert (sent.body["temperature"], sent.body["top_p"]) == (0.2, 0.9)
    assert sent.body["max_tokens"] == 64
    assert sent.headers["authorization"] == f"Bearer {CANARY_KEY}"  # the environment wins


def test_a_prompt_above_max_input_tokens_fails_without_a_call(
    client: Client, provider: ScriptedOpenAIServer
) -> None:
    job = client.submit("word " * 1000)

    with pytest.raises(JobFailed) as raised:
        job.wait(timeout=WAIT_S)

    assert (raised.value.kind, raised.value.attempts) == ("context_window_exceeded", 0)
    assert "LLM_MAX_INPUT_TOKENS (200)" in raised.value.message
    assert provider.requests == []
