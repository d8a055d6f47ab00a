"""Garbage pushed straight into the queue: the worker drops it, logs why without the body, and
goes on serving jobs; nothing refused comes back."""

from __future__ import annotations

import base64
import json
import os
import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from api_client import Client
from api_client._constants import QUEUE
from api_client._requests import build_request
from api_client._task_messages import task_message
from tests.support.broker import settled
from tests.support.e2e_worker import CANARY_KEY, NUM_RETRIES
from tests.support.invariants import assert_invariants
from tests.support.openai_server import ScriptedOpenAIServer
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S, wait_until
from tests.support.worker_process import WorkerProcess

MARKER = "MARKER-secret-prompt-5e1f0c"
REFUSED = "refused a message from the queue"


def _envelope(task: str = "promptq.complete") -> dict[str, Any]:
    """A real task message (as the client builds it) whose prompt is the marker."""
    envelope: dict[str, Any] = json.loads(
        task_message("garbage-job", build_request(f"{MARKER} in the prompt", None, None, {}))
    )
    envelope["headers"]["task"] = task
    envelope["headers"]["argsrepr"] = f"({MARKER!r},)"  # headers are not logged either
    return envelope


def _not_json() -> bytes:
    return f"this is not JSON {MARKER}".encode()


def _not_utf8() -> bytes:
    return b"\xff\xfe" + MARKER.encode()


def _pickle(args: object = MARKER) -> bytes:
    envelope = _envelope()
    envelope["content-type"] = "application/x-python-serialize"
    envelope["content-encoding"] = "binary"
    payload = pickle.dumps([[{"prompt": args}], {}, {}])
    envelope["body"] = base64.b64encode(payload).decode()
    return json.dumps(envelope).encode()


class _MakeDirectory:
    """Pickled, it makes a directory when unpickled: what a hostile pickle would do."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (self.path,))


def _unknown_task() -> bytes:
    return json.dumps(_envelope(task="evil.not_a_promptq_task")).encode()


def _no_headers() -> bytes:
    envelope = _envelope()
    del envelope["headers"]
    return json.dumps(envelope).encode()


def _body_not_json() -> bytes:
    envelope = _envelope()
    envelope["body"] = base64.b64encode(f"[[{MARKER}".encode()).decode()
    return json.dumps(envelope).encode()


def _json_not_an_envelope() -> bytes:
    return json.dumps([MARKER, {"body": MARKER}]).encode()


def _no_properties() -> bytes:
    envelope = _envelope()
    del envelope["properties"]
    return json.dumps(envelope).encode()


# (what is pushed, a fragment of the refusal line saying why)
GARBAGE: dict[str, tuple[Callable[[], bytes], str]] = {
    "not JSON": (_not_json, "not JSON (JSONDecodeError)"),
    "not UTF-8": (_not_utf8, "not JSON"),
    "pickle": (_pickle, "ContentDisallowed"),
    "unknown task": (_unknown_task, "unknown task 'evil.not_a_promptq_task'"),
    "no headers": (_no_headers, "not a task message"),
    "body not JSON": (_body_not_json, "cannot decode its body"),
    "JSON, not an envelope": (_json_not_an_envelope, "a JSON list, not a message envelope"),
    "no properties": (_no_properties, "without properties.delivery_tag"),
}


@pytest.mark.parametrize(("make", "why"), list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_is_dropped_and_logged_without_its_body(
    client: Client,
    redis_server: RedisServer,
    worker: WorkerProcess,
    make: Callable[[], bytes],
    why: str,
) -> None:
    redis = redis_server.client()
    refusals_before = worker.log().count(REFUSED)

    redis.lpush(QUEUE, make())
    wait_until(lambda: settled(redis))  # taken and dropped: in no queue, taken or unacked

    # The worker goes on: a good job pushed after the garbage is answered (by then the refusal
    # was logged: the worker takes the next message once it is done with the last).
    assert client.submit("a good job after the garbage").wait(timeout=WAIT_S).content == (
        "echo: a good job after the garbage"
    )
    log = worker.log()
    [refusal] = [line for line in log.splitlines() if REFUSED in line][refusals_before:]
    assert why in refusal
    assert MARKER not in log
    # Dropped for good: not back in the queue, not waiting in kombu's unacknowledged set for
    # redelivery after the visibility timeout.
    wait_until(lambda: redis.llen(QUEUE) == 0 and redis.hlen("unacked") == 0)
    assert worker.log().count(REFUSED) == refusals_before + 1


def test_the_worker_outlived_all_the_garbage(
    client: Client, redis_server: RedisServer, worker: WorkerProcess
) -> None:
    # Everything at once, then work: the same worker process is still serving.
    redis = redis_server.client()
    for make, _ in GARBAGE.values():
        redis.lpush(QUEUE, make())
    jobs = client.submit_many([f"after the flood {i}" for i in range(5)])

    finished = list(client.as_completed(jobs, timeout=WAIT_S))

    assert len(finished) == 5
    assert worker.log().count(REFUSED) >= 2 * len(GARBAGE)
    log = worker.log()
    assert MARKER not in log
    assert CANARY_KEY not in log
    assert "Traceback" not in log


def test_a_pickle_is_never_unpickled(
    client: Client,
    *,
    redis_server: RedisServer,
    provider: ScriptedOpenAIServer,
    worker: WorkerProcess,
    tmp_path: Path,
) -> None:
    """The refusal happens before any byte of the body is unpickled (Celery refuses the
    content type): the payload's code never runs, and the worker goes on."""
    proof = tmp_path / "the-pickle-ran"
    refusals_before = worker.log().count(REFUSED)
    redis = redis_server.client()

    redis.lpush(QUEUE, _pickle(_MakeDirectory(proof)))
    wait_until(lambda: settled(redis))  # taken and dropped
    prompts = [f"after a hostile pickle {n} {uuid.uuid4().hex[:8]}" for n in range(3)]
    assert_invariants(
        client,
        dict(zip(prompts, client.submit_many(prompts), strict=True)),
        redis_server=redis_server,
        provider=provider,
        workers=[worker],
        secret=CANARY_KEY,
        max_calls=1 + NUM_RETRIES,
        timeout_s=WAIT_S,
    )

    assert not proof.exists()
    [refusal] = [line for line in worker.log().splitlines() if REFUSED in line][refusals_before:]
    assert "ContentDisallowed" in refusal
    wait_until(lambda: redis.llen(QUEUE) == 0 and redis.hlen("unacked") == 0)
