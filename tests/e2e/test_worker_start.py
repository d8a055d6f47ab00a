"""`promptq worker` refuses a bad configuration at start, naming the key."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import CANARY_KEY


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"LLM_RETRY_MIN_WAIT": "0"}, "LLM_RETRY_MIN_WAIT"),
        ({"LLM_RETRY_MAX_WAIT": "-3"}, "LLM_RETRY_MAX_WAIT"),
        ({"LLM_RETRY_MIN_WAIT": "30", "LLM_RETRY_MAX_WAIT": "10"}, "LLM_RETRY_MIN_WAIT"),
        ({"LLM_RETRY_MULTIPLIER": "0"}, "LLM_RETRY_MULTIPLIER"),
        ({"LLM_NUM_RETRIES": "-1"}, "LLM_NUM_RETRIES"),
        ({"LLM_NUM_RETRIES": "many"}, "LLM_NUM_RETRIES"),
        ({"LLM_TIMEOUT": "0"}, "LLM_TIMEOUT"),
        ({"PROMPTQ_VISIBILITY_TIMEOUT_S": "200"}, "PROMPTQ_VISIBILITY_TIMEOUT_S"),
        ({"PROMPTQ_CONFIG": "/nonexistent/config.toml"}, "PROMPTQ_CONFIG"),
    ],
)
def test_bad_setting_stops_the_worker_naming_the_key(env: dict[str, str], named: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    # A Redis that does not exist: the worker must stop on the setting before connecting.
    run_env = {**clean, "PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0", "LLM_API_KEY": CANARY_KEY}
    completed = subprocess.run(
        [sys.executable, "-m", "worker", "worker"],
        env={**run_env, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2
    assert named in completed.stderr
    assert CANARY_KEY not in completed.stderr + completed.stdout
