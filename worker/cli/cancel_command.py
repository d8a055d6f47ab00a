"""`promptq cancel`, and the offer `promptq batch` makes on Ctrl-C to cancel what it queued."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from worker.cli.options import EXIT_FAILED, config_option, tenant_name
from worker.errors import EXIT_USAGE
from worker.settings import load_settings

if TYPE_CHECKING:
    from api_client import CancelResult

# How long `promptq batch` waits, after a first Ctrl-C, for a second one that cancels.
CANCEL_WINDOW_S = 5.0
MAX_LISTED_UNKNOWN = 50  # unknown ids printed at most


def add_cancel(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cancel = commands.add_parser(
        "cancel",
        help="cancel jobs: by id, a tenant's, or a batch's",
        description=(
            "Cancel jobs of the fleet at PROMPTQ_REDIS_URL (default localhost): waiting jobs "
            "end at once (failed, kind cancelled); a job whose call is in flight keeps that "
            "call's outcome but is not retried; finished jobs are left as they are. Prints how "
            "many jobs were found in each case."
        ),
    )
    cancel.add_argument("job_ids", nargs="*", metavar="JOB_ID", help="ids of the jobs to cancel")
    config_option(cancel)
    which = cancel.add_mutually_exclusive_group()
    which.add_argument(
        "--tenant", type=tenant_name, metavar="NAME", help="cancel every open job of this tenant"
    )
    which.add_argument(
        "--batch",
        type=Path,
        metavar="OUTPUT.jsonl",
        help="cancel the jobs of the `promptq batch` writing OUTPUT.jsonl (its tenant: batch- "
        "and OUTPUT's file name without its extension; for a batch run with --tenant, cancel "
        "that tenant instead)",
    )
    cancel.set_defaults(run=run_cancel_command)


def run_cancel_command(args: argparse.Namespace) -> int:
    from api_client import Client, InvalidRequest, PromptqError  # noqa: PLC0415

    name = "promptq cancel"
    if bool(args.job_ids) + (args.tenant is not None) + (args.batch is not None) != 1:
        print(f"{name}: give JOB_IDs, --tenant NAME or --batch OUTPUT.jsonl", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client(load_settings(args.config).queue.broker_url) as client:
            if args.job_ids:
                result = client.cancel(args.job_ids)
            else:
                result = client.cancel_tenant(args.tenant or batch_tenant(args.batch))
    except InvalidRequest as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PromptqError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(count_lines(result)))
    return 0


def batch_tenant(output_path: Path) -> str:
    """The tenant `promptq batch` runs as when it names none (worker.batch.run)."""
    from worker.batch.run import default_tenant  # noqa: PLC0415  (rich: only batches need it)

    return default_tenant(output_path)


def count_lines(result: CancelResult) -> list[str]:
    """One line per case, with its count (and the unknown ids)."""
    statuses = list(result.finished.values())
    by_status = ", ".join(
        f"{statuses.count(status)} {status.value}"
        for status in sorted(set(statuses), key=lambda s: s.value, reverse=True)
    )
    unknown = ", ".join(result.unknown[:MAX_LISTED_UNKNOWN])
    if len(result.unknown) > MAX_LISTED_UNKNOWN:
        unknown += f", and {len(result.unknown) - MAX_LISTED_UNKNOWN} more"
    running = " (their calls finish and are reported; none is retried)"
    return [
        f"cancelled: {len(result.cancelled)}",
        f"running: {len(result.running)}" + (running if result.running else ""),
        f"finished: {len(result.finished)}" + (f" ({by_status}: unchanged)" if by_status else ""),
        f"unknown: {len(result.unknown)}" + (f" ({unknown})" if unknown else ""),
    ]


def offer_to_cancel(
    open_jobs: int,
    tenant: str,
    *,
    second_interrupt: Callable[[float], bool],
    cancel_tenant: Callable[[str], CancelResult],
    out: TextIO,
) -> CancelResult | None:
    """After a batch's first Ctrl-C: offer to cancel its ``open_jobs`` (its tenant's), and do
    so when ``second_interrupt(CANCEL_WINDOW_S)`` says a second Ctrl-C came in time. Returns
    what the cancel did, or None when nothing was cancelled."""
    if open_jobs <= 0:
        return None
    print(
        f"promptq batch: press Ctrl-C again within {CANCEL_WINDOW_S:g} s to cancel the "
        f"{open_jobs} jobs this batch queued (tenant {tenant})",
        file=out,
        flush=True,
    )
    if not second_interrupt(CANCEL_WINDOW_S):
        print("promptq batch: its jobs stay queued; the same command resumes", file=out)
        return None
    result = cancel_tenant(tenant)
    for line in count_lines(result):
        print(f"promptq batch: {line}", file=out)
    return result


def wait_for_interrupt(timeout_s: float) -> bool:
    """Whether Ctrl-C (SIGINT, as KeyboardInterrupt) comes within ``timeout_s``."""
    try:
        time.sleep(timeout_s)  # the wait for a key press, not a synchronisation
    except KeyboardInterrupt:
        return True
    return False
