"""worker.fleet.store.JobStore against fakeredis (its Lua scripts run under lupa)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path

import fakeredis
import pytest
import redis

from api_client._constants import (
    CONTROL_KEY,
    KEY_PREFIX,
    OPEN_JOBS_KEY,
    cancel_key,
    newest_key,
    result_key,
    starts_key,
    state_key,
)
from api_client._polling import poll_keys, read_poll, status_of
from api_client._schemas import (
    ErrorKind,
    JobError,
    JobStatus,
    Outcome,
    PromptResult,
    Usage,
)
from tests.support.redis_server import RedisServer
from worker.fleet.scripts import patiently
from worker.fleet.store import FINISH_PATIENCE_S, JobStore, Marked, NotBegun, Wanted

JOB_ID = "job-1"
TTL_S = 3600.0


@pytest.fixture
def redis_client() -> fakeredis.FakeRedis:
    # A server of its own: FakeRedis() instances otherwise share state by host and port.
    return fakeredis.FakeRedis(server=fakeredis.FakeServer())


@pytest.fixture
def store(redis_client: fakeredis.FakeRedis) -> JobStore:
    return JobStore(redis_client, ttl_s=TTL_S)


def _success(content: str = "2, 3, 5") -> Outcome:
    result = PromptResult(
        id=JOB_ID,
        model="test-model",
        content=content,
        message={"role": "assistant", "content": content},
        finish_reason="stop",
        usage=Usage(prompt_tokens=1, completion_tokens=3, total_tokens=4),
        cost_usd=None,
        attempts=1,
        latency_s=0.1,
        created=datetime(2024, 6, 1, tzinfo=UTC),
    )
    return Outcome(status=JobStatus.SUCCEEDED, result=result)


def _failure() -> Outcome:
    error = JobError(kind=ErrorKind.TIMEOUT, message="too slow", attempts=9)
    return Outcome(status=JobStatus.FAILED, error=error)


def _status(redis_client: fakeredis.FakeRedis, job_id: str = JOB_ID) -> JobStatus:
    outcome_raw, state_raw = redis_client.mget(poll_keys(job_id))
    return status_of(job_id, outcome_raw, state_raw)


def test_begin_counts_the_starts(store: JobStore, redis_client: fakeredis.FakeRedis) -> None:
    assert [store.begin([JOB_ID])[0] for _ in range(3)] == [1, 2, 3]
    assert _status(redis_client) is JobStatus.RUNNING
    # Jobs are counted apart.
    assert store.begin(["job-2"])[0] == 1


def test_begin_after_finish_is_not_begun(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    assert store.begin([JOB_ID])[0] == 1
    assert store.finish(JOB_ID, _success()).run()

    assert store.begin([JOB_ID])[0] is NotBegun.ENDED
    assert _status(redis_client) is JobStatus.SUCCEEDED
    assert redis_client.exists(state_key(JOB_ID), starts_key(JOB_ID)) == 0


def test_finish_stores_the_outcome_and_clears_the_progress_keys(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    store.begin([JOB_ID])

    assert store.finish(JOB_ID, _success()).run() is True

    raws = redis_client.mget(poll_keys(JOB_ID))
    assert read_poll([JOB_ID], raws) == {JOB_ID: _success()}
    assert redis_client.get(state_key(JOB_ID)) is None
    assert redis_client.get(starts_key(JOB_ID)) is None


def test_the_first_outcome_wins(store: JobStore, redis_client: fakeredis.FakeRedis) -> None:
    store.begin([JOB_ID])
    assert store.finish(JOB_ID, _success("first")).run() is True

    assert store.finish(JOB_ID, _failure()).run() is False
    assert store.finish(JOB_ID, _success("second")).run() is False

    raws = redis_client.mget(poll_keys(JOB_ID))
    assert read_poll([JOB_ID], raws) == {JOB_ID: _success("first")}


def test_finish_without_begin_still_stores(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    assert store.finish(JOB_ID, _failure()).run() is True
    assert _status(redis_client) is JobStatus.FAILED


def test_mark_retrying_sets_the_state(store: JobStore, redis_client: fakeredis.FakeRedis) -> None:
    store.begin([JOB_ID])

    store.mark_retrying(JOB_ID, 1)

    assert _status(redis_client) is JobStatus.RETRYING
    assert redis_client.pttl(state_key(JOB_ID)) > 0


def test_mark_retrying_never_overwrites_an_outcome(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    # The race Celery's own backend loses: a late RETRY after SUCCESS.
    store.begin([JOB_ID])
    store.finish(JOB_ID, _success()).run()

    store.mark_retrying(JOB_ID, 1)

    assert _status(redis_client) is JobStatus.SUCCEEDED
    assert redis_client.get(state_key(JOB_ID)) is None


def test_begin_never_overwrites_an_outcome(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    store.finish(JOB_ID, _failure()).run()

    assert store.begin([JOB_ID])[0] is NotBegun.ENDED
    assert _status(redis_client) is JobStatus.FAILED
    assert redis_client.get(state_key(JOB_ID)) is None


def test_every_key_expires(store: JobStore, redis_client: fakeredis.FakeRedis) -> None:
    store.begin([JOB_ID])
    ttl_ms = TTL_S * 1000
    for key in (state_key(JOB_ID), starts_key(JOB_ID)):
        assert 0 < redis_client.pttl(key) <= ttl_ms, key

    store.mark_retrying(JOB_ID, 1)
    assert 0 < redis_client.pttl(state_key(JOB_ID)) <= ttl_ms

    store.finish(JOB_ID, _success()).run()
    assert 0 < redis_client.pttl(result_key(JOB_ID)) <= ttl_ms


def test_a_restart_refreshes_the_ttls(redis_client: fakeredis.FakeRedis) -> None:
    short = JobStore(redis_client, ttl_s=10)
    long = JobStore(redis_client, ttl_s=1000)
    short.begin([JOB_ID])

    long.begin([JOB_ID])

    assert redis_client.pttl(starts_key(JOB_ID)) > 10_000
    assert redis_client.pttl(state_key(JOB_ID)) > 10_000


def test_fractional_ttl_is_kept_in_milliseconds(redis_client: fakeredis.FakeRedis) -> None:
    store = JobStore(redis_client, ttl_s=2.5)
    store.begin([JOB_ID])

    assert 2000 < redis_client.pttl(state_key(JOB_ID)) <= 2500


def test_every_key_has_the_prefix(store: JobStore, redis_client: fakeredis.FakeRedis) -> None:
    for job_id in ("job-a", "job-b"):
        store.begin([job_id])[0]
        store.begin([job_id])[0]
        store.mark_retrying(job_id, 1)
    store.finish("job-a", _success()).run()

    keys = {key.decode() if isinstance(key, bytes) else key for key in redis_client.keys("*")}

    assert keys == {
        result_key("job-a"),
        state_key("job-b"),
        starts_key("job-b"),
        newest_key("job-b"),
        OPEN_JOBS_KEY,
    }
    assert redis_client.zrange(OPEN_JOBS_KEY, 0, -1) == [b"job-b"]  # the finished job left it
    assert all(key.startswith(KEY_PREFIX) for key in keys)
    assert KEY_PREFIX == "promptq:"


def test_a_patient_finish_rides_out_a_redis_restart(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        connection = server.client()
        store = JobStore(connection, ttl_s=TTL_S)
        server.stop()
        restart = threading.Timer(0.5, server.start)
        restart.start()
        try:
            assert patiently(store.finish(JOB_ID, _success()).run, FINISH_PATIENCE_S)
        finally:
            restart.join()
        assert connection.exists(result_key(JOB_ID))
        connection.close()


def test_an_impatient_finish_raises_at_once_when_redis_is_down(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        store = JobStore(server.client(), ttl_s=TTL_S)
        server.stop()
        with pytest.raises(redis.ConnectionError):
            store.finish(JOB_ID, _success()).run()


def test_begin_marks_many_jobs_in_one_call(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    store.finish("done", _success()).run()

    assert store.begin(["a", "done", "b", "a"]) == [1, NotBegun.ENDED, 1, 2]
    assert redis_client.get(state_key("a")) == b"running"


def _cancel_while_running(redis_client: fakeredis.FakeRedis, job_id: str = JOB_ID) -> None:
    """What the client's cancel does to a running job: it sets the job's cancel flag."""
    redis_client.set(cancel_key(job_id), "1")


def test_begin_ends_a_job_cancelled_while_it_ran(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    store.begin([JOB_ID])
    _cancel_while_running(redis_client)

    assert store.begin([JOB_ID]) == [NotBegun.CANCELLED]

    [found] = read_poll([JOB_ID], redis_client.mget(poll_keys(JOB_ID))).values()
    assert isinstance(found, Outcome) and found.error is not None
    assert (found.error.kind, found.error.attempts) == (ErrorKind.CANCELLED, 0)
    assert redis_client.exists(state_key(JOB_ID), starts_key(JOB_ID), cancel_key(JOB_ID)) == 0


def test_a_retry_of_a_job_cancelled_while_it_ran_ends_it_instead(
    store: JobStore, redis_client: fakeredis.FakeRedis
) -> None:
    store.begin([JOB_ID])
    _cancel_while_running(redis_client)

    assert store.mark_retrying(JOB_ID, 3) is Marked.CANCELLED

    [found] = read_poll([JOB_ID], redis_client.mget(poll_keys(JOB_ID))).values()
    assert isinstance(found, Outcome) and found.error is not None
    assert (found.error.kind, found.error.attempts) == (ErrorKind.CANCELLED, 3)
    assert redis_client.hget(CONTROL_KEY, "cancelled") == b"1"


def test_marking_reports_what_it_did(store: JobStore, redis_client: fakeredis.FakeRedis) -> None:
    store.begin([JOB_ID])
    assert store.mark_retrying(JOB_ID, 1) is Marked.MARKED
    _cancel_while_running(redis_client)
    store.mark_waiting(JOB_ID)  # back in line: the flag is seen when it is begun again
    assert _status(redis_client) is JobStatus.QUEUED
    store.finish(JOB_ID, _success()).run()

    assert store.mark_retrying(JOB_ID, 2) is Marked.ENDED


@pytest.mark.parametrize(
    ("setup", "expected"),
    [("nothing", Wanted.YES), ("flag", Wanted.CANCELLED), ("outcome", Wanted.ENDED)],
)
def test_still_wanted_right_before_a_call(
    store: JobStore, redis_client: fakeredis.FakeRedis, setup: str, expected: Wanted
) -> None:
    store.begin([JOB_ID])
    if setup == "flag":
        _cancel_while_running(redis_client)
    elif setup == "outcome":
        store.finish(JOB_ID, _success()).run()

    assert store.still_wanted(JOB_ID, failures=1).run() is expected

    assert (
        _status(redis_client)
        is {
            Wanted.YES: JobStatus.RUNNING,
            Wanted.CANCELLED: JobStatus.FAILED,
            Wanted.ENDED: JobStatus.SUCCEEDED,
        }[expected]
    )


def test_an_older_copy_of_a_job_that_came_back_is_not_begun(store: JobStore) -> None:
    """A worker that put a job back in line (or parked it) and died before acknowledging its
    message leaves two copies: the newer one runs, the older one is dropped, and neither
    looks like a worker's death."""
    assert store.begin(["job"], [1]) == [1]
    assert store.begin(["job"], [2]) == [2]  # it came back: its next delivery
    assert store.begin(["job"], [1]) == [NotBegun.STALE]  # the first message, recovered
    assert store.begin(["job"], [2]) == [3]  # the same delivery again: a redelivery
