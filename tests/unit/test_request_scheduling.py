"""What a request carries for the scheduler (priority, tenant, deadline_at): the schema, its JSON,
and the client arguments that set them, every refusal found before anything reaches Redis.

Refusals use clients pointed at a closed port: InvalidRequest proves the problem was found
before any Redis call (that would have raised BrokerUnavailable). What a valid submission
queued is read back from a real redis-server: the request copy stored beside the job.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import pytest
import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api_client import (
    AsyncClient,
    BrokerUnavailable,
    Client,
    EmbeddingRequest,
    ErrorKind,
    InvalidRequest,
    Priority,
    PromptRequest,
)
from api_client._constants import request_key
from api_client._schemas import (
    DEFAULT_TENANT,
    PRIORITY_ORDER,
    RESERVED_EMBEDDING_PARAMS,
    RESERVED_PARAMS,
    JobRequest,
)
from api_client._task_messages import REQUEST_TYPES, request_json
from tests.support.redis_server import RedisServer

T = TypeVar("T")
USER = {"role": "user", "content": "hello"}
LEVELS = "interactive, default, batch"
TENANT_RULE = r"tenant must match ^[A-Za-z0-9_.:\-]{1,64}$"
LATER = 4_102_444_800.0  # 2100-01-01 UTC


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    # A private loop that never becomes the thread's current one (see test_client_validation).
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        return runner.run(coroutine)


# --- the schema -----------------------------------------------------------------------------


def test_priority_levels_are_ranked_highest_first() -> None:
    assert [level.value for level in PRIORITY_ORDER] == ["interactive", "default", "batch"]
    assert [level.rank for level in PRIORITY_ORDER] == [0, 1, 2]
    assert Priority.INTERACTIVE.rank < Priority.DEFAULT.rank < Priority.BATCH.rank


@pytest.mark.parametrize(
    "request_", [PromptRequest(messages=[USER]), EmbeddingRequest(input=["a"])]
)
def test_a_request_that_names_nothing_gets_the_defaults(request_: JobRequest) -> None:
    assert request_.priority is Priority.DEFAULT
    assert request_.tenant is None
    assert request_.tenant_name == DEFAULT_TENANT == "default"
    assert request_.deadline_at is None


def test_the_fields_are_set_and_named() -> None:
    request = PromptRequest(
        messages=[USER], priority=Priority.INTERACTIVE, tenant="team-a", deadline_at=LATER
    )

    assert request.priority is Priority.INTERACTIVE
    assert request.tenant == request.tenant_name == "team-a"
    assert request.deadline_at == LATER


def test_naming_the_default_tenant_is_naming_none() -> None:
    # One form on the wire for one tenant.
    named = PromptRequest(messages=[USER], tenant="default")

    assert named.tenant is None
    assert named == PromptRequest(messages=[USER])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"priority": "high"}, f"priority must be one of {LEVELS}, got 'high'"),
        ({"priority": "Interactive"}, f"priority must be one of {LEVELS}, got 'Interactive'"),
        ({"priority": 0}, f"priority must be one of {LEVELS}, got 0"),
        ({"priority": None}, f"priority must be one of {LEVELS}, got None"),
        ({"tenant": ""}, f"{TENANT_RULE} (letters, digits and _.:-, 1 to 64 characters), got ''"),
        ({"tenant": "team a"}, f"{TENANT_RULE}"),
        ({"tenant": "a" * 65}, TENANT_RULE),
        ({"tenant": "team/a"}, TENANT_RULE),
        ({"tenant": "team\n"}, TENANT_RULE),
        ({"tenant": "équipe"}, TENANT_RULE),
        ({"tenant": 7}, TENANT_RULE),
        ({"deadline_at": 0}, "deadline_at must be finite epoch seconds > 0, got 0"),
        ({"deadline_at": -1.5}, "deadline_at must be finite epoch seconds > 0"),
        ({"deadline_at": math.nan}, "deadline_at must be finite epoch seconds > 0"),
        ({"deadline_at": math.inf}, "deadline_at must be finite epoch seconds > 0"),
        ({"deadline_at": 10**400}, "deadline_at must be finite epoch seconds > 0"),
        ({"deadline_at": True}, "deadline_at must be a number of epoch seconds, got True"),
        ({"deadline_at": "soon"}, "deadline_at must be a number of epoch seconds"),
    ],
)
@pytest.mark.parametrize("kind", [PromptRequest, EmbeddingRequest])
def test_bad_scheduling_fields_are_refused(
    kind: type[JobRequest], fields: dict[str, Any], message: str
) -> None:
    call = {"messages": [USER]} if kind is PromptRequest else {"input": ["a"]}

    with pytest.raises(ValidationError) as raised:
        kind.model_validate({**call, **fields})

    assert message in str(raised.value)


@pytest.mark.parametrize("tenant", ["a", "team-a", "org.team_2:eu", "A" * 64])
def test_well_formed_tenants_are_kept(tenant: str) -> None:
    assert PromptRequest(messages=[USER], tenant=tenant).tenant == tenant


def test_scheduling_names_are_reserved_from_the_parameters() -> None:
    names = {"priority", "tenant", "deadline", "deadline_s", "deadline_at"}
    assert names <= RESERVED_PARAMS
    assert names <= RESERVED_EMBEDDING_PARAMS

    with pytest.raises(ValidationError, match="not sampling parameters"):
        PromptRequest(messages=[USER], params={"priority": "batch"})
    with pytest.raises(ValidationError, match=r"\['deadline_at', 'tenant'\]"):
        EmbeddingRequest(input=["a"], params={"tenant": "t", "deadline_at": LATER})


def test_cancelled_and_expired_are_error_kinds() -> None:
    assert ErrorKind("cancelled") is ErrorKind.CANCELLED
    assert ErrorKind("deadline_exceeded") is ErrorKind.DEADLINE_EXCEEDED


# --- the JSON a job carries -----------------------------------------------------------------


class _OldPromptRequest(BaseModel):
    """PromptRequest as workers older than the scheduling fields read it (unknown fields are
    refused)."""

    model_config = ConfigDict(extra="forbid")

    messages: list[dict[str, Any]]
    model: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    budget: str | None = None
    llm: str | None = None


def test_a_request_at_the_defaults_is_json_an_older_worker_reads() -> None:
    request = PromptRequest(messages=[USER], params={"temperature": 0}, tenant="default")

    carried = json.loads(request_json(request))

    assert carried.keys() == {"messages", "model", "params", "budget", "llm"}
    assert _OldPromptRequest.model_validate(carried).params == {"temperature": 0}


@pytest.mark.parametrize(
    ("fields", "carried"),
    [
        ({"priority": "batch"}, {"priority": "batch"}),
        ({"tenant": "team-a"}, {"tenant": "team-a"}),
        ({"deadline_at": LATER}, {"deadline_at": LATER}),
    ],
)
def test_a_field_off_its_default_is_in_the_json(
    fields: dict[str, Any], carried: dict[str, Any]
) -> None:
    request = PromptRequest(messages=[USER], **fields)

    data = json.loads(request_json(request))

    assert {name: data[name] for name in carried} == carried
    with pytest.raises(ValidationError):  # the control: an older worker would refuse it
        _OldPromptRequest.model_validate(data)


def test_json_without_the_fields_reads_as_the_defaults() -> None:
    old = '{"messages": [{"role": "user", "content": "hello"}], "model": null, "params": {}}'

    request = PromptRequest.model_validate_json(old)

    assert (request.priority, request.tenant, request.deadline_at) == (Priority.DEFAULT, None, None)


@pytest.mark.parametrize(
    "request_",
    [
        PromptRequest(
            messages=[USER],
            priority=Priority.INTERACTIVE,
            tenant="team-a",
            deadline_at=LATER + 0.25,
        ),
        EmbeddingRequest(
            input=["a", "b"], priority=Priority.BATCH, tenant="t:1", deadline_at=LATER
        ),
        PromptRequest(messages=[USER]),
    ],
)
def test_requests_round_trip_through_their_json(request_: JobRequest) -> None:
    text = request_json(request_)

    assert type(request_).model_validate_json(text) == request_
    assert type(request_).model_validate(request_.model_dump()) == request_


# --- the client arguments -------------------------------------------------------------------

Submit = Callable[[Client, dict[str, Any]], object]
SYNC_VERBS: dict[str, Submit] = {
    "submit": lambda client, kwargs: client.submit("hi", **kwargs),
    "embed": lambda client, kwargs: client.embed("hi", **kwargs),
    "submit_many": lambda client, kwargs: client.submit_many(["ok", {"prompt": "hi", **kwargs}]),
}
AsyncSubmit = Callable[[AsyncClient, dict[str, Any]], Coroutine[Any, Any, object]]
ASYNC_VERBS: dict[str, AsyncSubmit] = {
    "submit": lambda client, kwargs: client.submit("hi", **kwargs),
    "embed": lambda client, kwargs: client.embed("hi", **kwargs),
    "submit_many": lambda client, kwargs: client.submit_many(["ok", {"prompt": "hi", **kwargs}]),
}
NAIVE = datetime(2100, 1, 1, 12, 0)

# (submit keyword arguments, the message of the InvalidRequest, or a part of it)
BAD_ARGUMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "unknown priority": (
        {"priority": "high"},
        f"invalid request: priority must be one of {LEVELS}, got 'high'",
    ),
    "priority of another case": ({"priority": "BATCH"}, f"priority must be one of {LEVELS}"),
    "malformed tenant": ({"tenant": "team a"}, f"{TENANT_RULE} "),
    "empty tenant": ({"tenant": ""}, TENANT_RULE),
    "zero deadline_s": ({"deadline_s": 0}, "deadline_s must be a finite number of seconds > 0"),
    "negative deadline_s": ({"deadline_s": -5}, "deadline_s must be a finite number of seconds"),
    "NaN deadline_s": ({"deadline_s": math.nan}, "deadline_s must be a finite number"),
    "infinite deadline_s": ({"deadline_s": math.inf}, "deadline_s must be a finite number"),
    "huge deadline_s": ({"deadline_s": 10**400}, "deadline_s must be a finite number"),
    "text deadline_s": ({"deadline_s": "30"}, "deadline_s must be a finite number"),
    "bool deadline_s": ({"deadline_s": True}, "deadline_s must be a finite number"),
    "both deadlines": (
        {"deadline_s": 30, "deadline": LATER},
        "give at most one of deadline_s (seconds from now) and deadline (an absolute time)",
    ),
    "naive datetime": ({"deadline": NAIVE}, "deadline must be timezone-aware"),
    "text deadline": ({"deadline": "tomorrow"}, "deadline must be a timezone-aware datetime or"),
    "negative deadline": ({"deadline": -1}, "deadline must be finite epoch seconds > 0"),
    "infinite deadline": ({"deadline": math.inf}, "deadline must be finite epoch seconds > 0"),
    "datetime before 1970": (
        {"deadline": datetime(1969, 7, 20, tzinfo=UTC)},
        "deadline must be finite epoch seconds > 0",
    ),
    "deadline_at as a parameter": ({"deadline_at": LATER}, "not sampling parameters"),
}


@pytest.fixture
def client(closed_port: int) -> Iterator[Client]:
    with Client(f"redis://127.0.0.1:{closed_port}/0") as c:
        yield c


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS.values(), ids=list(BAD_ARGUMENTS))
@pytest.mark.parametrize("verb", SYNC_VERBS)
def test_client_refuses_bad_scheduling_arguments(
    client: Client, verb: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        SYNC_VERBS[verb](client, kwargs)

    assert message in str(raised.value)
    if verb == "submit_many":  # the entry's index first
        assert str(raised.value).startswith("requests[1]: ")


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS.values(), ids=list(BAD_ARGUMENTS))
@pytest.mark.parametrize("verb", ASYNC_VERBS)
def test_async_client_refuses_bad_scheduling_arguments(
    closed_port: int, verb: str, kwargs: dict[str, Any], message: str
) -> None:
    async def submit() -> None:
        async with AsyncClient(f"redis://127.0.0.1:{closed_port}/0") as client:
            await ASYNC_VERBS[verb](client, kwargs)

    with pytest.raises(InvalidRequest) as raised:
        _run(submit())

    assert message in str(raised.value)


@pytest.mark.parametrize("verb", SYNC_VERBS)
def test_good_scheduling_arguments_reach_for_redis(client: Client, verb: str) -> None:
    # The control of the refusals above: the same calls, valid, get as far as Redis.
    kwargs = {"priority": "interactive", "tenant": "team-a", "deadline_s": 30}

    with pytest.raises(BrokerUnavailable):
        SYNC_VERBS[verb](client, kwargs)


def test_submit_many_names_the_bad_entry_among_good_ones(client: Client) -> None:
    entries: list[Any] = [
        "first",
        PromptRequest(messages=[USER], priority=Priority.BATCH),
        {"prompt": "third", "tenant": "team-a"},
        {"prompt": "fourth", "priority": "urgent"},
    ]

    with pytest.raises(InvalidRequest) as raised:
        client.submit_many(entries)

    assert str(raised.value) == (
        f"requests[3]: invalid request: priority must be one of {LEVELS}, got 'urgent'"
    )


# --- what a valid submission queues ---------------------------------------------------------


@pytest.fixture
def fleet_redis(real_redis: RedisServer) -> Iterator[redis.Redis]:
    connection = real_redis.client()
    try:
        yield connection
    finally:
        connection.close()


def _queued_request(connection: redis.Redis, job_id: str) -> JobRequest:
    """The request copy stored beside a queued job, as the worker reads it."""
    task, request = connection.hmget(request_key(job_id), ["task", "request"])
    assert isinstance(task, bytes)
    assert isinstance(request, bytes)
    return REQUEST_TYPES[task.decode()].model_validate_json(request)


def test_submit_queues_the_scheduling_fields(
    real_redis: RedisServer, fleet_redis: redis.Redis
) -> None:
    with Client(real_redis.url) as client:
        before = time.time()
        job = client.submit("hi", priority="interactive", tenant="team-a", deadline_s=30)
        after = time.time()

    queued = _queued_request(fleet_redis, job.id)
    assert queued.priority is Priority.INTERACTIVE
    assert queued.tenant == "team-a"
    assert queued.deadline_at is not None
    assert before + 30 <= queued.deadline_at <= after + 30


def test_a_submit_without_them_queues_the_defaults(
    real_redis: RedisServer, fleet_redis: redis.Redis
) -> None:
    with Client(real_redis.url) as client:
        job = client.submit("hi", temperature=0)

    queued = _queued_request(fleet_redis, job.id)
    assert (queued.priority, queued.tenant_name, queued.deadline_at) == (
        Priority.DEFAULT,
        "default",
        None,
    )
    assert isinstance(queued, PromptRequest)
    assert queued.params == {"temperature": 0}  # nothing of the scheduling among them


@pytest.mark.parametrize(
    ("deadline", "expected"),
    [
        (datetime(2100, 1, 1, tzinfo=UTC), LATER),
        (datetime(2100, 1, 1, 2, 0, tzinfo=timezone(timedelta(hours=2))), LATER),
        (LATER, LATER),
        (int(LATER), LATER),
    ],
)
def test_an_absolute_deadline_becomes_deadline_at(
    real_redis: RedisServer, fleet_redis: redis.Redis, deadline: datetime | float, expected: float
) -> None:
    with Client(real_redis.url) as client:
        job = client.embed(["a text"], deadline=deadline, priority=Priority.BATCH)

    queued = _queued_request(fleet_redis, job.id)
    assert isinstance(queued, EmbeddingRequest)
    assert queued.deadline_at == expected
    assert queued.priority is Priority.BATCH


def test_submit_many_entries_carry_their_own_fields(
    real_redis: RedisServer, fleet_redis: redis.Redis
) -> None:
    with Client(real_redis.url) as client:
        jobs = client.submit_many(
            [
                {"prompt": "a", "priority": "interactive", "tenant": "team-a", "deadline": LATER},
                PromptRequest(messages=[USER], priority=Priority.BATCH, tenant="team-b"),
                EmbeddingRequest(input=["c"], deadline_at=LATER),
                "d",
            ]
        )

    queued = [_queued_request(fleet_redis, job.id) for job in jobs]
    assert [(q.priority.value, q.tenant_name, q.deadline_at) for q in queued] == [
        ("interactive", "team-a", LATER),
        ("batch", "team-b", None),
        ("default", "default", LATER),
        ("default", "default", None),
    ]


def test_async_submit_queues_the_scheduling_fields(
    real_redis: RedisServer, fleet_redis: redis.Redis
) -> None:
    async def submit() -> str:
        async with AsyncClient(real_redis.url) as client:
            job = await client.submit("hi", priority="batch", tenant="team-c", deadline=LATER)
            return job.id

    queued = _queued_request(fleet_redis, _run(submit()))
    assert (queued.priority, queued.tenant, queued.deadline_at) == (
        Priority.BATCH,
        "team-c",
        LATER,
    )
