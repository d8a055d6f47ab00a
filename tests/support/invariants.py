"""What must hold after any fault: every job ended once, nothing leaked, the workers go on."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from api_client import Client, Job, JobFailed, JobStatus, PromptResult
from api_client._constants import state_key
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.worker_process import WorkerProcess

Outcome = PromptResult | JobFailed


def dump_redis(redis_server: RedisServer) -> bytes:
    """Every key and value in the server, whatever its type, as one blob."""
    client = redis_server.client()
    try:
        return dump_values(client)
    finally:
        client.close()


def dump_values(client: redis.Redis) -> bytes:
    """Every key and value ``client`` reaches, whatever its type, as one blob."""
    values: list[Any] = []
    for key in client.scan_iter(count=1000):
        values.append(key)
        kind = client.type(key)
        if kind == b"string":
            values.append(client.get(key))
        elif kind == b"list":
            values += client.lrange(key, 0, -1)
        elif kind == b"hash":
            values += [item for pair in client.hgetall(key).items() for item in pair]
        elif kind == b"set":
            values += client.smembers(key)
        elif kind == b"zset":
            values += client.zrange(key, 0, -1)
    return b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in values)


def outcomes(client: Client, jobs: Iterable[Job], timeout_s: float) -> dict[str, Outcome]:
    """Wait for every job to end (JobTimeout if one does not in time); each one's outcome."""
    found: dict[str, Outcome] = {}
    for job in client.as_completed(jobs, timeout=timeout_s):
        try:
            result = job.result()
        except JobFailed as exc:
            found[job.id] = exc
        else:
            assert result is not None
            found[job.id] = result
    return found


def assert_invariants(
    client: Client,
    submitted: Mapping[str, Job],
    *,
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    workers: Iterable[WorkerProcess],
    secret: str,
    max_calls: int,
    timeout_s: float,
) -> dict[str, Outcome]:
    """Check what every fault scenario must leave behind; return each prompt's outcome.

    ``submitted`` maps each job's prompt (unique, and the provider echoes it) to its job.
    Every job reaches exactly one terminal state within ``timeout_s``: a result carrying its
    own prompt's echo or a structured error, with no state left behind. The provider saw
    each prompt at most ``max_calls`` times (1 + retries + redeliveries), and no outcome
    counts more attempts than that. ``secret`` (the API key) is in no Redis key or value, no
    worker log, no result or error; no prompt or completion is in a worker log. Last, the
    provider is healed (it answers every request) and the workers answer one more job.
    """
    workers = list(workers)
    by_id = {job.id: prompt for prompt, job in submitted.items()}
    ended = outcomes(client, submitted.values(), timeout_s)
    assert sorted(ended) == sorted(by_id), "a job has no outcome"
    calls = provider.calls_by_prompt()
    redis = redis_server.client()
    try:
        left = [job_id for job_id in by_id if redis.exists(state_key(job_id))]
    finally:
        redis.close()
    assert not left, f"jobs ended but left a state behind: {left}"
    for job_id, outcome in ended.items():
        prompt = by_id[job_id]
        fresh = client.job(job_id).status()  # read again from Redis, not the handle's cache
        if isinstance(outcome, JobFailed):
            assert fresh is JobStatus.FAILED
            assert secret not in str(outcome)
        else:
            assert fresh is JobStatus.SUCCEEDED
            assert outcome.content == f"echo: {prompt}", (prompt, outcome.content)
            assert secret not in outcome.model_dump_json()
        assert outcome.attempts <= max_calls, (prompt, outcome)
        assert calls[prompt] <= max_calls, (prompt, calls[prompt])

    assert secret.encode() not in dump_redis(redis_server)
    for process in workers:
        log = process.log()
        assert secret not in log, process.log_path
        leaked = [prompt for prompt in submitted if prompt in log]
        assert not leaked, f"prompts in {process.log_path}: {leaked[:3]}"

    provider.heal()
    alive = f"still serving {uuid.uuid4().hex}"
    assert client.submit(alive).wait(timeout=timeout_s).content == f"echo: {alive}"
    return {by_id[job_id]: outcome for job_id, outcome in ended.items()}
