"""The promptq commands as a user types them: help, config, submit, status."""

from __future__ import annotations

import json

from tests.support.cli import promptq
from tests.support.e2e_worker import CANARY_KEY
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess


def test_help_lists_every_command() -> None:
    completed = promptq("--help")

    assert completed.returncode == 0
    for command in ("worker", "batch", "submit", "status", "config", "fake-provider"):
        assert command in completed.stdout
        assert promptq(command, "--help").returncode == 0


def test_config_shows_sources_and_masks_the_key() -> None:
    completed = promptq(
        "config", "-s", "timeout=30", env={"LLM_API_KEY": CANARY_KEY, "LLM_NUM_RETRIES": "3"}
    )

    assert completed.returncode == 0, completed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in completed.stdout.splitlines()[1:]}
    assert rows["LLM_NUM_RETRIES"] == ["3", "environment"]
    assert rows["LLM_TIMEOUT"] == ["30", "flag"]
    assert rows["LLM_RETRY_MIN_WAIT"] == ["15", "default"]
    assert CANARY_KEY not in completed.stdout + completed.stderr


def test_submit_waits_and_status_sees_the_worker(
    redis_server: RedisServer, worker: WorkerProcess
) -> None:
    env = {"PROMPTQ_REDIS_URL": redis_server.url}

    submitted = promptq("submit", "from the command line", "--wait", "--timeout", "30", env=env)
    status = promptq("status", "--json", env=env)

    assert submitted.returncode == 0, submitted.stderr
    assert submitted.stdout.strip() == "echo: from the command line"
    assert status.returncode == 0, status.stderr
    assert len(json.loads(status.stdout)["workers"]) == 1
