"""`promptq batch`: its options, and a JSONL file through the fleet or an embedded worker."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cli.cancel_command import offer_to_cancel, wait_for_interrupt
from worker.cli.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    config_option,
    parse_overrides,
    priority_option,
    tenant_name,
)
from worker.errors import EXIT_USAGE
from worker.settings import Settings, load_settings

if TYPE_CHECKING:
    from api_client import CancelResult


def add_batch(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    batch = commands.add_parser(
        "batch",
        help="run a JSONL file of prompts and write the answers to a JSONL file",
        description=(
            "Run every prompt of INPUT (OpenAI Batch API request lines, or simple "
            '{"prompt": ...} / {"messages": [...]} lines) and write the answers to OUTPUT in the '
            "OpenAI Batch API output format, as they arrive. Running the same command again "
            "resumes: only custom_ids not yet in OUTPUT are sent. With PROMPTQ_REDIS_URL (or "
            "[promptq] redis_url) set, the prompts go to that fleet's workers; without, the "
            "command runs an embedded broker and worker itself."
        ),
    )
    batch.add_argument("input", type=Path, metavar="INPUT.jsonl")
    batch.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT.jsonl")
    config_option(batch)
    batch.add_argument("--model", help="use this model for every line (overrides the file's)")
    batch.add_argument(
        "--max-in-flight",
        type=int,
        default=500,
        help="prompts queued or running at once (default: 500)",
    )
    batch.add_argument(
        "--max-spend",
        type=float,
        metavar="USD",
        help="stop calling once this run has spent USD (by LiteLLM's prices); the lines left "
        "fail as budget_exceeded",
    )
    priority_option(
        batch,
        default="batch",
        help="interactive, default or batch, highest first, for every prompt (default: batch, "
        "below a single submit's default)",
    )
    batch.add_argument(
        "--tenant",
        type=tenant_name,
        metavar="NAME",
        help="the tenant every prompt belongs to, for the fleet's fair share (default: batch- "
        "and OUTPUT's file name without its extension, e.g. batch-nightly for nightly.jsonl: "
        "each batch a tenant of its own, the same one when resumed)",
    )
    batch.add_argument(
        "--retry-failed", action="store_true", help="also re-run lines that failed in OUTPUT"
    )
    batch.add_argument(
        "--skip-invalid", action="store_true", help="run the valid lines despite invalid ones"
    )
    batch.add_argument(
        "-s",
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an LLM setting for this run's embedded worker, e.g. -s num_retries=3 (repeatable)",
    )
    batch.add_argument(
        "-c", "--concurrency", type=int, help="embedded worker threads (default: 64)"
    )
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    batch.add_argument(
        "--json", action="store_true", help="print a JSON summary on stdout at the end"
    )
    batch.set_defaults(run=run_batch_command)


def run_batch_command(args: argparse.Namespace) -> int:
    from worker.batch.input import check_input  # noqa: PLC0415
    from worker.batch.run import RichDisplay, Tally, run_batch  # noqa: PLC0415

    name = "promptq batch"
    if args.max_in_flight < 1:
        print(f"{name}: --max-in-flight must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    if args.max_spend is not None and not (0 <= args.max_spend < math.inf):
        print(f"{name}: --max-spend must be a finite amount >= 0", file=sys.stderr)
        return EXIT_USAGE
    if not args.input.is_file():
        print(f"{name}: no such input file: {args.input}", file=sys.stderr)
        return EXIT_USAGE
    settings = load_settings(args.config, llm=parse_overrides(args.set))
    valid, problems = check_input(args.input, model=args.model)
    if problems:
        for problem in problems:
            print(f"{name}: {args.input}: {problem}", file=sys.stderr)
        if not args.skip_invalid:
            print(f"{name}: nothing was submitted (--skip-invalid runs the rest)", file=sys.stderr)
            return EXIT_USAGE
    talk = not args.quiet
    show_progress = talk and not args.json and sys.stderr.isatty()
    tally = Tally()
    try:
        with _broker(settings, args, talk) as redis_url:
            from api_client import Client  # noqa: PLC0415

            with Client(redis_url) as client:
                budget = None
                if args.max_spend is not None:
                    budget = client.create_budget(args.max_spend)
                display = RichDisplay() if show_progress else None
                with display or nullcontext():
                    tally = run_batch(
                        client,
                        args.input,
                        args.output,
                        valid_items=valid,
                        model=args.model,
                        max_in_flight=args.max_in_flight,
                        retry_failed=args.retry_failed,
                        budget=budget,
                        priority=args.priority,
                        tenant=args.tenant,
                        display=display,
                        tally=tally,
                    )
    except KeyboardInterrupt:
        print(
            f"{name}: interrupted; {args.output} holds every answer so far: "
            "run the same command again to resume",
            file=sys.stderr,
        )
        if settings.queue.redis_url is not None:  # a fleet's: the jobs outlive the command
            _offer_to_cancel(settings.queue.redis_url, args, tally.in_flight)
        return EXIT_INTERRUPTED
    summary = tally.summary()
    if args.json:
        print(json.dumps(summary))
    if talk:
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(tally.failed_by_kind.items()))
        print(
            f"{name}: {tally.succeeded} succeeded, {tally.failed} failed"
            + (f" ({kinds})" if kinds else "")
            + f", {tally.already_done} already in {args.output}; "
            f"{tally.prompt_tokens + tally.completion_tokens:,} tokens, "
            f"${tally.cost_usd:.4f}, {summary['elapsed_s']:.1f} s",
            file=sys.stderr,
        )
    return EXIT_FAILED if tally.failed else 0


def _offer_to_cancel(redis_url: str, args: argparse.Namespace, open_jobs: int) -> None:
    """Offer to cancel the jobs the interrupted batch left queued or running in the fleet."""
    from api_client import Client, PromptqError  # noqa: PLC0415
    from worker.batch.run import default_tenant  # noqa: PLC0415

    def cancel_tenant(tenant: str) -> CancelResult:
        with Client(redis_url) as client:
            return client.cancel_tenant(tenant)

    tenant = args.tenant or default_tenant(args.output)
    try:
        offer_to_cancel(
            open_jobs,
            tenant,
            second_interrupt=wait_for_interrupt,
            cancel_tenant=cancel_tenant,
            out=sys.stderr,
        )
    except PromptqError as exc:
        print(f"promptq batch: could not cancel its jobs: {exc}", file=sys.stderr)


@contextmanager
def _broker(settings: Settings, args: argparse.Namespace, talk: bool) -> Iterator[str]:
    """The fleet's Redis when one is configured, else an embedded broker and worker."""
    url = settings.queue.redis_url
    if url is not None:
        if args.set and talk:
            print(
                "promptq batch: -s/--set only applies to an embedded worker; "
                "the fleet's workers use their own settings",
                file=sys.stderr,
            )
        yield url
        return
    from worker.app.embedded import Embedded  # noqa: PLC0415  (Celery and LiteLLM: embedded only)

    embedded = Embedded(settings, concurrency=args.concurrency)
    with embedded as embedded_url:
        if talk:
            print(
                f"promptq batch: no broker configured, running embedded ({embedded.description} "
                "and a worker in this process); set PROMPTQ_REDIS_URL to use a fleet instead",
                file=sys.stderr,
            )
        yield embedded_url
