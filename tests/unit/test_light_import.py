"""api_client stays light: importing it loads neither the worker nor LiteLLM nor Celery."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import api_client

REPO_ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("litellm", "worker", "celery", "kombu", "openai")

PUBLIC_API = [
    "CELERY_CONTRACT_VERSION",
    "EMBED_TASK_NAME",
    "QUEUE",
    "TASK_NAME",
    "AsyncClient",
    "AsyncJob",
    "BrokerUnavailable",
    "CancelResult",
    "Cancellation",
    "Client",
    "ClientSettings",
    "EmbeddingRequest",
    "EmbeddingResult",
    "ErrorKind",
    "InvalidRequest",
    "Job",
    "JobError",
    "JobFailed",
    "JobNotFound",
    "JobStatus",
    "JobTimeout",
    "Priority",
    "PromptRequest",
    "PromptResult",
    "PromptqError",
    "Usage",
]


def _modules_loaded_by(code: str) -> set[str]:
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    modules: list[str] = json.loads(completed.stdout.strip().splitlines()[-1])
    return set(modules)


def _heavy_in(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_import_api_client_loads_no_heavy_package() -> None:
    modules = _modules_loaded_by("import api_client")

    assert "api_client" in modules
    assert _heavy_in(modules) == []


def test_using_the_client_loads_no_heavy_package() -> None:
    code = (
        "from api_client import Client, InvalidRequest\n"
        "client = Client('redis://127.0.0.1:1/0')\n"
        "try:\n"
        "    client.submit('')\n"
        "except InvalidRequest:\n"
        "    pass\n"
        "client.job('abc')\n"
        "client.close()\n"
    )

    assert _heavy_in(_modules_loaded_by(code)) == []


def test_the_celery_helper_is_imported_only_when_asked_for() -> None:
    # api_client.celery imports Celery (for the programs that use it), never the worker.
    loaded = _heavy_in(_modules_loaded_by("import api_client.celery"))
    roots = {name.split(".")[0] for name in loaded}
    assert "celery" in roots
    assert not roots & {"worker", "litellm", "openai"}


def test_the_probe_would_see_a_heavy_import() -> None:
    # The control: the same probe does notice the worker side being imported.
    assert "worker" in _heavy_in(_modules_loaded_by("import api_client, worker.settings"))


def test_public_api_is_pinned() -> None:
    assert api_client.__all__ == PUBLIC_API
    for name in PUBLIC_API:
        assert getattr(api_client, name) is not None
