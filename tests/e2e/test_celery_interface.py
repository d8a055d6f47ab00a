"""The public Celery interface end to end: a plain Celery app (tests.support.plain_celery, which
imports nothing of promptq) sends promptq's tasks by name to a real `promptq worker`, reads
their results through Celery's own Redis result backend, and chains them into its own tasks."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain, chord

from api_client import Client
from tests.support.e2e_worker import CANARY_KEY, module_worker
from tests.support.openai_server import Reply, ScriptedOpenAIServer
from tests.support.plain_celery import PROMPTQ_QUEUE, USER_QUEUE, PlainCeleryWorker, plain_app
from tests.support.redis_server import RedisServer
from tests.support.waiting import WAIT_S
from tests.support.worker_process import WorkerProcess

# A call may stay in flight long enough to be seen running (test_celery_inspect_...).
worker = module_worker(args=("--concurrency", "16"), env={"LLM_TIMEOUT": "10"})


@pytest.fixture
def app(flushed_redis: RedisServer, worker: WorkerProcess) -> Iterator[Celery]:
    celery_app = plain_app(flushed_redis.url)
    yield celery_app
    celery_app.close()


@pytest.fixture(scope="module")
def plain_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PlainCeleryWorker]:
    with PlainCeleryWorker(redis_server.url, tmp_path_factory.mktemp("plain") / "plain.log") as w:
        yield w


def _complete(app: Celery, request: dict[str, Any], **options: Any) -> Any:
    return app.send_task("promptq.complete", args=[request], queue=PROMPTQ_QUEUE, **options)


def test_send_task_by_name_returns_the_answer_as_a_dict(
    app: Celery, redis_server: RedisServer, provider: ScriptedOpenAIServer
) -> None:
    result = _complete(app, {"prompt": "hello there", "temperature": 0, "priority": "batch"})

    answer = result.get(timeout=WAIT_S)

    assert answer["content"] == "echo: hello there"
    assert answer["id"] == result.id
    assert answer["attempts"] == 1
    assert set(answer) >= {"model", "usage", "cost_usd", "latency_s", "finish_reason"}
    assert result.state == "SUCCESS"
    assert provider.requests[-1].body["temperature"] == 0
    # A first-class job: the client follows it by the same id, and reads the same answer.
    with Client(redis_server.url) as client:
        job = client.job(result.id)
        assert job.status() == "succeeded"
        assert job.wait(timeout=WAIT_S).content == "echo: hello there"
    # Celery's record is JSON, and holds no secret.
    record = redis_server.client().get(f"celery-task-meta-{result.id}")
    assert record is not None and CANARY_KEY.encode() not in record
    assert json.loads(record)["status"] == "SUCCESS"


def test_a_failed_job_raises_from_get_with_its_kind_and_message(
    app: Celery, provider: ScriptedOpenAIServer
) -> None:
    provider.script(Reply(status=400))
    refused_by_provider = _complete(app, {"prompt": "a prompt the provider refuses"})
    refused_by_promptq = _complete(app, {"prompt": "hi", "api_key": "sk-mine"})

    errors = []
    for result in (refused_by_provider, refused_by_promptq):
        with pytest.raises(Exception) as raised:
            result.get(timeout=WAIT_S)
        assert type(raised.value).__name__ == "JobFailed"
        assert result.state == "FAILURE"
        errors.append(raised.value.args[0])

    assert errors[0]["kind"] == "bad_request"
    assert errors[0]["status_code"] == 400
    assert errors[0]["attempts"] == 1
    assert "scripted error 400" in errors[0]["message"]
    assert errors[1]["kind"] == "bad_request"
    assert "api_key" in errors[1]["message"]  # named, and never sent
    assert errors[1]["attempts"] == 0
    assert len(provider.requests) == 1


class _Records:
    """Every Celery record published for one task id, in order (Celery's Redis backend
    publishes each update on the record's key as a channel), read by a thread."""

    def __init__(self, redis_server: RedisServer, task_id: str) -> None:
        self._pubsub = redis_server.client().pubsub()  # type: ignore[no-untyped-call]  # redis-py
        self._pubsub.subscribe(f"celery-task-meta-{task_id}")
        self.statuses: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for message in self._pubsub.listen():
            if message["type"] == "message":
                self.statuses.append(json.loads(message["data"])["status"])
            if self.statuses[-1:] in (["SUCCESS"], ["FAILURE"]):
                return

    def close(self) -> None:
        self._thread.join(timeout=WAIT_S)
        self._pubsub.close()


def test_retries_and_a_rate_limit_wait_end_in_one_success_record(
    app: Celery, redis_server: RedisServer, provider: ScriptedOpenAIServer, worker: WorkerProcess
) -> None:
    # Two 429s spend two retries; the third pauses the deployment (its Retry-After is longer
    # than LLM_RETRY_MAX_WAIT): the job waits in line, no attempt spent, and then succeeds.
    provider.script(Reply(status=429), Reply(status=429), Reply(429, headers={"Retry-After": "1"}))
    task_id = "celery-retried-1"
    records = _Records(redis_server, task_id)

    answer = _complete(app, {"prompt": "try hard"}, task_id=task_id).get(timeout=WAIT_S)
    records.close()

    assert answer["attempts"] == 3
    assert len(provider.requests) == 4
    assert f"job {task_id} waits 1 s in line" in worker.log()
    statuses = records.statuses
    assert statuses[0] == "STARTED"
    assert statuses.count("RETRY") == 2
    assert statuses[-1] == "SUCCESS" and statuses.count("SUCCESS") == 1
    assert app.AsyncResult(task_id).state == "SUCCESS"


def _prompt(app: Celery, text: str) -> Any:
    return app.signature("promptq.complete", args=[{"prompt": text}], queue=PROMPTQ_QUEUE)


def test_a_chain_passes_the_answer_to_a_plain_celery_task(
    app: Celery, plain_worker: PlainCeleryWorker
) -> None:
    shout = app.signature("user.shout", queue=USER_QUEUE)

    shouted = chain(_prompt(app, "chain me"), shout).apply_async().get(timeout=WAIT_S)

    assert shouted == {"shouted": "ECHO: CHAIN ME", "promptq_loaded": False}


def test_a_chord_gathers_its_answers_and_fails_on_a_failed_member(
    app: Celery, redis_server: RedisServer, provider: ScriptedOpenAIServer, plain_worker: Any
) -> None:
    summarise = app.signature("user.summarise", queue=USER_QUEUE)
    gathered = chord([_prompt(app, f"part {n}") for n in range(3)])(summarise)
    assert gathered.get(timeout=WAIT_S) == {
        "count": 3,
        "contents": ["echo: part 0", "echo: part 1", "echo: part 2"],
        "promptq_loaded": False,
    }

    # Of 20 members, the first call is refused (400) and the next two meet a 429 (retried).
    provider.script(Reply(status=400), Reply(status=429), Reply(status=429))
    header = [_prompt(app, f"member {n}") for n in range(20)]
    failed = chord(header)(summarise)

    # As with any Celery chord: get() raises the failed member's error (it follows the
    # parents), and the body itself fails with a ChordError naming it.
    with pytest.raises(Exception) as member_error:
        failed.get(timeout=WAIT_S)
    with pytest.raises(Exception) as chord_error:
        failed.get(timeout=WAIT_S, follow_parents=False)

    assert type(member_error.value).__name__ == "JobFailed"
    assert member_error.value.args[0]["kind"] == "bad_request"
    assert type(chord_error.value).__name__ == "ChordError"
    assert "JobFailed" in str(chord_error.value) and "bad_request" in str(chord_error.value)
    members = [app.AsyncResult(result.id) for result in failed.parent.results]
    assert sorted(m.state for m in members) == ["FAILURE"] + ["SUCCESS"] * 19
    attempts = [m.result["attempts"] for m in members if m.state == "SUCCESS"]
    assert sum(attempts) == 19 + 2  # two of them retried after a 429


def test_celery_inspect_sees_promptqs_tasks_and_the_job_running(
    app: Celery, provider: ScriptedOpenAIServer
) -> None:
    """What `celery inspect` (and Flower, which asks the same) shows of a promptq worker: its
    task names, and a job in its call under the task and id the sender knows."""
    gate = threading.Event()
    provider.script(Reply(gate=gate))
    try:
        result = _complete(app, {"prompt": "in its call"})
        provider.wait_for_requests(1, timeout_s=WAIT_S)
        active = app.control.inspect(timeout=1.0).active() or {}
    finally:
        gate.set()
    assert result.get(timeout=WAIT_S)["content"] == "echo: in its call"

    registered = app.control.inspect(timeout=1.0).registered() or {}
    # promptq's worker, beside the module's plain Celery worker when it runs.
    [names] = [names for node, names in registered.items() if node.startswith("promptq-")]
    assert {"promptq.complete", "promptq.embed"} <= set(names)
    running = [task for tasks in active.values() for task in tasks]
    assert [(task["name"], task["id"]) for task in running] == [("promptq.complete", result.id)]
    assert "sk-" not in json.dumps(running) and CANARY_KEY not in json.dumps(running)
