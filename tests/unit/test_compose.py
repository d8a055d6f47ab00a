"""docker-compose.yml stays valid and safe: Flower behind a password on loopback; metrics."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    found: dict[str, Any] = compose["services"]
    return found


def test_the_services_are_redis_the_worker_and_flower(services: dict[str, Any]) -> None:
    assert set(services) == {"redis", "worker", "flower"}


def flower_script(services: dict[str, Any]) -> str:
    command = services["flower"]["command"]
    assert command[:2] == ["sh", "-c"]
    # Compose turns $$ into $ before the container's shell sees it.
    script: str = command[2].replace("$$", "$")
    return script


def test_flower_is_published_on_loopback_only(services: dict[str, Any]) -> None:
    assert services["flower"]["ports"] == ["127.0.0.1:5555:5555"]
    for service in services.values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port


def test_flower_gets_the_password_and_nothing_else_of_env(services: dict[str, Any]) -> None:
    flower = services["flower"]

    assert "env_file" not in flower  # .env holds the provider's key
    assert flower["environment"] == {"FLOWER_BASIC_AUTH": "${FLOWER_BASIC_AUTH:-}"}
    assert "--basic_auth" not in flower_script(services)  # no password in the file itself


@pytest.mark.parametrize(
    ("auth", "starts"),
    [("", False), ("admin", False), ("admin:", False), (":pw", False), ("admin:s3cret", True)],
)
def test_flower_refuses_to_start_without_a_user_and_password(
    services: dict[str, Any], auth: str, starts: bool
) -> None:
    script = flower_script(services).replace("exec celery", "echo celery")

    completed = subprocess.run(
        ["sh", "-c", script],
        env={**os.environ, "FLOWER_BASIC_AUTH": auth},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )

    assert (completed.returncode == 0) is starts
    if starts:
        assert completed.stdout.startswith("celery --broker=redis://redis:6379/0 flower")
    else:
        assert "set FLOWER_BASIC_AUTH=user:password" in completed.stderr


def test_workers_export_metrics_on_the_compose_network(services: dict[str, Any]) -> None:
    worker = services["worker"]

    assert worker["environment"]["PROMPTQ_METRICS_PORT"] == "9100"
    assert worker["environment"]["PROMPTQ_METRICS_HOST"] == "0.0.0.0"
    # One process per replica: more would serve on 9101, ... which Prometheus is not told of.
    assert worker["environment"]["PROMPTQ_PROCESSES"] == "1"
    assert worker["expose"] == ["9100"]
    assert "ports" not in worker  # `--scale worker=N` needs no host port per replica
