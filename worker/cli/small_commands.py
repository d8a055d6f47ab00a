"""`promptq submit`, `status`, `config` and `fake-provider`: their options and their runs."""

from __future__ import annotations

import argparse
import json
import sys

from worker.cli.options import (
    EXIT_FAILED,
    config_option,
    parse_overrides,
    positive_seconds,
    priority_option,
    tenant_name,
)
from worker.errors import EXIT_USAGE
from worker.settings import load_settings


def add_submit(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = commands.add_parser(
        "submit",
        help="submit one prompt; print its job id, or wait and print the answer",
        description="Submit one prompt to the fleet at PROMPTQ_REDIS_URL (default localhost).",
    )
    submit.add_argument("prompt", help="the prompt text")
    config_option(submit)
    submit.add_argument("--model", help="model for this prompt (default: the workers' LLM_MODEL)")
    priority_option(
        submit, default=None, help="interactive, default or batch, highest first (default: default)"
    )
    submit.add_argument(
        "--tenant",
        type=tenant_name,
        metavar="NAME",
        help="the tenant the job belongs to, for the fleet's fair share (default: default)",
    )
    submit.add_argument(
        "--deadline-s",
        type=positive_seconds,
        metavar="S",
        help="seconds from now by which the job must start, else it fails as deadline_exceeded",
    )
    submit.add_argument("--wait", action="store_true", help="wait for the answer and print it")
    submit.add_argument(
        "--timeout", type=float, default=600.0, help="seconds --wait waits (default: 600)"
    )
    submit.set_defaults(run=run_submit_command)


def run_submit_command(args: argparse.Namespace) -> int:
    from api_client import Client, JobFailed, PromptqError  # noqa: PLC0415

    settings = load_settings(args.config)
    try:
        with Client(settings.queue.broker_url) as client:
            job = client.submit(
                args.prompt,
                model=args.model,
                priority=args.priority,
                tenant=args.tenant,
                deadline_s=args.deadline_s,
            )
            if not args.wait:
                print(job.id)
                return 0
            print(job.wait(timeout=args.timeout).content or "")
            return 0
    except JobFailed as exc:
        print(f"promptq submit: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except PromptqError as exc:
        print(f"promptq submit: {exc}", file=sys.stderr)
        return EXIT_USAGE


def add_status(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="queue depth, jobs in flight, retries scheduled, workers online",
        description="What the fleet at PROMPTQ_REDIS_URL (default localhost) is doing now.",
    )
    config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(run=run_status_command)


def run_status_command(args: argparse.Namespace) -> int:
    from api_client import PromptqError  # noqa: PLC0415
    from worker.ops.fleet_status import format_status, gather_status  # noqa: PLC0415

    try:
        status = gather_status(load_settings(args.config).queue.broker_url)
    except PromptqError as exc:
        print(f"promptq status: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(status.to_json()) if args.json else format_status(status))
    return 0


def add_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser(
        "config",
        help="the effective settings and where each value came from (secrets masked)",
        description=(
            "Print every LLM_* and PROMPTQ_* setting as a worker would use it, and its source: "
            "default, file, environment or flag. API keys are masked."
        ),
    )
    config_option(config)
    config.add_argument(
        "-s", "--set", action="append", default=[], metavar="KEY=VALUE", help="as for batch"
    )
    config.set_defaults(run=run_config_command)


def run_config_command(args: argparse.Namespace) -> int:
    from worker.ops.config_report import describe_settings, format_rows  # noqa: PLC0415

    rows = describe_settings(args.config, llm_overrides=parse_overrides(args.set))
    print(format_rows(rows))
    return 0


def add_fake_provider(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from worker import fake_provider  # noqa: PLC0415  (aiohttp: only this command needs it)

    server = commands.add_parser(
        "fake-provider",
        help="run a local OpenAI-compatible server for demos, tests and capacity planning",
        description=(
            "A local OpenAI-compatible server (/v1/chat/completions, /v1/embeddings, "
            "/v1/models) with deterministic replies, optional latency, errors and "
            "RPM/TPM limits that answer 429 with Retry-After, as a real provider would."
        ),
    )
    fake_provider.add_arguments(server)
    server.set_defaults(run=fake_provider.run)
