"""`promptq cancel` against a redis-server, and the offer `promptq batch` makes on Ctrl-C."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from api_client import CancelResult, Client, JobStatus
from api_client._constants import tenant_jobs_key
from api_client._polling import Poller
from api_client._schemas import ErrorKind, JobError, Outcome
from tests.support.redis_server import RedisServer
from worker.cli.cancel_command import CANCEL_WINDOW_S, count_lines, offer_to_cancel
from worker.cli.main import main
from worker.cli.options import EXIT_INTERRUPTED
from worker.errors import EXIT_USAGE
from worker.fleet.store import JobStore


@pytest.fixture
def fleet_client(real_redis: RedisServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[Client]:
    """A client on an emptied redis-server, which the commands reach through the environment."""
    monkeypatch.setenv("PROMPTQ_REDIS_URL", real_redis.url)
    with Client(real_redis.url) as client:
        client._redis.flushall()
        yield client


def test_cancel_by_id_prints_a_line_per_case(
    fleet_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    queued, running, done = fleet_client.submit_many(["queued", "running", "done"])
    store = JobStore(fleet_client._redis, ttl_s=60)
    store.begin([running.id])
    error = JobError(kind=ErrorKind.TIMEOUT, message="slow")
    store.finish(done.id, Outcome(status=JobStatus.FAILED, error=error)).run()

    status = main(["cancel", queued.id, running.id, done.id, "no-such-job"])

    assert status == 0
    assert capsys.readouterr().out.splitlines() == [
        "cancelled: 1",
        "running: 1 (their calls finish and are reported; none is retried)",
        "finished: 1 (1 failed: unchanged)",
        "unknown: 1 (no-such-job)",
    ]
    assert queued.status() is JobStatus.FAILED
    assert running.status() is JobStatus.RUNNING


def test_cancel_a_tenant_and_a_batch(
    fleet_client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet_client.submit_many([{"prompt": f"p{i}", "tenant": "team-a"} for i in range(3)])
    fleet_client.submit_many([{"prompt": f"n{i}", "tenant": "batch-nightly"} for i in range(2)])
    other = fleet_client.submit("other", tenant="team-b")

    assert main(["cancel", "--tenant", "team-a"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "cancelled: 3"
    assert main(["cancel", "--batch", "out/nightly.jsonl"]) == 0  # batch-<OUTPUT's stem>
    assert capsys.readouterr().out.splitlines()[0] == "cancelled: 2"
    assert other.status() is JobStatus.QUEUED


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cancel"], "give JOB_IDs, --tenant NAME or --batch OUTPUT.jsonl"),
        (["cancel", "job-1", "--tenant", "team-a"], "give JOB_IDs, --tenant NAME or --batch"),
        (["cancel", "bad id"], "not a job id: 'bad id'"),
    ],
)
def test_a_bad_cancel_is_a_usage_error(
    fleet_client: Client, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_tenant_and_batch_cannot_both_be_given(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["cancel", "--tenant", "a", "--batch", "out.jsonl"])
    assert exited.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_many_unknown_ids_are_listed_up_to_a_limit() -> None:
    result = CancelResult(unknown=[f"job-{i}" for i in range(60)])

    last = count_lines(result)[-1]

    assert last.startswith("unknown: 60 (job-0, job-1, ")
    assert last.endswith("job-49, and 10 more)")


# --- promptq batch: Ctrl-C ------------------------------------------------------------------


class _Offer:
    """The offer's collaborators, recorded."""

    def __init__(self, second_ctrl_c: bool) -> None:
        self.second_ctrl_c = second_ctrl_c
        self.waited_s: list[float] = []
        self.cancelled: list[str] = []
        self.out = io.StringIO()

    def second_interrupt(self, timeout_s: float) -> bool:
        self.waited_s.append(timeout_s)
        return self.second_ctrl_c

    def cancel_tenant(self, tenant: str) -> CancelResult:
        self.cancelled.append(tenant)
        return CancelResult(cancelled=["a", "b"], running=["c"])

    def offer(self, open_jobs: int) -> CancelResult | None:
        return offer_to_cancel(
            open_jobs,
            "batch-nightly",
            second_interrupt=self.second_interrupt,
            cancel_tenant=self.cancel_tenant,
            out=self.out,
        )


def test_a_second_ctrl_c_in_time_cancels_the_batch() -> None:
    offer = _Offer(second_ctrl_c=True)

    result = offer.offer(3)

    assert result is not None and result.cancelled == ["a", "b"]
    assert offer.cancelled == ["batch-nightly"]
    assert offer.waited_s == [CANCEL_WINDOW_S]
    lines = offer.out.getvalue().splitlines()
    assert lines[0] == (
        "promptq batch: press Ctrl-C again within 5 s to cancel the 3 jobs this batch queued "
        "(tenant batch-nightly)"
    )
    assert lines[1:3] == [
        "promptq batch: cancelled: 2",
        "promptq batch: running: 1 " + ("(their calls finish and are reported; none is retried)"),
    ]


def test_no_second_ctrl_c_cancels_nothing() -> None:
    offer = _Offer(second_ctrl_c=False)

    assert offer.offer(3) is None

    assert offer.cancelled == []
    assert "stay queued" in offer.out.getvalue()


def test_nothing_is_offered_when_nothing_is_left() -> None:
    offer = _Offer(second_ctrl_c=True)

    assert offer.offer(0) is None

    assert (offer.waited_s, offer.cancelled, offer.out.getvalue()) == ([], [], "")


def test_an_interrupted_batch_on_a_fleet_offers_to_cancel_its_tenant(
    fleet_client: Client,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C while the batch waits for answers (no worker runs): a second one cancels."""
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(4))
    )

    def ctrl_c(self: Poller, pending: int) -> float:  # the batch's first pause between polls
        raise KeyboardInterrupt

    monkeypatch.setattr(Poller, "sleep_s", ctrl_c)
    monkeypatch.setattr("worker.cli.batch_command.wait_for_interrupt", lambda timeout_s: True)

    status = main(["batch", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "nightly.jsonl")])

    assert status == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "cancel the 4 jobs this batch queued (tenant batch-nightly)" in err
    assert "promptq batch: cancelled: 4" in err
    assert fleet_client._redis.scard(tenant_jobs_key("batch-nightly")) == 0
