"""`promptq batch`: a JSONL file of prompts through the workers into a JSONL file of answers."""

from __future__ import annotations

import itertools
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from api_client import (
    BrokerUnavailable,
    Client,
    ErrorKind,
    InvalidRequest,
    Job,
    JobError,
    JobFailed,
    JobStatus,
    Priority,
)
from api_client._polling import Poller
from api_client._schemas import checked_priority, checked_tenant
from worker.batch.input import BatchItem, read_items
from worker.batch.output import OutputWriter, read_done

SUBMIT_CHUNK = 200  # prompts per pipelined submit_many
_NOT_IN_A_TENANT_NAME = re.compile(r"[^A-Za-z0-9_.:\-]")


def default_tenant(output_path: Path) -> str:
    """The tenant a batch runs as when none is named: ``batch-`` and OUTPUT's file name
    without its extension (``nightly.jsonl``: ``batch-nightly``), so each batch shares the
    fleet as a tenant of its own, and a resumed run is the same tenant. Characters a tenant
    name cannot hold become ``-``; it is cut at 64 characters."""
    return ("batch-" + _NOT_IN_A_TENANT_NAME.sub("-", output_path.stem))[:64]


@dataclass
class Tally:
    """What a batch run did, for the progress display and the summary."""

    to_run: int = 0  # prompts this run submits (the rest were already in OUTPUT)
    already_done: int = 0
    succeeded: int = 0
    failed: int = 0
    failed_by_kind: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    retrying: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    def summary(self) -> dict[str, Any]:
        return {
            "submitted": self.to_run,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "failed_by_kind": dict(self.failed_by_kind),
            "already_done": self.already_done,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": round(self.cost_usd, 6),
            "elapsed_s": round(time.monotonic() - self.started, 3),
        }


class Display(Protocol):
    """Where progress goes: a live terminal display, or nowhere."""

    def update(self, tally: Tally) -> None: ...


def run_batch(
    client: Client,
    input_path: Path,
    output_path: Path,
    *,
    valid_items: int,
    model: str | None = None,
    max_in_flight: int = 500,
    retry_failed: bool = False,
    budget: str | None = None,
    priority: Priority | str = Priority.BATCH,
    tenant: str | None = None,
    display: Display | None = None,
    tally: Tally | None = None,
) -> Tally:
    """Submit every line of INPUT not yet answered in OUTPUT, and write each answer as it comes.

    At most ``max_in_flight`` prompts are queued or running at once; the input is streamed.
    With ``budget`` (Client.create_budget) every prompt's calls are charged to it. Every
    prompt runs at ``priority`` (default: batch, below a single submit's default) as
    ``tenant`` (default: default_tenant(output_path)); InvalidRequest for a bad one.
    Each output line is flushed when written, so an interrupted run leaves a valid OUTPUT and
    the same call resumes it; ``tally`` (a new one by default) then says what it had in flight.
    """
    update = _run_fields(output_path, budget, priority, tenant)
    succeeded, failed = read_done(output_path)
    skip = succeeded if retry_failed else succeeded | failed
    tally = Tally() if tally is None else tally
    pending = _unanswered(input_path, model, skip, tally)
    tally.to_run = max(valid_items - tally.already_done, 0)  # refined once the input is read
    in_flight: dict[str, tuple[Job, str]] = {}
    poller = Poller(None, client.settings.max_outage_s)
    exhausted = False
    with OutputWriter(output_path) as writer:
        while True:
            room = max_in_flight - len(in_flight)
            if room > 0 and not exhausted:
                chunk = list(itertools.islice(pending, min(room, SUBMIT_CHUNK)))
                exhausted = len(chunk) < min(room, SUBMIT_CHUNK)
                if chunk:
                    requests = [item.request.model_copy(update=update) for item in chunk]
                    jobs = client.submit_many(requests)
                    for job, item in zip(jobs, chunk, strict=True):
                        in_flight[job.id] = (job, item.custom_id)
                    tally.in_flight = len(in_flight)
            if exhausted:
                tally.to_run = tally.finished + len(in_flight)
            if not in_flight and exhausted:
                break
            try:
                finished = client.poll(job for job, _ in in_flight.values())
            except BrokerUnavailable as exc:  # ride the outage out, as Job.wait() does
                time.sleep(poller.unreachable(exc, len(in_flight)))
                continue
            poller.reachable()
            for job in finished:
                _, custom_id = in_flight.pop(job.id)
                _record(writer, tally, job, custom_id)
            tally.in_flight = len(in_flight)
            tally.retrying = sum(
                1 for job, _ in in_flight.values() if job.last_status is JobStatus.RETRYING
            )
            if display is not None:
                display.update(tally)
            if finished:
                poller.progressed()
            else:
                time.sleep(poller.sleep_s(len(in_flight)))
    return tally


def _run_fields(
    output_path: Path, budget: str | None, priority: Priority | str, tenant: str | None
) -> dict[str, Any]:
    """The request fields the run sets on every prompt: priority, tenant and budget."""
    try:
        fields: dict[str, Any] = {
            "priority": checked_priority(priority),
            "tenant": checked_tenant(default_tenant(output_path) if tenant is None else tenant),
        }
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if budget is not None:
        fields["budget"] = budget
    return fields


def _unanswered(path: Path, model: str | None, skip: set[str], tally: Tally) -> Iterator[BatchItem]:
    for item in read_items(path, model=model):
        if not isinstance(item, BatchItem):
            continue  # reported (or waived with --skip-invalid) before the run
        if item.custom_id in skip:
            tally.already_done += 1
            continue
        yield item


def _record(writer: OutputWriter, tally: Tally, job: Job, custom_id: str) -> None:
    try:
        result = job.result()  # cached by poll(): no round trip
    except JobFailed as exc:
        error = JobError(
            kind=ErrorKind(exc.kind),
            message=exc.message,
            status_code=exc.status_code,
            attempts=exc.attempts,
        )
        writer.write_failure(custom_id, job.id, error)
        tally.failed += 1
        tally.failed_by_kind[exc.kind] += 1
        return
    assert result is not None
    writer.write_success(custom_id, result)
    tally.succeeded += 1
    tally.prompt_tokens += result.usage.prompt_tokens
    tally.completion_tokens += result.usage.completion_tokens
    tally.cost_usd += result.cost_usd or 0.0


class RichDisplay:
    """A live progress bar on the terminal: done, failed, retrying, in flight, rate, ETA, spend."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("batch", total=None, detail="")

    def __enter__(self) -> RichDisplay:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def update(self, tally: Tally) -> None:
        elapsed = max(time.monotonic() - tally.started, 1e-9)
        detail = (
            f"failed {tally.failed}  retrying {tally.retrying}  in flight {tally.in_flight}  "
            f"{tally.finished / elapsed:.1f}/s  "
            f"tokens {tally.prompt_tokens + tally.completion_tokens:,}  ${tally.cost_usd:.4f}"
        )
        self._progress.update(
            self._task, completed=tally.finished, total=tally.to_run or None, detail=detail
        )
