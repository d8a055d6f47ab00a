"""The client's cancel: what it does to jobs in each state (on fakeredis and redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis

from api_client import (
    AsyncClient,
    Cancellation,
    CancelResult,
    Client,
    InvalidRequest,
    JobFailed,
    JobStatus,
)
from api_client._cancel import CANCEL_CHUNK
from api_client._constants import (
    CONTROL_KEY,
    DEADLINES_KEY,
    OPEN_JOBS_KEY,
    cancel_key,
    request_key,
    result_key,
    state_key,
    tenant_jobs_key,
)
from api_client._schemas import ErrorKind, JobError, Outcome
from tests.support.redis_server import RedisServer
from worker.fleet.store import JobStore
from worker.ops.fleet_status import FleetStatus, ended_early_counts, format_status

TTL_S = 3600.0


@pytest.fixture
def client(lua_redis: redis.Redis) -> Iterator[Client]:
    """A client on the test's Redis (fakeredis or redis-server)."""
    with Client("redis://127.0.0.1:1/0") as found:
        found._redis = lua_redis  # the client's one connection pool
        yield found


def control(r: redis.Redis) -> dict[str, int]:
    counters: dict[bytes, bytes] = r.hgetall(CONTROL_KEY)  # type: ignore[assignment]
    return {name.decode(): int(value) for name, value in counters.items()}


def stored_error(r: redis.Redis, job_id: str) -> JobError:
    raw = r.get(result_key(job_id))
    assert raw is not None
    outcome = Outcome.model_validate_json(raw)
    assert outcome.status is JobStatus.FAILED and outcome.error is not None
    return outcome.error


def test_a_queued_job_ends_cancelled_and_leaves_every_index(
    client: Client, lua_redis: redis.Redis
) -> None:
    job = client.submit("never called", tenant="team-a", deadline_s=600)
    assert lua_redis.sismember(tenant_jobs_key("team-a"), job.id)
    assert lua_redis.zscore(DEADLINES_KEY, job.id) is not None

    assert job.cancel() is Cancellation.CANCELLED

    error = stored_error(lua_redis, job.id)
    assert (error.kind, error.message, error.attempts) == (
        ErrorKind.CANCELLED,
        "cancelled by the client",
        0,
    )
    with pytest.raises(JobFailed) as failed:
        job.result()
    assert failed.value.kind == "cancelled"
    assert lua_redis.exists(state_key(job.id), request_key(job.id)) == 0
    assert lua_redis.zscore(OPEN_JOBS_KEY, job.id) is None
    assert lua_redis.zscore(DEADLINES_KEY, job.id) is None
    assert not lua_redis.sismember(tenant_jobs_key("team-a"), job.id)
    assert control(lua_redis) == {"cancelled": 1}
    assert 0 < lua_redis.pttl(result_key(job.id)) <= TTL_S * 1000 * 24  # the client's ttl


def test_a_retrying_job_keeps_its_failures_as_attempts(
    client: Client, lua_redis: redis.Redis
) -> None:
    job = client.submit("failed twice")
    JobStore(lua_redis, TTL_S).mark_retrying(job.id, 2)

    assert client.cancel([job.id]).cancelled == [job.id]

    assert stored_error(lua_redis, job.id).attempts == 2


def test_a_running_job_is_flagged_and_keeps_running(client: Client, lua_redis: redis.Redis) -> None:
    job = client.submit("in flight")
    JobStore(lua_redis, TTL_S).begin([job.id])

    result = client.cancel([job.id])

    assert result.running == [job.id] and result[job.id] is Cancellation.RUNNING
    assert lua_redis.exists(result_key(job.id)) == 0
    assert job.status() is JobStatus.RUNNING
    assert 0 < lua_redis.pttl(cancel_key(job.id)) <= client.settings.result_ttl_s * 1000
    assert control(lua_redis) == {}
    # It stays in its tenant's set: a later cancel_tenant finds it again.
    assert lua_redis.sismember(tenant_jobs_key("default"), job.id)


def test_a_finished_job_is_left_as_it_is(client: Client, lua_redis: redis.Redis) -> None:
    done, failed = client.submit("done"), client.submit("failed")
    store = JobStore(lua_redis, TTL_S)
    error = JobError(kind=ErrorKind.TIMEOUT, message="too slow", attempts=3)
    store.finish(failed.id, Outcome(status=JobStatus.FAILED, error=error)).run()
    lua_redis.set(result_key(done.id), '{"status":"succeeded","result":{}}')
    before = lua_redis.get(result_key(failed.id))

    result = client.cancel([done.id, failed.id])

    assert result.finished == {done.id: JobStatus.SUCCEEDED, failed.id: JobStatus.FAILED}
    assert lua_redis.get(result_key(failed.id)) == before
    assert control(lua_redis) == {}


def test_an_unknown_id_is_said_so(client: Client, lua_redis: redis.Redis) -> None:
    result = client.cancel("no-such-job")  # one id may be given alone

    assert result.unknown == ["no-such-job"]
    assert result.counts() == {
        Cancellation.CANCELLED: 0,
        Cancellation.RUNNING: 0,
        Cancellation.FINISHED: 0,
        Cancellation.UNKNOWN: 1,
    }
    assert lua_redis.exists(result_key("no-such-job")) == 0
    with pytest.raises(KeyError):
        result["never-asked"]


def test_a_malformed_id_cancels_nothing(client: Client, lua_redis: redis.Redis) -> None:
    job = client.submit("kept")

    with pytest.raises(InvalidRequest, match="not a job id"):
        client.cancel([job.id, "bad id"])

    assert job.status() is JobStatus.QUEUED


def test_a_cancelled_job_cancelled_again_is_finished(client: Client) -> None:
    job = client.submit("twice")
    client.cancel([job.id, job.id])  # each id once

    assert client.cancel([job.id]).finished == {job.id: JobStatus.FAILED}


def test_cancel_tenant_ends_that_tenants_jobs_only(client: Client, lua_redis: redis.Redis) -> None:
    ours = client.submit_many([{"prompt": f"ours {i}", "tenant": "team-a"} for i in range(5)])
    theirs = client.submit("theirs", tenant="team-b")
    running = client.submit("running", tenant="team-a")
    JobStore(lua_redis, TTL_S).begin([running.id])

    result = client.cancel_tenant("team-a")

    assert sorted(result.cancelled) == sorted(job.id for job in ours)
    assert result.running == [running.id]
    assert theirs.status() is JobStatus.QUEUED
    # What it ended left the set; the running job stays, to be found by the next cancel.
    assert lua_redis.smembers(tenant_jobs_key("team-a")) == {running.id.encode()}
    assert client.cancel_tenant("team-a").running == [running.id]


def test_cancel_tenant_of_jobs_that_named_none(client: Client) -> None:
    job = client.submit("default tenant")

    assert client.cancel_tenant("default").cancelled == [job.id]


@pytest.mark.parametrize("tenant", ["team a", "", None])
def test_cancel_tenant_refuses_a_malformed_name(client: Client, tenant: str) -> None:
    with pytest.raises(InvalidRequest, match="tenant"):
        client.cancel_tenant(tenant)


def test_a_finished_job_leaves_its_tenants_set(client: Client, lua_redis: redis.Redis) -> None:
    job = client.submit("done", tenant="team-a", deadline_s=600)
    error = JobError(kind=ErrorKind.TIMEOUT, message="too slow")
    JobStore(lua_redis, TTL_S).finish(job.id, Outcome(status=JobStatus.FAILED, error=error)).run()

    assert lua_redis.scard(tenant_jobs_key("team-a")) == 0
    assert lua_redis.zcard(DEADLINES_KEY) == 0


def test_a_pack_records_each_job_in_its_tenant_and_deadlines(
    client: Client, lua_redis: redis.Redis
) -> None:
    deadline = time.time() + 60
    jobs = client.submit_many(
        [{"prompt": f"p{i}", "tenant": "team-a", "deadline": deadline} for i in range(3)]
    )

    members: set[bytes] = lua_redis.smembers(tenant_jobs_key("team-a"))  # type: ignore[assignment]
    assert members == {job.id.encode() for job in jobs}
    assert lua_redis.pttl(tenant_jobs_key("team-a")) > 0
    scores = [lua_redis.zscore(DEADLINES_KEY, job.id) for job in jobs]
    assert scores == [int(deadline * 1000)] * 3
    copy: dict[bytes, bytes] = lua_redis.hgetall(request_key(jobs[0].id))  # type: ignore[assignment]
    assert copy[b"tenant"] == b"team-a"


def test_cancel_result_reads_per_id() -> None:
    result = CancelResult()
    result._add(["a", "b", "c", "d"], [b"cancelled", b"running", b"succeeded", b"unknown"])

    assert [result[i] for i in "abcd"] == list(Cancellation)
    assert result.finished == {"c": JobStatus.SUCCEEDED}


# --- at scale, on redis-server -----------------------------------------------------------


@pytest.fixture
def real_client(real_redis: RedisServer) -> Iterator[Client]:
    connection = real_redis.client()
    connection.flushall()
    connection.close()
    with Client(real_redis.url) as found:
        yield found


def command_calls(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """Redis's own count of each command's calls, and its time in microseconds (about 10 ms
    per cancel script of 1,000 queued jobs on a laptop)."""
    stats: dict[str, dict[str, int]] = r.info("commandstats")
    return {name: (int(s["calls"]), int(s["usec"])) for name, s in stats.items()}


def test_ten_thousand_queued_jobs_cancel_in_one_round_trip_of_ten_scripts(
    real_client: Client, real_redis: RedisServer
) -> None:
    jobs = real_client.submit_many([f"prompt {i}" for i in range(10_000)])
    admin = real_redis.client()
    admin.config_resetstat()
    sent: list[int] = []  # the requests the client sends, each a round trip
    connection_class = real_client._redis.connection_pool.connection_class
    original = connection_class.send_packed_command

    def counted(self: redis.connection.Connection, *args: object, **kwargs: object) -> None:
        sent.append(1)
        original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(connection_class, "send_packed_command", counted)
        result = real_client.cancel([job.id for job in jobs])

    assert len(result.cancelled) == 10_000
    assert len(sent) == 1  # one pipelined round trip
    calls = command_calls(admin)
    assert calls["cmdstat_eval"][0] == 10_000 // CANCEL_CHUNK
    assert admin.zcard(OPEN_JOBS_KEY) == 0
    assert int(admin.hget(CONTROL_KEY, "cancelled") or 0) == 10_000
    admin.close()


def test_cancel_tenant_works_through_a_large_set_in_chunks(
    real_client: Client, real_redis: RedisServer
) -> None:
    jobs = real_client.submit_many(
        [{"prompt": f"p{i}", "tenant": "big"} for i in range(2 * CANCEL_CHUNK + 500)]
    )
    admin = real_redis.client()
    admin.config_resetstat()

    result = real_client.cancel_tenant("big")

    assert sorted(result.cancelled) == sorted(job.id for job in jobs)
    assert command_calls(admin)["cmdstat_eval"][0] == 3  # 1,000 + 1,000 + 500
    assert admin.scard(tenant_jobs_key("big")) == 0
    admin.close()


def test_the_async_client_cancels_alike(real_redis: RedisServer) -> None:
    async def main() -> tuple[str, Cancellation, CancelResult, CancelResult]:
        async with AsyncClient(real_redis.url) as client:
            one = await client.submit("one", tenant="async")
            two = await client.submit("two", tenant="async")
            three = await client.submit("three", tenant="other")
            return (
                two.id,
                await one.cancel(),
                await client.cancel_tenant("async"),
                await client.cancel([three.id, "nope"]),
            )

    connection = real_redis.client()
    connection.flushall()
    two, first, tenant, by_id = asyncio.run(main())

    assert first is Cancellation.CANCELLED
    assert tenant == CancelResult(cancelled=[two])  # the first one left the set as it ended
    assert (len(by_id.cancelled), by_id.unknown) == (1, ["nope"])
    assert int(connection.hget(CONTROL_KEY, "cancelled") or 0) == 3
    connection.close()


def test_status_shows_the_jobs_ended_early(client: Client, lua_redis: redis.Redis) -> None:
    client.cancel([client.submit("cancelled").id])

    counts = ended_early_counts(lua_redis)

    assert counts == {"cancelled": 1, "deadline_exceeded": 0}
    status = FleetStatus(
        broker="redis://localhost:6379/0",
        queue_depth=0,
        in_flight=0,
        retries_scheduled=0,
        parked=0,
        workers=[],
        jobs={},
        ended_early=counts,
    )
    lines = format_status(status).splitlines()
    assert [line.split(":", 1)[1].strip() for line in lines if line.startswith("ended early")] == [
        "1 cancelled, 0 past their deadline"
    ]
