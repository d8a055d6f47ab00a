"""The promptq command line as a user runs it, in a subprocess with a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def promptq(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promptq ARGS`` with no LLM_*/PROMPTQ_* variable but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_", "PROMPTQ_"))}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
