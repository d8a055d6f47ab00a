"""api_client._polling: reading a job's outcome or state, the Poller's pacing, URL redaction."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from api_client import JobNotFound, JobStatus, JobTimeout
from api_client._polling import Poller, poll_keys, read_poll, redact_url, status_of
from api_client._schemas import ErrorKind, JobError, Outcome, PromptResult, Usage

JOB_ID = "0b9f4c3e-4ac4-4d6e-9b6c-0f3c2b7a1d55"


# --- reading outcomes -----------------------------------------------------------------------


def _success() -> Outcome:
    result = PromptResult(
        id=JOB_ID,
        model="test-model",
        content="2, 3, 5",
        message={"role": "assistant", "content": "2, 3, 5"},
        finish_reason="stop",
        usage=Usage(prompt_tokens=4, completion_tokens=5, total_tokens=9),
        cost_usd=None,
        attempts=1,
        latency_s=0.2,
        created=datetime(2024, 6, 1, tzinfo=UTC),
    )
    return Outcome(status=JobStatus.SUCCEEDED, result=result)


def _failure() -> Outcome:
    error = JobError(kind=ErrorKind.RATE_LIMITED, message="429", status_code=429, attempts=9)
    return Outcome(status=JobStatus.FAILED, error=error)


def test_poll_keys_are_outcome_then_state() -> None:
    assert poll_keys(JOB_ID) == [f"promptq:result:{JOB_ID}", f"promptq:state:{JOB_ID}"]


@pytest.mark.parametrize("state", [b"retrying", b"running", "queued", None])
def test_a_stored_outcome_wins_over_any_state(state: bytes | str | None) -> None:
    raw = _success().model_dump_json().encode()

    assert status_of(JOB_ID, raw, state) is JobStatus.SUCCEEDED
    assert read_poll([JOB_ID], [raw, state]) == {JOB_ID: _success()}


@pytest.mark.parametrize(
    ("raw_state", "status"),
    [(b"queued", JobStatus.QUEUED), ("running", JobStatus.RUNNING), (b"retrying", "retrying")],
)
def test_status_without_an_outcome_is_the_state(raw_state: bytes | str, status: str) -> None:
    assert status_of(JOB_ID, None, raw_state) == status


def test_neither_outcome_nor_state_is_job_not_found() -> None:
    with pytest.raises(JobNotFound) as raised:
        status_of(JOB_ID, None, None)
    assert raised.value.job_id == JOB_ID
    assert isinstance(raised.value, LookupError)

    with pytest.raises(JobNotFound) as raised_many:
        read_poll(["a", JOB_ID], [None, b"queued", None, None])
    assert raised_many.value.job_id == JOB_ID


def test_read_poll_gives_outcomes_of_finished_jobs_and_states_of_the_rest() -> None:
    raws = [
        _success().model_dump_json(),
        None,
        None,
        b"running",
        _failure().model_dump_json().encode(),
        b"retrying",
    ]

    polled = read_poll(["done", "busy", "failed"], raws)

    assert polled == {"done": _success(), "busy": JobStatus.RUNNING, "failed": _failure()}


# --- polling --------------------------------------------------------------------------------


def test_poller_with_zero_timeout_times_out_at_once() -> None:
    poller = Poller(0)

    with pytest.raises(JobTimeout) as raised:
        poller.sleep_s(3)

    assert raised.value.timeout_s == 0
    assert "3 job(s)" in str(raised.value)
    assert isinstance(raised.value, TimeoutError)


def test_poller_without_timeout_backs_off_to_its_ceiling() -> None:
    poller = Poller(None)

    delays = [poller.sleep_s(1) for _ in range(8)]

    assert delays[0] == Poller.FIRST_S
    assert delays == sorted(delays)
    assert delays[-1] == Poller.CEILING_S
    poller.progressed()
    assert poller.sleep_s(1) == Poller.FIRST_S


def test_poller_never_sleeps_past_its_deadline() -> None:
    poller = Poller(0.05)

    for _ in range(3):
        assert poller.sleep_s(1) <= 0.05


# --- URL redaction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@localhost:6379/0", "redis://:***@localhost:6379/0"),
        ("redis://user:pw@localhost/0", "redis://user:***@localhost/0"),
        ("rediss://default:pw@cache.example:6380", "rediss://default:***@cache.example:6380"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
