"""`promptq worker` refuses a bad configuration at start, naming the key: exit status 2, one
message, no traceback, and never the API key."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.e2e_worker import CANARY_KEY

# (environment, config.toml text or None, what the message must name)
BAD_CONFIGURATIONS: dict[str, tuple[dict[str, str], str | None, tuple[str, ...]]] = {
    "zero min wait": ({"LLM_RETRY_MIN_WAIT": "0"}, None, ("LLM_RETRY_MIN_WAIT",)),
    "negative max wait": ({"LLM_RETRY_MAX_WAIT": "-3"}, None, ("LLM_RETRY_MAX_WAIT",)),
    "min wait above max wait": (
        {"LLM_RETRY_MIN_WAIT": "30", "LLM_RETRY_MAX_WAIT": "10"},
        None,
        ("LLM_RETRY_MIN_WAIT", "LLM_RETRY_MAX_WAIT"),
    ),
    "zero multiplier": ({"LLM_RETRY_MULTIPLIER": "0"}, None, ("LLM_RETRY_MULTIPLIER",)),
    "negative retries": ({"LLM_NUM_RETRIES": "-1"}, None, ("LLM_NUM_RETRIES",)),
    "too many retries": ({"LLM_NUM_RETRIES": "101"}, None, ("LLM_NUM_RETRIES",)),
    "non-numeric retries": ({"LLM_NUM_RETRIES": "many"}, None, ("LLM_NUM_RETRIES", "many")),
    "non-numeric timeout": ({"LLM_TIMEOUT": "soon"}, None, ("LLM_TIMEOUT", "soon")),
    "non-numeric concurrency": (
        {"PROMPTQ_CONCURRENCY": "lots"},
        None,
        ("PROMPTQ_CONCURRENCY", "lots"),
    ),
    "negative timeout": ({"LLM_TIMEOUT": "-5"}, None, ("LLM_TIMEOUT",)),
    "infinite timeout": ({"LLM_TIMEOUT": "inf"}, None, ("LLM_TIMEOUT",)),
    "negative redeliveries": (
        {"PROMPTQ_MAX_REDELIVERIES": "-1"},
        None,
        ("PROMPTQ_MAX_REDELIVERIES",),
    ),
    "waits beyond the visibility timeout": (
        {"PROMPTQ_VISIBILITY_TIMEOUT_S": "200"},
        None,
        ("PROMPTQ_VISIBILITY_TIMEOUT_S", "LLM_RETRY_MAX_WAIT", "LLM_TIMEOUT"),
    ),
    "bad boolean": ({"LLM_DROP_PARAMS": "maybe"}, None, ("LLM_DROP_PARAMS", "maybe")),
    "missing config file": (
        {"PROMPTQ_CONFIG": "/nonexistent/config.toml"},
        None,
        ("PROMPTQ_CONFIG", "/nonexistent/config.toml"),
    ),
    "unknown key in [llm]": ({}, "[llm]\nretries_max = 3\n", ("retries_max", "[llm]")),
    "unknown key in [promptq]": ({}, "[promptq]\nconcurency = 3\n", ("concurency", "[promptq]")),
    "typo beside OpenHands' tables": (
        {},
        "[agent]\nenable_cmd = true\n\n[llm]\ntemprature = 0.2\n",
        ("temprature", "[llm]"),
    ),
    "unknown table": ({}, "[promtq]\nconcurrency = 3\n", ("[promtq]", "unknown table")),
    "bad value in the file": (
        {},
        '[llm]\nnum_retries = "three"\n',
        ("LLM_NUM_RETRIES", "num_retries in [llm]", "three"),
    ),
    "bad boolean in the file": ({}, '[llm]\ndrop_params = "maybe"\n', ("LLM_DROP_PARAMS",)),
    "malformed TOML": ({}, '[llm\nmodel = "openai/x"\n', ("cannot read config file", "line 1")),
    "[llm] not a table": ({}, 'llm = "openai/x"\n', ("[llm]",)),
    "metrics port out of range": (
        {"PROMPTQ_METRICS_PORT": "70000"},
        None,
        ("PROMPTQ_METRICS_PORT", "70000"),
    ),
}


@pytest.mark.parametrize(
    ("env", "config_text", "named"),
    list(BAD_CONFIGURATIONS.values()),
    ids=list(BAD_CONFIGURATIONS),
)
def test_bad_setting_stops_the_worker_naming_the_key(
    tmp_path: Path, env: dict[str, str], config_text: str | None, named: tuple[str, ...]
) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    # A Redis that does not exist: the worker must stop on the setting before connecting.
    run_env = {**clean, "PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0", "LLM_API_KEY": CANARY_KEY}
    if config_text is not None:
        config = tmp_path / "config.toml"
        config.write_text(config_text)
        run_env["PROMPTQ_CONFIG"] = str(config)
        named = (*named, str(config))
    completed = subprocess.run(
        [sys.executable, "-m", "worker", "worker"],
        env={**run_env, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2, completed.stderr
    for fragment in named:
        assert fragment in completed.stderr
    assert completed.stderr.startswith("promptq worker: ")
    assert "Traceback" not in completed.stderr
    assert CANARY_KEY not in completed.stderr + completed.stdout


def run_worker(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    run_env = {**clean, "PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0", "LLM_API_KEY": CANARY_KEY}
    return subprocess.run(
        [sys.executable, "-m", "worker", "worker", *args],
        env={**run_env, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_metrics_port_in_use_stops_the_worker_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        completed = run_worker(tmp_path, {"PROMPTQ_METRICS_PORT": str(port)})

    assert completed.returncode == 2, completed.stderr
    assert f"promptq worker: cannot serve metrics on 127.0.0.1:{port}" in completed.stderr
    assert "PROMPTQ_METRICS_PORT" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    assert CANARY_KEY not in completed.stderr + completed.stdout


def test_metrics_with_a_prefork_pool_are_refused(tmp_path: Path) -> None:
    completed = run_worker(tmp_path, {"PROMPTQ_METRICS_PORT": "0"}, "--pool", "prefork")

    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("promptq worker: PROMPTQ_METRICS_PORT needs -P threads")


def test_a_bad_setting_stops_a_supervised_worker_before_any_process_starts(
    tmp_path: Path,
) -> None:
    completed = run_worker(tmp_path, {"LLM_NUM_RETRIES": "many"}, "--processes", "3")

    assert completed.returncode == 2, completed.stderr
    assert completed.stderr.startswith("promptq worker: ")
    assert "LLM_NUM_RETRIES" in completed.stderr
    assert "starting 3 worker processes" not in completed.stderr
    assert CANARY_KEY not in completed.stderr + completed.stdout


def test_a_metrics_port_in_use_stops_every_supervised_process(tmp_path: Path) -> None:
    with socket.socket() as taken:
        port = _port_before_a_free_one(taken)

        # Process 1 cannot serve on the port: it exits 2, and the supervisor stops process 2.
        completed = run_worker(tmp_path, {"PROMPTQ_METRICS_PORT": str(port)}, "--processes", "2")

    assert completed.returncode == 2, completed.stderr
    assert f"promptq worker: cannot serve metrics on 127.0.0.1:{port}" in completed.stderr
    assert "worker process 1" in completed.stderr
    assert "Traceback" not in completed.stderr + completed.stdout
    assert CANARY_KEY not in completed.stderr + completed.stdout


def test_processes_must_be_at_least_one(tmp_path: Path) -> None:
    completed = run_worker(tmp_path, {}, "--processes", "0")

    assert completed.returncode == 2
    assert completed.stderr.startswith("promptq worker: --processes must be at least 1")


def _port_before_a_free_one(taken: socket.socket) -> int:
    """Listen on a port whose successor is free (process 2's port must not be taken too)."""
    for _ in range(50):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
        probe.close()
        with socket.socket() as successor:
            try:
                successor.bind(("127.0.0.1", port + 1))
                taken.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.listen()
        return port
    raise AssertionError("no port with a free successor")
