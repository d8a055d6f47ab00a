"""worker.fleet.reconcile: a job whose message is nowhere is published again, once, from a copy."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any

import pytest
import redis

from api_client._constants import (
    OPEN_JOBS_KEY,
    PARKED_KEY,
    QUEUE,
    RECOVERY_KEY,
    SUSPECTS_KEY,
    UNACKED_KEY,
    request_key,
    starts_key,
    state_key,
)
from api_client._publish import enqueue
from api_client._requests import Submission, build_embedding_request, build_request
from api_client._schemas import ErrorKind, JobError, JobStatus, Outcome
from api_client._task_messages import job_ids_of
from tests.support.broker import queued_messages, take_all
from tests.support.redis_server import RedisServer
from worker.fleet.custody import ProcessCustody
from worker.fleet.reconcile import Reconciler
from worker.fleet.store import JobStore
from worker.ops.metrics import Metrics

TTL_S = 3600.0
FAILED = Outcome(
    status=JobStatus.FAILED, error=JobError(kind=ErrorKind.BAD_REQUEST, message="no", attempts=1)
)


def _submit(client: redis.Redis, *jobs: Submission, pack_size: int = 1) -> list[bytes]:
    """Publish as the client does; returns the messages it queued (and empties the queue)."""
    pipe = client.pipeline(transaction=False)
    enqueue(pipe, jobs, TTL_S, pack_size)
    pipe.execute()
    return take_all(client)


def _job(job_id: str, prompt: str = "hello", packable: bool = False) -> Submission:
    return Submission(job_id, build_request(prompt, None, None, {}), packable=packable)


def _reconciler(client: redis.Redis) -> Reconciler:
    # An interval of 0: every open job is looked for at once.
    return Reconciler(client, JobStore(client, ttl_s=TTL_S), interval_s=0)


def _queued(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in queued_messages(client)]


def _body(message: dict[str, Any]) -> list[Any]:
    decoded: list[Any] = json.loads(base64.b64decode(message["body"]))
    return decoded


def test_a_job_found_nowhere_twice_is_published_again(lua_redis: redis.Redis) -> None:
    _submit(lua_redis, _job("lost"))  # its message is gone: deleted by hand, say
    reconciler = _reconciler(lua_redis)

    first = reconciler.run_pass()
    assert (first.candidates, first.suspects, first.republished) == (1, 1, 0)
    assert lua_redis.hkeys(SUSPECTS_KEY) == [b"lost"]
    assert lua_redis.llen(QUEUE) == 0

    second = reconciler.run_pass()
    assert second.republished == 1
    [message] = _queued(lua_redis)
    assert message["headers"]["id"] == "lost"
    assert message["headers"]["task"] == "promptq.complete"
    args, kwargs, _ = _body(message)
    assert args[0]["messages"] == [{"role": "user", "content": "hello"}]
    assert kwargs == {"failures": 0}
    assert lua_redis.get(state_key("lost")) == b"queued"
    assert lua_redis.hget(RECOVERY_KEY, "jobs_republished") == b"1"
    assert not lua_redis.exists(SUSPECTS_KEY)

    assert reconciler.run_pass().republished == 0  # its message is back: never twice


@pytest.mark.parametrize("where", ["queue", "taken", "unacked", "parked"])
def test_a_job_with_a_message_anywhere_is_left_alone(lua_redis: redis.Redis, where: str) -> None:
    [message] = _submit(lua_redis, _job("fine"))
    custody = ProcessCustody()
    custody.register(lua_redis)
    if where == "queue":
        lua_redis.lpush(QUEUE, message)
    elif where == "taken":
        lua_redis.lpush(custody.taken_key, message)
    elif where == "unacked":
        record = json.dumps([json.loads(message), "", QUEUE])
        lua_redis.hset(UNACKED_KEY, "tag", record)
    else:
        lua_redis.zadd(PARKED_KEY, {message: 0})
    reconciler = _reconciler(lua_redis)

    assert reconciler.run_pass().suspects == 0
    assert reconciler.run_pass().republished == 0
    assert lua_redis.hget(RECOVERY_KEY, "jobs_republished") is None


def test_each_job_of_a_lost_pack_is_published_on_its_own(lua_redis: redis.Redis) -> None:
    jobs = [_job(f"packed-{n}", f"prompt {n}", packable=True) for n in range(3)]
    [pack] = _submit(lua_redis, *jobs, pack_size=3)
    assert job_ids_of(json.loads(pack)) == ["packed-0", "packed-1", "packed-2"]
    reconciler = _reconciler(lua_redis)

    reconciler.run_pass()
    assert reconciler.run_pass().republished == 3

    queued = {m["headers"]["id"]: _body(m)[0][0] for m in _queued(lua_redis)}
    assert {job_id: args["messages"][0]["content"] for job_id, args in queued.items()} == {
        "packed-0": "prompt 0",
        "packed-1": "prompt 1",
        "packed-2": "prompt 2",
    }


def test_an_embedding_job_is_published_again_as_one(lua_redis: redis.Redis) -> None:
    request = build_embedding_request(["a", "b"], "text-embedding-3-small", {})
    _submit(lua_redis, Submission("vectors", request))
    reconciler = _reconciler(lua_redis)

    reconciler.run_pass()
    reconciler.run_pass()

    [message] = _queued(lua_redis)
    assert message["headers"]["task"] == "promptq.embed"
    assert _body(message)[0][0]["input"] == ["a", "b"]


def test_a_retrying_job_keeps_its_retry_budget_and_delivery_count(
    lua_redis: redis.Redis,
) -> None:
    _submit(lua_redis, _job("retrying"))
    store = JobStore(lua_redis, ttl_s=TTL_S)
    store.begin(["retrying"])
    store.begin(["retrying"])
    store.mark_retrying("retrying", 2)
    reconciler = _reconciler(lua_redis)

    reconciler.run_pass()
    reconciler.run_pass()

    [message] = _queued(lua_redis)
    assert _body(message)[1] == {"failures": 2}
    assert message["headers"]["retries"] == 2  # two deliveries so far: this one is the third
    assert lua_redis.get(starts_key("retrying")) == b"2"


def test_a_job_that_moves_between_passes_is_not_published(lua_redis: redis.Redis) -> None:
    _submit(lua_redis, _job("moving"))
    reconciler = _reconciler(lua_redis)
    reconciler.run_pass()

    JobStore(lua_redis, ttl_s=TTL_S).begin(["moving"])  # a worker started it meanwhile

    assert reconciler.run_pass().republished == 0
    assert lua_redis.llen(QUEUE) == 0
    assert lua_redis.hkeys(SUSPECTS_KEY) == [b"moving"]  # suspected afresh


def test_a_job_answered_between_passes_is_never_published(lua_redis: redis.Redis) -> None:
    _submit(lua_redis, _job("answered"))
    reconciler = _reconciler(lua_redis)
    reconciler.run_pass()
    # A suspect whose answer lands just before the next pass (its score left as it was).
    lua_redis.set("promptq:result:answered", FAILED.model_dump_json())

    assert reconciler.run_pass().republished == 0
    assert lua_redis.llen(QUEUE) == 0
    assert lua_redis.zscore(OPEN_JOBS_KEY, "answered") is None


def test_a_finished_job_leaves_the_open_jobs(lua_redis: redis.Redis) -> None:
    _submit(lua_redis, _job("done"))
    store = JobStore(lua_redis, ttl_s=TTL_S)
    store.begin(["done"])
    store.finish("done", FAILED).run()

    assert lua_redis.zcard(OPEN_JOBS_KEY) == 0
    assert not lua_redis.exists(request_key("done"))
    assert _reconciler(lua_redis).run_pass().candidates == 0


def test_a_lost_job_with_no_copy_fails_as_worker_lost(lua_redis: redis.Redis) -> None:
    # As an older client published it: a state and an open entry, no request copy.
    lua_redis.set(state_key("old"), "queued")
    lua_redis.zadd(OPEN_JOBS_KEY, {"old": 1})
    reconciler = _reconciler(lua_redis)

    reconciler.run_pass()
    assert reconciler.run_pass().abandoned == 1

    outcome = Outcome.model_validate_json(lua_redis.get("promptq:result:old") or b"")
    assert outcome.error is not None
    assert outcome.error.kind == "worker_lost"
    assert lua_redis.hget(RECOVERY_KEY, "jobs_abandoned") == b"1"
    assert lua_redis.llen(QUEUE) == 0


def test_a_job_whose_state_expired_leaves_the_open_jobs(lua_redis: redis.Redis) -> None:
    lua_redis.zadd(OPEN_JOBS_KEY, {"expired": 1})
    lua_redis.hset(request_key("expired"), mapping={"task": "promptq.complete", "request": "{}"})
    reconciler = _reconciler(lua_redis)

    reconciler.run_pass()
    reconciler.run_pass()

    assert lua_redis.zcard(OPEN_JOBS_KEY) == 0
    assert lua_redis.llen(QUEUE) == 0


def test_one_pass_per_interval_across_the_fleet(lua_redis: redis.Redis) -> None:
    store = JobStore(lua_redis, ttl_s=TTL_S)
    one = Reconciler(lua_redis, store, interval_s=60)
    other = Reconciler(lua_redis, store, interval_s=60)

    assert one.maybe_pass() is not None
    assert other.maybe_pass() is None


def test_two_reconcilers_at_once_publish_a_lost_job_once(real_redis: RedisServer) -> None:
    clients = [real_redis.client() for _ in range(2)]
    clients[0].flushall()
    _submit(clients[0], *[_job(f"lost-{n}") for n in range(50)])
    reconcilers = [_reconciler(client) for client in clients]
    for reconciler in reconcilers:
        reconciler.run_pass()
    start = threading.Barrier(2)

    def second_pass(reconciler: Reconciler) -> None:
        start.wait()
        reconciler.run_pass()

    threads = [threading.Thread(target=second_pass, args=(r,)) for r in reconcilers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    ids = [m["headers"]["id"] for m in _queued(clients[0])]
    assert sorted(ids) == sorted(f"lost-{n}" for n in range(50))
    assert clients[0].hget(RECOVERY_KEY, "jobs_republished") == b"50"
    for client in clients:
        client.close()


def test_each_recovered_job_is_counted_in_the_metrics(lua_redis: redis.Redis) -> None:
    _submit(lua_redis, _job("lost"))
    metrics = Metrics()
    reconciler = Reconciler(
        lua_redis,
        JobStore(lua_redis, ttl_s=TTL_S),
        interval_s=0,
        on_recovered=metrics.recovered,
    )
    assert metrics.registry.get_sample_value("promptq_jobs_recovered_total") == 0.0

    reconciler.run_pass()
    reconciler.run_pass()

    assert metrics.registry.get_sample_value("promptq_jobs_recovered_total") == 1.0
    assert metrics.registry.get_sample_value("promptq_jobs_abandoned_total") == 0.0
