"""Fixtures shared by the unit tests: a clean environment and a scratch working directory."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

_OWNED_PREFIXES = ("LLM_", "PROMPTQ_")

# Test modules that import litellm themselves may do so before worker.llm sets this: LiteLLM
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
