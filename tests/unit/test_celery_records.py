"""A job another Celery app sent, in Redis: taken in once (worker.fleet.adoption), and its Celery
records (celery-task-meta-<id>) written by the same scripts as its state, as Celery's own Redis
backend reads them; on fakeredis and a real redis-server alike."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery

from api_client._cancel import cancel_args
from api_client._celery_contract import CELERY_META_PREFIX, PROMPTQ_HEADER, celery_meta_tail
from api_client._constants import QUEUE, request_key, state_key, tenant_jobs_key
from api_client._requests import build_request
from api_client._schedule import WAKE, route_of
from api_client._schemas import ErrorKind, JobError, JobStatus, Outcome, PromptResult, Usage
from api_client._task_messages import request_json, task_message
from worker.fleet.adoption import Adoption, Taken
from worker.fleet.schedule import Scheduler
from worker.fleet.store import JobStore, Marked

JOB_ID = "celery-job-1"
TTL_S = 600.0
FOLLOWUP = b'{"a": "followup message"}'


@pytest.fixture
def backend() -> Iterator[Any]:
    """Celery's Redis result backend, to read records as a caller would (never connected)."""
    app = Celery(backend="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(result_serializer="json", result_accept_content=["json"])
    yield app.backend
    app.close()


def _take_in(client: redis.Redis, request: Any = None, *, tail: str | None = None) -> Taken:
    request = request or build_request("hi", None, None, {}, priority="interactive", tenant="t1")
    queued = (route_of(request), task_message(JOB_ID, request), request_json(request), "")
    return Adoption(client, TTL_S).take_in(
        JOB_ID,
        "promptq.complete",
        own=False,
        queued=queued,
        records_tail=celery_meta_tail(JOB_ID, "group-1", None) if tail is None else tail,
        followup=FOLLOWUP,
    )


def _record(client: redis.Redis, backend: Any) -> dict[str, Any] | None:
    raw = client.get(CELERY_META_PREFIX + JOB_ID)
    return None if raw is None else backend.decode_result(raw)


def _answer() -> Outcome:
    result = PromptResult(
        id=JOB_ID,
        model="test-model",
        content="2, 3, 5",
        message={"role": "assistant", "content": "2, 3, 5", "tool_calls": []},
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
        cost_usd=0.25,
        attempts=2,
        latency_s=0.1,
        created=datetime(2024, 6, 1, tzinfo=UTC),
    )
    return Outcome(status=JobStatus.SUCCEEDED, result=result)


def test_a_job_is_taken_in_once_and_waits_in_its_line(lua_redis: redis.Redis) -> None:
    assert _take_in(lua_redis) is Taken.QUEUED

    assert lua_redis.get(state_key(JOB_ID)) == b"queued"
    assert lua_redis.sismember(tenant_jobs_key("t1"), JOB_ID)
    assert lua_redis.hget(request_key(JOB_ID), "followup") == FOLLOWUP
    assert lua_redis.lrange(QUEUE, 0, -1) == [WAKE]  # an idle worker wakes for it
    # In its line: priority interactive (rank 0), tenant t1.
    assert len(lua_redis.keys("promptq:line:*:0:t1")) == 1
    claimed = Scheduler(lua_redis).claim("promptq:worker:test:taken")
    assert claimed is not None and claimed.order is not None  # taken from the scheduler
    headers = json.loads(claimed.message)["headers"]
    assert headers["id"] == JOB_ID and headers[PROMPTQ_HEADER] == 1
    # The same message again (its worker died before acknowledging it) is dropped; promptq's
    # own message of the job runs.
    assert _take_in(lua_redis) is Taken.DROP
    own = Adoption(lua_redis, TTL_S).take_in(JOB_ID, "promptq.complete", own=True, queued=None)
    assert own is Taken.RUN


def test_its_records_go_started_retry_success_and_success_stays(
    lua_redis: redis.Redis, backend: Any
) -> None:
    store = JobStore(lua_redis, TTL_S)
    _take_in(lua_redis)
    assert _record(lua_redis, backend) is None  # PENDING, as Celery reads a missing record

    store.begin([JOB_ID])
    started = _record(lua_redis, backend)
    store.mark_retrying(JOB_ID, 1)
    retrying = _record(lua_redis, backend)
    assert store.finish(JOB_ID, _answer()).run()
    done = _record(lua_redis, backend)
    late = store.mark_retrying(JOB_ID, 2)  # a late duplicate's retry

    assert started is not None and started["status"] == "STARTED"
    assert started["date_done"] is None
    assert retrying is not None and retrying["status"] == "RETRY"
    assert late is Marked.ENDED
    assert _record(lua_redis, backend) == done
    assert done is not None and done["status"] == "SUCCESS"
    assert done["result"] == json.loads(_answer().model_dump_json())["result"]
    assert done["result"]["message"]["tool_calls"] == []  # JSON as stored, not re-encoded
    assert done["task_id"] == JOB_ID and done["group_id"] == "group-1"
    when = datetime.fromisoformat(done["date_done"])
    assert abs(when - datetime.now(UTC)) < timedelta(minutes=1)
    assert 0 < lua_redis.pttl(CELERY_META_PREFIX + JOB_ID) <= TTL_S * 1000
    assert lua_redis.lrange(QUEUE, 0, 0) == [FOLLOWUP]  # its canvas runs next


def test_a_failure_is_a_jobfailed_exception_holding_the_error(
    lua_redis: redis.Redis, backend: Any
) -> None:
    _take_in(lua_redis)
    error = JobError(kind=ErrorKind.RATE_LIMITED, message="429", status_code=429, attempts=4)
    JobStore(lua_redis, TTL_S).finish(JOB_ID, Outcome(status=JobStatus.FAILED, error=error)).run()

    record = _record(lua_redis, backend)

    assert record is not None and record["status"] == "FAILURE"
    exc = record["result"]
    assert type(exc).__name__ == "JobFailed" and isinstance(exc, Exception)
    assert exc.args[0] == error.model_dump(mode="json")


def test_a_cancel_by_the_client_writes_the_failure_record(
    lua_redis: redis.Redis, backend: Any
) -> None:
    _take_in(lua_redis)

    assert lua_redis.eval(*cancel_args([JOB_ID], TTL_S)) == [b"cancelled"]

    record = _record(lua_redis, backend)
    assert record is not None and record["result"].args[0]["kind"] == "cancelled"


def test_an_invalid_request_ends_taken_in_with_its_failure(
    lua_redis: redis.Redis, backend: Any
) -> None:
    error = JobError(kind=ErrorKind.BAD_REQUEST, message="prompt is empty")
    failed = Outcome(status=JobStatus.FAILED, error=error).model_dump_json()
    taken = Adoption(lua_redis, TTL_S).take_in(
        JOB_ID,
        "promptq.complete",
        own=False,
        queued=None,
        failed=failed,
        records_tail=celery_meta_tail(JOB_ID, None, None),
    )

    assert taken is Taken.FAILED
    record = _record(lua_redis, backend)
    assert record is not None and record["result"].args[0]["message"] == "prompt is empty"
    assert lua_redis.get(state_key(JOB_ID)) is None  # ended: nothing left open
    assert not lua_redis.exists(request_key(JOB_ID))


def test_a_sender_that_asked_for_no_result_gets_no_record(lua_redis: redis.Redis) -> None:
    _take_in(lua_redis, tail="")
    store = JobStore(lua_redis, TTL_S)
    store.begin([JOB_ID])
    store.finish(JOB_ID, _answer()).run()

    assert lua_redis.get(CELERY_META_PREFIX + JOB_ID) is None
    assert lua_redis.lrange(QUEUE, 0, 0) == [FOLLOWUP]  # its canvas still runs
