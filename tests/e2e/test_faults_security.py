"""Whatever the provider says, the key and the prompts stay out of results, Redis and logs."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from api_client import Client, JobFailed
from tests.support.e2e_worker import CANARY_KEY, NUM_RETRIES, module_worker
from tests.support.invariants import assert_invariants
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess

# How providers echo a key they reject, and a log-style header line that carries it.
ECHOED = f"Incorrect API key provided: {CANARY_KEY}. (Authorization: Bearer {CANARY_KEY})"


# This module's worker runs at the default log level: no --loglevel given.
worker = module_worker(args=("--concurrency", "4"), loglevel=None)


def completion(content: str) -> dict[str, Any]:
    """A ChatCompletion whose answer is ``content``."""
    return {
        "id": "chatcmpl-security",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6},
    }


@pytest.mark.parametrize(
    ("status", "kind"), [(500, "provider_unavailable"), (429, "rate_limited")], ids=["500", "429"]
)
def test_a_key_echoed_in_a_retried_error_is_scrubbed(
    client: Client,
    *,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
    status: int,
    kind: str,
) -> None:
    body = {"error": {"message": ECHOED, "type": "api_error", "param": None, "code": None}}
    provider.default = Reply(status=status, body=body)
    prompt = f"echoes the key {uuid.uuid4().hex[:8]}"
    jobs = {prompt: client.submit(prompt)}

    # Every attempt's error carried the key, each retry was logged: none of it leaked.
    outcomes = assert_invariants(
        client,
        jobs,
        redis_server=redis_server,
        provider=provider,
        workers=[worker],
        secret=CANARY_KEY,
        max_calls=NUM_RETRIES + 1,
        timeout_s=WAIT_S,
    )

    failed = outcomes[prompt]
    assert isinstance(failed, JobFailed)
    assert (failed.kind, failed.status_code, failed.attempts) == (kind, status, NUM_RETRIES + 1)
    assert "Incorrect API key provided: ***" in failed.message  # scrubbed, the rest kept
    # Each retry and the failure were logged with the provider's message, scrubbed.
    [job] = jobs.values()
    lines = [line for line in worker.log().splitlines() if job.id in line]
    scrubbed = [
        line for line in lines if f"{kind} {status}: " in line and "key provided: ***" in line
    ]
    assert len(scrubbed) == NUM_RETRIES + 1, lines


def test_prompts_and_completions_are_not_logged(
    client: Client,
    *,
    provider: ScriptedOpenAIServer,
    redis_server: RedisServer,
    worker: WorkerProcess,
) -> None:
    marker = f"PROMPT-MARKER-{uuid.uuid4().hex}"
    answer = f"COMPLETION-MARKER-{uuid.uuid4().hex}"
    provider.script(Reply(status=503), Reply(body=completion(answer)))  # a retry, then it
    answered = client.submit(marker)
    assert answered.wait(timeout=WAIT_S).content == answer
    refused_marker = f"REFUSED-MARKER-{uuid.uuid4().hex}"
    provider.script(Reply(status=400))
    refused = client.submit(messages=[{"role": "user", "content": refused_marker}])
    with pytest.raises(JobFailed):
        refused.wait(timeout=WAIT_S)

    # The log tells the story of both jobs (a retry, a success, a failure) ... (each line is
    # written just after the outcome is stored, which the client may see first)
    story = [
        f"job {answered.id}: retry in",
        f"Task promptq.complete[{answered.id}] succeeded",
        f"job {refused.id} failed after 1 attempt(s): bad_request 400",
    ]
    wait_until(lambda: all(line in worker.log() for line in story))
    log = worker.log()
    # ... without the words of either.
    for text in (marker, answer, refused_marker):
        assert text not in log
    prompts = [f"not logged {n} {uuid.uuid4().hex[:8]}" for n in range(5)]
    assert_invariants(
        client,
        dict(zip(prompts, client.submit_many(prompts), strict=True)),
        redis_server=redis_server,
        provider=provider,
        workers=[worker],
        secret=CANARY_KEY,
        max_calls=1,
        timeout_s=WAIT_S,
    )
