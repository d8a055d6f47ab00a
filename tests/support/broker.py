"""Where the messages are, read from Redis as the workers keep them (worker.fleet.custody): queued,
taken or held by a worker process, unacknowledged; and which workers answer a ping."""

from __future__ import annotations

import json

import redis

from api_client._constants import PRIORITY_LISTS, QUEUE, UNACKED_KEY, WORKERS_KEY, held_key
from api_client._polling import text_of
from api_client._schedule import WAKE
from api_client._task_messages import job_ids_of
from worker.fleet.custody import taken_keys
from worker.fleet.schedule import Scheduler, queued_count, ready_messages
from worker.ops.fleet_status import gather_status


def settled(client: redis.Redis) -> bool:
    """No message is queued, taken by a worker process or delivered and unacknowledged: every
    message pushed so far was run and acknowledged, or dropped (a message is always in one of
    those places until then, worker.fleet.custody)."""
    if queued_count(client):
        return False
    pipe = client.pipeline(transaction=False)
    for key in (*PRIORITY_LISTS, *taken_keys(client)):
        pipe.llen(key)
    pipe.hlen(UNACKED_KEY)
    return not any(int(n) for n in pipe.execute())


SCRATCH_TAKEN_KEY = "promptq:worker:test-scratch:taken"


def take_all(client: redis.Redis) -> list[bytes]:
    """Take every message waiting (the scheduler's structure and the queue list), in the order
    workers would take them; they are gone from Redis after."""
    scheduler, taken = Scheduler(client), []
    while (claimed := scheduler.claim(SCRATCH_TAKEN_KEY)) is not None:
        taken.append(claimed.message)
    client.delete(SCRATCH_TAKEN_KEY)
    return taken


def queued_messages(client: redis.Redis) -> list[bytes]:
    """The messages waiting, left where they are: those pushed on the queue list (next first),
    then those in the scheduler's structure."""
    pushed: list[bytes] = client.lrange(QUEUE, 0, -1)  # type: ignore[assignment]
    return [raw for raw in reversed(pushed) if raw != WAKE] + list(ready_messages(client))


def process_id(client: redis.Redis, pid: int) -> str | None:
    """The registry id (host:pid:nonce) of the live worker process ``pid``; None if it has
    none (not registered yet, or gone)."""
    members: list[bytes] = client.zrange(WORKERS_KEY, 0, -1)  # type: ignore[assignment]
    found = [m for m in map(text_of, members) if m.rsplit(":", 2)[1:2] == [str(pid)]]
    assert len(found) <= 1, found
    return found[0] if found else None


def held_jobs(client: redis.Redis, pid: int) -> list[str]:
    """The jobs of the messages delivered to worker process ``pid`` and not acknowledged yet
    (running, reserved or held for a retry): its held hash."""
    process = process_id(client, pid)
    if process is None:
        return []
    messages: list[bytes] = client.hvals(held_key(process))  # type: ignore[assignment]
    return [job_id for message in messages for job_id in job_ids_of(json.loads(message))]


def consuming(client: redis.Redis) -> int:
    """How many worker processes listen for Celery's broadcasts (the ping, remote control):
    Redis' count of connections with a pattern subscription, one per consuming process. A
    worker drops it when it stops consuming, at the start of a warm shutdown."""
    connections: list[dict[str, str]] = client.client_list()
    return sum(int(connection.get("psub", 0)) > 0 for connection in connections)


def answering(redis_url: str, timeout_s: float = 1.0) -> list[str]:
    """The Celery node names of the workers answering a ping within ``timeout_s`` (as
    `promptq status` lists them): a worker answers while it consumes, not once it stops."""
    return gather_status(redis_url, inspect_timeout_s=timeout_s).workers
