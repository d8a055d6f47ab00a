"""The scheduling options of the commands: `promptq submit --priority/--tenant/--deadline-s` and
`promptq batch --priority/--tenant`, their refusals (usage errors naming the flag) and what
reaches the requests queued."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from api_client import ClientSettings, JobFailed, JobStatus, Priority, PromptRequest
from api_client._constants import request_key
from api_client._schemas import JobRequest
from api_client._task_messages import REQUEST_TYPES
from tests.support.redis_server import RedisServer
from worker.batch.run import default_tenant, run_batch
from worker.cli.main import main
from worker.cli.options import EXIT_FAILED
from worker.errors import EXIT_USAGE

LINES = [
    {"custom_id": "a", "prompt": "first"},
    {"prompt": "second", "temperature": 0},
    {
        "custom_id": "e",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "text-embedding-3-small", "input": "third"},
    },
]


def _input(path: Path) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in LINES), encoding="utf-8")
    return path


# --- usage errors ---------------------------------------------------------------------------

BATCH = ["batch", "in.jsonl", "-o", "out.jsonl"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["submit", "hi", "--priority", "high"], "argument --priority: invalid choice: 'high'"),
        (["submit", "hi", "--priority", "Batch"], "argument --priority: invalid choice"),
        (["submit", "hi", "--tenant", "team a"], "argument --tenant: not a tenant name"),
        (["submit", "hi", "--tenant", "x" * 65], "argument --tenant: not a tenant name"),
        (["submit", "hi", "--deadline-s", "0"], "argument --deadline-s: must be a finite number"),
        (["submit", "hi", "--deadline-s", "-5"], "argument --deadline-s: must be a finite"),
        (["submit", "hi", "--deadline-s", "nan"], "argument --deadline-s: must be a finite"),
        (["submit", "hi", "--deadline-s", "inf"], "argument --deadline-s: must be a finite"),
        (["submit", "hi", "--deadline-s", "soon"], "argument --deadline-s: must be a finite"),
        ([*BATCH, "--priority", "urgent"], "argument --priority: invalid choice: 'urgent'"),
        ([*BATCH, "--tenant", "team/a"], "argument --tenant: not a tenant name"),
    ],
)
def test_a_bad_scheduling_option_is_a_usage_error_naming_the_flag(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)

    assert exited.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_the_priority_error_lists_the_levels(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["submit", "hi", "--priority", "high"])

    assert "(choose from 'interactive', 'default', 'batch')" in capsys.readouterr().err


def test_batch_help_says_what_the_defaults_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["batch", "--help"])

    assert exited.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--priority LEVEL" in help_text
    assert "(default: batch," in help_text
    assert "--tenant NAME" in help_text
    assert "batch-nightly for nightly.jsonl" in help_text


# --- promptq submit -------------------------------------------------------------------------


def _queued(real_redis: RedisServer, job_id: str) -> JobRequest:
    connection = real_redis.client()
    try:
        task, request = connection.hmget(request_key(job_id), ["task", "request"])
    finally:
        connection.close()
    assert isinstance(task, bytes)
    assert isinstance(request, bytes)
    return REQUEST_TYPES[task.decode()].model_validate_json(request)


def test_submit_queues_the_options(
    real_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROMPTQ_REDIS_URL", real_redis.url)

    before = time.time()
    status = main(
        ["submit", "hi", "--priority", "interactive", "--tenant", "team-a", "--deadline-s", "30"]
    )
    after = time.time()

    assert status == 0
    queued = _queued(real_redis, capsys.readouterr().out.strip())
    assert queued.priority is Priority.INTERACTIVE
    assert queued.tenant == "team-a"
    assert queued.deadline_at is not None
    assert before + 30 <= queued.deadline_at <= after + 30


def test_submit_without_the_options_queues_the_defaults(
    real_redis: RedisServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PROMPTQ_REDIS_URL", real_redis.url)

    assert main(["submit", "hi"]) == 0

    queued = _queued(real_redis, capsys.readouterr().out.strip())
    assert (queued.priority, queued.tenant_name, queued.deadline_at) == (
        Priority.DEFAULT,
        "default",
        None,
    )


# --- promptq batch --------------------------------------------------------------------------


class _CancelledJob:
    """A job that has failed as cancelled by the time it is first polled."""

    def __init__(self, job_id: str) -> None:
        self.id = job_id
        self.last_status = JobStatus.FAILED

    def result(self) -> None:
        raise JobFailed("cancelled by the test", job_id=self.id, kind="cancelled")


class _RecordingClient:
    """Stands in for Client under run_batch: keeps every request submitted."""

    def __init__(self) -> None:
        self.settings = ClientSettings()
        self.requests: list[JobRequest] = []

    def __enter__(self) -> _RecordingClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pass

    def submit_many(self, requests: list[JobRequest]) -> list[_CancelledJob]:
        first = len(self.requests)
        self.requests += requests
        return [_CancelledJob(f"job-{first + i}") for i in range(len(requests))]

    def poll(self, jobs: Any) -> list[_CancelledJob]:
        return list(jobs)


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> _RecordingClient:
    """What `promptq batch` submits to the fleet (PROMPTQ_REDIS_URL set: no embedded worker)."""
    client = _RecordingClient()
    monkeypatch.setenv("PROMPTQ_REDIS_URL", "redis://127.0.0.1:1/0")  # never reached
    monkeypatch.setattr("api_client.Client", lambda redis_url: client)
    return client


def test_a_batch_runs_at_batch_priority_as_a_tenant_of_its_own(
    fleet: _RecordingClient, tmp_path: Path
) -> None:
    _input(tmp_path / "in.jsonl")

    status = main(["batch", "in.jsonl", "-o", "nightly.jsonl", "-q"])

    assert status == EXIT_FAILED  # every job was cancelled
    assert len(fleet.requests) == len(LINES)
    assert {(r.priority, r.tenant) for r in fleet.requests} == {(Priority.BATCH, "batch-nightly")}
    written = [json.loads(line) for line in Path("nightly.jsonl").read_text().splitlines()]
    assert [line["error"]["code"] for line in written] == ["cancelled"] * len(LINES)


def test_batch_options_reach_every_request(fleet: _RecordingClient, tmp_path: Path) -> None:
    _input(tmp_path / "in.jsonl")

    main(["batch", "in.jsonl", "-o", "out.jsonl", "-q", "--priority", "interactive"])
    main(["batch", "in.jsonl", "-o", "out2.jsonl", "-q", "--tenant", "team-a"])

    assert [(r.priority, r.tenant) for r in fleet.requests] == [
        (Priority.INTERACTIVE, "batch-out"),
    ] * len(LINES) + [(Priority.BATCH, "team-a")] * len(LINES)


def test_run_batch_keeps_the_rest_of_each_request(tmp_path: Path) -> None:
    client = _RecordingClient()

    run_batch(
        client,  # type: ignore[arg-type]  # only what run_batch calls
        _input(tmp_path / "in.jsonl"),
        tmp_path / "out.jsonl",
        valid_items=len(LINES),
        budget="budget-1",
        tenant="default",
    )

    first = client.requests[0]
    assert isinstance(first, PromptRequest)
    assert first.messages == [{"role": "user", "content": "first"}]
    assert (first.priority, first.tenant_name, first.budget) == (
        Priority.BATCH,
        "default",
        "budget-1",
    )
    assert first.tenant is None  # "default" is stored as no tenant, as a request would
    assert client.requests[1].params == {"temperature": 0}


@pytest.mark.parametrize(
    ("priority", "tenant", "message"),
    [
        ("high", None, "priority must be one of interactive, default, batch, got 'high'"),
        (Priority.BATCH, "team a", "tenant must match"),
    ],
)
def test_run_batch_refuses_a_bad_option_before_reading_anything(
    tmp_path: Path, priority: str, tenant: str | None, message: str
) -> None:
    client = _RecordingClient()
    output = tmp_path / "out.jsonl"

    with pytest.raises(ValueError, match=message):
        run_batch(
            client,  # type: ignore[arg-type]  # only what run_batch calls
            _input(tmp_path / "in.jsonl"),
            output,
            valid_items=len(LINES),
            priority=priority,
            tenant=tenant,
        )

    assert client.requests == []
    assert not output.exists()


@pytest.mark.parametrize(
    ("output", "tenant"),
    [
        ("out.jsonl", "batch-out"),
        ("/data/runs/nightly.jsonl", "batch-nightly"),
        ("eval v2 (final).jsonl", "batch-eval-v2--final-"),
        ("résumé.jsonl", "batch-r-sum-"),
        ("org.eu:run_1.jsonl", "batch-org.eu:run_1"),
        ("x" * 100 + ".jsonl", "batch-" + "x" * 58),
    ],
)
def test_the_default_tenant_is_named_after_the_output(output: str, tenant: str) -> None:
    named = default_tenant(Path(output))

    assert named == tenant
    assert PromptRequest(messages=[{"role": "user", "content": "x"}], tenant=named).tenant == named
