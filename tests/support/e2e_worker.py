"""The configuration every end-to-end worker runs with, scaled down for tests."""

from __future__ import annotations

# Used as the worker's API key through every end-to-end run; it must never surface in Redis,
# a result, an error or a log line.
CANARY_KEY = "sk-canary-7f3a9c2e51d84b06"

NUM_RETRIES = 3


def worker_env(redis_url: str, base_url: str) -> dict[str, str]:
    """The scaled-down configuration every end-to-end worker runs with."""
    return {
        "PROMPTQ_REDIS_URL": redis_url,
        "PROMPTQ_VISIBILITY_TIMEOUT_S": "60",
        "LLM_MODEL": "openai/test-model",
        "LLM_API_KEY": CANARY_KEY,
        "LLM_BASE_URL": base_url,
        "LLM_NUM_RETRIES": str(NUM_RETRIES),
        "LLM_RETRY_MIN_WAIT": "0.05",
        "LLM_RETRY_MAX_WAIT": "0.2",
        "LLM_RETRY_MULTIPLIER": "0.01",
        "LLM_TIMEOUT": "1",
    }
